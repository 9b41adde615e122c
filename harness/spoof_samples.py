"""Upstream Silent-Face's sample photos (FACE_SHARED_DIR/data/silent-face-samples) with the face
boxes upstream's own detector finds in them, as that folder's SOURCE.md lists them."""

from __future__ import annotations

import numpy as np

from engines.base import FaceDetection

# (x, y, w, h) in the 640x480 photos at upstream's HEAD, which upstream's reference scores are for.
SAMPLE_BOXES = {
    "image_F1.jpg": (178, 136, 223, 225),
    "image_F2.jpg": (120, 252, 252, 256),
    "image_T1.jpg": (106, 147, 207, 213),
}
# A 1617x2160 phone photo from upstream's history, without a reference score: a large crop to resize.
LARGE_SAMPLE_BOXES = {"image_T2.jpg": (590, 701, 448, 448)}


def face_at(x: float, y: float, w: float, h: float) -> FaceDetection:
    """A detection of the box (x, y, w, h), as the liveness models take it (they read the box only)."""
    return FaceDetection(box=(x, y, x + w, y + h), score=1.0, landmarks=np.zeros((5, 2), np.float32))
