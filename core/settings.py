"""Every environment variable the server reads, read once at start into one Settings object.

Nothing reads the environment at import time; backend.main reads it with Settings.from_environ()
and hands the result to the code that needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

# Values of LOCALAI_BACKEND_PARENT_WATCH that turn the watch off, as the host's other backends read it.
FALSEY = ("false", "0", "no", "off")
DEFAULT_PARENT_WATCH_SECONDS = 2.0
MIN_PARENT_WATCH_SECONDS = 0.05
DURATION_UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0))

T = TypeVar("T")


@dataclass(frozen=True)
class ImageLimits:
    """How big a request image may be (imaging.py refuses larger ones before decoding them)."""

    # Encoded bytes of one image after base64 decoding (the gRPC message limit follows: message_bytes).
    max_bytes: int = 20 * 1024 * 1024  # FACE_MAX_IMAGE_BYTES
    # Decoded pixels of one image: 50 MP covers 48 MP phone photos; 3 bytes a pixel is 150 MB.
    max_pixels: int = 50_000_000  # FACE_MAX_IMAGE_PIXELS

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ImageLimits:
        """The limits `environ` (default: this process's environment) sets; a variable unset,
        empty or malformed keeps its default."""
        env = os.environ if environ is None else environ
        return cls(
            max_bytes=_number(env, "FACE_MAX_IMAGE_BYTES", _at_least_one) or cls.max_bytes,
            max_pixels=_number(env, "FACE_MAX_IMAGE_PIXELS", _at_least_one) or cls.max_pixels,
        )

    def max_base64_chars(self) -> int:
        """The length of max_bytes bytes in base64."""
        return 4 * -(-self.max_bytes // 3)

    def message_bytes(self) -> int:
        """The gRPC message size these limits need: FaceVerify's two images at max_bytes, in
        base64, and room for the rest of the message; at least MIN_MESSAGE_BYTES, at most what
        gRPC's options hold."""
        return min(MAX_MESSAGE_BYTES, max(MIN_MESSAGE_BYTES, 2 * self.max_base64_chars() + MESSAGE_ROOM_BYTES))

    def grpc_message_options(self) -> list[tuple[str, int]]:
        """gRPC channel and server options that carry messages up to message_bytes both ways."""
        return [
            ("grpc.max_send_message_length", self.message_bytes()),
            ("grpc.max_receive_message_length", self.message_bytes()),
        ]


# The gRPC message cap never goes below this: the Stores RPCs carry many vectors at once.
MIN_MESSAGE_BYTES = 50 * 1024 * 1024
# gRPC's message length options are C ints.
MAX_MESSAGE_BYTES = 2**31 - 1
# What a message carries besides its images (field tags, threshold, identity, actions).
MESSAGE_ROOM_BYTES = 1024 * 1024


DEFAULT_IMAGE_LIMITS = ImageLimits()


@dataclass(frozen=True)
class Settings:
    # Every call must carry `authorization: Bearer <token>` when set.
    auth_token: str = ""  # LOCALAI_GRPC_AUTH_TOKEN
    # gRPC worker threads; None sizes them from the CPUs (core.process.worker_count).
    max_workers: int | None = None  # PYTHON_GRPC_MAX_WORKERS
    # Calls in progress (running or queued) beyond which new ones get RESOURCE_EXHAUSTED; None:
    # eight per worker (core.process.max_concurrent_rpcs).
    max_concurrent_rpcs: int | None = None  # PYTHON_GRPC_MAX_CONCURRENT_RPCS
    # How long calls in flight may finish after SIGTERM/SIGINT.
    shutdown_grace_seconds: float = 10.0  # FACE_SHUTDOWN_GRACE_SECONDS
    # Seconds between checks that the parent process still lives; None turns the watch off.
    parent_watch_interval: float | None = DEFAULT_PARENT_WATCH_SECONDS  # LOCALAI_BACKEND_PARENT_WATCH[_INTERVAL]
    image_limits: ImageLimits = field(default_factory=ImageLimits)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings `environ` (default: this process's environment) asks for; unset or empty
        variables keep the defaults. A malformed number is a ValueError naming its variable,
        except where the host's other backends fall back to the default (the parent watch
        interval) or this server always has (the image limits)."""
        env = os.environ if environ is None else environ
        defaults = cls()
        grace = _number(env, "FACE_SHUTDOWN_GRACE_SECONDS", float, "a number of seconds")
        return cls(
            auth_token=env.get("LOCALAI_GRPC_AUTH_TOKEN", ""),
            max_workers=_number(env, "PYTHON_GRPC_MAX_WORKERS", _at_least_one, "a whole number"),
            max_concurrent_rpcs=_number(env, "PYTHON_GRPC_MAX_CONCURRENT_RPCS", _at_least_one, "a whole number"),
            shutdown_grace_seconds=defaults.shutdown_grace_seconds if grace is None else grace,
            parent_watch_interval=parent_watch_interval(
                env.get("LOCALAI_BACKEND_PARENT_WATCH", ""), env.get("LOCALAI_BACKEND_PARENT_WATCH_INTERVAL", "")
            ),
            image_limits=ImageLimits.from_environ(env),
        )


def parent_watch_interval(enabled: str, interval: str) -> float | None:
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


def _at_least_one(raw: str) -> int:
    return max(1, int(raw))


def _number(env: Mapping[str, str], name: str, parse: Callable[[str], T], expected: str | None = None) -> T | None:
    """parse(the variable), None when it is unset or empty. A value parse refuses is a ValueError
    saying it must be `expected`, or None when no `expected` is given (the default applies)."""
    raw = env.get(name, "")
    if not raw:
        return None
    try:
        return parse(raw)
    except ValueError:
        if expected is None:
            return None
        raise ValueError(f"{name} must be {expected}, got {raw!r}") from None
