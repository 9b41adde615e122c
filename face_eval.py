"""Labelled-pair evaluation of a face engine: the numbers behind each default threshold.

Two sets of real photos from ../shared/data:
- calibration: the 13 single-face photos of face-recognition-examples (labels.csv);
- held out: faces annotated in tests/data/heldout_faces.csv (the multi-face photos, Tom Hanks)
  and the six different people of the group photo t1.jpg. Thresholds were never fitted on these.
"""
from __future__ import annotations

import csv
import itertools
import os
from dataclasses import dataclass

import cv2
import numpy as np

from engines import FaceEngine
from face_service import best_face

HELDOUT_LABELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data", "heldout_faces.csv")


@dataclass(frozen=True)
class LabelledFace:
    identity: str
    source: str  # file (and face) it came from
    embedding: np.ndarray


@dataclass(frozen=True)
class PairStats:
    same: int
    different: int
    true_accepts: int
    false_accepts: int
    max_same_distance: float
    min_different_distance: float

    @property
    def tar(self) -> float:
        return self.true_accepts / self.same if self.same else 1.0

    @property
    def true_reject_rate(self) -> float:
        return 1.0 - self.false_accepts / self.different if self.different else 1.0


def calibration_faces(engine: FaceEngine, data_dir: str) -> list[LabelledFace]:
    """The best face of every single-face photo in face-recognition-examples/labels.csv."""
    base = os.path.join(data_dir, "face-recognition-examples")
    faces = []
    with open(os.path.join(base, "labels.csv"), newline="") as f:
        for row in csv.DictReader(f):
            if ";" in row["identity"]:
                continue
            image = cv2.imread(os.path.join(base, "images", row["file"]))
            face = best_face(engine.detect(image))
            faces.append(LabelledFace(row["identity"], row["file"], engine.embed(image, face)))
    return faces


def heldout_faces(engine: FaceEngine, data_dir: str) -> list[LabelledFace]:
    """Annotated faces of the multi-face photos plus the six people of t1.jpg."""
    faces = []
    with open(HELDOUT_LABELS, newline="") as f:
        for row in csv.DictReader(f):
            image = cv2.imread(os.path.join(data_dir, row["file"]))
            centre = np.array([float(row["centre_x"]), float(row["centre_y"])])
            detected = engine.detect(image)
            if not detected:  # SCRFD misses the tightly cropped 112x112 Tom Hanks photo
                continue
            face = min(detected, key=lambda d: np.linalg.norm(
                np.array([(d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2]) - centre))
            faces.append(LabelledFace(row["identity"], row["file"], engine.embed(image, face)))
    group = os.path.join(data_dir, "insightface-wheel-images", "t1.jpg")
    image = cv2.imread(group)
    for i, face in enumerate(sorted(engine.detect(image), key=lambda d: d.box[0])):
        faces.append(LabelledFace(f"t1_person_{i}", "t1.jpg", engine.embed(image, face)))
    return faces


def pair_stats(faces: list[LabelledFace], threshold: float,
               only_with: list[LabelledFace] | None = None) -> PairStats:
    """Accept counts over all pairs (or only pairs with at least one face of `only_with`)."""
    required = {id(f) for f in only_with} if only_with is not None else None
    same = different = true_accepts = false_accepts = 0
    max_same, min_different = 0.0, 2.0
    for a, b in itertools.combinations(faces, 2):
        if required is not None and id(a) not in required and id(b) not in required:
            continue
        distance = float(1.0 - a.embedding @ b.embedding)
        if a.identity == b.identity:
            same += 1
            true_accepts += distance < threshold
            max_same = max(max_same, distance)
        else:
            different += 1
            false_accepts += distance < threshold
            min_different = min(min_different, distance)
    return PairStats(same, different, true_accepts, false_accepts, max_same, min_different)
