"""Turning a request's base64 image string into an 8-bit BGR array, or a clear InvalidInputError.

Every byte of a request image is attacker controlled, so sizes are checked from the image header
before any pixel is decoded: a few-KB PNG that claims 40000x40000 pixels is refused without
allocating them.

JPEG and PNG headers (nearly every request) are read here; other formats and any header this
reader is not sure of go to Pillow, imported on first use: the server otherwise never carries it
(bench/FINDINGS.md, "Pillow off the request path").
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pybase64

from core.concurrency import Budget
from core.errors import InvalidInputError
from core.settings import DEFAULT_IMAGE_LIMITS, ImageLimits

if TYPE_CHECKING:  # Pillow is imported on use only (module docstring)
    from PIL import Image

# The byte and pixel limits are settings (core.settings.ImageLimits); the side limits are not.
# The smallest image a face detector can work with.
MIN_IMAGE_SIDE = 16
# The longest side OpenCV's decoders accept (CV_IO_MAX_IMAGE_WIDTH/HEIGHT): past it cv2.imdecode
# raises instead of decoding, so a 16x2000000 image (under the pixel limit) is refused here.
MAX_IMAGE_SIDE = 1 << 20

# MPO is Pillow's name for a JPEG carrying a multi-picture (MPF) segment, as many phone cameras
# write (a depth map or HDR gain map after the photo): decoded as the JPEG it is, first picture.
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF")
_WHITESPACE = re.compile(r"\s+")


def decode_base64(data: str, name: str, limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> bytes:
    """Strict base64 (a `data:<mime>;base64,` prefix is accepted); garbage is an error."""
    if not data:
        raise InvalidInputError(f"{name}: no image data", reason="IMAGE_MISSING", field=name)
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidInputError(
                f"{name}: data URI must be of the form data:<mime>;base64,<data>", reason="IMAGE_NOT_BASE64", field=name
            )
    # Allowed lengths are checked before the string is copied or decoded.
    if len(data) > limits.max_base64_chars() + 1024:
        raise InvalidInputError(
            f"{name}: image is larger than {limits.max_bytes} bytes", reason="IMAGE_TOO_LARGE", field=name
        )
    try:
        # pybase64 decodes with SIMD: a phone photo's base64 no longer holds the GIL for a
        # measurable part of a request (bench/FINDINGS.md, "base64"). It is stricter about surplus
        # padding: what it refuses goes the standard library's way below, so the same strings are
        # accepted as before.
        raw = pybase64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        # MIME-style base64 wraps lines; stripping whitespace only on this rarer path keeps the
        # regex scan (several times the cost of the decode itself) off the common one.
        try:
            raw = base64.b64decode(_WHITESPACE.sub("", data), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInputError(f"{name}: not valid base64", reason="IMAGE_NOT_BASE64", field=name) from None
    if not raw:
        raise InvalidInputError(f"{name}: no image data", reason="IMAGE_MISSING", field=name)
    return raw


def check_header(raw: bytes, name: str, limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> tuple[str, int, int]:
    """Format, width and height from the header alone; refuses unknown formats and pixel bombs."""
    fmt, width, height, _ = _read_header(raw, name, limits)
    return fmt, width, height


def _read_header(raw: bytes, name: str, limits: ImageLimits) -> tuple[str, int, int, _JpegFrame | None]:
    """check_header's format, width and height, and a JPEG's frame (None for other formats)."""
    frame = _jpeg_frame(raw)
    if frame is not None:
        fmt, width, height = "JPEG", frame.width, frame.height
    elif (png := _png_header(raw)) is not None:
        fmt, width, height = png
    else:
        fmt, width, height, frame = _pillow_header(raw, name, limits)
    if fmt.upper() not in SUPPORTED_FORMATS:
        raise InvalidInputError(
            f"{name}: unsupported image format {fmt or 'unknown'}; send JPEG, PNG, WebP, BMP or TIFF",
            reason="IMAGE_FORMAT_UNSUPPORTED",
            field=name,
        )
    if width * height > limits.max_pixels:
        raise InvalidInputError(
            f"{name}: image is {width}x{height} pixels, more than the {limits.max_pixels} allowed",
            reason="IMAGE_TOO_LARGE",
            field=name,
        )
    if max(width, height) > MAX_IMAGE_SIDE:
        raise InvalidInputError(
            f"{name}: image is {width}x{height} pixels, a side longer than the {MAX_IMAGE_SIDE} allowed",
            reason="IMAGE_TOO_LARGE",
            field=name,
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InvalidInputError(
            f"{name}: image is {width}x{height} pixels, too small to hold a face"
            f" (at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})",
            reason="IMAGE_TOO_SMALL",
            field=name,
        )
    return fmt, width, height, frame


# JPEG markers that start a frame header (SOF0-3, 5-7, 9-11, 13-15: ITU T.81 table B.1); C4
# (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_SCAN = 0xDA  # SOS: entropy-coded data follows
# The other segments libjpeg reads before the first scan, each skipped by its length: DHT, DAC,
# DQT, DRI, APP0-15, COM. The reader must split the file exactly as libjpeg does: any other
# marker (FF 00 above all, which libjpeg reads as stuffed data and scans past) could hide a frame
# header from one of the two, so it leaves the file to Pillow.
_JPEG_SKIPPED_SEGMENTS = frozenset({0xC4, 0xCC, 0xDB, 0xDD, *range(0xE0, 0xF0), 0xFE})
# Markers without a length field, which libjpeg skips: TEM and RST0-7 (T.81 B.1.1.3).
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


# Frame headers of the progressive JPEGs libjpeg decodes (SOF2, SOF10; it refuses the differential
# SOF6 and SOF14): their scans each carry part of every coefficient, so libjpeg keeps all of the
# image's coefficients until the last scan.
_JPEG_PROGRESSIVE_FRAMES = frozenset({0xC2, 0xCA})


@dataclass(frozen=True)
class _JpegFrame:
    """What a JPEG's frame header and first scan header say, as libjpeg will decode them."""

    marker: int  # SOFn
    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]  # each component's (horizontal, vertical) sampling factor
    first_scan_components: int

    @staticmethod
    def largest(width: int, height: int) -> _JpegFrame:
        """The frame charged for a header no reader can take as libjpeg would: progressive, four
        full-size components (CMYK)."""
        return _JpegFrame(0xC2, width, height, ((1, 1),) * 4, 1)

    def coefficient_bytes(self) -> int:
        """The bytes libjpeg holds for the image's DCT coefficients while decoding it, at any
        scale: every coefficient (2 bytes) when the image comes in several scans (progressive, or
        its components in scans of their own), else 0 (it decodes a row of blocks at a time).
        jdcoefct.c's whole-image arrays: each component's blocks, padded to whole MCUs. (A
        lossless JPEG in several scans holds less: 1 sample a pixel.)"""
        if self.marker not in _JPEG_PROGRESSIVE_FRAMES and self.first_scan_components >= len(self.sampling):
            return 0
        h_max = max(h for h, _ in self.sampling)
        v_max = max(v for _, v in self.sampling)
        blocks = 0
        for h, v in self.sampling:
            across = -(-self.width * h // (h_max * 8))
            down = -(-self.height * v // (v_max * 8))
            blocks += (-(-across // h) * h) * (-(-down // v) * v)
        return blocks * 64 * 2


def _jpeg_frame(raw: bytes) -> _JpegFrame | None:
    """The one frame header before the first scan, and that scan's component count, as libjpeg
    will read them; None for anything else (not a JPEG, truncated before the scan, two frame
    headers, a height left to a DNL marker, a marker libjpeg would not read as a segment), which
    Pillow then judges."""
    if raw[:3] != b"\xff\xd8\xff":
        return None
    frame = None
    i, end = 2, len(raw)
    while i + 4 <= end:
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _JPEG_STANDALONE:
            i += 2
            continue
        if marker != _JPEG_SCAN and marker not in _JPEG_FRAME_MARKERS and marker not in _JPEG_SKIPPED_SEGMENTS:
            return None
        (length,) = struct.unpack_from(">H", raw, i + 2)
        if length < 2 or i + 2 + length > end:
            return None
        if marker == _JPEG_SCAN:
            if frame is None or length < 3:
                return None
            marker, width, height, sampling = frame
            return _JpegFrame(marker, width, height, sampling, raw[i + 4])
        if marker in _JPEG_FRAME_MARKERS:
            # P, Y, X, Nf, then C, HV, Tq for each of the Nf components (T.81 B.2.2).
            if frame is not None or length < 8:
                return None
            height, width, count = struct.unpack_from(">HHB", raw, i + 5)
            if not (width and height and count) or length < 8 + 3 * count:
                return None
            sampling = tuple((raw[j] >> 4, raw[j] & 0x0F) for j in range(i + 11, i + 11 + 3 * count, 3))
            if not _valid_sampling(sampling):
                return None
            frame = (marker, width, height, sampling)
        i += 2 + length
    return None


def _valid_sampling(sampling: tuple[tuple[int, int], ...]) -> bool:
    """Sampling factors libjpeg decodes: 1 to 4 each way, for at least one component."""
    return bool(sampling) and all(1 <= h <= 4 and 1 <= v <= 4 for h, v in sampling)


def _pillow_jpeg_frame(image: Image.Image) -> _JpegFrame:
    """The frame of a JPEG whose header only Pillow reads (its `layer` and `progressive`). Pillow
    does not read the scans, so a first scan of one component is assumed: the coefficients are
    charged unless it has only one. _JpegFrame.largest when Pillow's frame is not one libjpeg
    decodes."""
    width, height = image.size
    sampling = tuple((h, v) for _, h, v, _ in getattr(image, "layer", ()))
    if not _valid_sampling(sampling):
        return _JpegFrame.largest(width, height)
    marker = 0xC2 if image.info.get("progressive") else 0xC0
    return _JpegFrame(marker, width, height, sampling, 1)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (colour type, allowed bit depths) of PNG's IHDR (PNG spec 11.2.2).
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _png_header(raw: bytes) -> tuple[str, int, int] | None:
    """("PNG", width, height) from a well-formed IHDR chunk (its CRC checked); None otherwise."""
    if not raw.startswith(_PNG_SIGNATURE) or len(raw) < 33:
        return None
    length, kind, width, height, depth, colour = struct.unpack_from(">I4sIIBB", raw, 8)
    (crc,) = struct.unpack_from(">I", raw, 29)
    if length != 13 or kind != b"IHDR" or zlib.crc32(raw[12:29]) != crc:
        return None
    if not (0 < width < 2**31 and 0 < height < 2**31) or depth not in _PNG_DEPTHS.get(colour, ()):
        return None
    return "PNG", width, height


def _pillow_header(raw: bytes, name: str, limits: ImageLimits) -> tuple[str, int, int, _JpegFrame | None]:
    """Format, width and height as Pillow reads them, for every format the readers above leave,
    and a JPEG's frame (_pillow_jpeg_frame)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # PIL warns (and past 2x its own limit raises) on huge images; we apply our own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as header:
                frame = _pillow_jpeg_frame(header) if header.format in _REDUCIBLE_FORMATS else None
                return header.format or "", *header.size, frame
    except Image.DecompressionBombError:
        raise InvalidInputError(
            f"{name}: image has more than {limits.max_pixels} pixels", reason="IMAGE_TOO_LARGE", field=name
        ) from None
    except Exception:
        # Pillow's format plugins raise many types on malformed headers (UnidentifiedImageError,
        # OSError, SyntaxError, but also NotImplementedError, EOFError, struct.error, ...): whatever
        # the bytes, a header Pillow cannot read is the caller's error, never an internal one.
        raise InvalidInputError(
            f"{name}: not a decodable image (JPEG, PNG, WebP, BMP, TIFF)", reason="IMAGE_UNDECODABLE", field=name
        ) from None


# JPEG's DCT decodes straight to 1/2, 1/4 or 1/8 of the size for a fraction of the full decode's
# cost (libjpeg scale_denom); OpenCV exposes it as these flags, which keep IMREAD_COLOR's
# conversions and EXIF orientation. A reduced image is ceil(side / reduction) pixels a side.
JPEG_REDUCTIONS = (1, 2, 4, 8)
_REDUCED_COLOR_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
# Formats whose decoder can reduce (Pillow's names; MPO is a JPEG).
_REDUCIBLE_FORMATS = ("JPEG", "MPO")
# The decoder of a progressive JPEG holds every coefficient of the image until its last scan
# (_JpegFrame.coefficient_bytes), whatever the scale. Such decodes run side by side only while
# what they hold together stays within this budget, which two 12-MP photos (34 MiB each at 4:2:0)
# fit in: making them take turns would cost their throughput (bench/FINDINGS.md, "progressive
# JPEGs"). A decode that alone holds more runs while no other holds any.
COEFFICIENT_BUDGET_BYTES = 80 * 2**20
_coefficient_budget = Budget(COEFFICIENT_BUDGET_BYTES)


def coefficient_bytes_in_flight() -> int:
    """Bytes of JPEG coefficients held by the decodes running now."""
    return _coefficient_budget.taken


@dataclass(frozen=True)
class EncodedImage:
    """A request image whose bytes and header passed the checks, not yet decoded.

    `width` and `height` are the header's, before EXIF orientation (a 90-degree orientation swaps
    them in the decoded image).
    """

    raw: bytes
    name: str
    format: str
    width: int
    height: int
    coefficient_bytes: int  # what its decoder holds while it runs (_JpegFrame.coefficient_bytes)

    @classmethod
    def from_bytes(cls, raw: bytes, name: str, limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> EncodedImage:
        """The encoded image `raw` (a file's bytes), or InvalidInputError naming `name`."""
        if len(raw) > limits.max_bytes:
            raise InvalidInputError(
                f"{name}: image is larger than {limits.max_bytes} bytes", reason="IMAGE_TOO_LARGE", field=name
            )
        fmt, width, height, frame = _read_header(raw, name, limits)
        return cls(raw, name, fmt.upper(), width, height, 0 if frame is None else frame.coefficient_bytes())

    @property
    def reductions(self) -> Sequence[int]:
        """The fractions of its size this image decodes at: 1, 2, 4, 8 for a JPEG, else only 1."""
        return JPEG_REDUCTIONS if self.format in _REDUCIBLE_FORMATS else (1,)

    def decode(self, reduction: int = 1) -> np.ndarray:
        """HxWx3 uint8 BGR, EXIF orientation applied, at 1/`reduction` of the size (one of
        `reductions`): every output pixel is the mean of a reduction x reduction block."""
        if reduction not in self.reductions:
            raise ValueError(f"{self.format} decodes at 1/{list(self.reductions)} of its size, not 1/{reduction}")
        if self.format == "GIF":
            image = _decode_with_pillow(self.raw)  # OpenCV builds differ in GIF support
        else:
            # IMREAD_COLOR makes grey, palette and alpha images 3-channel BGR and 16-bit ones
            # 8-bit, and applies the EXIF orientation; the reduced flags do the same.
            try:
                with _coefficient_budget.taking(self.coefficient_bytes):
                    image = cv2.imdecode(np.frombuffer(self.raw, dtype=np.uint8), _REDUCED_COLOR_FLAGS[reduction])
            except cv2.error:  # some malformed headers fail an OpenCV assertion instead of returning None
                image = None
        if image is None or image.size == 0:
            raise InvalidInputError(
                f"{self.name}: image data is corrupt or truncated", reason="IMAGE_UNDECODABLE", field=self.name
            )
        return image

    def coarsest_reduction(self, min_size: tuple[int, int]) -> int:
        """The largest reduction that leaves the image at least `min_size` (w, h) in at least one
        dimension, either way round (the EXIF orientation is not read): an image that is then
        fitted into a min_size box is shrunk, never enlarged, as it would be at full size. 1 when
        the full image is no larger than that."""
        box_w, box_h = min_size
        best = 1
        for reduction in self.reductions:
            width, height = -(-self.width // reduction), -(-self.height // reduction)
            if (width >= box_w or height >= box_h) and (height >= box_w or width >= box_h):
                best = reduction
        return best


def read_image(data: str, name: str, limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> EncodedImage:
    """The base64 image in `data`, checked (bytes, format, pixel count) but not decoded."""
    return EncodedImage.from_bytes(decode_base64(data, name, limits), name, limits)


def decode_image(data: str, name: str, limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> np.ndarray:
    """The image in `data` as an HxWx3 uint8 BGR array at full size, EXIF orientation applied."""
    return read_image(data, name, limits).decode()


def _decode_with_pillow(raw: bytes):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as picture:
            rgb = np.asarray(picture.convert("RGB"))
    except (OSError, ValueError, SyntaxError):
        return None
    return np.ascontiguousarray(rgb[..., ::-1])
