"""Face recognizers: ArcFace-style 112x112 ONNX models through onnxruntime, SFace through OpenCV.

A recognizer turns one aligned face into an L2-normalised embedding. What differs between
models is the input normalisation, whether the flipped crop is added, and the cosine-distance
threshold at which two embeddings count as the same person: facts of each file, kept in
catalog/catalog.json and read here into a RecognizerProfile, picked by the file's sha256.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import onnxruntime as ort

import catalog
from catalog import ROLE_RECOGNIZER, ModelFile
from core.concurrency import run_side_by_side, serving_alone
from core.errors import ModelFileError, ModelOptionError

from .alignment import ARCFACE_SIZE, align_face, arcface_magnification
from .base import FaceDetection
from .runtime import check_batch_dimension, opencv_pool, run_batched


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
    # The OpenCV class that aligns and scales the crop itself (SFace), instead of mean/std here.
    runner: str | None = None


# catalog/catalog.json's `preprocess.runner` of a recognizer that OpenCV runs whole.
SFACE_RUNNER = "cv2.FaceRecognizerSF"


def catalog_profile(
    entry: ModelFile, name: str | None = None, threshold_source: str | None = None
) -> RecognizerProfile:
    """The profile a catalog recognizer entry describes (the catalog checks it is complete)."""
    preprocess, threshold = entry.preprocess, entry.threshold
    if entry.role != ROLE_RECOGNIZER or preprocess is None or threshold is None:
        raise ValueError(f"{entry.name} is not a recognizer entry of the catalog")
    return RecognizerProfile(
        name=name or os.path.splitext(entry.name)[0],
        mean=preprocess.mean or (0.0, 0.0, 0.0),
        std=preprocess.std or (1.0, 1.0, 1.0),
        flip=preprocess.flip,
        threshold=threshold,
        threshold_source=threshold_source or entry.threshold_source,
        runner=preprocess.runner,
    )


def recognizer_profile(file_name: str) -> RecognizerProfile:
    """The profile of the catalog's recognizer file `file_name`."""
    return catalog_profile(catalog.default().files[file_name])


# Every recognizer the catalog knows, by the sha256 of its bytes (pack members with the same
# bytes included): the same bytes always get the same treatment, whatever the file is called.
KNOWN_RECOGNIZERS: dict[str, RecognizerProfile] = {
    digest: catalog_profile(entry)
    for entry in catalog.default().files.values()
    if entry.role == ROLE_RECOGNIZER
    for digest in entry.accepted_sha256
}

# Named preprocessing for files the catalog does not know (LoadModel option recognizer_preprocess):
# each borrows the input normalisation and threshold of a catalog recognizer. "arcface" is
# insightface's ArcFaceONNX, whose published cut holds for every insightface ArcFace recognizer.
PRESET_SOURCES = {"arcface": "w600k_mbf.onnx", "imagenet": "MobileFaceNet.onnx"}


def _preset(name: str, file_name: str) -> RecognizerProfile:
    entry = catalog.default().files[file_name]
    return catalog_profile(entry, name=name, threshold_source=f"{entry.threshold_source} (that of {file_name})")


PREPROCESS_PRESETS = {name: _preset(name, file_name) for name, file_name in PRESET_SOURCES.items()}
UNKNOWN_ARCFACE_PROFILE = PREPROCESS_PRESETS["arcface"]
# For a file that is not catalogued but named like SFace.
SFACE_PROFILE = next(p for p in KNOWN_RECOGNIZERS.values() if p.runner == SFACE_RUNNER)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    # A NaN would survive normalising, and FaceVerify's distance clamp turns NaN into 0: a match.
    if not np.isfinite(vectors).all():
        raise ValueError("the recognizer's output is not finite (NaN or infinity): the model is broken")
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def is_arcface_session(session: ort.InferenceSession) -> bool:
    """True for a 112x112 RGB input with one embedding output (insightface ModelRouter's rule)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        return False
    shape = inputs[0].shape
    out = outputs[0].shape
    return (
        len(shape) == 4
        and shape[1] == 3
        and shape[2] == ARCFACE_SIZE
        and shape[3] == ARCFACE_SIZE
        and len(out) == 2
        and isinstance(out[1], int)
        and out[1] >= 64
    )


class ArcFaceRecognizer:
    """Any ArcFace-style recognizer: 5-point aligned 112x112 crop in, embedding out."""

    def __init__(self, session: ort.InferenceSession, profile: RecognizerProfile, flip_beside: bool = False):
        """`flip_beside`: the crop and the flipped crop each get a Run, the flipped one on a helper
        thread beside the crop's while the process serves a lone request (for a one-thread
        session that follows the load: onnx_direct.build_recognizer)."""
        if not is_arcface_session(session):
            raise ModelFileError("not a 112x112 face recognizer (expected input [N,3,112,112], output [N,D])")
        check_batch_dimension(session, "recognizer")
        self.session = session
        self.profile = profile
        self.embedding_dim = int(session.get_outputs()[0].shape[1])
        self._scale = (1.0 / np.asarray(profile.std, dtype=np.float32)).reshape(1, 3, 1, 1)
        self._mean = np.asarray(profile.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self._flip_helper = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="flipped-crop")
            if flip_beside and profile.flip
            else None
        )

    @property
    def runs_flip_beside(self) -> bool:
        return self._flip_helper is not None

    def close(self) -> None:
        if self._flip_helper is not None:
            self._flip_helper.shutdown(wait=True)
            self._flip_helper = None
        self.session = None

    def _blob(self, crops_bgr: list[np.ndarray]) -> np.ndarray:
        rgb = np.stack(crops_bgr)[..., ::-1].astype(np.float32)
        return (rgb.transpose(0, 3, 1, 2) - self._mean) * self._scale

    def magnification(self, face: FaceDetection) -> float:
        return arcface_magnification(face.landmarks)

    def embed(self, image: np.ndarray, face: FaceDetection) -> np.ndarray:
        crop = align_face(image, face.landmarks)
        crops = [crop, crop[:, ::-1]] if self.profile.flip else [crop]
        blob = self._blob(crops)
        session = self.session
        if self._flip_helper is None:
            raw = run_batched(session, blob)
        else:
            # A Run per crop on either path, so a lone request's embedding is the same bytes.
            helper = self._flip_helper if serving_alone() else None
            raw = np.concatenate(
                run_side_by_side(helper, lambda: run_batched(session, blob[:1]), lambda: run_batched(session, blob[1:]))
            )
        return l2_normalise(raw.sum(axis=0))


class SFaceRecognizer:
    """OpenCV Zoo SFace through cv2.FaceRecognizerSF, which does its own alignment and scaling.

    cv2 DNN nets are not safe to share between threads, so threads borrow instances from a pool.
    """

    embedding_dim = 128

    def __init__(self, path: str, profile: RecognizerProfile):
        self.path = path
        self.profile = profile
        self._pool = opencv_pool(lambda: cv2.FaceRecognizerSF.create(path, ""), f"SFace model {path}")

    def close(self) -> None:
        self._pool.close()

    def magnification(self, face: FaceDetection) -> float:
        # alignCrop warps onto the same 112x112 ArcFace template (OpenCV face_recognize.cpp).
        return arcface_magnification(face.landmarks)

    def embed(self, image: np.ndarray, face: FaceDetection) -> np.ndarray:
        # FaceRecognizerSF.alignCrop expects a YuNet row: x, y, w, h, 10 landmark coords, score.
        row = np.concatenate(
            [np.asarray(face.xywh(), dtype=np.float32), face.landmarks.reshape(-1), [face.score]]
        ).astype(np.float32)
        with self._pool.borrow() as recognizer:
            aligned = recognizer.alignCrop(image, row)
            feature = recognizer.feature(aligned)
        return l2_normalise(feature.reshape(-1))


def profile_for(sha256: str, preprocess: str | None) -> RecognizerProfile:
    """The profile of a known file, else the named preset, else insightface's ArcFace default."""
    if preprocess:
        if preprocess not in PREPROCESS_PRESETS:
            raise ModelOptionError(
                f"recognizer_preprocess must be one of {sorted(PREPROCESS_PRESETS)}, got '{preprocess}'"
            )
        return PREPROCESS_PRESETS[preprocess]
    return KNOWN_RECOGNIZERS.get(sha256, UNKNOWN_ARCFACE_PROFILE)
