"""FaceAnalyze attributes: the age, gender and emotion heads (engines/attributes.py), their wiring
into both engines, `actions` semantics through FaceService, and the wire over a real gRPC channel.

The insightface genderage.onnx is not available here, so its pre- and post-processing is tested
with a duck-typed fake session; the Cydral and expression heads run on the real weights (models/)
and photos (../shared/data)."""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
import unittest
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np

from core.errors import InvalidInputError, ModelFileError
from engines import parse_load_request
from engines.alignment import align_face
from engines.attributes import (
    CYDRAL_AGE_WEIGHTS,
    GENDERAGE_SIZE,
    CydralAgeHead,
    CydralGenderHead,
    ExpressionHead,
    InsightFaceGenderAge,
    build_attribute_heads,
    male_probability_from_pair,
)
from engines.base import ACTION_AGE, ACTION_EMOTION, ACTION_GENDER, HOST_ACTIONS, FaceAttributes, FaceDetection
from engines.detection import YuNetDetector
from engines.onnx_direct import YUNET_SCORE_THRESHOLD
from face_service import DEFAULT_MODEL_OPTIONS, FaceService, best_face
from tests import support

BOTH = frozenset({ACTION_AGE, ACTION_GENDER})
ALL_HEADS = BOTH | {ACTION_EMOTION}
EMOTION = frozenset({ACTION_EMOTION})
EMOTION_FILE = "facial_expression_recognition_mobilefacenet_2022july_int8.onnx"
INSIGHTFACE_WITH_HEADS = (
    *support.INSIGHTFACE_OPTIONS,
    "age_onnx:age-v1.onnx",
    "gender_onnx:gender-v1.onnx",
    f"emotion_onnx:{EMOTION_FILE}",
)
ENGINES = {"default": DEFAULT_MODEL_OPTIONS, "insightface": INSIGHTFACE_WITH_HEADS}

# ../shared/models/age-gender-cydral/SOURCE.md, check 3: the dlib-free YuNet-landmark path on
# t1.jpg (YuNet 2023mar at full resolution, score 0.6), faces left to right.
SOURCE_P_MALE = (0.000, 0.000, 0.996, 0.977, 0.181, 0.000)
SOURCE_AGE = (23.7, 26.5, 36.0, 32.1, 25.8, 26.8)
# Visual truth for the same six faces (SOURCE.md); face 5 is a man looking down, head turned,
# which the gender network gets wrong on some crops.
T1_GENDERS = ("Woman", "Woman", "Man", "Man", "Man", "Woman")
IDENTITY_GENDER = {
    "obama": "Man",
    "biden": "Man",
    "kit_harington": "Man",
    "alex_lacamoire": "Man",
    "rose_leslie": "Woman",
}
# deepface's emotion keys, which the host's face API follows.
DEEPFACE_EMOTIONS = {"angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"}
# ../shared/models/fer-mobilefacenet/SOURCE.md, "Checked here": photos of one face each, smiling
# or straight (by eye). Left out as not robust: kit_harington_1/3 (straight, come out sad) and
# t1.jpg (4 of 6 happy there; small faces). Tom_Hanks is a 112x112 chip, which SCRFD finds no
# face in, so only YuNet sees it.
SMILING_PHOTOS = [
    ("face-recognition-examples", "images", f"{name}.jpg")
    for name in ("alex_lacamoire_1", "alex_lacamoire_2", "obama_1", "obama_3", "rose_leslie_1", "rose_leslie_2")
]
SMILING = SMILING_PHOTOS + [("insightface-wheel-images", "Tom_Hanks_54745.png")]
STRAIGHT = [("face-recognition-examples", "images", "biden_1.jpg"), ("silent-face-samples", "image_T1.jpg")]


def gender_of(male_probability: float) -> str:
    return "Man" if male_probability >= 0.5 else "Woman"


def dominant(emotion) -> str:
    return max(emotion, key=emotion.get)


def face(box: Sequence[float], landmarks: np.ndarray | None = None) -> FaceDetection:
    x1, y1, x2, y2 = (float(v) for v in box)
    return FaceDetection(
        box=(x1, y1, x2, y2),
        score=0.9,
        landmarks=np.zeros((5, 2), np.float32) if landmarks is None else landmarks,
    )


def load_service(options) -> FaceService:
    for option in options:
        key, value = option.split(":", 1)
        if key.endswith("_onnx"):
            support.model_path(value)
        elif key == "model_pack":
            support.model_path(value)
    service = FaceService()
    service.load(parse_load_request("test", support.MODELS_DIR, 0, list(options)))
    return service


class CountingSession:
    """Wraps an onnxruntime session; records the batch size of every run."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[int] = []

    def run(self, output_names, feeds):
        self.batches.append(len(next(iter(feeds.values()))))
        return self.inner.run(output_names, feeds)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@contextlib.contextmanager
def counting(heads):
    """Swap every head's session for a CountingSession; yields {head class name: counter}."""
    saved = [(head, head.session) for head in heads]
    counters = {}
    try:
        for head in heads:
            head.session = counters[type(head).__name__] = CountingSession(head.session)
        yield counters
    finally:
        for head, session in saved:
            head.session = session


class FakeGenderAgeSession:
    """Duck-typed genderage.onnx: input [batch,3,96,96], output [batch,3]; returns canned rows."""

    def __init__(self, rows: Sequence[Sequence[float]], batch: str | int = "None") -> None:
        self.rows = np.asarray(rows, dtype=np.float32)
        self.batch = batch
        self.blobs: list[np.ndarray] = []

    def get_inputs(self):
        return [SimpleNamespace(name="data", shape=[self.batch, 3, GENDERAGE_SIZE, GENDERAGE_SIZE])]

    def get_outputs(self):
        return [SimpleNamespace(name="fc1", shape=[self.batch, 3])]

    def run(self, output_names, feeds):
        assert output_names == ["fc1"], output_names
        blob = feeds["data"]
        start = sum(len(b) for b in self.blobs)
        self.blobs.append(blob.copy())
        return [self.rows[start : start + len(blob)]]


class InsightFaceGenderAgeTest(unittest.TestCase):
    """insightface Attribute pre/post-processing, with a fake session (no weights needed)."""

    def setUp(self):
        # A gradient image, so any crop offset or scale error changes the pixels.
        ys, xs = np.mgrid[0:300, 0:300]
        self.image = np.dstack([(xs % 256), (ys % 256), ((xs + ys) % 256)]).astype(np.uint8)

    def test_crop_is_centred_on_the_box_with_1_5x_margin_and_rgb(self):
        # A 64 px box: 1.5 * 64 = 96 px of image fill the 96 px input, scale 1, centre (150, 140).
        session = FakeGenderAgeSession([[0.0, 1.0, 0.3]])
        head = InsightFaceGenderAge(session)
        head.predict(self.image, [face((118, 108, 182, 172))], BOTH)
        blob = session.blobs[0]
        self.assertEqual(blob.shape, (1, 3, 96, 96))
        self.assertEqual(blob.dtype, np.float32)
        expected = self.image[140 - 48 : 140 + 48, 150 - 48 : 150 + 48, ::-1].transpose(2, 0, 1)
        np.testing.assert_array_equal(blob[0], expected.astype(np.float32))  # mean 0, std 1, RGB

    def test_larger_box_is_scaled_down(self):
        # A 128 px wide box (taller side counts: max(w, h)): 192 px of image -> 96, scale 0.5.
        session = FakeGenderAgeSession([[0.0, 1.0, 0.3]])
        InsightFaceGenderAge(session).predict(self.image, [face((86, 100, 214, 180))], BOTH)
        expected = cv2.resize(
            self.image[140 - 96 : 140 + 96, 150 - 96 : 150 + 96], (96, 96), interpolation=cv2.INTER_LINEAR
        )[..., ::-1].transpose(2, 0, 1)
        self.assertLess(np.abs(session.blobs[0][0] - expected).mean(), 1.5)

    def test_mean_and_std_are_applied(self):
        session = FakeGenderAgeSession([[0.0, 1.0, 0.3]])
        InsightFaceGenderAge(session, input_mean=127.5, input_std=128.0).predict(
            self.image, [face((118, 108, 182, 172))], BOTH
        )
        expected = (self.image[92:188, 102:198, ::-1].transpose(2, 0, 1) - 127.5) / 128.0
        np.testing.assert_allclose(session.blobs[0][0], expected, atol=1e-5)

    def test_outputs_become_softmax_probability_and_years(self):
        rows = [[-1.0, 2.0, 0.314], [3.0, -1.0, 0.55]]
        session = FakeGenderAgeSession(rows)
        attrs = InsightFaceGenderAge(session).predict(
            self.image, [face((118, 108, 182, 172)), face((10, 10, 60, 70))], BOTH
        )
        self.assertEqual(len(session.blobs), 1, "all faces in one run")
        self.assertEqual(len(session.blobs[0]), 2)
        self.assertAlmostEqual(attrs[0].male_probability, 1 / (1 + np.exp(-3.0)), places=5)
        self.assertAlmostEqual(attrs[1].male_probability, 1 / (1 + np.exp(4.0)), places=5)
        self.assertAlmostEqual(attrs[0].age, 31.4, places=4)
        self.assertAlmostEqual(attrs[1].age, 55.0, places=4)
        # The argmax insightface reports is kept: male exactly when P(male) >= 0.5.
        self.assertEqual([gender_of(a.male_probability) for a in attrs], ["Man", "Woman"])

    def test_probability_pair_is_used_as_is(self):
        self.assertAlmostEqual(male_probability_from_pair(np.array([0.2, 0.8])), 0.8)
        self.assertAlmostEqual(male_probability_from_pair(np.array([0.0, 0.0])), 0.5)

    def test_only_the_asked_actions_are_filled(self):
        faces = [face((118, 108, 182, 172))]
        age_only = InsightFaceGenderAge(FakeGenderAgeSession([[0, 1, 0.3]])).predict(
            self.image, faces, frozenset({ACTION_AGE})
        )[0]
        self.assertIsNone(age_only.male_probability)
        self.assertAlmostEqual(age_only.age, 30.0, places=4)
        gender_only = InsightFaceGenderAge(FakeGenderAgeSession([[0, 1, 0.3]])).predict(
            self.image, faces, frozenset({ACTION_GENDER})
        )[0]
        self.assertIsNone(gender_only.age)
        self.assertGreater(gender_only.male_probability, 0.5)

    def test_narrowed_head_runs_only_for_its_actions(self):
        session = FakeGenderAgeSession([[0, 1, 0.3]])
        head = InsightFaceGenderAge(session, actions=frozenset({ACTION_AGE}))
        self.assertEqual(head.actions, {ACTION_AGE})
        attrs = head.predict(self.image, [face((118, 108, 182, 172))], frozenset({ACTION_GENDER}))
        self.assertEqual(session.blobs, [], "not asked for anything it computes: no run")
        self.assertIsNone(attrs[0].male_probability)
        self.assertIsNone(attrs[0].age)

    def test_fixed_batch_of_one_runs_face_by_face(self):
        rows = [[0, 1, 0.2], [1, 0, 0.3], [0, 1, 0.4]]
        session = FakeGenderAgeSession(rows, batch=1)
        boxes = [(118, 108, 182, 172), (10, 10, 60, 70), (200, 200, 260, 280)]
        attrs = InsightFaceGenderAge(session).predict(self.image, [face(b) for b in boxes], BOTH)
        self.assertEqual([len(b) for b in session.blobs], [1, 1, 1])
        self.assertEqual([round(a.age) for a in attrs], [20, 30, 40])

    def test_dynamic_batch_is_one_run(self):
        session = FakeGenderAgeSession([[0, 1, 0.2]] * 5)
        InsightFaceGenderAge(session).predict(self.image, [face((10, 10, 60, 70))] * 5, BOTH)
        self.assertEqual([len(b) for b in session.blobs], [5])

    def test_no_faces_no_run(self):
        session = FakeGenderAgeSession([])
        self.assertEqual(InsightFaceGenderAge(session).predict(self.image, [], BOTH), [])
        self.assertEqual(session.blobs, [])


class BuildHeadsTest(unittest.TestCase):
    def request(self, *options, model_path=None):
        return parse_load_request("m", model_path or support.MODELS_DIR, 0, list(options))

    def test_missing_file_is_a_model_file_error(self):
        with tempfile.TemporaryDirectory() as empty:
            for option in ("age_onnx:age-v1.onnx", "gender_onnx:gender-v1.onnx", f"emotion_onnx:{EMOTION_FILE}"):
                with self.subTest(option=option):
                    with self.assertRaisesRegex(ModelFileError, option.split(":")[0]):
                        build_attribute_heads(self.request(option, model_path=empty))

    def test_files_swapped_between_options_are_rejected(self):
        gender = support.model_path("gender-v1.onnx")
        age = support.model_path("age-v1.onnx")
        with self.assertRaisesRegex(ModelFileError, "age_onnx.*64x64"):
            build_attribute_heads(self.request(f"age_onnx:{gender}"))
        with self.assertRaisesRegex(ModelFileError, "gender_onnx.*32x32"):
            build_attribute_heads(self.request(f"gender_onnx:{age}"))
        with self.assertRaisesRegex(ModelFileError, "emotion_onnx.*112x112"):
            build_attribute_heads(self.request(f"emotion_onnx:{gender}"))
        # A 112x112 face model that is not an expression classifier (a 128-d recognizer).
        recognizer = support.model_path("MobileFaceNet.onnx")
        with self.assertRaisesRegex(ModelFileError, "emotion_onnx.*7 expression scores.*128"):
            build_attribute_heads(self.request(f"emotion_onnx:{recognizer}"))

    def test_emotion_head_sits_beside_the_pack_genderage(self):
        support.model_path(EMOTION_FILE)
        heads = build_attribute_heads(self.request(f"emotion_onnx:{EMOTION_FILE}"), FakeGenderAgeSession([]))
        self.assertEqual(
            [(type(h).__name__, h.actions) for h in heads],
            [("ExpressionHead", EMOTION), ("InsightFaceGenderAge", BOTH)],
        )
        self.assertEqual(heads[0].path, os.path.join(support.MODELS_DIR, EMOTION_FILE))

    def test_explicit_options_win_over_the_pack_genderage(self):
        support.model_path("gender-v1.onnx")
        support.model_path("age-v1.onnx")
        fake = FakeGenderAgeSession([])
        heads = build_attribute_heads(self.request(), fake)
        self.assertEqual([(type(h).__name__, h.actions) for h in heads], [("InsightFaceGenderAge", BOTH)])
        heads = build_attribute_heads(self.request("gender_onnx:gender-v1.onnx"), fake)
        self.assertEqual(
            [(type(h).__name__, h.actions) for h in heads],
            [("CydralGenderHead", {ACTION_GENDER}), ("InsightFaceGenderAge", {ACTION_AGE})],
        )
        heads = build_attribute_heads(self.request("gender_onnx:gender-v1.onnx", "age_onnx:age-v1.onnx"), fake)
        self.assertEqual([type(h).__name__ for h in heads], ["CydralGenderHead", "CydralAgeHead"])

    def test_no_options_no_heads(self):
        self.assertEqual(build_attribute_heads(self.request()), [])


class CydralReproductionTest(unittest.TestCase):
    """SOURCE.md's numbers for the dlib-free chip path on t1.jpg, with YuNet at full resolution."""

    def test_t1_matches_source_md(self):
        support.require_files(support.GROUP_PHOTO)
        image = cv2.imread(support.GROUP_PHOTO)
        detector = YuNetDetector(
            support.model_path("face_detection_yunet_2023mar.onnx"), input_size=(1280, 1280), score_threshold=0.6
        )
        faces = sorted(detector.detect(image), key=lambda f: f.box[0])
        self.assertEqual(len(faces), 6)
        gender = CydralGenderHead(support.model_path("gender-v1.onnx"))
        age = CydralAgeHead(support.model_path("age-v1.onnx"))
        p_male = [a.male_probability for a in gender.predict(image, faces, BOTH)]
        ages = [a.age for a in age.predict(image, faces, BOTH)]
        # Tolerances: SOURCE.md fitted with cv2.estimateAffinePartial2D (LMEDS) under OpenCV 5.0;
        # here the deterministic least-squares fit of engines.alignment under OpenCV 4.14.
        np.testing.assert_allclose(p_male, SOURCE_P_MALE, atol=0.02)
        np.testing.assert_allclose(ages, SOURCE_AGE, atol=0.6)

    def test_age_is_the_expectation_with_w0_quarter(self):
        self.assertEqual(CYDRAL_AGE_WEIGHTS.shape, (81,))
        self.assertEqual(CYDRAL_AGE_WEIGHTS[0], 0.25)
        self.assertEqual(CYDRAL_AGE_WEIGHTS[1], 1.0)
        self.assertEqual(CYDRAL_AGE_WEIGHTS[80], 80.0)


class ExpressionHeadTest(unittest.TestCase):
    """The OpenCV Zoo expression model on its own, with YuNet's landmarks, on the shared photos."""

    @classmethod
    def setUpClass(cls):
        cls.head = ExpressionHead(support.model_path(EMOTION_FILE))
        cls.detector = YuNetDetector(
            support.model_path("face_detection_yunet_2023mar.onnx"), score_threshold=YUNET_SCORE_THRESHOLD
        )

    def emotions(self, *parts):
        image = cv2.imread(support.data_path(*parts))
        faces = self.detector.detect(image)
        self.assertEqual(len(faces), 1, parts)
        return self.head.predict(image, faces, EMOTION)[0].emotion

    def assert_dominant(self, photos: list[tuple[str, ...]], expected: str) -> None:
        for parts in photos:
            with self.subTest(photo=parts[-1]):
                emotion = self.emotions(*parts)
                self.assertEqual(dominant(emotion), expected, emotion)

    def test_smiling_faces_are_happy(self):
        self.assert_dominant(SMILING, "happy")

    def test_straight_faces_are_neutral(self):
        self.assert_dominant(STRAIGHT, "neutral")

    def test_the_map_is_a_distribution_over_deepfaces_keys(self):
        for parts in SMILING[:2] + STRAIGHT:
            with self.subTest(photo=parts[-1]):
                emotion = self.emotions(*parts)
                self.assertEqual(set(emotion), DEEPFACE_EMOTIONS)
                self.assertAlmostEqual(sum(emotion.values()), 1.0, places=6)
                self.assertTrue(all(0.0 <= p <= 1.0 for p in emotion.values()), emotion)

    def test_input_is_the_arcface_chip_in_rgb_scaled_to_minus_one_one(self):
        image = cv2.imread(support.data_path(*SMILING[0]))
        faces = self.detector.detect(image)
        # The same preprocessing, written as OpenCV's blob: (x - 127.5) / 127.5 = (x/255 - 0.5) / 0.5.
        expected = cv2.dnn.blobFromImage(
            align_face(image, faces[0].landmarks), 1 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True
        )
        np.testing.assert_allclose(self.head.blob(image, faces), expected, atol=1e-5)

    def test_fixed_batch_of_one_runs_face_by_face_and_only_when_asked(self):
        image = cv2.imread(support.GROUP_PHOTO)
        faces = self.detector.detect(image)
        self.assertGreaterEqual(len(faces), 2)
        with counting([self.head]) as runs:
            not_asked = self.head.predict(image, faces, BOTH)
            self.assertEqual(runs["ExpressionHead"].batches, [], "emotion not asked: no run")
            attrs = self.head.predict(image, faces, EMOTION)
            self.assertEqual(runs["ExpressionHead"].batches, [1] * len(faces))
        self.assertTrue(all(a.emotion is None for a in not_asked))
        self.assertEqual(len(attrs), len(faces))
        for a in attrs:
            self.assertIsNone(a.age)
            self.assertIsNone(a.male_probability)
            self.assertEqual(set(a.emotion), DEEPFACE_EMOTIONS)


class ServiceAttributesTest(unittest.TestCase):
    """Both engines through FaceService, on the real weights and photos."""

    @classmethod
    def setUpClass(cls):
        cls.services = {name: load_service(options) for name, options in ENGINES.items()}
        cls.bare = load_service(support.INSIGHTFACE_OPTIONS)
        support.require_files(support.GROUP_PHOTO)
        cls.group = support.b64_file(support.GROUP_PHOTO)

    @staticmethod
    def heads(service):
        return service.loaded.engine.attribute_heads

    def test_both_engines_have_every_head(self):
        for name, service in self.services.items():
            with self.subTest(engine=name):
                self.assertEqual(service.loaded.engine.supported_actions, ALL_HEADS)
                self.assertEqual(
                    sorted(type(h).__name__ for h in self.heads(service)),
                    ["CydralAgeHead", "CydralGenderHead", "ExpressionHead"],
                )

    def test_labelled_people_get_their_gender_and_a_plausible_age(self):
        labels = os.path.join(support.IDENTITY_DIR, "labels.csv")
        support.require_files(labels)
        with open(labels, newline="") as f:
            rows = [r for r in csv.DictReader(f) if ";" not in r["identity"]]
        self.assertGreaterEqual(len(rows), 10)
        for name, service in self.services.items():
            for row in rows:
                with self.subTest(engine=name, file=row["file"]):
                    img = support.b64_file(support.data_path("face-recognition-examples", "images", row["file"]))
                    analyzed = service.analyze(img, [])
                    item = max(analyzed, key=lambda a: (a.face.area, a.face.score))
                    self.assertIs(item.face, best_face([a.face for a in analyzed]))
                    self.assertEqual(gender_of(item.attributes.male_probability), IDENTITY_GENDER[row["identity"]])
                    self.assertTrue(15 <= item.attributes.age <= 90, item.attributes.age)

    def group_analyses(self):
        """{engine: FaceService.analyze of t1.jpg with every action} of both engines."""
        return {name: service.analyze(self.group, []) for name, service in self.services.items()}

    def test_group_photo_genders_left_to_right(self):
        for name, analyses in self.group_analyses().items():
            with self.subTest(engine=name):
                analyzed = sorted(analyses, key=lambda a: a.face.box[0])
                self.assertEqual(len(analyzed), 6)
                got = [gender_of(a.attributes.male_probability) for a in analyzed]
                right = sum(g == t for g, t in zip(got, T1_GENDERS))
                self.assertGreaterEqual(right, 5, got)
                for a in analyzed:
                    self.assertTrue(10 <= a.attributes.age <= 60, a.attributes.age)

    def test_empty_actions_compute_everything_supported(self):
        for name, analyses in self.group_analyses().items():
            with self.subTest(engine=name):
                for a in analyses:
                    self.assertIsNotNone(a.attributes.age)
                    self.assertIsNotNone(a.attributes.male_probability)
                    self.assertEqual(set(a.attributes.emotion), DEEPFACE_EMOTIONS)
        # A model without heads: nothing to compute, and not an error.
        for a in self.bare.analyze(self.group, []):
            self.assertIsNone(a.attributes.age)
            self.assertIsNone(a.attributes.male_probability)
            self.assertIsNone(a.attributes.emotion)

    def test_one_action_runs_only_its_head(self):
        for name, service in self.services.items():
            for action, other in ((ACTION_AGE, ACTION_GENDER), (ACTION_GENDER, ACTION_AGE)):
                with self.subTest(engine=name, action=action), counting(self.heads(service)) as runs:
                    analyzed = service.analyze(self.group, [action])
                    field = {ACTION_AGE: "age", ACTION_GENDER: "male_probability"}
                    for a in analyzed:
                        self.assertIsNotNone(getattr(a.attributes, field[action]))
                        self.assertIsNone(getattr(a.attributes, field[other]))
                    head_of = {ACTION_AGE: "CydralAgeHead", ACTION_GENDER: "CydralGenderHead"}
                    self.assertEqual(runs[head_of[action]].batches, [len(analyzed)])
                    self.assertEqual(runs[head_of[other]].batches, [], f"{other} head must not run")

    def test_one_batched_run_per_head_per_image(self):
        for name, service in self.services.items():
            with self.subTest(engine=name), counting(self.heads(service)) as runs:
                analyzed = service.analyze(self.group, ["age", "gender"])
                self.assertEqual(len(analyzed), 6)
                self.assertEqual(
                    {k: c.batches for k, c in runs.items()},
                    {"CydralAgeHead": [6], "CydralGenderHead": [6], "ExpressionHead": []},
                )

    def test_emotion_alone_runs_only_the_expression_head(self):
        # The engine itself: which actions FaceService lets through is its own rule.
        image = cv2.imread(support.GROUP_PHOTO)
        for name, service in self.services.items():
            engine = service.loaded.engine
            faces = engine.detect(image)
            with self.subTest(engine=name), counting(self.heads(service)) as runs:
                attrs = engine.analyze(image, faces, EMOTION)
                self.assertEqual(
                    {k: c.batches for k, c in runs.items()},
                    {"CydralAgeHead": [], "CydralGenderHead": [], "ExpressionHead": [1] * len(faces)},
                )
                for a in attrs:
                    self.assertIsNone(a.age)
                    self.assertIsNone(a.male_probability)
                    self.assertEqual(set(a.emotion), DEEPFACE_EMOTIONS)

    def test_emotion_on_a_model_without_the_head_is_empty(self):
        image = cv2.imread(support.GROUP_PHOTO)
        engine = self.bare.loaded.engine
        self.assertNotIn(ACTION_EMOTION, engine.supported_actions)
        attrs = engine.analyze(image, engine.detect(image), EMOTION)
        self.assertEqual(len(attrs), 6)
        self.assertTrue(all(a.emotion is None for a in attrs))

    def test_smiling_faces_are_happy_with_both_detectors(self):
        # SCRFD's landmarks as well as YuNet's make the chip the expression model expects.
        for name, service in self.services.items():
            for parts in SMILING_PHOTOS:
                with self.subTest(engine=name, photo=parts[-1]):
                    (item,) = service.analyze(support.b64_file(support.data_path(*parts)), [])
                    self.assertEqual(dominant(item.attributes.emotion), "happy", item.attributes.emotion)

    def test_unknown_action_is_invalid_input_listing_the_four(self):
        with self.assertRaises(InvalidInputError) as caught:
            self.services["default"].analyze(self.group, ["age", "beauty"])
        message = str(caught.exception)
        self.assertIn("beauty", message)
        for action in HOST_ACTIONS:
            self.assertIn(action, message)

    def test_every_host_action_is_accepted_and_one_without_a_head_left_empty(self):
        # The host's documentation: a model without a demographic head returns empty attributes.
        for action in HOST_ACTIONS:
            with self.subTest(action=action):
                for a in self.bare.analyze(self.group, [action.upper()]):
                    self.assertEqual(a.attributes, FaceAttributes())
        # race: no model computes it; asking for it beside age still gives the age.
        for a in self.services["default"].analyze(self.group, ["race", "age"]):
            self.assertIsNotNone(a.attributes.age)
            self.assertIsNone(a.attributes.male_probability)


class GrpcAttributesTest(unittest.TestCase):
    """FaceAnalyze over a real channel: the gender map, age left absent, and the status codes."""

    @classmethod
    def setUpClass(cls):
        import grpc

        import backend_pb2
        from harness.servers import InProcessServer

        for kind in support.ENGINES:  # the default set and buffalo_sc, installed
            support.engine_setup(kind)
        cls.grpc, cls.pb = grpc, backend_pb2
        support.require_files(support.GROUP_PHOTO)
        cls.group = support.b64_file(support.GROUP_PHOTO)
        cls.server = InProcessServer()
        cls.stub = cls.server.stub

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def load(self, options):
        result = self.stub.LoadModel(
            self.pb.ModelOptions(Model="m", ModelPath=support.MODELS_DIR, Options=list(options)), timeout=120
        )
        self.assertTrue(result.success, result.message)

    def analyze(self, actions, img=None):
        return self.stub.FaceAnalyze(self.pb.FaceAnalyzeRequest(img=img or self.group, actions=actions), timeout=120)

    def test_gender_only_gives_the_map_and_no_age(self):
        variants = {"default": DEFAULT_MODEL_OPTIONS, "insightface": INSIGHTFACE_WITH_HEADS}
        for name, options in variants.items():
            with self.subTest(engine=name):
                self.load(options)
                reply = self.analyze(["gender"])
                self.assertEqual(len(reply.faces), 6)
                for f in reply.faces:
                    self.assertEqual(set(f.gender), {"Man", "Woman"})
                    self.assertAlmostEqual(f.gender["Man"] + f.gender["Woman"], 1.0, places=5)
                    self.assertEqual(f.dominant_gender, "Man" if f.gender["Man"] >= f.gender["Woman"] else "Woman")
                    self.assertEqual(f.age, 0.0)
                    self.assertEqual(len(f.emotion), 0)
                    self.assertEqual(f.dominant_race, "")
                ordered = sorted(reply.faces, key=lambda f: f.region.x)
                right = sum(f.dominant_gender == t for f, t in zip(ordered, T1_GENDERS))
                self.assertGreaterEqual(right, 5)

    def test_empty_actions_gives_age_and_gender(self):
        self.load(DEFAULT_MODEL_OPTIONS)
        for f in self.analyze([]).faces:
            self.assertGreater(f.age, 10.0)
            self.assertIn(f.dominant_gender, ("Man", "Woman"))

    def test_default_set_fills_the_emotion_map(self):
        self.load(DEFAULT_MODEL_OPTIONS)
        (smiling,) = self.analyze([], support.b64_file(support.data_path(*SMILING[0]))).faces
        self.assertEqual(smiling.dominant_emotion, "happy")
        for f in [smiling, *self.analyze([]).faces]:
            self.assertEqual(set(f.emotion), DEEPFACE_EMOTIONS)
            # Probabilities 0-1, the scale of the gender map.
            self.assertAlmostEqual(sum(f.emotion.values()), 1.0, places=5)
            # The int8 model's scores can tie (t1.jpg has a face at happy = neutral).
            self.assertEqual(f.emotion[f.dominant_emotion], max(f.emotion.values()))

    def test_unknown_action_is_invalid_argument(self):
        self.load(DEFAULT_MODEL_OPTIONS)
        with self.assertRaises(self.grpc.RpcError) as caught:
            self.analyze(["age", "hair colour"])
        self.assertEqual(caught.exception.code(), self.grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("hair colour", caught.exception.details())

    def test_age_without_a_head_is_left_empty(self):
        self.load(support.INSIGHTFACE_OPTIONS)
        reply = self.analyze(["age", "gender", "emotion", "race"])
        self.assertEqual(len(reply.faces), 6)
        for f in reply.faces:
            self.assertEqual(f.age, 0.0)
            self.assertEqual((f.dominant_gender, len(f.gender)), ("", 0))
            self.assertEqual((f.dominant_race, len(f.race)), ("", 0))


if __name__ == "__main__":
    unittest.main()
