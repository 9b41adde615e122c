"""Face image quality (LightQNet) for FaceAnalyze and the liveness gate.

Not one of the host's four FaceAnalyze actions, so not an AttributeHead: a small class of its own,
built from the `quality_onnx` LoadModel option and exposed by the engine as `face_quality`.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from core.errors import ModelFileError

from .alignment import chip_magnification, similarity_chip
from .base import FaceDetection
from .options import LoadRequest
from .runtime import check_batch_dimension, create_session, run_batched

# ../shared/models/lightqnet/SOURCE.md (upstream KaenChan/lightqnet): left eye, right eye and the
# mean of the two mouth corners go onto these points / 100 of a 160 px chip, which is then
# resized to the 96 px input; NHWC BGR, (pixel - 128) / 128; output [N,1] quality in (0, 1).
LIGHTQNET_TEMPLATE = np.array([[34.19, 46.16], [65.65, 45.98], [50.12, 82.40]], dtype=np.float64) / 100.0
LIGHTQNET_ALIGN_SIZE = 160
LIGHTQNET_SIZE = 96
LIGHTQNET_MEAN = 128.0
LIGHTQNET_STD = 128.0


def quality_points(landmarks: np.ndarray) -> np.ndarray:
    """LightQNet's 3 points from FaceDetection's 5: both eyes, then the mouth corners' mean."""
    points = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    return np.stack([points[0], points[1], points[3:5].mean(axis=0)])


class QualityHead:
    """lightqnet-dm*.onnx: one quality score in (0, 1) per face, all faces in one batched run."""

    OPTION = "quality_onnx"

    def __init__(self, path: str, threads: int | None = None):
        self.path = path
        self.session = create_session(path, threads)
        what = f"{self.OPTION} {path}"
        shape = list(self.session.get_inputs()[0].shape)
        if len(shape) != 4 or tuple(shape[1:]) != (LIGHTQNET_SIZE, LIGHTQNET_SIZE, 3):
            raise ModelFileError(f"{what}: expected an input [N,{LIGHTQNET_SIZE},{LIGHTQNET_SIZE},3], got {shape}")
        check_batch_dimension(self.session, what)

    def blob(self, image: np.ndarray, faces: Sequence[FaceDetection]) -> np.ndarray:
        chips = [
            cv2.resize(
                similarity_chip(image, quality_points(f.landmarks), LIGHTQNET_TEMPLATE, LIGHTQNET_ALIGN_SIZE),
                (LIGHTQNET_SIZE, LIGHTQNET_SIZE),
            )
            for f in faces
        ]
        return np.ascontiguousarray((np.stack(chips).astype(np.float32) - LIGHTQNET_MEAN) / LIGHTQNET_STD)

    def magnification(self, face: FaceDetection) -> float:
        """Of the 96 px input: the 160 px chip is shrunk to it."""
        return chip_magnification(quality_points(face.landmarks), LIGHTQNET_TEMPLATE * LIGHTQNET_SIZE)

    def predict(self, image: np.ndarray, faces: Sequence[FaceDetection]) -> list[float]:
        if not faces:
            return []
        return [float(q) for q in run_batched(self.session, self.blob(image, faces)).reshape(len(faces))]

    def close(self) -> None:
        self.session = None


def build_quality_head(request: LoadRequest) -> QualityHead | None:
    """The quality head `quality_onnx` names, or None."""
    path = request.file(QualityHead.OPTION)
    return QualityHead(path, request.threads or None) if path else None
