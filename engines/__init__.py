"""Pluggable face engines behind one interface (engines.base.FaceEngine)."""

from .base import (
    ACTION_AGE,
    ACTION_EMOTION,
    ACTION_GENDER,
    ACTION_RACE,
    HOST_ACTIONS,
    FaceAttributes,
    FaceDetection,
    FaceEngine,
)
from .options import ENGINE_ONNX_DIRECT, LoadRequest, parse_load_request


def build_engine(request: LoadRequest) -> FaceEngine:
    """Build the engine `request` names, completely, or raise a FaceServiceError."""
    if request.get("engine") == ENGINE_ONNX_DIRECT:
        from .onnx_direct import build_onnx_direct_engine

        return build_onnx_direct_engine(request)
    from .insightface_pack import build_insightface_engine

    return build_insightface_engine(request)


__all__ = [
    "ACTION_AGE",
    "ACTION_EMOTION",
    "ACTION_GENDER",
    "ACTION_RACE",
    "HOST_ACTIONS",
    "FaceAttributes",
    "FaceDetection",
    "FaceEngine",
    "LoadRequest",
    "build_engine",
    "parse_load_request",
]
