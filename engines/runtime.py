"""The one place that creates onnxruntime sessions and OpenCV model pools, so every model gets the
same threading policy and a model file that cannot be read is the same error."""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np
import onnxruntime as ort

from catalog import FileVersion, file_version, settled
from core.concurrency import InstancePool, usable_cpus
from core.errors import ModelFileError

from .cpu_tuning import tuned_for_cpu_parts
from .onnx_graph import (
    Buffer,
    first_input_name,
    identity_model,
    names_external_data,
    with_free_dims,
    with_uint8_input,
)

# Threads each session may use for one Run when ModelOptions.Threads is 0: every usable CPU, up
# to 4, never spinning. More than one makes a lone request faster; under load a Run's threads
# then wait for each other (bench/FINDINGS.md, "threads per Run" and "threads under load and the
# cores' worth ceiling"), so the default set's detector and recognizer follow the load instead
# (follows_the_load).
# The cap keeps small models (112x112 recognizers, 80x80 liveness nets) from spreading one Run
# over many cores on big hosts, where the loop overhead outgrows the work (a judgement, not
# measured: this machine has 2 CPUs). ModelOptions.Threads (the `threads` argument of
# create_session) overrides it.
#
# OpenCV's own pool (SFace, resizes, warps) is left at its default, one thread per CPU: one thread was
# slower alone and no faster under load (bench/FINDINGS.md, "OpenCV threads").
MAX_DEFAULT_INTRA_OP_THREADS = 4


def set_opencv_threads(threads: int) -> None:
    """Grant OpenCV's pool (SFace, resizes, warps) `threads` threads, or its default (one per CPU) for 0.
    The pool is process-wide, so this follows the loaded model's ModelOptions.Threads."""
    cv2.setNumThreads(threads if threads > 0 else -1)


T = TypeVar("T")


def opencv_pool(create: Callable[[], T], what: str) -> InstancePool[T]:
    """A pool of OpenCV model objects made by `create` (cv2 nets must not be shared between
    threads), one per usable CPU at most; a file OpenCV cannot read is a ModelFileError naming
    `what`, raised here for the first instance, so in LoadModel."""

    def checked() -> T:
        try:
            return create()
        except cv2.error as exc:
            raise ModelFileError(f"cannot load {what}: OpenCV could not read it") from exc

    return InstancePool(checked, usable_cpus())


def default_threads() -> int:
    """onnxruntime threads per Run when the host grants none."""
    return min(usable_cpus(), MAX_DEFAULT_INTRA_OP_THREADS)


def follows_the_load(threads: int | None) -> bool:
    """Whether a model the host granted `threads` (None: no grant) runs one thread per Run while
    the process serves several requests and spreads over more cores for a request it serves
    alone (core.concurrency.serving_alone): with no grant and more than one usable CPU. Under load
    one thread per Run serves more requests per second, since a Run's threads wait for each other
    while the cores serve other requests; alone, more threads finish the request sooner
    (bench/FINDINGS.md, "threads follow the load"; used by YuNetDetector and
    onnx_direct.build_recognizer)."""
    return threads is None and usable_cpus() > 1


def detects_in_flight_following_the_load() -> threading.BoundedSemaphore:
    """The limit on Runs at once of a detector that follows the load: one per two usable CPUs.
    On 2 CPUs that is one, as for a detector on two threads, and it was measured there; above, one
    detect per two CPUs is a judgement (each holds the biggest tensors a request allocates)."""
    return threading.BoundedSemaphore(max(1, usable_cpus() // 2))


# Every session draws its working memory from one arena instead of one arena per session: models
# that run at different moments reuse the same blocks, which lowers the peak at no cost in speed.
# It grows in regions of doubling size (kNextPowerOfTwo): with requests side by side, regions of
# exactly each tensor's size (kSameAsRequested) left free blocks too small for the next image's
# tensors, and the arena grew further (bench/FINDINGS.md, "shared onnxruntime arena").
ARENA_EXTEND_NEXT_POWER_OF_TWO = 0
_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


def _register_shared_arena() -> None:
    global _shared_arena_registered
    with _shared_arena_lock:
        if _shared_arena_registered:
            return
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # OrtArenaCfg(max_mem (0 = no cap), extend strategy, initial chunk, max dead bytes per
        # chunk (-1 = onnxruntime's defaults)).
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, ARENA_EXTEND_NEXT_POWER_OF_TWO, -1, -1))
        _shared_arena_registered = True


_shrinker: tuple[ort.InferenceSession, ort.IOBinding, ort.RunOptions] | None = None


def shrink_shared_arena() -> None:
    """Hand the shared arena's unused blocks back to malloc. The arena keeps its high-water mark
    for good otherwise, so after reloads (one set's Runs, then the other's) the process would hold
    the largest of both (bench/FINDINGS.md, "memory (issue 14)", round 2). onnxruntime shrinks an
    arena only at the end of a Run that asks for it; this Run, of an Identity graph on the shared
    arena with its input and output in buffers of ours, takes no block itself, so every block no
    other Run holds goes. Shrinking on every Run instead raised the peak under load (same
    section)."""
    global _shrinker
    if not _shared_arena_registered:
        return
    with _shared_arena_lock:
        if _shrinker is None:
            options = ort.SessionOptions()
            options.add_session_config_entry("session.use_env_allocators", "1")
            session = ort.InferenceSession(identity_model(), sess_options=options, providers=["CPUExecutionProvider"])
            value = np.zeros(1, np.float32)
            binding = session.io_binding()
            binding.bind_cpu_input("x", value)
            binding.bind_output("y", "cpu", 0, np.float32, [1], value.ctypes.data)
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
            _shrinker = (session, binding, run_options)
        session, binding, run_options = _shrinker
        session.run_with_iobinding(binding, run_options)


# Sessions alive, by the file version and settings each was made from. A LoadModel of a file the
# loaded model already runs (the same set loaded again) shares its session instead of building a
# second one beside it: a session is read-only once made and serves Runs from any thread, and the
# copy built while the old one still lived scattered its blocks among the old one's, pinning heap
# pages once the old one was freed (bench/FINDINGS.md, "sessions shared across reloads"). Only a
# session whose file says all it holds is shared: one with weights in other files, or built from a
# file modified too recently (or during the build) for its version to vouch for its bytes, is not.
_live_sessions: weakref.WeakValueDictionary[tuple, ort.InferenceSession] = weakref.WeakValueDictionary()
_live_sessions_lock = threading.Lock()


@dataclass(frozen=True)
class InputEdits:
    """What create_session changes about a model's first input: `free_dims` ((index, symbol)
    pairs) makes those dims symbolic, for a graph exported at one fixed size that works at any
    (onnx_graph.with_free_dims); `uint8` feeds it 8-bit values, cast to float inside the graph
    (onnx_graph.with_uint8_input)."""

    free_dims: tuple[tuple[int, str], ...] = ()
    uint8: bool = False

    @property
    def changes_the_model(self) -> bool:
        """Whether create_session loads an edited copy of the file rather than the file."""
        return bool(self.free_dims or self.uint8)


def create_session(
    path: str, threads: int | None = None, free_dims: dict[int, str] | None = None, uint8_input: bool = False
) -> ort.InferenceSession:
    """An onnxruntime CPU session for `path`; a missing or unreadable file is a ModelFileError.
    `free_dims` and `uint8_input` edit its first input (InputEdits). The graph runs as
    cpu_tuning rewrites it: the same function in ops onnxruntime's CPU kernels run faster. A
    session alive for the same file, unchanged, and the same settings is returned, not rebuilt."""
    if not os.path.isfile(path):
        raise ModelFileError(f"model file not found: {path}")
    threads = threads or default_threads()
    version = _file_version(path)
    edits = InputEdits(tuple(sorted((free_dims or {}).items())), uint8_input)
    key = (version, threads, edits)
    with _live_sessions_lock:
        session = _live_sessions.get(key)
    if session is not None:
        return session
    settled_when_read = settled(version)
    session, names_other_files = _new_session(path, threads, edits)
    if settled_when_read and not names_other_files and _file_version(path) == version:
        with _live_sessions_lock:
            _live_sessions[key] = session
    return session


def _file_version(path: str) -> FileVersion:
    try:
        return file_version(path)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from exc


def _new_session(path: str, threads: int, edits: InputEdits) -> tuple[ort.InferenceSession, bool]:
    """A new session for `path`, and whether the model may keep weights in files beside it
    (onnxruntime reads them from the directory of `path`, which the file's version does not cover)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn a core waiting for work; with many requests in flight that core is
    # better spent on another request, and even with one, a session's workers spinning after its
    # Run take the cores from the next model's Run (bench/FINDINGS.md, "spinning").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    # Each Run allocates its tensors one by one as they come alive, not one block for all of them
    # (onnxruntime's memory pattern): every Run in flight held such a block in the shared arena,
    # which keeps its high-water mark; off for every session, the default set's server entered
    # the 4-client load 45 MB lower at the same speed (bench/FINDINGS.md, "memory (issue 14)").
    options.enable_mem_pattern = False
    _register_shared_arena()
    options.add_session_config_entry("session.use_env_allocators", "1")
    model_file = path
    try:
        with _model_file(path, edits) as (model_file, names_other_files):
            session = ort.InferenceSession(model_file, sess_options=options, providers=["CPUExecutionProvider"])
    except ModelFileError:
        raise
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # onnxruntime raises several unrelated types for bad files
        message = str(exc).splitlines()[0][:200].replace(model_file, path)
        raise ModelFileError(f"cannot load ONNX model {path}: {message}") from exc
    if model_file != path:
        # Its fallback would create the session again from a descriptor closed by now.
        session.disable_fallback()
    return session, names_other_files


@contextmanager
def _model_file(path: str, edits: InputEdits) -> Iterator[tuple[str, bool]]:
    """A path to the model onnxruntime is to load: `path` itself when nothing in it changes
    (onnxruntime then finds any external data next to it), else an anonymous in-memory file
    (Linux's memfd) holding the edited model, closed once the session has read it; and whether
    the model names data in other files (onnx_graph.names_external_data). onnxruntime's Python
    session keeps the bytes it was created from for its whole life (a second copy of the
    weights), but not a path."""
    fd, names_other_files = _edited_copy(path, edits)
    if fd is None:
        yield path, names_other_files
        return
    try:
        yield f"/proc/self/fd/{fd}", names_other_files
    finally:
        os.close(fd)


def _edited_copy(path: str, edits: InputEdits) -> tuple[int | None, bool]:
    """A memfd holding the model at `path` with the input `edits` and cpu_tuning's rewrites, written
    piece by piece (mostly views of the file: cpu_tuning never joins the weights; an input edit
    copies the whole file, done only for small models), None when the model stays as it is;
    and whether the model names data in other files."""
    if not os.path.getsize(path):
        return None, True  # onnxruntime says what is wrong with an empty file
    with open(path, "rb") as f:
        # Read through the page cache, so a model left as it is never lands on the heap. The
        # mapping goes with the last view of it (an exception's traceback may hold one a while).
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    names_other_files = names_external_data(mapped)
    data: Buffer = memoryview(mapped)
    if edits.changes_the_model:
        try:
            name = first_input_name(data)
            if edits.free_dims:
                data = with_free_dims(bytes(data), name, dict(edits.free_dims))
        except (ValueError, IndexError) as exc:
            raise ModelFileError(f"cannot load ONNX model {path}: not a readable ONNX file ({exc})") from exc
        if edits.uint8:  # last: it renames the input the edits above find by name
            try:
                data = with_uint8_input(bytes(data), name)
            except (ValueError, IndexError) as exc:
                raise ModelFileError(f"cannot load ONNX model {path} with 8-bit input: {exc}") from exc
    parts = tuned_for_cpu_parts(data) or ([data] if edits.changes_the_model else None)
    if parts is None:
        return None, names_other_files
    fd = os.memfd_create("onnx-model", os.MFD_CLOEXEC)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            for part in parts:
                f.write(part)
    except BaseException:
        os.close(fd)
        raise
    return fd, names_other_files


def runs_in_flight(session: ort.InferenceSession) -> threading.BoundedSemaphore:
    """A limit on the session's Runs at once: as many as its intra-op threads fill the usable
    CPUs with, at least one. For a detector, whose tensors at a photo's size are the biggest a
    request allocates, more Runs side by side only share the same cores while each holds its own
    tensors (bench/FINDINGS.md, "detections in flight")."""
    threads = session.get_session_options().intra_op_num_threads or default_threads()
    return threading.BoundedSemaphore(max(1, usable_cpus() // threads))


def takes_any_batch(session: ort.InferenceSession) -> bool:
    """True when the first input's batch dimension is symbolic or unknown, not a fixed number."""
    batch = session.get_inputs()[0].shape[0]
    return not (isinstance(batch, int) and batch > 0)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a classifier's raw scores, in float64 so the probabilities sum to 1."""
    shifted = np.exp(scores.astype(np.float64) - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def open_patch_classifier(
    path: str, threads: int | None, size: int, classes: int, kind: str
) -> tuple[ort.InferenceSession, bool]:
    """A session for a classifier of size x size face patches, [N, 3, size, size] -> [N, classes],
    checked before use, and whether it takes any batch (check_batch_dimension)."""
    session = create_session(path, threads)
    model_input = session.get_inputs()[0]
    _, *chw = model_input.shape
    output_shape = session.get_outputs()[0].shape
    if chw != [3, size, size] or output_shape[-1] != classes:
        raise ModelFileError(
            f"{path} is not a {kind} model: input {model_input.shape}, output "
            f"{output_shape}; expected [N, 3, {size}, {size}] -> [N, {classes}]"
        )
    return session, check_batch_dimension(session, path)


def check_batch_dimension(session: ort.InferenceSession, what: str) -> bool:
    """Whether the model takes any batch. A batch fixed at 1 is fine too (run_batched feeds it one
    face per Run); any other fixed batch is a ModelFileError naming `what`."""
    if takes_any_batch(session):
        return True
    batch = session.get_inputs()[0].shape[0]
    if batch != 1:
        raise ModelFileError(f"{what}: fixed batch size {batch} is not supported (need 1 or dynamic)")
    return False


# The most faces one Run takes. The shared arena keeps the blocks of the largest Run until the
# service rests (face_service.IDLE_RETURN_SECONDS), so an unbounded batch would let one crowd
# photo raise the memory of a busy process (bench/FINDINGS.md, "batch size"); beyond a few faces
# a bigger batch buys no speed on a CPU.
MAX_RUN_BATCH = 8


def run_batched(session: ort.InferenceSession, blob: np.ndarray) -> np.ndarray:
    """First output for a [N, ...] blob: Runs of up to MAX_RUN_BATCH items, or one Run per item
    when the export fixes its batch at 1 (the shipped MobileFaceNet and MiniFASNet files do)."""
    input_name = session.get_inputs()[0].name
    output_names = [session.get_outputs()[0].name]
    step = MAX_RUN_BATCH if takes_any_batch(session) else 1
    if len(blob) <= step:
        return session.run(output_names, {input_name: blob})[0]
    return np.concatenate(
        [session.run(output_names, {input_name: blob[start : start + step]})[0] for start in range(0, len(blob), step)]
    )
