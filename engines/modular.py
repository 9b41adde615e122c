"""The one FaceEngine implementation: a detector, a recognizer and optional attribute heads.

The insightface and onnx_direct engines differ only in how they find and build these parts
(engines/insightface_pack.py, engines/onnx_direct.py); running them is the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from .base import FaceAttributes, FaceDetection, FaceEngine
from .quality import QualityHead
from .recognition import RecognizerProfile


class Detector(Protocol):
    input_size: tuple[int, int]  # the (w, h) box every image is fitted into

    def detect(self, image: np.ndarray, threshold: float | None = None) -> list[FaceDetection]: ...

    def close(self) -> None: ...


class Recognizer(Protocol):
    profile: RecognizerProfile
    embedding_dim: int

    def embed(self, image: np.ndarray, face: FaceDetection) -> np.ndarray: ...

    def magnification(self, face: FaceDetection) -> float: ...

    def close(self) -> None: ...


class AttributeHead(Protocol):
    actions: frozenset[str]
    path: str  # the model file the head runs, for LoadModel's message and Status

    def predict(
        self, image: np.ndarray, faces: Sequence[FaceDetection], actions: frozenset[str]
    ) -> list[FaceAttributes]: ...

    def magnification(self, face: FaceDetection) -> float: ...

    def close(self) -> None: ...


class ModularFaceEngine(FaceEngine):
    def __init__(
        self,
        name: str,
        detector: Detector,
        recognizer: Recognizer,
        attribute_heads: Sequence[AttributeHead] = (),
        verify_threshold: float | None = None,
        files: Mapping[str, str] = {},
        quality: QualityHead | None = None,
    ):
        """`files`: the detector's and recognizer's model files by role; the heads add their own."""
        self.name = name
        self.detector = detector
        self.recognizer = recognizer
        self.attribute_heads = tuple(attribute_heads)
        self.embedding_dim = recognizer.embedding_dim
        self.default_threshold = recognizer.profile.threshold if verify_threshold is None else verify_threshold
        self.files = {**files, **{"+".join(sorted(h.actions)): h.path for h in self.attribute_heads}}
        self.quality = quality
        if quality is not None:
            self.files["quality"] = quality.path

    def detect(self, image: np.ndarray, threshold: float | None = None) -> list[FaceDetection]:
        return self.detector.detect(image, threshold)

    def embed(self, image: np.ndarray, face: FaceDetection) -> np.ndarray:
        return self.recognizer.embed(image, face)

    @property
    def detection_size(self) -> tuple[int, int] | None:
        return self.detector.input_size

    def magnification(
        self, face: FaceDetection, embed: bool = False, actions: frozenset[str] = frozenset(), quality: bool = False
    ) -> float:
        parts = [head.magnification(face) for head in self.attribute_heads if actions & head.actions]
        if embed:
            parts.append(self.recognizer.magnification(face))
        if quality and self.quality is not None:
            parts.append(self.quality.magnification(face))
        return max(parts, default=0.0)

    @property
    def supported_actions(self) -> frozenset[str]:
        return frozenset().union(*(h.actions for h in self.attribute_heads))

    def analyze(
        self, image: np.ndarray, faces: Sequence[FaceDetection], actions: frozenset[str]
    ) -> list[FaceAttributes]:
        merged = [dict(age=None, male_probability=None, emotion=None) for _ in faces]
        for head in self.attribute_heads:
            wanted = actions & head.actions
            if not wanted or not faces:
                continue
            for slot, attrs in zip(merged, head.predict(image, faces, wanted)):
                for key in slot:
                    value = getattr(attrs, key)
                    if value is not None and slot[key] is None:
                        slot[key] = value
        return [FaceAttributes(**slot) for slot in merged]

    def face_quality(self, image: np.ndarray, faces: Sequence[FaceDetection]) -> list[float] | None:
        return None if self.quality is None else self.quality.predict(image, faces)

    def close(self) -> None:
        if self.quality is not None:
            self.quality.close()
        self.detector.close()
        self.recognizer.close()
        for head in self.attribute_heads:
            head.close()
