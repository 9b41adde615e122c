"""The LightQNet face quality head (engines/quality.py): its scores on the shared photos, clean and
degraded, the FaceAnalysis `quality` field, the liveness gate it feeds, and its mirror-only
catalog entry."""

from __future__ import annotations

import json
import os
import unittest

import cv2
import numpy as np

import catalog
from antispoof import FACE_LOW_QUALITY, MIN_QUALITY, LivenessStatus, gate
from backend import face_analysis
from catalog import install as installer
from engines.base import FaceDetection
from engines.options import parse_load_request
from engines.quality import QualityHead
from face_service import DEFAULT_MODEL_OPTIONS, FaceService
from harness.images import b64_image
from tests import support

QUALITY_FILE = next(f.name for f in catalog.default().files.values() if f.option == QualityHead.OPTION)


def eye_distance(face: FaceDetection) -> float:
    return float(np.linalg.norm(face.landmarks[0] - face.landmarks[1]))


def blurred(image: np.ndarray, faces: list[FaceDetection]) -> np.ndarray:
    """Gaussian blur of sigma a sixth of the largest eye distance: eyes and mouth smeared, the
    face still found by the detector in most photos."""
    return cv2.GaussianBlur(image, (0, 0), max(eye_distance(f) for f in faces) / 6)


def downscaled(image: np.ndarray, faces: list[FaceDetection]) -> np.ndarray:
    """Down then up sampled so that the smallest face's eyes end up 2 px apart."""
    factor = max(1, int(min(eye_distance(f) for f in faces) / 2))
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def darkened(image: np.ndarray, faces: list[FaceDetection]) -> np.ndarray:
    """A twentieth of the light."""
    return (image.astype(np.float32) * 0.05).astype(np.uint8)


class QualityTest(unittest.TestCase):
    service: FaceService
    plain: FaceService

    @classmethod
    def setUpClass(cls):
        support.model_path(QUALITY_FILE)
        support.require_files(support.SPOOF_DIR, os.path.join(support.DATA, "antispoof-dev"))
        options = [*DEFAULT_MODEL_OPTIONS, f"{QualityHead.OPTION}:{QUALITY_FILE}"]
        cls.service = FaceService()
        cls.service.load(parse_load_request("q", support.MODELS_DIR, 0, options))
        cls.plain = FaceService()
        cls.plain.load(parse_load_request("default", support.MODELS_DIR, 0, list(DEFAULT_MODEL_OPTIONS)))

    def engine(self):
        model = self.service.loaded
        assert model is not None
        return model.engine

    def real_photos(self) -> list[str]:
        """Every real whole frame of the shared photos (tight SiW-Mv2 crops included)."""
        folder = os.path.join(support.IDENTITY_DIR, "images")
        paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".jpg")]
        real = os.path.join(support.DATA, "antispoof-dev", "real")
        paths += [os.path.join(real, n) for n in sorted(os.listdir(real))]
        return [*paths, os.path.join(support.SPOOF_DIR, "image_T1.jpg"), support.GROUP_PHOTO]

    def qualities(self, image: np.ndarray) -> tuple[list[FaceDetection], list[float]]:
        engine = self.engine()
        faces = engine.detect(image)
        quality = engine.face_quality(image, faces)
        assert quality is not None
        return faces, quality

    def test_real_faces_pass_and_degraded_ones_fall_below(self):
        # Degraded copies are scored at the clean photo's landmarks: the same faces, only worse.
        low, kept = [], []
        for path in self.real_photos():
            image = support.read_image(path)
            faces, clean = self.qualities(image)
            self.assertTrue(faces, path)
            low += [f"{os.path.basename(path)} {q:.3f}" for q in clean if not MIN_QUALITY < q < 1]
            for degrade in (blurred, downscaled, darkened):
                scores = self.engine().face_quality(degrade(image, faces), faces) or []
                self.assertEqual(len(scores), len(faces))
                name = f"{os.path.basename(path)} {degrade.__name__}"
                kept += [f"{name} {q:.3f}" for q in scores if q >= MIN_QUALITY]
        self.assertEqual(low, [])
        self.assertEqual(kept, [])

    def test_spoofs_are_not_gated_by_quality(self):
        # A sharp print or screen is a sharp face: the gate must leave it to the engines (SPOOF).
        spoof = os.path.join(support.DATA, "antispoof-dev", "spoof")
        paths = [os.path.join(spoof, n) for n in sorted(os.listdir(spoof))]
        paths += [os.path.join(support.SPOOF_DIR, f"image_{n}.jpg") for n in ("F1", "F2")]
        low = []
        for path in paths:
            faces, scores = self.qualities(support.read_image(path))
            self.assertTrue(faces, path)
            low += [f"{os.path.basename(path)} {q:.3f}" for q in scores if q < MIN_QUALITY]
        self.assertEqual(low, [])

    def test_batch_equals_face_by_face(self):
        image = support.read_image(support.GROUP_PHOTO)
        faces, batch = self.qualities(image)
        self.assertGreater(len(faces), 1)
        single = [self.engine().face_quality(image, [f])[0] for f in faces]
        np.testing.assert_allclose(batch, single, atol=1e-5)
        self.assertEqual(self.engine().face_quality(image, []), [])

    def test_field_present_only_with_the_head(self):
        img = support.photo("obama_1.jpg")
        (with_head,) = self.service.analyze(img)
        (without,) = self.plain.analyze(img)
        self.assertTrue(face_analysis(with_head).HasField("quality"))
        self.assertGreater(face_analysis(with_head).quality, MIN_QUALITY)
        self.assertFalse(face_analysis(without).HasField("quality"))
        self.assertIsNone(without.quality)

    def test_gate_turns_a_blurred_real_face_inconclusive(self):
        image = support.read_image(support.data_path(support.IMAGES, "obama_1.jpg"))
        faces, _ = self.qualities(image)
        (sharp,) = self.service.analyze(b64_image(image), anti_spoofing=True)
        assert sharp.liveness is not None
        self.assertIsNot(sharp.liveness.status, LivenessStatus.SPOOF)
        self.assertIsNot(sharp.liveness.gate, FACE_LOW_QUALITY)
        (soft,) = self.service.analyze(b64_image(blurred(image, faces)), anti_spoofing=True)
        assert soft.liveness is not None and soft.quality is not None
        self.assertLess(soft.quality, MIN_QUALITY)
        self.assertIs(soft.liveness.status, LivenessStatus.INCONCLUSIVE)
        self.assertIs(soft.liveness.gate, FACE_LOW_QUALITY)
        self.assertFalse(soft.liveness.is_real)
        # FaceVerify's images pass the same gate.
        result = self.service.verify(b64_image(blurred(image, faces)), support.photo("obama_2.jpg"), anti_spoofing=True)
        assert result.img1_liveness is not None
        self.assertIs(result.img1_liveness.gate, FACE_LOW_QUALITY)
        self.assertFalse(result.verified)

    def test_gate_without_quality_is_unchanged(self):
        self.assertIsNone(gate(640, 480, (200, 100, 200, 200)))
        self.assertIsNone(gate(640, 480, (200, 100, 200, 200), MIN_QUALITY))
        self.assertIs(gate(640, 480, (200, 100, 200, 200), MIN_QUALITY / 2), FACE_LOW_QUALITY)


class MirrorOnlyCatalogTest(unittest.TestCase):
    def entry(self, **fields) -> dict:
        base = {"name": "a.onnx", "sha256": "0" * 64, "role": "x", "licence": "MIT", "commercial_ok": True}
        return {"files": [{**base, **fields}]}

    def test_a_file_needs_sources_or_mirror_only(self):
        self.assertTrue(catalog.from_dict(self.entry(mirror_only=True)).files["a.onnx"].mirror_only)
        self.assertFalse(catalog.from_dict(self.entry(sources=[{"url": "http://x/a"}])).files["a.onnx"].mirror_only)
        for broken in (
            self.entry(),
            self.entry(sources=[]),
            self.entry(mirror_only=True, sources=[{"url": "http://x/a"}]),
            self.entry(mirror_only="yes"),
        ):
            with self.subTest(json.dumps(broken)), self.assertRaises(catalog.CatalogError):
                catalog.from_dict(broken)

    def test_shipped_quality_file_is_mirror_only(self):
        entry = catalog.default().files[QUALITY_FILE]
        self.assertTrue(entry.mirror_only)
        self.assertEqual(entry.sources, ())
        self.assertIn(QUALITY_FILE, [e.name for e in catalog.default().expand(["test"])])

    def test_install_without_the_mirror_names_it(self):
        dest = support.temp_dir(self)
        with self.assertRaises(installer.InstallError) as caught:
            installer.install([QUALITY_FILE], dest=dest, mirror=None, log=lambda line: None)
        self.assertIn("only from a mirror", str(caught.exception))
        self.assertIn("MODELS_MIRROR", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
