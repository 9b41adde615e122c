"""evaluation.py and plotting.py without a server: the pair loop, TAR/FAR, AUC and the recommended
thresholds against brute force on synthetic sets, the labels CSV rules, and the figures."""

from __future__ import annotations

import itertools
import os
import unittest

import numpy as np

import evaluation
from evaluation import ScoredImage
from tests.support import temp_dir


def unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    vectors = rng.normal(size=(rows, dim))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered_set(seed: int, identities: int = 6, per_identity: int = 4, dim: int = 32, spread: float = 0.6):
    """(files, labels, unit embeddings): noisy copies of one random direction per identity."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng, identities, dim)
    labels = [f"id{k}" for k in range(identities) for _ in range(per_identity)]
    noisy = np.repeat(centres, per_identity, axis=0) + spread * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    files = [f"{label}_{i}.jpg" for i, label in enumerate(labels)]
    return files, labels, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def brute_force_pairs(labels, embeddings, involving=None):
    """The nested loop the evaluation replaces: (distance, same, i, j) for every pair i < j."""
    return [
        (float(1.0 - embeddings[i] @ embeddings[j]), labels[i] == labels[j], i, j)
        for i, j in itertools.combinations(range(len(labels)), 2)
        if involving is None or i in involving or j in involving
    ]


class PairsTest(unittest.TestCase):
    def test_labelled_pairs_match_the_nested_loop(self):
        files, labels, embeddings = clustered_set(3)
        for involving in (None, {0, 5, 23}):
            with self.subTest(involving=involving):
                pairs = evaluation.labelled_pairs(labels, embeddings, involving)
                expected = brute_force_pairs(labels, embeddings, involving)
                same = [(d, i, j) for d, s, i, j in expected if s]
                different = [(d, i, j) for d, s, i, j in expected if not s]
                np.testing.assert_allclose(pairs.same, [d for d, _, _ in same], atol=1e-12)
                np.testing.assert_allclose(pairs.different, [d for d, _, _ in different], atol=1e-12)
                self.assertEqual(pairs.same_index.tolist(), [[i, j] for _, i, j in same])
                self.assertEqual(pairs.different_index.tolist(), [[i, j] for _, i, j in different])
                for threshold in (0.0, 0.3, 0.8, 1.0, evaluation.MAX_DISTANCE + 0.1):
                    accepted = [sum(d < threshold for d, _, _ in side) for side in (same, different)]
                    self.assertEqual(pairs.accepted(threshold), tuple(accepted))

    def test_a_set_of_one_has_no_pairs(self):
        pairs = evaluation.labelled_pairs(["a"], np.ones((1, 4)) / 2.0)
        self.assertEqual((len(pairs.same), len(pairs.different)), (0, 0))
        self.assertEqual(pairs.accepted(1.0), (0, 0))


class IdentityTest(unittest.TestCase):
    def test_rank_auc_matches_pair_counting_with_ties(self):
        rng = np.random.default_rng(7)
        for _ in range(20):
            positive = rng.integers(0, 6, size=rng.integers(1, 15)).astype(float)
            negative = rng.integers(0, 6, size=rng.integers(1, 15)).astype(float)
            brute = np.mean(
                [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positive, negative)]
            )
            self.assertAlmostEqual(evaluation.rank_auc(positive, negative), brute, places=12)
        self.assertIsNone(evaluation.rank_auc(np.array([]), np.array([1.0])))

    def test_far_threshold_is_the_largest_meeting_the_target(self):
        different = np.array([0.9, 0.7, 0.8, 1.1, 0.75, 1.0, 0.95, 0.85, 0.65, 1.2])
        for target in (0.0, 0.001, 0.1, 0.25, 0.5, 0.99):
            threshold, allowed = evaluation.far_threshold(different, target)
            self.assertLessEqual(np.mean(different < threshold), target)
            # anything above it lets one impostor too many through
            self.assertGreater(np.mean(different < threshold + 1e-9), target)
            self.assertEqual(allowed, int(target * len(different)))
        self.assertEqual(evaluation.far_threshold(different, 1.0)[0], evaluation.MAX_DISTANCE)

    def test_evaluate_identity_against_brute_force(self):
        files, labels, embeddings = clustered_set(11, spread=1.2)  # overlapping: some errors at any threshold
        expected = brute_force_pairs(labels, embeddings)
        same = np.array([d for d, s, _, _ in expected if s])
        different = np.array([d for d, s, _, _ in expected if not s])
        self.assertGreater(len(same), 0)
        for threshold, far_target in ((0.5, 0.05), (0.7, 0.2)):
            with self.subTest(threshold=threshold, far_target=far_target):
                result = evaluation.evaluate_identity(
                    files,
                    labels,
                    embeddings,
                    default_threshold=0.5,
                    threshold=threshold,
                    far_target=far_target,
                    skipped_multi_identity=["group.jpg"],
                )
                report = result.report
                self.assertEqual((report["images"], report["identities"], report["embedding_dim"]), (24, 6, 32))
                self.assertEqual((report["same"], report["different"]), (len(same), len(different)))
                self.assertEqual(report["tar"], round(np.mean(same < threshold), 4))
                self.assertEqual(report["far"], round(np.mean(different < threshold), 4))
                self.assertEqual(
                    report["auc"],
                    round(np.mean([1.0 if s < d else 0.5 if s == d else 0.0 for s in same for d in different]), 4),
                )
                worst = max((e for e in expected if e[1]), key=lambda e: e[0])
                self.assertEqual(report["max_same_pair"], [files[worst[2]], files[worst[3]]])
                closest = min((e for e in expected if not e[1]), key=lambda e: e[0])
                self.assertEqual(report["min_different_pair"], [files[closest[2]], files[closest[3]]])
                # The recommendation keeps FAR within the target, 1e-4 more would not.
                recommended = report["recommended_threshold"]
                self.assertLessEqual(np.mean(different < recommended), far_target)
                self.assertGreater(np.mean(different < recommended + 2e-4), far_target)
                self.assertEqual(report["far_at_recommended"], round(np.mean(different < recommended), 4))
                self.assertEqual(report["skipped_multi_identity"], ["group.jpg"])
                self.assertEqual("threshold_source" in report, threshold != 0.5)
                self.assertEqual(result.threshold, threshold)

    def test_support_note_says_when_the_set_is_too_small(self):
        note = evaluation.support_note(66, 0, 0.001)
        self.assertIn("rule of three", note["note"])
        self.assertIn("10000 different-person pairs", note["note"])
        self.assertNotIn("needed", evaluation.support_note(20000, 20, 0.001)["note"])


class LivenessTest(unittest.TestCase):
    def test_liveness_recommendation(self):
        real = np.array([0.99, 0.95, 0.7, 0.3])
        spoof = np.array([0.1, 0.2, 0.6])
        threshold, _ = evaluation.recommend_liveness(real, spoof, None)
        best = min(evaluation.liveness_rates(real, spoof, t)["acer"] for t in np.linspace(0, 1, 1001))
        self.assertAlmostEqual(evaluation.liveness_rates(real, spoof, threshold)["acer"], best)
        strict, _ = evaluation.recommend_liveness(real, spoof, 0.0)
        rates = evaluation.liveness_rates(real, spoof, strict)
        self.assertEqual(rates["apcer"], 0.0)
        self.assertEqual(rates["bpcer"], 0.25)  # the lowest threshold above 0.6 (0.65) rejects 0.3

    def test_evaluate_liveness_rates_of_the_verdicts(self):
        scored = [
            ScoredImage("r1", "real", 1, 0.9, True),
            ScoredImage("r2", "real", 2, 0.45, False),
            ScoredImage("s1", "spoof", 1, 0.2, False),
            ScoredImage("s2", "spoof", 1, 0.55, True),
        ]
        result = evaluation.evaluate_liveness(scored, None, skipped_no_face=[{"file": "x"}])
        report = result.report
        self.assertEqual((report["images"], report["real"], report["spoof"]), (4, 2, 2))
        self.assertEqual((report["spoofs_accepted"], report["reals_rejected"]), (1, 1))
        self.assertEqual((report["apcer"], report["bpcer"], report["acer"]), (0.5, 0.5, 0.5))
        self.assertEqual(report["server_threshold"], 0.5)  # every verdict is score >= 0.5
        self.assertEqual(report["auc"], 0.75)
        self.assertEqual(report["skipped_no_face"], [{"file": "x"}])
        self.assertEqual([r["faces"] for r in report["results"]], [1, 2, 1, 1])
        np.testing.assert_array_equal(result.real, [0.9, 0.45])
        self.assertNotIn("server_threshold_note", report)

    def test_inconclusive_images_are_counted_apart(self):
        scored = [
            ScoredImage("r1", "real", 1, 0.9, True, "LIVE"),
            ScoredImage("r2", "real", 1, 0.01, False, "INCONCLUSIVE", "FACE_CROP_OUTSIDE_IMAGE"),
            ScoredImage("s1", "spoof", 1, 0.2, False, "SPOOF"),
            ScoredImage("s2", "spoof", 1, 0.3, False, "INCONCLUSIVE", "FACE_TOO_SMALL"),
        ]
        report = evaluation.evaluate_liveness(scored, None).report
        self.assertEqual((report["images"], report["real"], report["spoof"], report["inconclusive"]), (4, 1, 1, 2))
        self.assertEqual((report["apcer"], report["bpcer"]), (0.0, 0.0))  # the gated real face is no rejection
        self.assertEqual((report["inconclusive_rate_real"], report["inconclusive_rate_spoof"]), (0.5, 0.5))
        self.assertEqual([r["file"] for r in report["results"]], ["r1", "s1"])
        self.assertEqual(
            [r["reason"] for r in report["inconclusive_results"]], ["FACE_CROP_OUTSIDE_IMAGE", "FACE_TOO_SMALL"]
        )
        self.assertEqual(report["server_threshold"], 0.5)

    def test_evaluate_liveness_notices_another_server_threshold(self):
        # 0.6 judged spoof: the server was not deciding at 0.5
        scored = [
            ScoredImage("r", "real", 1, 0.9, True),
            ScoredImage("s", "spoof", 1, 0.6, False),
            ScoredImage("t", "spoof", 1, 0.1, False),
        ]
        result = evaluation.evaluate_liveness(scored, 0.0)
        self.assertIsNone(result.server_threshold)
        self.assertIn("server_threshold_note", result.report)
        self.assertEqual(result.report["apcer_at_recommended"], 0.0)
        self.assertGreater(result.recommended, 0.6)


class LabelsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = temp_dir(self)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_labels_fall_back_to_images_dir_and_skip_group_rows(self):
        tmp = self.tmp
        os.mkdir(os.path.join(tmp, "images"))
        for name in ("a.jpg", "b.jpg"):
            open(os.path.join(tmp, "images" if name == "a.jpg" else "", name), "wb").close()
        labels = self.write("labels.csv", "file,identity\na.jpg,x\nb.jpg,y\ngroup.jpg,x;y\n")
        images, skipped = evaluation.read_labels(labels, "identity")
        self.assertEqual([os.path.relpath(i.path, tmp) for i in images], [os.path.join("images", "a.jpg"), "b.jpg"])
        self.assertEqual(skipped, ["group.jpg"])

    def test_unusable_labels_name_the_file_and_line(self):
        open(os.path.join(self.tmp, "a.jpg"), "wb").close()
        cases = {
            "columns.csv": ("file,name\na.jpg,x\n", "needs columns file,label"),
            "empty.csv": ("file,label\na.jpg,\n", "empty.csv:2: empty label for a.jpg"),
            "unknown.csv": ("file,label\na.jpg,Fake\n", "unknown.csv:2: label must be one of real, spoof, got 'Fake'"),
            "missing.csv": ("file,label\nb.jpg,real\n", "missing.csv:2: no such file: b.jpg"),
        }
        for name, (text, message) in cases.items():
            with self.subTest(name):
                with self.assertRaises(evaluation.LabelsError) as caught:
                    evaluation.read_labels(self.write(name, text), "label", evaluation.LIVENESS_LABELS)
                self.assertIn(message, str(caught.exception))
        with self.assertRaisesRegex(evaluation.LabelsError, "no such file: .*nowhere.csv"):
            evaluation.read_labels(os.path.join(self.tmp, "nowhere.csv"), "label")
        images, _ = evaluation.read_labels(
            self.write("ok.csv", "file,label\na.jpg,REAL\n"), "label", evaluation.LIVENESS_LABELS
        )
        self.assertEqual(images[0].label, "real")


class PlottingTest(unittest.TestCase):
    """The figures are written, at the size the client promises, also with an empty class."""

    @classmethod
    def setUpClass(cls):
        import plotting

        cls.plotting = plotting
        cls.tmp = temp_dir(cls)

    def size(self, path: str) -> tuple[int, int]:
        from matplotlib.image import imread

        image = imread(path)
        return image.shape[1], image.shape[0]

    def test_identity_and_liveness_figures(self):
        files, labels, embeddings = clustered_set(5)
        result = evaluation.evaluate_identity(
            files, labels, embeddings, default_threshold=0.5, threshold=0.5, far_target=0.01
        )
        path = os.path.join(self.tmp, "identity.png")
        self.plotting.plot_identity(
            path, result.pairs.same, result.pairs.different, result.threshold, result.recommended, "synthetic"
        )
        self.assertEqual(self.size(path), (1200, 480))
        path = os.path.join(self.tmp, "liveness.png")
        self.plotting.plot_liveness(path, np.array([0.9, 0.8]), np.array([]), None, 0.5, "no spoof")
        self.assertEqual(self.size(path), (1200, 480))

    def test_an_unwritable_path_is_an_os_error(self):
        with self.assertRaises(OSError):
            self.plotting.plot_liveness(
                os.path.join(self.tmp, "no", "such", "dir.png"), np.array([0.9]), np.array([0.1]), 0.5, 0.5, "x"
            )


if __name__ == "__main__":
    unittest.main()
