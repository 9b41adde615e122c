"""Turning a request's base64 image string into an 8-bit BGR array, or a clear InvalidInputError.

Every byte of a request image is attacker controlled, so sizes are checked from the image header
before any pixel is decoded: a few-KB PNG that claims 40000x40000 pixels is refused without
allocating them.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import cv2
import numpy as np
from PIL import Image

from core.errors import InvalidInputError
from core.settings import DEFAULT_IMAGE_LIMITS, ImageLimits

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
    if len(data) > limits.max_bytes * 4 // 3 + 1024:
        raise InvalidInputError(
            f"{name}: image is larger than {limits.max_bytes} bytes", reason="IMAGE_TOO_LARGE", field=name
        )
    try:
        raw = base64.b64decode(data, validate=True)
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
    try:
        with warnings.catch_warnings():
            # PIL warns (and past 2x its own limit raises) on huge images; we apply our own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as header:
                fmt, (width, height) = header.format or "", header.size
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
    return fmt, width, height


def decode_image(data: str, name: str, limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> np.ndarray:
    """The image in `data` as an HxWx3 uint8 BGR array, EXIF orientation applied."""
    raw = decode_base64(data, name, limits)
    if len(raw) > limits.max_bytes:
        raise InvalidInputError(
            f"{name}: image is larger than {limits.max_bytes} bytes", reason="IMAGE_TOO_LARGE", field=name
        )
    fmt, _, _ = check_header(raw, name, limits)
    if fmt.upper() == "GIF":
        image = _decode_with_pillow(raw)  # OpenCV builds differ in GIF support
    else:
        # IMREAD_COLOR makes grey, palette and alpha images 3-channel BGR and 16-bit ones 8-bit,
        # and applies the EXIF orientation.
        try:
            image = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:  # some malformed headers fail an OpenCV assertion instead of returning None
            image = None
    if image is None or image.size == 0:
        raise InvalidInputError(f"{name}: image data is corrupt or truncated", reason="IMAGE_UNDECODABLE", field=name)
    return image


def _decode_with_pillow(raw: bytes):
    try:
        with Image.open(io.BytesIO(raw)) as picture:
            rgb = np.asarray(picture.convert("RGB"))
    except (OSError, ValueError, SyntaxError):
        return None
    return np.ascontiguousarray(rgb[..., ::-1])
