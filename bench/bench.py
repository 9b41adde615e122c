"""Speed of the gRPC backend, side by side with an in-process script: `make bench`.

    .venv/bin/python bench/bench.py [--sets buffalo_sc,default] [--blocks 10] [--per-block 6]
        [--clients 4] [--load-seconds 25] [--threads N] [--server-env KEY=VALUE] [--quick]

For each model set it starts `backend.py` as a subprocess, loads the set with LoadModel, and in
ONE run alternates blocks of FaceVerify calls over gRPC with blocks of an in-process script that
does the same work on the same image bytes with the same model files, so machine drift hits both
sides alike (the side that goes first alternates, and every block starts after a short untimed
pause):

* buffalo_sc: the script is insightface's own code: `insightface.model_zoo.get_model()` for the
  SCRFD detector (prepared on the CPU for 640x640) and the ArcFace recognizer, cv2.imdecode of
  the same bytes, `recognizer.get` (face_align.norm_crop) on the largest face.
* default set: insightface's model_zoo has no YuNet, so the script runs cv2.FaceDetectorYN (same
  file, score threshold, NMS and 640 px fit as the backend) and MobileFaceNet through an
  onnxruntime session with the model's own preprocessing (insightface norm_crop, ImageNet
  mean/std, flipped crop added).

The script runs twice over: with onnxruntime's defaults (all cores, spinning workers), which is
the reference of the targets, and with spinning off (faster on a small machine, where a
session's spinning workers take the cores from the next model's run), reported for comparison.

The phone-photo case: FaceVerify of two 12-MP JPEGs (obama_1/obama_2 enlarged to 4000x3000 at run
time, harness.images.phone_photo) alternating with the same pair shrunk to 640 px, its distance
against the same photos decoded at full resolution by the set's engine in this process, and
FaceAnalyze of t1.jpg's six faces made 12 MP.

Also measured over gRPC: the transport alone (the same payloads refused before decoding),
FaceVerify with and without liveness, FaceAnalyze on 1 and on 6 faces, Embedding, Detect,
FaceAnalyze of t1.jpg with liveness against a second server loaded with the same set but the
MiniFASNet pair as its only liveness engine (the gallery's configuration),
throughput with several concurrent clients (load windows alternating with in-process blocks)
and the server's peak RSS under that load, its RSS after LoadModel and Status' memory breakdown
after LoadModel and before and after the concurrent load, LoadModel of the default set; for the default set
FaceAnalyze also with only age and gender asked, so the rest of its heads (emotion) shows as the
difference per face; and in this process the cost of MobileFaceNet's flipped crop and of each
attribute head per face. Prints a table and PASS/FAIL per target, writes bench/results/bench.json,
exits 1 if a target fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import cv2
import grpc
import numpy as np
import onnxruntime as ort

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import backend_pb2  # noqa: E402
import backend_pb2_grpc  # noqa: E402
from antispoof import LIVENESS_OPTIONS, MINIFASNET_OPTIONS  # noqa: E402
from engines.alignment import align_face  # noqa: E402
from engines.onnx_direct import YUNET_SCORE_THRESHOLD  # noqa: E402
from engines.recognition import recognizer_profile  # noqa: E402
from face_service import DEFAULT_MODEL_OPTIONS, IDLE_RETURN_SECONDS  # noqa: E402
from harness.images import b64, phone_photo, read_bytes, shrunk_photo  # noqa: E402
from harness.paths import DATA, GROUP_PHOTO, IDENTITY_DIR, MODELS_DIR  # noqa: E402
from harness.procfs import RssSampler, reset_peak_rss, status_field  # noqa: E402
from harness.servers import BackendProcess, backend_command, open_channel  # noqa: E402

RESULTS = os.path.join(REPO, "bench", "results")
T = TypeVar("T")

# Targets of issue 6, tightened for the default set by issue 14.
TARGET_VERIFY_RATIO = {"buffalo_sc": 1.25, "default": 0.70}  # gRPC FaceVerify median / in-process script's
TARGET_CORES_WORTH = {"buffalo_sc": 1.4, "default": 2.0}  # concurrent throughput x in-process s per verify
# Issue 14: FaceVerify of two 12-MP JPEGs against the same pair at 640 px, and how far its distance
# may be from that of the same photos decoded at full resolution.
TARGET_PHONE_RATIO = 1.5
TARGET_PHONE_DISTANCE = 0.02
TARGET_LIVENESS_MS = 15.0  # liveness adds at most this per one-face image (issue 13)
TARGET_GROUP_LIVENESS_RATIO = 2.0  # FaceAnalyze of t1.jpg with liveness / the same with the pair only
TARGET_LOAD_S = 1.0  # LoadModel of the default set
# Issue 14: memory.
TARGET_RSS_MB = 200.0  # peak server RSS under the concurrent load, every set
TARGET_RSS_AFTER_LOAD_MB = 140.0  # server RSS after LoadModel of the default set

# Verification pairs: single-face photos of ../shared/data, of several sizes (0.2 to 2.1 MP).
VERIFY_PAIRS = (
    ("obama_1.jpg", "obama_2.jpg"),
    ("biden_1.jpg", "biden_2.jpg"),
    ("kit_harington_1.jpg", "kit_harington_2.jpg"),
    ("rose_leslie_1.jpg", "rose_leslie_2.jpg"),
    ("alex_lacamoire_1.jpg", "obama_4.jpg"),
)
ONE_FACE = "obama_1.jpg"
# The phone-photo case: this pair made 12 MP (harness.images.phone_photo) and shrunk to 640 px.
PHONE_PAIR = ("obama_1.jpg", "obama_2.jpg")


class ModelSet(NamedTuple):
    model: str  # ModelOptions.Model
    options: tuple[str, ...]  # ModelOptions.Options


SETS = {
    "buffalo_sc": ModelSet("buffalo_sc", ("engine:insightface", "model_pack:buffalo_sc")),
    "default": ModelSet("default", tuple(DEFAULT_MODEL_OPTIONS)),
}


# -- statistics -----------------------------------------------------------------------------
def stats_ms(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000.0
    return {
        "n": int(ms.size),
        "median_ms": round(float(np.median(ms)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }


def timed(call: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def decode(data: bytes) -> np.ndarray:
    """The BGR image cv2.imdecode makes of `data`, as the script side decodes the request bytes."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("cv2.imdecode could not decode the image")
    return image


# Untimed pause before every block: onnxruntime's default sessions (the script's) keep their
# workers spinning after a run, which slowed the first call of the next block by 25-30 ms.
SETTLE_SECONDS = 0.2


def alternate(
    sides: Mapping[str, Callable[[int], object]], blocks: int, per_block: int, count: int
) -> dict[str, list[float]]:
    """Blocks of `per_block` calls per side, interleaved, the side that goes first alternating.

    Call i of a side gets argument i % count (which pair / image), so both sides see the same
    sequence of inputs.
    """
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    position = {n: 0 for n in names}
    for block in range(blocks):
        order = names if block % 2 == 0 else names[::-1]
        for name in order:
            time.sleep(SETTLE_SECONDS)
            for _ in range(per_block):
                seconds, _ = timed(lambda: sides[name](position[name] % count))
                times[name].append(seconds)
                position[name] += 1
    return times


# -- the server -----------------------------------------------------------------------------
def start_server(log_path: str, env: dict[str, str], script: str) -> BackendProcess:
    """`script` (backend.py or a variant) as a subprocess; it stops within 1 s of SIGTERM unless
    FACE_SHUTDOWN_GRACE_SECONDS says otherwise."""
    grace = {"FACE_SHUTDOWN_GRACE_SECONDS": os.environ.get("FACE_SHUTDOWN_GRACE_SECONDS", "1")}
    return BackendProcess(command=backend_command(script=script), env={**grace, **env}, log_path=log_path)


def new_stub(server: BackendProcess) -> backend_pb2_grpc.BackendStub:
    """A stub on a channel (a connection) of its own."""
    return backend_pb2_grpc.BackendStub(open_channel(server.address))


def memory_breakdown_mb(server: BackendProcess) -> dict[str, float]:
    """Status' memory breakdown (face_service.FaceService.memory_usage) in MB."""
    breakdown = server.stub.Status(backend_pb2.HealthMessage(), timeout=60).memory.breakdown
    return {k: (v if k == "models_alive" else round(v / 2**20, 1)) for k, v in sorted(breakdown.items())}


def load_model(server: BackendProcess, model: str, options: Sequence[str], threads: int) -> float:
    """Seconds LoadModel took."""
    request = backend_pb2.ModelOptions(Model=model, ModelPath=MODELS_DIR, Options=list(options), Threads=threads)
    seconds, result = timed(lambda: server.stub.LoadModel(request, timeout=120))
    if not result.success:
        raise RuntimeError(f"LoadModel {model}: {result.message}")
    return seconds


# -- the in-process scripts -----------------------------------------------------------------
class _Face:
    """What insightface's recognizer.get() reads from a face: its 5 keypoints."""

    def __init__(self, kps: np.ndarray):
        self.kps = kps


def largest(boxes: np.ndarray) -> int:
    """Index of the largest box (x1, y1, x2, y2, score), ties to the higher score (the service's rule)."""
    keys = [((b[2] - b[0]) * (b[3] - b[1]), b[4]) for b in boxes]
    return max(range(len(keys)), key=lambda i: keys[i])


class InsightFaceScript:
    """buffalo_sc through insightface's model_zoo: what a user of the insightface package would run."""

    label = "insightface model_zoo (SCRFD + ArcFaceONNX)"

    def __init__(self, pack_dir: str, session_options: ort.SessionOptions | None = None):
        from insightface.model_zoo import get_model

        kwargs = {"sess_options": session_options} if session_options is not None else {}
        self.detector = get_model(os.path.join(pack_dir, "det_500m.onnx"), **kwargs)
        # FaceAnalysis.prepare(det_size=(640, 640)) hands the detector input_size=(640, 640); in
        # insightface 2.1 SCRFD.prepare ignores a `det_size` keyword and would then run every
        # image at both 128x128 and 640x640.
        self.detector.prepare(ctx_id=-1, input_size=(640, 640))
        self.recognizer = get_model(os.path.join(pack_dir, "w600k_mbf.onnx"), **kwargs)
        self.recognizer.prepare(ctx_id=-1)

    def embed(self, image: np.ndarray) -> np.ndarray:
        boxes, kpss = self.detector.detect(image, max_num=0)
        if len(boxes) == 0:
            raise RuntimeError("script: no face")
        embedding = self.recognizer.get(image, _Face(kpss[largest(boxes)]))
        return embedding / np.linalg.norm(embedding)


class YuNetMobileFaceNetScript:
    """The default set without the backend: cv2.FaceDetectorYN + MobileFaceNet on onnxruntime."""

    label = (
        "cv2.FaceDetectorYN + MobileFaceNet on onnxruntime (insightface's model_zoo has no YuNet);"
        " insightface norm_crop, ImageNet mean/std, flipped crop added"
    )

    def __init__(self, models_dir: str, session_options: ort.SessionOptions | None = None):
        from insightface.utils import face_align

        self.norm_crop = face_align.norm_crop
        self.yunet_path = os.path.join(models_dir, "face_detection_yunet_2023mar.onnx")
        self.detector = cv2.FaceDetectorYN.create(self.yunet_path, "", (640, 640), YUNET_SCORE_THRESHOLD, 0.3, 5000)
        self.session = ort.InferenceSession(
            os.path.join(models_dir, "MobileFaceNet.onnx"),
            sess_options=session_options,
            providers=["CPUExecutionProvider"],
        )
        self.input_name = self.session.get_inputs()[0].name
        profile = recognizer_profile("MobileFaceNet.onnx")
        self.mean = np.asarray(profile.mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(profile.std, np.float32).reshape(1, 3, 1, 1)

    def embed(self, image: np.ndarray) -> np.ndarray:
        # YuNet on the image fitted into 640x640 (never enlarged), as the backend runs it.
        scale = min(1.0, 640 / image.shape[1], 640 / image.shape[0])
        small = (
            image
            if scale == 1.0
            else cv2.resize(
                image,
                (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                interpolation=cv2.INTER_AREA,
            )
        )
        self.detector.setInputSize((small.shape[1], small.shape[0]))
        _, rows = self.detector.detect(small)
        if rows is None:
            raise RuntimeError("script: no face")
        # Largest box (areas compare the same at any scale), ties to the higher score.
        row = rows[largest(np.array([[r[0], r[1], r[0] + r[2], r[1] + r[3], r[14]] for r in rows]))]
        crop = self.norm_crop(image, landmark=row[4:14].reshape(5, 2) / scale)
        blob = (
            np.stack([crop, crop[:, ::-1]])[..., ::-1].astype(np.float32).transpose(0, 3, 1, 2) - self.mean
        ) / self.std
        raw = sum(self.session.run(None, {self.input_name: blob[i : i + 1]})[0][0] for i in range(2))
        return raw / np.linalg.norm(raw)


def no_spinning_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


# -- one model set --------------------------------------------------------------------------
@dataclass
class Inputs:
    pairs: list[tuple[bytes, bytes]]
    one_face: bytes
    group: bytes
    phone_pair: tuple[bytes, bytes]  # 12-MP JPEGs
    phone_pair_640: tuple[bytes, bytes]  # the same, 640 px
    phone_group: bytes  # t1.jpg, 12 MP

    @staticmethod
    def read() -> Inputs:
        images = os.path.join(IDENTITY_DIR, "images")
        pairs = [(read_bytes(os.path.join(images, a)), read_bytes(os.path.join(images, b))) for a, b in VERIFY_PAIRS]
        phone_a, phone_b = (phone_photo(decode(read_bytes(os.path.join(images, n)))) for n in PHONE_PAIR)
        group = read_bytes(GROUP_PHOTO)
        return Inputs(
            pairs=pairs,
            one_face=read_bytes(os.path.join(images, ONE_FACE)),
            group=group,
            phone_pair=(phone_a, phone_b),
            phone_pair_640=(shrunk_photo(phone_a), shrunk_photo(phone_b)),
            phone_group=phone_photo(decode(group)),
        )


def inputs_names() -> list[str]:
    return [f"{a} | {b}" for a, b in VERIFY_PAIRS]


@dataclass
class SetReport:
    name: str
    script_label: str
    timings: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)


def run_set(name: str, args, inputs: Inputs, server_env: dict[str, str]) -> SetReport:
    spec = SETS[name]
    os.makedirs(RESULTS, exist_ok=True)
    server = start_server(os.path.join(RESULTS, f"server-{name}.log"), server_env, args.backend)
    try:
        report = SetReport(name, "")
        # LoadModel: the first call (builds every session, pays lazy imports), then the median of
        # several more (which share the sessions of the unchanged files: engines.runtime).
        loads = [
            load_model(server, spec.model, spec.options, args.threads)
            for _ in range(1 + (args.load_repeats if name == "default" else 0))
        ]
        report.values["load_first_s"] = round(loads[0], 3)
        if len(loads) > 1:
            report.values["load_median_s"] = round(float(np.median(loads[1:])), 3)
            report.values["load_all_s"] = [round(x, 3) for x in loads]
        # After the last LoadModel, before any request: what the libraries and the model take
        # (after several loads for the default set: what a reload of the same files leaves behind
        # counts too; `make soak-reload` measures reloads that swap sets).
        report.values["rss_after_load_mb"] = round(status_field("VmRSS", server.pid) / 1024, 1)
        report.values["memory_after_load_mb"] = memory_breakdown_mb(server)

        # The script as issue 6 defines it (onnxruntime defaults: all cores, spinning workers), and
        # the same with spinning off.
        make = (
            (lambda o: InsightFaceScript(os.path.join(MODELS_DIR, "buffalo_sc"), o))
            if name == "buffalo_sc"
            else (lambda o: YuNetMobileFaceNetScript(MODELS_DIR, o))
        )
        scripts = {"script": make(None), "script_nospin": make(no_spinning_options())}
        report.script_label = scripts["script"].label
        stub = server.stub
        verify_requests = [backend_pb2.FaceVerifyRequest(img1=b64(a), img2=b64(b)) for a, b in inputs.pairs]
        live_requests = [
            backend_pb2.FaceVerifyRequest(img1=b64(a), img2=b64(b), anti_spoofing=True) for a, b in inputs.pairs
        ]

        def grpc_verify(i: int):
            return stub.FaceVerify(verify_requests[i], timeout=60)

        def grpc_verify_live(i: int):
            return stub.FaceVerify(live_requests[i], timeout=60)

        def script_verify(i: int, which: str = "script") -> float:
            a, b = inputs.pairs[i]
            e1 = scripts[which].embed(decode(a))
            e2 = scripts[which].embed(decode(b))
            return float(1.0 - np.dot(e1, e2))

        def script_nospin_verify(i: int) -> float:
            return script_verify(i, "script_nospin")

        # Same answers? (proves both sides do the same work) and warm-up of every path.
        count = len(inputs.pairs)
        agreement = []
        for i in range(count):
            server_distance = grpc_verify(i).distance
            script_distance = script_verify(i)
            agreement.append(abs(server_distance - script_distance))
        report.values["max_abs_distance_difference"] = round(max(agreement), 4)
        for _ in range(args.warmup):
            for i in range(count):
                grpc_verify(i)
                script_verify(i)
                script_nospin_verify(i)

        sides = {"grpc": grpc_verify, "script": script_verify, "script_nospin": script_nospin_verify}
        times = alternate(sides, args.blocks, args.per_block, count)
        report.timings["FaceVerify (gRPC)"] = stats_ms(times["grpc"])
        report.timings["FaceVerify (in-process script)"] = stats_ms(times["script"])
        report.timings["FaceVerify (in-process script, no spinning)"] = stats_ms(times["script_nospin"])
        grpc_ms = report.timings["FaceVerify (gRPC)"]["median_ms"]
        report.values["verify_ratio"] = round(
            grpc_ms / report.timings["FaceVerify (in-process script)"]["median_ms"], 3
        )
        report.values["verify_ratio_vs_no_spinning"] = round(
            grpc_ms / report.timings["FaceVerify (in-process script, no spinning)"]["median_ms"], 3
        )

        # What gRPC itself costs: the same payloads, refused (threshold < 0) before any decoding.
        transport_requests = [
            backend_pb2.FaceVerifyRequest(img1=r.img1, img2=r.img2, threshold=-1.0) for r in verify_requests
        ]

        def transport_only(i: int):
            try:
                stub.FaceVerify(transport_requests[i], timeout=60)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise

        report.timings["FaceVerify transport only (gRPC)"] = stats_ms(
            [timed(lambda: transport_only(i % count))[0] for i in range(args.per_block * 4)]
        )

        liveness = name == "default"
        if liveness:
            for i in range(count):
                grpc_verify_live(i)
            # Each pair without and then with liveness (or the other way round, alternating),
            # back to back: the median of those paired differences is the cost, and drift slower
            # than one call cancels out of it.
            live: dict[str, list[float]] = {"without": [], "with": []}
            differences = []
            for k in range(args.blocks * args.per_block):
                i = k % count
                order = (("without", grpc_verify), ("with", grpc_verify_live))
                seconds = {}
                for key, call in order if k % 2 == 0 else order[::-1]:
                    seconds[key] = timed(lambda: call(i))[0]
                    live[key].append(seconds[key])
                differences.append(seconds["with"] - seconds["without"])
            report.timings["FaceVerify, no liveness (gRPC)"] = stats_ms(live["without"])
            report.timings["FaceVerify, liveness (gRPC)"] = stats_ms(live["with"])
            report.values["liveness_ms_per_image"] = round(float(np.median(differences)) * 1000 / 2, 2)

        # The other RPCs, interleaved too.
        one, group = b64(inputs.one_face), b64(inputs.group)

        def analyze(request: backend_pb2.FaceAnalyzeRequest) -> Callable[[int], Any]:
            return lambda _: stub.FaceAnalyze(request, timeout=60)

        others: dict[str, Callable[[int], Any]] = {
            "FaceAnalyze, 1 face": analyze(backend_pb2.FaceAnalyzeRequest(img=one)),
            "FaceAnalyze, 6 faces (t1.jpg)": analyze(backend_pb2.FaceAnalyzeRequest(img=group)),
            "Embedding": lambda _: stub.Embedding(backend_pb2.PredictOptions(Images=[one]), timeout=60),
            "Detect (t1.jpg)": lambda _: stub.Detect(backend_pb2.DetectOptions(src=group), timeout=60),
        }
        # Only age and gender asked: what the default set's other heads cost is the difference.
        narrowed = {"FaceAnalyze, 1 face": (one, 1), "FaceAnalyze, 6 faces (t1.jpg)": (group, 6)}
        if liveness:
            others["FaceAnalyze, 6 faces, liveness"] = analyze(
                backend_pb2.FaceAnalyzeRequest(img=group, anti_spoofing=True)
            )
            for key, (img, _) in narrowed.items():
                others[key + ", age+gender"] = analyze(
                    backend_pb2.FaceAnalyzeRequest(img=img, actions=["age", "gender"])
                )
        group_faces = others["FaceAnalyze, 6 faces (t1.jpg)"](0).faces
        report.values["faces_in_group_photo"] = len(group_faces)
        report.values["analyze_computes_age_gender"] = bool(group_faces) and bool(group_faces[0].dominant_gender)
        report.values["analyze_computes_emotion"] = bool(group_faces) and bool(group_faces[0].dominant_emotion)
        report.values["detections_in_group_photo"] = len(others["Detect (t1.jpg)"](0).Detections)
        for warm_up in others.values():
            warm_up(0)
        other_times = alternate(others, max(2, args.blocks // 2), args.per_block, 1)
        for key, values in other_times.items():
            report.timings[key + " (gRPC)"] = stats_ms(values)
        for key, (_, faces) in narrowed.items():
            if key + ", age+gender" in other_times:
                extra_ms = (
                    report.timings[key + " (gRPC)"]["median_ms"]
                    - report.timings[key + ", age+gender (gRPC)"]["median_ms"]
                )
                report.values[f"heads_beyond_age_gender_ms_per_face ({faces} face{'s' * (faces > 1)})"] = round(
                    extra_ms / faces, 2
                )

        report.values.update(phone_photos(stub, spec, inputs, args, report.timings))

        # Concurrent clients: throughput and the server's peak RSS, load windows alternating with
        # blocks of the in-process script, whose median (single caller) is the per-verify cost.
        position = iter(range(10**9))

        def script_block() -> dict[str, list[float]]:
            times = {}
            for which in scripts:
                time.sleep(SETTLE_SECONDS)
                times[which] = [
                    timed(lambda: script_verify(next(position) % count, which))[0] for _ in range(args.per_block)
                ]
            return times

        report.values["memory_before_concurrent_load_mb"] = memory_breakdown_mb(server)
        report.values.update(
            concurrent_load(server, verify_requests, args.clients, args.load_seconds, args.load_windows, script_block)
        )
        report.values["memory_after_concurrent_load_mb"] = memory_breakdown_mb(server)
        report.timings[f"FaceVerify under {args.clients} clients (gRPC)"] = report.values.pop("latencies")
        between = report.values.pop("script_times")
        report.timings["FaceVerify (in-process, between load windows)"] = stats_ms(between["script"])
        report.timings["FaceVerify (in-process, no spinning, between)"] = stats_ms(between["script_nospin"])
        for key, label in (
            ("cores_worth", "FaceVerify (in-process, between load windows)"),
            ("cores_worth_vs_no_spinning", "FaceVerify (in-process, no spinning, between)"),
        ):
            report.values[key] = round(report.values["verify_per_s"] * report.timings[label]["median_ms"] / 1000, 3)
        report.values["server_threads"] = status_field("Threads", server.pid)

        if name == "default":
            report.values.update(liveness_against_the_pair(server, args, inputs, server_env))
            report.values.update(flip_cost(inputs, args.threads))
            report.values.update(head_costs(inputs, args.threads))
        return report
    finally:
        server.close()


def concurrent_load(
    server: BackendProcess,
    requests,
    clients: int,
    seconds: float,
    windows: int,
    script_block: Callable[[], dict[str, list[float]]],
) -> dict:
    """`clients` threads calling FaceVerify back to back, in `windows` windows of seconds/windows
    each, with a block of the in-process script between windows (so drift hits both alike).

    Throughput counts the requests finished in each window over the time until the last of them
    finished (the drain at the end of a window runs below full concurrency, so this is slightly
    conservative). Peak RSS: VmHWM reset before the first window, plus VmRSS polled every 50 ms.
    """
    stubs = [new_stub(server) for _ in range(clients)]
    # The load starts from the server at rest: what the phases before it grew (12-MP photos, six
    # faces with every head) is handed back once no request has run for IDLE_RETURN_SECONDS.
    time.sleep(IDLE_RETURN_SECONDS + SETTLE_SECONDS)
    reset = reset_peak_rss(server.pid)
    rss_base_kb = status_field("VmRSS", server.pid)
    sampler = RssSampler(server.pid, 0.05)
    sampler.start()
    latencies: list[float] = []
    script_times: dict[str, list[float]] = {}
    errors: list[str] = []
    lock = threading.Lock()
    completed, busy_seconds = 0, 0.0
    for window in range(windows):
        time.sleep(SETTLE_SECONDS)
        window_latencies: list[float] = []
        start = time.perf_counter()
        deadline = start + seconds / windows

        def client(k: int):
            i = k + window  # every client walks the pairs from a different place
            while time.perf_counter() < deadline:
                try:
                    elapsed, _ = timed(lambda: stubs[k].FaceVerify(requests[i % len(requests)], timeout=120))
                except grpc.RpcError as error:
                    with lock:
                        errors.append(f"{error.code().name}: {error.details()}")
                    continue
                with lock:
                    window_latencies.append(elapsed)
                i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy_seconds += time.perf_counter() - start
        completed += len(window_latencies)
        latencies += window_latencies
        for which, values in script_block().items():
            script_times.setdefault(which, []).extend(values)
    sampler.finish()
    hwm_kb = status_field("VmHWM", server.pid)
    peak_kb = max(hwm_kb if reset else 0, rss_base_kb, sampler.peak_kb())
    return {
        "clients": clients,
        "load_seconds": round(busy_seconds, 2),
        "verifies": completed,
        "errors": errors[:5],
        "error_count": len(errors),
        "verify_per_s": round(completed / busy_seconds, 3),
        "rss_before_load_mb": round(rss_base_kb / 1024, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_rss_source": "VmHWM reset before the load (clear_refs) and polled VmRSS"
        if reset
        else "polled VmRSS every 50 ms (VmHWM could not be reset)",
        "latencies": stats_ms(latencies) if latencies else {},
        "script_times": script_times,
    }


def pair_only(options: Sequence[str]) -> list[str]:
    """`options` with the MiniFASNet pair as the only liveness engine: the gallery's configuration
    and the default set's liveness before issue 13."""
    others = set(LIVENESS_OPTIONS) - set(MINIFASNET_OPTIONS)
    return [o for o in options if o.split(":", 1)[0] not in others]


def liveness_against_the_pair(
    server: BackendProcess, args, inputs: Inputs, server_env: dict[str, str]
) -> dict[str, Any]:
    """FaceAnalyze of t1.jpg (6 faces) with liveness on `server` (the default set) and on a second
    server loaded with the same set but the MiniFASNet pair only, in alternating blocks."""
    reference = start_server(os.path.join(RESULTS, "server-default-pair.log"), server_env, args.backend)
    try:
        load_model(reference, "default-pair", pair_only(SETS["default"].options), args.threads)
        request = backend_pb2.FaceAnalyzeRequest(img=b64(inputs.group), anti_spoofing=True)
        sides = {
            side: (lambda _, stub=target.stub: stub.FaceAnalyze(request, timeout=60))
            for side, target in (("default", server), ("pair", reference))
        }
        for call in sides.values():
            call(0)
        times = alternate(sides, max(2, args.blocks // 2), args.per_block, 1)
    finally:
        reference.close()
    default_ms, pair_ms = (float(np.median(times[side])) * 1000 for side in ("default", "pair"))
    return {
        "group_liveness_ms": round(default_ms, 2),
        "group_liveness_pair_only_ms": round(pair_ms, 2),
        "group_liveness_ratio_to_pair": round(default_ms / pair_ms, 3),
    }


def phone_photos(stub, spec: ModelSet, inputs: Inputs, args, timings: dict) -> dict:
    """FaceVerify of the 12-MP pair and of the same pair at 640 px, alternating over gRPC; its
    distance against the same photos decoded at full resolution by this set's engine in this
    process (the service's answer before reduced decoding); FaceAnalyze of the 12-MP group photo."""
    from engines import build_engine, parse_load_request
    from face_service import best_face
    from imaging import EncodedImage

    big = backend_pb2.FaceVerifyRequest(img1=b64(inputs.phone_pair[0]), img2=b64(inputs.phone_pair[1]))
    small = backend_pb2.FaceVerifyRequest(img1=b64(inputs.phone_pair_640[0]), img2=b64(inputs.phone_pair_640[1]))
    group = backend_pb2.FaceAnalyzeRequest(img=b64(inputs.phone_group))
    sides = {
        "FaceVerify, two 12-MP JPEGs": lambda _: stub.FaceVerify(big, timeout=60),
        "FaceVerify, the same pair at 640 px": lambda _: stub.FaceVerify(small, timeout=60),
        "FaceAnalyze, 6 faces, 12-MP JPEG": lambda _: stub.FaceAnalyze(group, timeout=60),
    }
    for call in sides.values():
        call(0)
    times = alternate(sides, args.blocks, args.per_block, 1)
    for key, values in times.items():
        timings[key + " (gRPC)"] = stats_ms(values)
    big_ms = timings["FaceVerify, two 12-MP JPEGs (gRPC)"]["median_ms"]
    small_ms = timings["FaceVerify, the same pair at 640 px (gRPC)"]["median_ms"]

    engine = build_engine(parse_load_request(spec.model, MODELS_DIR, args.threads, list(spec.options)))
    try:
        embeddings = []
        for raw in inputs.phone_pair:
            image = EncodedImage.from_bytes(raw, "img").decode(1)
            embeddings.append(engine.embed(image, best_face(engine.detect(image))))
    finally:
        engine.close()
    full_distance = float(1.0 - embeddings[0] @ embeddings[1])
    served = stub.FaceVerify(big, timeout=60).distance
    return {
        "phone_verify_ratio": round(big_ms / small_ms, 3),
        "phone_distance": round(served, 4),
        "phone_distance_full_decode": round(full_distance, 4),
        "phone_distance_change": round(abs(served - full_distance), 4),
        "phone_group_faces": len(sides["FaceAnalyze, 6 faces, 12-MP JPEG"](0).faces),
    }


def flip_cost(inputs: Inputs, threads: int) -> dict:
    """What MobileFaceNet's flipped crop costs a lone request: the backend's recognizer built as
    the server builds it for `threads` (with no grant, the flipped crop's Run beside the crop's),
    with and without the flip, in this process."""
    from dataclasses import replace

    from engines import parse_load_request
    from engines.detection import YuNetDetector
    from engines.onnx_direct import build_recognizer
    from engines.recognition import ArcFaceRecognizer

    image = decode(inputs.one_face)
    face = max(
        YuNetDetector(
            os.path.join(MODELS_DIR, "face_detection_yunet_2023mar.onnx"), score_threshold=YUNET_SCORE_THRESHOLD
        ).detect(image),
        key=lambda f: f.area,
    )
    request = parse_load_request("flip-cost", MODELS_DIR, threads, [])
    with_flip = build_recognizer(os.path.join(MODELS_DIR, "MobileFaceNet.onnx"), request)
    without = ArcFaceRecognizer(with_flip.session, replace(with_flip.profile, flip=False))
    align = lambda: align_face(image, face.landmarks)  # noqa: E731
    result = {
        "flip_session_threads": with_flip.session.get_session_options().intra_op_num_threads,
        "flip_beside_crop": with_flip.runs_flip_beside,
    }
    try:
        for key, call in (
            ("embed_with_flip_ms", lambda: with_flip.embed(image, face)),
            ("embed_without_flip_ms", lambda: without.embed(image, face)),
            ("align_ms", align),
        ):
            for _ in range(5):
                call()
            result[key] = round(float(np.median([timed(call)[0] for _ in range(40)])) * 1000, 2)
    finally:
        with_flip.close()
    result["flip_cost_ms_per_image"] = round(result["embed_with_flip_ms"] - result["embed_without_flip_ms"], 2)
    return result


def head_costs(inputs: Inputs, threads: int) -> dict:
    """ms per face of each attribute head of the default set (chip and run), in this process with
    the threads the server's sessions get, on the one-face photo and on t1.jpg's faces."""
    from engines import parse_load_request
    from engines.attributes import build_attribute_heads
    from engines.base import HOST_ACTIONS
    from engines.detection import YuNetDetector

    detector = YuNetDetector(
        os.path.join(MODELS_DIR, "face_detection_yunet_2023mar.onnx"), score_threshold=YUNET_SCORE_THRESHOLD
    )
    heads = build_attribute_heads(parse_load_request("default", MODELS_DIR, threads, list(DEFAULT_MODEL_OPTIONS)))
    actions = frozenset(HOST_ACTIONS)
    result = {}
    for label, data in (("1 face", inputs.one_face), ("6 faces", inputs.group)):
        image = decode(data)
        faces = detector.detect(image)
        for head in heads:
            call = lambda: head.predict(image, faces, actions)  # noqa: E731
            for _ in range(3):
                call()
            seconds = float(np.median([timed(call)[0] for _ in range(20)]))
            key = f"{'+'.join(sorted(head.actions))}_head_ms_per_face ({label})"
            result[key] = round(seconds * 1000 / len(faces), 2)
    return result


# -- report ---------------------------------------------------------------------------------
def targets(reports: dict[str, SetReport]) -> list[dict]:
    rows = []

    def add(name, set_name, value, limit, passed, unit):
        rows.append(
            {"target": name, "set": set_name, "value": value, "limit": limit, "unit": unit, "pass": bool(passed)}
        )

    for name, r in reports.items():
        v = r.values
        add(
            "FaceVerify gRPC median / in-process median",
            name,
            v["verify_ratio"],
            f"<= {TARGET_VERIFY_RATIO[name]}",
            v["verify_ratio"] <= TARGET_VERIFY_RATIO[name],
            "x",
        )
        add(
            f"throughput with {v['clients']} clients x in-process s/verify",
            name,
            v["cores_worth"],
            f">= {TARGET_CORES_WORTH[name]}",
            v["cores_worth"] >= TARGET_CORES_WORTH[name] and v["error_count"] == 0,
            "cores",
        )
        add(
            "FaceVerify two 12-MP JPEGs / same pair at 640 px",
            name,
            v["phone_verify_ratio"],
            f"<= {TARGET_PHONE_RATIO}",
            v["phone_verify_ratio"] <= TARGET_PHONE_RATIO,
            "x",
        )
        add(
            "12-MP distance - full-resolution decode's",
            name,
            v["phone_distance_change"],
            f"<= {TARGET_PHONE_DISTANCE}",
            v["phone_distance_change"] <= TARGET_PHONE_DISTANCE,
            "",
        )
        add(
            f"peak server RSS under {v['clients']} clients",
            name,
            v["peak_rss_mb"],
            f"<= {TARGET_RSS_MB:.0f}",
            v["peak_rss_mb"] <= TARGET_RSS_MB,
            "MB",
        )
        if name == "default":
            add(
                "server RSS after LoadModel of the default set",
                name,
                v["rss_after_load_mb"],
                f"<= {TARGET_RSS_AFTER_LOAD_MB:.0f}",
                v["rss_after_load_mb"] <= TARGET_RSS_AFTER_LOAD_MB,
                "MB",
            )
            add(
                "LoadModel of the default set (the first: every session built)",
                name,
                v["load_first_s"],
                f"< {TARGET_LOAD_S:.0f}",
                v["load_first_s"] < TARGET_LOAD_S,
                "s",
            )
        if "liveness_ms_per_image" in v:
            add(
                "liveness added per image",
                name,
                v["liveness_ms_per_image"],
                f"<= {TARGET_LIVENESS_MS:.0f}",
                v["liveness_ms_per_image"] <= TARGET_LIVENESS_MS,
                "ms",
            )
        if "group_liveness_ratio_to_pair" in v:
            add(
                "FaceAnalyze t1.jpg + liveness / same with the pair only",
                name,
                v["group_liveness_ratio_to_pair"],
                f"<= {TARGET_GROUP_LIVENESS_RATIO:g}",
                v["group_liveness_ratio_to_pair"] <= TARGET_GROUP_LIVENESS_RATIO,
                "x",
            )
    return rows


def print_report(reports: dict[str, SetReport], rows: list[dict], meta: dict) -> None:
    print(
        f"\nmachine: {meta['cpu_count']} CPUs, load average before {meta['load_before']}, after "
        f"{meta['load_after']}; onnxruntime {meta['onnxruntime']}, OpenCV {meta['opencv']}, "
        f"insightface {meta['insightface']}"
    )
    print(f"server: {meta['server_settings']}")
    for name, r in reports.items():
        print(f"\n== {name} ==  (script side: {r.script_label})")
        print(f"  {'measurement':48s} {'median ms':>10s} {'p90 ms':>10s} {'n':>5s}")
        for key, s in r.timings.items():
            if s:
                print(f"  {key:48s} {s['median_ms']:10.1f} {s['p90_ms']:10.1f} {s['n']:5d}")
        for key, value in r.values.items():
            print(f"  {key:48s} {value}")
    print("\ntargets:")
    for row in rows:
        print(
            f"  {'PASS' if row['pass'] else 'FAIL'}  {row['set']:10s} {row['target']:52s} "
            f"{row['value']} {row['unit']} ({row['limit']})"
        )


def check_headless_opencv() -> str:
    """Only opencv-python-headless may provide cv2 (insightface's metadata asks for the GUI build)."""
    from importlib import metadata

    for dist in ("opencv-python", "opencv-contrib-python"):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        raise SystemExit(
            f"{dist} is installed next to opencv-python-headless; uninstall it"
            " (insightface must be installed with --no-deps)"
        )
    return cv2.__file__


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="buffalo_sc,default", help="comma-separated: buffalo_sc, default")
    parser.add_argument("--blocks", type=int, default=10, help="alternating blocks per side")
    parser.add_argument("--per-block", type=int, default=6, help="requests per block")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds over all pairs per side")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for the throughput run")
    parser.add_argument("--load-seconds", type=float, default=25.0, help="length of the throughput run")
    parser.add_argument(
        "--load-windows",
        type=int,
        default=5,
        help="the throughput run is cut into this many windows, with in-process blocks between",
    )
    parser.add_argument("--load-repeats", type=int, default=5, help="LoadModel calls of the default set timed")
    parser.add_argument(
        "--threads", type=int, default=0, help="ModelOptions.Threads sent with LoadModel (0: the backend's default)"
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the backend process (repeatable)",
    )
    parser.add_argument(
        "--backend",
        default=os.path.join(REPO, "backend.py"),
        help="server script to start (a variant of backend.py to compare)",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (numbers are not meaningful)")
    parser.add_argument("--json", default=os.path.join(RESULTS, "bench.json"))
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.per_block, args.load_seconds, args.load_windows, args.load_repeats = 2, 2, 4.0, 2, 2
    warnings.filterwarnings("ignore")  # insightface's skimage call warns on every crop

    cv2_path = check_headless_opencv()
    import insightface

    server_env = dict(item.split("=", 1) for item in args.server_env)
    meta = {
        "cpu_count": os.cpu_count(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "opencv": cv2.__version__,
        "opencv_module": cv2_path,
        "insightface": insightface.__version__,
        "server_settings": {
            "script": os.path.relpath(args.backend, REPO),
            "ModelOptions.Threads": args.threads,
            "env": server_env,
        },
        "data": DATA,
        "verify_pairs": inputs_names(),
        "grpc_workers": server_env.get("PYTHON_GRPC_MAX_WORKERS")
        or os.environ.get("PYTHON_GRPC_MAX_WORKERS")
        or "backend default",
    }
    inputs = Inputs.read()
    reports = {}
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        if name not in SETS:
            raise SystemExit(f"unknown set {name}; known: {', '.join(SETS)}")
        print(f"[bench] {name} ...", flush=True)
        reports[name] = run_set(name, args, inputs, server_env)
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    rows = targets(reports)
    print_report(reports, rows, meta)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "meta": meta,
                "args": vars(args),
                "sets": {
                    n: {"script": r.script_label, "timings": r.timings, "values": r.values} for n, r in reports.items()
                },
                "targets": rows,
            },
            f,
            indent=2,
        )
    print(f"\nwrote {os.path.relpath(args.json, REPO)}")
    failed = [r for r in rows if not r["pass"]]
    if failed:
        print(f"{len(failed)} target(s) FAILED")
        return 1
    print("all targets PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
