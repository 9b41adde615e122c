"""Age, gender and emotion heads for FaceAnalyze (the engines.modular.AttributeHead protocol).

Three families, each head owning its onnxruntime session and its preprocessing constants:

* `CydralGenderHead` / `CydralAgeHead`: the CC0 Cydral networks from davisking/dlib-models as
  ONNX (gender-v1.onnx, age-v1.onnx; ../shared/models/age-gender-cydral/SOURCE.md). They work with
  any engine: the chip is built from the detector's 5 landmarks, no dlib needed.
* `InsightFaceGenderAge`: insightface's genderage.onnx, when a model pack ships one (insightface
  `model_zoo/attribute.py` Attribute), for boxes only.
* `ExpressionHead`: OpenCV Zoo's facial expression recognition network (Apache-2.0;
  ../shared/models/fer-mobilefacenet/SOURCE.md), on the ArcFace chip the recognizers use.

Every head runs all faces of an image through its model in ONE batched session.run (a model
whose batch dimension is fixed is run face by face instead), and computes nothing for an action
it was not asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from core.errors import ModelFileError

from .alignment import ARCFACE_SIZE, align_face, arcface_magnification, chip_magnification, similarity_chip
from .base import ACTION_AGE, ACTION_EMOTION, ACTION_GENDER, FaceAttributes, FaceDetection
from .options import LoadRequest
from .runtime import check_batch_dimension, create_session, run_batched, softmax

# --- Cydral (dlib-models) age and gender ----------------------------------------------------
# Where the 5 landmarks (FaceDetection order: eye on the image's left, eye on the image's right,
# nose tip, mouth corner image-left, mouth corner image-right -- the order the template was fitted
# in, YuNet face[4:14]) sit inside dlib's get_face_chip(shape5, size, padding=0.2), in units of the
# chip side. Source: ../shared/models/age-gender-cydral/yunet_chip_template.json (derived there from
# 29 faces of ../shared/data mapped through dlib's own chip transform; not upstream).
CYDRAL_CHIP_TEMPLATE = np.array(
    [[0.2933, 0.2788], [0.6792, 0.2763], [0.4736, 0.5129], [0.3247, 0.6905], [0.6621, 0.6893]], dtype=np.float64
)
# dlib downsamples chips with a pyramid; warping straight to 32 px with bilinear aliases. So warp
# at 4x the size, then INTER_AREA down (SOURCE.md, "dlib-free alternative").
CYDRAL_OVERSAMPLE = 4
# manifest.json models.{age,gender}.input: RGB, (byte - channel mean) / 256.
CYDRAL_RGB_MEAN = np.array([122.781998, 117.000999, 104.297997], dtype=np.float32)
CYDRAL_SCALE = 1.0 / 256.0
CYDRAL_GENDER_SIZE = 32  # gender-v1.onnx input [N,3,32,32]; output [N,2] = P(female), P(male)
CYDRAL_AGE_SIZE = 64  # age-v1.onnx input [N,3,64,64]; output [N,81] = P(age class 0..80)
# manifest.json models.age.age_weights: age = sum_i p_i * w_i with w_0 = 0.25, w_i = i. Kept as a
# float (upstream rounds it to whole years).
CYDRAL_AGE_WEIGHTS = np.concatenate([[0.25], np.arange(1, 81)]).astype(np.float64)

# --- insightface genderage.onnx ----------------------------------------------------------------
# insightface model_zoo/attribute.py: the crop is centred on the box and scaled so that
# max(w, h) * 1.5 fills the 96 px input; blobFromImage(swapRB=True, mean 0, std 1) because the
# genderage graph normalises itself (it has the `_minus`/`_mul` nodes insightface looks for;
# SOURCE.md, last section). Output [N,3]: 2 gender logits (argmax 1 = male), age / 100.
GENDERAGE_SIZE = 96
GENDERAGE_BOX_SCALE = 1.5
GENDERAGE_INPUT_MEAN = 0.0
GENDERAGE_INPUT_STD = 1.0

# --- OpenCV Zoo facial expression recognition --------------------------------------------------
# ../shared/models/fer-mobilefacenet/SOURCE.md (opencv_zoo models/facial_expression_recognition):
# the 5-point ArcFace 112x112 chip, RGB, (x / 255 - 0.5) / 0.5, NCHW; output [N,7] raw scores.
FER_INPUT_MEAN = 0.5
FER_INPUT_STD = 0.5
# The upstream class order (0 angry, 1 disgust, 2 fearful, 3 happy, 4 neutral, 5 sad,
# 6 surprised), each named with deepface's key, since the host's face API follows deepface.
FER_EMOTIONS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")


def box_chip_scale(box: Sequence[float], size: int, box_scale: float) -> float:
    """How many times box_chip enlarges the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return size / (max(x2 - x1, y2 - y1, 1.0) * box_scale)


def box_chip(image: np.ndarray, box: Sequence[float], size: int, box_scale: float) -> np.ndarray:
    """insightface face_align.transform(img, centre of box, size, size / (max(w,h) * box_scale), 0)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    scale = size / (max(x2 - x1, y2 - y1) * box_scale)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    matrix = np.array([[scale, 0.0, size / 2.0 - cx * scale], [0.0, scale, size / 2.0 - cy * scale]], dtype=np.float64)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


class _OnnxHead:
    """A session with one image input, and the one batched run every head shares: nothing runs
    unless some face is asked for an action in `actions`; then one output row per face becomes
    that face's attributes."""

    actions: frozenset[str]

    def __init__(self, session, what: str, size: int | None = None):
        self.session = session
        model_input = session.get_inputs()[0]
        shape = list(model_input.shape)
        if len(shape) != 4:
            raise ModelFileError(f"{what}: expected an image input [N,3,H,W], got {shape}")
        if size is not None and tuple(shape[2:]) != (size, size):
            raise ModelFileError(f"{what}: expected a {size}x{size} input, the model takes {shape[2:]}")
        check_batch_dimension(session, what)

    def run(self, blob: np.ndarray) -> np.ndarray:
        """Model output for a [N,3,H,W] blob: one session.run, or one per face if the batch is fixed."""
        return run_batched(self.session, blob)

    def predict(
        self, image: np.ndarray, faces: Sequence[FaceDetection], actions: frozenset[str]
    ) -> list[FaceAttributes]:
        wanted = actions & self.actions
        if not wanted or not faces:
            return [FaceAttributes() for _ in faces]
        outputs = self.run(self.blob(image, faces)).reshape(len(faces), -1)
        return [self.attributes_of(row, wanted) for row in outputs]

    def blob(self, image: np.ndarray, faces: Sequence[FaceDetection]) -> np.ndarray:
        """The [N,3,H,W] input for `faces` of `image`."""
        raise NotImplementedError

    def magnification(self, face: FaceDetection) -> float:
        """How many times this head's input enlarges the image's pixels of `face`."""
        raise NotImplementedError

    def attributes_of(self, row: np.ndarray, wanted: frozenset[str]) -> FaceAttributes:
        """The attributes (those `wanted` of this head's) one face's output row gives."""
        raise NotImplementedError

    def close(self) -> None:
        self.session = None


class _CydralHead(_OnnxHead):
    SIZE: int
    OPTION: str

    def __init__(self, path: str, threads: int | None = None):
        super().__init__(create_session(path, threads), f"{self.OPTION} {path}", self.SIZE)
        self.path = path

    def magnification(self, face: FaceDetection) -> float:
        # Of the SIZE px input: the CYDRAL_OVERSAMPLE warp only anti-aliases its shrinking.
        return chip_magnification(face.landmarks, CYDRAL_CHIP_TEMPLATE * self.SIZE)

    def blob(self, image: np.ndarray, faces: Sequence[FaceDetection]) -> np.ndarray:
        chips = np.stack(
            [similarity_chip(image, f.landmarks, CYDRAL_CHIP_TEMPLATE, self.SIZE, CYDRAL_OVERSAMPLE) for f in faces]
        )
        rgb = chips[..., ::-1].astype(np.float32)
        return np.ascontiguousarray(((rgb - CYDRAL_RGB_MEAN) * CYDRAL_SCALE).transpose(0, 3, 1, 2))


class CydralGenderHead(_CydralHead):
    """gender-v1.onnx: male_probability = the model's own P(male) (softmax is in the graph)."""

    SIZE = CYDRAL_GENDER_SIZE
    OPTION = "gender_onnx"
    actions = frozenset({ACTION_GENDER})

    def attributes_of(self, row: np.ndarray, wanted: frozenset[str]) -> FaceAttributes:
        return FaceAttributes(male_probability=float(row[1]))


class CydralAgeHead(_CydralHead):
    """age-v1.onnx: age = expectation over the 81 classes (w_0 = 0.25), in years."""

    SIZE = CYDRAL_AGE_SIZE
    OPTION = "age_onnx"
    actions = frozenset({ACTION_AGE})

    def attributes_of(self, row: np.ndarray, wanted: frozenset[str]) -> FaceAttributes:
        return FaceAttributes(age=float(row.astype(np.float64) @ CYDRAL_AGE_WEIGHTS))


def male_probability_from_pair(pair: np.ndarray) -> float:
    """P(male) from genderage's two gender outputs.

    insightface itself only takes argmax. The outputs are the pre-softmax scores of a classifier
    trained with softmax cross-entropy, so their softmax is the model's own probability; it keeps
    the argmax (>= 0.5 exactly when insightface says male). Should an export already carry the
    softmax (both in [0, 1], summing to 1) the pair is used as it is.
    """
    pair = np.asarray(pair, dtype=np.float64)
    if np.all(pair >= 0.0) and np.all(pair <= 1.0) and abs(pair.sum() - 1.0) < 1e-4:
        return float(pair[1])
    return float(softmax(pair)[1])


class InsightFaceGenderAge(_OnnxHead):
    """insightface genderage.onnx (96x96 box crop). `actions` may be narrowed to leave some to
    another head (e.g. the explicit age_onnx/gender_onnx options)."""

    def __init__(
        self,
        session,
        actions: frozenset[str] = frozenset({ACTION_AGE, ACTION_GENDER}),
        input_mean: float = GENDERAGE_INPUT_MEAN,
        input_std: float = GENDERAGE_INPUT_STD,
        path: str = "genderage.onnx",
    ):
        super().__init__(session, "genderage")
        self.path = path
        shape = session.get_inputs()[0].shape
        self.size = shape[2] if isinstance(shape[2], int) else GENDERAGE_SIZE
        self.actions = frozenset(actions) & {ACTION_AGE, ACTION_GENDER}
        self.input_mean = input_mean
        self.input_std = input_std

    def magnification(self, face: FaceDetection) -> float:
        return box_chip_scale(face.box, self.size, GENDERAGE_BOX_SCALE)

    def blob(self, image: np.ndarray, faces: Sequence[FaceDetection]) -> np.ndarray:
        chips = [box_chip(image, f.box, self.size, GENDERAGE_BOX_SCALE) for f in faces]
        mean = (self.input_mean,) * 3
        return cv2.dnn.blobFromImages(chips, 1.0 / self.input_std, (self.size, self.size), mean, swapRB=True)

    def attributes_of(self, row: np.ndarray, wanted: frozenset[str]) -> FaceAttributes:
        return FaceAttributes(
            age=float(row[2]) * 100.0 if ACTION_AGE in wanted else None,
            male_probability=male_probability_from_pair(row[:2]) if ACTION_GENDER in wanted else None,
        )


class ExpressionHead(_OnnxHead):
    """facial_expression_recognition_mobilefacenet_2022july_int8.onnx: emotion = the softmax of
    the 7 scores, keyed by FER_EMOTIONS. The export fixes its batch at 1 (run face by face)."""

    OPTION = "emotion_onnx"
    actions = frozenset({ACTION_EMOTION})

    def __init__(self, path: str, threads: int | None = None):
        what = f"{self.OPTION} {path}"
        super().__init__(create_session(path, threads), what, ARCFACE_SIZE)
        classes = self.session.get_outputs()[0].shape[-1]
        if classes != len(FER_EMOTIONS):
            raise ModelFileError(f"{what}: expected {len(FER_EMOTIONS)} expression scores, the model gives {classes}")
        self.path = path

    def magnification(self, face: FaceDetection) -> float:
        return arcface_magnification(face.landmarks)

    def blob(self, image: np.ndarray, faces: Sequence[FaceDetection]) -> np.ndarray:
        rgb = np.stack([align_face(image, f.landmarks) for f in faces])[..., ::-1].astype(np.float32)
        normalised = (rgb / 255.0 - FER_INPUT_MEAN) / FER_INPUT_STD
        return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))

    def attributes_of(self, row: np.ndarray, wanted: frozenset[str]) -> FaceAttributes:
        return FaceAttributes(emotion=dict(zip(FER_EMOTIONS, softmax(row).tolist())))


def build_attribute_heads(request: LoadRequest, genderage_session=None, genderage_path: str = "genderage.onnx") -> list:
    """The heads a LoadModel request asks for: age_onnx / gender_onnx / emotion_onnx (any engine)
    first, then a pack's genderage.onnx (read from `genderage_path`) for whatever age/gender those
    options do not cover."""
    threads = request.threads or None
    heads: list = []
    gender_path = request.file("gender_onnx")
    age_path = request.file("age_onnx")
    if gender_path:
        heads.append(CydralGenderHead(gender_path, threads))
    if age_path:
        heads.append(CydralAgeHead(age_path, threads))
    emotion_path = request.file(ExpressionHead.OPTION)
    if emotion_path:
        heads.append(ExpressionHead(emotion_path, threads))
    if genderage_session is not None:
        covered = frozenset().union(*(h.actions for h in heads))
        rest = frozenset({ACTION_AGE, ACTION_GENDER}) - covered
        if rest:
            heads.append(InsightFaceGenderAge(genderage_session, rest, path=genderage_path))
    return heads
