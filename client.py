#!/usr/bin/env python3
"""Operator client for the face backend: one command per RPC, plus labelled-set evaluations.

    python client.py [--addr HOST:PORT] [--token T] COMMAND ...

Commands: load, status, verify, analyze, detect, embed, evaluate, evaluate-liveness.
Results are JSON on stdout. Failures are one line on stderr, `error: ...`, and the exit code says
which kind: 2 usage, missing file or bad labels CSV; 3 server unreachable (or went away);
4 the server refused the call (a gRPC status, or LoadModel answering success=false).
The bearer token is --token, else the environment variable LOCALAI_GRPC_AUTH_TOKEN (the one the
server reads), sent as `authorization: Bearer <token>`.
"""
from __future__ import annotations

import argparse
import base64
import csv
import json
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict

import backend_pb2
import backend_pb2_grpc
import catalog

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ADDR = "127.0.0.1:50051"
TOKEN_ENV = "LOCALAI_GRPC_AUTH_TOKEN"
DEFAULT_MODEL_NAME = "default"  # what `backend.py --preload-default` loads the default set as

EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4

# A cosine distance is at most 2; a threshold this high accepts every pair.
MAX_DISTANCE = 2.0


class ClientError(Exception):
    """A failure reported as one stderr line and an exit code."""

    def __init__(self, code: int, message: str, status: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.code = code
        self.status = status  # the gRPC status, when the server answered with one


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- talking to the server --------------------------------------------------------------------

class Connection:
    """A channel that is known to be connected, and calls that turn failures into ClientError."""

    def __init__(self, addr: str, token: str, timeout: float, connect_timeout: float, identity: str = ""):
        self.addr = addr
        self.timeout = timeout
        self.identity = identity
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = grpc.insecure_channel(addr, options=[
            ("grpc.max_send_message_length", 50 * 1024 * 1024),
            ("grpc.max_receive_message_length", 50 * 1024 * 1024)])
        self._wait_connected(connect_timeout)
        self.stub = backend_pb2_grpc.BackendStub(self.channel)

    def _wait_connected(self, timeout: float) -> None:
        """READY within `timeout`, or a ClientError at once when every address refused."""
        settled = threading.Event()
        last: list[grpc.ChannelConnectivity] = []

        def watch(state: grpc.ChannelConnectivity) -> None:
            last.append(state)
            if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                         grpc.ChannelConnectivity.SHUTDOWN):
                settled.set()

        self.channel.subscribe(watch, try_to_connect=True)
        try:
            settled.wait(timeout)
        finally:
            self.channel.unsubscribe(watch)
        state = last[-1] if last else None
        if state == grpc.ChannelConnectivity.READY:
            return
        self.channel.close()
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            raise ClientError(EXIT_UNREACHABLE, f"cannot reach the server at {self.addr}: connection failed")
        raise ClientError(EXIT_UNREACHABLE,
                          f"cannot reach the server at {self.addr}: no connection within {timeout:g} s")

    def call(self, name: str, request):
        try:
            return getattr(self.stub, name)(request, timeout=self.timeout, metadata=self.metadata,
                                            wait_for_ready=False)
        except grpc.RpcError as error:
            raise rpc_error(name, error) from None

    def close(self) -> None:
        self.channel.close()


def rpc_error(name: str, error: grpc.RpcError) -> ClientError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    exit_code = EXIT_UNREACHABLE if code == grpc.StatusCode.UNAVAILABLE else EXIT_REFUSED
    return ClientError(exit_code, f"{name}: {code.name}: {one_line(details or '')}", code)


def message_dict(message) -> dict:
    """The message as JSON: proto field names, every plain field (false and 0 included), and the
    `optional` fields only when set, so 'liveness not checked' stays distinguishable."""
    return in_field_order(message, MessageToDict(message, preserving_proto_field_name=True,
                                                 always_print_fields_with_no_presence=True))


def in_field_order(message, value: dict) -> dict:
    """`value` with its keys in the .proto's field order (MessageToDict puts defaults last)."""
    ordered = {}
    for field in message.DESCRIPTOR.fields:
        if field.name not in value:
            continue
        item = value[field.name]
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if field.is_repeated:
                item = [in_field_order(m, v) for m, v in zip(getattr(message, field.name), item)]
            else:
                item = in_field_order(getattr(message, field.name), item)
        ordered[field.name] = item
    return ordered


def print_json(value) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()


def read_image_b64(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return base64.b64encode(f.read()).decode("ascii")
    except FileNotFoundError:
        raise ClientError(EXIT_USAGE, f"no such file: {path}") from None
    except OSError as error:
        raise ClientError(EXIT_USAGE, f"cannot read {path}: {error.strerror or error}") from None


def connect(args) -> Connection:
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    return Connection(args.addr, token, args.timeout, args.connect_timeout, args.identity)


# -- one command per RPC ----------------------------------------------------------------------

def load_request(args) -> backend_pb2.ModelOptions:
    options: list[str] = []
    if args.default:
        options.extend(catalog.default().load_options("default"))
    for option in args.option or ():
        if ":" not in option:
            raise ClientError(EXIT_USAGE, f"-o needs key:value, got '{option}'")
        options.append(option)
    if not options and not args.model:
        raise ClientError(EXIT_USAGE, "load needs --default, -o key:value or --model NAME")
    model = args.model or (DEFAULT_MODEL_NAME if args.default else "")
    return backend_pb2.ModelOptions(Model=model, ModelPath=os.path.abspath(args.model_path),
                                    Threads=args.threads, Options=options)


def cmd_load(args) -> int:
    request = load_request(args)
    result = connect(args).call("LoadModel", request)
    print_json(message_dict(result))
    if not result.success:
        raise ClientError(EXIT_REFUSED, f"LoadModel: {one_line(result.message)}")
    return 0


def cmd_status(args) -> int:
    print_json(message_dict(connect(args).call("Status", backend_pb2.HealthMessage())))
    return 0


def cmd_verify(args) -> int:
    img1, img2 = read_image_b64(args.img1), read_image_b64(args.img2)
    request = backend_pb2.FaceVerifyRequest(img1=img1, img2=img2, threshold=args.threshold,
                                            anti_spoofing=args.anti_spoofing, ModelIdentity=args.identity)
    print_json(message_dict(connect(args).call("FaceVerify", request)))
    return 0


def split_actions(values: Optional[Sequence[str]]) -> list[str]:
    return [a.strip() for value in values or () for a in value.split(",") if a.strip()]


def cmd_analyze(args) -> int:
    request = backend_pb2.FaceAnalyzeRequest(img=read_image_b64(args.img), actions=split_actions(args.actions),
                                             anti_spoofing=args.anti_spoofing, ModelIdentity=args.identity)
    print_json(message_dict(connect(args).call("FaceAnalyze", request)))
    return 0


def cmd_detect(args) -> int:
    request = backend_pb2.DetectOptions(src=read_image_b64(args.img), threshold=args.threshold,
                                        ModelIdentity=args.identity)
    print_json(message_dict(connect(args).call("Detect", request)))
    return 0


def cmd_embed(args) -> int:
    request = backend_pb2.PredictOptions(Images=[read_image_b64(args.img)], ModelIdentity=args.identity)
    print_json(message_dict(connect(args).call("Embedding", request)))
    return 0


# -- labelled sets ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelledImage:
    file: str  # as written in the CSV
    path: str  # resolved
    label: str


def resolve_image(csv_dir: str, name: str) -> Optional[str]:
    """`<csv dir>/<file>`, else `<csv dir>/images/<file>` (the shared sets keep photos there)."""
    for candidate in (os.path.join(csv_dir, name), os.path.join(csv_dir, "images", name)):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_labels(csv_path: str, label_column: str, allowed: Optional[set[str]] = None) -> tuple[list[LabelledImage], list[str]]:
    """Rows of a labels CSV with columns `file` and `label_column`; (images, skipped file names).

    A row whose label holds several identities (`a;b`, a photo of several people) is skipped:
    which face is whose cannot be told from the label alone.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "file" not in columns or label_column not in columns:
                raise ClientError(EXIT_USAGE, f"{csv_path}: needs columns file,{label_column}"
                                              f" (has {','.join(columns) or 'none'})")
            rows = list(reader)
    except FileNotFoundError:
        raise ClientError(EXIT_USAGE, f"no such file: {csv_path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ClientError(EXIT_USAGE, f"cannot read {csv_path}: {one_line(error)}") from None
    csv_dir = os.path.dirname(os.path.abspath(csv_path))
    images, skipped = [], []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        name, label = (row.get("file") or "").strip(), (row.get(label_column) or "").strip()
        if not name:
            continue
        if ";" in label:
            skipped.append(name)
            continue
        if not label:
            raise ClientError(EXIT_USAGE, f"{csv_path}:{number}: empty {label_column} for {name}")
        if allowed is not None and label.lower() not in allowed:
            raise ClientError(EXIT_USAGE, f"{csv_path}:{number}: {label_column} must be one of "
                                          f"{', '.join(sorted(allowed))}, got '{label}'")
        path = resolve_image(csv_dir, name)
        if path is None:
            raise ClientError(EXIT_USAGE, f"{csv_path}:{number}: no such file: {name} (looked in"
                                          f" {csv_dir} and {os.path.join(csv_dir, 'images')})")
        images.append(LabelledImage(name, path, label.lower() if allowed is not None else label))
    return images, skipped


def note(text: str) -> None:
    print(f"note: {one_line(text)}", file=sys.stderr)


def run_all(items: Sequence[LabelledImage], work: Callable[[LabelledImage], object], jobs: int, what: str) -> list:
    """work(item) for every item, `jobs` at a time, in order, with a progress bar on stderr."""
    from tqdm import tqdm
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        # disable=None: a bar on a terminal, nothing in logs and pipes
        return list(tqdm(pool.map(work, items), total=len(items), desc=what, unit="img",
                         file=sys.stderr, disable=None, leave=False))


def per_image_or_skip(conn: Connection, name: str, request_of: Callable[[LabelledImage], object]):
    """Runs one RPC per image; an image the server finds no face in (NOT_FOUND) or cannot decode
    (INVALID_ARGUMENT) is reported and skipped, any other failure stops the evaluation."""
    def work(item: LabelledImage):
        request = request_of(item)
        try:
            return item, conn.call(name, request), None
        except ClientError as error:
            if error.status in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT) \
                    and "identity mismatch" not in str(error):
                return item, None, str(error)
            raise
    return work


def rank_auc(positive: np.ndarray, negative: np.ndarray) -> Optional[float]:
    """ROC AUC of scores where positives should score higher: the Mann-Whitney U statistic from
    average ranks, so a tie counts one half."""
    if len(positive) == 0 or len(negative) == 0:
        return None
    scores = np.concatenate([positive, negative])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average rank over each run of ties (ranks start at 1)
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    n_pos, n_neg = len(positive), len(negative)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def rate(count: int, total: int) -> Optional[float]:
    return count / total if total else None


def rounded(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None else round(float(value), digits)


def far_threshold(different: np.ndarray, target: float) -> tuple[float, int]:
    """The largest threshold whose false-accept rate on these pairs is <= target (accept is
    `distance < threshold`, as the server decides), and how many false accepts it allows."""
    allowed = int(math.floor(target * len(different) + 1e-9))
    if allowed >= len(different):
        return MAX_DISTANCE, allowed
    # Accepting fewer than allowed+1 impostors: stop at the (allowed+1)-th closest one.
    return float(np.sort(different)[allowed]), allowed


def save_figure(figure, path: str) -> None:
    try:
        figure.savefig(path, dpi=100)
    except OSError as error:
        raise ClientError(EXIT_USAGE, f"cannot write {path}: {error.strerror or error}") from None


def plotted_rate(mask: np.ndarray) -> float:
    """Share of True in `mask` for a curve point; an empty class plots at 0."""
    return rate(int(np.sum(mask)), mask.size) or 0.0


def finish_curve(axes, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    """The unit-square rate plot (ROC or DET) both evaluate commands draw."""
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8, loc=legend_loc)


def finish_figure(plt, figure, title: str, path: str) -> None:
    figure.suptitle(title)
    figure.tight_layout()
    try:
        save_figure(figure, path)
    finally:
        plt.close(figure)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def plot_identity(path: str, same: np.ndarray, different: np.ndarray, default_threshold: float,
                  recommended: float, title: str, threshold_name: str = "default threshold") -> None:
    plt = pyplot()
    figure, (hist, roc) = plt.subplots(1, 2, figsize=(12, 4.8))
    bins = np.linspace(0.0, max(1.2, float(np.max(np.concatenate([same, different]))) + 0.05), 41)
    hist.hist(different, bins=bins, alpha=0.6, color="tab:red", label=f"different person ({len(different)})")
    hist.hist(same, bins=bins, alpha=0.6, color="tab:green", label=f"same person ({len(same)})")
    hist.axvline(default_threshold, color="black", linestyle="--", label=f"{threshold_name} {default_threshold:.4f}")
    hist.axvline(recommended, color="tab:blue", linestyle=":", label=f"recommended {recommended:.4f}")
    hist.set_xlabel("cosine distance (1 - cos)")
    hist.set_ylabel("pairs")
    hist.set_title("pair distances")
    hist.legend(fontsize=8)
    thresholds = np.concatenate([[0.0], np.unique(np.concatenate([same, different])), [MAX_DISTANCE + 1e-6]])
    far = [plotted_rate(different < t) for t in thresholds]
    tar = [plotted_rate(same < t) for t in thresholds]
    roc.plot(far, tar, color="tab:purple", drawstyle="steps-post")
    for t, style, label in ((default_threshold, "ko", threshold_name), (recommended, "bs", "recommended")):
        roc.plot([plotted_rate(different < t)], [plotted_rate(same < t)], style, label=f"{label} ({t:.4f})")
    roc.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    finish_curve(roc, "false accept rate", "true accept rate", "ROC", "lower right")
    finish_figure(plt, figure, title, path)


def cmd_evaluate(args) -> int:
    if not 0.0 <= args.far <= 1.0:
        raise ClientError(EXIT_USAGE, f"--far must be within [0, 1], got {args.far}")
    if not 0.0 <= args.threshold <= MAX_DISTANCE:
        raise ClientError(EXIT_USAGE, f"--threshold must be a cosine distance in [0, 2], got {args.threshold}")
    images, multi = read_labels(args.labels, "identity")
    if multi:
        note(f"skipped {len(multi)} row(s) with several identities: {', '.join(multi)}")
    if len(images) < 2:
        raise ClientError(EXIT_USAGE, f"{args.labels}: needs at least 2 single-identity images, has {len(images)}")
    conn = connect(args)
    work = per_image_or_skip(conn, "Embedding", lambda item: backend_pb2.PredictOptions(
        Images=[read_image_b64(item.path)], ModelIdentity=args.identity))
    embedded, no_face = [], []
    for item, result, error in run_all(images, work, args.jobs, "embedding"):
        if result is None:
            no_face.append({"file": item.file, "error": error})
            note(f"skipped {item.file}: {error}")
        else:
            vector = np.asarray(result.embeddings, dtype=np.float64)
            embedded.append((item, vector / np.linalg.norm(vector)))
    if len(embedded) < 2:
        raise ClientError(EXIT_REFUSED, f"fewer than 2 images could be embedded ({len(embedded)})")
    dims = {len(v) for _, v in embedded}
    if len(dims) != 1:
        raise ClientError(EXIT_REFUSED, f"embeddings of different sizes {sorted(dims)}: was the model reloaded?")

    # The service has no RPC that reports its threshold, but FaceVerify with threshold 0 decides at
    # the model's default and echoes the threshold it used: one such call on an image that has a face.
    probe_image = read_image_b64(embedded[0][0].path)
    probe = conn.call("FaceVerify", backend_pb2.FaceVerifyRequest(
        img1=probe_image, img2=probe_image, threshold=0.0, ModelIdentity=args.identity))
    default_threshold = float(probe.threshold)
    threshold = args.threshold if args.threshold else default_threshold

    same, different, same_pairs, different_pairs = [], [], [], []
    for i in range(len(embedded)):
        for j in range(i + 1, len(embedded)):
            (a, ea), (b, eb) = embedded[i], embedded[j]
            distance = float(1.0 - ea @ eb)
            (same if a.label == b.label else different).append(distance)
            (same_pairs if a.label == b.label else different_pairs).append((a.file, b.file))
    same_d, different_d = np.asarray(same), np.asarray(different)
    if len(different_d):
        recommended, allowed = far_threshold(different_d, args.far)
        # Reported to 4 decimals, rounded down so that the value shown keeps FAR <= target.
        recommended = math.floor(recommended * 1e4) / 1e4
    else:
        recommended, allowed = threshold, 0

    def accepts(t: float) -> dict:
        tar = rate(int(np.sum(same_d < t)), len(same_d))
        far = rate(int(np.sum(different_d < t)), len(different_d))
        return {"tar": rounded(tar), "far": rounded(far)}

    at_threshold, at_recommended = accepts(threshold), accepts(recommended)
    report = {
        "labels": args.labels,
        "model": probe.model,
        "images": len(embedded),
        "identities": len({item.label for item, _ in embedded}),
        "skipped_multi_identity": multi,
        "skipped_no_face": no_face,
        "embedding_dim": dims.pop(),
        "pairs": len(same) + len(different),
        "same": len(same),
        "different": len(different),
        "default_threshold": rounded(default_threshold),
        "threshold": rounded(threshold),
        "tar": at_threshold["tar"],
        "far": at_threshold["far"],
        "auc": rounded(rank_auc(-same_d, -different_d)),  # closer = more alike
        "max_same_distance": rounded(same_d.max()) if len(same_d) else None,
        "max_same_pair": list(same_pairs[int(same_d.argmax())]) if len(same_d) else None,
        "min_different_distance": rounded(different_d.min()) if len(different_d) else None,
        "min_different_pair": list(different_pairs[int(different_d.argmin())]) if len(different_d) else None,
        "far_target": args.far,
        "recommended_threshold": rounded(recommended),
        "tar_at_recommended": at_recommended["tar"],
        "far_at_recommended": at_recommended["far"],
        "recommended_support": support_note(len(different_d), allowed, args.far),
    }
    if threshold != default_threshold:
        report["threshold_source"] = "--threshold"
    if args.plot:
        plot_identity(args.plot, same_d, different_d, threshold, recommended,
                      f"{os.path.basename(args.labels)}: {probe.model}, {len(embedded)} images, "
                      f"{len(same)} same / {len(different)} different pairs",
                      "default threshold" if threshold == default_threshold else "--threshold")
        report["plot"] = args.plot
    print_json(report)
    return 0


def support_note(different: int, allowed: int, target: float) -> dict:
    """How much the recommended threshold can be trusted: with n impostor pairs and k allowed
    false accepts, the 'rule of three' bounds the true FAR at about 3/n (95%) when k = 0."""
    text = (f"{different} different-person pairs back this estimate; a target FAR of {target:g} allows "
            f"{allowed} false accept(s) among them")
    if different and allowed == 0:
        text += (f", so the recommended threshold is the closest different-person distance and the true FAR "
                 f"there is only known to be below about {3.0 / different:.3g} (95%, rule of three)")
    if different and different * target < 10:
        text += f"; about {math.ceil(10 / target)} different-person pairs are needed to measure a FAR of {target:g}"
    return {"different_pairs": different, "allowed_false_accepts": allowed, "note": text}


# -- liveness ---------------------------------------------------------------------------------

LIVENESS_LABELS = {"real", "spoof"}
# antispoof_threshold when the LoadModel options do not set it
LIVENESS_DEFAULT_THRESHOLD = catalog.default().shared_threshold(catalog.ROLE_ANTISPOOF)


def liveness_rates(real: np.ndarray, spoof: np.ndarray, threshold: float) -> dict:
    """APCER, BPCER and ACER when a face counts as real at `score >= threshold`."""
    apcer = rate(int(np.sum(spoof >= threshold)), len(spoof))
    bpcer = rate(int(np.sum(real < threshold)), len(real))
    return {"apcer": rounded(apcer), "bpcer": rounded(bpcer), "acer": acer_of(apcer, bpcer)}


def acer_of(apcer: Optional[float], bpcer: Optional[float]) -> Optional[float]:
    if apcer is None or bpcer is None:
        return None
    return rounded((apcer + bpcer) / 2.0)


def liveness_candidates(scores: np.ndarray) -> list[float]:
    """One threshold per distinct outcome: below all scores, between neighbours, above all."""
    unique = np.unique(np.clip(scores, 0.0, 1.0))
    middles = (unique[:-1] + unique[1:]) / 2.0
    return [float(unique[0] / 2.0)] + [float(m) for m in middles] + [float((unique[-1] + 1.0) / 2.0)]


def recommend_liveness(real: np.ndarray, spoof: np.ndarray, apcer_target: Optional[float]) -> tuple[float, str]:
    candidates = liveness_candidates(np.concatenate([real, spoof]))
    if apcer_target is not None:
        # The lowest threshold (fewest real faces rejected) that keeps APCER within the target.
        for t in candidates:
            apcer = rate(int(np.sum(spoof >= t)), len(spoof))
            if apcer is None or apcer <= apcer_target + 1e-12:
                return t, f"lowest threshold with APCER <= {apcer_target:g}"
        return candidates[-1], f"no threshold reaches APCER <= {apcer_target:g}: all faces rejected"

    def key(t: float):
        r = liveness_rates(real, spoof, t)
        # minimal ACER; among equals, fewer spoofs accepted, then the threshold nearest the default
        return (r["acer"] if r["acer"] is not None else 0.0, r["apcer"] or 0.0,
                abs(t - LIVENESS_DEFAULT_THRESHOLD))
    # The default is a candidate too: when it is already optimal on this set it is kept, rather
    # than moved to another point of the same gap on the evidence of a few images.
    return (min(candidates + [LIVENESS_DEFAULT_THRESHOLD], key=key),
            "minimal ACER (ties: lower APCER, then nearest 0.5)")


def plot_liveness(path: str, real: np.ndarray, spoof: np.ndarray, server_threshold: Optional[float],
                  recommended: float, title: str) -> None:
    plt = pyplot()
    figure, (hist, det) = plt.subplots(1, 2, figsize=(12, 4.8))
    bins = np.linspace(0.0, 1.0, 21)
    hist.hist(spoof, bins=bins, alpha=0.6, color="tab:red", label=f"spoof ({len(spoof)})")
    hist.hist(real, bins=bins, alpha=0.6, color="tab:green", label=f"real ({len(real)})")
    if server_threshold is not None:
        hist.axvline(server_threshold, color="black", linestyle="--", label=f"server threshold {server_threshold:g}")
    hist.axvline(recommended, color="tab:blue", linestyle=":", label=f"recommended {recommended:.4f}")
    hist.set_xlabel("antispoof_score = P(real)")
    hist.set_ylabel("images")
    hist.set_title("liveness scores")
    hist.legend(fontsize=8)
    thresholds = [0.0] + liveness_candidates(np.concatenate([real, spoof])) + [1.0 + 1e-6]
    apcer = [plotted_rate(spoof >= t) for t in thresholds]
    bpcer = [plotted_rate(real < t) for t in thresholds]
    det.plot(apcer, bpcer, color="tab:purple", marker=".")
    points = [(recommended, "bs", "recommended")]
    if server_threshold is not None:
        points.insert(0, (server_threshold, "ko", "server"))
    for t, style, label in points:
        det.plot([plotted_rate(spoof >= t)], [plotted_rate(real < t)], style, label=f"{label} ({t:.4f})")
    finish_curve(det, "APCER (spoofs accepted)", "BPCER (real faces rejected)", "DET (linear axes)", "upper right")
    finish_figure(plt, figure, title, path)


def cmd_evaluate_liveness(args) -> int:
    if args.apcer is not None and not 0.0 <= args.apcer <= 1.0:
        raise ClientError(EXIT_USAGE, f"--apcer must be within [0, 1], got {args.apcer}")
    images, _ = read_labels(args.labels, "label", LIVENESS_LABELS)
    if not images:
        raise ClientError(EXIT_USAGE, f"{args.labels}: no labelled images")
    conn = connect(args)
    work = per_image_or_skip(conn, "FaceAnalyze", lambda item: backend_pb2.FaceAnalyzeRequest(
        img=read_image_b64(item.path), anti_spoofing=True, ModelIdentity=args.identity))
    rows, scores, no_face = [], [], []
    for item, result, error in run_all(images, work, args.jobs, "liveness"):
        if result is None:
            no_face.append({"file": item.file, "label": item.label, "error": error})
            note(f"skipped {item.file}: {error}")
            continue
        # The face a check is about: the largest box, ties to the detector's more confident face.
        face = max(result.faces, key=lambda f: (f.region.w * f.region.h, f.face_confidence))
        if not face.HasField("antispoof_score"):
            raise ClientError(EXIT_REFUSED, "FaceAnalyze: the server returned no antispoof_score")
        rows.append({"file": item.file, "label": item.label, "faces": len(result.faces),
                     "antispoof_score": rounded(face.antispoof_score), "is_real": face.is_real})
        scores.append(float(face.antispoof_score))
    real = np.asarray([s for r, s in zip(rows, scores) if r["label"] == "real"], dtype=np.float64)
    spoof = np.asarray([s for r, s in zip(rows, scores) if r["label"] == "spoof"], dtype=np.float64)
    if not rows:
        raise ClientError(EXIT_REFUSED, "no image could be analysed")

    spoofs_accepted = sum(1 for r in rows if r["label"] == "spoof" and r["is_real"])
    reals_rejected = sum(1 for r in rows if r["label"] == "real" and not r["is_real"])
    apcer, bpcer = rate(spoofs_accepted, len(spoof)), rate(reals_rejected, len(real))
    # The threshold is not on the wire: the LoadModel default 0.5 is reported when every verdict
    # agrees with it (is_real exactly when score >= 0.5), otherwise it was set to something else.
    consistent = all(r["is_real"] == (s >= LIVENESS_DEFAULT_THRESHOLD) for r, s in zip(rows, scores))
    server_threshold = LIVENESS_DEFAULT_THRESHOLD if consistent else None
    recommended, criterion = recommend_liveness(real, spoof, args.apcer)
    recommended = round(recommended, 4)  # a midpoint between two scores; the rates below are at this value
    at_recommended = liveness_rates(real, spoof, recommended)
    report = {
        "labels": args.labels,
        "images": len(rows),
        "real": len(real),
        "spoof": len(spoof),
        "skipped_no_face": no_face,
        "server_threshold": server_threshold,
        "apcer": rounded(apcer),
        "bpcer": rounded(bpcer),
        "acer": acer_of(apcer, bpcer),
        "spoofs_accepted": spoofs_accepted,
        "reals_rejected": reals_rejected,
        "auc": rounded(rank_auc(real, spoof)),
        "recommended_threshold": rounded(recommended),
        "recommended_criterion": criterion,
        "apcer_at_recommended": at_recommended["apcer"],
        "bpcer_at_recommended": at_recommended["bpcer"],
        "acer_at_recommended": at_recommended["acer"],
        "results": rows,
    }
    if not consistent:
        report["server_threshold_note"] = ("the is_real verdicts do not all match score >= 0.5: the model was "
                                           "loaded with another antispoof_threshold")
    if recommended < LIVENESS_DEFAULT_THRESHOLD:
        report["recommended_note"] = ("below 0.5 the server also requires 'real' to be the most likely of "
                                      "its 3 classes, so antispoof_threshold set to this value may reject a little more")
    if args.plot:
        plot_liveness(args.plot, real, spoof, server_threshold, recommended,
                      f"{os.path.basename(args.labels)}: {len(real)} real, {len(spoof)} spoof")
        report["plot"] = args.plot
    print_json(report)
    return 0


# -- command line -----------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one stderr line too (`--help` still prints the full usage)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {one_line(message)} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # The connection flags are accepted before or after the command: the subcommands share a
    # parent whose defaults are SUPPRESS, so a value given before the command is not overwritten.
    def connection_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
        d = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
        parser.add_argument("--addr", default=d(DEFAULT_ADDR), help=f"server HOST:PORT (default {DEFAULT_ADDR})")
        parser.add_argument("--token", default=d(None),
                            help=f"bearer token (default: ${TOKEN_ENV} when set, else none)")
        parser.add_argument("--timeout", type=float, default=d(120.0),
                            help="deadline of each call in seconds (default 120)")
        parser.add_argument("--connect-timeout", type=float, default=d(5.0),
                            help="seconds to wait for a connection (default 5)")
        parser.add_argument("--identity", default=d(""),
                            help="ModelIdentity to send: the server refuses (NOT_FOUND) when another model is loaded")

    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    connection_flags(parser, defaults=True)
    shared = argparse.ArgumentParser(add_help=False)
    connection_flags(shared, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("load", parents=[shared], help="LoadModel")
    p.add_argument("--default", action="store_true",
                   help="the permissive default set (the catalog's default group); -o adds to it")
    p.add_argument("-o", "--option", action="append", metavar="KEY:VALUE", help="a LoadModel option (repeatable)")
    p.add_argument("--model", default="", help=f"ModelOptions.Model (default '{DEFAULT_MODEL_NAME}' with --default)")
    p.add_argument("--model-path", default=os.path.join(REPO, "models"),
                   help="ModelOptions.ModelPath, a directory on the server's machine (default: this repo's models/)")
    p.add_argument("--threads", type=int, default=0, help="ModelOptions.Threads (default 0: the server's choice)")
    p.set_defaults(run=cmd_load)

    p = commands.add_parser("status", parents=[shared], help="Status")
    p.set_defaults(run=cmd_status)

    p = commands.add_parser("verify", parents=[shared], help="FaceVerify: are A and B the same person?")
    p.add_argument("img1", metavar="A")
    p.add_argument("img2", metavar="B")
    p.add_argument("--anti-spoofing", action="store_true", help="also check both faces for liveness")
    p.add_argument("--threshold", type=float, default=0.0, help="cosine-distance threshold (default: the model's)")
    p.set_defaults(run=cmd_verify)

    p = commands.add_parser("analyze", parents=[shared], help="FaceAnalyze: every face with its attributes")
    p.add_argument("img", metavar="IMG")
    p.add_argument("--actions", action="append", metavar="A[,B]",
                   help="age, gender (comma separated or repeated; default: all the model has)")
    p.add_argument("--anti-spoofing", action="store_true", help="also score each face for liveness")
    p.set_defaults(run=cmd_analyze)

    p = commands.add_parser("detect", parents=[shared], help="Detect: every face box")
    p.add_argument("img", metavar="IMG")
    p.add_argument("--threshold", type=float, default=0.0, help="detector score threshold (default: the model's)")
    p.set_defaults(run=cmd_detect)

    p = commands.add_parser("embed", parents=[shared], help="Embedding of the best face")
    p.add_argument("img", metavar="IMG")
    p.set_defaults(run=cmd_embed)

    p = commands.add_parser("evaluate", parents=[shared],
                            help="TAR/FAR, ROC AUC and a recommended threshold on a labelled set (file,identity)")
    p.add_argument("labels", metavar="LABELS.csv")
    p.add_argument("--far", type=float, default=0.001,
                   help="target false-accept rate for the recommended threshold (default 0.001)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="evaluate at this threshold instead of the server's default")
    p.add_argument("--plot", metavar="FILE.png", help="distance histograms and ROC curve")
    p.add_argument("--jobs", type=int, default=2, help="calls in flight at once (default 2)")
    p.set_defaults(run=cmd_evaluate)

    p = commands.add_parser("evaluate-liveness", parents=[shared],
                            help="APCER/BPCER/ACER and a recommended liveness threshold on a labelled set (file,label)")
    p.add_argument("labels", metavar="LABELS.csv")
    p.add_argument("--apcer", type=float, default=None,
                   help="recommend the lowest threshold with APCER <= this (default: minimise ACER)")
    p.add_argument("--plot", metavar="FILE.png", help="score histograms and DET curve")
    p.add_argument("--jobs", type=int, default=2, help="calls in flight at once (default 2)")
    p.set_defaults(run=cmd_evaluate_liveness)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ClientError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `client.py ... | head`: the reader has gone, say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
