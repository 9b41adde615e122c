"""Soak: the real backend process under mixed traffic from 8 client threads for 30 s.

    .venv/bin/python bench/soak.py [--duration 30] [--threads 8] [--max-growth-mb 48] [--models models]
    .venv/bin/python bench/soak.py --reload-churn [--duration 300] [--threads 6] [--reload-every 2]

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

--reload-churn (`make soak-reload`) is a host that reloads models while serving (issue 14): 6
clients send FaceVerify and FaceAnalyze with anti_spoofing, Embedding and Detect for 300 s while
LoadModel swaps the default set and buffalo_sc (with the default set's MiniFASNet pair, so every
request has its liveness models) every 2 s. It fails on any unexpected answer or failed LoadModel,
a peak RSS (VmHWM, start-up included) above --max-peak-mb (400), or an RSS at the end (the default
set loaded once more after the clients stopped) more than --max-end-excess-mb (30) above the RSS
after the first LoadModel plus one model's size (the larger set's files, from Status): whatever a
reload leaves behind would add up past that over ~150 reloads. Writes
bench/results/soak-reload.json, with the RSS after every LoadModel and Status' memory breakdown
after the first and the last.
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
from dataclasses import dataclass, field, replace

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import backend_pb2 as pb  # noqa: E402
import backend_pb2_grpc  # noqa: E402
from antispoof import MINIFASNET_OPTIONS  # noqa: E402
from evaluation import read_labels  # noqa: E402
from face_service import DEFAULT_MODEL_OPTIONS  # noqa: E402
from harness.images import b64, b64_file, b64_image, faceless_image, png_pixel_bomb  # noqa: E402
from harness.paths import IDENTITY_DIR, MODELS_DIR  # noqa: E402
from harness.procfs import RssSampler, status_field  # noqa: E402
from harness.servers import BackendProcess  # noqa: E402

RESULTS = os.path.join(REPO, "bench", "results", "soak.json")
RELOAD_RESULTS = os.path.join(REPO, "bench", "results", "soak-reload.json")
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

    def analyze_live(stub, rng):
        # Attributes are not checked: buffalo_sc, one of the churn's two sets, has no heads.
        request = pb.FaceAnalyzeRequest(img=rng.choice(photos)[0], anti_spoofing=True)
        faces = stub.FaceAnalyze(request, timeout=CALL_TIMEOUT).faces
        if len(faces) < 1 or not all(f.HasField("is_real") for f in faces):
            return OK, f"{len(faces)} faces, liveness missing"
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
        Operation("FaceAnalyze+anti_spoofing", 0.0, analyze_live),  # the reload churn's
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


@dataclass
class Traffic:
    """What the client threads saw: per-operation tallies, the first errors, when it ran."""

    tallies: dict[str, Tally]
    errors: list[str]
    started: float
    ended: float
    hung: list[str]

    @property
    def served(self) -> int:
        return sum(t.count for t in self.tallies.values())

    @property
    def error_count(self) -> int:
        return sum(t.errors for t in self.tallies.values()) + len(self.hung)

    def per_operation(self) -> dict[str, dict]:
        return {
            name: {
                "requests": t.count,
                "errors": t.errors,
                "p50_ms": round(percentile(t.latencies_ms, 50), 1),
                "p95_ms": round(percentile(t.latencies_ms, 95), 1),
            }
            for name, t in self.tallies.items()
        }

    def print_table(self) -> None:
        print(f"{'operation':<28}{'requests':>9}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}")
        for name, row in self.per_operation().items():
            print(f"{name:<28}{row['requests']:>9}{row['errors']:>8}{row['p50_ms']:>9.1f}{row['p95_ms']:>9.1f}")


def run_traffic(stub, ops: list[Operation], threads: int, duration: float, max_requests: int) -> Traffic:
    """`threads` clients sending the weighted mix `ops` for `duration` seconds; returns once all
    have stopped (or a call timeout after the end)."""
    tallies = {op.name: Tally() for op in ops}
    errors: list[str] = []
    lock = threading.Lock()
    started = time.monotonic()
    stop_at = started + duration
    clients = [Client(i, stub, ops, stop_at, max_requests, tallies, errors, lock) for i in range(threads)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=duration + 2 * CALL_TIMEOUT)
    hung = [c.name for c in clients if c.is_alive()]
    if hung:
        errors.append(f"client threads still running at the end: {hung}")
    return Traffic(tallies, errors, started, time.monotonic(), hung)


# -- reload churn ----------------------------------------------------------------------------------
CHURN_OPERATIONS = ("FaceVerify+anti_spoofing", "FaceAnalyze+anti_spoofing", "Embedding", "Detect")


def churn_sets(models: str) -> dict[str, pb.ModelOptions]:
    """The two sets the churn swaps: the default set, and buffalo_sc with the default set's
    MiniFASNet pair so that requests asking for liveness are answered under both."""
    liveness = [o for o in DEFAULT_MODEL_OPTIONS if o.split(":", 1)[0] in MINIFASNET_OPTIONS]
    return {
        "default": pb.ModelOptions(Model="default", ModelPath=models, Options=list(DEFAULT_MODEL_OPTIONS)),
        "buffalo_sc": pb.ModelOptions(
            Model="buffalo_sc", ModelPath=models, Options=["engine:insightface", "model_pack:buffalo_sc", *liveness]
        ),
    }


class Reloader(threading.Thread):
    """LoadModel of the other set every `every` seconds until stopped; the RSS after each."""

    def __init__(self, stub, pid: int, sets: dict[str, pb.ModelOptions], every: float, first: str):
        super().__init__(name="reloader", daemon=True)
        self.stub, self.pid, self.sets, self.every = stub, pid, sets, every
        self.current = first
        self.loads: list[dict] = []  # one per LoadModel: time, set, seconds, RSS after
        self.errors: list[str] = []
        self.stop = threading.Event()

    def load(self, name: str, started: float) -> None:
        begin = time.perf_counter()
        try:
            result = self.stub.LoadModel(self.sets[name], timeout=CALL_TIMEOUT)
            if not result.success:
                self.errors.append(f"LoadModel {name}: {result.message}")
        except grpc.RpcError as error:
            self.errors.append(f"LoadModel {name}: {error.code().name} {error.details()}")
        self.loads.append(
            {
                "t_s": round(time.monotonic() - started, 2),
                "set": name,
                "seconds": round(time.perf_counter() - begin, 3),
                "rss_mb": round(status_field("VmRSS", self.pid) / 1024, 1),
            }
        )
        self.current = name

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop.wait(self.every):
            self.load(next(n for n in self.sets if n != self.current), started)


def status_memory_mb(stub) -> dict[str, float]:
    """Status' memory breakdown in MB (models_alive, a count, as it is)."""
    breakdown = stub.Status(pb.HealthMessage(), timeout=CALL_TIMEOUT).memory.breakdown
    return {k: (v if k == "models_alive" else round(v / 2**20, 1)) for k, v in sorted(breakdown.items())}


def reload_churn(args) -> int:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    photos = labelled_photos()
    ops = [replace(op, weight=1.0) for op in operations(photos) if op.name in CHURN_OPERATIONS]
    sets = churn_sets(args.models)
    log_path = os.path.join(os.path.dirname(args.out), "soak-reload-backend.log")
    try:
        server = BackendProcess(log_path=log_path)
    except RuntimeError as error:
        raise SystemExit(str(error)) from None
    sampler = RssSampler(server.pid, 0.25)
    problems: list[str] = []
    try:
        stub = server.stub
        # One model's size: the larger set's files, as Status counts them.
        model_mb = 0.0
        for name in ("buffalo_sc", "default"):
            result = stub.LoadModel(sets[name], timeout=CALL_TIMEOUT)
            if not result.success:
                raise SystemExit(f"LoadModel {name}: {result.message}")
            model_mb = max(model_mb, status_memory_mb(stub)["model_files"])
        rss_first_load = status_field("VmRSS", server.pid) / 1024
        memory_first_load = status_memory_mb(stub)
        sampler.start()
        reloader = Reloader(stub, server.pid, sets, args.reload_every, "default")
        print(
            f"soak --reload-churn: {args.threads} clients for {args.duration:.0f} s, LoadModel every"
            f" {args.reload_every:g} s, against backend pid {server.pid} on {server.address}",
            flush=True,
        )
        reloader.start()
        traffic = run_traffic(stub, ops, args.threads, args.duration, args.max_requests)
        reloader.stop.set()
        reloader.join(timeout=2 * CALL_TIMEOUT)
        # Like with like: the default set again, with nothing in flight.
        reloader.load("default", traffic.started)
        time.sleep(1.0)
        sampler.finish()
        rss_end = status_field("VmRSS", server.pid) / 1024
        peak_rss = status_field("VmHWM", server.pid) / 1024
        memory_end = status_memory_mb(stub)
    finally:
        sampler.stop.set()
        server.channel.close()
        exit_code = server.stop(timeout=30)

    elapsed = traffic.ended - traffic.started
    error_count = traffic.error_count + len(reloader.errors)
    allowed_end = rss_first_load + model_mb + args.max_end_excess_mb
    default_loads = [x["rss_mb"] for x in reloader.loads if x["set"] == "default"]
    # RSS after each default-set load against the reload's number: a leak shows as a slope.
    slope = float(np.polyfit(range(len(default_loads)), default_loads, 1)[0]) if len(default_loads) > 2 else 0.0
    if error_count:
        problems.append(f"{error_count} unexpected answers or failed LoadModel calls")
    if not peak_rss <= args.max_peak_mb:
        problems.append(f"peak RSS {peak_rss:.0f} MB above {args.max_peak_mb:.0f} MB")
    if not rss_end <= allowed_end:
        problems.append(
            f"RSS at the end {rss_end:.0f} MB above {allowed_end:.0f} MB (after the first LoadModel"
            f" {rss_first_load:.0f} + one model {model_mb:.0f} + {args.max_end_excess_mb:.0f})"
        )
    if exit_code != 0:
        problems.append(f"backend exited with {exit_code} on SIGTERM")
    result = {
        "duration_s": round(elapsed, 1),
        "threads": args.threads,
        "reload_every_s": args.reload_every,
        "reloads": len(reloader.loads),
        "requests": traffic.served,
        "requests_per_s": round(traffic.served / elapsed, 1),
        "errors": error_count,
        "error_samples": (traffic.errors + reloader.errors)[:20],
        "rss_after_first_load_mb": round(rss_first_load, 1),
        "model_files_mb": model_mb,
        "rss_end_mb": round(rss_end, 1),
        "rss_end_allowed_mb": round(allowed_end, 1),
        "rss_peak_mb": round(peak_rss, 1),
        "max_peak_mb": args.max_peak_mb,
        "rss_after_default_load_slope_mb_per_reload": round(slope / 2, 2),
        "memory_after_first_load_mb": memory_first_load,
        "memory_end_mb": memory_end,
        "per_operation": traffic.per_operation(),
        "loads": reloader.loads,
        "rss_samples_mb": [(round(t - traffic.started, 2), round(kb / 1024, 1)) for t, kb in sampler.samples],
        "exit_code_on_sigterm": exit_code,
        "passed": not problems,
        "failures": problems,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    traffic.print_table()
    load_seconds = [x["seconds"] for x in reloader.loads]
    print(
        f"served {traffic.served} requests in {elapsed:.1f} s ({traffic.served / elapsed:.1f}/s) across"
        f" {len(reloader.loads)} LoadModel calls (median {np.median(load_seconds):.2f} s); {error_count} errors"
    )
    print(
        f"server RSS: after the first LoadModel {rss_first_load:.0f} MB, peak (VmHWM) {peak_rss:.0f} MB"
        f" (bound {args.max_peak_mb:.0f}), at the end {rss_end:.0f} MB (bound {allowed_end:.0f}: first"
        f" + {model_mb:.0f} MB of model files + {args.max_end_excess_mb:.0f}); after each default-set"
        f" load {slope / 2:+.2f} MB per reload"
    )
    print(f"Status memory after the first LoadModel: {memory_first_load}")
    print(f"Status memory at the end:                {memory_end}")
    print(f"exit code on SIGTERM: {exit_code}; results: {os.path.relpath(args.out, REPO)}")
    for line in result["error_samples"]:
        print("  error:", line)
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 0 if not problems else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, help="seconds of traffic (default 30; 300 with --reload-churn)")
    parser.add_argument("--threads", type=int, help="client threads (default 8; 6 with --reload-churn)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="per thread, bounds the loop")
    parser.add_argument(
        "--max-growth-mb", type=float, default=48.0, help="allowed RSS growth over the second half (default 48 MB)"
    )
    parser.add_argument("--models", default=MODELS_DIR, help="models directory (default models/)")
    parser.add_argument(
        "--out", help="JSON results (default bench/results/soak.json, soak-reload.json with --reload-churn)"
    )
    parser.add_argument(
        "--reload-churn", action="store_true", help="swap the default set and buffalo_sc with LoadModel while serving"
    )
    parser.add_argument("--reload-every", type=float, default=2.0, help="seconds between LoadModel calls (default 2)")
    parser.add_argument("--max-peak-mb", type=float, default=400.0, help="reload churn: peak RSS bound (default 400)")
    parser.add_argument(
        "--max-end-excess-mb",
        type=float,
        default=30.0,
        help="reload churn: RSS at the end above first LoadModel + one model's size (default 30)",
    )
    args = parser.parse_args(argv)
    churn = args.reload_churn
    args.duration = args.duration if args.duration is not None else (300.0 if churn else 30.0)
    args.threads = args.threads if args.threads is not None else (6 if churn else 8)
    args.out = args.out or (RELOAD_RESULTS if churn else RESULTS)
    if churn:
        return reload_churn(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    photos = labelled_photos()
    ops = [op for op in operations(photos) if op.weight > 0]
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

        print(
            f"soak: {args.threads} clients for {args.duration:.0f} s against backend pid {server.pid}"
            f" on {server.address}",
            flush=True,
        )
        traffic = run_traffic(stub, ops, args.threads, args.duration, args.max_requests)
        started, ended, errors = traffic.started, traffic.ended, traffic.errors

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
    served = traffic.served
    error_count = traffic.error_count
    if not healthy:
        error_count += 1
    per_op = traffic.per_operation()
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

    traffic.print_table()
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
