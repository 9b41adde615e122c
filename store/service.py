"""The store service: what the gRPC servicer does for the Stores RPCs, without gRPC.

As for face models (face_service): requests take the loaded store at their start and hold it to
the end; LoadModel opens the new store completely before swapping it in (a failed open leaves the
previous one serving); a store replaced or freed is closed once the last request holding it ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from core.errors import InvalidInputError
from core.lifecycle import Held, Slot
from engines.options import STORE_POSTGRES, STORE_SQLITE, LoadRequest
from store.base import Entry, Match, Store, key_rows

log = logging.getLogger(__name__)


def open_store(request: LoadRequest) -> Store:
    """The store LoadModel's options name (request.store() is not None)."""
    kind = request.store()
    if kind == STORE_SQLITE:
        from store.sqlite import SQLiteStore

        return SQLiteStore(request.store_path())
    if kind == STORE_POSTGRES:
        from store.postgres import PostgresStore

        return PostgresStore(request.store_dsn())
    raise ValueError(f"not a store: {kind}")


@dataclass(eq=False)
class LoadedStore(Held):
    """A loaded store (core.lifecycle.Held: closed once replaced and no request holds it)."""

    store: Store
    ignored_options: tuple[str, ...] = ()

    def _close(self) -> None:
        self.store.close()

    def describe(self) -> str:
        ignored = f"; ignored options: {', '.join(self.ignored_options)}" if self.ignored_options else ""
        return self.store.describe() + ignored


class StoreService:
    def __init__(self) -> None:
        self._slot: Slot[LoadedStore] = Slot()
        self.on_change: Callable[[bool], None] = lambda loaded: None  # told whether a store is loaded

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self, request: LoadRequest) -> LoadedStore:
        loaded = self._slot.load(lambda: LoadedStore(request.model_name, open_store(request), tuple(request.ignored)))
        self.on_change(True)
        return loaded

    def free(self) -> None:
        self._slot.free()
        self.on_change(False)

    @property
    def loaded(self) -> LoadedStore | None:
        return self._slot.current

    @contextmanager
    def _holding(self, identity: str) -> Iterator[Store]:
        with self._slot.holding(identity) as loaded:
            yield loaded.store

    # -- requests ----------------------------------------------------------------------------
    def set(self, keys: Sequence[Sequence[float]], values: Sequence[bytes], identity: str = "") -> int:
        """Upserts each key with its value; how many keys were given."""
        with self._holding(identity) as store:
            rows = key_rows(keys, "Keys")
            if len(values) != len(rows):
                raise InvalidInputError(
                    f"Values: {len(values)} values for {len(rows)} keys: one value per key",
                    reason="BAD_STORE_REQUEST",
                    field="Values",
                )
            store.set(rows, values)
            return len(rows)

    def get(self, keys: Sequence[Sequence[float]], identity: str = "") -> list[Entry]:
        with self._holding(identity) as store:
            if not keys or len(store.index) == 0:
                return []  # the host's store: nothing asked or nothing stored is an empty answer
            return store.get(key_rows(keys, "Keys"))

    def delete(self, keys: Sequence[Sequence[float]], identity: str = "") -> int:
        with self._holding(identity) as store:
            rows = key_rows(keys, "Keys")
            store.delete(rows)
            return len(rows)

    def find(self, key: Sequence[float], top_k: int, identity: str = "") -> list[Match]:
        with self._holding(identity) as store:
            if top_k < 1:
                raise InvalidInputError(f"TopK must be >= 1, got {top_k}", reason="BAD_STORE_REQUEST", field="TopK")
            query = key_rows([key], "Key")[0]
            if len(store.index) == 0:
                return []
            return store.find(np.asarray(query), top_k)
