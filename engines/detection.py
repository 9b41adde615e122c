"""Face detectors: SCRFD and YuNet, both through onnxruntime.

Both return FaceDetection in original-image pixels with the 5 landmarks in SCRFD order.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import cv2
import numpy as np
import onnxruntime as ort

from core.concurrency import serving_alone
from core.errors import ModelFileError

from .base import FaceDetection
from .runtime import (
    create_session,
    default_threads,
    detects_in_flight_following_the_load,
    follows_the_load,
    runs_in_flight,
)

DEFAULT_DETECTION_SIZE = (640, 640)  # insightface FaceAnalysis default det_size
DEFAULT_SCORE_THRESHOLD = 0.5  # insightface FaceAnalysis default det_thresh
NMS_IOU_THRESHOLD = 0.4  # insightface SCRFD.nms_thresh
# The most candidates, best first, that suppression considers. Its greedy loop grows with the square
# of their number, and a threshold near 0 (Detect takes any above 0) makes every anchor a
# candidate. Real photos give a handful of candidates per face, so this bound only ever meets such
# thresholds (bench/FINDINGS.md, "suppression bound"; YuNet's TOP_K bounds OpenCV's the same way).
MAX_NMS_CANDIDATES = 2000


def non_max_suppression(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_candidates: int = MAX_NMS_CANDIDATES
) -> list[int]:
    """Indices of the boxes kept, best score first (greedy NMS as in insightface SCRFD.nms), among
    the `max_candidates` best-scored boxes."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1][:max_candidates]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= iou_threshold]
    return keep


def letterbox_scale(image_shape: Sequence[int], input_size: tuple[int, int]) -> float:
    """Scale that fits the image into input_size (w, h) keeping its aspect ratio."""
    height, width = image_shape[:2]
    return min(input_size[0] / width, input_size[1] / height)


def plausible_faces(faces: list[FaceDetection], image_shape: Sequence[int]) -> list[FaceDetection]:
    """Drops detections no real face can produce: non-finite, empty, or outside the image.

    Degenerate inputs (an image shrunk to one pixel row) can make a network emit garbage with
    a high score; a box has to be a box in this image before anything downstream sees it.
    """
    height, width = image_shape[:2]
    kept = []
    for face in faces:
        x1, y1, x2, y2 = face.box
        if not (np.isfinite(face.box).all() and np.isfinite(face.landmarks).all()):
            continue
        if x2 - x1 < 1 or y2 - y1 < 1 or x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            continue
        kept.append(face)
    return kept


class SCRFDDetector:
    """SCRFD (insightface `model_zoo/scrfd.py`): anchor-free distances at strides 8/16/32, on a
    session from create_session."""

    # insightface SCRFD: RGB, (x - 127.5) / 128.
    INPUT_MEAN = 127.5
    INPUT_STD = 128.0

    def __init__(
        self,
        session: ort.InferenceSession,
        input_size=DEFAULT_DETECTION_SIZE,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        fitted_canvas: bool = True,
    ):
        """`fitted_canvas`: run on a canvas the fitted image's size (rounded up to the largest
        stride) instead of insightface's full input_size letterbox, whose padding holds no face
        and cost a third of the detector's time on 4:3 photos (bench/FINDINGS.md, "SCRFD canvas";
        False only to measure that)."""
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        count = len(self.output_names)
        if count not in (6, 9, 10, 15):
            raise ModelFileError(f"not an SCRFD detector: {count} outputs")
        # insightface SCRFD._init_vars: 3 feature maps with 2 anchors, or 5 maps with 1.
        self.feature_maps = 3 if count in (6, 9) else 5
        self.strides = (8, 16, 32) if self.feature_maps == 3 else (8, 16, 32, 64, 128)
        self.anchors_per_cell = 2 if self.feature_maps == 3 else 1
        self.has_landmarks = count in (9, 15)
        if not self.has_landmarks:
            raise ModelFileError("SCRFD model without landmarks (bnkps/kps export needed for alignment)")
        self.output_names = self._ordered_outputs()
        self.input_size: tuple[int, int] = (int(input_size[0]), int(input_size[1]))
        self.score_threshold = score_threshold
        self.fitted_canvas = fitted_canvas
        self._anchor_cache: dict[tuple[int, int, int], np.ndarray] = {}
        self._anchor_lock = threading.Lock()
        self._in_flight = runs_in_flight(session)

    def close(self) -> None:
        self.session = None

    def _ordered_outputs(self) -> list[str]:
        # Exports with named outputs (score_8, bbox_16, ...) are ordered by kind and stride;
        # numeric names keep the graph's own order, which insightface relies on.
        names = self.output_names
        if all(n.split("_")[0] in ("score", "bbox", "kps") for n in names):
            kind_rank = {"score": 0, "bbox": 1, "kps": 2}
            return sorted(names, key=lambda n: (kind_rank[n.split("_")[0]], int(n.split("_")[1])))
        return names

    def _anchor_centres(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        with self._anchor_lock:
            centres = self._anchor_cache.get(key)
            if centres is None:
                rows, cols = np.mgrid[:height, :width]
                grid = np.stack([cols, rows], axis=-1).astype(np.float32)
                centres = (grid * stride).reshape(-1, 2)
                if self.anchors_per_cell > 1:
                    centres = np.repeat(centres, self.anchors_per_cell, axis=0)
                self._anchor_cache[key] = centres
        return centres

    def detect(self, image: np.ndarray, threshold: float | None = None) -> list[FaceDetection]:
        threshold = self.score_threshold if threshold is None else threshold
        scale = letterbox_scale(image.shape, self.input_size)
        new_w, new_h = (max(1, int(round(image.shape[1] * scale))), max(1, int(round(image.shape[0] * scale))))
        canvas_w, canvas_h = self.input_size
        if self.fitted_canvas:
            # Whole strides, so that every feature map's grid covers the canvas exactly.
            stride = self.strides[-1]
            canvas_w = min(canvas_w, -(-new_w // stride) * stride)
            canvas_h = min(canvas_h, -(-new_h // stride) * stride)
        canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
        blob = cv2.dnn.blobFromImage(
            canvas, 1.0 / self.INPUT_STD, (canvas_w, canvas_h), (self.INPUT_MEAN,) * 3, swapRB=True
        )
        with self._in_flight:
            outputs = self.session.run(self.output_names, {self.input_name: blob})
        fm = self.feature_maps
        boxes_all, scores_all, kps_all = [], [], []
        for i, stride in enumerate(self.strides):
            scores = outputs[i].reshape(-1)
            distances = outputs[i + fm].reshape(-1, 4) * stride
            keypoints = outputs[i + 2 * fm].reshape(-1, 10) * stride
            centres = self._anchor_centres(blob.shape[2] // stride, blob.shape[3] // stride, stride)
            keep = np.where(scores >= threshold)[0]
            if keep.size == 0:
                continue
            c = centres[keep]
            d = distances[keep]
            boxes_all.append(
                np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], axis=-1)
            )
            k = keypoints[keep].reshape(-1, 5, 2) + c[:, None, :]
            kps_all.append(k)
            scores_all.append(scores[keep])
        if not scores_all:
            return []
        boxes = np.concatenate(boxes_all) / scale
        keypoints = np.concatenate(kps_all) / scale
        scores = np.concatenate(scores_all)
        faces = []
        for i in non_max_suppression(boxes, scores, NMS_IOU_THRESHOLD):
            x1, y1, x2, y2 = (float(v) for v in boxes[i])
            faces.append(FaceDetection((x1, y1, x2, y2), float(scores[i]), keypoints[i].astype(np.float32)))
        return plausible_faces(faces, image.shape)


class YuNetDetector:
    """YuNet (OpenCV Zoo face_detection_yunet) on onnxruntime, decoded as OpenCV's
    cv2.FaceDetectorYN decodes it (modules/objdetect/src/face_detect.cpp, 4.x): the image padded
    with zeros to whole strides, BGR 0-255, score sqrt(cls * obj) with both clamped to [0, 1],
    boxes and landmarks from the cell's corner, NMSBoxes on the boxes truncated to integers.

    Its sessions serve every thread: FaceDetectorYN instances (one per thread at a time) held
    ~26 MB each for OpenCV's per-layer buffers (bench/FINDINGS.md, "memory (issue 14)", round 2). Images are
    shrunk to fit `input_size` first: YuNet's cost grows with the pixel count and the host sends
    phone-sized photos, while faces that matter for verification stay large enough at 640 px.
    """

    NMS_IOU_THRESHOLD = 0.3  # OpenCV Zoo yunet demo default
    TOP_K = 5000
    STRIDES = (8, 16, 32)
    MIN_INPUT_SIDE = STRIDES[-1]

    def __init__(
        self,
        path: str,
        input_size=DEFAULT_DETECTION_SIZE,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        threads: int | None = None,
    ):
        self.path = path
        self.input_size: tuple[int, int] = (int(input_size[0]), int(input_size[1]))
        self.score_threshold = score_threshold

        def open_session(session_threads: int | None) -> ort.InferenceSession:
            # Fed the image's 8-bit pixels, cast to float inside the graph: the same input as a
            # float blob at a quarter of the bytes the request holds during the Run, and the
            # conversion runs vectorised in onnxruntime (bench/FINDINGS.md, "YuNet's 8-bit input").
            return create_session(path, session_threads, free_dims={2: "height", 3: "width"}, uint8_input=True)

        # Following the load (runtime.follows_the_load): a Run takes one thread, and the detect
        # of a request the process serves alone a second session of the file on the default threads.
        follows_load = follows_the_load(threads)
        self.session: ort.InferenceSession | None = open_session(1 if follows_load else threads)
        self.lone_session: ort.InferenceSession | None = open_session(default_threads()) if follows_load else None
        # One Run at a time on the second session: on more than 2 CPUs, where a lone request's two
        # detects may run at once, the first keeps that session's thread pool to itself and the
        # other runs on the one-thread session rather than splitting it (not measured there).
        self._lone_slot = threading.Lock()
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [f"{kind}_{stride}" for kind in ("cls", "obj", "bbox", "kps") for stride in self.STRIDES]
        missing = set(self.output_names) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise ModelFileError(f"{path} is not a YuNet model: no output {', '.join(sorted(missing))}")
        self._in_flight = detects_in_flight_following_the_load() if follows_load else runs_in_flight(self.session)

    def close(self) -> None:
        self.session = self.lone_session = None

    def detect(self, image: np.ndarray, threshold: float | None = None) -> list[FaceDetection]:
        threshold = self.score_threshold if threshold is None else threshold
        original_shape = image.shape
        scale = min(1.0, letterbox_scale(image.shape, self.input_size))
        if scale < 1.0:
            image = cv2.resize(
                image,
                (max(1, int(round(image.shape[1] * scale))), max(1, int(round(image.shape[0] * scale)))),
                interpolation=cv2.INTER_AREA,
            )
        if min(image.shape[:2]) < self.MIN_INPUT_SIDE:
            return []  # a strip thinner than YuNet's largest stride holds no face it can find
        rows = self._rows(image, threshold)
        faces = []
        for row in rows:
            x, y, w, h = (float(v) / scale for v in row[:4])
            landmarks = (row[4:14].reshape(5, 2) / scale).astype(np.float32)
            faces.append(FaceDetection((x, y, x + w, y + h), float(row[14]), landmarks))
        faces.sort(key=lambda f: f.score, reverse=True)
        return plausible_faces(faces, original_shape)

    def blob(self, image: np.ndarray) -> np.ndarray:
        """The session's input for a BGR image: 1x3xHxW uint8, padded with zeros to whole strides."""
        height, width = image.shape[:2]
        stride = self.STRIDES[-1]
        blob = np.zeros((1, 3, -(-height // stride) * stride, -(-width // stride) * stride), np.uint8)
        blob[0, :, :height, :width] = image.transpose(2, 0, 1)
        return blob

    def _rows(self, image: np.ndarray, threshold: float) -> np.ndarray:
        """FaceDetectorYN.detect's rows: x, y, w, h, 5 landmarks (x, y), score."""
        session = self.session
        if session is None:
            raise RuntimeError("detector closed")
        blob = self.blob(image)
        padded_w = blob.shape[3]
        with self._in_flight:
            run_on, on_lone, lone_session = session, False, self.lone_session
            if lone_session is not None and serving_alone() and self._lone_slot.acquire(blocking=False):
                run_on, on_lone = lone_session, True
            try:
                outputs = dict(zip(self.output_names, run_on.run(self.output_names, {self.input_name: blob})))
            finally:
                if on_lone:
                    self._lone_slot.release()
        found = []
        for stride in self.STRIDES:
            cols = padded_w // stride
            cls = np.clip(outputs[f"cls_{stride}"].reshape(-1), 0.0, 1.0)
            obj = np.clip(outputs[f"obj_{stride}"].reshape(-1), 0.0, 1.0)
            scores = np.sqrt(cls * obj)
            keep = np.flatnonzero(scores >= threshold)
            if keep.size == 0:
                continue
            col = (keep % cols).astype(np.float32)[:, None]
            row = (keep // cols).astype(np.float32)[:, None]
            bbox = outputs[f"bbox_{stride}"].reshape(-1, 4)[keep]
            kps = outputs[f"kps_{stride}"].reshape(-1, 5, 2)[keep]
            centre_x = (col[:, 0] + bbox[:, 0]) * stride
            centre_y = (row[:, 0] + bbox[:, 1]) * stride
            w = np.exp(bbox[:, 2]) * stride
            h = np.exp(bbox[:, 3]) * stride
            landmarks = np.stack([(kps[:, :, 0] + col) * stride, (kps[:, :, 1] + row) * stride], axis=-1)
            found.append(
                np.concatenate(
                    [
                        np.stack([centre_x - w / 2, centre_y - h / 2, w, h], axis=-1),
                        landmarks.reshape(-1, 10),
                        scores[keep, None],
                    ],
                    axis=1,
                ).astype(np.float32)
            )
        if not found:
            return np.zeros((0, 15), np.float32)
        rows = np.concatenate(found)
        if len(rows) == 1:
            return rows
        boxes = [[int(v) for v in box] for box in rows[:, :4]]
        kept = cv2.dnn.NMSBoxes(boxes, rows[:, 14].tolist(), threshold, self.NMS_IOU_THRESHOLD, 1.0, self.TOP_K)
        return rows[np.asarray(kept, dtype=np.int64).reshape(-1)]
