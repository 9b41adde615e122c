"""What only the tests need on top of harness/: the model setups they run against, and the rule
for a missing weight or photo.

On a user's machine a test whose weights are missing skips with a reason; under CI (CI=true) the
same absence is a failure, because a skipped test proves nothing.
"""

from __future__ import annotations

import os
import unittest

import antispoof
import catalog

# Shared with bench/ (which must not import tests/): paths and image helpers live in harness/.
from harness.images import b64_file, b64_image, faceless_image, read_bytes  # noqa: F401
from harness.paths import DATA, GROUP_PHOTO, IDENTITY_DIR, MODELS_DIR, REPO, SHARED, SPOOF_DIR  # noqa: F401
from harness.servers import free_port  # noqa: F401

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
