"""The backend for tests and benchmarks: in this process, or as the host runs it, a subprocess.

Both give a channel sized like the server's message limit and the two stubs the wire contract
has (backend.Backend and grpc.health.v1.Health); neither takes LOCALAI_GRPC_AUTH_TOKEN from the
calling environment: a token is always passed explicitly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2_grpc

import backend_pb2
import backend_pb2_grpc
from core.settings import DEFAULT_IMAGE_LIMITS, ImageLimits
from harness.paths import BACKEND, PYTHON, REPO

if TYPE_CHECKING:
    from face_service import FaceService

# backend and face_service (onnxruntime, OpenCV) are imported where a server is built, so that
# free_port and the paths cost tests/support.py no model runtime import.
TOKEN_ENV = "LOCALAI_GRPC_AUTH_TOKEN"
# Loading the default set at start takes a few seconds; a machine shared by parallel runs, more.
START_SECONDS = 120.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_channel(address: str, limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> grpc.Channel:
    """A channel to `address` whose messages may be as large as a server with `limits` accepts."""
    return grpc.insecure_channel(address, options=limits.grpc_message_options())


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` the way the host sends it; none for an empty token."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class _Connected:
    """A channel to `address` with both stubs; closed by close()."""

    address: str

    def _connect(self, limits: ImageLimits) -> None:
        self.channel = open_channel(self.address, limits)
        self.stub = backend_pb2_grpc.BackendStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class InProcessServer(_Connected):
    """backend.create_server(service, "127.0.0.1:0", settings) started in this process, with a
    channel and both stubs. The settings are those of an environment holding `token` as the
    bearer token and `env` (PYTHON_GRPC_MAX_WORKERS="1", ...) and nothing else: this process's
    own environment plays no part."""

    def __init__(self, service: FaceService | None = None, token: str = "", **env: str):
        import backend
        from core.settings import Settings
        from face_service import FaceService

        self.service = FaceService() if service is None else service
        settings = Settings.from_environ({TOKEN_ENV: token, **env})
        self.server, self.port = backend.create_server(self.service, "127.0.0.1:0", settings)
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self._connect(self.service.image_limits)

    def close(self) -> None:
        super().close()
        self.server.stop(None).wait()


def backend_command(*args: str, script: str = BACKEND) -> list[str]:
    """`python backend.py ARGS` with the interpreter the host's run.sh uses."""
    return [PYTHON, script, *args]


def backend_env(token: str = "", **extra: str | None) -> dict[str, str]:
    """This process's environment for a backend subprocess: its own token only (none by default),
    unbuffered output so its log is complete when read, `extra` set (str) or removed (None)."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    if token:
        env[TOKEN_ENV] = token
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def read_log(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def wait_for_health(
    address: str,
    alive: Callable[[], bool],
    log_path: str | None = None,
    token: str = "",
    timeout: float = START_SECONDS,
) -> None:
    """Return once the backend at `address` answers Health; RuntimeError with the end of its log
    if `alive()` turns false first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as probe:
        stub = backend_pb2_grpc.BackendStub(probe)
        while True:
            if not alive():
                problem = "exited during start-up"
            elif time.monotonic() > deadline:
                problem = f"not healthy within {timeout:.0f} s"
            else:
                try:
                    stub.Health(backend_pb2.HealthMessage(), timeout=1, metadata=bearer(token))
                    return
                except grpc.RpcError:
                    time.sleep(0.1)
                    continue
            log = read_log(log_path)[-3000:] if log_path else ""
            raise RuntimeError(f"backend on {address} {problem}" + (f"; its log ends:\n{log}" if log else ""))


class BackendProcess(_Connected):
    """`backend.py --addr 127.0.0.1:<free port> ARGS` as the host starts it, answering Health when
    the constructor returns, with a channel and both stubs.

    `command` replaces `python backend.py` (run.sh, a variant script); `env` is added to (None
    removes from) backend_env(token). stdout and stderr go to `log_path`, else to a temporary file
    removed by close(); output() reads it. stop() sends SIGTERM (or `sig`), kills after `timeout`
    s and returns the exit code; close() closes the channel and stops.
    """

    def __init__(
        self,
        *args: str,
        command: Sequence[str] | None = None,
        env: Mapping[str, str | None] | None = None,
        cwd: str = REPO,
        token: str = "",
        log_path: str | None = None,
        timeout: float = START_SECONDS,
    ):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.command = [*(command or backend_command()), "--addr", self.address, *args]
        self._temporary_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="backend-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        server_env = backend_env(token, **(env or {}))
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=cwd,
                env=server_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_health(self.address, lambda: self.process.poll() is None, log_path, token, timeout)
        except BaseException:
            self.stop()
            self._remove_log()
            raise
        self._connect(ImageLimits.from_environ(server_env))

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return read_log(self.log_path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Sends `sig` if it still runs, kills it after `timeout` s; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def close(self) -> None:
        super().close()
        self.stop()
        self._remove_log()

    def _remove_log(self) -> None:
        if self._temporary_log:
            with contextlib.suppress(OSError):
                os.remove(self.log_path)
