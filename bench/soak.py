"""Soak: the real backend process under mixed traffic from 8 client threads for 30 s.

    .venv/bin/python bench/soak.py [--duration 30] [--threads 8] [--max-growth-mb 48] [--models models]

Starts `backend.py --preload-default <models>` as the host would, then every client thread loops
(bounded by the duration and --max-requests) over a weighted mix of FaceVerify (same and different
people, with and without anti_spoofing), FaceAnalyze, Embedding and Detect on the real photos of
../shared/data, plus bad inputs that must get their exact code: not base64, a truncated JPEG and a
pixel bomb (INVALID_ARGUMENT), a faceless photo and a wrong ModelIdentity (NOT_FOUND). Every
answer is checked (code, and for successes the result: a verification must match the photos'
labels, a face must be found); anything else is an error.

The server's memory is sampled from /proc every 0.25 s: RSS at start (before traffic), peak RSS
(VmHWM) and RSS growth over the second half of the run (median of the last 3 s minus median of the
3 s around the midpoint). After the first half every buffer and arena a request needs exists, so a
steady server stops growing; RSS still swings by about +-30 MB with the images in flight, hence the
48 MB bound. On 2 cores the second half is ~300 requests, so the bound catches a leak of ~150 KB a
request (one decoded photo a request would be hundreds of MB); a 120 s run (--duration 120) stayed
flat at 450-480 MB after warm-up.

Prints a summary, writes bench/results/soak.json, and exits non-zero on any unexpected answer, a
growth above --max-growth-mb, an unhealthy server at the end or a non-zero exit on SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import backend_pb2 as pb  # noqa: E402
import backend_pb2_grpc  # noqa: E402
from evaluation import read_labels  # noqa: E402
from harness.images import b64, b64_file, b64_image, faceless_image, png_pixel_bomb  # noqa: E402
from harness.paths import IDENTITY_DIR, MODELS_DIR  # noqa: E402
from harness.procfs import RssSampler, status_field  # noqa: E402
from harness.servers import BackendProcess  # noqa: E402

RESULTS = os.path.join(REPO, "bench", "results", "soak.json")
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
CALL_TIMEOUT = 30.0


def labelled_photos() -> list[tuple[str, str]]:
    """(base64, identity) of the single-face photos of face-recognition-examples."""
    images, _ = read_labels(os.path.join(IDENTITY_DIR, "labels.csv"), "identity")
    return [(b64_file(image.path), image.label) for image in images]


# -- the traffic ---------------------------------------------------------------------------------
@dataclass
class Operation:
    name: str
    weight: float
    # Sends one request; returns (status code, problem with a successful answer or None).
    run: Callable[[backend_pb2_grpc.BackendStub, random.Random], tuple[grpc.StatusCode, str | None]]
    expected: grpc.StatusCode = OK


def operations(photos: list[tuple[str, str]]) -> list[Operation]:
    by_identity: dict[str, list[str]] = {}
    for data, identity in photos:
        by_identity.setdefault(identity, []).append(data)
    repeated = [i for i, items in by_identity.items() if len(items) > 1]
    jpeg = base64.b64decode(photos[0][0])
    truncated = b64(jpeg[: len(jpeg) // 2])
    bomb = b64(png_pixel_bomb())
    faceless = b64_image(faceless_image())

    def pair(rng: random.Random) -> tuple[str, str, bool]:
        if rng.random() < 0.5:
            identity = rng.choice(repeated)
            a, b = rng.sample(by_identity[identity], 2)
            return a, b, True
        (a, ia), (b, ib) = rng.sample(photos, 2)
        return a, b, ia == ib

    def verify(anti_spoofing: bool):
        def run(stub, rng):
            a, b, same = pair(rng)
            reply = stub.FaceVerify(
                pb.FaceVerifyRequest(img1=a, img2=b, anti_spoofing=anti_spoofing), timeout=CALL_TIMEOUT
            )
            if not anti_spoofing and reply.verified != same:
                return (
                    OK,
                    f"verified={reply.verified} for {'same' if same else 'different'} people"
                    f" (distance {reply.distance:.3f}, threshold {reply.threshold:.3f})",
                )
            if anti_spoofing != reply.HasField("img1_is_real") or anti_spoofing != reply.HasField("img2_is_real"):
                return OK, "liveness fields present/absent wrongly"
            if anti_spoofing and reply.verified and not (same and reply.img1_is_real and reply.img2_is_real):
                return OK, "verified despite a failed liveness or different people"
            return OK, None

        return run

    def analyze(stub, rng):
        faces = stub.FaceAnalyze(pb.FaceAnalyzeRequest(img=rng.choice(photos)[0]), timeout=CALL_TIMEOUT).faces
        if len(faces) < 1 or not all(f.dominant_gender for f in faces):
            return OK, f"{len(faces)} faces, attributes missing"
        return OK, None

    def embedding(stub, rng):
        reply = stub.Embedding(pb.PredictOptions(Images=[rng.choice(photos)[0]]), timeout=CALL_TIMEOUT)
        norm = float(np.linalg.norm(reply.embeddings))
        if reply.dim != len(reply.embeddings) or abs(norm - 1.0) > 1e-3:
            return OK, f"embedding dim {reply.dim}/{len(reply.embeddings)}, norm {norm:.4f}"
        return OK, None

    def detect(stub, rng):
        found = stub.Detect(pb.DetectOptions(src=rng.choice(photos)[0]), timeout=CALL_TIMEOUT).Detections
        return OK, None if len(found) >= 1 else "no face detected in a face photo"

    def bad(make_call):
        def run(stub, rng):
            make_call(stub, rng)
            return OK, "a bad input was answered OK"

        return run

    return [
        Operation("FaceVerify", 3.0, verify(False)),
        Operation("FaceVerify+anti_spoofing", 2.0, verify(True)),
        Operation("FaceAnalyze", 2.0, analyze),
        Operation("Embedding", 2.0, embedding),
        Operation("Detect", 2.0, detect),
        Operation(
            "bad: not base64",
            0.4,
            bad(
                lambda s, r: s.FaceVerify(
                    pb.FaceVerifyRequest(img1="not base64!", img2=photos[0][0]), timeout=CALL_TIMEOUT
                )
            ),
            INVALID,
        ),
        Operation(
            "bad: truncated JPEG",
            0.4,
            bad(lambda s, r: s.FaceAnalyze(pb.FaceAnalyzeRequest(img=truncated), timeout=CALL_TIMEOUT)),
            INVALID,
        ),
        Operation(
            "bad: pixel bomb",
            0.4,
            bad(lambda s, r: s.Embedding(pb.PredictOptions(Images=[bomb]), timeout=CALL_TIMEOUT)),
            INVALID,
        ),
        Operation(
            "bad: faceless photo",
            0.4,
            bad(
                lambda s, r: s.FaceVerify(pb.FaceVerifyRequest(img1=photos[0][0], img2=faceless), timeout=CALL_TIMEOUT)
            ),
            NOT_FOUND,
        ),
        Operation(
            "bad: wrong ModelIdentity",
            0.4,
            bad(
                lambda s, r: s.Detect(
                    pb.DetectOptions(src=photos[0][0], ModelIdentity="not-the-loaded-model"), timeout=CALL_TIMEOUT
                )
            ),
            NOT_FOUND,
        ),
    ]


@dataclass
class Tally:
    count: int = 0
    latencies_ms: list = field(default_factory=list)
    errors: int = 0


class Client(threading.Thread):
    def __init__(
        self,
        index: int,
        stub,
        ops: list[Operation],
        stop_at: float,
        max_requests: int,
        tallies: dict[str, Tally],
        errors: list[str],
        lock: threading.Lock,
    ):
        super().__init__(name=f"client-{index}", daemon=True)
        self.rng = random.Random(1000 + index)
        self.stub, self.ops, self.stop_at, self.max_requests = stub, ops, stop_at, max_requests
        self.tallies, self.errors, self.lock = tallies, errors, lock

    def run(self) -> None:
        weights = [op.weight for op in self.ops]
        for _ in range(self.max_requests):
            if time.monotonic() >= self.stop_at:
                return
            op = self.rng.choices(self.ops, weights)[0]
            started = time.perf_counter()
            try:
                code, problem = op.run(self.stub, self.rng)
            except grpc.RpcError as error:
                code, problem = error.code(), None
                if code != op.expected:
                    problem = f"{code.name}: {error.details()}"
            except Exception as error:  # a bug in this script must not pass as a served request
                code, problem = None, f"client error {type(error).__name__}: {error}"
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            if problem is None and code != op.expected:
                problem = f"expected {op.expected.name}, got {code.name if code else code}"
            with self.lock:
                tally = self.tallies[op.name]
                tally.count += 1
                tally.latencies_ms.append(elapsed_ms)
                if problem is not None:
                    tally.errors += 1
                    if len(self.errors) < 20:
                        self.errors.append(f"{op.name}: {problem}")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of traffic (default 30)")
    parser.add_argument("--threads", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="per thread, bounds the loop")
    parser.add_argument(
        "--max-growth-mb", type=float, default=48.0, help="allowed RSS growth over the second half (default 48 MB)"
    )
    parser.add_argument("--models", default=MODELS_DIR, help="models directory (default models/)")
    parser.add_argument("--out", default=RESULTS, help="JSON results (default bench/results/soak.json)")
    args = parser.parse_args(argv)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    photos = labelled_photos()
    ops = operations(photos)
    log_path = os.path.join(os.path.dirname(args.out), "soak-backend.log")
    try:
        server = BackendProcess("--preload-default", args.models, log_path=log_path)
    except RuntimeError as error:
        raise SystemExit(str(error)) from None
    sampler = RssSampler(server.pid, 0.25)
    try:
        if (
            server.health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT).status
            != health_pb2.HealthCheckResponse.SERVING
        ):
            raise SystemExit("backend answers Health but is not SERVING after --preload-default")
        stub = server.stub
        rss_start = status_field("VmRSS", server.pid) / 1024
        sampler.start()

        tallies = {op.name: Tally() for op in ops}
        errors: list[str] = []
        lock = threading.Lock()
        started = time.monotonic()
        stop_at = started + args.duration
        clients = [Client(i, stub, ops, stop_at, args.max_requests, tallies, errors, lock) for i in range(args.threads)]
        print(
            f"soak: {args.threads} clients for {args.duration:.0f} s against backend pid {server.pid}"
            f" on {server.address}",
            flush=True,
        )
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=args.duration + 2 * CALL_TIMEOUT)
        ended = time.monotonic()
        hung = [c.name for c in clients if c.is_alive()]
        if hung:
            errors.append(f"client threads still running at the end: {hung}")

        try:
            healthy = stub.Health(pb.HealthMessage(), timeout=CALL_TIMEOUT).message == b"OK"
        except grpc.RpcError as error:
            healthy = False
            errors.append(f"Health after the soak: {error.code().name}")
        sampler.finish()
        peak_rss = status_field("VmHWM", server.pid) / 1024
        rss_end = status_field("VmRSS", server.pid) / 1024
        middle = started + (ended - started) / 2
        rss_middle = sampler.median_kb_between(middle - 1.5, middle + 1.5) / 1024
        rss_last = sampler.median_kb_between(ended - 3.0, ended) / 1024
        growth = rss_last - rss_middle
    finally:
        sampler.stop.set()
        server.channel.close()
        exit_code = server.stop(timeout=30)

    elapsed = ended - started
    served = sum(t.count for t in tallies.values())
    error_count = sum(t.errors for t in tallies.values()) + (0 if not hung else len(hung))
    if not healthy:
        error_count += 1
    per_op = {
        name: {
            "requests": t.count,
            "errors": t.errors,
            "p50_ms": round(percentile(t.latencies_ms, 50), 1),
            "p95_ms": round(percentile(t.latencies_ms, 95), 1),
        }
        for name, t in tallies.items()
    }
    failures = []
    if error_count:
        failures.append(f"{error_count} unexpected answers")
    if not growth <= args.max_growth_mb:
        failures.append(f"RSS grew {growth:.1f} MB over the second half (bound {args.max_growth_mb:.0f} MB)")
    if exit_code != 0:
        failures.append(f"backend exited with {exit_code} on SIGTERM")
    result = {
        "duration_s": round(elapsed, 1),
        "threads": args.threads,
        "requests": served,
        "requests_per_s": round(served / elapsed, 1),
        "errors": error_count,
        "error_samples": errors,
        "rss_start_mb": round(rss_start, 1),
        "rss_peak_mb": round(peak_rss, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_middle_mb": round(rss_middle, 1),
        "rss_last_mb": round(rss_last, 1),
        "rss_growth_second_half_mb": round(growth, 1),
        "max_growth_mb": args.max_growth_mb,
        "healthy_after": healthy,
        "exit_code_on_sigterm": exit_code,
        "per_operation": per_op,
        "rss_samples_mb": [(round(t - started, 2), round(kb / 1024, 1)) for t, kb in sampler.samples],
        "passed": not failures,
        "failures": failures,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"{'operation':<28}{'requests':>9}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}")
    for name, row in per_op.items():
        print(f"{name:<28}{row['requests']:>9}{row['errors']:>8}{row['p50_ms']:>9.1f}{row['p95_ms']:>9.1f}")
    print(f"served {served} requests in {elapsed:.1f} s ({served / elapsed:.1f}/s), {error_count} errors")
    print(
        f"server RSS: start {rss_start:.0f} MB, peak (VmHWM) {peak_rss:.0f} MB, end {rss_end:.0f} MB;"
        f" growth over the second half {growth:+.1f} MB (bound {args.max_growth_mb:.0f} MB)"
    )
    print(f"healthy after: {healthy}; exit code on SIGTERM: {exit_code}; results: {os.path.relpath(args.out, REPO)}")
    for line in errors:
        print("  error:", line)
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
