"""Every environment variable the server reads, read once at start into one Settings object.

Nothing reads the environment at import time; backend.main reads it with Settings.from_environ()
and hands the result to the code that needs it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

# Values of LOCALAI_BACKEND_PARENT_WATCH that turn the watch off, as the host's other backends read it.
FALSEY = ("false", "0", "no", "off")
DEFAULT_PARENT_WATCH_SECONDS = 2.0
MIN_PARENT_WATCH_SECONDS = 0.05
DURATION_UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0))


@dataclass(frozen=True)
class ImageLimits:
    """How big a request image may be (imaging.py refuses larger ones before decoding them)."""

    # Encoded bytes of one image after base64 decoding (the gRPC message limit is 50 MiB in all).
    max_bytes: int = 20 * 1024 * 1024  # FACE_MAX_IMAGE_BYTES
    # Decoded pixels of one image: 50 MP covers 48 MP phone photos; 3 bytes a pixel is 150 MB.
    max_pixels: int = 50_000_000  # FACE_MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class Settings:
    # Every call must carry `authorization: Bearer <token>` when set.
    auth_token: str = ""  # LOCALAI_GRPC_AUTH_TOKEN
    # gRPC worker threads; None sizes them from the CPUs (core.process.worker_count).
    max_workers: Optional[int] = None  # PYTHON_GRPC_MAX_WORKERS
    # Calls in progress (running or queued) beyond which new ones get RESOURCE_EXHAUSTED; None:
    # eight per worker (core.process.max_concurrent_rpcs).
    max_concurrent_rpcs: Optional[int] = None  # PYTHON_GRPC_MAX_CONCURRENT_RPCS
    # How long calls in flight may finish after SIGTERM/SIGINT.
    shutdown_grace_seconds: float = 10.0  # FACE_SHUTDOWN_GRACE_SECONDS
    # Seconds between checks that the parent process still lives; None turns the watch off.
    parent_watch_interval: Optional[float] = DEFAULT_PARENT_WATCH_SECONDS  # LOCALAI_BACKEND_PARENT_WATCH[_INTERVAL]
    image_limits: ImageLimits = field(default_factory=ImageLimits)

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        """The settings `environ` (default: this process's environment) asks for; unset or empty
        variables keep the defaults. A malformed number is a ValueError naming its variable,
        except where the host's other backends fall back to the default (the parent watch
        interval) or this server always has (the image limits)."""
        env = os.environ if environ is None else environ
        limits = ImageLimits()
        return cls(
            auth_token=env.get("LOCALAI_GRPC_AUTH_TOKEN", ""),
            max_workers=_positive_int(env, "PYTHON_GRPC_MAX_WORKERS"),
            max_concurrent_rpcs=_positive_int(env, "PYTHON_GRPC_MAX_CONCURRENT_RPCS"),
            shutdown_grace_seconds=_seconds(env, "FACE_SHUTDOWN_GRACE_SECONDS", cls.shutdown_grace_seconds),
            parent_watch_interval=parent_watch_interval(env.get("LOCALAI_BACKEND_PARENT_WATCH", ""),
                                                        env.get("LOCALAI_BACKEND_PARENT_WATCH_INTERVAL", "")),
            image_limits=ImageLimits(
                max_bytes=_positive_int(env, "FACE_MAX_IMAGE_BYTES", lenient=True) or limits.max_bytes,
                max_pixels=_positive_int(env, "FACE_MAX_IMAGE_PIXELS", lenient=True) or limits.max_pixels))


def parent_watch_interval(enabled: str, interval: str) -> Optional[float]:
    """Seconds between parent checks, or None when `enabled` is falsey.

    Same variables and defaults as the host's other backends: on by default, a falsey value
    turns it off, the interval is a Go-style duration ("500ms", "2s", "1m") or bare seconds, and
    one that does not parse is the default.
    """
    if enabled.strip().lower() in FALSEY:
        return None
    raw = interval.strip().lower()
    try:
        for suffix, factor in DURATION_UNITS:
            if raw.endswith(suffix):
                return max(MIN_PARENT_WATCH_SECONDS, float(raw[: -len(suffix)]) * factor)
        return max(MIN_PARENT_WATCH_SECONDS, float(raw)) if raw else DEFAULT_PARENT_WATCH_SECONDS
    except ValueError:
        return DEFAULT_PARENT_WATCH_SECONDS


def _positive_int(env: Mapping[str, str], name: str, lenient: bool = False) -> Optional[int]:
    """The variable as an int of at least 1, None when unset or empty. Malformed: ValueError, or
    None when `lenient`."""
    raw = env.get(name, "")
    if not raw:
        return None
    try:
        return max(1, int(raw))
    except ValueError:
        if lenient:
            return None
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
