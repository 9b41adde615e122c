"""The in-memory index a store answers Get and Find from: every stored key in one float32 matrix.

Find is exact: one matrix-vector product gives every key's dot product with the query, scaled by
the key's inverse norm (kept per row) and the query's, which is the cosine similarity; the top K
are picked with a partial sort. The matrix keeps the keys as they were set, not normalised, so
that Find answers keys a Delete matches exactly. Rows are packed: a deleted row takes the last
row's place. The matrix grows by doubling; its unused rows are zero pages the kernel has not
backed yet, so they cost address space, not memory.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

INITIAL_ROWS = 1024


class MatrixIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self.dim: int | None = None  # the stored keys' length; None while empty
        self._matrix = np.zeros((0, 0), dtype=np.float32)
        self._inv_norm = np.zeros(0, dtype=np.float32)
        self._rows: dict[bytes, int] = {}  # key digest -> row
        self._digests: list[bytes] = []  # row -> key digest
        self._values: list[bytes] = []  # row -> value

    def __len__(self) -> int:
        return len(self._digests)

    @property
    def matrix_bytes(self) -> int:
        """Bytes of the rows in use: what `len` keys of `dim` float32 take."""
        return len(self) * (self.dim or 0) * 4

    def _reserve(self, rows: int, dim: int) -> None:
        if self.dim is None:
            self.dim = dim
        if rows <= self._matrix.shape[0]:
            return
        capacity = max(INITIAL_ROWS, self._matrix.shape[0])
        while capacity < rows:
            capacity *= 2
        matrix = np.zeros((capacity, dim), dtype=np.float32)
        inv_norm = np.zeros(capacity, dtype=np.float32)
        used = len(self)
        if used:
            matrix[:used] = self._matrix[:used]
            inv_norm[:used] = self._inv_norm[:used]
        self._matrix, self._inv_norm = matrix, inv_norm

    @staticmethod
    def _inverse_norms(rows: np.ndarray) -> np.ndarray:
        # In float64 for keys too large for float32 squares, a block at a time: a whole 1M-key
        # matrix in float64 would take twice its own memory again.
        return np.concatenate(
            [MatrixIndex._block_inverse_norms(rows[i : i + 65536]) for i in range(0, len(rows), 65536)]
        )

    @staticmethod
    def _block_inverse_norms(rows: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(rows.astype(np.float64), axis=1)
        # A zero key (or one too large for float32 products) has similarity 0 with everything.
        with np.errstate(divide="ignore"):
            inverse = np.where((norms > 0) & np.isfinite(norms), 1.0 / norms, 0.0)
        return inverse.astype(np.float32)

    def replace_all(self, rows: np.ndarray, digests: Sequence[bytes], values: Sequence[bytes]) -> None:
        """The whole content at once (a load or a reload): the index holds exactly these entries,
        whose digests are distinct (a table's primary key)."""
        with self._lock:
            self._clear()
            if len(digests):
                # rows is adopted as the matrix, not copied: a load never holds the keys twice.
                self.dim = rows.shape[1]
                self._matrix = np.ascontiguousarray(rows, dtype=np.float32)
                self._inv_norm = self._inverse_norms(self._matrix)
                self._digests = list(digests)
                self._values = list(values)
                self._rows = {digest: row for row, digest in enumerate(self._digests)}

    def upsert(self, rows: np.ndarray, digests: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Each row with its value, replacing the entry of an equal key; digests name the rows'
        keys (store.base.key_digest), each once."""
        with self._lock:
            self._upsert(rows, digests, values)

    def _upsert(self, rows: np.ndarray, digests: Sequence[bytes], values: Sequence[bytes]) -> None:
        new = sum(1 for d in digests if d not in self._rows)
        self._reserve(len(self) + new, rows.shape[1])
        inverse = self._inverse_norms(rows)
        for i, digest in enumerate(digests):
            row = self._rows.get(digest)
            if row is None:
                row = len(self._digests)
                self._rows[digest] = row
                self._digests.append(digest)
                self._values.append(values[i])
            else:
                self._values[row] = values[i]
            self._matrix[row] = rows[i]
            self._inv_norm[row] = inverse[i]

    def delete(self, digests: Sequence[bytes]) -> int:
        """Removes the entries of these keys; how many there were."""
        removed = 0
        with self._lock:
            for digest in digests:
                row = self._rows.pop(digest, None)
                if row is None:
                    continue
                removed += 1
                last = len(self._digests) - 1
                if row != last:
                    moved = self._digests[last]
                    self._matrix[row] = self._matrix[last]
                    self._inv_norm[row] = self._inv_norm[last]
                    self._digests[row] = moved
                    self._values[row] = self._values[last]
                    self._rows[moved] = row
                self._digests.pop()
                self._values.pop()
            if not self._digests:
                self._clear()  # the host's rule: an emptied store takes keys of any length again
        return removed

    def get(self, digests: Sequence[bytes]) -> list[tuple[np.ndarray, bytes]]:
        """(key, value) of these keys that are stored, in the order asked, each once."""
        found: list[tuple[np.ndarray, bytes]] = []
        seen: set[bytes] = set()
        with self._lock:
            for digest in digests:
                row = self._rows.get(digest)
                if row is not None and digest not in seen:
                    seen.add(digest)
                    found.append((self._matrix[row].copy(), self._values[row]))
        return found

    def find(self, query: np.ndarray, top_k: int) -> list[tuple[np.ndarray, bytes, float]]:
        """(key, value, cosine similarity) of the top_k entries most similar to query, best first."""
        query = np.asarray(query, dtype=np.float32)
        query_norm = float(np.linalg.norm(query.astype(np.float64)))
        query_scale = np.float32(1.0 / query_norm) if query_norm > 0 and np.isfinite(query_norm) else np.float32(0.0)
        with self._lock:
            used = len(self)
            if used == 0:
                return []
            scores = self._matrix[:used] @ query
            scores *= self._inv_norm[:used]
            scores *= query_scale
            np.nan_to_num(scores, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
            k = min(top_k, used)
            best = np.argpartition(-scores, k - 1)[:k] if k < used else np.arange(used)
            best = best[np.argsort(-scores[best], kind="stable")]
            return [
                (self._matrix[row].copy(), self._values[row], float(np.clip(scores[row], -1.0, 1.0))) for row in best
            ]
