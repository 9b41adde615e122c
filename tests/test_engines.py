"""Engine level (no service, no gRPC): detectors, alignment, recognizers, pack discovery and the
labelled-pair accuracy behind each default threshold, with the real weights in models/ and the
real photos in ../shared/data.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
import types
import unittest
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import cv2
import numpy as np
import onnxruntime as ort

import face_eval
from core.concurrency import serving_request, usable_cpus
from core.errors import ModelFileError, ModelOptionError
from engines import build_engine, cpu_tuning, onnx_graph, parse_load_request
from engines.alignment import ARCFACE_SIZE, ARCFACE_TEMPLATE, align_face, similarity_transform
from engines.base import FaceDetection, FaceEngine
from engines.detection import MAX_NMS_CANDIDATES, SCRFDDetector, YuNetDetector, letterbox_scale, non_max_suppression
from engines.onnx_graph import bytes_field, float_value_info, node_proto, varint_field
from engines.recognition import ArcFaceRecognizer
from engines.runtime import (
    MAX_RUN_BATCH,
    check_batch_dimension,
    create_session,
    default_threads,
    run_batched,
    shrink_shared_arena,
)
from tests import support

YUNET = "face_detection_yunet_2023mar.onnx"
SCRFD = "scrfd_500m_bnkps.onnx"
MOBILEFACENET = "MobileFaceNet.onnx"
GROUP_FACES = 6  # t1.jpg: six people (insightface-wheel-images/SOURCE.md)


def build(name: str, options: Sequence[str], model_path: str | None = None) -> FaceEngine:
    return build_engine(parse_load_request(name, model_path or support.MODELS_DIR, 0, list(options)))


def onnx_direct_options(detector: str, recognizer: str = MOBILEFACENET) -> list[str]:
    return ["engine:onnx_direct", f"detector_onnx:{detector}", f"recognizer_onnx:{recognizer}"]


# (label, LoadModel options) of each detector setup: YuNet, and SCRFD through both engines.
DETECTOR_SETUPS = (
    ("yunet", onnx_direct_options(YUNET)),
    ("scrfd (onnx_direct)", onnx_direct_options(SCRFD)),
    ("scrfd (buffalo_sc)", list(support.INSIGHTFACE_OPTIONS)),
)


def group_photo() -> np.ndarray:
    return support.read_image(support.data_path("insightface-wheel-images", "t1.jpg"))


class DetectorTest(unittest.TestCase):
    """YuNet and SCRFD (through both engines) on the group photo."""

    @classmethod
    def setUpClass(cls):
        for name in (YUNET, SCRFD, MOBILEFACENET):
            support.model_path(name)
        support.engine_setup(support.ENGINE_INSIGHTFACE)
        cls.group = group_photo()
        cls.engines = {label: build(label, options) for label, options in DETECTOR_SETUPS}

    def test_six_faces_on_the_group_photo(self):
        for label, engine in self.engines.items():
            with self.subTest(label):
                faces = engine.detect(self.group)
                self.assertEqual(len(faces), GROUP_FACES, [f.box for f in faces])
                scores = [f.score for f in faces]
                self.assertEqual(scores, sorted(scores, reverse=True), "best score first")
                for face in faces:
                    self.assertGreater(face.width, 20)
                    self.assertGreater(face.height, 20)
                    self.assertTrue(0.0 < face.score <= 1.0)

    def test_elongated_images_find_nothing_without_error(self):
        # Letterboxing a 16x30000 strip rounds one side to zero pixels unless guarded.
        for label, engine in self.engines.items():
            for shape in ((16, 30000, 3), (30000, 16, 3)):
                with self.subTest(label, shape=shape):
                    self.assertEqual(engine.detect(np.zeros(shape, dtype=np.uint8)), [])

    def test_six_faces_are_six_different_places(self):
        for label, engine in self.engines.items():
            with self.subTest(label):
                centres = [((f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2) for f in engine.detect(self.group)]
                for a, b in itertools.combinations(centres, 2):
                    self.assertGreater(np.hypot(a[0] - b[0], a[1] - b[1]), 50, "duplicate detection")

    def test_landmarks_inside_their_box_in_face_order(self):
        for label, engine in self.engines.items():
            for face in engine.detect(self.group):
                with self.subTest(label, box=face.box):
                    x1, y1, x2, y2 = face.box
                    points = face.landmarks
                    self.assertEqual(points.shape, (5, 2))
                    self.assertEqual(points.dtype, np.float32)
                    self.assertTrue(np.all((points[:, 0] >= x1) & (points[:, 0] <= x2)), points)
                    self.assertTrue(np.all((points[:, 1] >= y1) & (points[:, 1] <= y2)), points)
                    left_eye, right_eye, nose, mouth_left, mouth_right = points
                    self.assertLess(left_eye[0], right_eye[0])
                    self.assertLess(mouth_left[0], mouth_right[0])
                    self.assertLess(max(left_eye[1], right_eye[1]), min(mouth_left[1], mouth_right[1]))

    def test_all_detectors_agree_on_where_the_faces_are(self):
        reference = sorted(self.engines["yunet"].detect(self.group), key=lambda f: f.box[0])
        for label in ("scrfd (onnx_direct)", "scrfd (buffalo_sc)"):
            faces = sorted(self.engines[label].detect(self.group), key=lambda f: f.box[0])
            for a, b in zip(reference, faces):
                with self.subTest(label, box=b.box):
                    ix = max(0.0, min(a.box[2], b.box[2]) - max(a.box[0], b.box[0]))
                    iy = max(0.0, min(a.box[3], b.box[3]) - max(a.box[1], b.box[1]))
                    iou = ix * iy / (a.area + b.area - ix * iy)
                    self.assertGreater(iou, 0.5)

    def test_runtime_threshold_overrides_the_default(self):
        for label, engine in self.engines.items():
            with self.subTest(label):
                self.assertEqual(engine.detect(self.group, 0.99), [])
                scores = sorted((f.score for f in engine.detect(self.group)), reverse=True)
                cut = (scores[1] + scores[2]) / 2  # keeps exactly the two best faces
                kept = engine.detect(self.group, cut)
                self.assertEqual(len(kept), 2)
                self.assertTrue(all(f.score >= cut for f in kept))

    def test_a_threshold_near_zero_keeps_suppression_bounded(self):
        # Every anchor of a noise image passes 1e-6; suppression sees only the best-scored bound.
        noise = np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8)
        for label, engine in self.engines.items():
            with self.subTest(label):
                faces = engine.detect(noise, 1e-6)
                limit = YuNetDetector.TOP_K if label == "yunet" else MAX_NMS_CANDIDATES
                self.assertGreater(len(faces), 100)
                self.assertLessEqual(len(faces), limit)

    def test_det_thresh_option_is_honoured(self):
        for label, options in DETECTOR_SETUPS:
            with self.subTest(label):
                strict = build("strict", options + ["det_thresh:0.99"])
                self.assertLess(len(strict.detect(self.group)), GROUP_FACES)
                scores = sorted((f.score for f in self.engines[label].detect(self.group)), reverse=True)
                cut = round((scores[2] + scores[3]) / 2, 6)
                engine = build("cut", options + [f"det_thresh:{cut}"])
                faces = engine.detect(self.group)
                self.assertEqual(len(faces), 3)
                self.assertTrue(all(f.score >= cut for f in faces))
                # An explicit per-call threshold still wins over the option.
                self.assertEqual(len(strict.detect(self.group, scores[-1] - 0.01)), GROUP_FACES)

    def test_det_size_option_is_honoured(self):
        for label, options in DETECTOR_SETUPS:
            for value, size in (("320", (320, 320)), ("320x256", (320, 256)), ("640x640", (640, 640))):
                with self.subTest(label, det_size=value):
                    engine = build("size", options + [f"det_size:{value}"])
                    self.assertEqual(tuple(engine.detector.input_size), size)
                    self.assertEqual(len(engine.detect(self.group)), GROUP_FACES)
            with self.subTest(label, det_size="160"):
                small = build("small", options + ["det_size:160"])
                self.assertLess(len(small.detect(self.group)), GROUP_FACES)  # faces too small at 160 px

    def test_bad_det_options_are_option_errors(self):
        for bad in (
            "det_size:abc",
            "det_size:100",
            "det_size:0",
            "det_size:640x480x3",
            "det_thresh:high",
            "det_thresh:1.5",
        ):
            with self.subTest(bad):
                with self.assertRaises(ModelOptionError):
                    build("bad", onnx_direct_options(YUNET) + [bad])

    def test_onnx_direct_tells_yunet_from_scrfd_by_file(self):
        self.assertIsInstance(self.engines["yunet"].detector, YuNetDetector)
        self.assertIsInstance(self.engines["scrfd (onnx_direct)"].detector, SCRFDDetector)
        self.assertTrue(self.engines["yunet"].name.startswith("face_detection_yunet_2023mar"))
        self.assertTrue(self.engines["scrfd (onnx_direct)"].name.startswith("scrfd_500m_bnkps"))
        # By content, not by name: each detector renamed to the other's kind.
        with tempfile.TemporaryDirectory() as folder:
            fake_scrfd = os.path.join(folder, "scrfd_10g_bnkps.onnx")
            fake_yunet = os.path.join(folder, "yunet.onnx")
            shutil.copy(support.model_path(YUNET), fake_scrfd)
            shutil.copy(support.model_path(SCRFD), fake_yunet)
            yunet = build("renamed", onnx_direct_options(fake_scrfd))  # absolute path
            scrfd = build("renamed", onnx_direct_options(fake_yunet))
            self.assertIsInstance(yunet.detector, YuNetDetector)
            self.assertIsInstance(scrfd.detector, SCRFDDetector)
            self.assertEqual(len(yunet.detect(self.group)), GROUP_FACES)
            self.assertEqual(len(scrfd.detect(self.group)), GROUP_FACES)

    def test_wrong_kind_of_file_is_a_model_file_error(self):
        spoof = support.model_path("MiniFASNetV2.onnx")
        for label, options in (
            ("recognizer as detector", onnx_direct_options(MOBILEFACENET)),
            ("liveness model as detector", onnx_direct_options(spoof)),
            ("detector as recognizer", onnx_direct_options(YUNET, SCRFD)),
            ("liveness model as recognizer", onnx_direct_options(YUNET, spoof)),
        ):
            with self.subTest(label):
                with self.assertRaises(ModelFileError):
                    build("wrong", options)


class NonMaxSuppressionTest(unittest.TestCase):
    def test_only_the_best_scored_candidates_are_considered(self):
        # Disjoint boxes: all of them survive suppression, so the bound alone decides.
        boxes = np.array([[10.0 * i, 0.0, 10.0 * i + 5.0, 5.0] for i in range(50)], np.float32)
        scores = np.random.default_rng(1).permutation(50).astype(np.float32)
        kept = non_max_suppression(boxes, scores, 0.4, max_candidates=20)
        self.assertEqual(kept, list(np.argsort(-scores)[:20]))
        self.assertEqual(len(non_max_suppression(boxes, scores, 0.4)), 50)

    def test_overlapping_boxes_are_suppressed_greedily(self):
        boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
        self.assertEqual(non_max_suppression(boxes, np.array([0.9, 0.8, 0.7], np.float32), 0.4), [0, 2])
        self.assertEqual(non_max_suppression(boxes, np.array([0.8, 0.9, 0.7], np.float32), 0.4), [1, 2])


class YuNetMatchesOpenCVTest(unittest.TestCase):
    """YuNetDetector runs the YuNet file on onnxruntime with its own decoding: on every photo of
    ../shared/data, shrunk as detect() shrinks it, it must find what cv2.FaceDetectorYN finds on
    the same pixels, to a hundredth of a pixel."""

    def test_same_faces_as_face_detector_yn(self):
        path = support.model_path(YUNET)
        photos = sorted(
            os.path.join(folder, name)
            for folder, _, names in os.walk(support.DATA)
            for name in names
            if name.lower().endswith((".jpg", ".jpeg", ".png"))
        )
        self.assertGreater(len(photos), 30)
        faces_seen = 0
        for threshold in (0.5, 0.8):
            detector = YuNetDetector(path, score_threshold=threshold)
            for photo in photos:
                image = support.read_image(photo)
                scale = min(1.0, letterbox_scale(image.shape, detector.input_size))
                if scale < 1.0:
                    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
                    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                opencv = cv2.FaceDetectorYN.create(
                    path, "", (image.shape[1], image.shape[0]), threshold, detector.NMS_IOU_THRESHOLD, detector.TOP_K
                )
                _, expected = opencv.detect(image)
                expected = np.zeros((0, 15), np.float32) if expected is None else expected
                found = detector._rows(image, threshold)
                with self.subTest(photo=os.path.relpath(photo, support.DATA), threshold=threshold):
                    self.assertEqual(len(found), len(expected))
                    order = np.argsort(-expected[:, 14]), np.argsort(-found[:, 14])
                    np.testing.assert_allclose(found[order[1]][:, :14], expected[order[0]][:, :14], atol=0.01)
                    np.testing.assert_allclose(found[order[1]][:, 14], expected[order[0]][:, 14], atol=1e-4)
                faces_seen += len(found)
        self.assertGreater(faces_seen, 50)

    def test_eight_bit_input_gives_the_float_inputs_outputs(self):
        # The detector feeds its session 8-bit pixels (create_session's uint8_input): every output
        # the same, bit for bit, as the file's float input given the same pixels.
        path = support.model_path(YUNET)
        detector = YuNetDetector(path)
        floats = create_session(path, free_dims={2: "height", 3: "width"})
        self.assertEqual(detector.session.get_inputs()[0].type, "tensor(uint8)")
        for name in ("obama_1.jpg", "kit_harington_2.jpg", "multi_two_people.jpg"):
            pixels = detector.blob(support.read_image(support.data_path(support.IMAGES, name)))
            got = detector.session.run(None, {detector.input_name: pixels})
            want = floats.run(None, {floats.get_inputs()[0].name: pixels.astype(np.float32)})
            for got_output, want_output in zip(got, want, strict=True):
                np.testing.assert_array_equal(got_output, want_output)

    def test_thin_strips_find_nothing(self):
        detector = YuNetDetector(support.model_path(YUNET))
        for shape in ((1, 640, 3), (640, 1, 3), (31, 640, 3)):
            self.assertEqual(detector.detect(np.full(shape, 128, np.uint8)), [])


def prelu_model(slopes: Sequence[float], storage: str = "raw", opset: int = 13, slope_fed: bool = False) -> bytes:
    """A serialized ONNX model: y = PRelu(x, slope), x float[1, C, 2, 2], the slope an initializer
    of shape [C, 1, 1] stored as `storage` ("raw" raw_data, "packed" or "unpacked" float_data),
    also listed among the graph inputs when `slope_fed`."""
    values = np.asarray(slopes, "<f4")
    slope = b"".join(varint_field(1, d) for d in (len(slopes), 1, 1)) + varint_field(2, 1) + bytes_field(8, b"slope")
    if storage == "raw":
        slope += bytes_field(9, values.tobytes())
    elif storage == "packed":
        slope += bytes_field(4, values.tobytes())
    else:  # one fixed32 field (number 4, wire type 5) per value
        slope += b"".join(bytes([4 << 3 | 5]) + v.tobytes() for v in values)
    graph = bytes_field(1, node_proto("PRelu", ["x", "slope"], "y")) + bytes_field(2, b"prelu") + bytes_field(5, slope)
    graph += bytes_field(11, float_value_info("x", (1, len(slopes), 2, 2)))
    if slope_fed:
        graph += bytes_field(11, float_value_info("slope", (len(slopes), 1, 1)))
    graph += bytes_field(12, float_value_info("y", (1, len(slopes), 2, 2)))
    return onnx_graph.model(graph, opset)


def conv_proto(inputs: list[str], output: str, group: int = 1, pad: int = 0) -> bytes:
    """A Conv NodeProto with attributes group (INT = 2) and pads (INTS = 7, values in field 8)."""
    group_attribute = bytes_field(1, b"group") + varint_field(3, group) + varint_field(20, 2)
    pads = bytes_field(1, b"pads") + b"".join(varint_field(8, pad) for _ in range(4)) + varint_field(20, 7)
    return node_proto("Conv", inputs, output) + bytes_field(5, group_attribute) + bytes_field(5, pads)


def weights_field(name: str, values: np.ndarray) -> bytes:
    return bytes_field(5, onnx_graph.float_tensor(name, values.astype(np.float32)))


def pruned_block(channels: int = 13, output_at: str = "y") -> bytes:
    """A MiniFASNet-like block with `channels` (not a whole NCHWc block) in its middle:
    x[1,3,6,6] -> Conv 3->C -> PRelu -> depthwise 3x3 Conv -> Add (residual) -> squeeze-excite
    (GlobalAveragePool, Conv C->4, Relu, Conv 4->C, Sigmoid, Mul) -> Conv C->8 -> y. `output_at`
    names the graph's output: "y", or "mid" to expose the C-channel tensor too."""
    rng = np.random.default_rng(7)

    def weights(name: str, *shape: int) -> bytes:
        return weights_field(name, rng.normal(0, 0.5, shape))

    c = channels
    nodes = [
        conv_proto(["x", "w1", "b1"], "a"),
        node_proto("PRelu", ["a", "slope"], "p"),
        conv_proto(["p", "w_dw", "b_dw"], "d", group=c, pad=1),
        node_proto("Add", ["d", "p"], "mid"),
        node_proto("GlobalAveragePool", ["mid"], "pooled"),
        conv_proto(["pooled", "w_sq"], "sq"),
        node_proto("Relu", ["sq"], "sq_relu"),
        conv_proto(["sq_relu", "w_ex", "b_ex"], "ex"),
        node_proto("Sigmoid", ["ex"], "gate"),
        node_proto("Mul", ["mid", "gate"], "excited"),
        conv_proto(["excited", "w_out"], "y"),
    ]
    graph = b"".join(bytes_field(1, node) for node in nodes) + bytes_field(2, b"block")
    graph += weights("w1", c, 3, 1, 1) + weights("b1", c) + weights("slope", c, 1, 1)
    graph += weights("w_dw", c, 1, 3, 3) + weights("b_dw", c) + weights("w_sq", 4, c, 1, 1)
    graph += weights("w_ex", c, 4, 1, 1) + weights("b_ex", c) + weights("w_out", 8, c, 1, 1)
    graph += bytes_field(11, float_value_info("x", (1, 3, 6, 6)))
    graph += bytes_field(12, float_value_info("y", (1, 8, 6, 6)))
    if output_at == "mid":
        graph += bytes_field(12, float_value_info("mid", (1, c, 6, 6)))
    graph += bytes_field(13, float_value_info("a", (1, c, 6, 6)))  # a declared shape the padding changes
    return onnx_graph.model(graph)


def conv_then(after: list[bytes], extra: bytes = b"", slopes: np.ndarray | None = None, w_fields: bytes = b"") -> bytes:
    """x[1,3,6,6] -> Conv 3->13 ("a", weights "w", with `w_fields` added to its TensorProto) ->
    the nodes `after`, which end in y[1,8,6,6] ("w_out" is a 13->8 weight, "slope" 13 PRelu
    slopes); `extra` adds graph fields."""
    rng = np.random.default_rng(11)
    graph = bytes_field(1, conv_proto(["x", "w"], "a")) + b"".join(bytes_field(1, node) for node in after)
    w = onnx_graph.float_tensor("w", rng.normal(size=(13, 3, 1, 1)).astype(np.float32)) + w_fields
    graph += bytes_field(5, w) + weights_field("w_out", rng.normal(size=(8, 13, 1, 1)))
    graph += weights_field("slope", np.full((13, 1, 1), 0.25) if slopes is None else slopes)
    graph += bytes_field(11, float_value_info("x", (1, 3, 6, 6))) + bytes_field(12, float_value_info("y", (1, 8, 6, 6)))
    return onnx_graph.model(graph + extra)


def graph_items(model: bytes, number: int) -> list[bytes]:
    """The GraphProto fields `number` of a model (1: nodes, 5: initializers, 13: value_info)."""
    graph = onnx_graph.graph_field(model)
    assert graph is not None
    return [bytes(p) for n, _, _, p in onnx_graph.fields(graph) if n == number]


def op_types(model: bytes) -> list[str]:
    return ["".join(onnx_graph.strings(node, 4)) for node in graph_items(model, 1)]


def weight_dims(model: bytes) -> dict[str, tuple[int, ...]]:
    return {onnx_graph.tensor_name(t): onnx_graph.tensor_dims(t) for t in graph_items(model, 5)}


def run_model(model: bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # a fed slope's warning that it is not a constant
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, feed)


def add_model(weight: bytes) -> bytes:
    """y = x + w for x[1], with the serialized TensorProto `weight` as w."""
    graph = bytes_field(1, node_proto("Add", ["x", "w"], "y")) + bytes_field(5, weight)
    graph += bytes_field(11, float_value_info("x", (1,))) + bytes_field(12, float_value_info("y", (1,)))
    return onnx_graph.model(graph)


def external_weight(location: str) -> bytes:
    """A float TensorProto "w" of dims [1] whose data is the first 4 bytes of file `location`."""
    entry = bytes_field(1, b"location") + bytes_field(2, location.encode())
    return varint_field(1, 1) + varint_field(2, 1) + bytes_field(8, b"w") + bytes_field(13, entry) + varint_field(14, 1)


class SessionSharingTest(unittest.TestCase):
    """create_session hands out the live session of an unchanged, self-contained file with the
    same settings (engines.runtime), and never one whose file names weights kept elsewhere."""

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)  # a new inode, as a deploy would put it
        return path

    def setUp(self) -> None:
        self.directory = support.temp_dir(self)
        self.enterContext(support.files_settled_at_once())

    def test_a_copy_over_the_file_keeping_its_timestamps_is_not_shared(self) -> None:
        # `cp -p` onto the old file: same inode, size and mtime; only its change time tells.
        path = self.write("add.onnx", add_model(onnx_graph.float_tensor("w", np.ones(1, np.float32))))
        first = create_session(path, 1)
        mtime_ns = os.stat(path).st_mtime_ns
        time.sleep(0.05)  # past a tick of the clock that stamps change times, as any later copy is
        with open(path, "r+b") as f:
            f.write(add_model(onnx_graph.float_tensor("w", np.full(1, 2.0, np.float32))))
        os.utime(path, ns=(mtime_ns, mtime_ns))
        second = create_session(path, 1)
        self.assertIsNot(second, first)
        self.assertEqual(second.run(None, {"x": np.zeros(1, np.float32)})[0][0], 2.0)

    def test_an_unchanged_file_is_shared_and_a_changed_one_is_not(self) -> None:
        path = self.write("add.onnx", add_model(onnx_graph.float_tensor("w", np.ones(1, np.float32))))
        first = create_session(path, 1)
        self.assertIs(create_session(path, 1), first)
        self.assertIsNot(create_session(path, 2), first)
        self.write("add.onnx", add_model(onnx_graph.float_tensor("w", np.full(1, 2.0, np.float32))))
        second = create_session(path, 1)
        self.assertIsNot(second, first)
        self.assertEqual(second.run(None, {"x": np.zeros(1, np.float32)})[0][0], 2.0)

    def test_an_eight_bit_input_is_cast_inside_the_graph_in_a_session_of_its_own(self) -> None:
        path = self.write("add.onnx", add_model(onnx_graph.float_tensor("w", np.full(1, 0.5, np.float32))))
        plain = create_session(path, 1)
        eight_bit = create_session(path, 1, uint8_input=True)
        self.assertIsNot(eight_bit, plain)
        self.assertIs(create_session(path, 1, uint8_input=True), eight_bit)
        (given,) = eight_bit.get_inputs()
        self.assertEqual((given.name, given.type, given.shape), ("x_uint8", "tensor(uint8)", [1]))
        for value in (0, 1, 127, 255):
            got = eight_bit.run(None, {"x_uint8": np.full(1, value, np.uint8)})[0]
            self.assertEqual(got.dtype, np.float32)
            self.assertEqual(got[0], plain.run(None, {"x": np.full(1, value, np.float32)})[0][0])

    def test_an_eight_bit_input_takes_free_names_and_only_a_float_input(self) -> None:
        # A tensor already called x_uint8 and a node called x_as_float: the new input and the Cast
        # node take the next free names.
        graph = bytes_field(1, node_proto("Add", ["x", "w"], "x_uint8", name="x_as_float"))
        graph += bytes_field(1, node_proto("Neg", ["x_uint8"], "y"))
        graph += bytes_field(5, onnx_graph.float_tensor("w", np.full(1, 0.5, np.float32)))
        graph += bytes_field(11, float_value_info("x", (1,))) + bytes_field(12, float_value_info("y", (1,)))
        path = self.write("clash.onnx", onnx_graph.model(graph))
        session = create_session(path, 1, uint8_input=True)
        self.assertEqual(session.get_inputs()[0].name, "x_uint8_")
        self.assertEqual(session.run(None, {"x_uint8_": np.full(1, 3, np.uint8)})[0][0], -3.5)
        untyped = bytes_field(1, node_proto("Identity", ["x"], "y")) + bytes_field(11, bytes_field(1, b"x"))
        untyped += bytes_field(12, float_value_info("y", (1,)))
        eight_bit = onnx_graph.with_uint8_input(onnx_graph.identity_model(), "x")
        cases = {
            "eight_bit.onnx": (eight_bit, "x_uint8 is not a float tensor"),
            "untyped.onnx": (onnx_graph.model(untyped), "x is not a tensor input of the graph"),
        }
        for name, (model, reason) in cases.items():
            with self.subTest(name):
                path = self.write(name, model)
                with self.assertRaises(ModelFileError) as caught:
                    create_session(path, 1, uint8_input=True)
                self.assertEqual(str(caught.exception), f"cannot load ONNX model {path} with 8-bit input: {reason}")

    def test_weights_in_another_file_are_read_again(self) -> None:
        path = self.write("add.onnx", add_model(external_weight("w.bin")))
        with open(path, "rb") as f:
            self.assertTrue(onnx_graph.names_external_data(f.read()))
        zero = {"x": np.zeros(1, np.float32)}
        self.write("w.bin", np.ones(1, np.float32).tobytes())
        first = create_session(path, 1)
        self.assertEqual(first.run(None, zero)[0][0], 1.0)
        self.write("w.bin", np.full(1, 2.0, np.float32).tobytes())  # the .onnx itself unchanged
        second = create_session(path, 1)
        self.assertIsNot(second, first)
        self.assertEqual(second.run(None, zero)[0][0], 2.0)


@unittest.skipUnless(cpu_tuning.nchwc_block(), "onnxruntime has no blocked layout on this CPU")
class CpuTuningTest(unittest.TestCase):
    """create_session runs every graph as cpu_tuning rewrites it: PRelu as Relu + Mul + Add after a
    float convolution and as Max(x, slope * x) elsewhere, the same values; channels padded to whole
    NCHWc blocks where they are not, the same outputs up to the order of summation."""

    def test_the_catalog_models_give_the_same_outputs(self):
        real_crop = support.read_image(support.data_path(support.IMAGES, "obama_1.jpg"))
        block = cpu_tuning.nchwc_block()
        # (file, input side, pixel scale, whether channels get padded) of every catalog model the
        # rewrite changes.
        for name, side, scale, padded in (
            ("MiniFASNetV2.onnx", 80, 1.0, True),
            ("MiniFASNetV1SE.onnx", 80, 1.0, True),
            ("antispoof-celeba-minifas-97.80.onnx", 128, 1 / 255, True),
            (os.path.join("buffalo_sc", "w600k_mbf.onnx"), 112, 1 / 127.5, False),
            # int8 convolutions with float PRelu between them: the Max form
            ("facial_expression_recognition_mobilefacenet_2022july_int8.onnx", 112, 1 / 255, False),
        ):
            with self.subTest(model=name):
                path = support.model_path(name)
                with open(path, "rb") as f:
                    original = f.read()
                edited = cpu_tuning.tuned_for_cpu(original)
                self.assertIn("PRelu", op_types(original))
                self.assertNotIn("PRelu", op_types(edited))
                dims = weight_dims(edited)
                convs = [
                    onnx_graph.strings(n, 1)[1] for n in graph_items(edited, 1) if onnx_graph.strings(n, 4) == ["Conv"]
                ]
                odd = [dims[w][0] for w in convs if w in dims and dims[w][0] % block]
                self.assertEqual(odd, [], "convolutions left with channels off the block")
                crop = cv2.resize(real_crop, (side, side)).transpose(2, 0, 1)[None].astype(np.float32) * scale
                reference = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                feed = {reference.get_inputs()[0].name: crop}
                expected = reference.run(None, feed)[0]
                got = create_session(path, threads=1).run(None, feed)[0]
                if padded:
                    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
                else:
                    np.testing.assert_array_equal(got, expected)

    def test_prelu_after_a_convolution_is_exact_for_any_finite_slope(self):
        rng = np.random.default_rng(3)
        slopes = np.array([0.25, -0.5, 1.5, 0.0] * 4, np.float32).reshape(16, 1, 1)
        weights = rng.normal(size=(16, 3, 1, 1)).astype(np.float32)

        def conv_and(activation: bytes) -> bytes:
            graph = bytes_field(1, conv_proto(["x", "w"], "a")) + bytes_field(1, activation)
            graph += weights_field("w", weights) + weights_field("slope", slopes)
            graph += bytes_field(11, float_value_info("x", (1, 3, 6, 6)))
            return onnx_graph.model(graph + bytes_field(12, float_value_info("y", (1, 16, 6, 6))))

        model = conv_and(node_proto("PRelu", ["a", "slope"], "y"))
        edited = cpu_tuning.tuned_for_cpu(model)
        self.assertEqual(op_types(edited), ["Conv", "Relu", "Mul", "Relu", "Mul", "Add"])
        x = rng.normal(size=(1, 3, 6, 6)).astype(np.float32)
        a = run_model(conv_and(node_proto("Identity", ["a"], "y")), {"x": x})[0]
        self.assertTrue((a < 0).any() and (a > 0).any())
        np.testing.assert_array_equal(run_model(edited, {"x": x})[0], np.where(a > 0, a, a * slopes))

    def test_the_new_nodes_take_names_no_node_has(self):
        # onnxruntime refuses a graph with two nodes of one name; the PRelu's parts are named
        # after it, and a node may already carry such a name.
        slopes = np.array([0.25, -0.5, 1.5, 0.0] * 4, np.float32).reshape(16, 1, 1)
        weights = np.random.default_rng(5).normal(size=(16, 3, 1, 1)).astype(np.float32)
        graph = bytes_field(1, conv_proto(["x", "w"], "a"))
        graph += bytes_field(1, node_proto("PRelu", ["a", "slope"], "b", "p"))
        graph += bytes_field(1, node_proto("Identity", ["b"], "y", "p/positive"))
        graph += weights_field("w", weights) + weights_field("slope", slopes)
        graph += bytes_field(11, float_value_info("x", (1, 3, 6, 6)))
        model = onnx_graph.model(graph + bytes_field(12, float_value_info("y", (1, 16, 6, 6))))
        edited = cpu_tuning.tuned_for_cpu(model)
        self.assertNotIn("PRelu", op_types(edited))
        names = ["".join(onnx_graph.strings(node, 3)) for node in graph_items(edited, 1)]
        self.assertEqual(len(names), len(set(names)), names)
        x = np.random.default_rng(6).normal(size=(1, 3, 6, 6)).astype(np.float32)
        np.testing.assert_array_equal(run_model(edited, {"x": x})[0], run_model(model, {"x": x})[0])

    def test_channels_are_padded_to_whole_blocks(self):
        x = np.random.default_rng(4).normal(size=(1, 3, 6, 6)).astype(np.float32)
        model = pruned_block(channels=13)
        edited = cpu_tuning.tuned_for_cpu(model)
        block = 16  # 13 up to a whole block of 8 (AVX2) or 16 (AVX-512)
        dims = weight_dims(edited)
        # Made: zero filters; read: zero weights; the squeeze's 4 channels stay (below a block).
        self.assertEqual(dims["w1"], (block, 3, 1, 1))
        self.assertEqual(dims["b1"], (block,))
        self.assertEqual(dims["w_dw"], (block, 1, 3, 3))
        self.assertEqual(dims["w_sq"], (4, block, 1, 1))
        self.assertEqual(dims["w_ex"], (block, 4, 1, 1))
        self.assertEqual(dims["w_out"], (8, block, 1, 1))
        depthwise = next(node for node in graph_items(edited, 1) if onnx_graph.strings(node, 2) == ["d"])
        self.assertEqual(onnx_graph.int_attribute(depthwise, "group"), block)
        self.assertEqual([onnx_graph.value_info_name(v) for v in graph_items(edited, 13)], [])  # "a" is 16 wide now
        np.testing.assert_allclose(run_model(edited, {"x": x})[0], run_model(model, {"x": x})[0], rtol=1e-5, atol=1e-6)

    def test_what_cannot_follow_a_padding_keeps_its_channels(self):
        x = np.random.default_rng(5).normal(size=(1, 3, 6, 6)).astype(np.float32)
        dense_out = conv_proto(["p", "w_out"], "y")
        then_branch = bytes_field(1, node_proto("Identity", ["p"], "t")) + bytes_field(2, b"then")
        then_branch += bytes_field(12, float_value_info("t", (1, 13, 6, 6)))
        subgraph_reader = node_proto("If", ["cond"], "z") + bytes_field(
            5, bytes_field(1, b"then_branch") + bytes_field(6, then_branch) + varint_field(20, 5)
        )
        cases = {
            # a caller sees the 13 channels
            "graph output": conv_then(
                [node_proto("Relu", ["a"], "p"), dense_out], bytes_field(12, float_value_info("p", (1, 13, 6, 6)))
            ),
            # Flatten is not channelwise
            "other consumer": conv_then(
                [node_proto("Flatten", ["a"], "f"), node_proto("Relu", ["a"], "p"), dense_out],
                bytes_field(12, float_value_info("f", (1, 468))),
            ),
            # the same weights in two convolutions
            "shared weights": conv_then([conv_proto(["x", "w"], "a2"), node_proto("Add", ["a", "a2"], "p"), dense_out]),
            # a Mul by a constant that is not per channel
            "not per channel": conv_then(
                [node_proto("Mul", ["a", "spatial"], "p"), dense_out], weights_field("spatial", np.ones((1, 1, 6, 6)))
            ),
        }
        for case, model in cases.items():
            with self.subTest(case):
                edited = cpu_tuning.tuned_for_cpu(model)
                self.assertEqual(weight_dims(edited)["w"], (13, 3, 1, 1))
        # Left as they are, PRelu included: a subgraph may read any tensor by name; external data
        # would not be found from an edited copy.
        prelu = [node_proto("PRelu", ["a", "slope"], "p"), dense_out]
        # data_location = 14, EXTERNAL = 1
        for case, model in (
            ("subgraph", conv_then(prelu, bytes_field(1, subgraph_reader))),
            ("external data", conv_then(prelu, w_fields=varint_field(14, 1))),
        ):
            with self.subTest(case):
                self.assertIs(cpu_tuning.tuned_for_cpu(model), model)
        # Not padded, still the same outputs: a slope that is not finite, and one shared by two PRelus.
        nan_slopes = np.full((13, 1, 1), 0.25)
        nan_slopes[3] = np.nan
        shared = conv_then(
            [node_proto("PRelu", ["a", "slope"], "p1"), node_proto("PRelu", ["p1", "slope"], "p"), dense_out]
        )
        for case, model in (
            ("NaN slope", conv_then([node_proto("PRelu", ["a", "slope"], "p"), dense_out], slopes=nan_slopes)),
            ("shared slope", shared),
        ):
            with self.subTest(case):
                edited = cpu_tuning.tuned_for_cpu(model)
                np.testing.assert_allclose(
                    run_model(edited, {"x": x})[0], run_model(model, {"x": x})[0], rtol=1e-5, atol=1e-6
                )
                if case == "NaN slope":
                    self.assertIn("PRelu", op_types(edited))

    def test_prelu_elsewhere_needs_constant_slopes_up_to_one(self):
        x = np.array([-2.0, -0.5, 0.0, 3.0] * 2, np.float32).reshape(1, 2, 2, 2)
        cases = (
            (dict(slopes=(0.25, 1.0)), True),
            (dict(slopes=(-0.5, 0.1)), True),
            (dict(slopes=(0.25, 0.5), storage="packed"), True),
            (dict(slopes=(0.25, 0.5), storage="unpacked"), True),
            (dict(slopes=(0.25, 1.5)), False),  # Max(x, 1.5 x) is not PRelu
            (dict(slopes=(0.25, float("nan"))), False),
            (dict(slopes=(0.25, 0.5), slope_fed=True), False),  # a caller may feed another slope
            (dict(slopes=(0.25, 0.5), opset=6), False),  # Mul without numpy broadcasting
        )
        for case, rewritten in cases:
            with self.subTest(**case):
                model = prelu_model(**case)
                edited = cpu_tuning.tuned_for_cpu(model)
                self.assertEqual(edited is not model, rewritten)
                self.assertEqual("PRelu" not in op_types(edited), rewritten)
                if case.get("opset", 13) < 7 or any(np.isnan(case["slopes"])):
                    continue
                slopes = np.asarray(case["slopes"], np.float32).reshape(1, 2, 1, 1)
                np.testing.assert_array_equal(run_model(edited, {"x": x})[0], np.where(x > 0, x, x * slopes))

    def test_a_file_that_does_not_parse_comes_back_unchanged(self):
        with open(support.model_path("MiniFASNetV2.onnx"), "rb") as f:
            truncated = f.read()[:500_000]
        for data in (b"", b"\xff\xff\xff", b"not an onnx file at all, PRelu", truncated):
            self.assertIs(cpu_tuning.tuned_for_cpu(data), data)

    def test_a_truncated_file_is_a_model_file_error_naming_it(self):
        folder = support.temp_dir(self)
        for name, free_dims in (("MiniFASNetV2.onnx", None), ("face_detection_yunet_2023mar.onnx", {2: "h", 3: "w"})):
            with self.subTest(name):
                path = os.path.join(folder, name)
                with open(support.model_path(name), "rb") as f, open(path, "wb") as out:
                    out.write(f.read()[: os.path.getsize(support.model_path(name)) // 2])
                with self.assertRaises(ModelFileError) as caught:
                    create_session(path, free_dims=free_dims)
                self.assertIn(path, str(caught.exception))
                self.assertNotIn("/proc/self/fd", str(caught.exception))
                self.assertNotIn("exported pointers", str(caught.exception))


class DetectionsInFlightTest(unittest.TestCase):
    """A detector runs at most as many Runs at once as its threads fill the usable CPUs with (one
    that follows the load: one per two CPUs): more only share the same cores while each holds its
    tensors."""

    class CountingSession:
        """The session's run, counting the calls in flight at once."""

        def __init__(self, session) -> None:
            self.session = session
            self.lock = threading.Lock()
            self.now = self.most = 0

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, *args, **kwargs):
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            try:
                time.sleep(0.02)
                return self.session.run(*args, **kwargs)
            finally:
                with self.lock:
                    self.now -= 1

    def most_at_once(self, detector) -> int:
        counting = self.CountingSession(detector.session)
        detector.session = counting
        image = cv2.resize(support.read_image(support.data_path(support.IMAGES, "obama_1.jpg")), (320, 240))
        with ThreadPoolExecutor(max_workers=usable_cpus() + 2) as pool:
            found = list(pool.map(lambda _: detector.detect(image), range(4 * usable_cpus() + 8)))
        self.assertTrue(all(len(faces) == 1 for faces in found))
        return counting.most

    def test_yunet(self) -> None:
        for threads in (1, 2):
            with self.subTest(threads=threads):
                detector = YuNetDetector(support.model_path(YUNET), threads=threads)
                self.assertEqual(self.most_at_once(detector), max(1, usable_cpus() // threads))

    def test_yunet_without_a_grant_one_per_two_cpus(self) -> None:
        detector = YuNetDetector(support.model_path(YUNET))
        with serving_request(), serving_request():  # another request served: one-thread Runs
            self.assertEqual(self.most_at_once(detector), max(1, usable_cpus() // 2))

    def test_scrfd(self) -> None:
        for threads in (1, 2):
            with self.subTest(threads=threads):
                detector = SCRFDDetector(create_session(support.model_path(SCRFD), threads=threads))
                self.assertEqual(self.most_at_once(detector), max(1, usable_cpus() // threads))


class ThreadsFollowTheLoadTest(unittest.TestCase):
    """Without a grant from the host (ModelOptions.Threads 0) YuNet and a recognizer that adds the
    flipped crop run one thread per Run while the process serves other requests too, and use more
    cores for a request it serves alone: the detector a twin session, the flipped crop's Run a
    helper beside the crop's. The answers are the same either way."""

    class RecordingSession:
        """A session whose Runs note their thread; with a barrier to `meet` at, its first two Runs
        wait there (for each other, or for another session's: proving they run at the same time)."""

        def __init__(self, session, meet: threading.Barrier | None = None) -> None:
            self.session = session
            self.threads: list[threading.Thread] = []
            self.meet = meet

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, *args, **kwargs):
            self.threads.append(threading.current_thread())
            if self.meet is not None and len(self.threads) <= 2:
                self.meet.wait()
            return self.session.run(*args, **kwargs)

    @classmethod
    def setUpClass(cls):
        cls.engine = build("yunet", onnx_direct_options(YUNET))
        cls.image = support.read_image(support.data_path(support.IMAGES, "obama_1.jpg"))

    @classmethod
    def tearDownClass(cls):
        cls.engine.close()

    def replace(self, owner, name: str, value) -> None:
        saved = getattr(owner, name)
        setattr(owner, name, value)
        self.addCleanup(setattr, owner, name, saved)

    def test_the_detector_runs_its_twin_alone_and_one_thread_under_load(self):
        detector = self.engine.detector
        self.assertEqual(detector.session.get_session_options().intra_op_num_threads, 1)
        if default_threads() == 1:  # one usable CPU: nothing to spread a Run over
            self.assertIsNone(detector.lone_session)
            return
        self.assertEqual(detector.lone_session.get_session_options().intra_op_num_threads, default_threads())
        one_thread, lone = self.RecordingSession(detector.session), self.RecordingSession(detector.lone_session)
        self.replace(detector, "session", one_thread)
        self.replace(detector, "lone_session", lone)
        with serving_request():
            alone = detector.detect(self.image)
        self.assertEqual((len(one_thread.threads), len(lone.threads)), (0, 1))
        with serving_request(), serving_request():
            loaded = detector.detect(self.image)
        self.assertEqual((len(one_thread.threads), len(lone.threads)), (1, 1))
        self.assertEqual(len(alone), 1)
        self.assertEqual([(f.box, f.score) for f in alone], [(f.box, f.score) for f in loaded])
        np.testing.assert_array_equal(alone[0].landmarks, loaded[0].landmarks)

    def test_beyond_two_cpus_a_lone_requests_second_detect_takes_the_one_thread_session(self):
        with mock.patch("engines.runtime.usable_cpus", return_value=4):
            detector = YuNetDetector(support.model_path(YUNET))
        self.assertEqual(detector.lone_session.get_session_options().intra_op_num_threads, 4)
        meet = threading.Barrier(2, timeout=10)  # the two detects run at once, two per four CPUs
        one_thread = self.RecordingSession(detector.session, meet)
        lone = self.RecordingSession(detector.lone_session, meet)
        detector.session, detector.lone_session = one_thread, lone
        with serving_request(), ThreadPoolExecutor(max_workers=2) as pool:
            found = list(pool.map(lambda _: detector.detect(self.image), range(2)))
        self.assertEqual((len(one_thread.threads), len(lone.threads)), (1, 1))
        self.assertEqual([len(faces) for faces in found], [1, 1])
        one_thread.meet = lone.meet = None
        with serving_request():  # the second session is free again
            detector.detect(self.image)
        self.assertEqual((len(one_thread.threads), len(lone.threads)), (1, 2))

    def test_the_flipped_crop_runs_beside_the_crop_alone_and_after_it_under_load(self):
        recognizer = self.engine.recognizer
        self.assertEqual(recognizer.session.get_session_options().intra_op_num_threads, 1)
        self.assertEqual(recognizer.runs_flip_beside, usable_cpus() > 1)
        if not recognizer.runs_flip_beside:
            return
        face = self.engine.detect(self.image)[0]
        beside = self.RecordingSession(recognizer.session, threading.Barrier(2, timeout=10))
        self.replace(recognizer, "session", beside)
        with serving_request():
            alone = recognizer.embed(self.image, face)
        here = threading.current_thread()
        self.assertEqual(len(beside.threads), 2)
        self.assertIn(here, beside.threads)
        self.assertTrue(any(t is not here for t in beside.threads), "both crops ran on the request's thread")
        after = self.RecordingSession(recognizer.session.session)
        recognizer.session = after
        with serving_request(), serving_request():
            loaded = recognizer.embed(self.image, face)
        self.assertEqual(after.threads, [here, here])
        np.testing.assert_array_equal(alone, loaded)
        # The same bytes as the recognizer on the default threads, one Run after the other.
        default = ArcFaceRecognizer(create_session(support.model_path(MOBILEFACENET)), recognizer.profile)
        np.testing.assert_array_equal(alone, default.embed(self.image, face))

    def test_a_grant_makes_sessions_of_the_granted_threads(self):
        for threads in (1, 2):
            with self.subTest(threads=threads):
                engine = build_engine(
                    parse_load_request("yunet", support.MODELS_DIR, threads, onnx_direct_options(YUNET))
                )
                self.addCleanup(engine.close)
                granted = min(threads, usable_cpus())
                self.assertIsNone(engine.detector.lone_session)
                self.assertEqual(engine.detector.session.get_session_options().intra_op_num_threads, granted)
                self.assertFalse(engine.recognizer.runs_flip_beside)
                self.assertEqual(engine.recognizer.session.get_session_options().intra_op_num_threads, granted)

    def test_a_recognizer_without_the_flip_keeps_the_default_threads(self):
        engine = build("buffalo_sc", list(support.INSIGHTFACE_OPTIONS))
        self.addCleanup(engine.close)
        self.assertFalse(engine.recognizer.profile.flip)
        self.assertFalse(engine.recognizer.runs_flip_beside)
        self.assertEqual(engine.recognizer.session.get_session_options().intra_op_num_threads, default_threads())


class SharedArenaTest(unittest.TestCase):
    def test_shrink_hands_the_arenas_free_blocks_back(self):
        from core.process import malloc_usage

        if not malloc_usage():
            self.skipTest("malloc_usage needs glibc's mallinfo2")
        detector = YuNetDetector(support.model_path(YUNET))
        image = cv2.resize(support.read_image(support.data_path(support.IMAGES, "obama_1.jpg")), (640, 480))
        # YuNet's tensors at 640x480 take ~10 MB of arena blocks, free once its Run is over. The
        # idle return of a service another test left loaded may shrink the arena between the
        # detect and the reading: one of three tries sees the blocks whole.
        for _ in range(3):
            self.assertEqual(len(detector.detect(image)), 1)  # the arena grows again as needed
            before = malloc_usage()["heap_in_use"]
            shrink_shared_arena()
            freed = before - malloc_usage()["heap_in_use"]
            if freed > 4 * 2**20:
                break
        self.assertGreater(freed, 4 * 2**20)


class RunBatchedTest(unittest.TestCase):
    """One helper runs every model on a batch of faces, whatever batch its export accepts."""

    def check_against_one_by_one(self, file_name: str, faces: int) -> list[int]:
        session = create_session(support.model_path(file_name), threads=1)
        shape = [faces] + [d for d in session.get_inputs()[0].shape[1:]]
        blob = np.random.default_rng(faces).uniform(0, 1, shape).astype(np.float32)
        batch_sizes = []
        real_run = session.run

        def recording_run(names, feeds):
            batch_sizes.append(len(next(iter(feeds.values()))))
            return real_run(names, feeds)

        session.run = recording_run
        together = run_batched(session, blob)
        session.run = real_run
        one_by_one = np.concatenate([run_batched(session, blob[i : i + 1]) for i in range(faces)])
        np.testing.assert_allclose(together, one_by_one, rtol=1e-4, atol=1e-5)
        self.assertEqual(sum(batch_sizes), faces)
        return batch_sizes

    def test_dynamic_batch_export_runs_in_bounded_batches(self):
        # gender-v1.onnx takes any batch; 20 faces go in Runs of at most MAX_RUN_BATCH.
        sizes = self.check_against_one_by_one("gender-v1.onnx", 20)
        self.assertEqual(sizes, [min(MAX_RUN_BATCH, 20 - start) for start in range(0, 20, MAX_RUN_BATCH)])

    def test_batch_dimension_any_one_or_refused(self):
        # What every batched model (recognizer, attribute heads, MiniFASNet) checks when it loads.
        def session_with_batch(batch):
            model_input = types.SimpleNamespace(name="input", shape=[batch, 3, 112, 112])
            return types.SimpleNamespace(get_inputs=lambda: [model_input])

        self.assertTrue(check_batch_dimension(session_with_batch("N"), "model.onnx"))
        self.assertTrue(check_batch_dimension(session_with_batch(None), "model.onnx"))
        self.assertFalse(check_batch_dimension(session_with_batch(1), "model.onnx"))
        with self.assertRaisesRegex(ModelFileError, r"model\.onnx: fixed batch size 4"):
            check_batch_dimension(session_with_batch(4), "model.onnx")

    def test_fixed_batch_export_runs_one_face_at_a_time(self):
        self.assertEqual(self.check_against_one_by_one(MOBILEFACENET, 3), [1, 1, 1])


class RecognizerTest(unittest.TestCase):
    """Alignment and embeddings of both recognizers (w600k_mbf 512-d, MobileFaceNet 128-d)."""

    @classmethod
    def setUpClass(cls):
        cls.engines = {}
        for kind in support.ENGINES:
            name, options = support.engine_setup(kind)
            cls.engines[kind] = build(name, options)
        cls.group = group_photo()

    def test_embeddings_are_unit_length_with_the_right_dimension(self):
        for kind, engine in self.engines.items():
            with self.subTest(kind):
                self.assertEqual(engine.embedding_dim, support.EMBEDDING_DIM[kind])
                faces = engine.detect(self.group)
                vectors = np.stack([engine.embed(self.group, f) for f in faces])
                self.assertEqual(vectors.shape, (GROUP_FACES, support.EMBEDDING_DIM[kind]))
                self.assertEqual(vectors.dtype, np.float32)
                self.assertTrue(np.all(np.isfinite(vectors)))
                np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
                # Six different people: no two of them close, none identical.
                similarity = vectors @ vectors.T
                off_diagonal = similarity[~np.eye(GROUP_FACES, dtype=bool)]
                self.assertLess(off_diagonal.max(), 1 - engine.default_threshold)

    def test_a_recognizer_giving_nan_fails_loud(self):
        face = self.engines[support.ENGINE_ONNX_DIRECT].detect(self.group)[0]
        recognizer = support.not_finite_recognizer(self.engines[support.ENGINE_ONNX_DIRECT])
        with self.assertRaisesRegex(ValueError, "not finite"):
            recognizer.embed(self.group, face)

    def test_embedding_is_deterministic(self):
        for kind, engine in self.engines.items():
            with self.subTest(kind):
                face = engine.detect(self.group)[0]
                np.testing.assert_array_equal(engine.embed(self.group, face), engine.embed(self.group, face))

    def test_alignment_crop_is_112x112_on_the_template(self):
        for kind, engine in self.engines.items():
            for face in engine.detect(self.group):
                with self.subTest(kind, box=face.box):
                    crop = align_face(self.group, face.landmarks)
                    self.assertEqual(crop.shape, (ARCFACE_SIZE, ARCFACE_SIZE, 3))
                    self.assertEqual(crop.dtype, np.uint8)
                    self.assertGreater(crop.std(), 10)  # a face, not the black border
                    matrix = similarity_transform(face.landmarks, ARCFACE_TEMPLATE)
                    moved = np.c_[face.landmarks, np.ones(5)] @ matrix.T
                    residual = np.linalg.norm(moved - ARCFACE_TEMPLATE, axis=1)
                    self.assertLess(residual.mean(), 10.0)

    def test_similarity_transform_recovers_an_exact_similarity(self):
        angle, scale, shift = np.deg2rad(20), 2.5, np.array([300.0, 120.0])
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        landmarks = (ARCFACE_TEMPLATE @ (scale * rotation).T + shift).astype(np.float32)
        matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE)
        moved = np.c_[landmarks, np.ones(5)] @ matrix.T
        np.testing.assert_allclose(moved, ARCFACE_TEMPLATE, atol=1e-3)
        image = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
        self.assertEqual(align_face(image, landmarks).shape, (112, 112, 3))


class InsightfacePackTest(unittest.TestCase):
    """Pack files are told apart by their tensors: unrelated ONNX files are ignored, and flat and
    nested (`<dir>/<pack>/<pack>/`) layouts both load."""

    pack_files: dict[str, str]
    group: np.ndarray
    reference_faces: list[FaceDetection]
    reference_vector: np.ndarray
    tmp: str

    @classmethod
    def setUpClass(cls):
        support.engine_setup(support.ENGINE_INSIGHTFACE)
        cls.pack_files = support.pack_files("buffalo_sc")
        cls.det, cls.rec = cls.pack_files["det_500m.onnx"], cls.pack_files["w600k_mbf.onnx"]
        cls.spoof = support.model_path("MiniFASNetV2.onnx")
        cls.extra = [support.model_path(n) for n in ("MiniFASNetV1SE.onnx", "age-v1.onnx", "gender-v1.onnx")]
        cls.group = group_photo()
        reference = build("buffalo_sc", support.INSIGHTFACE_OPTIONS)
        cls.reference_faces = reference.detect(cls.group)
        cls.reference_vector = reference.embed(cls.group, cls.reference_faces[0])
        cls.tmp = support.temp_dir(cls)

    def make_pack(self, directory: str, files: dict[str, str]) -> None:
        os.makedirs(directory, exist_ok=True)
        for name, source in files.items():
            shutil.copy(source, os.path.join(directory, name))

    def assert_same_as_reference(self, engine) -> None:
        self.assertIsInstance(engine.detector, SCRFDDetector)
        self.assertEqual(engine.embedding_dim, 512)
        self.assertEqual(engine.recognizer.profile.name, "w600k_mbf")
        faces = engine.detect(self.group)
        self.assertEqual(len(faces), GROUP_FACES)
        np.testing.assert_allclose(faces[0].box, self.reference_faces[0].box, atol=1e-3)
        np.testing.assert_allclose(engine.embed(self.group, faces[0]), self.reference_vector, atol=1e-5)

    def test_flat_pack_with_an_unrelated_onnx_file(self):
        root = os.path.join(self.tmp, "flat")
        self.make_pack(os.path.join(root, "buffalo_sc"), {**self.pack_files, "MiniFASNetV2.onnx": self.spoof})
        engine = build("buffalo_sc", support.INSIGHTFACE_OPTIONS, model_path=root)
        self.assert_same_as_reference(engine)

    def test_nested_pack_layout(self):
        root = os.path.join(self.tmp, "nested")
        self.make_pack(
            os.path.join(root, "buffalo_sc", "buffalo_sc"), {**self.pack_files, "MiniFASNetV2.onnx": self.spoof}
        )
        with self.subTest("via ModelPath"):
            self.assert_same_as_reference(build("buffalo_sc", support.INSIGHTFACE_OPTIONS, model_path=root))
        with self.subTest("via root: option"):
            elsewhere = os.path.join(self.tmp, "empty")
            os.makedirs(elsewhere, exist_ok=True)
            engine = build("buffalo_sc", list(support.INSIGHTFACE_OPTIONS) + [f"root:{root}"], model_path=elsewhere)
            self.assert_same_as_reference(engine)

    def test_roles_come_from_the_tensors_not_the_names(self):
        # Names sort so that every unrelated model comes before the real ones.
        root = os.path.join(self.tmp, "scrambled")
        files = {f"a{i}.onnx": path for i, path in enumerate([self.spoof, *self.extra])}
        files.update({"x_recognizer_is_me.onnx": self.det, "y_detector_is_me.onnx": self.rec})
        self.make_pack(os.path.join(root, "buffalo_sc"), files)
        self.assert_same_as_reference(build("buffalo_sc", support.INSIGHTFACE_OPTIONS, model_path=root))

    def test_pack_without_a_recognizer_names_what_is_missing(self):
        root = os.path.join(self.tmp, "norec")
        self.make_pack(os.path.join(root, "buffalo_sc"), {"det_500m.onnx": self.det, "MiniFASNetV2.onnx": self.spoof})
        with self.assertRaises(ModelFileError) as caught:
            build("buffalo_sc", support.INSIGHTFACE_OPTIONS, model_path=root)
        self.assertIn("recognizer", str(caught.exception))

    def test_unknown_pack_names_where_it_looked(self):
        with self.assertRaises(ModelFileError) as caught:
            build("buffalo_xx", ["engine:insightface", "model_pack:buffalo_xx"])
        self.assertIn("buffalo_xx", str(caught.exception))
        self.assertIn(support.MODELS_DIR, str(caught.exception))


class LabelledPairsTest(unittest.TestCase):
    """Each recognizer at its default threshold on labelled real faces (face_eval)."""

    @classmethod
    def setUpClass(cls):
        cls.results = {}
        support.single_face_photos()
        for kind in support.ENGINES:
            name, options = support.engine_setup(kind)
            engine = build(name, options)
            calibration = face_eval.calibration_faces(engine, support.DATA)
            heldout = face_eval.heldout_faces(engine, support.DATA)
            cls.results[kind] = (engine, calibration, heldout)

    def test_every_single_face_pair_is_decided_right(self):
        for kind, (engine, faces, _) in self.results.items():
            with self.subTest(kind, threshold=engine.default_threshold):
                self.assertEqual(len(faces), 13)
                stats = face_eval.pair_stats(faces, engine.default_threshold)
                self.assertEqual((stats.same, stats.different), (12, 66))
                self.assertEqual((stats.true_accepts, stats.false_accepts), (12, 0), stats)

    def test_heldout_faces_meet_the_operating_point(self):
        for kind, (engine, calibration, heldout) in self.results.items():
            with self.subTest(kind, threshold=engine.default_threshold):
                self.assertGreaterEqual(len(heldout), 12, "held-out faces went missing")
                stats = face_eval.pair_stats(calibration + heldout, engine.default_threshold, only_with=heldout)
                self.assertGreaterEqual(stats.same, 15)
                self.assertGreaterEqual(stats.different, 200)
                self.assertGreaterEqual(stats.tar, 0.97, stats)
                self.assertGreaterEqual(stats.true_reject_rate, 0.995, stats)


if __name__ == "__main__":
    unittest.main()
