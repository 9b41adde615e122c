"""Passive (single-image) face liveness, independent of the face engine that found the faces."""

from .minifasnet import (
    DEFAULT_THRESHOLD,
    INPUT_SIZE,
    LIVENESS_FILES,
    LIVENESS_MISSING,
    LIVENESS_OPTIONS,
    REAL_CLASS,
    V1SE_CROP_SCALE,
    V2_CROP_SCALE,
    LivenessEnsemble,
    LivenessResult,
    MiniFASNet,
    build_liveness,
    crop_for_liveness,
    crop_window,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "INPUT_SIZE",
    "LIVENESS_FILES",
    "LIVENESS_MISSING",
    "LIVENESS_OPTIONS",
    "REAL_CLASS",
    "V1SE_CROP_SCALE",
    "V2_CROP_SCALE",
    "LivenessEnsemble",
    "LivenessResult",
    "MiniFASNet",
    "build_liveness",
    "crop_for_liveness",
    "crop_window",
]
