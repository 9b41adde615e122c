"""What only the tests need on top of harness/: the model setups they run against, and the rule
for a missing weight or photo.

On a user's machine a test whose weights are missing skips with a reason; under CI (CI=true) the
same absence is a failure, because a skipped test proves nothing.
"""

from __future__ import annotations

import base64
import os
import re
import tempfile
import unittest
from collections.abc import Callable
from typing import TYPE_CHECKING
from unittest import mock

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

import antispoof
import backend_pb2
import backend_pb2_grpc
import catalog

# Shared with bench/ (which must not import tests/): paths and image helpers live in harness/.
from harness.images import b64_file, b64_image, faceless_image, read_bytes  # noqa: F401
from harness.paths import DATA, GROUP_PHOTO, IDENTITY_DIR, MODELS_DIR, REPO, SHARED, SPOOF_DIR  # noqa: F401
from harness.servers import InProcessServer, free_port  # noqa: F401

if TYPE_CHECKING:
    from face_service import FaceService

    # The mixins below hold test methods and assertions for several TestCase classes. Were they
    # TestCases at run time, unittest would run their tests unconfigured; to the type checker they
    # are TestCases, so that their self.assert* calls are checked.
    TestCaseMixin = unittest.TestCase
else:
    TestCaseMixin = object

UNDER_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CALL_TIMEOUT = 60.0  # per gRPC call: no test may hang on a stuck server


def require_files(*paths: str) -> None:
    """Skip (or, under CI, fail) the calling test when any of `paths` is missing."""
    missing = [p for p in paths if not os.path.exists(p)]
    if not missing:
        return
    message = "missing: " + ", ".join(missing) + " (run `make models`; data comes from ../shared)"
    if UNDER_CI:
        raise AssertionError("CI=true and " + message)
    raise unittest.SkipTest(message)


def model_path(name: str) -> str:
    """Path of an installed model file or pack directory under models/, required to exist."""
    path = os.path.join(MODELS_DIR, name)
    require_files(path)
    return path


def data_path(*parts: str) -> str:
    path = os.path.join(DATA, *parts)
    require_files(path)
    return path


def files_settled_at_once():
    """A context in which a file counts as settled (catalog.settled) as soon as it is written, so
    caches keyed by file versions take files a test has just written; otherwise they count only
    after catalog's racy-file interval (a file's change time cannot be set back)."""
    return mock.patch.object(catalog, "_RACY_SECONDS", 0.0)


def temp_dir(owner: unittest.TestCase | type[unittest.TestCase], prefix: str | None = None) -> str:
    """A temporary directory removed after the test `owner` (a TestCase), or after the last test
    of the class `owner` (also when its setUpClass fails after this call)."""
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    if isinstance(owner, type):
        owner.addClassCleanup(tmp.cleanup)
    else:
        owner.addCleanup(tmp.cleanup)
    return tmp.name


# -- the photos and strings the service and gRPC tests send --------------------------------------
IMAGES = os.path.join("face-recognition-examples", "images")
NOT_BASE64 = "this is *not* base64!"
GARBAGE_BASE64 = base64.b64encode(b"certainly not an image, just some bytes" * 20).decode()


def photo(name: str) -> str:
    """Base64 of face-recognition-examples/images/`name`, as the host sends it."""
    return b64_file(data_path(IMAGES, name))


def spoof_photo(name: str) -> str:
    """Base64 of silent-face-samples/`name`: upstream's liveness samples (T real, F fake)."""
    return b64_file(data_path("silent-face-samples", name))


def read_image(path: str) -> np.ndarray:
    """The BGR image cv2.imread reads from `path`, which must be one."""
    import cv2  # on use, as in harness.images

    image = cv2.imread(path)
    assert image is not None, f"{path} is not a readable image"
    return image


# -- helpers for the engine, service and gRPC tests ---------------------------------------------
# The two model setups every service-level test runs against ("both engines"):
# insightface buffalo_sc (SCRFD + w600k_mbf, 512-d, no liveness) and the permissive default set of
# face_service.DEFAULT_MODEL_OPTIONS (YuNet + MobileFaceNet 128-d + both MiniFASNet files + the
# age, gender and emotion heads).
ENGINE_INSIGHTFACE = "insightface"
ENGINE_ONNX_DIRECT = "onnx_direct"
ENGINES = (ENGINE_INSIGHTFACE, ENGINE_ONNX_DIRECT)
INSIGHTFACE_OPTIONS = ("engine:insightface", "model_pack:buffalo_sc")
# `option:file` of the MiniFASNet pair (V2 and V1SE): the liveness the host's gallery loads.
LIVENESS_OPTIONS = tuple(
    f.load_option
    for f in catalog.default().loadable(catalog.ROLE_ANTISPOOF)
    if f.load_key in antispoof.MINIFASNET_OPTIONS
)
EMBEDDING_DIM = {ENGINE_INSIGHTFACE: 512, ENGINE_ONNX_DIRECT: 128}
RECOGNIZER_FILE = {ENGINE_INSIGHTFACE: "w600k_mbf.onnx", ENGINE_ONNX_DIRECT: "MobileFaceNet.onnx"}


def default_threshold(kind: str) -> float:
    """The cosine-distance threshold FaceVerify applies for setup `kind` when a request sets none:
    its recognizer's in catalog/catalog.json."""
    from engines.recognition import recognizer_profile  # on use: onnxruntime and OpenCV come with it

    return recognizer_profile(RECOGNIZER_FILE[kind]).threshold


def engine_setup(kind: str) -> tuple[str, list[str]]:
    """(ModelOptions.Model, ModelOptions.Options) of one setup; its files must be installed."""
    if kind == ENGINE_INSIGHTFACE:
        pack_files("buffalo_sc")
        return "buffalo_sc", list(INSIGHTFACE_OPTIONS)
    if kind == ENGINE_ONNX_DIRECT:
        from face_service import DEFAULT_MODEL_OPTIONS

        for option in DEFAULT_MODEL_OPTIONS:
            key, value = option.split(":", 1)
            if value.endswith(".onnx"):
                model_path(value)
        return "face-default", list(DEFAULT_MODEL_OPTIONS)
    raise ValueError(f"unknown engine setup {kind!r}")


def pack_files(pack: str) -> dict[str, str]:
    """{member: installed path} of every member file the catalog lists for `pack`, each required."""
    return {m.name: model_path(os.path.join(pack, m.name)) for m in catalog.default().packs[pack].members}


def liveness_files() -> None:
    for option in LIVENESS_OPTIONS:
        model_path(option.split(":", 1)[1])


def single_face_photos() -> list[tuple[str, str]]:
    """(path, identity) of the 13 single-face photos of face-recognition-examples/labels.csv."""
    from evaluation import read_labels

    images, _ = read_labels(data_path("face-recognition-examples", "labels.csv"), "identity")
    return [(data_path("face-recognition-examples", "images", i.file), i.label) for i in images]


def assert_error_info(test: unittest.TestCase, error: grpc.RpcError, reason: str, field: str | None = None) -> None:
    """The failed call `error` carries the backend's google.rpc.ErrorInfo with `reason` and, when
    given, metadata `field` ("" for none), read as client.py reads it."""
    from backend import ERROR_DOMAIN
    from client import error_info

    info = error_info(error)
    # assert, not assertIsNotNone: the type checker narrows on it; a missing ErrorInfo fails the test alike.
    assert info is not None, f"no ErrorInfo on {error.code().name}: {error.details()!r}"
    test.assertEqual((info.domain, info.reason), (ERROR_DOMAIN, reason), error.details())
    if field is not None:
        test.assertEqual(info.metadata.get("field", ""), field, error.details())


# What a message shown to a caller must never contain: tracebacks, library internals, class names.
INTERNALS = re.compile(r"Traceback|cv2|OpenCV|Exception|[A-Za-z]Error\b|(^|\W)error:|binascii|File \"", re.IGNORECASE)


Metadata = tuple[tuple[str, str], ...]


class GrpcAssertions(TestCaseMixin):
    """Assertions on the backend that `running` serves over a real channel; `serve` starts one
    in this process for a test class. Health is asked with `call_metadata` (a bearer token)."""

    running: InProcessServer
    call_metadata: Metadata | None = None

    @classmethod
    def serve(cls, service: FaceService | None = None, token: str = "", **env: str) -> None:
        """`running` for the class's tests, closed after the last of them."""
        cls.running = InProcessServer(service, token, **env)
        cls.addClassCleanup(cls.running.close)

    @property
    def stub(self) -> backend_pb2_grpc.BackendStub:
        return self.running.stub

    def assert_clean_message(self, message: str, label: str = "") -> None:
        self.assertTrue(message, f"{label}: empty status message")
        self.assertIsNone(INTERNALS.search(message), f"{label}: message leaks internals: {message!r}")

    def assert_status(
        self,
        call: Callable[[], object],
        code: grpc.StatusCode,
        *fragments: str,
        label: str = "",
        names: str | None = None,
        reason: str | None = None,
        field: str | None = None,
        clean: bool = True,
    ) -> str:
        """`call()` fails with exactly `code` and a message containing every fragment and naming
        `names` as a word, clean of internals unless `clean` is false (for a message that echoes
        a name the caller chose); when `reason` is given, with an ErrorInfo of that reason and
        `field` (default: `names`); the server still answers Health afterwards. Returns the message."""
        with self.assertRaises(grpc.RpcError, msg=f"{label}: expected {code.name}, the call succeeded") as caught:
            call()
        error = caught.exception
        message = error.details() or ""
        self.assertEqual(error.code(), code, f"{label}: {error.code().name}: {message!r}")
        if clean:
            self.assert_clean_message(message, label)
        for fragment in fragments:
            self.assertIn(fragment, message, label)
        if names is not None:
            self.assertRegex(message, rf"(^|\W){re.escape(names)}(\W|$)", f"{label}: message does not name {names}")
        if reason is not None:
            assert_error_info(self, error, reason, names if field is None else field)
        self.assert_healthy(label)
        return message

    def assert_healthy(self, label: str = "") -> None:
        """The process still answers Health (with or without a model)."""
        reply = self.stub.Health(backend_pb2.HealthMessage(), timeout=CALL_TIMEOUT, metadata=self.call_metadata)
        self.assertEqual(reply.message, b"OK", label)

    def health_status(self) -> int:
        """grpc.health.v1's answer for the server as a whole: SERVING once a model is loaded."""
        return self.running.health.Check(
            health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT, metadata=self.call_metadata
        ).status

    def assert_serving(self, label: str = "") -> None:
        self.assert_healthy(label)
        self.assertEqual(self.health_status(), health_pb2.HealthCheckResponse.SERVING, label)

    def state(self) -> int:
        return self.stub.Status(backend_pb2.HealthMessage(), timeout=CALL_TIMEOUT).state


class NotFiniteSession:
    """A session that answers like `session` with every output value NaN (a broken export)."""

    def __init__(self, session) -> None:
        self._session = session

    def __getattr__(self, name: str):
        return getattr(self._session, name)

    def run(self, output_names, feeds):
        return [np.full_like(output, np.nan) for output in self._session.run(output_names, feeds)]


def not_finite_recognizer(engine):
    """`engine`'s ArcFace recognizer with its session answering NaN."""
    from engines.recognition import ArcFaceRecognizer

    recognizer = engine.recognizer
    return ArcFaceRecognizer(NotFiniteSession(recognizer.session), recognizer.profile)
