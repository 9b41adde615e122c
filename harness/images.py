"""Images as the host sends them (base64 strings), and the synthetic ones the suites need: a
photo without a face and pixel bombs."""

from __future__ import annotations

import base64
import io
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


def encode(image, fmt: str, **kwargs) -> bytes:
    """A Pillow image's bytes in `fmt` (Pillow's format name; kwargs are Image.save's)."""
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


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


def jpeg_segments(jpeg: bytes) -> list[tuple[int, bytes]]:
    """(marker, whole segment) of a well-formed JPEG from SOI to its first scan's header, then
    (0xDA, everything from there on)."""
    segments, i = [(0xD8, jpeg[:2])], 2
    while jpeg[i + 1] != 0xDA:
        (length,) = struct.unpack_from(">H", jpeg, i + 2)
        segments.append((jpeg[i + 1], jpeg[i : i + 2 + length]))
        i += 2 + length
    return segments + [(0xDA, jpeg[i:])]


def jpeg_pixel_bomb(jpeg: bytes, width: int = 40000, height: int = 40000) -> bytes:
    """`jpeg` (baseline, as OpenCV and Pillow write it) with its frame header (SOF0) claiming
    width x height pixels."""
    segments = jpeg_segments(jpeg)
    if not any(marker == 0xC0 for marker, _ in segments):
        raise ValueError("not a baseline JPEG: no SOF0 frame header")
    return b"".join(
        segment[:5] + struct.pack(">HH", height, width) + segment[9:] if marker == 0xC0 else segment
        for marker, segment in segments
    )


# A 12-MP phone photo's size, landscape (a portrait source gets it turned to 3000x4000).
PHONE_PHOTO_SIZE = (4000, 3000)
PHONE_PHOTO_QUALITY = 90


def phone_photo(image: np.ndarray, size: tuple[int, int] = PHONE_PHOTO_SIZE) -> bytes:
    """`image` enlarged (INTER_CUBIC) to cover `size` and centre-cropped to it, as a quality-90
    JPEG: a stand-in for a phone camera's photo, made at run time from a real one (the shared data
    holds no 12-MP photo). `size` is (long side, short side); the source's orientation is kept."""
    import cv2  # on use, as in b64_image

    long_side, short_side = max(size), min(size)
    height, width = image.shape[:2]
    out_w, out_h = (long_side, short_side) if width >= height else (short_side, long_side)
    scale = max(out_w / width, out_h / height)
    big = cv2.resize(
        image, (max(out_w, round(width * scale)), max(out_h, round(height * scale))), interpolation=cv2.INTER_CUBIC
    )
    top, left = (big.shape[0] - out_h) // 2, (big.shape[1] - out_w) // 2
    ok, encoded = cv2.imencode(
        ".jpg", big[top : top + out_h, left : left + out_w], [cv2.IMWRITE_JPEG_QUALITY, PHONE_PHOTO_QUALITY]
    )
    if not ok:
        raise ValueError("cv2.imencode('.jpg') failed")
    return encoded.tobytes()


def shrunk_photo(raw: bytes, long_side: int = 640) -> bytes:
    """The JPEG `raw` shrunk (INTER_AREA) to `long_side` px on its longer side, quality 90: the
    same photo as a phone app would send it downsized."""
    import cv2

    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("cv2.imdecode could not decode the photo")
    scale = long_side / max(image.shape[:2])
    small = cv2.resize(
        image, (round(image.shape[1] * scale), round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA
    )
    ok, encoded = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, PHONE_PHOTO_QUALITY])
    if not ok:
        raise ValueError("cv2.imencode('.jpg') failed")
    return encoded.tobytes()
