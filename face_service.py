"""The face service: everything the gRPC servicer does, without gRPC.

Requests take the loaded model once at their start and hold it to the end, so a LoadModel or
Free during a request never changes the engine under it; LoadModel builds the new model
completely before swapping it in, and a failed build leaves the previous one serving. A model
replaced or freed is closed (its sessions dropped) once the last request holding it ends.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import psutil

import catalog
from antispoof import LIVENESS_MISSING, LivenessEnsemble, LivenessResult, build_liveness
from core import process, selection
from core.concurrency import A, B, run_side_by_side, serving_request, usable_cpus
from core.errors import InvalidInputError, NoFaceError, PreconditionError
from core.lifecycle import Held, Slot
from core.settings import DEFAULT_IMAGE_LIMITS, ImageLimits
from engines import HOST_ACTIONS, FaceAttributes, FaceDetection, FaceEngine, LoadRequest, build_engine
from engines.runtime import set_opencv_threads, shrink_shared_arena
from imaging import EncodedImage, coefficient_bytes_in_flight, read_image

log = logging.getLogger(__name__)

# Called between the stages of a request with the name of the next stage; raises (e.g.
# core.errors.CallEndedError) to stop work whose caller has gone or whose deadline passed.
Checkpoint = Callable[[str], None]


def _always_continue(stage: str) -> None:
    return None


# Slope of the logistic that maps distance to `confidence`: 50 at the threshold, about 95 at
# 0.25 below it and about 5 at 0.25 above it.
CONFIDENCE_SLOPE = 12.0


# Seconds without a request in flight before the memory requests left behind is returned: longer
# than the pauses within a burst of requests, so a burst does not shrink and regrow its arena and
# heap at every pause, which fragments the heap (bench/FINDINGS.md, "idle return").
IDLE_RETURN_SECONDS = 3.0


def return_free_memory() -> None:
    """onnxruntime's shared arena's unused blocks to malloc, then malloc's free pages to the
    system: after a LoadModel, a Free, a replaced model's close, and once requests stop."""
    shrink_shared_arena()
    process.return_free_memory()


@dataclass(eq=False)
class LoadedModel(Held):
    """A loaded face model (core.lifecycle.Held: closed once replaced and no request holds it):
    closing drops the engine's and the liveness ensemble's sessions, instance pools and helper
    threads, so their memory returns."""

    engine: FaceEngine
    liveness: LivenessEnsemble | None
    # False when the host granted a single thread (ModelOptions.Threads = 1): a request then
    # never hands work to a helper thread.
    use_helpers: bool = True
    ignored_options: tuple[str, ...] = ()
    model_path: str = ""  # ModelOptions.ModelPath: file names in describe() are relative to it
    files: dict[str, int] = field(default_factory=dict, init=False)  # bytes of each model file, by real path

    def _close(self) -> None:
        # One part failing does not keep the other open.
        for part in (self.engine, self.liveness):
            if part is None:
                continue
            try:
                part.close()
            except Exception:
                log.exception("closing %s of model %r failed", type(part).__name__, self.name)
        # What the sessions, pools and buffers held is free now but still mapped: hand it
        # back to the system here, when the last request holding the model ends, rather
        # than at the next LoadModel (bench/FINDINGS.md, "memory under reloads").
        return_free_memory()

    def __post_init__(self) -> None:
        # Bytes of the model files loaded (engine and liveness), each file once: what the weights
        # take before onnxruntime's and OpenCV's own copies and buffers. Read at load, while the
        # files are surely there.
        paths = set(self.engine.files.values())
        if self.liveness is not None:
            paths.update(m.path for m in self.liveness.models)
        self.files = {os.path.realpath(p): os.path.getsize(p) for p in paths if os.path.isfile(p)}

    @property
    def file_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def display_name(self) -> str:
        """The name the host's user knows (ModelOptions.Model); the engine's when none was sent."""
        return self.name or self.engine.name

    @property
    def attributes(self) -> tuple[str, ...]:
        """The FaceAnalyze actions this model computes, in the host's order."""
        return tuple(a for a in HOST_ACTIONS if a in self.engine.supported_actions)

    def _shown(self, path: str) -> str:
        """A model file as the operator placed it: relative to ModelPath when inside it (so
        `buffalo_sc/w600k_mbf.onnx` and a flat `w600k_mbf.onnx` read apart), else absolute."""
        base = os.path.abspath(self.model_path or ".")
        full = os.path.abspath(path)
        return os.path.relpath(full, base) if full.startswith(base + os.sep) else full

    def describe(self) -> str:
        """What was loaded, file by file, for LoadModel's message and Status: an operator reads
        here why a FaceAnalyze field stays empty or which of two same-named files was taken."""
        engine = self.engine
        parts = [f"{role} {self._shown(path)}" for role, path in engine.files.items()]
        parts.append(f"verify threshold {engine.default_threshold:g}")
        missing = [a for a in HOST_ACTIONS if a not in self.attributes]
        parts.append(
            "attributes: "
            + (", ".join(self.attributes) or "none")
            + (f" (not computed: {', '.join(missing)})" if missing else "")
        )
        if self.liveness is None:
            parts.append("without liveness")
        else:
            files = " + ".join(self._shown(m.path) for m in self.liveness.models)
            parts.append(f"with liveness: {files} (threshold {self.liveness.threshold:g})")
        if self.ignored_options:
            parts.append("ignored options: " + ", ".join(self.ignored_options))
        return f"{engine.name}: " + "; ".join(parts)


@dataclass(frozen=True)
class VerifyResult:
    verified: bool
    distance: float
    threshold: float
    confidence: float
    model: str
    img1_face: FaceDetection
    img2_face: FaceDetection
    img1_liveness: LivenessResult | None
    img2_liveness: LivenessResult | None
    processing_time_ms: float


@dataclass(frozen=True)
class VerifiedImage:
    """What FaceVerify needs of one image: its best face, that face's embedding and liveness."""

    face: FaceDetection
    embedding: np.ndarray
    liveness: LivenessResult | None


class _Abandoned(Exception):
    """Stops the second half of a request once the first half has failed it."""


@dataclass(frozen=True)
class AnalyzedFace:
    face: FaceDetection
    attributes: FaceAttributes
    liveness: LivenessResult | None
    quality: float | None = None  # LightQNet, when the model loads quality_onnx


@dataclass(frozen=True)
class Embedding:
    vector: np.ndarray
    face: FaceDetection


def verification_confidence(distance: float, threshold: float) -> float:
    """0-100, strictly decreasing in distance, 50 exactly at the threshold."""
    return 100.0 / (1.0 + math.exp(CONFIDENCE_SLOPE * (distance - threshold)))


def best_face(faces: Sequence[FaceDetection]) -> FaceDetection:
    """The face a verification is about (core.selection.best_face)."""
    return selection.best_face(faces, area=lambda f: f.area, score=lambda f: f.score)


def magnification(
    engine: FaceEngine,
    liveness: LivenessEnsemble | None,
    embed: bool = False,
    actions: frozenset[str] = frozenset(),
    quality: bool = False,
) -> Callable[[FaceDetection], float]:
    """How many times the stages a request runs on a face enlarge the image's pixels of it: the
    engine's models (FaceEngine.magnification) and, when given, liveness."""

    def of(face: FaceDetection) -> float:
        need = engine.magnification(face, embed=embed, actions=actions, quality=quality)
        return need if liveness is None else max(need, liveness.magnification(face))

    return of


class LocatedFaces:
    """One request image decoded at the coarsest reduction its detector allows
    (imaging.EncodedImage.coarsest_reduction), and the faces found on it, in the full image's
    pixels.

    `pixels_for` then gives the later stages the image at the coarsest reduction at which none of
    their models enlarges a face, decoding it again finer when a face is too small for that at
    detection's: a model never sees fewer pixels of a face than the full image gives it.
    """

    def __init__(
        self,
        engine: FaceEngine,
        encoded: EncodedImage,
        on_decode: Callable[[np.ndarray], np.ndarray] = lambda pixels: pixels,
    ) -> None:
        size = engine.detection_size
        self.engine = engine
        self.encoded = encoded
        self._decode = lambda reduction: on_decode(encoded.decode(reduction))
        self.reduction = 1 if size is None else encoded.coarsest_reduction(size)
        self.pixels = self._decode(self.reduction)
        self.faces: list[FaceDetection] = []

    def detect(self, threshold: float | None = None) -> list[FaceDetection]:
        """The engine's faces, best score first, in the full image's pixels."""
        self.faces = [face.scaled(self.reduction) for face in self.engine.detect(self.pixels, threshold)]
        return self.faces

    def pixels_for(
        self, faces: Sequence[FaceDetection], magnification: Callable[[FaceDetection], float]
    ) -> tuple[np.ndarray, list[FaceDetection]]:
        """The image to run models on `faces` (full-image pixels) with, and the faces in its
        pixels; `magnification(face)` is how many times the models enlarge the full image."""
        need = max((magnification(face) for face in faces), default=0.0)
        reduction = max(r for r in self.encoded.reductions if r <= self.reduction and (r == 1 or need * r <= 1.0))
        if reduction != self.reduction:
            self.pixels, self.reduction = self._decode(reduction), reduction
        return self.pixels, [face.scaled(1.0 / reduction) for face in faces]


class FaceService:
    def __init__(self, helpers: int | None = None, image_limits: ImageLimits = DEFAULT_IMAGE_LIMITS) -> None:
        """`helpers`: threads that take the second half of a request (default: one fewer than
        the usable CPUs; 0 does everything on the request's thread). `image_limits`: the largest
        request image accepted (the server's Settings.image_limits)."""
        self.image_limits = image_limits
        self._slot: Slot[LoadedModel] = Slot()
        # Every model loaded and not yet garbage: Status tells the replaced ones still held by a
        # request (and any a reference cycle keeps) from the loaded one.
        self._models: weakref.WeakSet[LoadedModel] = weakref.WeakSet()
        # RSS before any model: the interpreter and the libraries (numpy, OpenCV, onnxruntime, gRPC).
        self._baseline_rss = psutil.Process().memory_info().rss
        self._images_lock = threading.Lock()
        self._images_bytes = 0  # decoded request images not yet freed
        self.on_change: Callable[[bool], None] = lambda loaded: None  # told whether a model is loaded
        # The arena blocks and heap pages a burst of requests (a 12-MP photo, a crowd) grew go
        # back once the service rests, so the process does not carry its highest moment for good.
        self._idle = process.WhenIdle(return_free_memory, IDLE_RETURN_SECONDS)
        # FaceVerify's second image, and FaceAnalyze's liveness, run here while the request's
        # thread does the first image or the attributes: one image's models are too small to keep
        # two cores busy (bench/FINDINGS.md, "request helpers"). Under load the helpers are often
        # busy; a request then does both parts itself.
        helpers = usable_cpus() - 1 if helpers is None else helpers
        # Request images worked on at once (decoded, detected, run through the models): one per
        # usable CPU. More only share the same cores while each holds its decoded pixels and its
        # models' tensors (bench/FINDINGS.md, "images at once").
        self._image_slots = threading.BoundedSemaphore(max(1, usable_cpus()))
        self._helpers = (
            ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="request-helper") if helpers > 0 else None
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self, request: LoadRequest) -> LoadedModel:
        def build() -> LoadedModel:
            engine = build_engine(request)
            try:
                liveness = build_liveness(request)
            except BaseException:
                engine.close()
                raise
            model = LoadedModel(
                name=request.model_name,
                engine=engine,
                liveness=liveness,
                use_helpers=request.threads != 1,
                ignored_options=tuple(request.ignored),
                model_path=request.model_path,
            )
            set_opencv_threads(request.threads)
            self._models.add(model)
            return model

        model = self._slot.load(build)
        self.on_change(True)
        return model

    def free(self) -> None:
        self._slot.free()
        self.on_change(False)

    @property
    def loaded(self) -> LoadedModel | None:
        return self._slot.current

    @contextmanager
    def _holding(self, identity: str) -> Iterator[LoadedModel]:
        """The loaded model, held for one request, which counts as activity for the idle return and
        as a request served for the models' threads (core.concurrency.serving_alone)."""
        with serving_request(), self._idle.busy(), self._slot.holding(identity) as model:
            yield model

    def memory_usage(self) -> dict[str, int]:
        """Where the process's memory goes, in bytes (Status' MemoryUsageData.breakdown): `rss`
        and `vms`; `baseline_rss`, the RSS before any model (interpreter and libraries);
        `rss_anon` / `rss_file`, the RSS allocated by the process / mapped from files (library
        code); `heap_in_use`, `heap_free`, `heap_mmapped` (core.process.malloc_usage);
        `model_files`, the loaded model's files; `retired_model_files`, the files of replaced
        models not yet closed because a request still holds them (each once, and not those the
        loaded model runs too); `models_alive`, LoadedModel
        objects not yet freed (1 with a model loaded and no reload in progress: more is a leak);
        `images_in_flight`, the decoded request images alive now; `jpeg_coefficients_in_flight`,
        what the JPEG decodes running now hold (imaging.coefficient_bytes_in_flight)."""
        info = psutil.Process().memory_info()
        current = self._slot.current
        models = list(self._models)
        # A file the loaded model runs too is one session shared, not a second copy.
        loaded_files = current.files if current is not None else {}
        retired_files = {
            path: size
            for model in models
            if model is not current and not model.closed
            for path, size in model.files.items()
            if path not in loaded_files
        }
        return {
            "rss": int(info.rss),
            "vms": int(info.vms),
            "baseline_rss": self._baseline_rss,
            **process.resident_memory(),
            **process.malloc_usage(),
            "model_files": current.file_bytes if current is not None else 0,
            "retired_model_files": sum(retired_files.values()),
            "models_alive": len(models),
            "images_in_flight": self._images_bytes,
            "jpeg_coefficients_in_flight": coefficient_bytes_in_flight(),
        }

    def _located(self, engine: FaceEngine, data: str, name: str, checkpoint: Checkpoint) -> LocatedFaces:
        """The request image `name`, read and decoded for `engine`'s detector, every decode of it
        counted in images_in_flight until its array is freed; the call is checked first (a call
        that waited for its image slot may have ended)."""
        checkpoint("decode")
        return LocatedFaces(engine, read_image(data, name, self.image_limits), self._counted)

    def _counted(self, image: np.ndarray) -> np.ndarray:
        size = image.nbytes
        with self._images_lock:
            self._images_bytes += size
        weakref.finalize(image, self._image_freed, size)
        return image

    def _image_freed(self, size: int) -> None:
        with self._images_lock:
            self._images_bytes -= size

    @staticmethod
    def _require_liveness(model: LoadedModel) -> LivenessEnsemble:
        if model.liveness is None:
            raise PreconditionError(LIVENESS_MISSING, reason="LIVENESS_WEIGHTS_MISSING", field="anti_spoofing")
        return model.liveness

    @staticmethod
    def _faces(located: LocatedFaces) -> list[FaceDetection]:
        """The faces `located` detects; NoFaceError naming its image when there is none."""
        faces = located.detect()
        if not faces:
            name = located.encoded.name
            raise NoFaceError(f"no face found in {name}", field=name)
        return faces

    # -- requests ----------------------------------------------------------------------------
    def verify(
        self,
        img1: str,
        img2: str,
        threshold: float = 0.0,
        anti_spoofing: bool = False,
        identity: str = "",
        checkpoint: Checkpoint = _always_continue,
    ) -> VerifyResult:
        started = time.perf_counter()
        with self._holding(identity) as model:
            liveness = self._require_liveness(model) if anti_spoofing else None
            if threshold < 0 or not math.isfinite(threshold):
                raise InvalidInputError(
                    f"threshold must be a cosine distance >= 0, got {threshold}",
                    reason="BAD_THRESHOLD",
                    field="threshold",
                )
            threshold = threshold or model.engine.default_threshold
            first, second = self._run_halves(
                model,
                lambda stage: self._verify_image(model, liveness, img1, "img1", stage),
                lambda stage: self._verify_image(model, liveness, img2, "img2", stage),
                checkpoint,
            )
            # float32 rounding can put identical faces a hair below 0; the contract's range is [0, 2].
            distance = min(2.0, max(0.0, float(1.0 - np.dot(first.embedding, second.embedding))))
            verified = distance < threshold and all(v.liveness is None or v.liveness.is_real for v in (first, second))
            return VerifyResult(
                verified=verified,
                distance=distance,
                threshold=threshold,
                confidence=verification_confidence(distance, threshold),
                model=model.display_name,
                img1_face=first.face,
                img2_face=second.face,
                img1_liveness=first.liveness,
                img2_liveness=second.liveness,
                processing_time_ms=(time.perf_counter() - started) * 1000.0,
            )

    def _run_halves(
        self,
        model: LoadedModel,
        first: Callable[[Checkpoint], A],
        second: Callable[[Checkpoint], B],
        checkpoint: Checkpoint,
    ) -> tuple[A, B]:
        """first(checkpoint) on this thread and second(checkpoint) on a helper when one is free
        (core.concurrency.run_side_by_side); an error in first stops second at its next stage.

        An error in first ends the request while second may still run on its helper up to that
        stage, so second holds the model too: it is not closed under it."""
        abandoned = threading.Event()

        def second_checkpoint(stage: str) -> None:
            if abandoned.is_set():
                raise _Abandoned(stage)
            checkpoint(stage)

        def second_holding_the_model() -> B:
            if not model.hold():  # the request failed and the model was closed before this started
                raise _Abandoned("start")
            try:
                # It may outlive a request that failed first: still a request's work for the idle return.
                with self._idle.busy():
                    return second(second_checkpoint)
            finally:
                model.release()

        return run_side_by_side(
            self._helpers if model.use_helpers else None,
            lambda: first(checkpoint),
            second_holding_the_model,
            on_first_error=abandoned.set,
        )

    def _verify_image(
        self, model: LoadedModel, liveness: LivenessEnsemble | None, encoded: str, name: str, checkpoint: Checkpoint
    ) -> VerifiedImage:
        engine = model.engine
        with self._image_slots:
            located = self._located(engine, encoded, name, checkpoint)
            checkpoint("detection")
            face = best_face(self._faces(located))
            pixels, (scaled,) = located.pixels_for(
                [face], magnification(engine, liveness, embed=True, quality=liveness is not None)
            )
            verdict = None
            if liveness is not None:
                checkpoint("liveness")
                verdict = liveness.score(pixels, [scaled], engine.face_quality(pixels, [scaled]))[0]
            checkpoint("recognition")
            return VerifiedImage(face, engine.embed(pixels, scaled), verdict)

    def analyze(
        self,
        img: str,
        actions: Sequence[str] = (),
        anti_spoofing: bool = False,
        identity: str = "",
        checkpoint: Checkpoint = _always_continue,
    ) -> list[AnalyzedFace]:
        with self._holding(identity) as model, self._image_slots:
            liveness = self._require_liveness(model) if anti_spoofing else None
            wanted = self._resolve_actions(model.engine, actions)
            engine = model.engine
            located = self._located(engine, img, "img", checkpoint)
            checkpoint("detection")
            faces = located.detect()
            if not faces:  # the host's contract: a photo without a face is an answer, not an error
                return []

            # One image for every stage, fine enough for the smallest face.
            image, scaled = located.pixels_for(faces, magnification(engine, liveness, actions=wanted, quality=True))

            def compute_attributes(stage: Checkpoint) -> Sequence[FaceAttributes]:
                stage("attributes")
                return engine.analyze(image, scaled, wanted) if wanted else [FaceAttributes()] * len(faces)

            quality = engine.face_quality(image, scaled)  # None without a quality head
            qualities: Sequence[float | None] = [None] * len(faces) if quality is None else quality
            if liveness is None:
                attributes = compute_attributes(checkpoint)
                return [AnalyzedFace(f, a, None, q) for f, a, q in zip(faces, attributes, qualities)]

            def score_liveness(stage: Checkpoint) -> Sequence[LivenessResult]:
                stage("liveness")
                return liveness.score(image, scaled, quality)

            attributes, verdicts = self._run_halves(model, compute_attributes, score_liveness, checkpoint)
            return [AnalyzedFace(f, a, v, q) for f, a, v, q in zip(faces, attributes, verdicts, qualities)]

    @staticmethod
    def _resolve_actions(engine: FaceEngine, actions: Sequence[str]) -> frozenset[str]:
        """The host's rule: any of its four actions may be asked for, empty means all the model
        computes, and one the model has no head for is left empty rather than failing."""
        requested = {a.strip().lower() for a in actions if a.strip()}
        unknown = requested - set(HOST_ACTIONS)
        if unknown:
            raise InvalidInputError(
                f"actions: unsupported action(s) {', '.join(sorted(unknown))};"
                f" actions are a subset of {', '.join(HOST_ACTIONS)}",
                reason="BAD_ACTION",
                field="actions",
            )
        if not requested:
            return engine.supported_actions
        return frozenset(requested) & engine.supported_actions

    def embed(self, images: Sequence[str], identity: str = "", checkpoint: Checkpoint = _always_continue) -> Embedding:
        with self._holding(identity) as model, self._image_slots:
            if not images:
                raise InvalidInputError(
                    "Images[0]: no image given (Embedding needs one image)", reason="IMAGE_MISSING", field="Images[0]"
                )
            located = self._located(model.engine, images[0], "Images[0]", checkpoint)
            checkpoint("detection")
            face = best_face(self._faces(located))
            checkpoint("recognition")
            image, (scaled,) = located.pixels_for([face], magnification(model.engine, None, embed=True))
            return Embedding(model.engine.embed(image, scaled), face)

    def detect(
        self, src: str, threshold: float = 0.0, identity: str = "", checkpoint: Checkpoint = _always_continue
    ) -> list[FaceDetection]:
        with self._holding(identity) as model, self._image_slots:
            if threshold < 0 or threshold > 1 or not math.isfinite(threshold):
                raise InvalidInputError(
                    f"threshold must be a detector score in [0, 1], got {threshold}",
                    reason="BAD_THRESHOLD",
                    field="threshold",
                )
            located = self._located(model.engine, src, "src", checkpoint)
            checkpoint("detection")
            return located.detect(threshold if threshold > 0 else None)


# The permissive default set (MIT / Apache-2.0 / CC0 weights), loaded by `make run`: the catalog's
# `default` group, each file with the LoadModel option that loads it (the engine, onnx_direct,
# follows from detector_onnx).
DEFAULT_MODEL_OPTIONS = catalog.default().load_options("default")
