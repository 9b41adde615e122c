"""Silent-Face liveness: crop geometry on synthetic images, and upstream's reference scores with the
real MiniFASNet weights (models/) on its sample photos (shared/data/silent-face-samples)."""

from __future__ import annotations

import os
import tempfile
import unittest
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from antispoof import (
    MINIFASNET_FILES,
    V1SE_CROP_SCALE,
    V2_CROP_SCALE,
    LivenessEnsemble,
    LivenessResult,
    MiniFASNet,
    crop_for_liveness,
    crop_window,
)
from core.errors import ModelFileError
from harness.spoof_samples import SAMPLE_BOXES, face_at
from tests import support

V2_FILE, V1SE_FILE = MINIFASNET_FILES

# What upstream prints for harness.spoof_samples.SAMPLE_BOXES (shared/models/minifasnet/SOURCE.md).
# Upstream's score is the fused probability of the winning class ("FakeFace Score: 0.73").
UPSTREAM_SCORE = {"image_F1.jpg": 0.73, "image_F2.jpg": 0.82, "image_T1.jpg": 0.99}
# Per-model softmax (print, real, replay) reproduced with the upstream pipeline.
PER_MODEL_SOFTMAX = {
    ("image_F1.jpg", V2_FILE): (0.084, 0.001, 0.915),
    ("image_F1.jpg", V1SE_FILE): (0.308, 0.143, 0.548),
    ("image_T1.jpg", V2_FILE): (0.000, 0.990, 0.010),
    ("image_T1.jpg", V1SE_FILE): (0.000, 0.997, 0.003),
}


def read_sample(name: str) -> np.ndarray:
    return support.read_image(support.data_path("silent-face-samples", name))


class CropWindowTest(unittest.TestCase):
    """Upstream CropImage geometry; no weights needed."""

    def test_box_is_enlarged_around_its_centre(self):
        self.assertEqual(crop_window(1000, 1000, (400, 400, 100, 100), 2.7), (315, 315, 585, 585))
        self.assertEqual(crop_window(1000, 1000, (400, 400, 100, 100), 4.0), (250, 250, 650, 650))

    def test_float_coordinates_are_truncated_like_upstream(self):
        # centre 450.25 +- 135 -> 315.25 .. 585.25 -> int() -> 315 .. 585
        self.assertEqual(crop_window(1000, 1000, (400.25, 400.75, 100, 100), 2.7), (315, 315, 585, 585))

    def test_scale_shrinks_when_the_window_cannot_fit(self):
        # 640 wide x 480 high, 300 px tall face: 2.7x would be 810 px; (480-1)/300 = 1.597 instead.
        x1, y1, x2, y2 = crop_window(640, 480, (200, 100, 200, 300), 2.7)
        self.assertEqual((y1, y2), (0, 479))  # the whole height, end pixel included
        self.assertAlmostEqual(x2 - x1, 200 * 479 / 300, delta=1)
        # The width is the binding side here.
        x1, y1, x2, y2 = crop_window(300, 1000, (100, 400, 200, 100), 4.0)
        self.assertEqual((x1, x2), (0, 299))
        self.assertAlmostEqual(y2 - y1, 100 * 299 / 200, delta=1)

    def test_window_is_shifted_inside_not_truncated_at_every_border(self):
        width, height, size = 640, 480, 100
        span = 270  # 100 px box at scale 2.7
        boxes = {
            "left, partly outside": (-30, 190, size, size),
            "top, touching": (270, 0, size, size),
            "right, partly outside": (600, 190, size, size),
            "bottom, touching": (270, height - size, size, size),
            "top-left corner, outside": (-60, -60, size, size),
            "bottom-right corner, outside": (width - 40, height - 40, size, size),
            "wholly outside": (width + 500, -900, size, size),
        }
        for label, box in boxes.items():
            with self.subTest(label):
                x1, y1, x2, y2 = crop_window(width, height, box, 2.7)
                self.assertGreaterEqual(min(x1, y1), 0)
                self.assertLessEqual(x2, width - 1)
                self.assertLessEqual(y2, height - 1)
                self.assertAlmostEqual(x2 - x1, span, delta=1)
                self.assertAlmostEqual(y2 - y1, span, delta=1)
        self.assertEqual(crop_window(width, height, boxes["left, partly outside"], 2.7)[0], 0)
        self.assertEqual(crop_window(width, height, boxes["right, partly outside"], 2.7)[2], width - 1)

    def test_crop_is_80x80_bgr_uint8(self):
        image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        for box in [(200.5, 100.25, 120.0, 150.0), (-50, -50, 100, 100), (600, 440, 100, 100)]:
            with self.subTest(box=box):
                patch = crop_for_liveness(image, box, V2_CROP_SCALE)
                self.assertEqual(patch.shape, (80, 80, 3))
                self.assertEqual(patch.dtype, np.uint8)

    def test_window_spanning_the_image_uses_every_pixel(self):
        # A face box as large as the image: the window is the whole image, last row/column included.
        image = np.random.default_rng(1).integers(0, 256, (60, 50, 3), dtype=np.uint8)
        np.testing.assert_array_equal(
            crop_for_liveness(image, (0, 0, 50, 60), V1SE_CROP_SCALE), cv2.resize(image, (80, 80))
        )

    def test_degenerate_boxes_do_not_crash(self):
        image = np.zeros((100, 120, 3), np.uint8)
        for box in [(50, 50, 0, 0), (50, 50, -10, 20), (0, 0, 0, 100), (119, 99, 0.2, 0.2)]:
            with self.subTest(box=box):
                self.assertEqual(crop_for_liveness(image, box, V2_CROP_SCALE).shape, (80, 80, 3))

    def test_grey_image_is_rejected(self):
        with self.assertRaises(ValueError):
            crop_for_liveness(np.zeros((100, 100), np.uint8), (10, 10, 50, 50), V2_CROP_SCALE)


class LivenessModelsTest(unittest.TestCase):
    """The real weights against upstream's reported scores."""

    v2_path: str
    v1se_path: str
    ensemble: LivenessEnsemble
    images: dict[str, np.ndarray]

    @classmethod
    def setUpClass(cls):
        cls.v2_path = support.model_path(V2_FILE)
        cls.v1se_path = support.model_path(V1SE_FILE)
        support.require_files(support.SPOOF_DIR)
        cls.ensemble = LivenessEnsemble(v2_path=cls.v2_path, v1se_path=cls.v1se_path)
        cls.images = {name: read_sample(name) for name in SAMPLE_BOXES}

    @classmethod
    def tearDownClass(cls):
        cls.ensemble.close()

    def score_sample(self, name: str, ensemble: LivenessEnsemble | None = None) -> LivenessResult:
        return (ensemble or self.ensemble).score(self.images[name], [face_at(*SAMPLE_BOXES[name])])[0]

    def test_fakes_are_fake_with_upstream_scores(self):
        for name in ("image_F1.jpg", "image_F2.jpg"):
            with self.subTest(name):
                result = self.score_sample(name)
                self.assertFalse(result.is_real)
                self.assertNotEqual(int(np.argmax(result.probabilities)), 1)
                self.assertAlmostEqual(max(result.probabilities), UPSTREAM_SCORE[name], delta=0.02)
                self.assertAlmostEqual(result.score, result.probabilities[1])

    def test_real_face_is_real_with_upstream_score(self):
        result = self.score_sample("image_T1.jpg")
        self.assertTrue(result.is_real)
        self.assertAlmostEqual(result.score, UPSTREAM_SCORE["image_T1.jpg"], delta=0.02)
        self.assertAlmostEqual(sum(result.probabilities), 1.0, places=5)

    def test_per_model_softmax_matches_reference(self):
        models = {
            V2_FILE: MiniFASNet(self.v2_path, V2_CROP_SCALE),
            V1SE_FILE: MiniFASNet(self.v1se_path, V1SE_CROP_SCALE),
        }
        for (name, model_file), expected in PER_MODEL_SOFTMAX.items():
            with self.subTest(name=name, model=model_file):
                got = models[model_file].probabilities(self.images[name], [SAMPLE_BOXES[name]])
                self.assertEqual(got.shape, (1, 3))
                np.testing.assert_allclose(got[0], expected, atol=0.01)

    def test_several_faces_are_scored_in_order(self):
        image = self.images["image_T1.jpg"]
        faces = [
            face_at(*SAMPLE_BOXES["image_T1.jpg"]),
            face_at(10, 10, 60, 60),
            face_at(*SAMPLE_BOXES["image_T1.jpg"]),
        ]
        together = self.ensemble.score(image, faces)
        one_by_one = [self.ensemble.score(image, [face])[0] for face in faces]
        self.assertEqual(len(together), 3)
        for joint, single in zip(together, one_by_one):
            np.testing.assert_allclose(joint.probabilities, single.probabilities, atol=1e-6)
        self.assertEqual(self.ensemble.score(image, []), [])

    def test_concurrent_callers_each_get_their_own_faces_scores(self):
        # Request threads share the ensemble and its helper thread (which runs the second model):
        # a mixed-up future would hand one caller another image's probabilities.
        expected = {name: self.score_sample(name).probabilities for name in SAMPLE_BOXES}
        names = list(SAMPLE_BOXES) * 8
        with ThreadPoolExecutor(max_workers=4) as callers:
            results = list(callers.map(self.score_sample, names))
        for name, result in zip(names, results):
            np.testing.assert_allclose(result.probabilities, expected[name], atol=1e-6, err_msg=name)

    def test_faces_at_and_over_every_border_score(self):
        image = self.images["image_F1.jpg"]
        height, width = image.shape[:2]
        faces = {
            "left, outside": face_at(-80.5, 200, 160, 160),
            "top, touching": face_at(150, 0, 160, 160),
            "right, outside": face_at(width - 60.25, 200, 160, 160),
            "bottom, outside": face_at(150, height - 100, 160, 200),
            "larger than the image": face_at(-100, -100, width + 200, height + 200),
            "zero width": face_at(200, 200, 0, 100),
        }
        results = self.ensemble.score(image, list(faces.values()))
        for label, result in zip(faces, results):
            with self.subTest(label):
                self.assertTrue(np.all(np.isfinite(result.probabilities)))
                self.assertAlmostEqual(sum(result.probabilities), 1.0, places=5)
                self.assertTrue(0.0 <= result.score <= 1.0)

    def test_either_model_alone(self):
        for kwargs, scale in (
            (dict(v2_path=self.v2_path), V2_CROP_SCALE),
            (dict(v1se_path=self.v1se_path), V1SE_CROP_SCALE),
        ):
            with self.subTest(**kwargs):
                ensemble = LivenessEnsemble(**kwargs)
                self.assertEqual([model.scale for model in ensemble.models], [scale])
                self.assertTrue(self.score_sample("image_T1.jpg", ensemble).is_real)
                self.assertFalse(self.score_sample("image_F1.jpg", ensemble).is_real)

    def test_no_model_is_a_value_error(self):
        with self.assertRaises(ValueError):
            LivenessEnsemble()
        with self.assertRaises(ValueError):
            LivenessEnsemble(v2_path=self.v2_path, threshold=1.5)

    def test_threshold_semantics(self):
        strict = LivenessEnsemble(v2_path=self.v2_path, v1se_path=self.v1se_path, threshold=0.999)
        result = self.score_sample("image_T1.jpg", strict)
        self.assertFalse(result.is_real)
        self.assertAlmostEqual(result.score, self.score_sample("image_T1.jpg").score)
        # A threshold of 0 still needs the real class to win: a fake stays fake.
        lenient = LivenessEnsemble(v2_path=self.v2_path, threshold=0.0)
        self.assertFalse(self.score_sample("image_F1.jpg", lenient).is_real)
        self.assertTrue(self.score_sample("image_T1.jpg", lenient).is_real)

    def test_missing_file_is_a_model_file_error_naming_it(self):
        missing = os.path.join(tempfile.gettempdir(), "no-such-dir", V2_FILE)
        with self.assertRaises(ModelFileError) as caught:
            LivenessEnsemble(v2_path=missing)
        self.assertIn(missing, str(caught.exception))

    def test_corrupt_file_is_a_model_file_error_naming_it(self):
        with tempfile.TemporaryDirectory() as folder:
            corrupt = os.path.join(folder, V1SE_FILE)
            with open(corrupt, "wb") as f:
                f.write(support.read_bytes(self.v1se_path)[:50_000])  # a truncated download
            with self.assertRaises(ModelFileError) as caught:
                LivenessEnsemble(v2_path=self.v2_path, v1se_path=corrupt)
            self.assertIn(corrupt, str(caught.exception))


if __name__ == "__main__":
    unittest.main()
