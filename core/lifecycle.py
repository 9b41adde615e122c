"""What a loaded face model and a loaded store share: requests hold it while they run, LoadModel
swaps a new one in whole, and the one replaced is closed when the last request holding it ends.

A failed LoadModel leaves the previous one serving (the new one is built before the swap), and a
request never waits on a LoadModel: it takes whichever is loaded when it starts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from core.errors import IdentityMismatchError, PreconditionError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Held:
    """A loaded resource and a count of the requests holding it.

    Its slot retires it when LoadModel replaces it or Free drops it; whichever comes last, the
    retirement or the release of the last holder, closes it (`_close`), so what it holds is
    returned then, not at some later garbage collection.
    """

    name: str  # ModelOptions.Model, for the identity guard
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _holders: int = field(default=0, init=False, repr=False)
    _retired: bool = field(default=False, init=False, repr=False)
    _closing: bool = field(default=False, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    def hold(self) -> bool:
        """Counts one more holder; False, counting nothing, once it is closing."""
        with self._lock:
            if self._closing:
                return False
            self._holders += 1
            return True

    def release(self) -> None:
        """Ends one hold; the last one closes a retired resource."""
        with self._lock:
            self._holders -= 1
            self._close_if_unused()

    def retire(self) -> None:
        """No new request will take it: close it now if none holds it, else at the last release."""
        with self._lock:
            self._retired = True
            self._close_if_unused()

    @property
    def closed(self) -> bool:
        return self._closed

    def _close_if_unused(self) -> None:
        if self._retired and self._holders == 0 and not self._closing:
            self._closing = True  # under the lock: no hold succeeds from here on
            # Closing runs in whichever request ends last: a failure is logged, never that
            # request's error.
            try:
                self._close()
            except Exception:
                log.exception("closing %s %r failed", type(self).__name__, self.name)
            self._closed = True

    def _close(self) -> None:
        raise NotImplementedError


H = TypeVar("H", bound=Held)


class Slot(Generic[H]):
    """The one loaded resource of a role: LoadModel puts a new one in, Free takes it out, and a
    request holds the current one from its start to its end."""

    def __init__(self) -> None:
        self._current: H | None = None
        self._load_lock = threading.Lock()  # one LoadModel at a time; requests never wait on it

    @property
    def current(self) -> H | None:
        return self._current

    def load(self, build: Callable[[], H]) -> H:
        """Builds the new resource (an error leaves the current one in place), swaps it in and
        retires the one it replaces."""
        with self._load_lock:
            loaded = build()
            # A single reference assignment: requests see old or new, whole.
            previous, self._current = self._current, loaded
        if previous is not None:
            previous.retire()
        return loaded

    def free(self) -> None:
        with self._load_lock:
            previous, self._current = self._current, None
        if previous is not None:
            previous.retire()

    @contextmanager
    def holding(self, identity: str) -> Iterator[H]:
        """The current resource, held until the block ends, once `identity` (when given) names it."""
        while True:
            loaded = self._current
            if loaded is None:
                raise PreconditionError("no model is loaded: call LoadModel first", reason="NO_MODEL_LOADED")
            if loaded.hold():
                break
            # Replaced and closed between the read and the hold: read the new one.
        try:
            if identity and loaded.name and identity != loaded.name:
                raise IdentityMismatchError(
                    f"model identity mismatch: loaded '{loaded.name}', requested '{identity}'", field="ModelIdentity"
                )
            yield loaded
        finally:
            loaded.release()
