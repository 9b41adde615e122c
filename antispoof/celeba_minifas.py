"""MiniFAS retrained on CelebA-Spoof: one binary live/spoof CNN that looks at the face and a
thin ring of context around it, given the face box of any detector.

Preprocessing and decision follow johnraivenolazo/face-antispoof-onnx (Apache-2.0, its
src/inference/preprocess.py); tensors and checks are in shared/models/antispoof-celeba-minifas/
SOURCE.md. Unlike Silent-Face's CropImage, which shifts its window back inside the image, this
model was trained on a square window centred on the face whose outside is filled by reflection,
so a face at the border keeps its place in the middle of the crop.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

import catalog
from catalog import ROLE_ANTISPOOF, CatalogError
from engines.base import FaceDetection
from engines.runtime import open_patch_classifier, run_batched, softmax

from .minifasnet import BoxXYWH

# [N, 3, 128, 128] RGB scaled to 0..1, no mean/std (SOURCE.md, "Tensors").
INPUT_SIZE = 128
# Output logits: index 0 = real, 1 = spoof.
REAL_CLASS = 0
NUM_CLASSES = 2

# catalog/catalog.json's `preprocess.runner` of the files this class runs. Of the two published
# checkpoints only the shipped one has a LoadModel option (bench/FINDINGS.md says why).
RUNNER = "antispoof.CelebAMiniFAS"


def _catalog_facts() -> tuple[str, str, float]:
    """(LoadModel option, installed file, crop scale) of the one loadable file this class runs."""
    found = [
        (f.load_key, f.name, f.preprocess.crop_scale)
        for f in catalog.default().loadable(ROLE_ANTISPOOF)
        if f.preprocess is not None and f.preprocess.runner == RUNNER and f.preprocess.crop_scale is not None
    ]
    if len(found) != 1:
        raise CatalogError(f"the catalog needs one loadable {RUNNER} file with its preprocess.crop_scale")
    return found[0]


# The LoadModel option, its installed file and the context scale around the box (1.5 upstream).
CELEBA_OPTION, CELEBA_FILE, CELEBA_CROP_SCALE = _catalog_facts()


def square_window(box_xywh: BoxXYWH, scale: float) -> tuple[int, int, int]:
    """(x, y, side) of upstream's crop: a square of side int(scale * longer box side) centred on
    the box, corners truncated with int() as upstream does; it may reach outside the image."""
    x, y, box_w, box_h = box_xywh
    # A degenerate detection (zero or negative size) is treated as 1 px, like crop_window.
    longer = max(float(box_w), float(box_h), 1.0)
    centre_x = x + max(float(box_w), 1.0) / 2
    centre_y = y + max(float(box_h), 1.0) / 2
    side = max(int(longer * scale), 1)
    return int(centre_x - longer * scale / 2), int(centre_y - longer * scale / 2), side


def crop_reflected(image_bgr: np.ndarray, box_xywh: BoxXYWH, scale: float, size: int = INPUT_SIZE) -> np.ndarray:
    """The size x size RGB uint8 patch the model expects: the square window around the face,
    whatever lies outside the image filled by reflection (BORDER_REFLECT_101), then resized
    with Lanczos when enlarging and area averaging when shrinking, as upstream."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 BGR image, got shape {image_bgr.shape}")
    image_h, image_w = image_bgr.shape[:2]
    x, y, side = square_window(box_xywh, scale)
    # The part of the window inside the image; a window wholly outside keeps the nearest pixel
    # row or column so there is something to reflect (upstream would fail on it).
    x1 = min(max(x, 0), image_w - 1)
    y1 = min(max(y, 0), image_h - 1)
    x2 = max(min(x + side, image_w), x1 + 1)
    y2 = max(min(y + side, image_h), y1 + 1)
    inside = image_bgr[y1:y2, x1:x2]
    top, left = y1 - y, x1 - x
    bottom, right = side - top - (y2 - y1), side - left - (x2 - x1)
    square = cv2.copyMakeBorder(
        inside, max(top, 0), max(bottom, 0), max(left, 0), max(right, 0), cv2.BORDER_REFLECT_101
    )
    # Only a window wholly outside the image overshoots (negative padding): cut it back to side.
    square = square[max(-top, 0) : max(-top, 0) + side, max(-left, 0) : max(-left, 0) + side]
    interpolation = cv2.INTER_LANCZOS4 if side < size else cv2.INTER_AREA
    patch = cv2.resize(square, (size, size), interpolation=interpolation)
    return cv2.cvtColor(patch, cv2.COLOR_BGR2RGB)


class CelebAMiniFAS:
    """One CelebA-Spoof MiniFAS ONNX model and the context scale it was trained with."""

    def __init__(self, path: str, scale: float = CELEBA_CROP_SCALE, threads: int | None = None) -> None:
        self.path = path
        self.scale = scale
        self._session, self.dynamic_batch = open_patch_classifier(
            path, threads, INPUT_SIZE, NUM_CLASSES, "CelebA-Spoof MiniFAS liveness"
        )

    def magnification(self, face: FaceDetection) -> float:
        """How many times the 128x128 input enlarges the face's pixels: the window is a square
        `scale` times the box's longer side."""
        return INPUT_SIZE / (self.scale * max(face.width, face.height, 1e-6))

    def real_probability(self, image_bgr: np.ndarray, boxes_xywh: Sequence[BoxXYWH]) -> np.ndarray:
        """(len(boxes),) P(real), the softmax of the two logits, for each face box."""
        if not boxes_xywh:
            return np.zeros(0)
        batch = np.stack([crop_reflected(image_bgr, box, self.scale) for box in boxes_xywh])
        batch = batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return softmax(run_batched(self._session, batch))[:, REAL_CLASS]

    def close(self) -> None:
        self._session = None
