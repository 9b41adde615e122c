"""Whether a face can be judged live or spoof at all, decided from its box before any engine's
verdict counts: a face the texture models cannot read is INCONCLUSIVE with a reason, never "spoof".

The geometric gates read the MiniFASNetV2 window (the box enlarged 2.7x, resized to 80x80), the
context the engines' training crops had around the face, and the head pose the landmarks show;
with a quality model loaded, a last gate reads the face's image quality. Thresholds and the
photos they were calibrated on: bench/FINDINGS.md, "liveness gates".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

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

# Extreme head pose, read off the five landmarks in the frame where the eyes lie level (see
# `head_pose`): the engines were trained on near-frontal crops, and a head turned until its nose
# tip passes an eye (yaw ratio 1) shows the models cheek, ear and background rather than the skin
# texture and the print or screen edges they read; the far eye's landmark is then a guess too.
# Pitch: the nose tip above the eye line or below the mouth line. The real faces of the shared
# photos reach yaw 0.82 and pitch 0.50-0.64 (bench/FINDINGS.md, "liveness gates").
MAX_YAW = 1.0
PITCH_RANGE = (0.0, 1.0)

FACE_TOO_SMALL = Gate(
    "FACE_TOO_SMALL",
    f"face too small to judge liveness (shorter side under {MIN_FACE_PX} px): move closer or send a "
    "higher-resolution photo",
)
FACE_CROP_OUTSIDE_IMAGE = Gate(
    "FACE_CROP_OUTSIDE_IMAGE",
    "face fills the image: send the whole camera frame, not a face crop",
)

FACE_POSE_EXTREME = Gate(
    "FACE_POSE_EXTREME",
    "face turned too far from the camera to judge liveness: look into the camera",
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


def head_pose(landmarks: np.ndarray) -> tuple[float, float] | None:
    """(yaw, pitch) ratios of a face's five landmarks (engines.base.FaceDetection order), in the
    frame where the eyes lie level: yaw, the nose tip's offset from the eyes' midpoint along the
    eye line in half eye-distances (0 frontal, +-1 the nose in line with an eye); pitch, its
    offset across the eye line as a fraction of the way to the mouth's midpoint (about 0.55
    frontal; NaN with the mouth not below the eyes). None when both eyes sit on one point: no
    landmarks, only a box (the boxes of upstream's samples), which say nothing of pose."""
    left_eye, right_eye, nose, mouth_left, mouth_right = np.asarray(landmarks, dtype=np.float64)[:5]
    eye_line = right_eye - left_eye
    eye_distance = float(np.hypot(*eye_line))
    if eye_distance == 0.0:
        return None
    along = eye_line / eye_distance
    across = np.array([-along[1], along[0]])
    eyes_mid = (left_eye + right_eye) / 2
    mouth_drop = float(np.dot((mouth_left + mouth_right) / 2 - eyes_mid, across))
    yaw = float(np.dot(nose - eyes_mid, along)) / (eye_distance / 2)
    pitch = float(np.dot(nose - eyes_mid, across)) / mouth_drop if mouth_drop > 0 else math.nan
    return yaw, pitch


def pose_is_extreme(landmarks: np.ndarray) -> bool:
    pose = head_pose(landmarks)
    if pose is None:
        return False
    yaw, pitch = pose
    low, high = PITCH_RANGE
    # Comparisons with NaN are false: a mouth above the eyes counts as extreme.
    return not (abs(yaw) < MAX_YAW and low < pitch < high)


def gate(
    image_w: int,
    image_h: int,
    box_xywh: BoxXYWH,
    quality: float | None = None,
    landmarks: np.ndarray | None = None,
) -> Gate | None:
    """The first gate this face fails, or None when the engines' verdict can stand. `quality` is
    the face's LightQNet score when the model has the quality head, else None (no quality gate);
    `landmarks` its five points, else no pose gate."""
    if min(box_xywh[2], box_xywh[3]) < MIN_FACE_PX:
        return FACE_TOO_SMALL
    if window_inside(image_w, image_h, box_xywh) < MIN_WINDOW_INSIDE:
        return FACE_CROP_OUTSIDE_IMAGE
    if landmarks is not None and pose_is_extreme(landmarks):
        return FACE_POSE_EXTREME
    if quality is not None and quality < MIN_QUALITY:
        return FACE_LOW_QUALITY
    return None
