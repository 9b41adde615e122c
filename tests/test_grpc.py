"""The backend over a real gRPC channel: the servicer built by backend.create_server on
127.0.0.1, both model setups, every status code of the wire contract (../shared/docs/CONTRACT.md),
the ModelIdentity guard, the grpc.health.v1 service and concurrency. Bearer-token auth, hostile
input and `backend.py` as a process (signals, parent watch) are test_hardening's; run.sh and the
host's configurations, test_host's.
"""

from __future__ import annotations

import threading
import time
import unittest
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2

import backend_pb2
from face_service import FaceService
from harness.servers import InProcessServer
from tests import support
from tests.support import CALL_TIMEOUT, GARBAGE_BASE64, NOT_BASE64, GrpcAssertions, photo

LIVENESS_FIELDS = (
    "img1_is_real",
    "img1_antispoof_score",
    "img1_liveness_status",
    "img2_is_real",
    "img2_antispoof_score",
    "img2_liveness_status",
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_options(kind: str, name: str | None = None, extra: Sequence[str] = ()) -> backend_pb2.ModelOptions:
    model_name, options = support.engine_setup(kind)
    return backend_pb2.ModelOptions(
        Model=model_name if name is None else name, ModelPath=support.MODELS_DIR, Options=list(options) + list(extra)
    )


class EngineCases(GrpcAssertions):
    """One server per model setup, loaded once over the wire; subclasses set KIND."""

    KIND: str
    model_name: str
    obama1: str
    obama2: str
    biden1: str
    group: str
    faceless: str
    load_result: backend_pb2.Result

    @classmethod
    def setUpClass(cls):
        options = model_options(cls.KIND)
        cls.model_name = options.Model
        cls.obama1, cls.obama2, cls.biden1 = photo("obama_1.jpg"), photo("obama_2.jpg"), photo("biden_1.jpg")
        cls.group = support.b64_file(support.data_path("insightface-wheel-images", "t1.jpg"))
        cls.faceless = support.b64_image(support.faceless_image())
        cls.serve()
        cls.load_result = cls.running.stub.LoadModel(options, timeout=CALL_TIMEOUT)

    def assert_invalid(self, call: Callable[[], object], name: str, reason: str) -> str:
        """`call()` is INVALID_ARGUMENT with `reason`, naming `name` in its message and as its field."""
        return self.assert_status(call, grpc.StatusCode.INVALID_ARGUMENT, name, reason=reason, field=name)

    def verify(self, img1, img2, **kwargs) -> backend_pb2.FaceVerifyResponse:
        return self.stub.FaceVerify(backend_pb2.FaceVerifyRequest(img1=img1, img2=img2, **kwargs), timeout=CALL_TIMEOUT)

    def test_load_model_succeeded(self):
        self.assertTrue(self.load_result.success, self.load_result.message)
        self.assertIn(self.running.service.loaded.engine.name, self.load_result.message)

    def test_status_ready_with_memory(self):
        status = self.stub.Status(backend_pb2.HealthMessage(), timeout=CALL_TIMEOUT)
        self.assertEqual(status.state, backend_pb2.StatusResponse.READY)
        self.assertGreater(status.memory.total, 0)
        # The breakdown (face_service.FaceService.memory_usage): where the RSS goes.
        memory = status.memory.breakdown
        self.assertEqual(memory["rss"], status.memory.total)
        self.assertLess(0, memory["baseline_rss"])
        # The baseline is the RSS when the service was made. (Not compared with the RSS now: the
        # server runs in this test process, whose RSS LoadModel's trim can take below it by handing
        # back heap pages earlier tests left.)
        before = psutil.Process().memory_info().rss
        baseline = FaceService(helpers=0).memory_usage()["baseline_rss"]
        self.assertLess(abs(baseline - before), 16 * 2**20)
        self.assertEqual(memory["rss_anon"] + memory["rss_file"], memory["rss"])
        self.assertGreater(memory["heap_in_use"], memory["model_files"])
        self.assertGreater(memory["model_files"], 1_000_000)  # the loaded weights: MBs, not bytes
        # Nothing in flight between tests, once a call an earlier test abandoned (a deadline, a
        # cancel) has stopped at its next stage on the server: decoded images do not outlive it.
        deadline = time.monotonic() + 10.0
        while memory["images_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
            memory = self.stub.Status(backend_pb2.HealthMessage(), timeout=CALL_TIMEOUT).memory.breakdown
        self.assertEqual(memory["images_in_flight"], 0)
        self.assertEqual(memory["jpeg_coefficients_in_flight"], 0)

    def test_health(self):
        self.assert_healthy()
        self.assertEqual(self.health_status(), SERVING)

    def test_verify_same_and_different(self):
        same = self.verify(self.obama1, self.obama2)
        self.assertTrue(same.verified)
        different = self.verify(self.obama1, self.biden1)
        self.assertFalse(different.verified)
        for response in (same, different):
            self.assertTrue(0.0 <= response.distance <= 2.0)
            self.assertAlmostEqual(response.threshold, support.default_threshold(self.KIND), places=5)
            self.assertTrue(0.0 <= response.confidence <= 100.0)
            self.assertEqual(response.confidence > 50.0, response.verified)
            self.assertEqual(response.model, self.model_name)
            self.assertGreater(response.processing_time_ms, 0.0)
            for area in (response.img1_area, response.img2_area):
                self.assertGreater(area.w, 0.0)
                self.assertGreater(area.h, 0.0)
            for field in LIVENESS_FIELDS:  # liveness did not run: absent, not false
                self.assertFalse(response.HasField(field), field)
        self.assertLess(same.distance, same.threshold)
        self.assertGreater(different.distance, different.threshold)
        custom = self.verify(self.obama1, self.obama2, threshold=same.distance / 2)
        self.assertFalse(custom.verified)
        self.assertAlmostEqual(custom.threshold, same.distance / 2, places=5)

    def test_analyze_group_photo(self):
        response = self.running.stub.FaceAnalyze(backend_pb2.FaceAnalyzeRequest(img=self.group), timeout=CALL_TIMEOUT)
        self.assertEqual(len(response.faces), 6)
        for face in response.faces:
            self.assertGreater(face.region.w, 20)
            self.assertGreater(face.region.h, 20)
            self.assertTrue(0.0 < face.face_confidence <= 1.0)
            self.assertFalse(face.HasField("is_real"))
            self.assertFalse(face.HasField("antispoof_score"))

    def test_embedding(self):
        response = self.stub.Embedding(backend_pb2.PredictOptions(Images=[self.obama1]), timeout=CALL_TIMEOUT)
        dim = support.EMBEDDING_DIM[self.KIND]
        self.assertEqual(response.dim, dim)
        self.assertEqual(response.tokens, 1)
        self.assertEqual(response.layout, backend_pb2.EMBEDDING_LAYOUT_FINAL)
        self.assertEqual(len(response.embeddings), dim)
        vector = np.asarray(response.embeddings, dtype=np.float64)
        self.assertAlmostEqual(float(np.linalg.norm(vector)), 1.0, places=5)
        other = self.stub.Embedding(backend_pb2.PredictOptions(Images=[self.biden1]), timeout=CALL_TIMEOUT)
        distance = 1.0 - float(vector @ np.asarray(other.embeddings))
        self.assertAlmostEqual(distance, self.verify(self.obama1, self.biden1).distance, places=4)
        self.assert_invalid(
            lambda: self.stub.Embedding(backend_pb2.PredictOptions(), timeout=CALL_TIMEOUT),
            "Images[0]",
            "IMAGE_MISSING",
        )

    def test_detect(self):
        response = self.stub.Detect(backend_pb2.DetectOptions(src=self.group), timeout=CALL_TIMEOUT)
        self.assertEqual(len(response.Detections), 6)
        for detection in response.Detections:
            self.assertEqual(detection.class_name, "face")
            self.assertGreater(detection.width, 20)
            self.assertGreater(detection.height, 20)
            self.assertTrue(0.0 < detection.confidence <= 1.0)
        strict = self.stub.Detect(backend_pb2.DetectOptions(src=self.group, threshold=0.99), timeout=CALL_TIMEOUT)
        self.assertEqual(len(strict.Detections), 0)
        empty = self.stub.Detect(backend_pb2.DetectOptions(src=self.faceless), timeout=CALL_TIMEOUT)
        self.assertEqual(len(empty.Detections), 0)
        for src, reason in (
            (GARBAGE_BASE64, "IMAGE_UNDECODABLE"),
            (NOT_BASE64, "IMAGE_NOT_BASE64"),
            ("", "IMAGE_MISSING"),
        ):
            with self.subTest(src=src[:10]):
                self.assert_invalid(
                    lambda: self.stub.Detect(backend_pb2.DetectOptions(src=src), timeout=CALL_TIMEOUT),
                    "src",
                    reason,
                )
        self.assert_invalid(
            lambda: self.stub.Detect(backend_pb2.DetectOptions(src=self.group, threshold=1.5), timeout=CALL_TIMEOUT),
            "threshold",
            "BAD_THRESHOLD",
        )

    def test_invalid_argument_names_the_image(self):
        not_base64, undecodable = "IMAGE_NOT_BASE64", "IMAGE_UNDECODABLE"
        for img1, img2, name, reason in (
            (NOT_BASE64, self.obama1, "img1", not_base64),
            (self.obama1, NOT_BASE64, "img2", not_base64),
            (GARBAGE_BASE64, self.obama1, "img1", undecodable),
            (self.obama1, GARBAGE_BASE64, "img2", undecodable),
        ):
            with self.subTest(name=name, img1=img1[:10], img2=img2[:10]):
                details = self.assert_invalid(
                    lambda: self.stub.FaceVerify(
                        backend_pb2.FaceVerifyRequest(img1=img1, img2=img2), timeout=CALL_TIMEOUT
                    ),
                    name,
                    reason,
                )
                self.assertNotIn({"img1": "img2", "img2": "img1"}[name], details)
        self.assert_invalid(
            lambda: self.stub.FaceAnalyze(backend_pb2.FaceAnalyzeRequest(img=NOT_BASE64), timeout=CALL_TIMEOUT),
            "img",
            not_base64,
        )
        self.assert_invalid(
            lambda: self.stub.Embedding(backend_pb2.PredictOptions(Images=[GARBAGE_BASE64]), timeout=CALL_TIMEOUT),
            "Images[0]",
            undecodable,
        )
        self.assert_invalid(
            lambda: self.stub.FaceVerify(
                backend_pb2.FaceVerifyRequest(img1=self.obama1, img2=self.obama2, threshold=-1.0), timeout=CALL_TIMEOUT
            ),
            "threshold",
            "BAD_THRESHOLD",
        )
        self.assert_status(
            lambda: self.stub.FaceAnalyze(
                backend_pb2.FaceAnalyzeRequest(img=self.obama1, actions=["colour"]), timeout=CALL_TIMEOUT
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "colour",
            reason="BAD_ACTION",
            field="actions",
        )

    def test_not_found_names_the_image(self):
        not_found = grpc.StatusCode.NOT_FOUND
        cases = [
            (self.stub.FaceVerify, backend_pb2.FaceVerifyRequest(img1=self.faceless, img2=self.obama1), "img1"),
            (self.stub.FaceVerify, backend_pb2.FaceVerifyRequest(img1=self.obama1, img2=self.faceless), "img2"),
            (self.stub.Embedding, backend_pb2.PredictOptions(Images=[self.faceless]), "Images[0]"),
        ]
        for call, request, name in cases:
            with self.subTest(name):
                details = self.assert_status(
                    lambda: call(request, timeout=CALL_TIMEOUT), not_found, name, reason="NO_FACE", field=name
                )
                self.assertEqual(details, f"no face found in {name}")

    def test_faceless_photo_analyzes_to_no_faces(self):
        reply = self.stub.FaceAnalyze(backend_pb2.FaceAnalyzeRequest(img=self.faceless), timeout=CALL_TIMEOUT)
        self.assertEqual(list(reply.faces), [])

    def test_identity_guard(self):
        not_found = grpc.StatusCode.NOT_FOUND
        expected = f"model identity mismatch: loaded '{self.model_name}', requested 'other-model'"
        cases = self.identity_requests("other-model")
        for call, request in cases:
            with self.subTest(type(request).__name__):
                self.assert_status(
                    lambda: call(request, timeout=CALL_TIMEOUT),
                    not_found,
                    expected,
                    reason="IDENTITY_MISMATCH",
                    field="ModelIdentity",
                )
        same = self.verify(self.obama1, self.obama2, ModelIdentity=self.model_name)
        self.assertTrue(same.verified)

    def identity_requests(self, identity: str):
        """(call, request) of every RPC that takes a ModelIdentity, asking for `identity`."""
        return [
            (
                self.stub.FaceVerify,
                backend_pb2.FaceVerifyRequest(img1=self.obama1, img2=self.obama2, ModelIdentity=identity),
            ),
            (self.stub.FaceAnalyze, backend_pb2.FaceAnalyzeRequest(img=self.obama1, ModelIdentity=identity)),
            (self.stub.Embedding, backend_pb2.PredictOptions(Images=[self.obama1], ModelIdentity=identity)),
            (self.stub.Detect, backend_pb2.DetectOptions(src=self.obama1, ModelIdentity=identity)),
        ]

    def test_identity_guard_skips_an_empty_identity_and_an_unnamed_model(self):
        for identity in ("", self.model_name):
            for call, request in self.identity_requests(identity):
                with self.subTest(type(request).__name__, identity=identity):
                    call(request, timeout=CALL_TIMEOUT)
        # A model loaded without a name accepts any identity; the class's model is reloaded after.
        self.addCleanup(self.stub.LoadModel, model_options(self.KIND), timeout=CALL_TIMEOUT)
        unnamed = self.stub.LoadModel(model_options(self.KIND, name=""), timeout=CALL_TIMEOUT)
        self.assertTrue(unnamed.success, unnamed.message)
        for call, request in self.identity_requests("anything"):
            with self.subTest(type(request).__name__, identity="anything, unnamed model"):
                call(request, timeout=CALL_TIMEOUT)

    def test_concurrent_verify(self):
        threads, calls = 4, 5
        barrier = threading.Barrier(threads)

        def worker(_):
            barrier.wait(timeout=30)
            return [self.verify(self.obama1, self.obama2) for _ in range(calls)]

        with futures.ThreadPoolExecutor(threads) as pool:
            results = [r for batch in pool.map(worker, range(threads)) for r in batch]
        self.assertEqual(len(results), threads * calls)
        self.assertTrue(all(r.verified for r in results))
        self.assertEqual(len({r.distance for r in results}), 1, sorted({r.distance for r in results}))
        self.assertEqual(len({(r.img1_area.x, r.img1_area.y, r.img1_area.w) for r in results}), 1)


class InsightfaceGrpcTest(EngineCases, unittest.TestCase):
    KIND = support.ENGINE_INSIGHTFACE

    def test_load_message_says_without_liveness(self):
        self.assertIn("without liveness", self.load_result.message)

    def test_anti_spoofing_without_liveness_weights_is_failed_precondition(self):
        for image in (self.obama1, GARBAGE_BASE64, self.faceless):
            for call, request in (
                (self.stub.FaceVerify, backend_pb2.FaceVerifyRequest(img1=image, img2=self.obama1, anti_spoofing=True)),
                (self.stub.FaceAnalyze, backend_pb2.FaceAnalyzeRequest(img=image, anti_spoofing=True)),
            ):
                with self.subTest(type(request).__name__, image=image[:10]):
                    self.assert_status(
                        lambda: call(request, timeout=CALL_TIMEOUT),
                        grpc.StatusCode.FAILED_PRECONDITION,
                        "antispoof_v2_onnx",
                        "antispoof_v1se_onnx",
                        reason="LIVENESS_WEIGHTS_MISSING",
                        field="anti_spoofing",
                    )

    def test_action_without_its_model_is_left_empty(self):
        # buffalo_sc has no genderage.onnx and no age/gender heads were given: the host's rule
        reply = self.stub.FaceAnalyze(
            backend_pb2.FaceAnalyzeRequest(img=self.obama1, actions=["age"]), timeout=CALL_TIMEOUT
        )
        self.assertEqual(len(reply.faces), 1)
        self.assertEqual(reply.faces[0].age, 0.0)


class OnnxDirectGrpcTest(EngineCases, unittest.TestCase):
    KIND = support.ENGINE_ONNX_DIRECT
    t1: str
    f1: str

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        spoof = lambda name: support.b64_file(support.data_path("silent-face-samples", name))
        cls.t1, cls.f1 = spoof("image_T1.jpg"), spoof("image_F1.jpg")

    def test_load_message_says_with_liveness(self):
        self.assertIn("with liveness", self.load_result.message)
        self.assertNotIn("without", self.load_result.message)

    def test_liveness_fields_present_only_with_anti_spoofing(self):
        checked = self.verify(self.t1, self.f1, anti_spoofing=True)
        for field in LIVENESS_FIELDS:
            self.assertTrue(checked.HasField(field), field)
        self.assertFalse(checked.verified)
        self.assertTrue(checked.img1_is_real)
        self.assertFalse(checked.img2_is_real)
        self.assertGreater(checked.img1_antispoof_score, 0.9)
        self.assertLess(checked.img2_antispoof_score, 0.5)
        real = self.verify(self.t1, self.t1, anti_spoofing=True)
        self.assertTrue(real.verified)
        self.assertTrue(real.HasField("img1_is_real") and real.img1_is_real and real.img2_is_real)
        self.assertEqual((real.img1_liveness_status, real.img2_liveness_status), ("LIVE", "LIVE"))
        self.assertEqual(checked.img2_liveness_status, "SPOOF")
        self.assertFalse(checked.HasField("img1_liveness_reason") or checked.HasField("img2_liveness_reason"))
        self.assertIn("minifasnet", checked.img1_antispoof_engines)
        self.assertAlmostEqual(min(checked.img1_antispoof_engines.values()), checked.img1_antispoof_score, places=6)
        unchecked = self.verify(self.t1, self.f1)
        for field in LIVENESS_FIELDS + ("img1_liveness_reason", "img1_liveness_message"):
            self.assertFalse(unchecked.HasField(field), field)
        self.assertEqual((len(unchecked.img1_antispoof_engines), len(unchecked.img2_antispoof_engines)), (0, 0))

    def test_an_inconclusive_face_never_verifies_and_says_why(self):
        # A tight face crop matches itself, but liveness cannot judge it: the veto fails closed.
        crop = support.b64_file(support.data_path("antispoof-dev", "real", "siwmv2_live_1.png"))
        response = self.verify(crop, self.t1, anti_spoofing=True)
        self.assertFalse(response.verified)
        self.assertFalse(response.img1_is_real)
        self.assertEqual(response.img1_liveness_status, "INCONCLUSIVE")
        self.assertEqual(response.img1_liveness_reason, "FACE_CROP_OUTSIDE_IMAGE")
        self.assertIn("whole camera frame", response.img1_liveness_message)
        self.assertEqual(response.img2_liveness_status, "LIVE")
        self.assertTrue(response.HasField("img1_antispoof_score"))
        itself = self.verify(crop, crop, anti_spoofing=True)
        self.assertLess(itself.distance, itself.threshold)
        self.assertFalse(itself.verified)
        analysed = self.stub.FaceAnalyze(
            backend_pb2.FaceAnalyzeRequest(img=crop, anti_spoofing=True), timeout=CALL_TIMEOUT
        )
        self.assertEqual(
            [(f.liveness_status, f.liveness_reason) for f in analysed.faces],
            [("INCONCLUSIVE", "FACE_CROP_OUTSIDE_IMAGE")],
        )

    def test_analyze_with_anti_spoofing_scores_every_face(self):
        response = self.stub.FaceAnalyze(
            backend_pb2.FaceAnalyzeRequest(img=self.group, anti_spoofing=True), timeout=CALL_TIMEOUT
        )
        self.assertEqual(len(response.faces), 6)
        for face in response.faces:
            self.assertTrue(face.HasField("is_real"))
            self.assertTrue(face.HasField("antispoof_score"))
            self.assertTrue(0.0 <= face.antispoof_score <= 1.0)
        fake = self.stub.FaceAnalyze(
            backend_pb2.FaceAnalyzeRequest(img=self.f1, anti_spoofing=True), timeout=CALL_TIMEOUT
        )
        self.assertEqual(len(fake.faces), 1)
        self.assertTrue(fake.faces[0].HasField("is_real"))
        self.assertFalse(fake.faces[0].is_real)

    def test_no_face_with_liveness_loaded_is_not_found(self):
        self.assert_status(
            lambda: self.stub.FaceVerify(
                backend_pb2.FaceVerifyRequest(img1=self.t1, img2=self.faceless, anti_spoofing=True),
                timeout=CALL_TIMEOUT,
            ),
            grpc.StatusCode.NOT_FOUND,
            "img2",
            reason="NO_FACE",
            field="img2",
        )


class NoModelGrpcTest(GrpcAssertions, unittest.TestCase):
    image: str

    @classmethod
    def setUpClass(cls):
        cls.serve()
        cls.image = support.b64_image(support.faceless_image())

    def test_not_ready(self):
        self.assert_healthy()  # the process answers Health with or without a model
        self.assertEqual(self.health_status(), NOT_SERVING)
        self.assertEqual(self.state(), backend_pb2.StatusResponse.UNINITIALIZED)

    def test_every_request_is_failed_precondition(self):
        precondition = grpc.StatusCode.FAILED_PRECONDITION
        image = self.image
        cases = [
            (self.stub.FaceVerify, backend_pb2.FaceVerifyRequest(img1=image, img2=image)),
            (self.stub.FaceVerify, backend_pb2.FaceVerifyRequest(img1=image, img2=image, anti_spoofing=True)),
            (self.stub.FaceAnalyze, backend_pb2.FaceAnalyzeRequest(img=image)),
            (self.stub.Embedding, backend_pb2.PredictOptions(Images=[image])),
            (self.stub.Detect, backend_pb2.DetectOptions(src=image)),
        ]
        for call, request in cases:
            with self.subTest(type(request).__name__):
                self.assert_status(
                    lambda: call(request, timeout=CALL_TIMEOUT),
                    precondition,
                    "LoadModel",
                    reason="NO_MODEL_LOADED",
                    field="",
                )


class FreshServerCases(GrpcAssertions):
    """Each test gets a server of its own, started with no model, and verifies two Obama photos."""

    obama1: str
    obama2: str

    @classmethod
    def setUpClass(cls):
        cls.obama1, cls.obama2 = photo("obama_1.jpg"), photo("obama_2.jpg")

    def setUp(self):
        self.running = InProcessServer()
        self.addCleanup(self.running.close)

    def verify_obama(self, identity: str = "") -> backend_pb2.FaceVerifyResponse:
        request = backend_pb2.FaceVerifyRequest(img1=self.obama1, img2=self.obama2, ModelIdentity=identity)
        return self.stub.FaceVerify(request, timeout=CALL_TIMEOUT)

    def assert_nothing_loaded(self) -> None:
        """UNINITIALIZED, NOT_SERVING, and a FaceVerify is FAILED_PRECONDITION."""
        self.assertEqual(self.state(), backend_pb2.StatusResponse.UNINITIALIZED)
        self.assertEqual(self.health_status(), NOT_SERVING)
        self.assert_status(self.verify_obama, grpc.StatusCode.FAILED_PRECONDITION, reason="NO_MODEL_LOADED")


class LifecycleGrpcTest(FreshServerCases, unittest.TestCase):
    """LoadModel -> READY / SERVING, Free -> UNINITIALIZED / NOT_SERVING, for both setups."""

    def test_load_free_reload(self):
        for kind in support.ENGINES:
            with self.subTest(kind):
                self.assertEqual(self.health_status(), NOT_SERVING)
                result = self.stub.LoadModel(model_options(kind), timeout=CALL_TIMEOUT)
                self.assertTrue(result.success, result.message)
                status = self.stub.Status(backend_pb2.HealthMessage(), timeout=CALL_TIMEOUT)
                self.assertEqual(status.state, backend_pb2.StatusResponse.READY)
                self.assertGreater(status.memory.total, 0)
                self.assertEqual(self.health_status(), SERVING)
                self.assertTrue(self.verify_obama().verified)
                freed = self.stub.Free(backend_pb2.HealthMessage(), timeout=CALL_TIMEOUT)
                self.assertTrue(freed.success)
                self.assert_nothing_loaded()


class FailedLoadGrpcTest(FreshServerCases, unittest.TestCase):
    """A failed LoadModel answers success=false naming the problem, and the previous engine keeps
    answering exactly as before."""

    def test_failed_first_load_leaves_nothing_loaded(self):
        for options in (
            [
                "engine:onnx_direct",
                "detector_onnx:face_detection_yunet_2023mar.onnx",
                "recognizer_onnx:no-such-recognizer.onnx",
            ],
            ["colour:blue"],
        ):
            with self.subTest(options=options):
                failed = self.stub.LoadModel(
                    backend_pb2.ModelOptions(Model="x", ModelPath=support.MODELS_DIR, Options=options),
                    timeout=CALL_TIMEOUT,
                )
                self.assertFalse(failed.success)
                self.assert_nothing_loaded()
        negative_threads = model_options(support.ENGINE_INSIGHTFACE)
        negative_threads.Threads = -1
        failed = self.stub.LoadModel(negative_threads, timeout=CALL_TIMEOUT)
        self.assertFalse(failed.success)
        self.assertIn("Threads", failed.message)

    def test_failed_load_keeps_the_previous_engine(self):
        for kind in support.ENGINES:
            good = model_options(kind)
            result = self.stub.LoadModel(good, timeout=CALL_TIMEOUT)
            self.assertTrue(result.success, result.message)
            before = self.verify_obama()
            bad_loads = [
                (
                    "missing file",
                    [
                        "engine:onnx_direct",
                        "detector_onnx:face_detection_yunet_2023mar.onnx",
                        "recognizer_onnx:no-such-recognizer.onnx",
                    ],
                    "no-such-recognizer.onnx",
                ),
                (
                    "missing liveness file",
                    list(good.Options) + ["antispoof_v2_onnx:no-such-liveness.onnx"],
                    "no-such-liveness.onnx",
                ),
                ("bad det_thresh", list(good.Options) + ["det_thresh:often"], "det_thresh"),
                ("bad det_size", list(good.Options) + ["det_size:huge"], "det_size"),
                ("unknown pack", ["engine:insightface", "model_pack:buffalo_xx"], "buffalo_xx"),
            ]
            for label, options, text in bad_loads:
                with self.subTest(kind, load=label):
                    failed = self.stub.LoadModel(
                        backend_pb2.ModelOptions(Model="replacement", ModelPath=support.MODELS_DIR, Options=options),
                        timeout=CALL_TIMEOUT,
                    )
                    self.assertFalse(failed.success)
                    self.assertIn(text, failed.message)
                    self.assert_healthy()
                    self.assertEqual(self.state(), backend_pb2.StatusResponse.READY)
                    self.assertEqual(self.health_status(), SERVING)
                    after = self.verify_obama(identity=good.Model)
                    self.assertTrue(after.verified)
                    self.assertEqual(after.model, before.model)
                    self.assertEqual(after.distance, before.distance)
                    self.assert_status(
                        lambda: self.verify_obama(identity="replacement"),
                        grpc.StatusCode.NOT_FOUND,
                        "model identity mismatch",
                        reason="IDENTITY_MISMATCH",
                    )


if __name__ == "__main__":
    unittest.main()
