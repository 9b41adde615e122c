"""Reduced-scale decoding of request images (imaging.EncodedImage, face_service.LocatedFaces) on
12-MP JPEGs made at run time from real photos (harness.images.phone_photo): the same best face
and distance as decoding every pixel, a face too small for the coarse scale found and verified
from a finer one, EXIF orientation applied at every scale; and the image headers read without Pillow (JPEG, PNG)
as Pillow reads them.
"""

from __future__ import annotations

import glob
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import cv2
import numpy as np
from PIL import Image

import imaging
from core.concurrency import Budget
from core.errors import InvalidInputError
from core.process import malloc_usage
from core.settings import DEFAULT_IMAGE_LIMITS
from engines import parse_load_request
from face_service import IDLE_RETURN_SECONDS, FaceService, LocatedFaces, best_face
from harness.images import b64, encode, faceless_image, jpeg_segments, phone_photo, png_chunk, read_bytes
from imaging import EncodedImage, check_header
from tests import support
from tests.support import IMAGES

# The answer with reduced decoding may move from the full decode's by what the detector's input
# differing in its last bits moves it (bench/FINDINGS.md, "reduced-scale decode").
MAX_DISTANCE_CHANGE = 0.02
# Boxes: within 1.5 px of the detector's 640 px input, in the 4000 px photo's pixels.
MAX_BOX_SHIFT_PX = 1.5 * 4000 / 640


def jpeg(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


def exif_rotated(raw: bytes) -> bytes:
    """The JPEG `raw` stored turned a quarter to the left, with EXIF orientation 6 (turn right to
    show): it decodes to the same upright picture."""
    upright = EncodedImage.from_bytes(raw, "img").decode()
    stored = cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    return encode(Image.fromarray(stored[..., ::-1]), "JPEG", quality=90, exif=exif)


def pillow_header(raw: bytes) -> tuple[str, int, int]:
    """Format, width and height as Pillow reads the header (what check_header used before)."""
    fmt, width, height, _ = imaging._pillow_header(raw, "img", DEFAULT_IMAGE_LIMITS)
    return fmt, width, height


def jpeg_header(raw: bytes) -> tuple[str, int, int] | None:
    """("JPEG", width, height) as imaging's own reader reads the header; None if it leaves it."""
    frame = imaging._jpeg_frame(raw)
    return None if frame is None else ("JPEG", frame.width, frame.height)


def decoded_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) OpenCV decodes `raw` to, before any EXIF orientation; None if it cannot."""
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if image is None else (image.shape[1], image.shape[0])


class FullDecode:
    """What the service computed before reduced decoding: every pixel decoded, then detection,
    best face and embedding on the full image."""

    def __init__(self, service: FaceService) -> None:
        loaded = service.loaded
        assert loaded is not None
        self.engine = loaded.engine

    def best(self, raw: bytes):
        image = EncodedImage.from_bytes(raw, "img").decode(1)
        face = best_face(self.engine.detect(image))
        return face, self.engine.embed(image, face)


class EncodedImageTest(unittest.TestCase):
    def test_coarsest_reduction_keeps_the_detector_input(self) -> None:
        cases = {
            (4000, 3000): 4,  # 1000x750 still covers 640; 500x375 would not
            (3000, 4000): 4,
            (1280, 799): 2,  # 640x400: exactly the fitted size
            (1279, 799): 2,  # ceil(1279 / 2) = 640: the last column is half a block
            (1278, 799): 1,
            (640, 480): 1,
            (6000, 200): 8,
        }
        for (width, height), reduction in cases.items():
            encoded = EncodedImage(b"", "img", "JPEG", width, height, 0)
            self.assertEqual(encoded.coarsest_reduction((640, 640)), reduction, (width, height))
        # Either way round: a 640x480 box needs 640 px along whichever side is decoded as wide.
        self.assertEqual(EncodedImage(b"", "img", "JPEG", 1600, 1000, 0).coarsest_reduction((640, 480)), 2)
        self.assertEqual(EncodedImage(b"", "img", "JPEG", 1000, 1600, 0).coarsest_reduction((640, 480)), 2)
        self.assertEqual(EncodedImage(b"", "img", "PNG", 4000, 3000, 0).coarsest_reduction((640, 640)), 1)

    def test_reduced_sizes_and_formats(self) -> None:
        image = faceless_image(1001, 503)
        encoded = EncodedImage.from_bytes(jpeg(image), "img")
        for reduction in (1, 2, 4, 8):
            expected = (-(-503 // reduction), -(-1001 // reduction), 3)
            self.assertEqual(encoded.decode(reduction).shape, expected)
        ok, png = cv2.imencode(".png", image)
        self.assertEqual(EncodedImage.from_bytes(png.tobytes(), "img").reductions, (1,))
        with self.assertRaises(ValueError):
            EncodedImage.from_bytes(png.tobytes(), "img").decode(2)

    def test_exif_orientation_applied_at_every_scale(self) -> None:
        upright = support.read_image(support.data_path(IMAGES, "obama_1.jpg"))
        raw = phone_photo(upright)
        rotated = EncodedImage.from_bytes(exif_rotated(raw), "img")
        plain = EncodedImage.from_bytes(raw, "img")
        self.assertEqual((rotated.width, rotated.height), (plain.height, plain.width))  # the header's
        for reduction in (1, 4):
            want = plain.decode(reduction)
            got = rotated.decode(reduction)
            self.assertEqual(got.shape, want.shape)
            # The same picture (JPEG re-encoding aside), not a turned one.
            self.assertLess(float(np.abs(got.astype(np.int16) - want).mean()), 3.0)


class HeaderTest(unittest.TestCase):
    """JPEG and PNG headers are read without Pillow (imaging._jpeg_frame, _png_header): the size
    OpenCV decodes and Pillow reads; anything the readers are not sure of is left to Pillow."""

    def photos(self) -> dict[str, bytes]:
        paths = glob.glob(os.path.join(support.data_path(), "**", "*.*"), recursive=True)
        files = {os.path.relpath(p, support.data_path()): p for p in paths if p.lower().endswith((".jpg", ".png"))}
        self.assertGreater(len(files), 30)
        with Image.open(support.data_path(IMAGES, "obama_1.jpg")) as source:
            photo = source.convert("RGB")
        grey = photo.convert("L")
        exif = Image.Exif()
        exif[0x0112] = 6
        made = {
            "progressive JPEG": encode(photo, "JPEG", progressive=True),
            "CMYK JPEG": encode(photo.convert("CMYK"), "JPEG"),
            "grey JPEG": encode(grey, "JPEG"),
            "EXIF-rotated JPEG": encode(photo, "JPEG", exif=exif.tobytes()),
            "MPO": encode(photo, "MPO", save_all=True, append_images=[photo.resize((64, 48))]),
            "12-MP JPEG": phone_photo(np.asarray(photo)[..., ::-1]),
            "RGBA PNG": encode(photo.convert("RGBA"), "PNG"),
            "palette PNG": encode(photo.convert("P"), "PNG"),
            "1-bit PNG": encode(photo.convert("1"), "PNG"),
            "interlaced 16-bit PNG": encode(
                Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "PNG", interlace=1
            ),
        }
        return {**{name: read_bytes(path) for name, path in files.items()}, **made}

    def test_the_size_opencv_decodes_and_pillow_reads(self) -> None:
        for name, raw in self.photos().items():
            with self.subTest(name):
                fmt, width, height = pillow_header(raw)
                read = jpeg_header(raw) or imaging._png_header(raw)
                self.assertEqual(read, ("JPEG" if fmt == "MPO" else fmt, width, height))
                self.assertEqual(decoded_size(raw), (width, height))
                self.assertEqual(check_header(raw, name), read)

    def test_unsure_headers_are_left_to_pillow(self) -> None:
        with Image.open(support.data_path(IMAGES, "kit_harington_2.jpg")) as source:
            photo = source.convert("RGB")
        jpeg_bytes, png_bytes = encode(photo, "JPEG"), encode(photo, "PNG")
        segments = jpeg_segments(jpeg_bytes)
        frame = next(seg for marker, seg in segments if marker == 0xC0)
        before_scan = b"".join(seg for marker, seg in segments if marker != 0xDA)
        at_frame = jpeg_bytes.index(frame)
        ihdr = png_bytes[8:33]
        big_frame = frame[:5] + struct.pack(">HH", 9000, 9000) + frame[9:]
        # libjpeg reads FF 00 as stuffed data and scans on to the next marker, so a reader taking it
        # for a segment would skip the big frame header inside it, while libjpeg's APP1 here
        # swallows the small one: the decoder would see only the 9000x9000 frame.
        swallow_small = b"\xff\xe1" + struct.pack(">H", 2 + len(frame))
        hidden = b"\xff\x00" + struct.pack(">H", 2 + len(big_frame + swallow_small)) + big_frame + swallow_small
        cases = {
            # name: (bytes, the reason check_header must refuse them for, None if Pillow reads them)
            "JPEG cut before its scan": (before_scan, "IMAGE_UNDECODABLE"),
            "JPEG cut inside its frame header": (jpeg_bytes[: at_frame + 6], "IMAGE_UNDECODABLE"),
            "JPEG with two frame headers": (
                jpeg_bytes[:at_frame] + big_frame + jpeg_bytes[at_frame:],
                None,  # Pillow reads the last one; libjpeg refuses the second
            ),
            "JPEG frame header hidden behind FF 00": (
                jpeg_bytes[:at_frame] + hidden + jpeg_bytes[at_frame:],
                "IMAGE_TOO_LARGE",
            ),
            "JPEG with a height left to a DNL marker": (
                jpeg_bytes.replace(frame, frame[:5] + b"\x00\x00" + frame[7:]),
                "IMAGE_UNDECODABLE",
            ),
            "JPEG with junk between segments": (jpeg_bytes[:2] + b"junk" + jpeg_bytes[2:], "IMAGE_UNDECODABLE"),
            # Markers the reader does not take as a skipped segment before the scan (libjpeg skips a
            # DNL and refuses a JPGn): left to Pillow.
            "JPEG with a DNL marker before its scan": (
                jpeg_bytes[:at_frame] + b"\xff\xdc\x00\x04\x00\x10" + jpeg_bytes[at_frame:],
                None,
            ),
            "JPEG with a JPG0 (F0) segment": (
                jpeg_bytes[:at_frame] + b"\xff\xf0\x00\x0b" + big_frame[4:11] + jpeg_bytes[at_frame:],
                None,
            ),
            # Frame headers libjpeg refuses, which Pillow still reads.
            "JPEG frame header shorter than its components": (
                jpeg_bytes.replace(frame, frame[:2] + struct.pack(">H", 8) + frame[4:]),
                None,
            ),
            "JPEG with a sampling factor of 0": (jpeg_bytes.replace(frame, frame[:11] + b"\x01" + frame[12:]), None),
            "JPEG with a sampling factor of 5": (jpeg_bytes.replace(frame, frame[:11] + b"\x51" + frame[12:]), None),
            "PNG with a bad IHDR CRC": (png_bytes[:29] + b"\0\0\0\0" + png_bytes[33:], "IMAGE_UNDECODABLE"),
            "PNG with a bit depth its colour type has not": (
                png_bytes[:8] + png_chunk(b"IHDR", ihdr[8:16] + bytes([3]) + ihdr[17:21]) + png_bytes[33:],
                "IMAGE_UNDECODABLE",
            ),
            "PNG cut inside IHDR": (png_bytes[:30], "IMAGE_UNDECODABLE"),
        }
        for name, (raw, reason) in cases.items():
            with self.subTest(name):
                self.assertIsNone(jpeg_header(raw))
                self.assertIsNone(imaging._png_header(raw))
                try:
                    got = check_header(raw, "img")
                except InvalidInputError as error:
                    self.assertEqual(error.reason.name, reason)
                    continue
                self.assertIsNone(reason, f"accepted as {got}")
                self.assertEqual(got, pillow_header(raw))
                self.assertIn(decoded_size(raw), (None, got[1:]))

    def test_pillow_is_imported_only_for_other_formats(self) -> None:
        with Image.open(support.data_path(IMAGES, "kit_harington_2.jpg")) as source:
            photo = source.convert("RGB")
        directory = support.temp_dir(self)
        names = []
        for fmt in ("JPEG", "PNG", "WEBP"):
            names.append(os.path.join(directory, fmt))
            with open(names[-1], "wb") as f:
                f.write(encode(photo, fmt))
        script = (
            "import sys, imaging\n"
            "for name in sys.argv[1:]:\n"
            "    with open(name, 'rb') as f:\n"
            "        imaging.EncodedImage.from_bytes(f.read(), name).decode()\n"
            "    print('PIL' in sys.modules)\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        run = subprocess.run(
            [sys.executable, "-c", script, *names], cwd=root, capture_output=True, text=True, timeout=120, check=True
        )
        self.assertEqual(run.stdout.split(), ["False", "False", "True"])


def progressive(raw: bytes) -> bytes:
    """The JPEG `raw` re-encoded as a progressive JPEG (quality 90, 4:2:0, as OpenCV writes)."""
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    return encoded.tobytes()


class CoefficientBudgetTest(unittest.TestCase):
    """What a progressive JPEG's decoder holds (imaging._JpegFrame.coefficient_bytes), and the
    budget that keeps big ones from decoding at once (imaging.COEFFICIENT_BUDGET_BYTES)."""

    phone: bytes
    phone_progressive: bytes

    @classmethod
    def setUpClass(cls) -> None:
        cls.phone = phone_photo(support.read_image(support.data_path(IMAGES, "obama_1.jpg")))
        cls.phone_progressive = progressive(cls.phone)

    def held(self, raw: bytes) -> int:
        return EncodedImage.from_bytes(raw, "img").coefficient_bytes

    def test_bytes_from_the_frame_and_scan_headers(self) -> None:
        with Image.open(support.data_path(IMAGES, "kit_harington_2.jpg")) as source:
            photo = source.convert("RGB").resize((640, 480))
        self.assertEqual(self.held(self.phone), 0)  # one interleaved scan: a row of blocks at a time
        # 3000x4000 at 4:2:0: luma 375x500 blocks padded to whole 2x2 MCUs (376x500), each chroma
        # 188x250; 64 coefficients of 2 bytes a block.
        self.assertEqual(self.held(self.phone_progressive), (376 * 500 + 2 * 188 * 250) * 128)
        self.assertEqual(self.held(encode(photo, "JPEG", progressive=True, subsampling=0)), 3 * 80 * 60 * 128)
        self.assertEqual(self.held(encode(photo.convert("L"), "JPEG", progressive=True)), 80 * 60 * 128)
        self.assertEqual(self.held(encode(photo, "JPEG")), 0)
        self.assertEqual(self.held(encode(photo, "MPO", save_all=True, append_images=[photo])), 0)
        self.assertEqual(self.held(encode(photo, "PNG")), 0)
        # Components in scans of their own, not progressive: held too.
        one_scan_each = imaging._JpegFrame(0xC0, 640, 480, ((2, 2), (1, 1), (1, 1)), 1)
        self.assertEqual(one_scan_each.coefficient_bytes(), (80 * 60 + 2 * 40 * 30) * 128)
        # Headers only Pillow reads (a DNL marker before the frame, which libjpeg skips): the
        # frame as Pillow reads it, baseline or progressive, charged as if its components came in
        # scans of their own (Pillow does not read the scans); a grey one only when progressive.
        made = ((photo, False), (photo, True), (photo.convert("L"), False))
        for image, progressive in made:
            raw = encode(image, "JPEG", progressive=progressive)
            at_frame = raw.index(b"\xff\xc2" if progressive else b"\xff\xc0")
            dnl_first = raw[:at_frame] + b"\xff\xdc\x00\x04\x00\x10" + raw[at_frame:]
            self.assertIsNone(imaging._jpeg_frame(dnl_first))
            held = 0 if image.mode == "L" else (80 * 60 + 2 * 40 * 30) * 128
            self.assertEqual(self.held(dnl_first), held, (image.mode, progressive))
        raw = encode(photo, "JPEG")
        at_sampling = raw.index(b"\xff\xc0") + 11
        bad_sampling = raw[:at_sampling] + b"\x51" + raw[at_sampling + 1 :]
        self.assertEqual(self.held(bad_sampling), 4 * 80 * 60 * 128)

    def test_the_figure_is_what_the_decoder_takes(self) -> None:
        expected = self.held(self.phone_progressive)
        self.assertGreater(expected, 32 * 2**20)
        output = 1000 * 750 * 3  # the 1/4 decode itself
        # A first, small decode sets up OpenCV's codecs before the peak is read.
        script = (
            "import sys, numpy as np, cv2\n"
            "raw = open(sys.argv[1], 'rb').read()\n"
            "def field(name):\n"
            "    return int(open('/proc/self/status').read().split(name + ':')[1].split()[0]) * 1024\n"
            "small = cv2.imencode('.jpg', np.zeros((64, 64, 3), np.uint8))[1]\n"
            "cv2.imdecode(small, cv2.IMREAD_REDUCED_COLOR_4)\n"
            "before = field('VmHWM')\n"
            "image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_REDUCED_COLOR_4)\n"
            "print(image.shape, field('VmHWM') - before)\n"
        )
        # Beside the coefficients a decode takes its output and the decoder's rows and tables, a
        # few MiB: the baseline photo stays far under what the progressive one holds.
        cases = ((self.phone_progressive, 0.95 * expected, expected + 12 * 2**20), (self.phone, output, expected / 2))
        for raw, low, high in cases:
            path = os.path.join(self.enterContext(tempfile.TemporaryDirectory()), "photo.jpg")
            with open(path, "wb") as out:
                out.write(raw)
            shape, grew = subprocess.run(
                [sys.executable, "-c", script, path], capture_output=True, text=True, check=True
            ).stdout.rsplit(" ", 1)
            self.assertEqual(shape, "(1000, 750, 3)")
            self.assertTrue(low <= int(grew) <= high, (int(grew), low, high))

    def decode_side_by_side(self, raws: tuple[bytes, bytes], partner_wait: float) -> int:
        """Decodes both at once on two threads at 1/4; how many were ever in the decoder at once.
        A decode waits up to `partner_wait` s inside the decoder for the other to enter too."""
        inside, most, lock, both_in = [0], [0], threading.Lock(), threading.Event()
        decode = cv2.imdecode

        def watched(*args):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                if inside[0] == 2:
                    both_in.set()
            both_in.wait(partner_wait)
            try:
                return decode(*args)
            finally:
                with lock:
                    inside[0] -= 1

        images = [EncodedImage.from_bytes(raw, "img") for raw in raws]
        with mock.patch.object(imaging.cv2, "imdecode", watched), ThreadPoolExecutor(2) as pool:
            shapes = list(pool.map(lambda image: image.decode(4).shape, images))
        self.assertEqual(len(shapes), 2)
        self.assertEqual(imaging.coefficient_bytes_in_flight(), 0)
        return most[0]

    def test_status_reports_the_coefficients_held(self) -> None:
        decoding, finish = threading.Event(), threading.Event()
        decode = cv2.imdecode

        def held(*args):
            decoding.set()
            finish.wait(10)
            return decode(*args)

        image = EncodedImage.from_bytes(self.phone_progressive, "img")
        service = FaceService(helpers=0)
        with mock.patch.object(imaging.cv2, "imdecode", held), ThreadPoolExecutor(1) as pool:
            pending = pool.submit(image.decode, 4)
            self.assertTrue(decoding.wait(10))
            self.assertEqual(service.memory_usage()["jpeg_coefficients_in_flight"], image.coefficient_bytes)
            finish.set()
            self.assertEqual(pending.result().shape, (1000, 750, 3))
        self.assertEqual(service.memory_usage()["jpeg_coefficients_in_flight"], 0)

    def test_decodes_over_the_budget_take_turns(self) -> None:
        other = progressive(phone_photo(support.read_image(support.data_path(IMAGES, "obama_2.jpg"))))
        pair = (self.phone_progressive, other)
        budget = 3 * self.held(self.phone_progressive) // 2
        with mock.patch.object(imaging, "_coefficient_budget", Budget(budget)):
            self.assertEqual(self.decode_side_by_side(pair, partner_wait=0.5), 1)
            # Baseline photos hold no coefficients: they decode side by side.
            self.assertEqual(self.decode_side_by_side((self.phone, self.phone), partner_wait=10), 2)
            small = encode(Image.open(support.data_path(IMAGES, "obama_1.jpg")), "JPEG", progressive=True)
            self.assertEqual(self.decode_side_by_side((small, small), partner_wait=10), 2)
        # The budget the service runs with: two 12-MP photos at once, a 48-MP one alone.
        self.assertEqual(self.decode_side_by_side(pair, partner_wait=10), 2)
        self.assertGreater(
            imaging._JpegFrame(0xC2, 8000, 6000, ((2, 2), (1, 1), (1, 1)), 1).coefficient_bytes(),
            imaging.COEFFICIENT_BUDGET_BYTES,
        )


class PhonePhotoTest(unittest.TestCase):
    """The default set (YuNet + MobileFaceNet) on 12-MP photos."""

    service: FaceService
    full: FullDecode
    photos: dict[str, bytes]

    @classmethod
    def setUpClass(cls) -> None:
        name, options = support.engine_setup(support.ENGINE_ONNX_DIRECT)
        cls.service = FaceService()
        cls.service.load(parse_load_request(name, support.MODELS_DIR, 0, options))
        cls.full = FullDecode(cls.service)
        cls.photos = {
            n: phone_photo(support.read_image(support.data_path(IMAGES, n)))
            for n in ("obama_1.jpg", "obama_2.jpg", "biden_2.jpg")
        }

    def assert_same_face(self, got, want) -> None:
        shift = np.abs(np.asarray(got.box) - np.asarray(want.box)).max()
        self.assertLessEqual(shift, MAX_BOX_SHIFT_PX, (got.box, want.box))

    def test_memory_a_phone_photo_grew_is_returned_once_requests_stop(self) -> None:
        if not malloc_usage():
            self.skipTest("malloc_usage needs glibc's mallinfo2")
        photos = b64(self.photos["obama_1.jpg"]), b64(self.photos["obama_2.jpg"])
        self.service.verify(*photos, anti_spoofing=True)
        after_request = malloc_usage()["heap_in_use"]
        time.sleep(IDLE_RETURN_SECONDS + 1.0)
        # The arena's blocks for YuNet's, MobileFaceNet's and the liveness models' tensors.
        self.assertGreater(after_request - malloc_usage()["heap_in_use"], 4 * 2**20)
        self.assertLess(self.service.verify(*photos).distance, 0.5)

    def test_phone_photos_decode_at_a_quarter(self) -> None:
        engine = self.full.engine
        located = LocatedFaces(engine, EncodedImage.from_bytes(self.photos["obama_1.jpg"], "img"))
        self.assertEqual(located.reduction, 4)
        self.assertEqual(located.pixels.shape, (1000, 750, 3))
        face = best_face(located.detect())
        located.pixels_for([face], lambda f: engine.magnification(f, embed=True))
        self.assertEqual(located.reduction, 4)  # the face is big enough there

    def test_same_face_and_distance_as_full_decode(self) -> None:
        for a, b in (("obama_1.jpg", "obama_2.jpg"), ("obama_1.jpg", "biden_2.jpg")):
            with self.subTest(pair=(a, b)):
                face_a, emb_a = self.full.best(self.photos[a])
                face_b, emb_b = self.full.best(self.photos[b])
                result = self.service.verify(b64(self.photos[a]), b64(self.photos[b]))
                self.assert_same_face(result.img1_face, face_a)
                self.assert_same_face(result.img2_face, face_b)
                self.assertAlmostEqual(result.distance, float(1 - emb_a @ emb_b), delta=MAX_DISTANCE_CHANGE)
                self.assertEqual(result.verified, a[:5] == b[:5])

    def test_analyze_and_detect_report_full_image_boxes(self) -> None:
        raw = self.photos["obama_1.jpg"]
        want, _ = self.full.best(raw)
        (analyzed,) = self.service.analyze(b64(raw))
        self.assert_same_face(analyzed.face, want)
        self.assertIsNotNone(analyzed.attributes.age)
        (detected,) = self.service.detect(b64(raw))
        self.assert_same_face(detected, want)
        embedding = self.service.embed([b64(raw)])
        self.assert_same_face(embedding.face, want)

    def test_small_face_in_a_big_photo_is_verified_from_full_resolution(self) -> None:
        # obama_1 shrunk so its face box is 120 px wide, on a 4000x3000 faceless background: found
        # at detection's quarter scale (19 px at the detector's 640), but there its eyes are under
        # the recognizer's chip, so recognition runs on the full decode.
        source = support.read_image(support.data_path(IMAGES, "obama_1.jpg"))
        box = best_face(self.full.engine.detect(source))
        scale = 120 / box.width
        small = cv2.resize(source, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        canvas = faceless_image(4000, 3000)
        canvas[1000 : 1000 + small.shape[0], 1500 : 1500 + small.shape[1]] = small
        raw = jpeg(canvas)

        engine = self.full.engine
        located = LocatedFaces(engine, EncodedImage.from_bytes(raw, "img"))
        self.assertEqual(located.reduction, 4)
        face = best_face(located.detect())
        located.pixels_for([face], lambda f: engine.magnification(f, embed=True))
        self.assertEqual(located.reduction, 1)

        want_face, want = self.full.best(raw)
        _, other = self.full.best(self.photos["obama_2.jpg"])
        result = self.service.verify(b64(raw), b64(self.photos["obama_2.jpg"]))
        self.assertTrue(result.verified)
        self.assertLessEqual(np.abs(np.asarray(result.img1_face.box) - want_face.box).max(), 2.0)
        self.assertAlmostEqual(result.distance, float(1 - want @ other), delta=MAX_DISTANCE_CHANGE)

    def test_exif_rotated_phone_photo(self) -> None:
        raw = self.photos["obama_1.jpg"]
        want_face, want = self.full.best(raw)
        rotated = exif_rotated(raw)
        result = self.service.verify(b64(rotated), b64(self.photos["obama_2.jpg"]))
        _, other = self.full.best(self.photos["obama_2.jpg"])
        self.assertTrue(result.verified)
        self.assert_same_face(result.img1_face, want_face)  # in the upright picture's pixels
        self.assertAlmostEqual(result.distance, float(1 - want @ other), delta=MAX_DISTANCE_CHANGE)

    def test_liveness_on_a_phone_photo_matches_full_decode(self) -> None:
        support.liveness_files()
        raw = self.photos["obama_1.jpg"]
        loaded = self.service.loaded
        assert loaded is not None and loaded.liveness is not None
        image = EncodedImage.from_bytes(raw, "img").decode(1)
        face = best_face(loaded.engine.detect(image))
        want = loaded.liveness.score(image, [face], loaded.engine.face_quality(image, [face]))[0]
        got = self.service.verify(b64(raw), b64(self.photos["obama_2.jpg"]), anti_spoofing=True).img1_liveness
        assert got is not None
        self.assertEqual(got.status, want.status)
        self.assertEqual(got.gate, want.gate)


if __name__ == "__main__":
    unittest.main()
