#!/usr/bin/env python3
"""Operator client for the face backend: one command per RPC, plus labelled-set evaluations.

    python client.py [--addr HOST:PORT] [--token T] COMMAND ...

Commands: load, status, verify, analyze, detect, embed, evaluate, evaluate-liveness, and for 1:N
identification enroll and identify (Embedding on --addr, the Stores RPCs on --store-addr).
Results are JSON on stdout. Failures are one line on stderr, `error: ...`, and the exit code says
which kind: 2 usage, missing file or bad labels CSV; 3 server unreachable (or went away);
4 the server refused the call (a gRPC status, or LoadModel answering success=false).
The bearer token is --token, else the environment variable LOCALAI_GRPC_AUTH_TOKEN (the one the
server reads), sent as `authorization: Bearer <token>`.

The arithmetic of the evaluations is evaluation.py, their figures plotting.py.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import backend_pb2
import backend_pb2_grpc
import catalog
import evaluation
from core.selection import best_face
from core.settings import ImageLimits
from evaluation import LabelledImage

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_STORE_ADDR = "127.0.0.1:50052"
TOKEN_ENV = "LOCALAI_GRPC_AUTH_TOKEN"
DEFAULT_MODEL_NAME = "default"  # what `backend.py --preload-default` loads the default set as

EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4


class ClientError(Exception):
    """A failure reported as one stderr line and an exit code."""

    def __init__(
        self, code: int, message: str, status: grpc.StatusCode | None = None, reason: str = "", field: str = ""
    ):
        super().__init__(message)
        self.code = code
        self.status = status  # the gRPC status, when the server answered with one
        # Its google.rpc.ErrorInfo, when it sent one: why (NO_FACE, IDENTITY_MISMATCH, ...) and
        # which request field was at fault (img1, Images[0], ModelIdentity, ...).
        self.reason = reason
        self.field = field


def one_line(text: object) -> str:
    return " ".join(str(text).split())


# -- talking to the server --------------------------------------------------------------------


class Connection:
    """A channel that is known to be connected, and calls that turn failures into ClientError."""

    def __init__(self, addr: str, token: str, timeout: float, connect_timeout: float, identity: str = ""):
        self.addr = addr
        self.timeout = timeout
        self.identity = identity
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        # Messages as large as a server with this environment's image limits accepts (an operator
        # who raises FACE_MAX_IMAGE_BYTES for the server sets it here too).
        self.channel = grpc.insecure_channel(addr, options=ImageLimits.from_environ().grpc_message_options())
        self._wait_connected(connect_timeout)
        self.stub = backend_pb2_grpc.BackendStub(self.channel)

    def _wait_connected(self, timeout: float) -> None:
        """READY within `timeout`, or a ClientError at once when every address refused."""
        settled = threading.Event()
        last: list[grpc.ChannelConnectivity] = []

        def watch(state: grpc.ChannelConnectivity) -> None:
            last.append(state)
            if state in (
                grpc.ChannelConnectivity.READY,
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                grpc.ChannelConnectivity.SHUTDOWN,
            ):
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
        raise ClientError(
            EXIT_UNREACHABLE, f"cannot reach the server at {self.addr}: no connection within {timeout:g} s"
        )

    def call(self, name: str, request):
        try:
            return getattr(self.stub, name)(request, timeout=self.timeout, metadata=self.metadata, wait_for_ready=False)
        except grpc.RpcError as error:
            raise rpc_error(name, error) from None

    def close(self) -> None:
        self.channel.close()


def rpc_error(name: str, error: grpc.RpcError) -> ClientError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    exit_code = EXIT_UNREACHABLE if code == grpc.StatusCode.UNAVAILABLE else EXIT_REFUSED
    info = error_info(error)
    reason, field = (info.reason, info.metadata.get("field", "")) if info is not None else ("", "")
    return ClientError(exit_code, f"{name}: {code.name}: {one_line(details or '')}", code, reason, field)


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc.ErrorInfo a failed call carries: the server's reason (NO_FACE, ...) and, as
    metadata `field`, the request field at fault. None for a status gRPC made itself
    (UNAVAILABLE, RESOURCE_EXHAUSTED, a deadline the client saw pass)."""
    try:
        status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    except ValueError:  # details that contradict the call's own code or message: ignore them
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def message_dict(message) -> dict:
    """The message as JSON: proto field names, every plain field (false and 0 included), and the
    `optional` fields only when set, so 'liveness not checked' stays distinguishable."""
    return in_field_order(
        message, MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    )


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
    return backend_pb2.ModelOptions(
        Model=model, ModelPath=os.path.abspath(args.model_path), Threads=args.threads, Options=options
    )


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
    request = backend_pb2.FaceVerifyRequest(
        img1=img1, img2=img2, threshold=args.threshold, anti_spoofing=args.anti_spoofing, ModelIdentity=args.identity
    )
    print_json(message_dict(connect(args).call("FaceVerify", request)))
    return 0


def split_actions(values: Sequence[str] | None) -> list[str]:
    return [a.strip() for value in values or () for a in value.split(",") if a.strip()]


def cmd_analyze(args) -> int:
    request = backend_pb2.FaceAnalyzeRequest(
        img=read_image_b64(args.img),
        actions=split_actions(args.actions),
        anti_spoofing=args.anti_spoofing,
        ModelIdentity=args.identity,
    )
    print_json(message_dict(connect(args).call("FaceAnalyze", request)))
    return 0


def cmd_detect(args) -> int:
    request = backend_pb2.DetectOptions(
        src=read_image_b64(args.img), threshold=args.threshold, ModelIdentity=args.identity
    )
    print_json(message_dict(connect(args).call("Detect", request)))
    return 0


def cmd_embed(args) -> int:
    request = backend_pb2.PredictOptions(Images=[read_image_b64(args.img)], ModelIdentity=args.identity)
    print_json(message_dict(connect(args).call("Embedding", request)))
    return 0


# -- 1:N identification: a face server for embeddings, a store server for the gallery ---------


def store_connection(args) -> Connection:
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    return Connection(args.store_addr, token, args.timeout, args.connect_timeout)


def embedding_key(conn: Connection, path: str) -> backend_pb2.StoresKey:
    request = backend_pb2.PredictOptions(Images=[read_image_b64(path)], ModelIdentity=conn.identity)
    return backend_pb2.StoresKey(Floats=conn.call("Embedding", request).embeddings)


def cmd_enroll(args) -> int:
    """One key per photo of NAME, each stored with the name and the enrollment time as its value."""
    faces = connect(args)
    enrolled = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    keys = [embedding_key(faces, path) for path in args.images]
    values = [
        backend_pb2.StoresValue(
            Bytes=json.dumps({"name": args.name, "enrolled": enrolled, "image": os.path.basename(path)}).encode()
        )
        for path in args.images
    ]
    store_connection(args).call("StoresSet", backend_pb2.StoresSetOptions(Keys=keys, Values=values))
    print_json({"name": args.name, "enrolled": enrolled, "images": list(args.images), "keys": len(keys)})
    return 0


def cmd_identify(args) -> int:
    """The --top enrolled faces most like the photo's best face, best first."""
    if args.top < 1:
        raise ClientError(EXIT_USAGE, f"--top must be >= 1, got {args.top}")
    key = embedding_key(connect(args), args.img)
    found = store_connection(args).call("StoresFind", backend_pb2.StoresFindOptions(Key=key, TopK=args.top))
    matches = []
    for value, similarity in zip(found.Values, found.Similarities):
        try:
            entry = json.loads(value.Bytes)
        except ValueError:  # a value another program stored: shown as it is
            entry = {"value": value.Bytes.decode("utf-8", "replace")}
        matches.append({**entry, "similarity": round(similarity, 6), "distance": round(1.0 - similarity, 6)})
    print_json({"image": args.img, "matches": matches})
    return 0


# -- labelled sets ----------------------------------------------------------------------------


def read_labels(
    csv_path: str, label_column: str, allowed: set[str] | None = None
) -> tuple[list[LabelledImage], list[str]]:
    try:
        return evaluation.read_labels(csv_path, label_column, allowed)
    except evaluation.LabelsError as error:
        raise ClientError(EXIT_USAGE, one_line(error)) from None


def note(text: str) -> None:
    print(f"note: {one_line(text)}", file=sys.stderr)


def run_all(items: Sequence[LabelledImage], work: Callable[[LabelledImage], object], jobs: int, what: str) -> list:
    """work(item) for every item, `jobs` at a time, in order, with a progress bar on stderr."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        # disable=None: a bar on a terminal, nothing in logs and pipes
        return list(
            tqdm(
                pool.map(work, items),
                total=len(items),
                desc=what,
                unit="img",
                file=sys.stderr,
                disable=None,
                leave=False,
            )
        )


def per_image_or_skip(conn: Connection, name: str, image_field: str, request_of: Callable[[LabelledImage], object]):
    """Runs one RPC per image. An error the server pins on the image itself (its ErrorInfo field
    is `image_field`: no face in it, not decodable, too large, ...) skips that image, reported
    with its reason; any other failure (no model, identity mismatch, ...) stops the evaluation."""

    def work(item: LabelledImage):
        request = request_of(item)
        try:
            return item, conn.call(name, request), None
        except ClientError as error:
            if error.field == image_field:
                return item, None, error
            raise

    return work


def skipped(item: LabelledImage, error: ClientError, **extra) -> dict:
    note(f"skipped {item.file}: {error}")
    return {"file": item.file, **extra, "error": str(error), "reason": error.reason}


@contextlib.contextmanager
def plotting_to(path: str):
    """The plotting module (matplotlib is imported only now); a file it cannot write is a usage error."""
    import plotting

    try:
        yield plotting
    except OSError as error:
        raise ClientError(EXIT_USAGE, f"cannot write {path}: {error.strerror or error}") from None


def cmd_evaluate(args) -> int:
    if not 0.0 <= args.far <= 1.0:
        raise ClientError(EXIT_USAGE, f"--far must be within [0, 1], got {args.far}")
    if not 0.0 <= args.threshold <= evaluation.MAX_DISTANCE:
        raise ClientError(EXIT_USAGE, f"--threshold must be a cosine distance in [0, 2], got {args.threshold}")
    images, multi = read_labels(args.labels, "identity")
    if multi:
        note(f"skipped {len(multi)} row(s) with several identities: {', '.join(multi)}")
    if len(images) < 2:
        raise ClientError(EXIT_USAGE, f"{args.labels}: needs at least 2 single-identity images, has {len(images)}")
    conn = connect(args)
    work = per_image_or_skip(
        conn,
        "Embedding",
        "Images[0]",
        lambda item: backend_pb2.PredictOptions(Images=[read_image_b64(item.path)], ModelIdentity=args.identity),
    )
    embedded, no_face = [], []
    for item, result, error in run_all(images, work, args.jobs, "embedding"):
        if result is None:
            no_face.append(skipped(item, error))
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
    probe = conn.call(
        "FaceVerify",
        backend_pb2.FaceVerifyRequest(img1=probe_image, img2=probe_image, threshold=0.0, ModelIdentity=args.identity),
    )
    default_threshold = float(probe.threshold)
    result = evaluation.evaluate_identity(
        [item.file for item, _ in embedded],
        [item.label for item, _ in embedded],
        np.stack([vector for _, vector in embedded]),
        default_threshold=default_threshold,
        threshold=args.threshold or default_threshold,
        far_target=args.far,
        skipped_multi_identity=multi,
        skipped_no_face=no_face,
    )
    report = {"labels": args.labels, "model": probe.model, **result.report}
    if args.plot:
        with plotting_to(args.plot) as plotting:
            plotting.plot_identity(
                args.plot,
                result.pairs.same,
                result.pairs.different,
                result.threshold,
                result.recommended,
                f"{os.path.basename(args.labels)}: {probe.model}, {report['images']} images, "
                f"{report['same']} same / {report['different']} different pairs",
                "default threshold" if result.threshold == default_threshold else "--threshold",
            )
        report["plot"] = args.plot
    print_json(report)
    return 0


def cmd_evaluate_liveness(args) -> int:
    if args.apcer is not None and not 0.0 <= args.apcer <= 1.0:
        raise ClientError(EXIT_USAGE, f"--apcer must be within [0, 1], got {args.apcer}")
    images, _ = read_labels(args.labels, "label", evaluation.LIVENESS_LABELS)
    if not images:
        raise ClientError(EXIT_USAGE, f"{args.labels}: no labelled images")
    conn = connect(args)
    work = per_image_or_skip(
        conn,
        "FaceAnalyze",
        "img",
        lambda item: backend_pb2.FaceAnalyzeRequest(
            img=read_image_b64(item.path), anti_spoofing=True, ModelIdentity=args.identity
        ),
    )
    scored, no_face = [], []
    for item, result, error in run_all(images, work, args.jobs, "liveness"):
        if result is not None and not result.faces:  # FaceAnalyze answers a faceless photo with []
            result, error = (
                None,
                ClientError(EXIT_REFUSED, "FaceAnalyze: no face found in img", reason="NO_FACE", field="img"),
            )
        if result is None:
            no_face.append(skipped(item, error, label=item.label))
            continue
        # The face a check is about, by the server's own rule.
        face = best_face(result.faces, area=lambda f: f.region.w * f.region.h, score=lambda f: f.face_confidence)
        if not face.HasField("antispoof_score"):
            raise ClientError(EXIT_REFUSED, "FaceAnalyze: the server returned no antispoof_score")
        scored.append(
            evaluation.ScoredImage(
                item.file,
                item.label,
                len(result.faces),
                float(face.antispoof_score),
                face.is_real,
                face.liveness_status,
                face.liveness_reason,
            )
        )
    if not scored:
        raise ClientError(EXIT_REFUSED, "no image could be analysed")
    result = evaluation.evaluate_liveness(scored, args.apcer, skipped_no_face=no_face)
    report = {"labels": args.labels, **result.report}
    if args.plot:
        with plotting_to(args.plot) as plotting:
            plotting.plot_liveness(
                args.plot,
                result.real,
                result.spoof,
                result.server_threshold,
                result.recommended,
                f"{os.path.basename(args.labels)}: {len(result.real)} real, {len(result.spoof)} spoof",
            )
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
        parser.add_argument(
            "--token", default=d(None), help=f"bearer token (default: ${TOKEN_ENV} when set, else none)"
        )
        parser.add_argument(
            "--timeout", type=float, default=d(120.0), help="deadline of each call in seconds (default 120)"
        )
        parser.add_argument(
            "--connect-timeout", type=float, default=d(5.0), help="seconds to wait for a connection (default 5)"
        )
        parser.add_argument(
            "--identity",
            default=d(""),
            help="ModelIdentity to send: the server refuses (NOT_FOUND) when another model is loaded",
        )

    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    connection_flags(parser, defaults=True)
    shared = OneLineParser(add_help=False)
    connection_flags(shared, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("load", parents=[shared], help="LoadModel")
    p.add_argument(
        "--default", action="store_true", help="the permissive default set (the catalog's default group); -o adds to it"
    )
    p.add_argument("-o", "--option", action="append", metavar="KEY:VALUE", help="a LoadModel option (repeatable)")
    p.add_argument("--model", default="", help=f"ModelOptions.Model (default '{DEFAULT_MODEL_NAME}' with --default)")
    p.add_argument(
        "--model-path",
        default=os.path.join(REPO, "models"),
        help="ModelOptions.ModelPath, a directory on the server's machine (default: this repo's models/)",
    )
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
    p.add_argument(
        "--actions",
        action="append",
        metavar="A[,B]",
        help="age, gender (comma separated or repeated; default: all the model has)",
    )
    p.add_argument("--anti-spoofing", action="store_true", help="also score each face for liveness")
    p.set_defaults(run=cmd_analyze)

    p = commands.add_parser("detect", parents=[shared], help="Detect: every face box")
    p.add_argument("img", metavar="IMG")
    p.add_argument("--threshold", type=float, default=0.0, help="detector score threshold (default: the model's)")
    p.set_defaults(run=cmd_detect)

    p = commands.add_parser("embed", parents=[shared], help="Embedding of the best face")
    p.add_argument("img", metavar="IMG")
    p.set_defaults(run=cmd_embed)

    p = commands.add_parser(
        "evaluate",
        parents=[shared],
        help="TAR/FAR, ROC AUC and a recommended threshold on a labelled set (file,identity)",
    )
    p.add_argument("labels", metavar="LABELS.csv")
    p.add_argument(
        "--far",
        type=float,
        default=0.001,
        help="target false-accept rate for the recommended threshold (default 0.001)",
    )
    p.add_argument(
        "--threshold", type=float, default=0.0, help="evaluate at this threshold instead of the server's default"
    )
    p.add_argument("--plot", metavar="FILE.png", help="distance histograms and ROC curve")
    p.add_argument("--jobs", type=int, default=2, help="calls in flight at once (default 2)")
    p.set_defaults(run=cmd_evaluate)

    p = commands.add_parser(
        "evaluate-liveness",
        parents=[shared],
        help="APCER/BPCER/ACER and a recommended liveness threshold on a labelled set (file,label)",
    )
    p.add_argument("labels", metavar="LABELS.csv")
    p.add_argument(
        "--apcer",
        type=float,
        default=None,
        help="recommend the lowest threshold with APCER <= this (default: minimise ACER)",
    )
    p.add_argument("--plot", metavar="FILE.png", help="score histograms and DET curve")
    p.add_argument("--jobs", type=int, default=2, help="calls in flight at once (default 2)")
    p.set_defaults(run=cmd_evaluate_liveness)

    def store_flag(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--store-addr",
            default=DEFAULT_STORE_ADDR,
            help=f"HOST:PORT of the store server, a backend loaded with store:sqlite (default {DEFAULT_STORE_ADDR})",
        )

    p = commands.add_parser("enroll", parents=[shared], help="store the faces of NAME's photos in the gallery")
    p.add_argument("name", metavar="NAME")
    p.add_argument("images", metavar="IMG", nargs="+")
    store_flag(p)
    p.set_defaults(run=cmd_enroll)

    p = commands.add_parser("identify", parents=[shared], help="who in the gallery the photo's face is most like")
    p.add_argument("img", metavar="IMG")
    p.add_argument("--top", type=int, default=3, help="how many matches, best first (default 3)")
    store_flag(p)
    p.set_defaults(run=cmd_identify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
