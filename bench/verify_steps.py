"""What each candidate cut of a FaceVerify's work saves, measured in isolation (issue 14, item 2):

    .venv/bin/python bench/verify_steps.py [--repeats 30]

* decode: the bench's verification photos and a 12-MP stand-in, every pixel against the reduced
  scale face_service.LocatedFaces picks (cv2.imdecode IMREAD_REDUCED_COLOR_*);
* SCRFD input: buffalo_sc's detector on a 640x640 letterbox (insightface's) against a canvas
  sized to the fitted image (rounded up to its 32 px stride), with how far boxes and the
  recognizer's distance move;
* recognizer batching: the two images' MobileFaceNet crops (each with its flip) as two Runs of 2
  against one Run of 4.

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
from engines.runtime import run_batched
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
    print("MobileFaceNet: the two images' crops (with flips) as two Runs of 2 vs one Run of 4")
    engine = build_engine(parse_load_request("default", MODELS_DIR, 0, list(DEFAULT_MODEL_OPTIONS)))
    recognizer = engine.recognizer  # type: ignore[attr-defined]
    crops = []
    for name in ("obama_1.jpg", "obama_2.jpg"):
        image = EncodedImage.from_bytes(read_bytes(os.path.join(IDENTITY_DIR, "images", name)), name).decode()
        crop = align_face(image, best_face(engine.detect(image)).landmarks)
        crops.append([crop, crop[:, ::-1]])

    def separate():
        return [run_batched(recognizer.session, recognizer._blob(pair)) for pair in crops]

    def batched():
        return run_batched(recognizer.session, recognizer._blob(crops[0] + crops[1]))

    a, b = side_by_side(separate, batched, repeats)
    print(f"  two Runs of 2: {a:.2f} ms, one Run of 4: {b:.2f} ms (ratio {b / a:.3f})")


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
