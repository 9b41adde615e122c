"""The server process's own concerns: glibc malloc tuning, how many gRPC workers, stopping on
a signal or when the parent process is gone. Nothing here knows about faces or gRPC messages."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .concurrency import usable_cpus

log = logging.getLogger("face-backend")

# mallopt parameters (glibc <malloc.h>).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Blocks of this size and up (a phone photo's pixels, a detector input at full size, the
# onnxruntime arena's larger regions) get a mapping of their own, unmapped when freed. glibc's
# default threshold rises to the largest block ever freed (the arena's shrink frees such regions),
# after which these blocks come from the heap, where they leave free pages that stay resident
# under load. Fixing it also fixes the trim threshold, at 128 KiB unless set, and the heap's top is
# then given back and faulted in again all the time; so that is set where glibc's own rule lets
# it rise, and malloc_trim after loads and once requests stop still returns the free pages
# (bench/FINDINGS.md, "mmap threshold").
MMAP_THRESHOLD_BYTES = 4 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc's handle for its malloc tuning calls, or None on another C library."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def tune_malloc(arenas: int = 1) -> None:
    """Cap glibc's malloc arenas and fix its mmap and trim thresholds (MMAP_THRESHOLD_BYTES; an
    operator's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ stand). By default every gRPC,
    onnxruntime and OpenCV thread may get its own arena, each keeping its own high-water mark and
    its own free pages that the other threads never reuse. One arena peaks lowest at the same
    throughput (bench/FINDINGS.md, "malloc arenas"): the models' threads allocate once per Run,
    not in their inner loops, so they do not queue on one arena's lock. Must run before the
    worker threads start."""
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(M_ARENA_MAX, arenas)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def return_free_memory() -> None:
    """Give the heap's free pages back to the system after a model (re)load or unload, and once
    requests stop (WhenIdle).

    Parsing an ONNX file and optimising its graph frees several times the model's size again,
    and a replaced model frees all of its own; glibc keeps such pages mapped, so the process
    would carry its load-time high-water mark for good (bench/FINDINGS.md, "malloc_trim").
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (<malloc.h>, glibc >= 2.33): every field a size_t."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            *("arena", "ordblks", "smblks", "hblks", "hblkhd"),
            *("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"),
        )
    ]


def malloc_usage() -> dict[str, int]:
    """What glibc's malloc holds, in bytes: `heap_in_use` (live allocations: onnxruntime's and
    OpenCV's buffers, Python objects, images), `heap_free` (freed but still mapped: what
    malloc_trim would give back, or fragmentation) and `heap_mmapped` (the large blocks malloc
    maps one by one, counted in heap_in_use too). Empty on another C library."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return {}
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {
        "heap_in_use": info.uordblks + info.hblkhd,
        "heap_free": info.fordblks,
        "heap_mmapped": info.hblkhd,
    }


def resident_memory() -> dict[str, int]:
    """The process's resident memory in bytes from /proc/self/smaps_rollup: `rss`, of it
    `rss_anon` (heap, stacks, arenas: what the process allocated) and `rss_file` (pages of
    mapped files: the libraries' code and data). Empty where /proc has no smaps_rollup."""
    fields = {"Rss": "rss", "Anonymous": "rss_anon"}
    found: dict[str, int] = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in fields:
                    found[fields[name]] = int(rest.split()[0]) * 1024
    except OSError:
        return {}
    if len(found) == 2:
        found["rss_file"] = found["rss"] - found["rss_anon"]
    return found


def worker_count(configured: int | None) -> int:
    """gRPC worker threads: `configured` (PYTHON_GRPC_MAX_WORKERS), else one per usable CPU.

    Each onnxruntime call already spreads over the cores (engines/runtime.py), so one worker per
    core keeps them busy; every extra worker thread costs its own allocator arena and buffers
    (bench/FINDINGS.md, "gRPC workers"). Two at least, so Health/Status answer while a request runs.
    """
    if configured:
        return max(1, configured)
    return max(2, usable_cpus())


def max_concurrent_rpcs(workers: int, configured: int | None) -> int:
    """Calls in progress before new ones are refused: `configured`, else eight per worker. With
    ~0.1 s of CPU per call a queued one waits under a second, and a burst from a handful of
    clients is absorbed instead of refused."""
    return max(1, configured) if configured else 8 * workers


def watch_parent(on_orphaned: Callable[[], None], interval: float) -> threading.Thread | None:
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


def wait_for_stop(parent_watch_interval: float | None) -> None:
    """Returns on SIGTERM or SIGINT, or once the parent process is gone when `parent_watch_interval`
    (seconds) is set. Call from the main thread: only it may install signal handlers."""
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    if parent_watch_interval is not None:
        watch_parent(stopped.set, parent_watch_interval)
    while not stopped.wait(0.5):  # a timed wait lets the signal handlers run promptly
        pass


class WhenIdle:
    """Runs `action` once the process has had no request in flight for `quiet_seconds`, and again
    only after another request: what requests leave behind (onnxruntime's arena blocks, malloc's
    free pages) goes back to the system while nobody needs it, not between back-to-back requests,
    which would each pay to fault the pages in again."""

    def __init__(self, action: Callable[[], None], quiet_seconds: float) -> None:
        self._action = action
        self._quiet_seconds = quiet_seconds
        self._changed = threading.Condition()
        self._in_flight = 0
        self._pending = False  # a request ended since the last action
        self._last_end = 0.0
        self._thread: threading.Thread | None = None

    @contextmanager
    def busy(self) -> Iterator[None]:
        """One request's work: started() at its start, ended() at its end, whatever happens."""
        self.started()
        try:
            yield
        finally:
            self.ended()

    def started(self) -> None:
        with self._changed:
            self._in_flight += 1

    def ended(self) -> None:
        with self._changed:
            self._in_flight -= 1
            self._pending = True
            self._last_end = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="idle-memory-return", daemon=True)
                self._thread.start()
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    if not self._pending or self._in_flight:
                        self._changed.wait()
                        continue
                    left = self._last_end + self._quiet_seconds - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
                self._pending = False
            try:
                self._action()
            except Exception:
                log.exception("returning memory while idle failed")
