"""Whether a face can be judged live or spoof at all, decided from its box before any engine's
verdict counts: a face the texture models cannot read is INCONCLUSIVE with a reason, never "spoof".

The geometric gates read only the MiniFASNetV2 window (the box enlarged 2.7x, resized to
80x80), the context the engines' training crops had around the face; with a quality model
loaded, a third gate reads the face's image quality. Thresholds and the
photos they were calibrated on: bench/FINDINGS.md, "liveness gates".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from .minifasnet import INPUT_SIZE, V2_CROP_SCALE, BoxXYWH


class LivenessStatus(StrEnum):
    """The three outcomes of liveness for one face; the wire carries the value."""

    LIVE = "LIVE"
    SPOOF = "SPOOF"
    INCONCLUSIVE = "INCONCLUSIVE"


@dataclass(frozen=True)
class Gate:
    """Why a face is INCONCLUSIVE: a machine-readable `reason` and a sentence for a person."""

    reason: str
    message: str


# The shorter box side under which MiniFASNetV2's 80 px input is an enlargement of the photo:
# its window is 2.7x the box, so a box of 80 / 2.7 = 30 px reaches the input at 1:1; smaller,
# the print grain and screen moire the engines read are interpolated, not seen.
MIN_FACE_PX = math.ceil(INPUT_SIZE / V2_CROP_SCALE)
# The least fraction of the V2 window that must lie inside the photo: a tight face crop
# (antispoof-dev siwmv2_*) keeps about a fifth of it, so the border of a print or a screen and
# the scene around the head, the engines' cues, are not in the photo.
MIN_WINDOW_INSIDE = 0.30

# The LightQNet quality (engines/quality.py, loaded with quality_onnx) under which a face is too
# degraded for a texture model: every real face of the shared photos scores 0.34 or more, the same
# faces blurred (Gaussian sigma a quarter of the eye distance) 0.05 or less (bench/FINDINGS.md,
# "face quality gate").
MIN_QUALITY = 0.20

FACE_TOO_SMALL = Gate(
    "FACE_TOO_SMALL",
    f"face too small to judge liveness (shorter side under {MIN_FACE_PX} px): move closer or send a "
    "higher-resolution photo",
)
FACE_CROP_OUTSIDE_IMAGE = Gate(
    "FACE_CROP_OUTSIDE_IMAGE",
    "face fills the image: send the whole camera frame, not a face crop",
)

FACE_LOW_QUALITY = Gate(
    "FACE_LOW_QUALITY",
    f"face too blurred, dark or noisy to judge liveness (quality under {MIN_QUALITY:g}): hold the camera "
    "still, light the face and send a sharp photo",
)


def window_inside(image_w: int, image_h: int, box_xywh: BoxXYWH, scale: float = V2_CROP_SCALE) -> float:
    """Fraction of the box enlarged `scale` times around its centre that lies inside the image."""
    x, y, box_w, box_h = box_xywh
    box_w, box_h = max(float(box_w), 1.0), max(float(box_h), 1.0)
    centre_x, centre_y = x + box_w / 2, y + box_h / 2
    half_w, half_h = box_w * scale / 2, box_h * scale / 2
    inside_w = max(0.0, min(float(image_w), centre_x + half_w) - max(0.0, centre_x - half_w))
    inside_h = max(0.0, min(float(image_h), centre_y + half_h) - max(0.0, centre_y - half_h))
    return inside_w * inside_h / (4 * half_w * half_h)


def gate(image_w: int, image_h: int, box_xywh: BoxXYWH, quality: float | None = None) -> Gate | None:
    """The first gate this face fails, or None when the engines' verdict can stand. `quality` is
    the face's LightQNet score when the model has the quality head, else None (no quality gate)."""
    if min(box_xywh[2], box_xywh[3]) < MIN_FACE_PX:
        return FACE_TOO_SMALL
    if window_inside(image_w, image_h, box_xywh) < MIN_WINDOW_INSIDE:
        return FACE_CROP_OUTSIDE_IMAGE
    if quality is not None and quality < MIN_QUALITY:
        return FACE_LOW_QUALITY
    return None
