"""Silent-Face passive liveness: two MiniFASNet CNNs that tell a live face from a printed photo
or a replayed screen, given the face box of any detector.

Model, preprocessing and fusion follow minivision-ai/Silent-Face-Anti-Spoofing (Apache-2.0);
weights are the ONNX exports described in shared/models/minifasnet/SOURCE.md. Each model sees a
differently sized context window around the face (the border of a photo or a screen is the cue),
so each crops the image itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

import catalog
from catalog import ROLE_ANTISPOOF, CatalogError, ModelFile
from engines.base import FaceDetection
from engines.runtime import open_patch_classifier, run_batched, softmax

# Upstream model files are named "<scale>_<h>x<w>_<arch>.pth": 2.7_80x80_MiniFASNetV2 and
# 4_0_0_80x80_MiniFASNetV1SE. Both take an 80x80 crop of the face box enlarged by that scale, a
# fact of each file kept with it in catalog/catalog.json (preprocess.crop_scale).
INPUT_SIZE = 80
# The 3 output classes are: 0 = attack (print), 1 = real face, 2 = attack (screen replay).
REAL_CLASS = 1
NUM_CLASSES = 3
# onnxruntime threads per MiniFASNet Run when the host sets none. An 80x80 net's ops are too small
# to split: waking a second thread for each of its ~100 ops costs what it saves. The two models
# run side by side instead, one thread each (bench/FINDINGS.md, "liveness threads").
INTRA_OP_THREADS = 1


def _crop_scale(entry: ModelFile) -> float:
    if entry.preprocess is None or entry.preprocess.crop_scale is None:
        raise CatalogError(f"catalog entry {entry.name}: a MiniFASNet file needs its preprocess.crop_scale")
    return entry.preprocess.crop_scale


# The catalog's MiniFASNet files (liveness files without a `runner`), V2 then V1SE: the LoadModel
# option that loads each, its installed name and its crop scale.
MINIFASNET_ENTRIES = tuple(
    entry
    for entry in catalog.default().loadable(ROLE_ANTISPOOF)
    if entry.preprocess is None or entry.preprocess.runner is None
)
MINIFASNET_OPTIONS = tuple(entry.load_key for entry in MINIFASNET_ENTRIES)
MINIFASNET_FILES = tuple(entry.name for entry in MINIFASNET_ENTRIES)
V2_CROP_SCALE, V1SE_CROP_SCALE = (_crop_scale(entry) for entry in MINIFASNET_ENTRIES)

BoxXYWH = tuple[float, float, float, float]


def crop_window(image_w: int, image_h: int, box_xywh: BoxXYWH, scale: float) -> tuple[int, int, int, int]:
    """Inclusive pixel window (x1, y1, x2, y2) that upstream's CropImage cuts for this box.

    The box is enlarged by `scale` around its centre; when that cannot fit, the scale shrinks until
    the longer relative side spans the image (minus one pixel, as upstream); then the window is
    shifted, not truncated, back inside the image, so the model always sees the context it was
    trained with. Coordinates are truncated with int() like upstream, so scores match it.
    """
    x, y, box_w, box_h = box_xywh
    # A degenerate detection (zero or negative size) would divide by zero: treat it as 1 px.
    box_w = max(float(box_w), 1.0)
    box_h = max(float(box_h), 1.0)
    scale = min((image_h - 1) / box_h, (image_w - 1) / box_w, scale)
    half_w = box_w * scale / 2
    half_h = box_h * scale / 2
    centre_x = x + box_w / 2
    centre_y = y + box_h / 2
    x1, x2 = _shift_inside(centre_x - half_w, centre_x + half_w, image_w - 1)
    y1, y2 = _shift_inside(centre_y - half_h, centre_y + half_h, image_h - 1)
    return int(x1), int(y1), int(x2), int(y2)


def _shift_inside(start: float, end: float, last: int) -> tuple[float, float]:
    """Move the span [start, end] to lie within [0, last], keeping its length (it is <= last)."""
    if start < 0:
        start, end = 0.0, end - start
    if end > last:
        start, end = start - (end - last), float(last)
    return start, end


def crop_for_liveness(image_bgr: np.ndarray, box_xywh: BoxXYWH, scale: float, size: int = INPUT_SIZE) -> np.ndarray:
    """The size x size BGR uint8 patch a MiniFASNet expects for the face at `box_xywh`."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 BGR image, got shape {image_bgr.shape}")
    image_h, image_w = image_bgr.shape[:2]
    x1, y1, x2, y2 = crop_window(image_w, image_h, box_xywh, scale)
    # Upstream slices [y1 : y2 + 1]: the end pixel is part of the window.
    patch = image_bgr[y1 : y2 + 1, x1 : x2 + 1]
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR)


class MiniFASNet:
    """One MiniFASNet ONNX model and the crop scale it was trained with."""

    def __init__(self, path: str, scale: float, threads: int | None = None) -> None:
        self.path = path
        self.scale = scale
        # The shipped exports are fixed at a batch of 1 and reject anything else: one face per Run.
        self._session, self.dynamic_batch = open_patch_classifier(
            path, threads, INPUT_SIZE, NUM_CLASSES, "MiniFASNet liveness"
        )
        self.input_shape: list = self._session.get_inputs()[0].shape

    def magnification(self, face: FaceDetection) -> float:
        """How many times the 80x80 input enlarges the face's pixels: the window is the box
        `scale` times on each axis, so its shorter side decides."""
        return INPUT_SIZE / (self.scale * max(min(face.width, face.height), 1e-6))

    def probabilities(self, image_bgr: np.ndarray, boxes_xywh: Sequence[BoxXYWH]) -> np.ndarray:
        """(len(boxes), 3) softmax over (print attack, real, replay attack) for each face box."""
        if not boxes_xywh:
            return np.zeros((0, NUM_CLASSES))
        # Upstream feeds raw 0..255 BGR values as float, CHW, without mean/std normalisation.
        batch = np.stack([crop_for_liveness(image_bgr, box, self.scale) for box in boxes_xywh])
        batch = batch.transpose(0, 3, 1, 2).astype(np.float32)
        return softmax(run_batched(self._session, batch))

    def close(self) -> None:
        self._session = None
