"""FaceService in-process (no gRPC): verify / analyze / embed / detect on real photos with both
model setups, the domain errors and which image they name, LoadModel failures that must leave the
previous model serving, and liveness (anti_spoofing) with the default set.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import threading
import time
import unittest
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import cv2
import numpy as np
import onnxruntime as ort

from core.concurrency import InstancePool, serving_alone, usable_cpus
from core.errors import (
    CallEndedError,
    IdentityMismatchError,
    InvalidInputError,
    ModelFileError,
    ModelOptionError,
    NoFaceError,
    PreconditionError,
)
from engines import build_engine, parse_load_request
from engines.runtime import set_opencv_threads
from face_service import FaceService, LoadedModel
from imaging import EncodedImage
from tests import support
from tests.support import GARBAGE_BASE64, IMAGES, NOT_BASE64, TestCaseMixin, photo

OPENCV_DEFAULT_THREADS = cv2.getNumThreads()  # before any test loads a model


def load(service: FaceService, name: str, options: Sequence[str], model_path: str | None = None) -> LoadedModel:
    """What the servicer's LoadModel does: parse the options, then load."""
    return service.load(parse_load_request(name, model_path or support.MODELS_DIR, 0, list(options)))


def loaded_service(kind: str, name: str | None = None) -> FaceService:
    model_name, options = support.engine_setup(kind)
    service = FaceService()
    load(service, model_name if name is None else name, options)
    return service


def big_beside_small(big: str, small: str) -> np.ndarray:
    """One photo with `big`'s face about 2.5x as tall as `small`'s."""
    a = support.read_image(support.data_path(IMAGES, big))
    b = support.read_image(support.data_path(IMAGES, small))
    a = cv2.resize(a, None, fx=500 / a.shape[0], fy=500 / a.shape[0])
    b = cv2.resize(b, None, fx=200 / b.shape[0], fy=200 / b.shape[0])
    canvas = np.full((560, a.shape[1] + b.shape[1] + 60, 3), 200, np.uint8)
    canvas[30:530, 20 : 20 + a.shape[1]] = a
    canvas[180:380, 40 + a.shape[1] : 40 + a.shape[1] + b.shape[1]] = b
    return canvas


class ErrorAssertions(TestCaseMixin):
    def assert_names(self, message: str, name: str) -> None:
        """`name` (img1, img2, img, Images[0], src) appears as a word, and no other image does."""
        self.assertRegex(message, rf"(?<![\w\[]){re.escape(name)}(?![\w\]])")
        for other in {"img1", "img2", "Images[0]"} - {name}:
            self.assertNotIn(other, message)


class ServiceCases(ErrorAssertions):
    """Run for each model setup; subclasses set KIND."""

    KIND: str
    service: FaceService
    obama1: str
    obama2: str
    biden1: str
    group_path: str
    group: str
    faceless: str

    @classmethod
    def setUpClass(cls):
        cls.service = loaded_service(cls.KIND)
        cls.obama1, cls.obama2, cls.biden1 = photo("obama_1.jpg"), photo("obama_2.jpg"), photo("biden_1.jpg")
        cls.group_path = support.data_path("insightface-wheel-images", "t1.jpg")
        cls.group = support.b64_file(cls.group_path)
        cls.faceless = support.b64_image(support.faceless_image())

    # -- images at once ----------------------------------------------------------------------
    def test_images_worked_on_at_once_are_capped_at_the_cpus(self):
        """Every RPC's image holds one of usable_cpus() slots from its decode to its last model;
        FaceVerify's halves each hold their own and never wait for one while holding one."""
        lock, counts = threading.Lock(), {"now": 0, "most": 0}
        located = FaceService._located

        def counting(service, *args, **kwargs):
            with lock:
                counts["now"] += 1
                counts["most"] = max(counts["most"], counts["now"])
            try:
                time.sleep(0.01)
                return located(service, *args, **kwargs)
            finally:
                with lock:
                    counts["now"] -= 1

        calls = [
            lambda: self.service.verify(self.obama1, self.obama2),
            lambda: self.service.analyze(self.obama1),
            lambda: self.service.embed([self.biden1]),
            lambda: self.service.detect(self.group),
        ]
        with mock.patch.object(FaceService, "_located", counting):
            with ThreadPoolExecutor(max_workers=2 * usable_cpus() + 4) as pool:
                results = list(pool.map(lambda i: calls[i % len(calls)](), range(6 * len(calls))))
        self.assertEqual(len(results), 6 * len(calls))
        self.assertLessEqual(counts["most"], usable_cpus())
        self.assertGreaterEqual(counts["most"], min(2, usable_cpus()))

    # -- verify ------------------------------------------------------------------------------
    def check_result_fields(self, result) -> None:
        self.assertTrue(0.0 <= result.distance <= 2.0, result.distance)
        self.assertTrue(0.0 <= result.confidence <= 100.0, result.confidence)
        self.assertEqual(result.confidence > 50.0, result.distance < result.threshold)
        loaded = self.service.loaded
        assert loaded is not None
        self.assertEqual(result.model, loaded.name)
        self.assertGreater(result.processing_time_ms, 0.0)
        self.assertIsNone(result.img1_liveness)
        self.assertIsNone(result.img2_liveness)
        for face in (result.img1_face, result.img2_face):
            self.assertGreater(face.area, 0.0)

    def test_same_person_is_verified(self):
        result = self.service.verify(self.obama1, self.obama2)
        self.check_result_fields(result)
        self.assertTrue(result.verified)
        self.assertLess(result.distance, result.threshold)
        self.assertGreater(result.confidence, 50.0)

    def test_different_people_are_rejected(self):
        result = self.service.verify(self.obama1, self.biden1)
        self.check_result_fields(result)
        self.assertFalse(result.verified)
        self.assertGreaterEqual(result.distance, result.threshold)
        self.assertLess(result.confidence, 50.0)
        self.assertGreater(result.distance, 0.7)  # not a near miss

    def test_distance_is_one_minus_cosine_of_the_embeddings(self):
        result = self.service.verify(self.obama1, self.biden1)
        e1 = self.service.embed([self.obama1]).vector
        e2 = self.service.embed([self.biden1]).vector
        self.assertAlmostEqual(result.distance, 1.0 - float(e1 @ e2), places=5)
        swapped = self.service.verify(self.biden1, self.obama1)
        self.assertAlmostEqual(result.distance, swapped.distance, places=5)

    def test_distance_of_identical_images_is_within_0_and_2(self):
        # cosine distance is in [0, 2]; rounding must not make an image's distance to itself negative.
        for path, _ in support.single_face_photos():
            with self.subTest(os.path.basename(path)):
                data = support.b64_file(path)
                result = self.service.verify(data, data)
                self.assertTrue(result.verified)
                self.assertGreaterEqual(result.distance, 0.0)
                self.assertLess(result.distance, 1e-5)

    def test_zero_threshold_means_the_engine_default(self):
        expected = support.default_threshold(self.KIND)
        self.assertEqual(self.service.loaded.engine.default_threshold, expected)
        for pair in ((self.obama1, self.obama2), (self.obama1, self.biden1)):
            self.assertAlmostEqual(self.service.verify(*pair, threshold=0.0).threshold, expected, places=6)
        self.assertAlmostEqual(self.service.verify(self.obama1, self.obama2).threshold, expected, places=6)

    def test_custom_threshold_is_honoured_and_echoed(self):
        same = self.service.verify(self.obama1, self.obama2)
        different = self.service.verify(self.obama1, self.biden1)
        strict = self.service.verify(self.obama1, self.obama2, threshold=same.distance - 0.01)
        self.assertFalse(strict.verified)
        self.assertAlmostEqual(strict.threshold, same.distance - 0.01, places=6)
        self.assertLess(strict.confidence, 50.0)
        lenient = self.service.verify(self.obama1, self.biden1, threshold=different.distance + 0.01)
        self.assertTrue(lenient.verified)
        self.assertAlmostEqual(lenient.threshold, different.distance + 0.01, places=6)
        self.assertGreater(lenient.confidence, 50.0)
        for bad in (-0.1, float("nan"), float("inf")):
            with self.subTest(threshold=bad), self.assertRaises(InvalidInputError):
                self.service.verify(self.obama1, self.obama2, threshold=bad)

    def test_confidence_is_monotone(self):
        pairs = [
            (self.obama1, self.obama1),
            (self.obama1, self.obama2),
            (self.obama1, photo("obama_3.jpg")),
            (self.obama1, self.biden1),
            (self.obama1, photo("rose_leslie_1.jpg")),
        ]
        results = sorted((self.service.verify(*p) for p in pairs), key=lambda r: r.distance)
        confidences = [r.confidence for r in results]
        for closer, farther in zip(results, results[1:]):
            if farther.distance > closer.distance + 1e-6:
                self.assertGreater(closer.confidence, farther.confidence, confidences)
        # For one pair, a higher threshold never lowers the confidence.
        by_threshold = [
            self.service.verify(self.obama1, self.obama2, threshold=t).confidence
            for t in (0.1, 0.3, 0.5, 0.7, 0.9, 1.5)
        ]
        self.assertEqual(by_threshold, sorted(by_threshold))
        self.assertLess(by_threshold[0], 50.0)
        self.assertGreater(by_threshold[-1], 50.0)

    def test_best_face_is_the_largest(self):
        for big, small, big_again, small_again in (
            ("obama_1.jpg", "biden_1.jpg", "obama_2.jpg", "biden_2.jpg"),
            ("biden_1.jpg", "obama_1.jpg", "biden_2.jpg", "obama_2.jpg"),
        ):
            with self.subTest(big=big, small=small):
                image = support.b64_image(big_beside_small(big, small))
                faces = self.service.detect(image)
                self.assertEqual(len(faces), 2)
                largest = max(faces, key=lambda f: f.area)
                matched = self.service.verify(image, photo(big_again))
                self.assertTrue(matched.verified, matched.distance)
                self.assertEqual(matched.img1_face.box, largest.box)
                self.assertFalse(self.service.verify(image, photo(small_again)).verified)
                self.assertEqual(self.service.verify(photo(small_again), image).img2_face.box, largest.box)
                self.assertEqual(self.service.embed([image]).face.box, largest.box)

    # -- analyze / embed / detect ---------------------------------------------------------
    def test_analyze_returns_every_face_with_region_and_confidence(self):
        analyzed = self.service.analyze(self.group)
        self.assertEqual(len(analyzed), 6)
        detected = sorted(f.box for f in self.service.detect(self.group))
        self.assertEqual(sorted(a.face.box for a in analyzed), detected)
        height, width = cv2.imread(self.group_path).shape[:2]
        for item in analyzed:
            x, y, w, h = item.face.xywh()
            self.assertGreater(w, 20)
            self.assertGreater(h, 20)
            self.assertTrue(-w / 2 < x < width and -h / 2 < y < height)
            self.assertTrue(0.0 < item.face.score <= 1.0)
            self.assertIsNone(item.liveness)

    def test_analyze_rejects_an_unknown_action(self):
        with self.assertRaises(InvalidInputError) as caught:
            self.service.analyze(self.group, ["horoscope"])
        self.assertIn("horoscope", str(caught.exception))

    def test_embed(self):
        result = self.service.embed([self.obama1, self.biden1])  # Images[0] only
        self.assertEqual(result.vector.shape, (support.EMBEDDING_DIM[self.KIND],))
        self.assertAlmostEqual(float(np.linalg.norm(result.vector)), 1.0, places=5)
        again = self.service.embed([self.obama1])
        np.testing.assert_allclose(result.vector, again.vector, atol=1e-6)
        other = self.service.embed([self.obama2]).vector
        self.assertLess(1.0 - float(result.vector @ other), support.default_threshold(self.KIND))
        with self.assertRaises(InvalidInputError) as caught:
            self.service.embed([])
        self.assertIn("Images[0]", str(caught.exception))

    def test_detect_honours_a_threshold(self):
        default = self.service.detect(self.group)
        self.assertEqual(len(default), 6)
        self.assertEqual(len(self.service.detect(self.group, 0.0)), 6)
        self.assertEqual(self.service.detect(self.group, 0.99), [])
        scores = sorted((f.score for f in default), reverse=True)
        cut = (scores[2] + scores[3]) / 2
        kept = self.service.detect(self.group, cut)
        self.assertEqual(len(kept), 3)
        self.assertTrue(all(f.score >= cut for f in kept))
        self.assertEqual(self.service.detect(self.faceless), [])  # no face is an empty list here
        for bad in (-0.5, 1.5, float("nan")):
            with self.subTest(threshold=bad), self.assertRaises(InvalidInputError):
                self.service.detect(self.group, bad)

    # -- errors -----------------------------------------------------------------------------
    def test_undecodable_or_not_base64_images_name_the_image(self):
        cases = [
            (lambda: self.service.verify(self.obama1, GARBAGE_BASE64), "img2"),
            (lambda: self.service.verify(NOT_BASE64, self.obama1), "img1"),
            (lambda: self.service.verify(GARBAGE_BASE64, NOT_BASE64), "img1"),
            (lambda: self.service.verify(self.obama1, ""), "img2"),
            (lambda: self.service.analyze(GARBAGE_BASE64), "img"),
            (lambda: self.service.analyze(NOT_BASE64), "img"),
            (lambda: self.service.embed([NOT_BASE64]), "Images[0]"),
            (lambda: self.service.embed([GARBAGE_BASE64]), "Images[0]"),
            (lambda: self.service.detect(GARBAGE_BASE64), "src"),
        ]
        for call, name in cases:
            with self.subTest(name):
                with self.assertRaises(InvalidInputError) as caught:
                    call()
                self.assert_names(str(caught.exception), name)

    def test_images_side_by_side_or_one_after_the_other_give_one_answer(self):
        alone = FaceService(helpers=0)
        load(alone, "alone", support.engine_setup(self.KIND)[1])
        for img1, img2 in ((self.obama1, self.obama2), (self.obama1, self.biden1), (self.group, self.obama1)):
            together, sequential = self.service.verify(img1, img2), alone.verify(img1, img2)
            self.assertAlmostEqual(together.distance, sequential.distance, places=5)
            self.assertEqual(together.img1_face.box, sequential.img1_face.box)
            self.assertEqual(together.img2_face.box, sequential.img2_face.box)

    def test_concurrent_verifications_each_get_their_own_answer(self):
        # Requests share the helper thread that takes their second images.
        pairs = [(self.obama1, self.obama2), (self.obama1, self.biden1), (self.biden1, self.obama2)]
        expected = [self.service.verify(*pair).distance for pair in pairs]
        jobs = list(range(len(pairs))) * 4
        with ThreadPoolExecutor(max_workers=4) as callers:
            distances = list(callers.map(lambda i: self.service.verify(*pairs[i]).distance, jobs))
        for i, distance in zip(jobs, distances):
            self.assertAlmostEqual(distance, expected[i], places=5)

    def test_a_failed_first_image_stops_the_second_at_its_next_stage(self):
        service = FaceService(helpers=1)
        load(service, "helped", support.engine_setup(self.KIND)[1])
        caller = threading.current_thread()
        helper_stages, helper_started, released = [], threading.Event(), threading.Event()

        def checkpoint(stage: str) -> None:
            if threading.current_thread() is caller:
                # img1 fails only once img2 is under way on the helper.
                if stage == "detection" and not helper_started.wait(10):
                    raise AssertionError("the helper never started img2")
                return
            helper_stages.append(stage)
            if stage == "detection":
                helper_started.set()
                released.wait(10)

        with self.assertRaises(NoFaceError) as caught:
            service.verify(self.faceless, self.obama1, checkpoint=checkpoint)
        self.assert_names(str(caught.exception), "img1")
        released.set()
        time.sleep(1.0)  # unstopped, img2 reaches recognition within a tenth of that
        self.assertEqual(helper_stages, ["decode", "detection"])

    def test_a_call_ended_on_either_image_ends_the_verification(self):
        # The deadline passes at the first or at the second image to reach recognition, on the
        # request's thread or on the helper: either way the verification ends with that error.
        for nth in (1, 2):
            with self.subTest(nth=nth):
                seen, lock = [], threading.Lock()

                def deadline_passes(stage: str) -> None:
                    with lock:
                        seen.append(stage)
                        count = seen.count("recognition")
                    if stage == "recognition" and count == nth:
                        raise CallEndedError("deadline exceeded", deadline_exceeded=True)

                with self.assertRaises(CallEndedError):
                    self.service.verify(self.obama1, self.obama2, checkpoint=deadline_passes)

    def test_a_call_ended_while_it_waited_for_an_image_slot_decodes_nothing(self):
        def ended(stage: str) -> None:
            if stage == "decode":
                raise CallEndedError("deadline exceeded before decode", deadline_exceeded=True)

        decodes = []
        decode = EncodedImage.decode
        calls = {
            "verify": lambda: self.service.verify(self.obama1, self.obama2, checkpoint=ended),
            "analyze": lambda: self.service.analyze(self.obama1, checkpoint=ended),
            "embed": lambda: self.service.embed([self.obama1], checkpoint=ended),
            "detect": lambda: self.service.detect(self.obama1, checkpoint=ended),
        }
        with mock.patch.object(EncodedImage, "decode", lambda image, *a: decodes.append(image) or decode(image, *a)):
            self.service.detect(self.obama1)
            self.assertEqual(len(decodes), 1)  # the patch sees the service's decodes
            for name, call in calls.items():
                with self.subTest(name), self.assertRaises(CallEndedError):
                    call()
        self.assertEqual(len(decodes), 1)

    def test_no_face_names_the_image(self):
        cases = [
            (lambda: self.service.verify(self.faceless, self.obama1), "img1"),
            (lambda: self.service.verify(self.obama1, self.faceless), "img2"),
            (lambda: self.service.verify(self.faceless, self.faceless), "img1"),
            (lambda: self.service.embed([self.faceless]), "Images[0]"),
        ]
        for call, name in cases:
            with self.subTest(name):
                with self.assertRaises(NoFaceError) as caught:
                    call()
                self.assert_names(str(caught.exception), name)

    def test_a_faceless_photo_analyzes_to_no_faces(self):
        # The host's contract and its current backend: OK with `faces: []`, not NOT_FOUND.
        self.assertEqual(self.service.analyze(self.faceless), [])
        self.assertEqual(self.service.analyze(self.faceless, ["age", "gender", "emotion"]), [])

    def test_identity_guard(self):
        service = loaded_service(self.KIND, name="a")
        calls = {
            "verify": lambda identity: service.verify(self.obama1, self.obama2, identity=identity),
            "analyze": lambda identity: service.analyze(self.obama1, identity=identity),
            "embed": lambda identity: service.embed([self.obama1], identity=identity),
            "detect": lambda identity: service.detect(self.obama1, identity=identity),
        }
        for method, call in calls.items():
            with self.subTest(method):
                with self.assertRaises(IdentityMismatchError) as caught:
                    call("b")
                self.assertIn("model identity mismatch: loaded 'a', requested 'b'", str(caught.exception))
                call("")  # empty identity: no check
                call("a")
        unnamed = loaded_service(self.KIND, name="")
        self.assertTrue(unnamed.verify(self.obama1, self.obama2, identity="b").verified)


class InsightfaceServiceTest(ServiceCases, unittest.TestCase):
    KIND = support.ENGINE_INSIGHTFACE

    def test_anti_spoofing_without_liveness_weights_is_a_precondition_error(self):
        cases = {
            "verify": lambda img: self.service.verify(img, img, anti_spoofing=True),
            "analyze": lambda img: self.service.analyze(img, anti_spoofing=True),
        }
        # Checked before any image is decoded: garbage, no face or a good photo, same answer.
        for (method, call), image in itertools.product(
            cases.items(), (self.obama1, GARBAGE_BASE64, NOT_BASE64, self.faceless)
        ):
            with self.subTest(method, image=image[:12]):
                with self.assertRaises(PreconditionError) as caught:
                    call(image)
                message = str(caught.exception)
                self.assertIn("antispoof_v2_onnx", message)
                self.assertIn("antispoof_v1se_onnx", message)
        with self.assertRaises(PreconditionError):
            self.service.verify(self.obama1, GARBAGE_BASE64, anti_spoofing=True)


class OnnxDirectServiceTest(ServiceCases, unittest.TestCase):
    KIND = support.ENGINE_ONNX_DIRECT


class NotFiniteEmbeddingTest(unittest.TestCase):
    def test_a_recognizer_giving_nan_never_verifies(self):
        # FaceVerify's clamp of the distance to [0, 2] read NaN as 0, a match of any two faces.
        service = loaded_service(support.ENGINE_ONNX_DIRECT)
        engine = service.loaded.engine
        engine.recognizer = support.not_finite_recognizer(engine)
        obama, biden = photo("obama_1.jpg"), photo("biden_1.jpg")
        with self.assertRaisesRegex(ValueError, "not finite"):
            service.verify(obama, biden)
        with self.assertRaisesRegex(ValueError, "not finite"):
            service.embed([obama])


class NoModelTest(unittest.TestCase):
    def test_every_request_needs_a_loaded_model(self):
        service = FaceService()
        image = support.b64_image(support.faceless_image())
        calls = {
            "verify": lambda: service.verify(image, image),
            "verify anti_spoofing": lambda: service.verify(image, image, anti_spoofing=True),
            "verify garbage": lambda: service.verify(NOT_BASE64, NOT_BASE64),
            "analyze": lambda: service.analyze(image),
            "embed": lambda: service.embed([image]),
            "detect": lambda: service.detect(image),
        }
        self.assertIsNone(service.loaded)
        for label, call in calls.items():
            with self.subTest(label):
                with self.assertRaises(PreconditionError) as caught:
                    call()
                self.assertIn("LoadModel", str(caught.exception))


class LoadModelTest(unittest.TestCase):
    """A failed LoadModel leaves the previous model loaded and answering; Free unloads. A model
    LoadModel replaces or Free drops is closed once no request holds it: its sessions, instance
    pools and helper threads are dropped so their memory returns."""

    setups: dict[str, tuple[str, list[str]]]
    obama1: str
    obama2: str
    faceless: str

    @classmethod
    def setUpClass(cls):
        cls.setups = {kind: support.engine_setup(kind) for kind in support.ENGINES}
        cls.obama1, cls.obama2 = photo("obama_1.jpg"), photo("obama_2.jpg")
        cls.faceless = support.b64_image(support.faceless_image())

    def failing_loads(self, kind: str):
        """(label, model name, options, error class, text the message must contain)."""
        name, options = self.setups[kind]
        return [
            (
                "missing recognizer file",
                "new",
                [
                    "engine:onnx_direct",
                    "detector_onnx:face_detection_yunet_2023mar.onnx",
                    "recognizer_onnx:no-such-recognizer.onnx",
                ],
                ModelFileError,
                "no-such-recognizer.onnx",
            ),
            # The engine itself builds; the liveness file after it is missing.
            (
                "missing liveness file",
                "new",
                [o for o in options if not o.startswith("antispoof_v1se_onnx")]
                + ["antispoof_v1se_onnx:no-such-liveness.onnx"],
                ModelFileError,
                "no-such-liveness.onnx",
            ),
            ("bad det_thresh", "new", options + ["det_thresh:1.5"], ModelOptionError, "det_thresh"),
            ("bad det_size", "new", options + ["det_size:abc"], ModelOptionError, "det_size"),
            ("bad det_size multiple", "new", options + ["det_size:100"], ModelOptionError, "det_size"),
            ("unknown pack", "new", ["engine:insightface", "model_pack:buffalo_xx"], ModelFileError, "buffalo_xx"),
            ("unknown engine", "new", ["engine:tensorflow"], ModelOptionError, "tensorflow"),
        ]

    def test_failed_load_keeps_the_previous_model(self):
        for kind in support.ENGINES:
            name, options = self.setups[kind]
            service = FaceService()
            previous = load(service, name, options)
            changes = []
            service.on_change = changes.append
            for label, new_name, new_options, error, text in self.failing_loads(kind):
                with self.subTest(kind, load=label):
                    with self.assertRaises(error) as caught:
                        load(service, new_name, new_options)
                    self.assertIn(text, str(caught.exception))
                    self.assertIs(service.loaded, previous)
                    self.assertEqual(changes, [], "a failed load must not report a change")
                    result = service.verify(self.obama1, self.obama2, identity=name)
                    self.assertTrue(result.verified)
                    self.assertEqual(result.model, name)
                    with self.assertRaises(IdentityMismatchError):
                        service.verify(self.obama1, self.obama2, identity="new")

    def test_options_the_backend_does_not_use_are_ignored_and_named(self):
        # The host appends `<artifact>:<path>` options of its own; model YAMLs carry other
        # backends' options. Neither may fail LoadModel, and the operator must see both.
        name, options = self.setups[support.ENGINE_ONNX_DIRECT]
        service = FaceService()
        extra = ["mmproj:/models/extra.bin", "use_jinja", "det_tresh:0.7", "", "engine:OpenCV"]
        model = load(service, name, [o for o in options if not o.startswith("engine:")] + extra)
        self.assertEqual(
            model.ignored_options,
            ("'mmproj:/models/extra.bin'", "'use_jinja' (not key:value)", "'det_tresh:0.7' (did you mean det_thresh?)"),
        )
        description = model.describe()
        self.assertIn("ignored options: 'mmproj:/models/extra.bin'", description)
        self.assertIn("did you mean det_thresh?", description)
        self.assertTrue(service.verify(self.obama1, self.obama2).verified)

    def test_a_near_miss_of_a_threshold_or_liveness_key_fails(self):
        # Ignoring these would silently weaken a check: the default cut, one liveness model out.
        name, options = self.setups[support.ENGINE_ONNX_DIRECT]
        for typo, meant in (
            ("verify_thresh:0.3", "verify_threshold"),
            ("antispoof_thresh:0.9", "antispoof_threshold"),
            ("antispoof_v1se_onx:MiniFASNetV1SE.onnx", "antispoof_v1se_onnx"),
        ):
            with self.subTest(typo), self.assertRaises(ModelOptionError) as caught:
                load(FaceService(), name, [*options, typo])
            self.assertIn(f"did you mean {meant}?", str(caught.exception))
        # Keys in another case are the keys themselves.
        model = load(FaceService(), name, [*options, "Verify_Threshold:0.3", "ANTISPOOF_THRESHOLD:0.9"])
        self.assertEqual(model.engine.default_threshold, 0.3)
        assert model.liveness is not None
        self.assertEqual(model.liveness.threshold, 0.9)

    def test_engine_names_in_the_host_backends_spellings(self):
        name, options = self.setups[support.ENGINE_ONNX_DIRECT]
        files = [o for o in options if not o.startswith("engine:")]
        for spelling in ("onnx-direct", "OpenCV", "ONNX_DIRECT", "opencv"):
            with self.subTest(spelling):
                model = load(FaceService(), name, files + [f"engine:{spelling}"])
                self.assertEqual(model.engine.embedding_dim, 128)
        model = load(FaceService(), "m", ["engine:InsightFace", "model_pack:buffalo_sc"])
        self.assertEqual(model.engine.embedding_dim, 512)

    def test_the_response_names_the_model_as_the_host_named_it(self):
        service = FaceService()
        load(service, "insightface-buffalo-sc", ["engine:insightface", "model_pack:buffalo_sc"])
        self.assertEqual(service.verify(self.obama1, self.obama2).model, "insightface-buffalo-sc")
        # No name from the host: the engine's own description.
        load(service, "", ["engine:insightface", "model_pack:buffalo_sc"])
        self.assertEqual(service.verify(self.obama1, self.obama2).model, "buffalo_sc")

    def test_successful_load_replaces_the_model_and_free_unloads(self):
        service = FaceService()
        changes = []
        service.on_change = changes.append
        first = load(service, *self.setups[support.ENGINE_INSIGHTFACE])
        self.assertEqual(service.verify(self.obama1, self.obama2).model, first.name)
        second = load(service, *self.setups[support.ENGINE_ONNX_DIRECT])
        self.assertIs(service.loaded, second)
        self.assertEqual(service.embed([self.obama1]).vector.shape, (128,))
        self.assertIsNotNone(second.liveness)
        self.assertIsNone(first.liveness)
        service.free()
        self.assertIsNone(service.loaded)
        self.assertEqual(changes, [True, True, False])
        with self.assertRaises(PreconditionError):
            service.verify(self.obama1, self.obama2)
        with self.assertRaises(PreconditionError):
            service.detect(self.obama1)
        service.free()  # freeing twice is harmless
        load(service, *self.setups[support.ENGINE_INSIGHTFACE])
        self.assertTrue(service.verify(self.obama1, self.obama2).verified)

    def assert_closed(self, model) -> None:
        self.assertTrue(model.closed)
        self.assertEqual(sessions_in(model), [], "a closed model still holds onnxruntime sessions")
        pools = instances_in(model, InstancePool)
        self.assertEqual([pool.idle for pool in pools], [0] * len(pools), "a closed model still holds OpenCV instances")

    def test_a_replaced_model_no_request_holds_is_closed_and_its_sessions_freed(self):
        service = FaceService()
        name, options = self.setups[support.ENGINE_ONNX_DIRECT]
        first = load(service, name, options, model_path=private_models(self, options))
        sessions = [weakref.ref(session) for session in sessions_in(first)]
        self.assertGreaterEqual(len(sessions), 6)  # YuNet, recognizer, age, gender, emotion, liveness
        self.assertFalse(first.closed)
        second = load(service, *self.setups[support.ENGINE_INSIGHTFACE])
        self.assert_closed(first)
        self.assertEqual([ref() for ref in sessions], [None] * len(sessions), "sessions still alive")
        self.assertFalse(second.closed)
        self.assertTrue(service.verify(self.obama1, self.obama2).verified)
        service.free()
        self.assert_closed(second)

    def test_a_reload_of_unchanged_files_shares_their_sessions(self):
        service = FaceService()
        self.addCleanup(service.free)
        name, options = self.setups[support.ENGINE_ONNX_DIRECT]
        models = private_models(self, options)
        detector = os.path.join(models, next(o for o in options if o.startswith("detector_onnx:")).split(":", 1)[1])

        with support.files_settled_at_once():
            first = load(service, name, options, model_path=models)
            first_sessions = sessions_in(first)  # held here, so no later session can take their ids
            shared = {id(s) for s in first_sessions}
            second = load(service, name, options, model_path=models)
            self.assert_closed(first)
            self.assertEqual({id(s) for s in sessions_in(second)}, shared)
            self.assertTrue(service.verify(self.obama1, self.obama2, anti_spoofing=True).verified)

            # The detector's file changed (a new mtime): its session is built again, the others shared.
            then = os.stat(detector).st_mtime_ns + 10**9
            os.utime(detector, ns=(then, then))
            third = load(service, name, options, model_path=models)
            rebuilt = {id(s) for s in sessions_in(third)} - shared
            detector_sessions = (third.engine.detector.session, third.engine.detector.lone_session)
            self.assertEqual(rebuilt, {id(s) for s in detector_sessions if s is not None})
        # A file changed this moment is not vouched for by its version: never shared.
        os.utime(detector)
        fresh = [load(service, name, options, model_path=models).engine.detector.session for _ in range(2)]
        self.assertIsNot(fresh[0], fresh[1])
        # (Other settings, another thread count, make other sessions: test_engines.SessionSharingTest.)
        self.assertTrue(service.verify(self.obama1, self.obama2).verified)

    def test_a_request_in_flight_finishes_on_the_old_model_which_closes_right_after(self):
        service = FaceService(helpers=0)
        name, options = self.setups[support.ENGINE_ONNX_DIRECT]
        old = load(service, name, options)
        at_recognition, go_on = threading.Event(), threading.Event()
        closed_while_held = []

        def hold_at_recognition(stage: str) -> None:
            if stage == "recognition" and not at_recognition.is_set():
                at_recognition.set()
                go_on.wait(30)
                closed_while_held.append(old.closed)

        with ThreadPoolExecutor(max_workers=1) as caller:
            pending = caller.submit(service.verify, self.obama1, self.obama2, 0.0, True, "", hold_at_recognition)
            self.assertTrue(at_recognition.wait(30), "the request never reached recognition")
            new = load(service, "replacement", self.setups[support.ENGINE_INSIGHTFACE][1])
            self.assertIs(service.loaded, new)
            self.assertFalse(old.closed, "closed while a request held it")
            go_on.set()
            result = pending.result(timeout=60)
        self.assertEqual(closed_while_held, [False])
        self.assertEqual((result.model, result.verified), (name, True))
        self.assertIsNotNone(result.img1_liveness)
        self.assert_closed(old)
        self.assertEqual(service.verify(self.obama1, self.obama2).model, "replacement")

    def test_a_helper_still_running_after_its_request_failed_keeps_the_model_open(self):
        service = FaceService(helpers=1)
        old = load(service, *self.setups[support.ENGINE_ONNX_DIRECT])
        caller = threading.current_thread()
        helper_waiting, release_helper, helper_done = threading.Event(), threading.Event(), threading.Event()

        def checkpoint(stage: str) -> None:
            if threading.current_thread() is caller:
                if stage == "detection" and not helper_waiting.wait(30):
                    raise AssertionError("the helper never started img2")
            elif stage == "detection":
                helper_waiting.set()
                release_helper.wait(30)
                helper_done.set()

        with self.assertRaises(NoFaceError):
            service.verify(self.faceless, self.obama1, checkpoint=checkpoint)
        service.free()
        self.assertFalse(old.closed, "closed while img2 was still under way on the helper")
        release_helper.set()
        self.assertTrue(helper_done.wait(30))
        deadline = time.monotonic() + 10
        while not old.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assert_closed(old)

    def test_a_failed_load_closes_what_it_built(self):
        service = FaceService()
        name, options = self.setups[support.ENGINE_ONNX_DIRECT]
        previous = load(service, name, options)
        built = []

        def recording_build(request):
            built.append(build_engine(request))
            return built[-1]

        broken = [o for o in options if not o.startswith("antispoof_v1se_onnx")] + [
            "antispoof_v1se_onnx:no-such-liveness.onnx"
        ]
        with mock.patch("face_service.build_engine", recording_build), self.assertRaises(ModelFileError):
            load(service, "broken", broken)
        self.assertEqual(len(built), 1)
        self.assertEqual(sessions_in(built[0]), [], "the engine of a failed load kept its sessions")
        self.assertIs(service.loaded, previous)
        self.assertFalse(previous.closed)


def private_models(test: unittest.TestCase, options: Sequence[str]) -> str:
    """A temporary ModelPath with copies of the files `options` name: sessions of this test's own
    (sessions are shared between models of the same file)."""
    directory = support.temp_dir(test)
    for option in options:
        value = option.split(":", 1)[1]
        if value.endswith(".onnx"):
            shutil.copyfile(support.model_path(value), os.path.join(directory, value))
    return directory


def sessions_in(root) -> list[ort.InferenceSession]:
    """Every onnxruntime session reachable from `root`'s attributes, however the engine nests them."""
    return instances_in(root, ort.InferenceSession)


def instances_in(root, kind: type) -> list:
    """Every `kind` reachable from `root`'s attributes."""
    found, seen, pending = [], set(), [root]
    while pending:
        item = pending.pop()
        if id(item) in seen or isinstance(item, (str, bytes, int, float, np.ndarray)):
            continue
        seen.add(id(item))
        if isinstance(item, kind):
            found.append(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        elif hasattr(item, "__dict__"):
            pending.extend(vars(item).values())
    return found


class ThreadGrantTest(unittest.TestCase):
    """ModelOptions.Threads, the CPU threads the host grants, reaches every runtime of the model."""

    @classmethod
    def setUpClass(cls):
        support.liveness_files()
        cls.obama1, cls.obama2 = photo("obama_1.jpg"), photo("obama_2.jpg")
        cls.group = support.b64_file(support.data_path("insightface-wheel-images", "t1.jpg"))

    def tearDown(self):
        set_opencv_threads(0)

    def load_granting(self, service: FaceService, threads: int):
        name, options = support.engine_setup(support.ENGINE_ONNX_DIRECT)
        return service.load(parse_load_request(name, support.MODELS_DIR, threads, list(options)))

    def test_one_granted_thread_is_one_thread(self):
        service = FaceService()
        model = self.load_granting(service, 1)
        sessions = sessions_in(model)
        self.assertGreaterEqual(len(sessions), 5)  # recognizer, age, gender, MiniFASNetV2, V1SE
        for session in sessions:
            self.assertEqual(session.get_session_options().intra_op_num_threads, 1)
        self.assertEqual(cv2.getNumThreads(), 1)  # YuNet
        self.assertFalse(model.liveness.runs_models_side_by_side)
        threads_used = set()
        record = lambda stage: threads_used.add(threading.current_thread())
        self.assertTrue(service.verify(self.obama1, self.obama2, anti_spoofing=True, checkpoint=record).verified)
        self.assertEqual(len(service.analyze(self.group, anti_spoofing=True, checkpoint=record)), 6)
        self.assertEqual(threads_used, {threading.current_thread()})

    def test_a_grant_of_n_threads_and_no_grant(self):
        service = FaceService()
        granted = min(2, usable_cpus())
        for session in sessions_in(self.load_granting(service, granted)):
            self.assertEqual(session.get_session_options().intra_op_num_threads, granted)
        self.assertEqual(cv2.getNumThreads(), granted)
        model = self.load_granting(service, 0)  # the backend decides again
        self.assertEqual(cv2.getNumThreads(), OPENCV_DEFAULT_THREADS)
        self.assertEqual(model.liveness.runs_models_side_by_side, usable_cpus() > 1)

    def test_a_grant_beyond_the_cpus_is_capped_at_the_cpus(self):
        service = FaceService()
        model = self.load_granting(service, 100_000)
        for session in sessions_in(model):
            self.assertEqual(session.get_session_options().intra_op_num_threads, usable_cpus())
        self.assertEqual(cv2.getNumThreads(), usable_cpus())
        self.assertTrue(service.verify(self.obama1, self.obama2).verified)


class ServingAloneTest(unittest.TestCase):
    """Each request counts once for the models' threads (core.concurrency.serving_alone), however
    many threads it runs on."""

    def test_a_request_is_alone_whatever_its_threads_and_not_beside_another(self):
        service = FaceService()
        self.addCleanup(service.free)
        name, options = support.engine_setup(support.ENGINE_ONNX_DIRECT)
        service.load(parse_load_request(name, support.MODELS_DIR, 0, list(options)))
        obama1, obama2 = photo("obama_1.jpg"), photo("obama_2.jpg")
        # Room for the held request below beside the verify, whatever the CPUs.
        service._image_slots = threading.BoundedSemaphore(2)
        seen: list[bool] = []
        record = lambda stage: seen.append(serving_alone())
        self.assertTrue(service.verify(obama1, obama2, checkpoint=record).verified)
        self.assertEqual(set(seen), {True})

        inside, leave = threading.Event(), threading.Event()

        def held_in_detection(stage: str) -> None:
            inside.set()
            leave.wait(10)

        other = threading.Thread(target=service.analyze, args=(obama1,), kwargs={"checkpoint": held_in_detection})
        other.start()
        self.addCleanup(other.join, 30)
        self.addCleanup(leave.set)
        self.assertTrue(inside.wait(30))
        seen.clear()
        self.assertTrue(service.verify(obama1, obama2, checkpoint=record).verified)
        self.assertEqual(set(seen), {False})
        leave.set()
        other.join(30)
        seen.clear()
        self.assertTrue(service.verify(obama1, obama2, checkpoint=record).verified)
        self.assertEqual(set(seen), {True})


class LivenessTest(ErrorAssertions, unittest.TestCase):
    """anti_spoofing with the default set (MiniFASNetV2 + V1SE) on upstream's sample photos."""

    @classmethod
    def setUpClass(cls):
        support.liveness_files()
        cls.service = loaded_service(support.ENGINE_ONNX_DIRECT)
        spoof = support.spoof_photo
        cls.t1, cls.f1, cls.f2 = spoof("image_T1.jpg"), spoof("image_F1.jpg"), spoof("image_F2.jpg")
        cls.t1_image = support.read_image(support.data_path("silent-face-samples", "image_T1.jpg"))

    def test_real_face_against_itself_is_verified_and_real(self):
        result = self.service.verify(self.t1, self.t1, anti_spoofing=True)
        self.assertTrue(result.verified)
        for verdict in (result.img1_liveness, result.img2_liveness):
            self.assertIsNotNone(verdict)
            self.assertTrue(verdict.is_real)
            self.assertGreater(verdict.score, 0.9)

    def test_analyze_gives_one_answer_with_or_without_a_helper_thread(self):
        # Attributes on the request's thread, liveness on a helper; or both on one thread.
        alone = FaceService(helpers=0)
        load(alone, "alone", support.engine_setup(support.ENGINE_ONNX_DIRECT)[1])
        group = support.b64_file(support.data_path("insightface-wheel-images", "t1.jpg"))
        together = self.service.analyze(group, anti_spoofing=True)
        sequential = alone.analyze(group, anti_spoofing=True)
        self.assertEqual(len(together), 6)
        self.assertEqual([a.face.box for a in together], [a.face.box for a in sequential])
        self.assertEqual([a.attributes for a in together], [a.attributes for a in sequential])
        self.assertEqual([a.liveness for a in together], [a.liveness for a in sequential])
        self.assertTrue(all(a.liveness is not None and a.attributes.age is not None for a in together))

    def test_spoofs_are_vetoed(self):
        for name, spoof in (("image_F1", self.f1), ("image_F2", self.f2)):
            with self.subTest(name):
                result = self.service.verify(self.t1, spoof, anti_spoofing=True)
                self.assertFalse(result.verified)
                self.assertTrue(result.img1_liveness.is_real)
                self.assertFalse(result.img2_liveness.is_real)
                self.assertLess(result.img2_liveness.score, 0.5)
                reversed_ = self.service.verify(spoof, self.t1, anti_spoofing=True)
                self.assertFalse(reversed_.verified)
                self.assertFalse(reversed_.img1_liveness.is_real)
                self.assertTrue(reversed_.img2_liveness.is_real)

    def test_liveness_vetoes_a_matching_distance(self):
        # The same spoof photo twice: distance ~0, verified without liveness, vetoed with it.
        for name, spoof in (("image_F1", self.f1), ("image_F2", self.f2)):
            with self.subTest(name):
                plain = self.service.verify(spoof, spoof)
                self.assertTrue(plain.verified)
                self.assertIsNone(plain.img1_liveness)
                checked = self.service.verify(spoof, spoof, anti_spoofing=True)
                self.assertLess(checked.distance, checked.threshold)
                self.assertFalse(checked.verified)
                self.assertFalse(checked.img1_liveness.is_real)
                self.assertFalse(checked.img2_liveness.is_real)

    def test_face_crossing_the_image_border_scores(self):
        x1, y1, _, _ = (int(v) for v in self.service.loaded.engine.detect(self.t1_image)[0].box)
        touching = 0
        for cut in (40, 60, 80):
            with self.subTest(cut=cut):
                # The face box of the full photo now starts `cut` px outside the left and top edges.
                cropped = np.ascontiguousarray(self.t1_image[y1 + cut :, x1 + cut :])
                data = support.b64_image(cropped)
                result = self.service.verify(data, data, anti_spoofing=True)
                box = result.img1_face.box
                touching += box[0] <= 3 and box[1] <= 3
                for verdict in (result.img1_liveness, result.img2_liveness):
                    self.assertTrue(math.isfinite(verdict.score) and 0.0 <= verdict.score <= 1.0)
                    self.assertAlmostEqual(sum(verdict.probabilities), 1.0, places=5)
                analyzed = self.service.analyze(data, anti_spoofing=True)
                self.assertEqual(len(analyzed), 1)
                self.assertAlmostEqual(analyzed[0].liveness.score, result.img1_liveness.score, places=5)
        self.assertGreater(touching, 0, "no crop put the detected box on the left and top edges")

    def test_no_face_is_not_found_not_a_liveness_error(self):
        faceless = support.b64_image(support.faceless_image())
        for call, name in (
            (lambda: self.service.verify(faceless, self.t1, anti_spoofing=True), "img1"),
            (lambda: self.service.verify(self.t1, faceless, anti_spoofing=True), "img2"),
        ):
            with self.subTest(name):
                with self.assertRaises(NoFaceError) as caught:
                    call()
                self.assertNotIn("anti_spoofing", str(caught.exception))
                self.assert_names(str(caught.exception), name)
        self.assertEqual(self.service.analyze(faceless, anti_spoofing=True), [])

    def test_analyze_scores_every_face(self):
        group = support.b64_file(support.data_path("insightface-wheel-images", "t1.jpg"))
        analyzed = self.service.analyze(group, anti_spoofing=True)
        self.assertEqual(len(analyzed), 6)
        for item in analyzed:
            self.assertIsNotNone(item.liveness)
            self.assertTrue(0.0 <= item.liveness.score <= 1.0)
        self.assertTrue(all(item.liveness is None for item in self.service.analyze(group)))

    def test_real_photos_are_judged_real(self):
        folder = support.data_path(IMAGES)
        paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".jpg")]
        paths.append(support.data_path("insightface-wheel-images", "t1.jpg"))
        total, fakes = 0, []
        for path in paths:
            for item in self.service.analyze(support.b64_file(path), anti_spoofing=True):
                total += 1
                if not item.liveness.is_real:
                    fakes.append(f"{os.path.basename(path)} {item.face.box} {item.liveness.score:.2f}")
        self.assertGreaterEqual(total, 25)
        self.assertLessEqual(len(fakes), 0.05 * total, fakes)

    def test_liveness_also_works_with_the_insightface_engine(self):
        model_name, options = support.engine_setup(support.ENGINE_INSIGHTFACE)
        service = FaceService()
        model = load(service, model_name, options + list(support.LIVENESS_OPTIONS))
        self.assertIsNotNone(model.liveness)
        self.assertFalse(service.verify(self.t1, self.f2, anti_spoofing=True).verified)
        self.assertTrue(service.verify(self.t1, self.t1, anti_spoofing=True).verified)


if __name__ == "__main__":
    unittest.main()
