"""The engine interface: what every face engine can do, and the typed results it returns.

Engines know nothing of gRPC. They take decoded 8-bit BGR images (numpy HxWx3) and return
dataclasses; the service layer turns those into wire messages.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# FaceAnalyze `actions`, as the host documents them: "a subset of age, gender, emotion, race;
# empty = all supported". A model computes those it has heads for and leaves the rest empty.
ACTION_AGE = "age"
ACTION_GENDER = "gender"
ACTION_EMOTION = "emotion"
ACTION_RACE = "race"
HOST_ACTIONS = (ACTION_AGE, ACTION_GENDER, ACTION_EMOTION, ACTION_RACE)


@dataclass(frozen=True)
class FaceDetection:
    """One face found in an image.

    `box` is (x1, y1, x2, y2) in pixels of the image the detector was given. `landmarks` is a
    (5, 2) float32 array in the same coordinates, in the order every 5-point aligner here expects:
    the eye on the image's left, the eye on the image's right, nose tip, mouth corner on the
    image's left, mouth corner on the image's right (SCRFD / YuNet / RetinaFace order).
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray = field(repr=False)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def xywh(self) -> tuple[float, float, float, float]:
        """Top-left corner plus size, the layout of the wire's FacialArea and Detection."""
        return (self.box[0], self.box[1], self.width, self.height)

    def scaled(self, factor: float) -> FaceDetection:
        """The same face in an image `factor` times the size (box and landmarks scaled)."""
        if factor == 1.0:
            return self
        x1, y1, x2, y2 = self.box
        landmarks = (self.landmarks * np.float32(factor)).astype(np.float32)
        return FaceDetection((x1 * factor, y1 * factor, x2 * factor, y2 * factor), self.score, landmarks)


@dataclass(frozen=True)
class FaceAttributes:
    """Per-face attributes; a field is None when it was not asked for or the model lacks it."""

    age: float | None = None
    # P(man). The head's own probability where it gives one; 1.0/0.0 for a hard label.
    male_probability: float | None = None
    # P(expression) keyed by deepface's names (angry disgust fear happy sad surprise neutral),
    # the shape the host's face API follows.
    emotion: Mapping[str, float] | None = None


class FaceEngine(abc.ABC):
    """A loaded set of models that can find faces, embed them and, optionally, describe them.

    Implementations must be safe to call from many threads at once.
    """

    #: short model description used in responses (e.g. "buffalo_sc" or "yunet+MobileFaceNet").
    name: str
    #: cosine-distance cut-off for FaceVerify when the caller gives none (calibrated per recognizer).
    default_threshold: float
    #: length of the embedding vectors this engine returns.
    embedding_dim: int
    #: the model files the engine was built from, by role ("detector", "recognizer", "age", ...).
    files: Mapping[str, str] = {}

    @abc.abstractmethod
    def detect(self, image: np.ndarray, threshold: float | None = None) -> list[FaceDetection]:
        """All faces in `image`, best score first. `threshold` overrides the detector's score cut."""

    @abc.abstractmethod
    def embed(self, image: np.ndarray, face: FaceDetection) -> np.ndarray:
        """L2-normalised float32 embedding of `face` in `image`."""

    @property
    def detection_size(self) -> tuple[int, int] | None:
        """The (w, h) box the detector fits every image into (it never needs more pixels than
        that); None when it looks at the image at whatever size it comes."""
        return None

    def magnification(
        self, face: FaceDetection, embed: bool = False, actions: frozenset[str] = frozenset(), quality: bool = False
    ) -> float:
        """How many times the models a request runs on `face` enlarge the image's pixels: the
        recognizer with `embed`, the heads of `actions`, the quality head with `quality`. Above
        1, a model's input interpolates pixels the image does not have; 0 when none runs. An
        engine that cannot tell says infinity (always the full-size image)."""
        return math.inf

    @property
    def supported_actions(self) -> frozenset[str]:
        """Which FaceAnalyze actions this engine can compute."""
        return frozenset()

    def analyze(
        self, image: np.ndarray, faces: Sequence[FaceDetection], actions: frozenset[str]
    ) -> list[FaceAttributes]:
        """Attributes for every face in one batched pass per head."""
        return [FaceAttributes() for _ in faces]

    def face_quality(self, image: np.ndarray, faces: Sequence[FaceDetection]) -> list[float] | None:
        """Each face's image quality in (0, 1), higher is better; None without a quality model."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Drop every model session and instance pool so their memory can return; the engine is
        unusable afterwards. FaceService calls it once no request holds the engine."""
