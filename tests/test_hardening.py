"""Hardening (issue 5): the backend sits behind public endpoints and every byte of an image is
attacker controlled. Whatever it is sent, it answers with the right status code and a clear
message, keeps serving and keeps its memory bounded.

- HostileInputTest: a battery of bad inputs in every image position of every RPC over a real gRPC
  channel, pixel bombs, every image format, EXIF orientation, a very large photo.
- DecodeFuzzTest: hypothesis on imaging.decode_image: an HxWx3 uint8 array or InvalidInputError.
- AuthTest: the bearer token on every RPC (the ModelIdentity guard is test_grpc's).
- OverloadTest: bounded in-flight calls (RESOURCE_EXHAUSTED at once), deadlines.
- ReloadUnderLoadTest: LoadModel swapping engines (and failing) while requests run.
- LifecycleTest: the real `backend.py` process: SIGTERM/SIGINT with a request in flight, parent watch.

Real weights: missing files skip locally and fail under CI=true (tests.support).
"""

from __future__ import annotations

import base64
import io
import os
import signal
import struct
import subprocess
import threading
import time
import unittest
import warnings
from concurrent import futures
from unittest import mock

import cv2
import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import backend_pb2 as pb
import backend_pb2_grpc
import client
import imaging
from core.errors import InvalidInputError
from core.process import watch_parent
from core.settings import ImageLimits
from engines import parse_load_request
from face_service import DEFAULT_MODEL_OPTIONS, FaceService
from harness.images import b64, encode, jpeg_pixel_bomb, png_pixel_bomb
from harness.procfs import reset_peak_rss, status_field
from harness.servers import (
    BackendProcess,
    InProcessServer,
    backend_command,
    backend_env,
    bearer,
    free_port,
    open_channel,
    read_log,
    wait_for_health,
)
from tests import support
from tests.support import CALL_TIMEOUT, INTERNALS, GrpcAssertions

PHOTO = ("face-recognition-examples", "images", "kit_harington_2.jpg")  # 630x374, one face
LARGE_SOURCE = ("face-recognition-examples", "images", "rose_leslie_1.jpg")  # 1280x799, one face
DEFAULT_NAME = "face-default"

INVALID = grpc.StatusCode.INVALID_ARGUMENT


# -- fixtures ------------------------------------------------------------------------------------
def dds_with_unknown_pixel_format() -> bytes:
    """A DDS file whose pixel format has no known flag: Pillow raises NotImplementedError on open."""
    raw = bytearray(encode(Image.new("RGBA", (32, 32)), "DDS"))
    raw[80:84] = struct.pack("<I", 0)  # DDS_PIXELFORMAT.dwFlags
    return bytes(raw)


def bmp_claiming(width: int, height: int) -> bytes:
    """A 16x16 BMP whose header claims width x height (OpenCV asserts past 2**20 on a side)."""
    raw = bytearray(encode(Image.new("RGB", (16, 16), (90, 60, 30)), "BMP"))
    raw[18:26] = struct.pack("<ii", width, height)
    return bytes(raw)


def load_default(name: str = DEFAULT_NAME) -> FaceService:
    """A FaceService with the default set (face_service.DEFAULT_MODEL_OPTIONS) loaded from models/."""
    for option in DEFAULT_MODEL_OPTIONS:
        value = option.split(":", 1)[1]
        if value.endswith(".onnx"):
            support.model_path(value)
    service = FaceService()
    service.load(parse_load_request(name, support.MODELS_DIR, 0, list(DEFAULT_MODEL_OPTIONS)))
    return service


def box_close(test: unittest.TestCase, got, expected, tolerance: float, label: str) -> None:
    """Boxes (x, y, w, h) agree within `tolerance` of the expected face width, coordinate by coordinate."""
    slack = tolerance * expected[2]
    for g, e, what in zip(got, expected, "xywh"):
        test.assertLessEqual(
            abs(g - e),
            slack,
            f"{label}: {what} is {g:.1f}, expected {e:.1f}"
            f" (boxes {tuple(round(v) for v in got)} vs"
            f" {tuple(round(v) for v in expected)})",
        )


def xywh(area) -> tuple[float, float, float, float]:
    if hasattr(area, "width"):
        return area.x, area.y, area.width, area.height
    return area.x, area.y, area.w, area.h


def rpc_positions(stub):
    """(label, name the message must give, call(good, bad)) for every image position of every RPC."""
    return (
        (
            "FaceVerify.img1",
            "img1",
            lambda good, bad: stub.FaceVerify(pb.FaceVerifyRequest(img1=bad, img2=good), timeout=CALL_TIMEOUT),
        ),
        (
            "FaceVerify.img2",
            "img2",
            lambda good, bad: stub.FaceVerify(pb.FaceVerifyRequest(img1=good, img2=bad), timeout=CALL_TIMEOUT),
        ),
        (
            "FaceAnalyze.img",
            "img",
            lambda good, bad: stub.FaceAnalyze(pb.FaceAnalyzeRequest(img=bad), timeout=CALL_TIMEOUT),
        ),
        (
            "Embedding.Images[0]",
            "Images[0]",
            lambda good, bad: stub.Embedding(pb.PredictOptions(Images=[bad]), timeout=CALL_TIMEOUT),
        ),
        ("Detect.src", "src", lambda good, bad: stub.Detect(pb.DetectOptions(src=bad), timeout=CALL_TIMEOUT)),
    )


def setUpModule():
    global _cv2_log_level
    _cv2_log_level = cv2.utils.logging.getLogLevel()
    # Hostile input makes OpenCV's decoders log warnings; the backend's main() silences them too.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def tearDownModule():
    cv2.utils.logging.setLogLevel(_cv2_log_level)


# -- the battery ---------------------------------------------------------------------------------
class HostileInputTest(GrpcAssertions, unittest.TestCase):
    peak_kb = 0  # this process's peak RSS during the battery (the server runs in this process)
    rss_at_start_kb: int
    photo_path: str
    photo_bytes: bytes
    photo: Image.Image
    photo_bgr: np.ndarray
    good: str
    photo_box: tuple[float, float, float, float]
    oversized: str

    @classmethod
    def note_peak(cls) -> None:
        cls.peak_kb = max(cls.peak_kb, status_field("VmHWM"))

    @classmethod
    def setUpClass(cls):
        reset_peak_rss()
        cls.rss_at_start_kb = status_field("VmRSS")
        cls.photo_path = support.data_path(*PHOTO)
        cls.photo_bytes = support.read_bytes(cls.photo_path)
        cls.photo = Image.open(cls.photo_path).convert("RGB")
        cls.photo_bgr = cv2.imread(cls.photo_path, cv2.IMREAD_COLOR)
        cls.good = b64(cls.photo_bytes)
        cls.serve(load_default())
        detections = cls.running.stub.Detect(pb.DetectOptions(src=cls.good), timeout=CALL_TIMEOUT).Detections
        cls.photo_box = xywh(max(detections, key=lambda d: d.width * d.height))
        # One byte over the limit: a JPEG with padding after its end, still under the gRPC limit.
        cls.oversized = b64(cls.photo_bytes + bytes(ImageLimits().max_bytes + 1 - len(cls.photo_bytes)))

    @classmethod
    def tearDownClass(cls):
        cls.note_peak()
        print(
            f"\n[hardening] battery: peak RSS of the test process (server in process) {cls.peak_kb / 1024:.0f} MB,"
            f" {(cls.peak_kb - cls.rss_at_start_kb) / 1024:+.0f} MB over its RSS before the model load;"
            f" RSS now {status_field('VmRSS') / 1024:.0f} MB"
        )

    def bad_inputs(self) -> dict[str, tuple[str, str]]:
        """{kind: (image string, the ErrorInfo reason it must get)}"""
        tiny = encode(self.photo.resize((32, 24)), "JPEG")
        rng = np.random.default_rng(5)
        return {
            "empty": ("", "IMAGE_MISSING"),
            "not base64": ("this is not base64!", "IMAGE_NOT_BASE64"),
            "non-ASCII text": ("\u00ebl\u00e8ve\u2603" * 20, "IMAGE_NOT_BASE64"),
            "random bytes": (b64(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()), "IMAGE_UNDECODABLE"),
            "truncated JPEG": (b64(self.photo_bytes[: len(self.photo_bytes) // 2]), "IMAGE_UNDECODABLE"),
            "JPEG header only": (b64(self.photo_bytes[:400]), "IMAGE_UNDECODABLE"),
            "1x1 image": (b64(encode(Image.new("RGB", (1, 1), (200, 150, 120)), "PNG")), "IMAGE_TOO_SMALL"),
            "PNG pixel bomb": (b64(png_pixel_bomb()), "IMAGE_TOO_LARGE"),
            "JPEG pixel bomb": (b64(jpeg_pixel_bomb(tiny)), "IMAGE_TOO_LARGE"),
            "unsupported format (PPM)": (b64(encode(self.photo, "PPM")), "IMAGE_FORMAT_UNSUPPORTED"),
            "data URI without ;base64": ("data:image/jpeg," + self.good, "IMAGE_NOT_BASE64"),
            "data URI of garbage": ("data:image/jpeg;base64,%%%%", "IMAGE_NOT_BASE64"),
            "image over FACE_MAX_IMAGE_BYTES": (self.oversized, "IMAGE_TOO_LARGE"),
            "DDS with an unknown pixel format": (b64(dds_with_unknown_pixel_format()), "IMAGE_UNDECODABLE"),
            "BMP claiming 16x2000000 pixels": (b64(bmp_claiming(16, 2_000_000)), "IMAGE_TOO_LARGE"),
            "BMP claiming 2000000x16 pixels": (b64(bmp_claiming(2_000_000, 16)), "IMAGE_TOO_LARGE"),
        }

    def test_bad_inputs_in_every_position_are_invalid_argument_naming_the_input(self):
        bad_inputs = self.bad_inputs()
        for label, name, call in rpc_positions(self.stub):
            for kind, (bad, reason) in bad_inputs.items():
                with self.subTest(position=label, input=kind):
                    started = time.perf_counter()
                    self.assert_status(
                        lambda: call(self.good, bad), INVALID, label=f"{label} {kind}", names=name, reason=reason
                    )
                    self.assertLess(time.perf_counter() - started, 1.0, f"{label} {kind}: refused too slowly")
                    self.assert_serving(f"after {label} {kind}")

    def test_two_images_at_the_size_limit_reach_the_service(self):
        # Each the JPEG padded to exactly FACE_MAX_IMAGE_BYTES (bytes after its end are ignored).
        largest = b64(self.photo_bytes + bytes(ImageLimits().max_bytes - len(self.photo_bytes)))
        reply = self.stub.FaceVerify(pb.FaceVerifyRequest(img1=largest, img2=largest), timeout=CALL_TIMEOUT)
        self.assertTrue(reply.verified)
        self.assert_serving()

    def test_a_message_over_the_grpc_limit_is_refused_by_the_transport(self):
        too_big = "A" * (ImageLimits().message_bytes() + 1024)
        # A client allowed to send it, so that the server's own limit is what refuses it.
        with grpc.insecure_channel(
            self.running.address, options=[("grpc.max_send_message_length", 2 * len(too_big))]
        ) as channel:
            stub = backend_pb2_grpc.BackendStub(channel)
            self.assert_status(
                lambda: stub.Detect(pb.DetectOptions(src=too_big), timeout=CALL_TIMEOUT),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                label="over the message limit",
            )
        self.assert_serving()

    def test_embedding_without_images_is_invalid_argument(self):
        self.assert_status(
            lambda: self.stub.Embedding(pb.PredictOptions(), timeout=CALL_TIMEOUT),
            INVALID,
            label="Embedding()",
            names="Images[0]",
            reason="IMAGE_MISSING",
        )
        self.assert_serving()

    def test_pixel_bomb_is_refused_at_once_without_allocating_its_pixels(self):
        bomb = png_pixel_bomb(40000, 40000)
        self.assertLess(len(bomb), 16 * 1024, "the bomb must be a few KB")
        request = pb.FaceVerifyRequest(img1=b64(bomb), img2=self.good)
        self.stub.Health(pb.HealthMessage(), timeout=CALL_TIMEOUT)
        self.note_peak()
        resettable = reset_peak_rss()
        rss_before = status_field("VmRSS")
        started = time.perf_counter()
        self.assert_status(
            lambda: self.stub.FaceVerify(request, timeout=CALL_TIMEOUT),
            INVALID,
            "pixels",
            label="pixel bomb",
            names="img1",
        )
        elapsed = time.perf_counter() - started
        grown_mb = ((status_field("VmHWM") if resettable else status_field("VmRSS")) - rss_before) / 1024
        self.assertLess(elapsed, 1.0, f"pixel bomb took {elapsed:.2f} s to refuse")
        self.assertLess(grown_mb, 64, f"RSS rose by {grown_mb:.0f} MB while refusing a pixel bomb")
        self.assert_serving()

    def test_data_uri_prefix_and_wrapped_base64_are_accepted(self):
        variants = {
            "data:image/jpeg;base64,": "data:image/jpeg;base64," + self.good,
            "MIME-wrapped base64": base64.encodebytes(self.photo_bytes).decode("ascii"),
        }
        for kind, data in variants.items():
            with self.subTest(kind):
                reply = self.stub.FaceVerify(pb.FaceVerifyRequest(img1=data, img2=data), timeout=CALL_TIMEOUT)
                self.assertTrue(reply.verified)
                self.assertEqual(
                    len(self.stub.FaceAnalyze(pb.FaceAnalyzeRequest(img=data), timeout=CALL_TIMEOUT).faces), 1
                )
                self.assertGreater(
                    len(self.stub.Embedding(pb.PredictOptions(Images=[data]), timeout=CALL_TIMEOUT).embeddings), 0
                )
                self.assertEqual(len(self.stub.Detect(pb.DetectOptions(src=data), timeout=CALL_TIMEOUT).Detections), 1)

    def encodings(self) -> dict[str, tuple[bytes, bool]]:
        """name -> (encoded bytes, colour kept) of the photo in every accepted format and mode."""
        photo = self.photo
        grey = photo.convert("L")
        rgba = photo.convert("RGBA")
        rgba.putalpha(200)
        png16 = cv2.imencode(".png", self.photo_bgr.astype(np.uint16) * 257)[1].tobytes()
        self.assertEqual(png16[24], 16, "the 16-bit PNG fixture is not 16-bit")
        grey16 = encode(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "PNG")
        self.assertEqual(grey16[24], 16, "the 16-bit grey PNG fixture is not 16-bit")
        palette = encode(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
        self.assertEqual(palette[25], 3, "the palette PNG fixture has no palette")
        return {
            "JPEG": (self.photo_bytes, True),
            "progressive JPEG": (encode(photo, "JPEG", quality=92, progressive=True), True),
            "CMYK JPEG": (encode(photo.convert("CMYK"), "JPEG", quality=92), True),
            "grey JPEG": (encode(grey, "JPEG", quality=92), False),
            "grey PNG": (encode(grey, "PNG"), False),
            "RGBA PNG": (encode(rgba, "PNG"), True),
            "16-bit PNG": (png16, True),
            "16-bit grey PNG": (grey16, False),
            "palette PNG": (palette, True),
            "WebP": (encode(photo, "WEBP", quality=90), True),
            "WebP lossless RGBA": (encode(rgba, "WEBP", lossless=True), True),
            "BMP": (encode(photo, "BMP"), True),
            "TIFF": (encode(photo, "TIFF"), True),
            "TIFF LZW grey": (encode(grey, "TIFF", compression="tiff_lzw"), False),
            "GIF": (encode(photo, "GIF"), True),
            # Phone cameras write JPEGs with a multi-picture (MPF) segment, which Pillow calls MPO.
            "MPO (multi-picture JPEG)": (
                encode(photo, "MPO", quality=92, save_all=True, append_images=[photo.resize((160, 95))]),
                True,
            ),
        }

    def test_every_format_becomes_8bit_bgr_and_a_face_is_found(self):
        height, width = self.photo_bgr.shape[:2]
        reference = self.photo_bgr.astype(np.int16)
        for kind, (raw, colour) in self.encodings().items():
            with self.subTest(format=kind):
                image = imaging.decode_image(b64(raw), "img")
                self.assertEqual(image.dtype, np.uint8)
                self.assertEqual(image.shape, (height, width, 3))
                if colour:  # channels in BGR order: closer to the original than its RGB reading
                    diff = np.abs(image.astype(np.int16) - reference).mean()
                    swapped = np.abs(image[..., ::-1].astype(np.int16) - reference).mean()
                    self.assertLess(diff, swapped, f"{kind}: channels are not BGR")
                    self.assertLess(diff, 12.0, f"{kind}: decoded pixels differ by {diff:.1f} on average")
                detections = self.stub.Detect(pb.DetectOptions(src=b64(raw)), timeout=CALL_TIMEOUT).Detections
                self.assertGreaterEqual(len(detections), 1, f"{kind}: no face found")
                box_close(self, xywh(max(detections, key=lambda d: d.width * d.height)), self.photo_box, 0.1, kind)
                reply = self.stub.FaceVerify(pb.FaceVerifyRequest(img1=self.good, img2=b64(raw)), timeout=CALL_TIMEOUT)
                self.assertTrue(
                    reply.verified, f"{kind}: the same photo is not verified (distance {reply.distance:.3f})"
                )
                self.assert_serving(kind)

    def test_exif_orientation_is_honoured(self):
        height, width = self.photo_bgr.shape[:2]
        # Orientation tag -> how the camera stored the pixels of the upright photo.
        stored = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}
        for orientation, transpose in stored.items():
            with self.subTest(orientation=orientation):
                exif = Image.Exif()
                exif[0x0112] = orientation
                raw = encode(self.photo.transpose(transpose), "JPEG", quality=95, exif=exif.tobytes())
                with Image.open(io.BytesIO(raw)) as check:
                    self.assertEqual(check.getexif().get(0x0112), orientation)
                self.assertEqual(imaging.decode_image(b64(raw), "img").shape, (height, width, 3))
                detections = self.stub.Detect(pb.DetectOptions(src=b64(raw)), timeout=CALL_TIMEOUT).Detections
                self.assertGreaterEqual(len(detections), 1, f"orientation {orientation}: no face found")
                box_close(
                    self,
                    xywh(max(detections, key=lambda d: d.width * d.height)),
                    self.photo_box,
                    0.05,
                    f"orientation {orientation}",
                )

    def test_very_large_photo_reports_boxes_in_original_coordinates(self):
        source = Image.open(support.data_path(*LARGE_SOURCE)).convert("RGB")
        w, h = source.size
        crop_w, crop_h = h * 4 // 3, h - h % 3  # 4:3, so that 6000x4500 is a uniform scale
        left = (w - crop_w) // 2
        small = source.crop((left, 0, left + crop_w, crop_h))
        scale_x, scale_y = 6000 / small.size[0], 4500 / small.size[1]
        big_raw = encode(small.resize((6000, 4500), Image.Resampling.BICUBIC), "JPEG", quality=90)
        small_b64, big_b64 = b64(encode(small, "JPEG", quality=95)), b64(big_raw)
        del source
        small_faces = self.stub.Detect(pb.DetectOptions(src=small_b64), timeout=CALL_TIMEOUT).Detections
        x, y, bw, bh = xywh(max(small_faces, key=lambda d: d.width * d.height))
        expected = (x * scale_x, y * scale_y, bw * scale_x, bh * scale_y)
        big_faces = self.stub.Detect(pb.DetectOptions(src=big_b64), timeout=CALL_TIMEOUT).Detections
        box_close(self, xywh(max(big_faces, key=lambda d: d.width * d.height)), expected, 0.03, "Detect")
        reply = self.stub.FaceVerify(pb.FaceVerifyRequest(img1=big_b64, img2=small_b64), timeout=CALL_TIMEOUT)
        self.assertTrue(reply.verified)
        box_close(self, xywh(reply.img1_area), expected, 0.03, "FaceVerify.img1_area")
        box_close(self, xywh(reply.img2_area), (x, y, bw, bh), 0.001, "FaceVerify.img2_area")
        faces = self.stub.FaceAnalyze(pb.FaceAnalyzeRequest(img=big_b64), timeout=CALL_TIMEOUT).faces
        box_close(
            self, xywh(max(faces, key=lambda f: f.region.w * f.region.h).region), expected, 0.03, "FaceAnalyze.region"
        )
        self.assert_serving()

    def test_mutated_images_over_grpc_get_a_clean_answer(self) -> None:
        seeds = [encode(self.photo.resize((160, 95)), fmt) for fmt in ("JPEG", "PNG", "WEBP", "TIFF")]
        answered: dict[str, int] = {}

        @settings(
            max_examples=40, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        @given(st.data())
        def run(data):
            raw = data.draw(mutated_images(seeds))
            try:
                self.stub.Detect(pb.DetectOptions(src=b64(raw)), timeout=CALL_TIMEOUT)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                self.assertEqual(code, INVALID, f"{code.name}: {error.details()!r}")
                self.assert_clean_message(error.details(), "mutated image")
                self.assertTrue(error.details().startswith("src: "), error.details())
                info = client.error_info(error)
                self.assertTrue(info.reason.startswith("IMAGE_"), info.reason)
                self.assertEqual(info.metadata["field"], "src")
            answered[code.name] = answered.get(code.name, 0) + 1

        run()
        # Both kinds of answer were exercised: images that still decode and ones that do not.
        self.assertEqual(set(answered), {"OK", "INVALID_ARGUMENT"}, answered)
        self.assert_serving()


# -- fuzzing the decoder -------------------------------------------------------------------------
@st.composite
def mutated_images(draw, seeds):
    """A real encoded image with a few bytes overwritten, cut out, inserted, or the tail truncated."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, max(0, len(data) - 1)))
        operation = draw(st.sampled_from(("overwrite", "delete", "insert", "truncate", "header")))
        if operation == "overwrite" and data:
            data[position] = draw(st.integers(0, 255))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 64))]
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=32))
        elif operation == "truncate":
            del data[position:]
        elif operation == "header" and len(data) > 32:  # headers carry the sizes: hit them often
            data[draw(st.integers(0, 31))] = draw(st.integers(0, 255))
    return bytes(data)


class Base64Test(unittest.TestCase):
    """decode_base64 decodes with pybase64 and accepts exactly what the standard library's strict
    decoder accepts (whitespace stripped when the first try fails), with the same bytes."""

    @staticmethod
    def standard_library(data: str) -> bytes | None:
        for text in (data, "".join(data.split())):
            try:
                return base64.b64decode(text, validate=True)
            except ValueError:  # binascii.Error is one
                continue
        return None

    def check(self, data: str) -> None:
        expected = self.standard_library(data)
        if not expected:  # refused, or no bytes at all: both are the caller's error
            with self.assertRaises(InvalidInputError):
                imaging.decode_base64(data, "img")
        else:
            self.assertEqual(imaging.decode_base64(data, "img"), expected)

    def test_surplus_padding_is_accepted_as_before(self):
        for data in ("QUJD====", "ABAA=", "QUJDRA==", "QUJD\nRA==", "QU JD"):
            with self.subTest(data=data):
                self.check(data)

    @settings(max_examples=400, deadline=None)
    @given(st.text(alphabet="ABCDab01+/=-_ \n\u00e9", max_size=24))
    def test_the_same_strings_as_the_standard_library(self, data):
        if data.startswith("data:"):
            return
        self.check(data)


class DecodeFuzzTest(unittest.TestCase):
    """Whatever the bytes, decode_image returns an HxWx3 uint8 image or raises InvalidInputError."""

    seeds: list[bytes]

    @classmethod
    def setUpClass(cls):
        photo = Image.open(support.data_path(*PHOTO)).convert("RGB").resize((96, 57))
        bgr = cv2.cvtColor(np.asarray(photo), cv2.COLOR_RGB2BGR)
        cls.seeds = [
            encode(photo, "JPEG", quality=90),
            encode(photo, "JPEG", quality=90, progressive=True),
            encode(photo.convert("L"), "JPEG"),
            encode(photo, "PNG"),
            encode(photo.convert("RGBA"), "PNG"),
            encode(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
            cv2.imencode(".png", bgr.astype(np.uint16) * 257)[1].tobytes(),
            encode(photo, "WEBP"),
            encode(photo, "BMP"),
            encode(photo, "TIFF"),
            encode(photo, "GIF"),
            # Formats refused after the header is read: their Pillow plugins parse hostile bytes too.
            encode(photo.convert("RGBA"), "DDS"),
            encode(photo, "ICO"),
            encode(photo, "TGA"),
            encode(photo, "PCX"),
            encode(photo, "SGI"),
            bmp_claiming(16, 2_000_000),
        ]

    def check(self, data: str) -> None:
        try:
            with warnings.catch_warnings():  # Pillow warns about the corrupt EXIF it is fed here
                warnings.simplefilter("ignore")
                image = imaging.decode_image(data, "img")
        except InvalidInputError as error:
            self.assertTrue(str(error).startswith("img: "), str(error))
            self.assertEqual(error.field, "img")
            self.assertTrue(error.reason.name.startswith("IMAGE_"), error.reason)
            self.assertIsNone(INTERNALS.search(str(error)), str(error))
            return
        self.assertIsInstance(image, np.ndarray)
        self.assertEqual(image.dtype, np.uint8)
        self.assertEqual(image.ndim, 3)
        self.assertEqual(image.shape[2], 3)
        self.assertGreaterEqual(min(image.shape[:2]), imaging.MIN_IMAGE_SIDE)
        self.assertLessEqual(image.shape[0] * image.shape[1], ImageLimits().max_pixels)

    @settings(
        max_examples=3000,
        deadline=2000,
        database=None,
        derandomize=support.UNDER_CI,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def test_mutated_real_images(self, data):
        self.check(b64(data.draw(mutated_images(self.seeds))))

    @settings(max_examples=500, deadline=2000, database=None, derandomize=support.UNDER_CI)
    @given(st.binary(max_size=2048))
    def test_arbitrary_bytes(self, raw):
        self.check(b64(raw))

    @settings(max_examples=300, deadline=2000, database=None, derandomize=support.UNDER_CI)
    @given(st.one_of(st.text(max_size=256), st.text(max_size=64).map(lambda t: "data:" + t)))
    def test_arbitrary_strings(self, text):
        self.check(text)


# -- auth and identity ---------------------------------------------------------------------------
TOKEN = "hardening-test-token-7f3a"


class DefaultSetCases(GrpcAssertions):
    """A server of the class's own with the default set loaded; `good` is PHOTO as the host sends it."""

    good: str

    @classmethod
    def serve_default(cls, token: str = "", **env: str) -> None:
        cls.good = support.b64_file(support.data_path(*PHOTO))
        cls.serve(load_default(), token, **env)


class AuthTest(DefaultSetCases, unittest.TestCase):
    call_metadata = bearer(TOKEN)

    @classmethod
    def setUpClass(cls):
        cls.serve_default(token=TOKEN)

    def calls(self):
        """(name, call(metadata)) for every RPC of both services, plus a method nobody defines."""
        stub, health = self.running.stub, self.running.health
        good = self.good
        # A load that succeeds, under another name: had a refused LoadModel run, the name would show it.
        other = pb.ModelOptions(Model="other-model", ModelPath=support.MODELS_DIR, Options=list(DEFAULT_MODEL_OPTIONS))
        unknown = self.running.channel.unary_unary(
            "/backend.Backend/NoSuchMethod", request_serializer=lambda m: m, response_deserializer=lambda b: b
        )
        return (
            ("Health", lambda md: stub.Health(pb.HealthMessage(), metadata=md, timeout=CALL_TIMEOUT)),
            ("Status", lambda md: stub.Status(pb.HealthMessage(), metadata=md, timeout=CALL_TIMEOUT)),
            ("LoadModel", lambda md: stub.LoadModel(other, metadata=md, timeout=CALL_TIMEOUT)),
            (
                "FaceVerify",
                lambda md: stub.FaceVerify(
                    pb.FaceVerifyRequest(img1=good, img2=good), metadata=md, timeout=CALL_TIMEOUT
                ),
            ),
            (
                "FaceAnalyze",
                lambda md: stub.FaceAnalyze(pb.FaceAnalyzeRequest(img=good), metadata=md, timeout=CALL_TIMEOUT),
            ),
            (
                "Embedding",
                lambda md: stub.Embedding(pb.PredictOptions(Images=[good]), metadata=md, timeout=CALL_TIMEOUT),
            ),
            ("Detect", lambda md: stub.Detect(pb.DetectOptions(src=good), metadata=md, timeout=CALL_TIMEOUT)),
            (
                "grpc.health.v1.Health/Check",
                lambda md: health.Check(health_pb2.HealthCheckRequest(), metadata=md, timeout=CALL_TIMEOUT),
            ),
            (
                "grpc.health.v1.Health/Watch",
                lambda md: next(iter(health.Watch(health_pb2.HealthCheckRequest(), metadata=md, timeout=CALL_TIMEOUT))),
            ),
            ("Free", lambda md: stub.Free(pb.HealthMessage(), metadata=md, timeout=CALL_TIMEOUT)),
            ("unknown method", lambda md: unknown(b"", metadata=md, timeout=CALL_TIMEOUT)),
        )

    def test_every_rpc_needs_the_bearer_token(self):
        wrong = {
            "no token": None,
            "wrong token": (("authorization", "Bearer not-the-token"),),
            "'Bearer' prefix missing": (("authorization", TOKEN),),
            "token truncated": (("authorization", "Bearer " + TOKEN[:-1]),),
            "token with a suffix": (("authorization", "Bearer " + TOKEN + "x"),),
            "empty bearer": (("authorization", "Bearer "),),
            "other scheme": (("authorization", "Basic " + TOKEN),),
            "token in another header": (("x-api-key", TOKEN),),
        }
        for name, call in self.calls():
            for kind, metadata in wrong.items():
                with self.subTest(rpc=name, metadata=kind):
                    self.assert_status(
                        lambda: call(metadata),
                        grpc.StatusCode.UNAUTHENTICATED,
                        label=f"{name} {kind}",
                        reason="BAD_TOKEN",
                        field="authorization",
                    )
        # Nothing a refused call asked for happened: Free and LoadModel left the model in place.
        self.assertIsNotNone(self.running.service.loaded)
        self.assertEqual(self.running.service.loaded.name, DEFAULT_NAME)

    def test_the_right_token_works_for_every_rpc(self):
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        results = {}
        for name, call in self.calls():
            if name in ("Free", "unknown method"):
                continue
            results[name] = call(metadata)
        self.assertEqual(results["Health"].message, b"OK")
        self.assertEqual(results["Status"].state, pb.StatusResponse.READY)
        self.assertTrue(results["LoadModel"].success, results["LoadModel"].message)
        self.assertEqual(self.running.service.loaded.name, "other-model")
        self.assertTrue(results["FaceVerify"].verified)
        self.assertEqual(len(results["FaceAnalyze"].faces), 1)
        self.assertEqual(results["Embedding"].dim, 128)
        self.assertEqual(len(results["Detect"].Detections), 1)
        for check in ("grpc.health.v1.Health/Check", "grpc.health.v1.Health/Watch"):
            self.assertEqual(results[check].status, health_pb2.HealthCheckResponse.SERVING)
        self.assert_status(lambda: self.calls()[-1][1](metadata), grpc.StatusCode.UNIMPLEMENTED, label="unknown method")
        # Once authenticated, a bad request gets its own status.
        self.assert_status(
            lambda: self.running.stub.FaceVerify(
                pb.FaceVerifyRequest(img1="not base64!", img2=self.good), metadata=metadata, timeout=CALL_TIMEOUT
            ),
            INVALID,
            label="bad img1",
            names="img1",
            reason="IMAGE_NOT_BASE64",
        )
        # Free with the token works; reload so the other test still has a model.
        stub = self.running.stub
        self.assertTrue(stub.Free(pb.HealthMessage(), metadata=metadata, timeout=CALL_TIMEOUT).success)
        self.assertEqual(
            self.running.health.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=CALL_TIMEOUT).status,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        loaded = stub.LoadModel(
            pb.ModelOptions(Model=DEFAULT_NAME, ModelPath=support.MODELS_DIR, Options=list(DEFAULT_MODEL_OPTIONS)),
            metadata=metadata,
            timeout=CALL_TIMEOUT,
        )
        self.assertTrue(loaded.success, loaded.message)


# -- overload and deadlines ----------------------------------------------------------------------
class OverloadTest(DefaultSetCases, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.serve_default(PYTHON_GRPC_MAX_WORKERS="1", PYTHON_GRPC_MAX_CONCURRENT_RPCS="2")

    def test_excess_calls_are_refused_at_once_and_the_rest_succeed(self) -> None:
        stub = self.running.stub
        request = pb.FaceVerifyRequest(img1=self.good, img2=self.good, anti_spoofing=True)
        calls = 16
        barrier = threading.Barrier(calls)

        def call(_: int) -> tuple[grpc.StatusCode, float, str]:
            """(status code, seconds, verified or the status message) of one call."""
            barrier.wait()
            started = time.perf_counter()
            try:
                reply = stub.FaceVerify(request, timeout=CALL_TIMEOUT)
                return grpc.StatusCode.OK, time.perf_counter() - started, str(reply.verified)
            except grpc.RpcError as error:
                return error.code(), time.perf_counter() - started, error.details()

        with futures.ThreadPoolExecutor(calls) as pool:
            answers = list(pool.map(call, range(calls)))
        codes = [a[0] for a in answers]
        unexpected = [a for a in answers if a[0] not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)]
        self.assertEqual(unexpected, [], "calls failed with something other than RESOURCE_EXHAUSTED")
        exhausted = [a for a in answers if a[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
        served = [a for a in answers if a[0] == grpc.StatusCode.OK]
        self.assertGreater(len(exhausted), 0, f"no call was refused: {codes}")
        self.assertGreaterEqual(len(served), 1, f"no call was served: {codes}")
        self.assertTrue(all(a[2] == "True" for a in served))
        slowest_refusal = max(a[1] for a in exhausted)
        self.assertLess(slowest_refusal, 0.5, "RESOURCE_EXHAUSTED must come at once, not after queueing")
        self.assert_serving("after the burst")
        # And the server is back to full service.
        self.assertTrue(stub.FaceVerify(request, timeout=CALL_TIMEOUT).verified)

    def test_deadlines(self):
        stub = self.running.stub
        photo = Image.open(support.data_path(*PHOTO)).convert("RGB")
        big = b64(encode(photo.resize((photo.width * 5, photo.height * 5)), "JPEG", quality=90))
        request = pb.FaceVerifyRequest(img1=big, img2=big, anti_spoofing=True)  # ~0.5 s of work
        for timeout in (0.001, 0.05):
            with self.subTest(timeout=timeout):
                with self.assertRaises(grpc.RpcError) as caught:
                    stub.FaceVerify(request, timeout=timeout)
                self.assertEqual(caught.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
                self.assert_serving(f"after a {timeout}s deadline")
                self.assertTrue(stub.FaceVerify(request, timeout=CALL_TIMEOUT).verified)


# -- reload under load ---------------------------------------------------------------------------
class ReloadUnderLoadTest(unittest.TestCase):
    def test_requests_during_reloads_see_one_whole_engine(self) -> None:
        support.pack_files("buffalo_sc")
        good = support.b64_file(support.data_path(*PHOTO))
        other = support.b64_file(support.data_path("face-recognition-examples", "images", "kit_harington_1.jpg"))
        loads = {
            "default": pb.ModelOptions(
                Model=DEFAULT_NAME, ModelPath=support.MODELS_DIR, Options=list(DEFAULT_MODEL_OPTIONS)
            ),
            "buffalo_sc": pb.ModelOptions(
                Model="buffalo_sc", ModelPath=support.MODELS_DIR, Options=list(support.INSIGHTFACE_OPTIONS)
            ),
            "missing file": pb.ModelOptions(
                Model="broken",
                ModelPath=support.MODELS_DIR,
                Options=[
                    "engine:onnx_direct",
                    "detector_onnx:no-such-detector.onnx",
                    "recognizer_onnx:MobileFaceNet.onnx",
                ],
            ),
        }
        # What each engine answers for this pair when nothing else is going on.
        expected = {}
        embeddings = {}
        for kind in ("default", "buffalo_sc"):
            service = FaceService()
            options = loads[kind]
            service.load(parse_load_request(options.Model, options.ModelPath, 0, list(options.Options)))
            result = service.verify(good, other)
            expected[result.model] = (result.threshold, result.distance)
            embeddings[kind] = service.embed([good]).vector
        self.assertEqual(len(expected), 2, expected)

        running = InProcessServer(load_default())
        stub = running.stub
        stop = threading.Event()
        problems: list[str] = []
        seen: dict[str, int] = {}
        lock = threading.Lock()

        def verifier():
            while not stop.is_set():
                try:
                    reply = stub.FaceVerify(pb.FaceVerifyRequest(img1=good, img2=other), timeout=CALL_TIMEOUT)
                except grpc.RpcError as error:
                    problems.append(f"FaceVerify {error.code().name}: {error.details()}")
                    continue
                if reply.model not in expected:
                    problems.append(f"unknown model {reply.model!r}")
                    continue
                threshold, distance = expected[reply.model]
                if abs(reply.threshold - threshold) > 1e-5 or abs(reply.distance - distance) > 1e-3:
                    problems.append(
                        f"{reply.model}: threshold {reply.threshold} distance {reply.distance},"
                        f" expected {threshold} / {distance:.4f}"
                    )
                with lock:
                    seen[reply.model] = seen.get(reply.model, 0) + 1

        def embedder():
            while not stop.is_set():
                try:
                    vector = np.array(stub.Embedding(pb.PredictOptions(Images=[good]), timeout=CALL_TIMEOUT).embeddings)
                except grpc.RpcError as error:
                    problems.append(f"Embedding {error.code().name}: {error.details()}")
                    continue
                matches = [
                    k for k, v in embeddings.items() if v.shape == vector.shape and float(np.dot(v, vector)) > 0.999
                ]
                if not matches:
                    problems.append(f"an embedding of dimension {vector.shape[0]} matches neither engine")

        def watcher():
            while not stop.is_set():
                try:
                    status = running.health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT).status
                    state = stub.Status(pb.HealthMessage(), timeout=CALL_TIMEOUT).state
                except grpc.RpcError as error:
                    problems.append(f"health {error.code().name}")
                    continue
                if status != health_pb2.HealthCheckResponse.SERVING or state != pb.StatusResponse.READY:
                    problems.append(f"not serving during a reload: {status}, {state}")
                time.sleep(0.02)

        threads = [threading.Thread(target=f) for f in (verifier, verifier, verifier, embedder, watcher)]
        for thread in threads:
            thread.start()
        try:
            for kind in [
                "buffalo_sc",
                "missing file",
                "default",
                "missing file",
                "buffalo_sc",
                "default",
                "buffalo_sc",
                "missing file",
                "default",
            ]:
                result = stub.LoadModel(loads[kind], timeout=CALL_TIMEOUT)
                if kind == "missing file":
                    self.assertFalse(result.success)
                    self.assertIn("no-such-detector.onnx", result.message)
                else:
                    self.assertTrue(result.success, result.message)
                time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=CALL_TIMEOUT)
            running.close()
        self.assertEqual(problems, [])
        self.assertEqual(set(seen), set(expected), f"requests did not run on both engines: {seen}")


class ReloadMemoryTest(unittest.TestCase):
    """Issue 14: a host that reloads models while serving. Every LoadModel replaces a model that
    served requests (some of them failing on the helper thread, the path that once kept a
    request's images and model in a reference cycle); its memory must be returned, not left for a
    garbage collection to find, and nothing may pile up per reload. The real backend process, so
    the RSS is the server's own. `make soak-reload` is the long version under concurrent load."""

    RELOADS = 16
    # RSS after each default-set load (requests served in between): a leak of 2 MB a reload would
    # add ~25 MB from the 3rd of those loads to the last; without one the spread is ~10 MB.
    MAX_GROWTH_MB = 25.0

    def test_reloads_return_the_replaced_models_memory(self) -> None:
        support.pack_files("buffalo_sc")
        loads = [
            pb.ModelOptions(Model=DEFAULT_NAME, ModelPath=support.MODELS_DIR, Options=list(DEFAULT_MODEL_OPTIONS)),
            pb.ModelOptions(
                Model="buffalo_sc",
                ModelPath=support.MODELS_DIR,
                Options=[*support.INSIGHTFACE_OPTIONS, *support.LIVENESS_OPTIONS],
            ),
        ]
        face = support.b64_file(support.data_path(*PHOTO))
        other = support.b64_file(support.data_path(*LARGE_SOURCE))
        faceless = support.b64_image(support.faceless_image())
        group = support.b64_file(support.GROUP_PHOTO)
        server = BackendProcess()
        self.addCleanup(server.close)
        stub = server.stub

        def breakdown() -> dict[str, int]:
            return dict(stub.Status(pb.HealthMessage(), timeout=CALL_TIMEOUT).memory.breakdown)

        def serve() -> None:
            stub.FaceVerify(pb.FaceVerifyRequest(img1=face, img2=other, anti_spoofing=True), timeout=CALL_TIMEOUT)
            with self.assertRaises(grpc.RpcError) as failed:  # img2 fails on the helper thread
                stub.FaceVerify(pb.FaceVerifyRequest(img1=face, img2=faceless), timeout=CALL_TIMEOUT)
            self.assertEqual(failed.exception.code(), grpc.StatusCode.NOT_FOUND)
            stub.FaceAnalyze(pb.FaceAnalyzeRequest(img=group, anti_spoofing=True), timeout=CALL_TIMEOUT)
            stub.Embedding(pb.PredictOptions(Images=[face]), timeout=CALL_TIMEOUT)
            stub.Detect(pb.DetectOptions(src=group), timeout=CALL_TIMEOUT)

        after_default_mb = []
        for reload in range(self.RELOADS):
            result = stub.LoadModel(loads[reload % 2], timeout=CALL_TIMEOUT)
            self.assertTrue(result.success, result.message)
            # Nothing was in flight: the replaced model is closed and freed now, not at some later
            # collection. (The helper thread lets go of its last work item a moment after the
            # answer, so the count may take a moment to settle; a leak never settles.)
            deadline = time.monotonic() + 5.0
            memory = breakdown()
            while memory["models_alive"] != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
                memory = breakdown()
            self.assertEqual(memory["models_alive"], 1, f"reload {reload}: replaced models still alive")
            self.assertEqual(memory["retired_model_files"], 0, f"reload {reload}")
            self.assertGreater(memory["model_files"], 0)
            serve()
            if reload % 2 == 0:
                after_default_mb.append(status_field("VmRSS", server.pid) / 1024)
        self.assertEqual(breakdown()["images_in_flight"], 0)
        growth = after_default_mb[-1] - after_default_mb[2]
        self.assertLessEqual(
            growth,
            self.MAX_GROWTH_MB,
            "RSS after each default-set load grew by "
            + ", ".join(f"{b - a:+.1f}" for a, b in zip(after_default_mb, after_default_mb[1:]))
            + " MB",
        )


# -- the real process ----------------------------------------------------------------------------
class LifecycleTest(unittest.TestCase):
    """`python backend.py --addr ... --preload-default models` as the host starts it."""

    ARGS = ("--preload-default", support.MODELS_DIR)
    ENV = {"FACE_SHUTDOWN_GRACE_SECONDS": "10"}
    tmp: str

    @classmethod
    def setUpClass(cls):
        support.model_path("face_detection_yunet_2023mar.onnx")
        cls.tmp = support.temp_dir(cls)

    def assert_serving(self, health: health_pb2_grpc.HealthStub) -> None:
        self.assertEqual(
            health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT).status,
            health_pb2.HealthCheckResponse.SERVING,
        )

    def start(self) -> BackendProcess:
        server = BackendProcess(*self.ARGS, env=self.ENV)
        self.addCleanup(server.close)
        self.assert_serving(server.health)
        return server

    def slow_request(self):
        """A FaceVerify of two 6000x4500 photos with liveness (a tenth of a second of work or so:
        both are decoded at 1/8)."""
        source = Image.open(support.data_path(*LARGE_SOURCE)).convert("RGB")
        big = b64(encode(source.resize((6000, 4500), Image.Resampling.BILINEAR), "JPEG", quality=90))
        return pb.FaceVerifyRequest(img1=big, img2=big, anti_spoofing=True)

    # Requests sent at once: the server works on as many images at a time as it has CPUs, so the
    # last of them is still queued or running when the signal comes, however fast one is.
    REQUESTS_AT_ONCE = 8

    def check_signal_with_request_in_flight(self, sig: int) -> None:
        request = self.slow_request()
        server = self.start()
        started = time.monotonic()
        calls = [server.stub.FaceVerify.future(request, timeout=CALL_TIMEOUT) for _ in range(self.REQUESTS_AT_ONCE)]
        time.sleep(0.15)  # the requests (two ~2 MB images each over loopback) reach the server in ms
        in_flight = [call for call in calls if not call.done()]
        self.assertTrue(in_flight, "every request finished before the signal; send more")
        signalled = time.monotonic()
        server.process.send_signal(sig)
        for call in calls:
            self.assertTrue(call.result().verified)  # raises if the stop cut the request off
        finished = time.monotonic()
        self.assertGreater(finished, signalled, "no request was in flight when the signal came")
        self.assertEqual(server.process.wait(timeout=30), 0, server.output())
        self.assertIn("stopping", server.output())
        print(
            f"\n[hardening] {signal.Signals(sig).name}: {len(in_flight)} of {len(calls)} requests in flight"
            f" finished {finished - signalled:.2f} s after the signal ({finished - started:.2f} s in all); exit 0"
        )

    def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(self):
        self.check_signal_with_request_in_flight(signal.SIGTERM)

    def test_sigint_lets_the_request_in_flight_finish_and_exits_0(self):
        self.check_signal_with_request_in_flight(signal.SIGINT)

    def start_through_a_parent(self, **extra):
        """The backend started by an intermediate shell, as a host would; returns (shell, pid, log)."""
        port = free_port()
        address = f"127.0.0.1:{port}"
        log_path = os.path.join(self.tmp, f"backend-{port}.log")
        script = '"$@" >"$BACKEND_LOG" 2>&1 & echo $!; wait'
        shell = subprocess.Popen(
            ["sh", "-c", script, "sh", *backend_command("--addr", address, *self.ARGS)],
            env=backend_env(BACKEND_LOG=log_path, **self.ENV, **extra),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=support.REPO,
        )
        pid = int(shell.stdout.readline())
        backend_process = psutil.Process(pid)
        self.addCleanup(lambda: shell.poll() is None and (shell.kill(), shell.wait()))
        self.addCleanup(lambda: shell.stdout.close())
        self.addCleanup(self.kill_if_running, backend_process)
        self.assertEqual(backend_process.ppid(), shell.pid)
        wait_for_health(address, lambda: running(backend_process), log_path)
        backend_channel = open_channel(address)
        self.addCleanup(backend_channel.close)
        self.assert_serving(health_pb2_grpc.HealthStub(backend_channel))
        return shell, backend_process, backend_channel, log_path

    @staticmethod
    def kill_if_running(process: psutil.Process) -> None:
        if running(process):
            process.kill()

    def test_parent_watch_stops_an_orphaned_backend(self):
        shell, backend_process, _, log_path = self.start_through_a_parent(LOCALAI_BACKEND_PARENT_WATCH_INTERVAL="200ms")
        shell.kill()
        shell.wait()
        killed = time.monotonic()
        deadline = killed + 10
        while running(backend_process) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(running(backend_process), "the orphaned backend is still running 10 s after its parent died")
        self.assertIn("parent process", read_log(log_path))
        print(
            f"\n[hardening] parent watch: orphaned backend gone {time.monotonic() - killed:.2f} s"
            " after its parent was killed"
        )

    def test_parent_watch_can_be_disabled(self):
        shell, backend_process, channel, log_path = self.start_through_a_parent(
            LOCALAI_BACKEND_PARENT_WATCH="false", LOCALAI_BACKEND_PARENT_WATCH_INTERVAL="200ms"
        )
        shell.kill()
        shell.wait()
        time.sleep(1.5)  # seven watch intervals
        self.assertTrue(running(backend_process), "the backend stopped although the parent watch is off")
        self.assertEqual(
            backend_pb2_grpc.BackendStub(channel).Health(pb.HealthMessage(), timeout=CALL_TIMEOUT).message, b"OK"
        )
        backend_process.terminate()
        deadline = time.monotonic() + 20
        while running(backend_process) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(running(backend_process))


class ParentWatchTest(unittest.TestCase):
    """core.process.watch_parent itself, with getppid() faked."""

    def test_a_backend_started_by_pid_1_keeps_running(self):
        # A host that is PID 1 in its container starts backends whose parent is 1 from the start:
        # that is not orphanhood, and the backend must not stop itself (the host's Go, C++ and
        # Python backends skip the watch then too).
        orphaned = threading.Event()
        with mock.patch("os.getppid", return_value=1):
            watch_parent(orphaned.set, 0.02)
            time.sleep(0.3)
        self.assertFalse(orphaned.is_set(), "a backend started by pid 1 shut itself down")

    def test_reparenting_is_noticed(self):
        orphaned = threading.Event()
        answers = iter([4242, 4242, 4242])
        with mock.patch("os.getppid", side_effect=lambda: next(answers, 1)):
            watch_parent(orphaned.set, 0.02)
            self.assertTrue(orphaned.wait(5), "reparenting to pid 1 went unnoticed")


def running(process: psutil.Process) -> bool:
    """True while `process` runs (a zombie waiting for a reaper that is not ours counts as gone)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


if __name__ == "__main__":
    unittest.main()
