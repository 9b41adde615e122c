"""A bounded pool for OpenCV model objects, which must not be used by two threads at once."""
from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class InstancePool(Generic[T]):
    """Lends out at most `size` instances made by `factory`, creating them on demand.

    One instance per gRPC worker thread would keep every worker's buffers alive (YuNet holds
    ~38 MB per instance); more instances than CPUs buy no speed for compute-bound work.
    """

    def __init__(self, factory: Callable[[], T], size: int):
        self._factory = factory
        self._idle: "queue.LifoQueue[T]" = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max(1, size))
        self._idle.put(factory())  # the first one now, so a bad model file fails in LoadModel

    @contextmanager
    def borrow(self) -> Iterator[T]:
        with self._slots:
            try:
                instance = self._idle.get_nowait()
            except queue.Empty:
                instance = self._factory()
            try:
                yield instance
            finally:
                self._idle.put(instance)
