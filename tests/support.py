"""Shared test fixtures: where the real weights and labelled photos are, and how a missing one is handled.

On a user's machine a test whose weights are missing skips with a reason; under CI (CI=true) the
same absence is a failure, because a skipped test proves nothing.
"""
from __future__ import annotations

import os
import unittest

import catalog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.environ.get("FACE_MODELS_DIR", os.path.join(REPO, "models"))
SHARED = os.environ.get("FACE_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
DATA = os.path.join(SHARED, "data")
IDENTITY_DIR = os.path.join(DATA, "face-recognition-examples")
SPOOF_DIR = os.path.join(DATA, "silent-face-samples")
GROUP_PHOTO = os.path.join(DATA, "insightface-wheel-images", "t1.jpg")

UNDER_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- helpers for the engine, service and gRPC tests ---------------------------------------------
# The two model setups every service-level test runs against ("both engines"):
# insightface buffalo_sc (SCRFD + w600k_mbf, 512-d, no liveness) and the permissive default set of
# face_service.DEFAULT_MODEL_OPTIONS (YuNet + MobileFaceNet 128-d + both MiniFASNet files + the
# age, gender and emotion heads).
ENGINE_INSIGHTFACE = "insightface"
ENGINE_ONNX_DIRECT = "onnx_direct"
ENGINES = (ENGINE_INSIGHTFACE, ENGINE_ONNX_DIRECT)
INSIGHTFACE_OPTIONS = ("engine:insightface", "model_pack:buffalo_sc")
# `option:file` of every liveness file the catalog knows (MiniFASNetV2 and MiniFASNetV1SE).
LIVENESS_OPTIONS = tuple(f.load_option for f in catalog.default().loadable(catalog.ROLE_ANTISPOOF))
EMBEDDING_DIM = {ENGINE_INSIGHTFACE: 512, ENGINE_ONNX_DIRECT: 128}


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


def b64_file(path: str) -> str:
    """Base64 of a file's bytes, as the host sends images."""
    import base64
    return base64.b64encode(read_bytes(path)).decode("ascii")


def b64_image(image, ext: str = ".jpg") -> str:
    """Base64 of a BGR array encoded with OpenCV."""
    import base64
    import cv2
    ok, encoded = cv2.imencode(ext, image)
    assert ok, "cv2.imencode failed"
    return base64.b64encode(encoded.tobytes()).decode("ascii")


def faceless_image(width: int = 640, height: int = 480):
    """A smooth colour gradient: a valid photo in which no detector finds a face."""
    import numpy as np
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    image[..., 1] = 128
    image[..., 2] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    return image


def single_face_photos() -> list[tuple[str, str]]:
    """(path, identity) of the 13 single-face photos of face-recognition-examples/labels.csv."""
    from evaluation import read_labels
    images, _ = read_labels(data_path("face-recognition-examples", "labels.csv"), "identity")
    return [(data_path("face-recognition-examples", "images", i.file), i.label) for i in images]


def assert_error_info(test: unittest.TestCase, error, reason: str, field: str | None = None) -> None:
    """The failed call `error` carries the backend's google.rpc.ErrorInfo with `reason` and, when
    given, metadata `field` ("" for none), read as client.py reads it."""
    from backend import ERROR_DOMAIN
    from client import error_info
    info = error_info(error)
    test.assertIsNotNone(info, f"no ErrorInfo on {error.code().name}: {error.details()!r}")
    test.assertEqual((info.domain, info.reason), (ERROR_DOMAIN, reason), error.details())
    if field is not None:
        test.assertEqual(info.metadata.get("field", ""), field, error.details())


def free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_START_SECONDS = 120.0


def wait_for_health(process, port: int, token: str = "") -> None:
    """Return once the backend `process` started on `port` answers Health; fail with its stderr
    if it exits first or does not answer within SERVER_START_SECONDS."""
    import time

    import grpc

    import backend_pb2
    import backend_pb2_grpc
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    deadline = time.monotonic() + SERVER_START_SECONDS
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = backend_pb2_grpc.BackendStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise AssertionError(f"backend exited with {process.returncode}: {stderr[-2000:]}")
            try:
                stub.Health(backend_pb2.HealthMessage(), timeout=1, metadata=metadata)
                return
            except grpc.RpcError:
                time.sleep(0.2)
    raise AssertionError(f"backend on port {port} not healthy within {SERVER_START_SECONDS} s")


def stop_process(process) -> None:
    """SIGTERM, then SIGKILL after 15 s; closes the pipes the test opened."""
    import subprocess
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()
