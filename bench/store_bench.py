"""How far the store role scales on one machine: `make bench-store` (also run by `make bench`).

    .venv/bin/python bench/store_bench.py [--sizes 10000,100000,1000000] [--batch 1000] [--finds 60]
                                          [--compare KEYS]

Starts `backend.py` as a subprocess, loads `store:sqlite` in a temporary directory and grows the
store to each size with StoresSet calls of `--batch` random unit 512-d keys (an embedding's
shape). At each size: Set throughput (keys/s over the growth to that size, durable commits
included, client-side message building included), StoresFind latency (TopK 5, p50/p95 over
`--finds` queries near stored keys, each checked to find its key first) and the server's RSS
against the raw float32 matrix (size x 512 x 4 bytes). At the largest size the server is
restarted and the time LoadModel takes to read everything back is measured too. Then, in this
process on the same keys and queries, Find side by side with the plain float32 scan it replaced
(one matrix-vector product over every key), with the load average, so that the ratio means
something on a shared machine; `--compare 0` skips it. Targets
(issue 15), at 1M keys: Find p50 <= 100 ms, RSS <= 1.5 x the raw matrix. Prints a table and
PASS/FAIL, writes bench/results/store_bench.json, exits 1 if a target fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import backend_pb2  # noqa: E402
from harness.procfs import status_field  # noqa: E402
from harness.servers import BackendProcess  # noqa: E402
from store.index import MatrixIndex  # noqa: E402

DIM = 512
TOP_K = 5
TARGET_SIZE = 1_000_000
TARGET_FIND_P50_MS = 100.0
TARGET_RSS_RATIO = 1.5
CALL_TIMEOUT = 600.0
RESULTS = os.path.join(REPO, "bench", "results", "store_bench.json")


def batch_keys(index: int, batch: int) -> np.ndarray:
    """Batch `index` of unit keys, the same on every call (so queries can be rebuilt)."""
    rows = np.random.default_rng(index).standard_normal((batch, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def set_request(index: int, batch: int) -> backend_pb2.StoresSetOptions:
    rows = batch_keys(index, batch)
    return backend_pb2.StoresSetOptions(
        Keys=[backend_pb2.StoresKey(Floats=row.tolist()) for row in rows],
        Values=[backend_pb2.StoresValue(Bytes=b'{"name":"person-%d-%d"}' % (index, i)) for i in range(batch)],
    )


def load(server: BackendProcess, directory: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = server.stub.LoadModel(
        backend_pb2.ModelOptions(Model="bench-gallery", ModelPath=directory, Options=["store:sqlite"]),
        timeout=CALL_TIMEOUT,
    )
    if not result.success:
        raise RuntimeError(result.message)
    return time.perf_counter() - started, result.message


def find_latencies(server: BackendProcess, batches: int, batch: int, finds: int) -> list[float]:
    rng = np.random.default_rng(12345)
    times = []
    for _ in range(finds):
        index, row = int(rng.integers(batches)), int(rng.integers(batch))
        query = batch_keys(index, batch)[row] + rng.standard_normal(DIM).astype(np.float32) * 0.01
        request = backend_pb2.StoresFindOptions(Key=backend_pb2.StoresKey(Floats=query.tolist()), TopK=TOP_K)
        started = time.perf_counter()
        found = server.stub.StoresFind(request, timeout=CALL_TIMEOUT)
        times.append((time.perf_counter() - started) * 1000.0)
        if found.Values[0].Bytes != b'{"name":"person-%d-%d"}' % (index, row):
            raise AssertionError(f"Find did not answer the stored key first: {found.Values[0].Bytes!r}")
    return times


def plain_find(matrix: np.ndarray, inv_norm: np.ndarray, query: np.ndarray, top_k: int) -> np.ndarray:
    """The Find this index had before its int8 first pass: every row's float32 cosine from one
    matrix-vector product, the top K by a partial sort."""
    scores = matrix @ query
    scores *= inv_norm
    scores *= np.float32(1.0 / np.linalg.norm(query))
    best = np.argpartition(-scores, top_k - 1)[:top_k]
    return best[np.argsort(-scores[best], kind="stable")]


def compare_find(keys: int, batch: int, finds: int) -> dict:
    """Find and plain_find on the same `keys` stored keys and the same queries, interleaved."""
    batches = keys // batch
    matrix = np.empty((batches * batch, DIM), dtype=np.float32)
    for i in range(batches):
        matrix[i * batch : (i + 1) * batch] = batch_keys(i, batch)
    inv_norm = (1.0 / np.linalg.norm(matrix, axis=1)).astype(np.float32)
    rows = np.arange(len(matrix))
    index = MatrixIndex()
    index.replace_all(
        matrix, [int(r).to_bytes(8, "little") for r in rows], [int(r).to_bytes(8, "little") for r in rows]
    )
    one_thread = MatrixIndex(parts=1)
    one_thread.replace_all(matrix, list(index._digests), list(index._values))
    rng = np.random.default_rng(54321)
    times: dict[str, list[float]] = {"plain": [], "find": [], "find_1_thread": []}
    same_keys = 0
    largest_difference = 0.0
    loads = [os.getloadavg()[0]]
    for _ in range(finds):
        query = matrix[int(rng.integers(len(matrix)))] + rng.standard_normal(DIM).astype(np.float32) * 0.01
        started = time.perf_counter()
        plain = plain_find(matrix, inv_norm, query, TOP_K)
        times["plain"].append(time.perf_counter() - started)
        for name, searcher in (("find", index), ("find_1_thread", one_thread)):
            started = time.perf_counter()
            found = searcher.find(query, TOP_K)
            times[name].append(time.perf_counter() - started)
        got = [int.from_bytes(value, "little") for _, value, _ in found]
        same_keys += got == plain.tolist()
        plain_scores = matrix[plain] @ query * inv_norm[plain] / np.linalg.norm(query)
        largest_difference = max(
            largest_difference, float(np.max(np.abs(np.array([s for *_, s in found]) - plain_scores)))
        )
        loads.append(os.getloadavg()[0])
    result: dict = {"keys": len(matrix), "finds": finds, "same_top_k_as_plain": same_keys}
    for name, values in times.items():
        result[f"{name}_p50_ms"] = round(float(np.percentile(values, 50)) * 1000, 1)
        result[f"{name}_p95_ms"] = round(float(np.percentile(values, 95)) * 1000, 1)
    result["largest_similarity_difference"] = largest_difference
    result["load_average_1min"] = [round(min(loads), 1), round(max(loads), 1)]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--finds", type=int, default=60)
    parser.add_argument(
        "--compare", type=int, default=None, help="keys for the side-by-side (default: the largest size)"
    )
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="store-bench-") as directory:
        with BackendProcess() as server:
            load(server, directory)
            batches = 0
            for size in sizes:
                started, added = time.perf_counter(), 0
                while batches * args.batch < size:
                    server.stub.StoresSet(set_request(batches, args.batch), timeout=CALL_TIMEOUT)
                    batches += 1
                    added += args.batch
                set_seconds = time.perf_counter() - started
                times = find_latencies(server, batches, args.batch, args.finds)
                rss = status_field("VmRSS", server.pid) * 1024
                stored = batches * args.batch
                rows.append(
                    {
                        "keys": stored,
                        "set_per_s": round(added / set_seconds, 1),
                        "find_p50_ms": round(float(np.percentile(times, 50)), 2),
                        "find_p95_ms": round(float(np.percentile(times, 95)), 2),
                        "rss_mb": round(rss / 2**20, 1),
                        "raw_matrix_mb": round(stored * DIM * 4 / 2**20, 1),
                        "rss_ratio": round(rss / (stored * DIM * 4), 3),
                        "load_average_1min": round(os.getloadavg()[0], 1),
                    }
                )
                print(rows[-1], flush=True)
        database_mb = os.path.getsize(os.path.join(directory, "face-store.sqlite")) / 2**20
        with BackendProcess() as server:  # a restart: everything is read back from the file
            reload_seconds, message = load(server, directory)
            reload_rss = status_field("VmRSS", server.pid) * 1024
            times = find_latencies(server, batches, args.batch, args.finds)
    compared = (
        compare_find(sizes[-1] if args.compare is None else args.compare, args.batch, args.finds)
        if args.compare != 0
        else None
    )
    largest = rows[-1]
    restart = {
        "keys": largest["keys"],
        "load_model_s": round(reload_seconds, 1),
        "rss_mb": round(reload_rss / 2**20, 1),
        "rss_ratio": round(reload_rss / (largest["keys"] * DIM * 4), 3),
        "find_p50_ms": round(float(np.percentile(times, 50)), 2),
        "find_p95_ms": round(float(np.percentile(times, 95)), 2),
        "database_mb": round(database_mb, 1),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "message": message,
    }

    print(f"\nstore:sqlite, {DIM}-d keys, Set batches of {args.batch}, Find TopK {TOP_K} ({platform.node()})")
    print(
        f"{'keys':>9} {'Set/s':>9} {'Find p50':>9} {'Find p95':>9} {'RSS MB':>8} {'matrix MB':>9} {'RSS/matrix':>10}"
        f" {'load':>5}"
    )
    for r in rows:
        print(
            f"{r['keys']:>9} {r['set_per_s']:>9.0f} {r['find_p50_ms']:>7.1f}ms {r['find_p95_ms']:>7.1f}ms"
            f" {r['rss_mb']:>8.0f} {r['raw_matrix_mb']:>9.0f} {r['rss_ratio']:>10.2f} {r['load_average_1min']:>5.1f}"
        )
    print(
        f"restart at {restart['keys']} keys: LoadModel {restart['load_model_s']} s, RSS {restart['rss_mb']:.0f} MB"
        f" ({restart['rss_ratio']:.2f} x matrix), Find p50 {restart['find_p50_ms']} ms,"
        f" database {restart['database_mb']:.0f} MB, load average {restart['load_average_1min']}"
    )
    if compared:
        print(
            f"side by side in one process, {compared['keys']} keys, load average {compared['load_average_1min']}:"
            f" Find p50 {compared['find_p50_ms']} ms (1 thread {compared['find_1_thread_p50_ms']} ms),"
            f" plain float32 scan p50 {compared['plain_p50_ms']} ms;"
            f" same top {TOP_K} {compared['same_top_k_as_plain']}/{compared['finds']},"
            f" largest similarity difference {compared['largest_similarity_difference']:.1e}"
        )
    failed = False
    at_target = [r for r in rows if r["keys"] >= TARGET_SIZE]
    if at_target:
        r = at_target[-1]
        checks = [
            (f"Find p50 at {r['keys']} keys <= {TARGET_FIND_P50_MS:g} ms", r["find_p50_ms"], TARGET_FIND_P50_MS),
            (f"RSS at {r['keys']} keys <= {TARGET_RSS_RATIO:g} x raw matrix", r["rss_ratio"], TARGET_RSS_RATIO),
            (f"RSS after restart <= {TARGET_RSS_RATIO:g} x raw matrix", restart["rss_ratio"], TARGET_RSS_RATIO),
        ]
        for label, value, bound in checks:
            ok = value <= bound
            print(f"{'PASS' if ok else 'FAIL'}  {label}: {value}")
            failed |= not ok
    else:
        print(f"no size reaches {TARGET_SIZE} keys: targets not checked")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(
            {"sizes": rows, "restart": restart, "side_by_side": compared, "batch": args.batch, "dim": DIM}, f, indent=2
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
