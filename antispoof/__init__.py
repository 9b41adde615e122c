"""Passive (single-image) face liveness, independent of the face engine that found the faces."""

from .celeba_minifas import CELEBA_CROP_SCALE, CELEBA_FILE, CELEBA_OPTION, CelebAMiniFAS, crop_reflected
from .fusion import (
    DEFAULT_THRESHOLD,
    ENGINE_CELEBA,
    ENGINE_MINIFASNET,
    LIVENESS_FILES,
    LIVENESS_MISSING,
    LIVENESS_OPTIONS,
    LivenessEnsemble,
    LivenessResult,
    build_liveness,
)
from .minifasnet import (
    INPUT_SIZE,
    MINIFASNET_FILES,
    MINIFASNET_OPTIONS,
    REAL_CLASS,
    V1SE_CROP_SCALE,
    V2_CROP_SCALE,
    MiniFASNet,
    crop_for_liveness,
    crop_window,
)

__all__ = [
    "CELEBA_CROP_SCALE",
    "CELEBA_FILE",
    "CELEBA_OPTION",
    "DEFAULT_THRESHOLD",
    "ENGINE_CELEBA",
    "ENGINE_MINIFASNET",
    "INPUT_SIZE",
    "LIVENESS_FILES",
    "LIVENESS_MISSING",
    "LIVENESS_OPTIONS",
    "MINIFASNET_FILES",
    "MINIFASNET_OPTIONS",
    "REAL_CLASS",
    "V1SE_CROP_SCALE",
    "V2_CROP_SCALE",
    "CelebAMiniFAS",
    "LivenessEnsemble",
    "LivenessResult",
    "MiniFASNet",
    "build_liveness",
    "crop_for_liveness",
    "crop_reflected",
    "crop_window",
]
