"""client.py, the operator command line, end to end: a real backend.py subprocess with the default
model set, every subcommand run as `.venv/bin/python client.py ...` against it on the photos of
../shared/data, and the error paths (missing file, unreachable server, gRPC status, bad token,
which images an evaluation skips by the ErrorInfo reason). The evaluation arithmetic itself is
tests/test_evaluation.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
import unittest

import cv2
import numpy as np

import catalog
import client
from harness.paths import PYTHON
from harness.servers import BackendProcess, backend_env
from tests import support

REPO = support.REPO
CLIENT = os.path.join(REPO, "client.py")
DEFAULT_FILES = tuple(f.name for f in catalog.default().expand(["default"]))
# The default set's recognizer threshold, FaceVerify's when the request sets none.
DEFAULT_THRESHOLD = next(
    f.threshold
    for f in catalog.default().expand(["default"])
    if isinstance(f, catalog.ModelFile) and f.role == catalog.ROLE_RECOGNIZER
)


def clean_env(**extra: str) -> dict[str, str]:
    """The client's environment: no token unless one is given (as for the server)."""
    return backend_env(**extra)


def png_size(path: str) -> tuple[int, int]:
    image = support.read_image(path)
    return image.shape[1], image.shape[0]


class ClientAgainstServerTest(unittest.TestCase):
    """Every subcommand against one backend.py subprocess serving the default model set."""

    identity_labels: str
    images: str
    obama_1: str
    obama_2: str
    biden_1: str
    real_t1: str
    spoof_f1: str
    spoof_f2: str
    group: str
    tmp: str
    server: BackendProcess

    @classmethod
    def setUpClass(cls):
        for name in DEFAULT_FILES:
            support.model_path(name)
        support.model_path(os.path.join("buffalo_sc", "w600k_mbf.onnx"))
        cls.identity_labels = support.data_path("face-recognition-examples", "labels.csv")
        cls.images = os.path.join(support.IDENTITY_DIR, "images")
        cls.obama_1 = support.data_path("face-recognition-examples", "images", "obama_1.jpg")
        cls.obama_2 = support.data_path("face-recognition-examples", "images", "obama_2.jpg")
        cls.biden_1 = support.data_path("face-recognition-examples", "images", "biden_1.jpg")
        cls.real_t1 = support.data_path("silent-face-samples", "image_T1.jpg")
        cls.spoof_f1 = support.data_path("silent-face-samples", "image_F1.jpg")
        cls.spoof_f2 = support.data_path("silent-face-samples", "image_F2.jpg")
        cls.group = support.data_path("insightface-wheel-images", "t1.jpg")
        cls.tmp = support.temp_dir(cls, prefix="test_client_")
        cls.server = BackendProcess("--preload-default", support.MODELS_DIR)
        cls.addClassCleanup(cls.server.close)

    # -- helpers -----------------------------------------------------------------------------
    def client(
        self, *args: str, addr: str | None = None, env: dict | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        command = [PYTHON, CLIENT, "--addr", addr or self.server.address, *args]
        return subprocess.run(
            command,
            cwd=REPO,
            env=env or clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ok(self, *args: str, **kwargs) -> dict:
        done = self.client(*args, **kwargs)
        self.assertEqual(done.returncode, 0, f"client {' '.join(args)} failed: {done.stderr}")
        return json.loads(done.stdout)

    def labels_csv(self, name: str, column: str, rows) -> str:
        """A labels CSV in the test's directory: columns file,<column>, one (path, label) a row."""
        path = os.path.join(self.tmp, name)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", column])
            writer.writerows(rows)
        return path

    def faceless(self) -> str:
        path = os.path.join(self.tmp, "faceless.png")
        self.assertTrue(cv2.imwrite(path, support.faceless_image()))
        return path

    def test_enroll_and_identify_against_a_store_server(self):
        store = BackendProcess()
        self.addCleanup(store.close)
        directory = support.temp_dir(self)
        self.ok("load", "-o", "store:sqlite", "--model", "gallery", "--model-path", directory, addr=store.address)
        image = os.path.join(self.images, "{}.jpg").format
        enrolled = self.ok("enroll", "Obama", image("obama_1"), image("obama_2"), "--store-addr", store.address)
        self.assertEqual((enrolled["name"], enrolled["keys"]), ("Obama", 2))
        self.ok("enroll", "Biden", image("biden_1"), "--store-addr", store.address)
        self.ok("enroll", "Kit", image("kit_harington_1"), "--store-addr", store.address)
        found = self.ok("identify", image("obama_3"), "--top", "2", "--store-addr", store.address)
        self.assertEqual([m["name"] for m in found["matches"]], ["Obama", "Obama"])
        self.assertGreater(found["matches"][0]["similarity"], found["matches"][1]["similarity"] - 1e-6)
        self.assertEqual(found["matches"][0]["enrolled"], enrolled["enrolled"])
        self.assertEqual(self.ok("identify", image("biden_2"), "--top", "1", "--store-addr", store.address)
                         ["matches"][0]["name"], "Biden")  # fmt: skip
        # The store role refuses face RPCs, and the face server the Stores RPCs, by reason.
        line = self.fails(client.EXIT_REFUSED, "embed", image("obama_3"), addr=store.address)
        self.assertIn("FAILED_PRECONDITION", line)
        self.assertIn("is a store", line)
        line = self.fails(client.EXIT_REFUSED, "enroll", "X", image("obama_3"), "--store-addr", self.server.address)
        self.assertIn("StoresSet: FAILED_PRECONDITION", line)

    def fails(self, code: int, *args: str, **kwargs) -> str:
        """Runs a call that must fail with exit `code` and exactly one stderr line; returns it."""
        done = self.client(*args, **kwargs)
        self.assertEqual(done.returncode, code, f"stdout={done.stdout!r} stderr={done.stderr!r}")
        lines = done.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, f"want one stderr line, got {done.stderr!r}")
        self.assertTrue(lines[0].startswith("error: "), lines[0])
        return lines[0]

    # -- load --------------------------------------------------------------------------------
    def test_load_default(self):
        result = self.ok("load", "--default", "--model-path", support.MODELS_DIR)
        self.assertTrue(result["success"])
        self.assertIn("with liveness", result["message"])
        self.assertEqual(self.ok("embed", self.obama_1)["dim"], 128)

    def test_load_options_buffalo_sc_then_back_to_default(self):
        try:
            result = self.ok(
                "load",
                "--model",
                "buffalo_sc",
                "-o",
                "engine:insightface",
                "-o",
                "model_pack:buffalo_sc",
                "--model-path",
                support.MODELS_DIR,
            )
            self.assertTrue(result["success"], result)
            self.assertIn("without liveness", result["message"])
            self.assertEqual(self.ok("embed", self.obama_1)["dim"], 512)
            # The identity guard: asking for another model than the loaded one is NOT_FOUND.
            line = self.fails(client.EXIT_REFUSED, "--identity", "default", "embed", self.obama_1)
            self.assertIn("NOT_FOUND", line)
            # An evaluation stops on it (it is not about an image), as on liveness asked of a
            # model without liveness weights.
            labels = self.labels_csv("two.csv", "identity", [[self.obama_1, "obama"], [self.biden_1, "biden"]])
            line = self.fails(client.EXIT_REFUSED, "--identity", "default", "evaluate", labels)
            self.assertIn("NOT_FOUND: model identity mismatch", line)
            labels = self.labels_csv("one.csv", "label", [[self.real_t1, "real"]])
            line = self.fails(client.EXIT_REFUSED, "evaluate-liveness", labels)
            self.assertIn("FAILED_PRECONDITION", line)
            self.assertIn("antispoof_v2_onnx", line)
            self.assertEqual(self.ok("--identity", "buffalo_sc", "embed", self.obama_1)["dim"], 512)
        finally:
            self.ok("load", "--default")  # the repo's models/ is the default --model-path
        self.assertEqual(self.ok("embed", self.obama_1)["dim"], 128)

    def test_load_failure_is_one_line_and_keeps_the_model(self):
        done = self.client(
            "load",
            "-o",
            "engine:onnx_direct",
            "-o",
            "detector_onnx:missing.onnx",
            "-o",
            "recognizer_onnx:MobileFaceNet.onnx",
        )
        self.assertEqual(done.returncode, client.EXIT_REFUSED)
        self.assertFalse(json.loads(done.stdout)["success"])
        lines = done.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, done.stderr)
        self.assertIn("missing.onnx", lines[0])
        self.assertEqual(self.ok("embed", self.obama_1)["dim"], 128)

    def test_load_without_options_is_a_usage_error(self):
        self.assertIn("load needs", self.fails(client.EXIT_USAGE, "load"))

    def test_status(self):
        self.assertEqual(self.ok("status")["state"], "READY")

    # -- verify ------------------------------------------------------------------------------
    def test_verify_same_person(self):
        result = self.ok("verify", self.obama_1, self.obama_2)
        self.assertIs(result["verified"], True)
        self.assertLess(result["distance"], result["threshold"])
        self.assertAlmostEqual(result["threshold"], DEFAULT_THRESHOLD, places=4)
        self.assertNotIn("img1_is_real", result)  # liveness did not run: absent, not false

    def test_verify_different_people(self):
        result = self.ok("verify", self.obama_1, self.biden_1)
        self.assertIs(result["verified"], False)  # a false bool is printed, not dropped
        self.assertGreater(result["distance"], result["threshold"])
        self.assertNotIn("img2_is_real", result)

    def test_verify_anti_spoofing_vetoes_a_printed_photo(self):
        result = self.ok("verify", "--anti-spoofing", self.real_t1, self.spoof_f1)
        self.assertIs(result["verified"], False)
        self.assertIs(result["img1_is_real"], True)
        self.assertIs(result["img2_is_real"], False)  # present, and false
        self.assertLess(result["img2_antispoof_score"], 0.5)
        self.assertEqual((result["img1_liveness_status"], result["img2_liveness_status"]), ("LIVE", "SPOOF"))
        # The default set fuses its engines: the score is the lowest engine P(real).
        self.assertIn("minifasnet", result["img2_antispoof_engines"])
        self.assertAlmostEqual(min(result["img2_antispoof_engines"].values()), result["img2_antispoof_score"], places=6)
        self.assertNotIn("img2_liveness_reason", result)  # judged: no reason

    def test_verify_threshold_is_honoured(self):
        result = self.ok("verify", self.obama_1, self.biden_1, "--threshold", "1.5")
        self.assertAlmostEqual(result["threshold"], 1.5, places=5)
        self.assertIs(result["verified"], True)  # ~1.0 apart, accepted under a 1.5 threshold

    # -- analyze, detect, embed ----------------------------------------------------------------
    def test_analyze_group_photo(self):
        faces = self.ok("analyze", self.group)["faces"]
        self.assertEqual(len(faces), 6)
        for face in faces:
            self.assertGreater(face["region"]["w"], 0)
            self.assertIn(face["dominant_gender"], ("Man", "Woman"))
            self.assertGreater(face["age"], 0)
            self.assertNotIn("is_real", face)

    def test_analyze_gender_only_with_liveness(self):
        faces = self.ok("analyze", self.group, "--actions", "gender", "--anti-spoofing")["faces"]
        self.assertEqual(len(faces), 6)
        for face in faces:
            self.assertAlmostEqual(sum(face["gender"].values()), 1.0, places=4)
            self.assertIn("is_real", face)
            self.assertIn("antispoof_score", face)

    def test_analyze_unknown_action_is_invalid_argument(self):
        self.assertIn(
            "INVALID_ARGUMENT", self.fails(client.EXIT_REFUSED, "analyze", self.group, "--actions", "hair_colour")
        )

    def test_detect_group_photo(self):
        detections = self.ok("detect", self.group)["Detections"]
        self.assertEqual(len(detections), 6)
        self.assertEqual({d["class_name"] for d in detections}, {"face"})

    def test_embed(self):
        result = self.ok("embed", self.obama_1)
        self.assertEqual(result["dim"], 128)
        self.assertEqual(len(result["embeddings"]), 128)
        self.assertAlmostEqual(float(np.linalg.norm(result["embeddings"])), 1.0, places=3)

    # -- evaluate ------------------------------------------------------------------------------
    def test_evaluate_identity_set_with_plot(self):
        plot = os.path.join(self.tmp, "identity.png")
        done = self.client("evaluate", self.identity_labels, "--plot", plot)
        self.assertEqual(done.returncode, 0, done.stderr)
        report = json.loads(done.stdout)
        self.assertEqual(report["images"], 13)
        self.assertEqual(len(report["skipped_multi_identity"]), 3)
        self.assertIn("several identities", done.stderr)
        self.assertEqual((report["pairs"], report["same"], report["different"]), (78, 12, 66))
        self.assertAlmostEqual(report["default_threshold"], DEFAULT_THRESHOLD, places=4)
        self.assertEqual(report["tar"], 1.0)
        self.assertEqual(report["far"], 0.0)
        self.assertEqual(report["auc"], 1.0)
        # FAR target 0.001 on 66 impostor pairs allows none: the closest impostor, rounded down.
        self.assertLessEqual(report["recommended_threshold"], report["min_different_distance"])
        self.assertGreater(report["recommended_threshold"], report["max_same_distance"])
        self.assertEqual(report["far_at_recommended"], 0.0)
        self.assertEqual(report["tar_at_recommended"], 1.0)
        self.assertEqual(report["recommended_support"]["different_pairs"], 66)
        self.assertEqual(report["recommended_support"]["allowed_false_accepts"], 0)
        width, height = png_size(plot)
        self.assertGreater(os.path.getsize(plot), 0)
        self.assertGreaterEqual(width, 600)
        self.assertGreaterEqual(height, 300)

    def test_evaluate_skips_the_images_the_server_refuses(self):
        # NOT_FOUND (no face) and INVALID_ARGUMENT (not an image) with the image's field: skipped
        # with their reason, and the evaluation goes on with the rest.
        not_an_image = os.path.join(self.tmp, "not_an_image.jpg")
        with open(not_an_image, "wb") as f:
            f.write(b"certainly not a JPEG" * 50)
        faceless = self.faceless()
        labels = self.labels_csv(
            "with_bad.csv",
            "identity",
            [
                [self.obama_1, "obama"],
                [self.obama_2, "obama"],
                [self.biden_1, "biden"],
                [faceless, "nobody"],
                [not_an_image, "nobody"],
            ],
        )
        done = self.client("evaluate", labels)
        self.assertEqual(done.returncode, 0, done.stderr)
        report = json.loads(done.stdout)
        self.assertEqual((report["images"], report["same"], report["different"]), (3, 1, 2))
        skipped = {entry["file"]: entry for entry in report["skipped_no_face"]}
        self.assertEqual(skipped[faceless]["reason"], "NO_FACE")
        self.assertEqual(skipped[faceless]["error"], "Embedding: NOT_FOUND: no face found in Images[0]")
        self.assertEqual(skipped[not_an_image]["reason"], "IMAGE_UNDECODABLE")
        self.assertIn("INVALID_ARGUMENT", skipped[not_an_image]["error"])
        self.assertIn(f"skipped {faceless}", done.stderr)
        # evaluate-liveness the same way, its rows keeping their label
        labels = self.labels_csv(
            "liveness_with_bad.csv", "label", [[self.real_t1, "real"], [self.spoof_f1, "spoof"], [faceless, "real"]]
        )
        report = self.ok("evaluate-liveness", labels)
        self.assertEqual((report["images"], report["real"], report["spoof"]), (2, 1, 1))
        self.assertEqual(
            [(e["file"], e["label"], e["reason"]) for e in report["skipped_no_face"]], [(faceless, "real", "NO_FACE")]
        )

    def test_evaluate_missing_image_in_csv(self):
        labels = os.path.join(self.tmp, "broken.csv")
        with open(labels, "w", newline="") as f:
            f.write(f"file,identity\n{self.obama_1},obama\nnot_there.jpg,obama\n")
        line = self.fails(client.EXIT_USAGE, "evaluate", labels)
        self.assertIn("not_there.jpg", line)

    def test_evaluate_liveness_with_plot(self):
        reals = [
            support.data_path("face-recognition-examples", "images", name)
            for name in ("biden_1.jpg", "kit_harington_1.jpg", "obama_2.jpg", "rose_leslie_1.jpg")
        ]
        rows = [[self.spoof_f1, "spoof"], [self.spoof_f2, "spoof"], [self.real_t1, "real"]]
        # Two tight face crops: inconclusive, counted apart and outside APCER / BPCER.
        rows += [
            [support.data_path("antispoof-dev", "real", "siwmv2_live_1.png"), "real"],
            [support.data_path("antispoof-dev", "spoof", "siwmv2_spoof_1.png"), "spoof"],
        ]
        labels = self.labels_csv("liveness.csv", "label", rows + [[path, "real"] for path in reals])
        plot = os.path.join(self.tmp, "liveness.png")
        report = self.ok("evaluate-liveness", labels, "--plot", plot)
        self.assertEqual((report["images"], report["real"], report["spoof"]), (9, 5, 2))
        self.assertEqual(report["inconclusive"], 2)
        self.assertEqual(
            (report["inconclusive_rate_real"], report["inconclusive_rate_spoof"]), (round(1 / 6, 4), 0.3333)
        )
        self.assertEqual({r["reason"] for r in report["inconclusive_results"]}, {"FACE_CROP_OUTSIDE_IMAGE"})
        self.assertEqual(report["server_threshold"], 0.5)
        self.assertEqual((report["apcer"], report["bpcer"], report["acer"]), (0.0, 0.0, 0.0))
        self.assertEqual(report["auc"], 1.0)
        spoof_scores = [r["antispoof_score"] for r in report["results"] if r["label"] == "spoof"]
        real_scores = [r["antispoof_score"] for r in report["results"] if r["label"] == "real"]
        self.assertLess(max(spoof_scores), report["recommended_threshold"])
        self.assertLessEqual(report["recommended_threshold"], min(real_scores))
        self.assertEqual(report["acer_at_recommended"], 0.0)
        width, height = png_size(plot)
        self.assertGreaterEqual(width, 600)
        self.assertGreaterEqual(height, 300)

    # -- error paths ---------------------------------------------------------------------------
    def test_missing_file(self):
        missing = os.path.join(self.tmp, "no_such_photo.jpg")
        line = self.fails(client.EXIT_USAGE, "verify", missing, self.obama_1)
        self.assertIn("no_such_photo.jpg", line)
        # argparse's own usage errors are one line as well
        self.assertIn("required: B", self.fails(client.EXIT_USAGE, "verify", self.obama_1))

    def test_unreachable_server_fails_fast(self):
        started = time.monotonic()
        line = self.fails(
            client.EXIT_UNREACHABLE,
            "verify",
            self.obama_1,
            self.obama_2,
            addr=f"127.0.0.1:{support.free_port()}",
            timeout=30,
        )
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("cannot reach the server", line)

    def test_no_face_is_not_found(self):
        line = self.fails(client.EXIT_REFUSED, "verify", self.obama_1, self.faceless())
        self.assertEqual(line, "error: FaceVerify: NOT_FOUND: no face found in img2")

    def test_wrong_token_is_unauthenticated(self):
        server = BackendProcess(token="s3cret")
        try:
            addr = server.address
            line = self.fails(client.EXIT_REFUSED, "--token", "wrong", "status", addr=addr)
            self.assertIn("UNAUTHENTICATED", line)
            self.assertIn("UNAUTHENTICATED", self.fails(client.EXIT_REFUSED, "status", addr=addr))
            # Without --token the client sends the token of the environment, as the server reads it.
            status = self.ok("status", addr=addr, env=clean_env(**{client.TOKEN_ENV: "s3cret"}))
            self.assertEqual(status["state"], "UNINITIALIZED")
            self.assertEqual(self.ok("--token", "s3cret", "status", addr=addr)["state"], "UNINITIALIZED")
        finally:
            server.close()


class ClientOfflineTest(unittest.TestCase):
    """What needs no server: the client's imports and the shipped example labels."""

    def test_the_command_line_imports_no_engine_and_no_plotting(self):
        # `client.py status` on a machine without the models' runtime: gRPC, numpy and the
        # evaluation arithmetic only; matplotlib comes in with --plot.
        probe = (
            "import sys, client; print(' '.join(sorted(m for m in ('cv2', 'onnxruntime', 'engines',"
            " 'face_service', 'matplotlib', 'plotting') if m in sys.modules)))"
        )
        done = subprocess.run([PYTHON, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), "")

    def test_shipped_liveness_labels_name_the_shared_samples(self):
        # tests/data/liveness_labels.csv (the README's example) points at ../shared/data.
        with open(os.path.join(REPO, "tests", "data", "liveness_labels.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        labels = {os.path.basename(r["file"]): r["label"] for r in rows}
        self.assertEqual(labels["image_F1.jpg"], "spoof")
        self.assertEqual(labels["image_F2.jpg"], "spoof")
        self.assertEqual(labels["image_T1.jpg"], "real")
        self.assertNotIn("image_T2.jpg", labels)  # ambiguous upstream: see its SOURCE.md
        for row in rows:
            parts = os.path.normpath(row["file"]).split(os.sep)
            self.assertEqual(parts[:5], ["..", "..", "..", "shared", "data"])
            support.data_path(*parts[5:])


if __name__ == "__main__":
    unittest.main()
