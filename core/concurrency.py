"""Concurrency helpers: how many CPUs this process may use, how many requests it serves now, two
halves of a request run side by side, a bounded pool of objects that must not be used by two
threads at once, and a budget of memory that blocks running at once share."""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Generic, TypeVar

A = TypeVar("A")
B = TypeVar("B")
T = TypeVar("T")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which a container's cpuset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# Requests the process is serving now, process-wide as its CPUs are; each counts once, whatever
# threads its parts run on (unlike the idle return's count, which a helper's part joins).
_serving_lock = threading.Lock()
_serving = 0


@contextmanager
def serving_request() -> Iterator[None]:
    """Counts one request as being served while the block runs (serving_alone)."""
    global _serving
    with _serving_lock:
        _serving += 1
    try:
        yield
    finally:
        with _serving_lock:
            _serving -= 1


def serving_alone() -> bool:
    """True while the process serves at most one request: a model may then spread its work over
    several cores without taking them from another request."""
    return _serving <= 1


def run_side_by_side(
    helpers: Executor | None,
    first: Callable[[], A],
    second: Callable[[], B],
    on_first_error: Callable[[], None] = lambda: None,
) -> tuple[A, B]:
    """first() on this thread while a helper runs second(). If no helper has started second by
    the time first is done (all busy with other requests), this thread runs it: nobody waits in
    a queue behind another request's work. first's error wins; on_first_error is told first, so
    second can stop early. Without helpers, first() then second()."""
    if helpers is None:
        return first(), second()
    try:
        pending = helpers.submit(second)
    except RuntimeError:  # the helpers are shut down (interpreter exit, a closed model): no new work
        return first(), second()
    try:
        first_result = first()
    except BaseException:
        on_first_error()
        pending.cancel()
        raise
    if pending.cancel():
        return first_result, second()
    try:
        return first_result, pending.result()
    finally:
        # second's error, re-raised here, holds this frame in its traceback and the future holds
        # the error: a reference cycle that would keep both halves' images and the model alive
        # until a garbage collection happens to run.
        del pending


class InstancePool(Generic[T]):
    """Lends out at most `size` instances made by `factory`, creating them on demand.

    For objects one thread at a time may use (OpenCV's model objects). One instance per gRPC
    worker thread would keep every worker's buffers alive (bench/FINDINGS.md, "OpenCV instances");
    more instances than CPUs buy no speed for compute-bound work.
    """

    def __init__(self, factory: Callable[[], T], size: int):
        self._factory: Callable[[], T] | None = factory
        self._idle: queue.LifoQueue[T] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max(1, size))
        self._idle.put(factory())  # the first one now, so a bad model file fails in LoadModel

    @contextmanager
    def borrow(self) -> Iterator[T]:
        with self._slots:
            try:
                instance = self._idle.get_nowait()
            except queue.Empty:
                factory = self._factory
                if factory is None:
                    raise RuntimeError("borrowing from a closed pool") from None
                instance = factory()
            try:
                yield instance
            finally:
                if self._factory is not None:
                    self._idle.put(instance)

    def close(self) -> None:
        """Drops the idle instances now and the lent ones as they come back (the owner's factory
        too: a bound method would keep its owner alive); borrowing fails afterwards."""
        self._factory = None
        while True:
            try:
                self._idle.get_nowait()
            except queue.Empty:
                return

    @property
    def idle(self) -> int:
        """How many instances wait to be lent out."""
        return self._idle.qsize()


class Budget:
    """Lets blocks that each take an amount of one resource (bytes of memory) run at once while
    their amounts together stay within `limit`; a block that takes more than the whole limit runs
    when no other holds any. Blocks enter in the order they asked, so a big one is not overtaken
    for ever by small ones that would still fit. Taking 0 never waits."""

    def __init__(self, limit: int):
        self.limit = limit
        self._changed = threading.Condition()
        self._taken = 0
        self._waiting: deque[object] = deque()

    @contextmanager
    def taking(self, amount: int) -> Iterator[None]:
        if amount <= 0:
            yield
            return
        with self._changed:
            turn = object()
            self._waiting.append(turn)
            try:
                while self._waiting[0] is not turn or (self._taken and self._taken + amount > self.limit):
                    self._changed.wait()
            finally:
                self._waiting.remove(turn)
                self._changed.notify_all()  # the next in line may fit beside this one, or go first
            self._taken += amount
        try:
            yield
        finally:
            with self._changed:
                self._taken -= amount
                self._changed.notify_all()

    @property
    def taken(self) -> int:
        """The amount the blocks running now hold."""
        return self._taken
