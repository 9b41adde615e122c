#!/usr/bin/env python3
"""gRPC face backend for a host inference server: `python backend.py --addr HOST:PORT`.

The servicer only translates between wire messages and face_service.FaceService; every domain
error becomes a status code in ERROR_STATUS and nowhere else, with a google.rpc.ErrorInfo saying
why (the error's reason) and which request field was at fault.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import hmac
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures

import cv2
import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import backend_pb2
import backend_pb2_grpc
from core.concurrency import usable_cpus
from core.errors import (CallEndedError, FaceServiceError, IdentityMismatchError, InvalidInputError,
                         ModelFileError, ModelOptionError, NoFaceError, PreconditionError, Reason)
from engines import parse_load_request
from face_service import DEFAULT_MODEL_OPTIONS, AnalyzedFace, FaceService

log = logging.getLogger("face-backend")

MAX_MESSAGE_BYTES = 50 * 1024 * 1024
M_ARENA_MAX = -8  # glibc <malloc.h>
SHUTDOWN_GRACE_SECONDS = float(os.environ.get("FACE_SHUTDOWN_GRACE_SECONDS", "10"))
ERROR_DOMAIN = "faceverify"  # ErrorInfo.domain: whose reasons these are

ERROR_STATUS = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelOptionError: grpc.StatusCode.INVALID_ARGUMENT,
    NoFaceError: grpc.StatusCode.NOT_FOUND,
    IdentityMismatchError: grpc.StatusCode.NOT_FOUND,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelFileError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_for(error: FaceServiceError) -> grpc.StatusCode:
    if isinstance(error, CallEndedError):
        return grpc.StatusCode.DEADLINE_EXCEEDED if error.deadline_exceeded else grpc.StatusCode.CANCELLED
    for cls in type(error).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, reason: Reason,
          field: str = "") -> None:
    """Ends the call with `code` and `message`, and a google.rpc.ErrorInfo carrying `reason` and,
    as metadata `field`, the request field at fault (grpc_status.rpc_status.from_call reads it)."""
    info = error_details_pb2.ErrorInfo(reason=Reason(reason).value, domain=ERROR_DOMAIN,
                                       metadata={"field": field} if field else {})
    detail = any_pb2.Any()
    detail.Pack(info)
    context.abort_with_status(rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=[detail])))


def translate_errors(method):
    """Domain errors become their status code; anything else is INTERNAL with no internals shown."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except FaceServiceError as error:
            abort(context, status_for(error), str(error), error.reason, error.field)
        except Exception:  # a bug: log it, keep serving, never leak a traceback or answer UNKNOWN
            log.exception("%s failed", method.__name__)
            abort(context, grpc.StatusCode.INTERNAL, f"{method.__name__}: internal error", Reason.INTERNAL)
    return wrapper


def checkpoint_for(context: grpc.ServicerContext):
    """Stops a request between stages once its caller has gone or its deadline has passed."""
    def check(stage: str) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise CallEndedError(f"deadline exceeded before {stage}", deadline_exceeded=True)
        if not context.is_active():
            raise CallEndedError(f"call cancelled before {stage}", deadline_exceeded=False)
    return check


def facial_area(face) -> backend_pb2.FacialArea:
    x, y, w, h = face.xywh()
    return backend_pb2.FacialArea(x=x, y=y, w=w, h=h)


def face_analysis(item: AnalyzedFace) -> backend_pb2.FaceAnalysis:
    message = backend_pb2.FaceAnalysis(region=facial_area(item.face), face_confidence=item.face.score)
    attrs = item.attributes
    if attrs.age is not None:
        message.age = attrs.age
    if attrs.male_probability is not None:
        p_man = float(attrs.male_probability)
        message.gender["Man"] = p_man
        message.gender["Woman"] = 1.0 - p_man
        message.dominant_gender = "Man" if p_man >= 0.5 else "Woman"
    if attrs.emotion:
        # Probabilities 0-1 under deepface's keys, the scale of the gender map above.
        message.emotion.update(attrs.emotion)
        message.dominant_emotion = max(attrs.emotion, key=attrs.emotion.get)
    if item.liveness is not None:
        message.is_real = item.liveness.is_real
        message.antispoof_score = item.liveness.score
    return message


class BackendServicer(backend_pb2_grpc.BackendServicer):
    def __init__(self, service: FaceService):
        self.service = service

    def Health(self, request, context):
        return backend_pb2.Reply(message=b"OK")

    def LoadModel(self, request, context):
        try:
            load_request = parse_load_request(request.Model, request.ModelPath, request.Threads,
                                              list(request.Options))
            model = self.service.load(load_request)
        except FaceServiceError as error:
            return backend_pb2.Result(success=False, message=f"LoadModel failed: {error}")
        except Exception as error:
            log.exception("LoadModel failed")
            return backend_pb2.Result(success=False, message=f"LoadModel failed: {type(error).__name__}")
        finally:
            return_free_memory()
        return backend_pb2.Result(success=True, message=f"loaded {model.describe()}")

    def Status(self, request, context):
        memory = self.service.memory_usage()
        model = self.service.loaded
        response = backend_pb2.StatusResponse(
            state=backend_pb2.StatusResponse.READY if model else backend_pb2.StatusResponse.UNINITIALIZED,
            memory=backend_pb2.MemoryUsageData(total=memory["rss"], breakdown=memory))
        if model is not None:
            response.model = model.name
            response.model_description = model.describe()
            response.attributes.extend(model.attributes)
        return response

    def Free(self, request, context):
        self.service.free()
        return_free_memory()
        return backend_pb2.Result(success=True, message="model unloaded")

    @translate_errors
    def FaceVerify(self, request, context):
        result = self.service.verify(request.img1, request.img2, request.threshold,
                                     request.anti_spoofing, request.ModelIdentity,
                                     checkpoint_for(context))
        response = backend_pb2.FaceVerifyResponse(
            verified=result.verified, distance=result.distance, threshold=result.threshold,
            confidence=result.confidence, model=result.model,
            img1_area=facial_area(result.img1_face), img2_area=facial_area(result.img2_face),
            processing_time_ms=result.processing_time_ms)
        if result.img1_liveness is not None:
            response.img1_is_real = result.img1_liveness.is_real
            response.img1_antispoof_score = result.img1_liveness.score
        if result.img2_liveness is not None:
            response.img2_is_real = result.img2_liveness.is_real
            response.img2_antispoof_score = result.img2_liveness.score
        return response

    @translate_errors
    def FaceAnalyze(self, request, context):
        faces = self.service.analyze(request.img, list(request.actions), request.anti_spoofing,
                                     request.ModelIdentity, checkpoint_for(context))
        return backend_pb2.FaceAnalyzeResponse(faces=[face_analysis(f) for f in faces])

    @translate_errors
    def Embedding(self, request, context):
        result = self.service.embed(list(request.Images), request.ModelIdentity, checkpoint_for(context))
        return backend_pb2.EmbeddingResult(
            embeddings=result.vector.tolist(), tokens=1, dim=int(result.vector.shape[0]),
            layout=backend_pb2.EMBEDDING_LAYOUT_FINAL)

    @translate_errors
    def Detect(self, request, context):
        faces = self.service.detect(request.src, request.threshold, request.ModelIdentity,
                                    checkpoint_for(context))
        detections = []
        for face in faces:
            x, y, w, h = face.xywh()
            detections.append(backend_pb2.Detection(x=x, y=y, width=w, height=h,
                                                    confidence=face.score, class_name="face"))
        return backend_pb2.DetectResponse(Detections=detections)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Every call must carry `authorization: Bearer <token>` when LOCALAI_GRPC_AUTH_TOKEN is set."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token",
                  Reason.BAD_TOKEN, "authorization")
        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        # compare_digest: the time taken must not reveal how much of the token was right.
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny


def parent_watch_interval() -> float | None:
    """Seconds between parent checks, or None when LOCALAI_BACKEND_PARENT_WATCH disables it.

    Same variables and defaults as the host's other backends: on by default, a falsey value
    turns it off, the interval is a Go-style duration ("500ms", "2s", "1m") or bare seconds.
    """
    if os.environ.get("LOCALAI_BACKEND_PARENT_WATCH", "").strip().lower() in ("false", "0", "no", "off"):
        return None
    raw = os.environ.get("LOCALAI_BACKEND_PARENT_WATCH_INTERVAL", "").strip().lower()
    units = (("ms", 0.001), ("s", 1.0), ("m", 60.0))
    try:
        for suffix, factor in units:
            if raw.endswith(suffix):
                return max(0.05, float(raw[: -len(suffix)]) * factor)
        return max(0.05, float(raw)) if raw else 2.0
    except ValueError:
        return 2.0


def watch_parent(on_orphaned, interval: float) -> threading.Thread | None:
    """Call on_orphaned once the process that started us is gone (we get reparented), so a
    killed host does not leave this backend running and holding memory."""
    parent = os.getppid()
    if parent <= 1:
        # Started by init itself, e.g. by a host that is PID 1 in its container: there is no
        # parent to outlive, and "our parent is 1" is the normal state, not orphanhood. The
        # host's other backends skip the watch in this case too.
        log.info("parent watch off: started by pid %d", parent)
        return None

    def poll():
        while True:
            time.sleep(interval)
            current = os.getppid()
            if current != parent or current == 1:
                log.warning("parent process %d is gone; shutting down", parent)
                on_orphaned()
                return
    thread = threading.Thread(target=poll, name="parent-watch", daemon=True)
    thread.start()
    return thread


def worker_count() -> int:
    configured = os.environ.get("PYTHON_GRPC_MAX_WORKERS")
    if configured:
        return max(1, int(configured))
    # Each onnxruntime call already spreads over the cores (engines/runtime.py), so one worker per
    # core keeps them busy; every extra worker thread costs its own allocator arena and buffers
    # (bench/bench.py: 2 x CPUs peaked ~90 MB higher under 4 clients for the same throughput).
    # Two at least, so Health/Status answer while a request runs.
    return max(2, usable_cpus())


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc's handle for its malloc tuning calls, or None on another C library."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = 1) -> None:
    """Cap glibc's malloc arenas: by default every gRPC, onnxruntime and OpenCV thread may get
    its own arena, each keeping its own high-water mark and its own free pages that the other
    threads never reuse. Measured on the default set under 4 clients (2 vCPUs): no cap 443 MB
    peak, 2 arenas 358-369 MB, 1 arena 334-337 MB at the same throughput (16.0-16.7 verify/s vs
    14.7-15.7 with 2): the models' threads allocate once per Run, not in their inner loops, so
    they do not queue on one arena's lock. Must run before the worker threads start."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, arenas)


def return_free_memory() -> None:
    """Give the heap's free pages back to the system after a model (re)load or unload.

    Parsing an ONNX file and optimising its graph frees several times the model's size again
    (age-v1.onnx: 42 MB touched, 11 MB kept), and a replaced model frees all of its own; glibc
    keeps such pages mapped, so the process would carry its load-time high-water mark for good
    (default set, after 6 LoadModel calls: 240 MB at rest, 175 MB trimmed).
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def max_concurrent_rpcs(workers: int) -> int:
    configured = os.environ.get("PYTHON_GRPC_MAX_CONCURRENT_RPCS")
    # Up to eight calls queued per worker: with ~0.1 s of CPU per call a queued one waits under
    # a second, and a burst from a handful of clients is absorbed instead of refused.
    return max(1, int(configured)) if configured else 8 * workers


def create_server(service: FaceService, address: str) -> tuple[grpc.Server, int]:
    token = os.environ.get("LOCALAI_GRPC_AUTH_TOKEN", "")
    workers = worker_count()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        # Beyond this many calls in progress (running or queued) new ones get RESOURCE_EXHAUSTED
        # at once instead of waiting in an unbounded queue.
        maximum_concurrent_rpcs=max_concurrent_rpcs(workers),
        interceptors=[BearerTokenInterceptor(token)] if token else [],
        options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    backend_pb2_grpc.add_BackendServicer_to_server(BackendServicer(service), server)
    # The standard health service reports SERVING only while a model is loaded.
    health_servicer = health.HealthServicer()
    service.on_change = lambda loaded: health_servicer.set(
        "", health_pb2.HealthCheckResponse.SERVING if loaded else health_pb2.HealthCheckResponse.NOT_SERVING)
    service.on_change(service.loaded is not None)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    return server, port


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--addr", default="localhost:50051", help="HOST:PORT to listen on")
    parser.add_argument("--preload-default", metavar="MODEL_PATH",
                        help="load the permissive default model set from this directory at start")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # decoder warnings are expected on hostile input
    limit_malloc_arenas()

    service = FaceService()
    if args.preload_default:
        service.load(parse_load_request("default", args.preload_default, 0, DEFAULT_MODEL_OPTIONS))
        log.info("preloaded the default model set from %s", args.preload_default)
    server, port = create_server(service, args.addr)
    server.start()
    log.info("listening on %s", args.addr)

    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    interval = parent_watch_interval()
    if interval is not None:
        watch_parent(stopped.set, interval)
    while not stopped.wait(0.5):  # a timed wait lets the signal handlers run promptly
        pass
    log.info("stopping: no new calls, %ss for the ones in flight", SHUTDOWN_GRACE_SECONDS)
    server.stop(grace=SHUTDOWN_GRACE_SECONDS).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
