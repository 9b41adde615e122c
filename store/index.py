"""The in-memory index a store answers Get and Find from: every stored key in one float32 matrix,
and an int8 copy of the keys' directions that Find scans first.

Find is exact, in two passes. The first scans the int8 copy (a quarter of the float32 matrix's
bytes, and the scan is bound by memory reads): each row is the key's unit vector rounded to 255
levels with a scale of its own, and the query is rounded the same way, so the integer dot product
times the two scales is the cosine up to an error this index can bound for every row: |error| <=
residual_row * (1 + residual_query) + residual_query, where a residual is the norm of what the
rounding lost (measured when the row is stored, and for the query at each Find), plus a slack for
floating-point rounding far above the arithmetic's own. A row whose upper bound is below the K-th
largest lower bound has K rows certainly more similar, so it cannot be in the top K; every other
row is a candidate and gets its exact similarity from the float32 key in the second pass. On
random 512-d keys a few hundred of 1M rows are candidates; on near-ties everything may be, and the
second pass is then a full exact scan (slower, still exact).

The exact similarity is the cosine of the stored float32 key and the query, computed in float64
one row at a time (numpy's per-row sum), so a row's score does not depend on which other rows are
scored with it. Equal similarities rank by row. The matrix keeps the keys as they were set, not
normalised, so that Find answers keys a Delete matches exactly. Rows are packed: a deleted row
takes the last row's place. The arrays grow by doubling; their unused rows are zero pages the
kernel has not backed yet, so they cost address space, not memory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

INITIAL_ROWS = 1024
# Codes are symmetric in [-127, 127]: no -128, so no SIMD kernel's 16-bit pair sum of two code
# products (2 x 127 x 127 = 32258) saturates, and the kernel's int32 sums cannot overflow below
# MAX_CODED_DIM; longer keys are scored exactly, every row.
CODE_LEVEL = 127
MAX_CODED_DIM = (2**31 - 1) // CODE_LEVEL**2
# Added to every row's error bound for floating-point rounding in the bound and score arithmetic
# (the float32 dot products past 2**24, the float32 scales and margins, the float64 scores), which
# is below 1e-6 on cosines, whose size is at most 1.
SLACK = 1e-5
EXACT_ROWS = 4096  # rows scored exactly at once: 16 MB of float64 products at 512-d
QUANTISE_ROWS = 256  # rows quantised at once: their float64 copies stay in the CPU's cache
SPLIT_ROWS = 65536  # from this many rows, the first pass is split across the cores

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _parts() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _first_pass_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, _parts() - 1), thread_name_prefix="find-scan")
        return _pool


def quantise(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales, residuals, norms) of float32 rows: int8 codes with codes * scale close to
    the row's unit vector (a zero row: zero codes, scale 0), the norm of the difference rounded up
    to float32, and the row's norm. In float64, where float32 keys' squares cannot overflow."""
    units = rows.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", units, units))
    with np.errstate(divide="ignore"):
        inverse = np.where(norms > 0, 1.0 / norms, 0.0)
    units *= inverse[:, None]
    peak = np.maximum(rows.max(axis=1), -rows.min(axis=1)).astype(np.float64) * inverse
    scales = (peak / CODE_LEVEL).astype(np.float32)
    exact_scales = scales.astype(np.float64)  # the float32 scale the first pass multiplies by
    with np.errstate(divide="ignore"):
        steps = np.where(exact_scales > 0, 1.0 / exact_scales, 0.0)
    codes = units * steps[:, None]
    np.rint(codes, out=codes)
    np.clip(codes, -CODE_LEVEL, CODE_LEVEL, out=codes)
    lost = codes * exact_scales[:, None]
    lost -= units
    residuals = np.sqrt(np.einsum("ij,ij->i", lost, lost))
    return codes.astype(np.int8), scales, np.nextafter(residuals.astype(np.float32), np.float32(np.inf)), norms


class MatrixIndex:
    def __init__(self, parts: int | None = None) -> None:
        """parts: how many threads scan the int8 copy (default: one per core)."""
        self._lock = threading.Lock()
        self._parts = parts or _parts()
        self._clear()

    def _clear(self) -> None:
        self.dim: int | None = None  # the stored keys' length; None while empty
        self._matrix = np.zeros((0, 0), dtype=np.float32)
        self._norm = np.zeros(0, dtype=np.float64)
        self._codes = np.zeros((0, 0), dtype=np.int8)
        self._scale = np.zeros(0, dtype=np.float32)
        self._residual = np.zeros(0, dtype=np.float32)
        self._rows: dict[bytes, int] = {}  # key digest -> row
        self._digests: list[bytes] = []  # row -> key digest
        self._values: list[bytes] = []  # row -> value

    def __len__(self) -> int:
        return len(self._digests)

    @property
    def matrix_bytes(self) -> int:
        """Bytes of the rows in use: what `len` keys of `dim` float32 take."""
        return len(self) * (self.dim or 0) * 4

    def _per_row(self) -> list[str]:
        return ["_matrix", "_norm", "_codes", "_scale", "_residual"]

    def _reserve(self, rows: int, dim: int) -> None:
        if self.dim is None:
            self.dim = dim
        if rows <= self._matrix.shape[0]:
            return
        capacity = max(INITIAL_ROWS, self._matrix.shape[0])
        while capacity < rows:
            capacity *= 2
        used = len(self)
        for name in self._per_row():
            old = getattr(self, name)
            grown = np.zeros((capacity, dim) if old.ndim == 2 else capacity, dtype=old.dtype)
            if used:
                grown[:used] = old[:used]
            setattr(self, name, grown)

    def replace_all(self, rows: np.ndarray, digests: Sequence[bytes], values: Sequence[bytes]) -> None:
        """The whole content at once (a load or a reload): the index holds exactly these entries,
        whose digests are distinct (a table's primary key)."""
        with self._lock:
            self._clear()
            if len(digests):
                # rows is adopted as the matrix, not copied: a load never holds the keys twice.
                count, self.dim = rows.shape
                self._matrix = np.ascontiguousarray(rows, dtype=np.float32)
                self._norm = np.zeros(count, dtype=np.float64)
                self._codes = np.zeros((count, self.dim), dtype=np.int8)
                self._scale = np.zeros(count, dtype=np.float32)
                self._residual = np.zeros(count, dtype=np.float32)
                for start in range(0, count, QUANTISE_ROWS):
                    block = slice(start, start + QUANTISE_ROWS)
                    self._codes[block], self._scale[block], self._residual[block], self._norm[block] = quantise(
                        self._matrix[block]
                    )
                self._digests = list(digests)
                self._values = list(values)
                self._rows = {digest: row for row, digest in enumerate(self._digests)}

    def upsert(self, rows: np.ndarray, digests: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Each row with its value, replacing the entry of an equal key; digests name the rows'
        keys (store.base.key_digest), each once."""
        with self._lock:
            self._upsert(rows, digests, values)

    def _upsert(self, rows: np.ndarray, digests: Sequence[bytes], values: Sequence[bytes]) -> None:
        if not len(digests):
            return
        new = sum(1 for d in digests if d not in self._rows)
        self._reserve(len(self) + new, rows.shape[1])
        parts = [quantise(rows[i : i + QUANTISE_ROWS]) for i in range(0, len(rows), QUANTISE_ROWS)]
        codes, scales, residuals, norms = (np.concatenate(column) for column in zip(*parts))
        targets = np.empty(len(digests), dtype=np.intp)
        for i, digest in enumerate(digests):
            row = self._rows.get(digest)
            if row is None:
                row = len(self._digests)
                self._rows[digest] = row
                self._digests.append(digest)
                self._values.append(values[i])
            else:
                self._values[row] = values[i]
            targets[i] = row
        self._matrix[targets] = rows
        self._norm[targets] = norms
        self._codes[targets] = codes
        self._scale[targets] = scales
        self._residual[targets] = residuals

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
                    for name in self._per_row():
                        array = getattr(self, name)
                        array[row] = array[last]
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
        """(key, value, cosine similarity) of the top_k entries most similar to query, best first;
        equal similarities in row order."""
        query = np.asarray(query, dtype=np.float32).reshape(1, -1)
        codes, scales, residuals, norms = quantise(query)
        with self._lock:
            used = len(self)
            k = min(top_k, used)
            if k <= 0:
                return []
            if norms[0] > 0:
                rows = self._candidates(codes, scales[0], residuals[0], k)
                scores = self.exact_similarities(rows, query[0])
            else:  # every similarity is 0: the first rows win the tie
                rows, scores = np.arange(k), np.zeros(k)
            # Ranked on the unclipped scores: the bounds that left rows out hold for those.
            best = np.lexsort((rows, -scores))[:k]
            return [
                (self._matrix[rows[i]].copy(), self._values[rows[i]], float(np.clip(scores[i], -1.0, 1.0)))
                for i in best
            ]

    def exact_similarities(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
        """The cosine similarity of these rows' keys with a float32 query, in float64: each row's
        products summed on their own, so a score does not depend on the rows scored with it.
        What Find ranks by; a zero key or query has similarity 0."""
        wide = query.astype(np.float64)
        norm = np.sqrt(wide @ wide)
        unit_query = wide / norm if norm > 0 else wide
        scores = np.empty(len(rows), dtype=np.float64)
        for start in range(0, len(rows), EXACT_ROWS):
            part = rows[start : start + EXACT_ROWS]
            products = self._matrix[part].astype(np.float64)
            products *= unit_query
            norms = self._norm[part]
            with np.errstate(divide="ignore", invalid="ignore"):
                scores[start : start + len(part)] = np.where(norms > 0, products.sum(axis=1) / norms, 0.0)
        return scores

    def _candidates(self, codes: np.ndarray, scale: np.float32, residual: np.float32, k: int) -> np.ndarray:
        """The rows that may be among the k most similar to the query quantised as codes * scale,
        residual away from its unit vector (see the module doc)."""
        used = len(self)
        if (self.dim or 0) > MAX_CODED_DIM:
            return np.arange(used)
        query_residual = float(residual)
        approx = self._dots(codes, used)
        approx *= self._scale[:used]
        approx *= scale
        margin = self._residual[:used] * np.float32(1.0 + query_residual)
        margin += np.float32(query_residual + SLACK)
        threshold = np.partition(approx - margin, used - k)[used - k]
        approx += margin
        return np.flatnonzero(approx >= threshold)

    def _dots(self, query_codes: np.ndarray, used: int) -> np.ndarray:
        """The integer dot products of the query's codes with the first `used` rows' codes, as
        float32, across the cores for a large index."""
        # Imported on the first Find: a server that only serves faces does not map its kernels.
        import numkong

        out = np.empty((1, used), dtype=np.float32)
        parts = self._parts if used >= SPLIT_ROWS else 1
        bounds = np.linspace(0, used, parts + 1).astype(int)

        def scan(part: int) -> None:
            a, b = bounds[part], bounds[part + 1]
            numkong.cdist(query_codes, self._codes[a:b], metric="dot", out=out[:, a:b])

        others = [_first_pass_pool().submit(scan, part) for part in range(1, parts)]
        scan(0)
        for other in others:
            other.result()
        return out[0]
