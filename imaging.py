"""Turning a request's base64 image string into an 8-bit BGR array, or a clear InvalidInputError."""
from __future__ import annotations

import base64
import binascii

import cv2
import numpy as np

from engines.errors import InvalidInputError

MAX_ENCODED_BYTES = 50 * 1024 * 1024  # the gRPC message limit; nothing larger can arrive anyway


def decode_base64(data: str, name: str) -> bytes:
    """Strict base64 (a `data:<mime>;base64,` prefix is accepted); garbage is an error."""
    if not data:
        raise InvalidInputError(f"{name}: no image data")
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidInputError(f"{name}: data URI must be of the form data:<mime>;base64,<data>")
    compact = "".join(data.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{name}: not valid base64") from None


def decode_image(data: str, name: str) -> np.ndarray:
    """The image in `data` as an HxWx3 uint8 BGR array, EXIF orientation applied."""
    raw = decode_base64(data, name)
    if len(raw) > MAX_ENCODED_BYTES:
        raise InvalidInputError(f"{name}: image is larger than {MAX_ENCODED_BYTES // (1024 * 1024)} MiB")
    # IMREAD_COLOR turns grey, palette and alpha images into 3-channel BGR, 16-bit into 8-bit,
    # and applies the EXIF orientation.
    image = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise InvalidInputError(f"{name}: not a decodable image (JPEG, PNG, WebP, BMP, TIFF ...)")
    return image
