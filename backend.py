#!/usr/bin/env python3
"""gRPC face backend for a host inference server: `python backend.py --addr HOST:PORT`.

The servicer only translates between wire messages and the role LoadModel loaded (roles.Roles):
face_service.FaceService for the face RPCs, store.StoreService for the Stores RPCs; every domain
error becomes a status code in ERROR_STATUS and nowhere else, with a google.rpc.ErrorInfo saying
why (the error's reason) and which request field was at fault. The environment is read once, in
main (core.settings); the process's own concerns (malloc, signals, parent watch, worker sizing)
are core.process.
"""

from __future__ import annotations

import argparse
import functools
import hmac
import logging
import sys
from concurrent import futures
from typing import Any

import cv2
import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import backend_pb2
import backend_pb2_grpc
from antispoof import LivenessResult
from core import process
from core.errors import (
    CallEndedError,
    FaceServiceError,
    IdentityMismatchError,
    InvalidInputError,
    ModelFileError,
    ModelOptionError,
    NoFaceError,
    PreconditionError,
    Reason,
    StoreUnavailableError,
)
from core.settings import Settings
from engines import parse_load_request
from face_service import DEFAULT_MODEL_OPTIONS, AnalyzedFace, FaceService, return_free_memory
from roles import Roles
from store import Entry, Match, StoreService

log = logging.getLogger("face-backend")

ERROR_DOMAIN = "faceverify"  # ErrorInfo.domain: whose reasons these are

ERROR_STATUS = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelOptionError: grpc.StatusCode.INVALID_ARGUMENT,
    NoFaceError: grpc.StatusCode.NOT_FOUND,
    IdentityMismatchError: grpc.StatusCode.NOT_FOUND,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelFileError: grpc.StatusCode.FAILED_PRECONDITION,
    StoreUnavailableError: grpc.StatusCode.UNAVAILABLE,
}


def status_for(error: FaceServiceError) -> grpc.StatusCode:
    if isinstance(error, CallEndedError):
        return grpc.StatusCode.DEADLINE_EXCEEDED if error.deadline_exceeded else grpc.StatusCode.CANCELLED
    for cls in type(error).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, reason: Reason, field: str = "") -> None:
    """Ends the call with `code` and `message`, and a google.rpc.ErrorInfo carrying `reason` and,
    as metadata `field`, the request field at fault (grpc_status.rpc_status.from_call reads it)."""
    info = error_details_pb2.ErrorInfo(
        reason=Reason(reason).value, domain=ERROR_DOMAIN, metadata={"field": field} if field else {}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    context.abort_with_status(
        rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))
    )


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


def liveness_fields(verdict: LivenessResult | None, prefix: str = "") -> dict[str, Any]:
    """The optional liveness fields of a response for one face (`prefix` names its image in
    FaceVerifyResponse: img1_, img2_); none at all when liveness was not asked for."""
    if verdict is None:
        return {}
    fields: dict[str, Any] = {
        f"{prefix}is_real": verdict.is_real,
        f"{prefix}antispoof_score": verdict.score,
        f"{prefix}liveness_status": verdict.status.value,
        f"{prefix}antispoof_engines": dict(verdict.engines),
    }
    if verdict.gate is not None:
        fields[f"{prefix}liveness_reason"] = verdict.gate.reason
        fields[f"{prefix}liveness_message"] = verdict.gate.message
    return fields


def face_analysis(item: AnalyzedFace) -> backend_pb2.FaceAnalysis:
    message = backend_pb2.FaceAnalysis(
        region=facial_area(item.face), face_confidence=item.face.score, **liveness_fields(item.liveness)
    )
    if item.quality is not None:
        message.quality = item.quality
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
        message.dominant_emotion = max(attrs.emotion, key=attrs.emotion.__getitem__)
    return message


def stores_key(key) -> backend_pb2.StoresKey:
    return backend_pb2.StoresKey(Floats=key.tolist())


def stores_entries(entries: list[Entry] | list[Match]) -> dict[str, list]:
    return {
        "Keys": [stores_key(e.key) for e in entries],
        "Values": [backend_pb2.StoresValue(Bytes=e.value) for e in entries],
    }


class BackendServicer(backend_pb2_grpc.BackendServicer):
    def __init__(self, roles: Roles):
        self.roles = roles

    def Health(self, request, context):
        return backend_pb2.Reply(message=b"OK")

    def LoadModel(self, request, context):
        try:
            load_request = parse_load_request(request.Model, request.ModelPath, request.Threads, list(request.Options))
            loaded = self.roles.load(load_request)
        except FaceServiceError as error:
            return backend_pb2.Result(success=False, message=f"LoadModel failed: {error}")
        except Exception as error:
            log.exception("LoadModel failed")
            return backend_pb2.Result(success=False, message=f"LoadModel failed: {type(error).__name__}")
        finally:
            return_free_memory()
        return backend_pb2.Result(success=True, message=f"loaded {loaded}")

    def Status(self, request, context):
        memory = self.roles.faces.memory_usage()
        response = backend_pb2.StatusResponse(
            state=backend_pb2.StatusResponse.READY if self.roles.loaded else backend_pb2.StatusResponse.UNINITIALIZED,
            memory=backend_pb2.MemoryUsageData(total=memory["rss"], breakdown=memory),
        )
        model, store = self.roles.faces.loaded, self.roles.stores.loaded
        if model is not None:
            response.model = model.name
            response.model_description = model.describe()
            response.attributes.extend(model.attributes)
        elif store is not None:
            response.model = store.name
            response.model_description = store.describe()
        return response

    def Free(self, request, context):
        self.roles.free()  # a model's memory returns once no request holds it
        return backend_pb2.Result(success=True, message="model unloaded")

    @translate_errors
    def FaceVerify(self, request, context):
        result = self.roles.face().verify(
            request.img1,
            request.img2,
            request.threshold,
            request.anti_spoofing,
            request.ModelIdentity,
            checkpoint_for(context),
        )
        return backend_pb2.FaceVerifyResponse(
            verified=result.verified,
            distance=result.distance,
            threshold=result.threshold,
            confidence=result.confidence,
            model=result.model,
            img1_area=facial_area(result.img1_face),
            img2_area=facial_area(result.img2_face),
            processing_time_ms=result.processing_time_ms,
            **liveness_fields(result.img1_liveness, "img1_"),
            **liveness_fields(result.img2_liveness, "img2_"),
        )

    @translate_errors
    def FaceAnalyze(self, request, context):
        faces = self.roles.face().analyze(
            request.img, list(request.actions), request.anti_spoofing, request.ModelIdentity, checkpoint_for(context)
        )
        return backend_pb2.FaceAnalyzeResponse(faces=[face_analysis(f) for f in faces])

    @translate_errors
    def Embedding(self, request, context):
        result = self.roles.face().embed(list(request.Images), request.ModelIdentity, checkpoint_for(context))
        return backend_pb2.EmbeddingResult(
            embeddings=result.vector.tolist(),
            tokens=1,
            dim=int(result.vector.shape[0]),
            layout=backend_pb2.EMBEDDING_LAYOUT_FINAL,
        )

    @translate_errors
    def Detect(self, request, context):
        faces = self.roles.face().detect(request.src, request.threshold, request.ModelIdentity, checkpoint_for(context))
        detections = []
        for face in faces:
            x, y, w, h = face.xywh()
            detections.append(
                backend_pb2.Detection(x=x, y=y, width=w, height=h, confidence=face.score, class_name="face")
            )
        return backend_pb2.DetectResponse(Detections=detections)

    @translate_errors
    def StoresSet(self, request, context):
        count = self.roles.store().set(
            [k.Floats for k in request.Keys], [v.Bytes for v in request.Values], request.ModelIdentity
        )
        return backend_pb2.Result(success=True, message=f"set {count} keys")

    @translate_errors
    def StoresDelete(self, request, context):
        count = self.roles.store().delete([k.Floats for k in request.Keys], request.ModelIdentity)
        return backend_pb2.Result(success=True, message=f"deleted {count} keys")

    @translate_errors
    def StoresGet(self, request, context):
        entries = self.roles.store().get([k.Floats for k in request.Keys], request.ModelIdentity)
        return backend_pb2.StoresGetResult(**stores_entries(entries))

    @translate_errors
    def StoresFind(self, request, context):
        matches = self.roles.store().find(request.Key.Floats, request.TopK, request.ModelIdentity)
        return backend_pb2.StoresFindResult(**stores_entries(matches), Similarities=[m.similarity for m in matches])


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Every call must carry `authorization: Bearer <token>` (Settings.auth_token, when set)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token",
                Reason.BAD_TOKEN,
                "authorization",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        # compare_digest: the time taken must not reveal how much of the token was right.
        if hmac.compare_digest(given.encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny


def create_server(
    service: FaceService, address: str, settings: Settings | None = None, stores: StoreService | None = None
) -> tuple[grpc.Server, int]:
    """The server for `service` (and `stores`, a new StoreService by default) on `address` (port 0
    picks one), not yet started, and its port.

    `settings` (default: read from the environment now) gives the bearer token and the worker
    and queue sizes; their image limits are the service's own, given when it was built.
    """
    settings = Settings.from_environ() if settings is None else settings
    workers = process.worker_count(settings.max_workers)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        # Beyond this many calls in progress (running or queued) new ones get RESOURCE_EXHAUSTED
        # at once instead of waiting in an unbounded queue.
        maximum_concurrent_rpcs=process.max_concurrent_rpcs(workers, settings.max_concurrent_rpcs),
        interceptors=[BearerTokenInterceptor(settings.auth_token)] if settings.auth_token else [],
        options=service.image_limits.grpc_message_options(),
    )
    roles = Roles(service, stores)
    backend_pb2_grpc.add_BackendServicer_to_server(BackendServicer(roles), server)
    # The standard health service reports SERVING only while a model (a face model or a store) is loaded.
    health_servicer = health.HealthServicer()
    roles.watch(
        lambda loaded: health_servicer.set(
            "", health_pb2.HealthCheckResponse.SERVING if loaded else health_pb2.HealthCheckResponse.NOT_SERVING
        )
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    return server, port


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--addr", default="localhost:50051", help="HOST:PORT to listen on")
    parser.add_argument(
        "--preload-default",
        metavar="MODEL_PATH",
        help="load the permissive default model set from this directory at start",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # decoder warnings are expected on hostile input
    settings = Settings.from_environ()
    process.tune_malloc()

    service = FaceService(image_limits=settings.image_limits)
    if args.preload_default:
        service.load(parse_load_request("default", args.preload_default, 0, DEFAULT_MODEL_OPTIONS))
        log.info("preloaded the default model set from %s", args.preload_default)
    server, port = create_server(service, args.addr, settings)
    server.start()
    log.info("listening on %s", args.addr)

    process.wait_for_stop(settings.parent_watch_interval)
    log.info("stopping: no new calls, %ss for the ones in flight", settings.shutdown_grace_seconds)
    server.stop(grace=settings.shutdown_grace_seconds).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
