"""Face recognizers: ArcFace-style 112x112 ONNX models through onnxruntime, SFace through OpenCV.

A recognizer turns one aligned face into an L2-normalised embedding. What differs between
models is the input normalisation, whether the flipped crop is added, and the cosine-distance
threshold at which two embeddings count as the same person; those live in RecognizerProfile,
picked by the file's sha256 (the same bytes always get the same treatment, whatever the name).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
import onnxruntime as ort

from core.concurrency import InstancePool, usable_cpus
from core.errors import ModelFileError, ModelOptionError

from .alignment import ARCFACE_SIZE, align_face
from .base import FaceDetection
from .runtime import check_batch_dimension, run_batched


@dataclass(frozen=True)
class RecognizerProfile:
    """How to feed one recognizer and where its default threshold comes from."""

    name: str
    # Per-channel RGB mean and std applied to 0-255 pixels: (x - mean) / std.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Sum the embeddings of the crop and its mirror image before normalising (upstream eval does).
    flip: bool
    # Cosine-distance cut-off: distance < threshold means the same person. See README.
    threshold: float
    threshold_source: str


# insightface ArcFaceONNX: (x - 127.5) / 127.5 on RGB, no flip at inference.
ARCFACE_PROFILE_BASE = dict(mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), flip=False)

# insightface's published operating point for w600k_r50 on MR-ALL: similarity 0.4078 at FAR 1e-6
# (../shared/docs/MODELS.md). It is the cut for every insightface ArcFace pack recognizer.
INSIGHTFACE_FAR_1E6_DISTANCE = round(1 - 0.4078, 4)
INSIGHTFACE_THRESHOLD_SOURCE = "insightface w600k_r50 MR-ALL operating point, similarity 0.4078 at FAR 1e-6"

MOBILEFACENET_SHA256 = "b7120c095d60094f28a4a54ba6a8bf51b297a6273fb40ef6350dfec1f63d9507"
W600K_MBF_SHA256 = "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f"

KNOWN_RECOGNIZERS: dict[str, RecognizerProfile] = {
    # w600k_mbf (buffalo_s / buffalo_sc), ../shared/models/insightface-w600k-mbf/SOURCE.md
    W600K_MBF_SHA256: RecognizerProfile(
        name="w600k_mbf", **ARCFACE_PROFILE_BASE, threshold=INSIGHTFACE_FAR_1E6_DISTANCE,
        threshold_source=INSIGHTFACE_THRESHOLD_SOURCE),
    # foamliu MobileFaceNet, ../shared/models/mobilefacenet-foamliu/SOURCE.md: x/255 then the
    # ImageNet mean/std, flipped crop added (upstream lfw_eval.py). No published operating point:
    # the threshold is the midpoint of the gap between same- and different-person distances on
    # the calibration photos, the lower of the YuNet and SCRFD runs (bench/calibrate_thresholds.py).
    MOBILEFACENET_SHA256: RecognizerProfile(
        name="MobileFaceNet", mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
        flip=True, threshold=0.57,
        threshold_source="calibrated on face-recognition-examples singles (bench/calibrate_thresholds.py)"),
}

UNKNOWN_ARCFACE_PROFILE = RecognizerProfile(
    name="arcface", **ARCFACE_PROFILE_BASE, threshold=INSIGHTFACE_FAR_1E6_DISTANCE,
    threshold_source=INSIGHTFACE_THRESHOLD_SOURCE)

SFACE_SHA256 = "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79"
# OpenCV's FaceRecognizerSF rule: cosine similarity >= 0.363 is the same person.
SFACE_PROFILE = RecognizerProfile(
    name="SFace", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), flip=False,
    threshold=round(1 - 0.363, 4), threshold_source="OpenCV SFace rule (similarity 0.363)")

# Named preprocessing for files the table does not know (LoadModel option recognizer_preprocess).
PREPROCESS_PRESETS = {
    "arcface": UNKNOWN_ARCFACE_PROFILE,
    "imagenet": RecognizerProfile(
        name="imagenet", mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), flip=True,
        threshold=KNOWN_RECOGNIZERS[MOBILEFACENET_SHA256].threshold,
        threshold_source="MobileFaceNet calibration"),
}


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def is_arcface_session(session: ort.InferenceSession) -> bool:
    """True for a 112x112 RGB input with one embedding output (insightface ModelRouter's rule)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        return False
    shape = inputs[0].shape
    out = outputs[0].shape
    return (len(shape) == 4 and shape[1] == 3 and shape[2] == ARCFACE_SIZE and shape[3] == ARCFACE_SIZE
            and len(out) == 2 and isinstance(out[1], int) and out[1] >= 64)


class ArcFaceRecognizer:
    """Any ArcFace-style recognizer: 5-point aligned 112x112 crop in, embedding out."""

    def __init__(self, session: ort.InferenceSession, profile: RecognizerProfile):
        if not is_arcface_session(session):
            raise ModelFileError("not a 112x112 face recognizer (expected input [N,3,112,112], output [N,D])")
        check_batch_dimension(session, "recognizer")
        self.session = session
        self.profile = profile
        self.embedding_dim = int(session.get_outputs()[0].shape[1])
        self._scale = (1.0 / np.asarray(profile.std, dtype=np.float32)).reshape(1, 3, 1, 1)
        self._mean = np.asarray(profile.mean, dtype=np.float32).reshape(1, 3, 1, 1)

    def close(self) -> None:
        self.session = None

    def _blob(self, crops_bgr: list[np.ndarray]) -> np.ndarray:
        rgb = np.stack(crops_bgr)[..., ::-1].astype(np.float32)
        return (rgb.transpose(0, 3, 1, 2) - self._mean) * self._scale

    def embed(self, image: np.ndarray, face: FaceDetection) -> np.ndarray:
        crop = align_face(image, face.landmarks)
        crops = [crop, crop[:, ::-1]] if self.profile.flip else [crop]
        raw = run_batched(self.session, self._blob(crops))
        return l2_normalise(raw.sum(axis=0))


class SFaceRecognizer:
    """OpenCV Zoo SFace through cv2.FaceRecognizerSF, which does its own alignment and scaling.

    cv2 DNN nets are not safe to share between threads, so threads borrow instances from a pool.
    """

    profile = SFACE_PROFILE
    embedding_dim = 128

    def __init__(self, path: str):
        self.path = path
        self._pool = InstancePool(self._create, usable_cpus())

    def close(self) -> None:
        self._pool.close()

    def _create(self):
        try:
            return cv2.FaceRecognizerSF.create(self.path, "")
        except cv2.error as exc:
            raise ModelFileError(f"cannot load SFace model {self.path}") from exc

    def embed(self, image: np.ndarray, face: FaceDetection) -> np.ndarray:
        # FaceRecognizerSF.alignCrop expects a YuNet row: x, y, w, h, 10 landmark coords, score.
        row = np.concatenate([np.asarray(face.xywh(), dtype=np.float32),
                              face.landmarks.reshape(-1), [face.score]]).astype(np.float32)
        with self._pool.borrow() as recognizer:
            aligned = recognizer.alignCrop(image, row)
            feature = recognizer.feature(aligned)
        return l2_normalise(feature.reshape(-1))


def profile_for(sha256: str, preprocess: Optional[str]) -> RecognizerProfile:
    """The profile of a known file, else the named preset, else insightface's ArcFace default."""
    if preprocess:
        if preprocess not in PREPROCESS_PRESETS:
            raise ModelOptionError(f"recognizer_preprocess must be one of {sorted(PREPROCESS_PRESETS)},"
                                   f" got '{preprocess}'")
        return PREPROCESS_PRESETS[preprocess]
    return KNOWN_RECOGNIZERS.get(sha256, UNKNOWN_ARCFACE_PROFILE)
