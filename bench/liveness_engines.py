"""Each liveness engine and their fusion on the shared development photos, faces found by YuNet.

    .venv/bin/python bench/liveness_engines.py [--models DIR] [--runs 100]

Prints, per detected face: its label, the MiniFASNet pair's P(real), each CelebA-Spoof MiniFAS
checkpoint's P(real) (both 97.80 and 98.20, whether or not the catalog ships it) and the verdict
of the fused configuration (pair + the shipped checkpoint); then the cost per face of each engine
and of the fusion as the service runs it. Photos: ../shared/data/antispoof-dev (labels.csv),
silent-face-samples F1 F2 (spoof) T1 (real) T2 (real, ambiguous upstream), every face of
face-recognition-examples and insightface-wheel-images/t1.jpg (real). Results: bench/FINDINGS.md,
"liveness engines and fusion".
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import catalog  # noqa: E402
from antispoof import (  # noqa: E402
    CELEBA_FILE,
    MINIFASNET_FILES,
    CelebAMiniFAS,
    LivenessEnsemble,
    celeba_minifas,
)
from engines.options import parse_load_request  # noqa: E402
from evaluation import LIVENESS_LABELS, read_labels  # noqa: E402
from face_eval import read_image  # noqa: E402
from face_service import DEFAULT_MODEL_OPTIONS, FaceService  # noqa: E402
from harness.paths import DATA, GROUP_PHOTO, IDENTITY_DIR, MODELS_DIR, SPOOF_DIR  # noqa: E402

# Every CelebA-Spoof MiniFAS checkpoint the catalog knows (the shipped one has a LoadModel option).
CHECKPOINTS = tuple(
    f.name for f in catalog.default().files.values() if f.preprocess and f.preprocess.runner == celeba_minifas.RUNNER
)


def photos() -> list[tuple[str, str]]:
    """(path, label) of every development photo; label real, spoof or real? (ambiguous)."""
    dev = os.path.join(DATA, "antispoof-dev")
    images, _ = read_labels(os.path.join(dev, "labels.csv"), "label", LIVENESS_LABELS)
    out = [(os.path.join(dev, i.file), i.label) for i in images]
    out += [(os.path.join(SPOOF_DIR, f"image_{n}.jpg"), label) for n, label in (("F1", "spoof"), ("F2", "spoof"))]
    out += [(os.path.join(SPOOF_DIR, "image_T1.jpg"), "real"), (os.path.join(SPOOF_DIR, "image_T2.jpg"), "real?")]
    folder = os.path.join(IDENTITY_DIR, "images")
    out += [(os.path.join(folder, n), "real") for n in sorted(os.listdir(folder)) if n.endswith(".jpg")]
    return out + [(GROUP_PHOTO, "real")]


def median_ms(call, runs: int) -> float:
    for _ in range(5):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS_DIR)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    detector = FaceService().load(parse_load_request("default", args.models, 0, list(DEFAULT_MODEL_OPTIONS))).engine
    v2, v1se = (os.path.join(args.models, name) for name in MINIFASNET_FILES)
    pair = LivenessEnsemble(v2_path=v2, v1se_path=v1se)
    fused = LivenessEnsemble(v2_path=v2, v1se_path=v1se, celeba_path=os.path.join(args.models, CELEBA_FILE))
    checkpoints = [CelebAMiniFAS(os.path.join(args.models, name)) for name in CHECKPOINTS]
    print(f"{'photo':44s} face label  pair   97.80  98.20  fused {CELEBA_FILE}")
    for path, label in photos():
        image = read_image(path)
        faces = detector.detect(image)
        if not faces:
            print(f"{os.path.basename(path):44s} no face found ({label})")
            continue
        boxes = [face.xywh() for face in faces]
        per_checkpoint = [model.real_probability(image, boxes) for model in checkpoints]
        for i, (alone, verdict) in enumerate(zip(pair.score(image, faces), fused.score(image, faces))):
            scores = "  ".join(f"{p[i]:.4f}" for p in per_checkpoint)
            says = verdict.status.value if verdict.gate is None else f"{verdict.status.value} {verdict.gate.reason}"
            name = os.path.basename(path)
            print(f"{name:44s} {i:4d} {label:5s} {alone.score:.4f} {scores}  {verdict.score:.4f} {says}")
    image = read_image(os.path.join(SPOOF_DIR, "image_T1.jpg"))
    face = detector.detect(image)[:1]
    box = [face[0].xywh()]
    print("\nmedian ms per face (image_T1):")
    print(f"  MiniFASNet pair (as served) {median_ms(lambda: pair.score(image, face), args.runs):6.2f}")
    for name, model in zip(CHECKPOINTS, checkpoints):
        print(f"  {name} {median_ms(lambda model=model: model.real_probability(image, box), args.runs):6.2f}")
    print(f"  fused pair + {CELEBA_FILE} (as served) {median_ms(lambda: fused.score(image, face), args.runs):6.2f}")


if __name__ == "__main__":
    main()
