"""Images as the host sends them (base64 strings), and the two synthetic ones the suites need:
a photo without a face and a pixel bomb."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64_file(path: str) -> str:
    """Base64 of a file's bytes, as the host sends images."""
    return b64(read_bytes(path))


def b64_image(image: np.ndarray, ext: str = ".jpg") -> str:
    """Base64 of a BGR array encoded with OpenCV."""
    import cv2  # on use: the paths and byte helpers stay free of OpenCV for light callers

    ok, encoded = cv2.imencode(ext, image)
    if not ok:
        raise ValueError(f"cv2.imencode({ext!r}) failed")
    return b64(encoded.tobytes())


def faceless_image(width: int = 640, height: int = 480) -> np.ndarray:
    """A smooth colour gradient: a valid photo in which no detector finds a face."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    image[..., 1] = 128
    image[..., 2] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    return image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_pixel_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A valid few-KB RGB PNG whose header claims width x height pixels (4.8 GB decoded)."""
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 16, 9)  # 16 rows of black, filter 0
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + png_chunk(b"IDAT", rows)
        + png_chunk(b"IEND", b"")
    )
