"""Shared test fixtures: where the real weights and labelled photos are, and how a missing one is handled.

On a user's machine a test whose weights are missing skips with a reason; under CI (CI=true) the
same absence is a failure, because a skipped test proves nothing.
"""
from __future__ import annotations

import os
import unittest

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
