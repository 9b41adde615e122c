"""Labelled-pair evaluation of a face engine: the numbers behind each default threshold.

Photos are decoded and their faces found as the service does for a request's image
(face_service.LocatedFaces: reduced-scale JPEG decode where the detector allows it).

Two sets of real photos from ../shared/data:
- calibration: the 13 single-face photos of face-recognition-examples (labels.csv);
- held out: faces annotated in tests/data/heldout_faces.csv (the multi-face photos, Tom Hanks)
  and the six different people of the group photo t1.jpg. Thresholds were never fitted on these.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import cv2
import numpy as np

from engines import FaceDetection, FaceEngine
from evaluation import MAX_DISTANCE, labelled_pairs, read_labels
from face_service import LocatedFaces, best_face, magnification
from harness.images import read_bytes
from imaging import EncodedImage

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


def read_image(path: str) -> np.ndarray:
    """The photo at `path` as BGR; one OpenCV cannot read is an error naming it."""
    image = cv2.imread(path)
    if image is None:
        raise ValueError(f"cannot read image {path}")
    return image


def locate(engine: FaceEngine, path: str) -> LocatedFaces:
    """The faces in the photo at `path`, found as the service finds them in a request's image."""
    located = LocatedFaces(engine, EncodedImage.from_bytes(read_bytes(path), path))
    located.detect()
    return located


def embed_as_served(engine: FaceEngine, located: LocatedFaces, face: FaceDetection) -> np.ndarray:
    """The embedding FaceVerify computes for `face` (full-image pixels) of `located`."""
    image, (scaled,) = located.pixels_for([face], magnification(engine, None, embed=True))
    return engine.embed(image, scaled)


def calibration_faces(engine: FaceEngine, data_dir: str) -> list[LabelledFace]:
    """The best face of every single-face photo in face-recognition-examples/labels.csv."""
    images, _ = read_labels(os.path.join(data_dir, "face-recognition-examples", "labels.csv"), "identity")
    faces = []
    for item in images:
        located = locate(engine, item.path)
        faces.append(LabelledFace(item.label, item.file, embed_as_served(engine, located, best_face(located.faces))))
    return faces


def heldout_faces(engine: FaceEngine, data_dir: str) -> list[LabelledFace]:
    """Annotated faces of the multi-face photos plus the six people of t1.jpg."""
    faces = []
    with open(HELDOUT_LABELS, newline="") as f:
        for row in csv.DictReader(f):
            located = locate(engine, os.path.join(data_dir, row["file"]))
            centre = np.array([float(row["centre_x"]), float(row["centre_y"])])
            detected = located.faces
            if not detected:  # SCRFD misses the tightly cropped 112x112 Tom Hanks photo
                continue
            face = min(
                detected,
                key=lambda d: np.linalg.norm(np.array([(d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2]) - centre),
            )
            faces.append(LabelledFace(row["identity"], row["file"], embed_as_served(engine, located, face)))
    located = locate(engine, os.path.join(data_dir, "insightface-wheel-images", "t1.jpg"))
    for i, face in enumerate(sorted(located.faces, key=lambda d: d.box[0])):
        faces.append(LabelledFace(f"t1_person_{i}", "t1.jpg", embed_as_served(engine, located, face)))
    return faces


def pair_stats(faces: list[LabelledFace], threshold: float, only_with: list[LabelledFace] | None = None) -> PairStats:
    """Accept counts over all pairs (or only pairs with at least one face of `only_with`)."""
    involving = None
    if only_with is not None:
        required = {id(f) for f in only_with}
        involving = [i for i, face in enumerate(faces) if id(face) in required]
    pairs = labelled_pairs([f.identity for f in faces], np.stack([f.embedding for f in faces]), involving)
    true_accepts, false_accepts = pairs.accepted(threshold)
    return PairStats(
        len(pairs.same),
        len(pairs.different),
        true_accepts,
        false_accepts,
        float(pairs.same.max(initial=0.0)),
        float(pairs.different.min(initial=MAX_DISTANCE)),
    )
