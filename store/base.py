"""The store's interface and what crosses it: keys as float32 rows, typed results, the checks
every backend shares.

The host's semantics (its local-store): a key is an embedding; Set upserts by exact key, Get and
Delete match exact keys (a missing key is no error), Find answers the top-K stored entries by
cosine similarity, best first. All stored keys have one length, the first Set's; an emptied
store takes any length again.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import InvalidInputError
from store.index import MatrixIndex

# The format a store's database declares (SQLite meta table, Postgres meta table); a file or
# schema without it belongs to something else and is never written to.
STORE_FORMAT = "faceverify-store"
STORE_VERSION = "1"


@dataclass(frozen=True)
class Entry:
    key: np.ndarray  # float32, exactly as it was set
    value: bytes


@dataclass(frozen=True)
class Match:
    key: np.ndarray
    value: bytes
    similarity: float  # cosine similarity in [-1, 1]


def key_digest(key: np.ndarray) -> bytes:
    """The identity of a key: exact-key matching compares these (16 bytes of BLAKE2b of the
    float32 bytes; a collision is as likely as guessing a 128-bit secret)."""
    return hashlib.blake2b(key.tobytes(), digest_size=16).digest()


def key_rows(keys: Sequence[Sequence[float]], field: str = "Keys") -> np.ndarray:
    """The request's keys as one float32 matrix, one row a key; InvalidInputError when there are
    none or one is empty, holds NaN or infinity, or differs in length from the first."""
    if len(keys) == 0:
        raise InvalidInputError(f"{field}: no keys given", reason="BAD_STORE_REQUEST", field=field)
    length = len(keys[0])
    for i, key in enumerate(keys):
        if len(key) == 0:
            raise InvalidInputError(f"{field}[{i}]: empty key", reason="KEY_INVALID", field=field)
        if len(key) != length:
            raise InvalidInputError(
                f"{field}[{i}]: {len(key)} floats, {field}[0] has {length}: every key has one length",
                reason="KEY_DIMENSION_MISMATCH",
                field=field,
            )
    rows = np.stack([np.asarray(k, dtype=np.float32) for k in keys])
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        raise InvalidInputError(
            f"{field}[{int(np.argmax(bad))}]: NaN or infinity in the key", reason="KEY_INVALID", field=field
        )
    # +0.0 turns -0.0 into 0.0: the two compare equal as floats, so they are one key (as in the host's store).
    return rows + np.float32(0.0)


def check_dimension(dim: int | None, rows: np.ndarray, field: str) -> None:
    """KEY_DIMENSION_MISMATCH unless the store is empty (dim None) or its keys have rows' length."""
    if dim is not None and rows.shape[1] != dim:
        raise InvalidInputError(
            f"{field}: keys of {rows.shape[1]} floats, this store's keys have {dim}",
            reason="KEY_DIMENSION_MISMATCH",
            field=field,
        )


def last_of_each(rows: np.ndarray, values: Sequence[bytes]) -> tuple[np.ndarray, list[bytes], list[bytes]]:
    """One Set naming a key twice keeps the later value, as two Sets would: the rows, digests and
    values with each key once."""
    last = {key_digest(row): i for i, row in enumerate(rows)}
    if len(last) == len(rows):
        return rows, list(last), [bytes(v) for v in values]
    order = sorted(last.values())
    return rows[order], [key_digest(rows[i]) for i in order], [bytes(values[i]) for i in order]


class Store(ABC):
    """A durable store of (key, value) with an in-memory MatrixIndex of every entry: Get and Find
    answer from the index; Set and Delete write the database first and answer once it has
    committed, then bring the index in step."""

    kind: str

    def __init__(self) -> None:
        self.index = MatrixIndex()
        self._write_lock = threading.Lock()  # one write at a time: database and index change together

    @abstractmethod
    def describe(self) -> str:
        """Where the data lives and how much there is, for LoadModel's message and Status."""

    @abstractmethod
    def set(self, rows: np.ndarray, values: Sequence[bytes]) -> None:
        """Upserts each row with its value; returns once durable."""

    @abstractmethod
    def delete(self, rows: np.ndarray) -> None:
        """Removes the entries with these exact keys (missing ones are no error); returns once durable."""

    def close(self) -> None:  # noqa: B027 (a store without resources needs no close)
        """Releases the database connection(s)."""

    def get(self, rows: np.ndarray) -> list[Entry]:
        check_dimension(self.index.dim, rows, "Keys")
        return [Entry(key, value) for key, value in self.index.get([key_digest(row) for row in rows])]

    def find(self, query: np.ndarray, top_k: int) -> list[Match]:
        check_dimension(self.index.dim, query.reshape(1, -1), "Key")
        return [Match(key, value, similarity) for key, value, similarity in self.index.find(query, top_k)]
