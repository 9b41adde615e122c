"""LoadModel options: `key:value` strings from ModelOptions.Options, validated in one place."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import overload

import catalog
from core.concurrency import usable_cpus
from core.errors import ModelFileError, ModelOptionError

log = logging.getLogger(__name__)

# Keys of the host's model gallery (../shared/docs/CONTRACT.md) plus the ones this backend adds.
KNOWN_OPTIONS = {
    "engine": "insightface or onnx_direct",
    "model_pack": f"insightface pack name ({', '.join(catalog.default().packs)})",
    "root": "extra directory to look for insightface packs in",
    "det_size": "detector input, e.g. 640x640 or 640",
    "det_thresh": "detector score threshold in (0, 1)",
    "verify_threshold": "default cosine-distance threshold for FaceVerify",
    "detector_onnx": "onnx_direct detector file (YuNet or SCRFD)",
    "recognizer_onnx": "onnx_direct recognizer file (ArcFace-style 112x112 or SFace)",
    "recognizer_preprocess": "input normalisation of an unknown recognizer: arcface or imagenet",
    **{
        f.load_key: f"{os.path.splitext(f.name)[0]} liveness model file"
        for f in catalog.default().loadable(catalog.ROLE_ANTISPOOF)
    },
    "antispoof_threshold": "P(real) needed for is_real, in [0, 1]",
    "age_onnx": "age head file (Cydral age-v1.onnx)",
    "gender_onnx": "gender head file (Cydral gender-v1.onnx)",
    "emotion_onnx": "emotion head file (OpenCV Zoo facial expression recognition, int8 MobileFaceNet)",
    "quality_onnx": "face quality file (LightQNet), reported per face and used by the liveness gate",
    "store": "sqlite or postgres: serve the host's Stores RPCs (a face gallery) instead of the face RPCs",
    "store_path": "store:sqlite database file (default face-store.sqlite in ModelPath)",
    "store_dsn": "store:postgres libpq connection string, e.g. postgresql://user:pw@host/db",
}
# Keys whose loss weakens a check silently: the verification threshold and every liveness option.
# A near miss of one of these fails LoadModel instead of being ignored (a misspelt
# antispoof_threshold would leave the default cut, a misspelt liveness file one model out).
SECURITY_OPTIONS = frozenset(key for key in KNOWN_OPTIONS if key == "verify_threshold" or key.startswith("antispoof_"))
STORE_SQLITE = "sqlite"
STORE_POSTGRES = "postgres"
STORE_KINDS = (STORE_SQLITE, STORE_POSTGRES)
DEFAULT_STORE_FILE = "face-store.sqlite"
ENGINE_INSIGHTFACE = "insightface"
ENGINE_ONNX_DIRECT = "onnx_direct"
# Engine names as the host's own face backend accepts them (any case): its gallery and users'
# YAMLs carry these spellings.
ENGINE_ALIASES = {
    "insightface": ENGINE_INSIGHTFACE,
    "onnx_direct": ENGINE_ONNX_DIRECT,
    "onnx-direct": ENGINE_ONNX_DIRECT,
    "onnxdirect": ENGINE_ONNX_DIRECT,
    "opencv": ENGINE_ONNX_DIRECT,
}


@dataclass
class LoadRequest:
    """Everything LoadModel was given, validated; file options are resolved to paths."""

    model_name: str = ""
    model_path: str = ""
    threads: int = 0
    options: dict[str, str] = field(default_factory=dict)
    # Options this backend does not use, each with why (the host appends its own, and model
    # YAMLs carry other backends' options): accepted, logged and named in LoadModel's message.
    ignored: list[str] = field(default_factory=list)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.options.get(key, default)

    def file(self, key: str) -> str | None:
        """The path an option names, relative names anchored at ModelPath; must exist."""
        value = self.options.get(key)
        if not value:
            return None
        path = value if os.path.isabs(value) else os.path.join(self.model_path or ".", value)
        if not os.path.isfile(path):
            raise ModelFileError(
                f"{key}: file not found: {path} (install it with `make models` or give an absolute path)"
            )
        return path

    @overload
    def float_in_range(self, key: str, low: float, high: float, default: float) -> float: ...
    @overload
    def float_in_range(self, key: str, low: float, high: float, default: None = None) -> float | None: ...
    def float_in_range(self, key: str, low: float, high: float, default: float | None = None) -> float | None:
        value = self.options.get(key)
        if value is None or value == "":
            return default
        try:
            number = float(value)
        except ValueError:
            raise ModelOptionError(f"{key} must be a number, got '{value}'") from None
        if not low <= number <= high:
            raise ModelOptionError(f"{key} must be between {low} and {high}, got {number}")
        return number

    def verify_threshold(self) -> float | None:
        """FaceVerify's default cosine-distance threshold (0 to 2), or None for the recognizer's own."""
        return self.float_in_range("verify_threshold", 0.0, 2.0)

    def store(self) -> str | None:
        """The store LoadModel makes of this process (STORE_KINDS), or None for a face model."""
        value = self.options.get("store")
        if value is None:
            return None
        kind = value.strip().lower()
        if kind not in STORE_KINDS:
            raise ModelOptionError(f"store must be one of {', '.join(STORE_KINDS)}, got '{value}'")
        return kind

    def store_path(self) -> str:
        """The store:sqlite database file, relative names anchored at ModelPath; it may not exist yet."""
        value = self.options.get("store_path") or DEFAULT_STORE_FILE
        return value if os.path.isabs(value) else os.path.join(self.model_path or ".", value)

    def store_dsn(self) -> str:
        value = self.options.get("store_dsn", "")
        if not value:
            raise ModelOptionError("store:postgres needs store_dsn:<libpq connection string>")
        return value

    def det_size(self) -> tuple[int, int] | None:
        value = self.options.get("det_size")
        if not value:
            return None
        parts = value.lower().replace(",", "x").split("x")
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise ModelOptionError(f"det_size must look like 640x640 or 640, got '{value}'") from None
        if len(sizes) == 1:
            sizes *= 2
        if len(sizes) != 2 or not all(32 <= s <= 4096 and s % 32 == 0 for s in sizes):
            raise ModelOptionError(f"det_size must be one or two multiples of 32 in [32, 4096], got '{value}'")
        return sizes[0], sizes[1]


def _near_known_key(key: str) -> str | None:
    """The known key `key` is probably a misspelling of, if any."""
    near = difflib.get_close_matches(key.lower(), KNOWN_OPTIONS, n=1, cutoff=0.75)
    return near[0] if near else None


def _ignored(raw: str, key: str | None) -> str:
    """How an option this backend does not use is named back to the operator."""
    if key is None:
        return f"'{raw}' (not key:value)"
    near = _near_known_key(key)
    return f"'{raw}' (did you mean {near}?)" if near else f"'{raw}'"


def parse_load_request(model_name: str, model_path: str, threads: int, options: Sequence[str]) -> LoadRequest:
    """Known keys (any case) are validated (a bad value fails LoadModel); anything else is ignored,
    as the host does: it appends `<artifact>:<path>` options of its own to every model's list. A
    near miss of a threshold or liveness key fails instead (SECURITY_OPTIONS)."""
    parsed: dict[str, str] = {}
    ignored: list[str] = []
    for raw in options:
        if ":" not in raw:
            if raw.strip():
                ignored.append(_ignored(raw, None))
            continue
        key, value = (part.strip() for part in raw.split(":", 1))
        if key.lower() in KNOWN_OPTIONS:  # keys in any case, like the engine names
            key = key.lower()
        if key not in KNOWN_OPTIONS:
            near = _near_known_key(key)
            if near in SECURITY_OPTIONS:
                raise ModelOptionError(
                    f"unknown option '{key}': did you mean {near}? (a misspelt {near} would silently"
                    " weaken the check it sets, so it is refused rather than ignored)"
                )
            ignored.append(_ignored(raw, key))
            continue
        parsed[key] = value
    if ignored:
        log.warning("LoadModel %r: ignored options: %s", model_name, ", ".join(ignored))
    engine = parsed.get("engine")
    if engine is None:
        onnx_direct = "detector_onnx" in parsed or "recognizer_onnx" in parsed
        parsed["engine"] = ENGINE_ONNX_DIRECT if onnx_direct else ENGINE_INSIGHTFACE
    elif engine.lower() in ENGINE_ALIASES:
        parsed["engine"] = ENGINE_ALIASES[engine.lower()]
    else:
        raise ModelOptionError(f"engine must be one of {', '.join(ENGINE_ALIASES)} (any case), got '{engine}'")
    if threads < 0:
        raise ModelOptionError(f"Threads must be >= 0, got {threads}")
    # A grant beyond the CPUs this process may use buys nothing but contention, and a mistyped
    # huge one would have OpenCV try to spawn that many threads on the first request.
    threads = min(threads, usable_cpus())
    return LoadRequest(model_name=model_name, model_path=model_path, threads=threads, options=parsed, ignored=ignored)
