"""What each candidate cut of a FaceVerify's work saves, measured in isolation (issue 14, item 2):

    .venv/bin/python bench/verify_steps.py [--repeats 30]

* decode: the bench's verification photos and a 12-MP stand-in, every pixel against the reduced
  scale face_service.LocatedFaces picks (cv2.imdecode IMREAD_REDUCED_COLOR_*);
* SCRFD input: buffalo_sc's detector on a 640x640 letterbox (insightface's) against a canvas
  sized to the fitted image (rounded up to its 32 px stride), with how far boxes and the
  recognizer's distance move;
* recognizer batching: MobileFaceNet's crop and flipped crop as one Run of 2 against the two Runs
  of 1 the service makes (the shipped export fixes its batch at 1: its last Reshape is to [1, -1];
  the step runs a copy with that Reshape to [0, -1] and a free batch, and checks the outputs are
  the same), and the two images' four crops as one Run of 4.

Timings alternate the two sides per repeat and report medians (ms); the machine is shared, so only
the side-by-side ratio means much.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engines import build_engine, parse_load_request
from engines.alignment import align_face
from engines.detection import SCRFDDetector
from engines.runtime import create_session, run_batched
from face_service import DEFAULT_MODEL_OPTIONS, best_face
from harness.images import phone_photo, read_bytes
from harness.paths import GROUP_PHOTO, IDENTITY_DIR, MODELS_DIR
from imaging import EncodedImage

PHOTOS = sorted(os.path.join(IDENTITY_DIR, "images", n) for n in os.listdir(os.path.join(IDENTITY_DIR, "images")))


def side_by_side(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median ms of a() and b(), called alternately (a first on even repeats)."""
    a(), b()
    times: dict[int, list[float]] = {0: [], 1: []}
    for k in range(repeats):
        for which in (0, 1) if k % 2 == 0 else (1, 0):
            call = a if which == 0 else b
            start = time.perf_counter()
            call()
            times[which].append(time.perf_counter() - start)
    return float(np.median(times[0])) * 1000, float(np.median(times[1])) * 1000


def decode_cost(repeats: int) -> None:
    print("decode: every pixel vs the reduced scale LocatedFaces picks for a 640x640 detector")
    photos = [(os.path.basename(p), read_bytes(p)) for p in PHOTOS]
    photos.append(("obama_1.jpg at 12 MP", phone_photo(EncodedImage.from_bytes(photos[10][1], "img").decode())))
    for name, raw in photos:
        encoded = EncodedImage.from_bytes(raw, name)
        reduction = encoded.coarsest_reduction((640, 640))
        if reduction == 1:
            continue
        full, reduced = side_by_side(lambda: encoded.decode(1), lambda: encoded.decode(reduction), repeats)
        print(f"  {name:28s} {encoded.width}x{encoded.height} 1/{reduction}: {full:6.1f} -> {reduced:6.1f} ms")


def scrfd_input(repeats: int) -> None:
    print("SCRFD (buffalo_sc det_500m): 640x640 letterbox vs a canvas sized to the fitted image")
    engine = build_engine(
        parse_load_request("buffalo_sc", MODELS_DIR, 0, ["engine:insightface", "model_pack:buffalo_sc"])
    )
    fitted = engine.detector  # type: ignore[attr-defined]
    letterbox = SCRFDDetector(fitted.session, fitted.input_size, fitted.score_threshold, fitted_canvas=False)
    ratios, shifts, moves = [], [], []
    for path in [*PHOTOS, GROUP_PHOTO]:
        image = EncodedImage.from_bytes(read_bytes(path), path).decode()
        a, b = letterbox.detect(image), fitted.detect(image)
        if len(a) != len(b):
            print(f"  {os.path.basename(path)}: {len(a)} faces vs {len(b)}")
        if not a or not b:
            continue
        fa, fb = best_face(a), best_face(b)
        shifts.append(float(np.abs(np.subtract(fa.box, fb.box)).max() * 640 / max(image.shape[:2])))
        moves.append(float(1 - engine.embed(image, fa) @ engine.embed(image, fb)))
        la, lb = side_by_side(lambda: letterbox.detect(image), lambda: fitted.detect(image), repeats)
        ratios.append(lb / la)
        print(f"  {os.path.basename(path):28s} {image.shape[1]}x{image.shape[0]}: {la:6.1f} -> {lb:6.1f} ms")
    print(
        f"  median time ratio {np.median(ratios):.3f}; best-face box shift max {max(shifts):.2f} px of the 640"
        f" input; recognizer distance between the two detections max {max(moves):.4f}"
    )


def recognizer_batching(repeats: int) -> None:
    import tempfile

    import onnx

    print("MobileFaceNet: crop and flip as two Runs of 1 (the service) vs one Run of 2, and one Run of 4")
    engine = build_engine(parse_load_request("default", MODELS_DIR, 0, list(DEFAULT_MODEL_OPTIONS)))
    recognizer = engine.recognizer  # type: ignore[attr-defined]
    crops = []
    for name in ("obama_1.jpg", "obama_2.jpg"):
        image = EncodedImage.from_bytes(read_bytes(os.path.join(IDENTITY_DIR, "images", name)), name).decode()
        crop = align_face(image, best_face(engine.detect(image)).landmarks)
        crops.append(recognizer._blob([crop, crop[:, ::-1]]))
    session = recognizer.session

    model = onnx.load(os.path.join(MODELS_DIR, "MobileFaceNet.onnx"))
    reshapes = [node for node in model.graph.node if node.op_type == "Reshape"]
    shapes = {node.output[0]: node for node in model.graph.node if node.op_type == "Constant"}
    shape = shapes[reshapes[-1].input[1]].attribute[0].t
    if onnx.numpy_helper.to_array(shape).tolist() != [1, -1]:
        raise SystemExit("MobileFaceNet.onnx changed: its last Reshape is not to [1, -1]")
    shape.CopyFrom(onnx.numpy_helper.from_array(np.array([0, -1], np.int64)))
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "MobileFaceNet-any-batch.onnx")
        onnx.save(model, path)
        threads = session.get_session_options().intra_op_num_threads
        batched = create_session(path, threads, free_dims={0: "batch"})

    def per_crop(blob: np.ndarray) -> np.ndarray:
        return run_batched(session, blob)  # one Run per crop: the shipped file's batch is 1

    def one_run(blob: np.ndarray) -> np.ndarray:
        return run_batched(batched, blob)  # one Run: at most MAX_RUN_BATCH crops

    both = np.concatenate(crops)
    if not np.array_equal(per_crop(both), one_run(both)):
        raise SystemExit("the batched copy's embeddings differ from the shipped file's")
    a, b = side_by_side(lambda: per_crop(crops[0]), lambda: one_run(crops[0]), repeats)
    print(f"  crop and flip: two Runs of 1 {a:.2f} ms, one Run of 2 {b:.2f} ms (ratio {b / a:.3f}); same embeddings")
    a, b = side_by_side(lambda: per_crop(both), lambda: one_run(both), repeats)
    print(f"  both images: four Runs of 1 {a:.2f} ms, one Run of 4 {b:.2f} ms (ratio {b / a:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--only", choices=("decode", "scrfd", "batching"))
    args = parser.parse_args()
    steps = {"decode": decode_cost, "scrfd": scrfd_input, "batching": recognizer_batching}
    for name, step in steps.items():
        if args.only in (None, name):
            step(args.repeats)


if __name__ == "__main__":
    main()
