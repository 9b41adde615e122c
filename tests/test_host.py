"""The backend as the host uses it: its gallery configurations, its models directory, its requests.

The host (LocalAI) extracts a pack's zip flat into its models directory next to every other
model's files (buffalo_m and antelopev2 zips extract into a folder of their own), sends LoadModel
with every ModelOptions field it fills (most of them LLM settings this backend never declares:
they arrive as unknown fields), appends options of its own, and then calls the face RPCs with
ModelIdentity = ModelOptions.Model. Each configuration below is built that way and driven over a
real gRPC channel; the answers checked are the ones the host reads.
"""

from __future__ import annotations

import os
import tempfile
import unittest

import grpc
import numpy as np

import backend_pb2
import catalog
from engines.onnx_graph import bytes_field, varint_field
from harness.servers import BackendProcess
from tests import support
from tests.support import CALL_TIMEOUT, GrpcAssertions, photo

SAME = ("obama_1.jpg", "obama_2.jpg")
DIFFERENT = ("obama_1.jpg", "biden_1.jpg")
# Other models' files the host keeps in the same directory: the default set's.
NEIGHBOURS = tuple(f.name for f in catalog.default().expand(["default"]))


def _field(number: int, value) -> bytes:
    """One protobuf field in wire format: varint for ints and bools, length-delimited for text."""
    if isinstance(value, (bool, int)):
        return varint_field(number, int(value))
    return bytes_field(number, value.encode())


# ModelOptions fields the host fills for every model (field numbers of the host's backend.proto)
# that this backend does not declare.
HOST_ONLY_FIELDS = (
    (2, 512),  # ContextSize
    (3, 1234),  # Seed
    (4, 512),  # NBatch
    (5, True),  # F16Memory
    (7, True),  # MMap
    (12, 99999999),  # NGPULayers
    (49, ""),  # Type
    (56, "auto"),  # FlashAttention
    (72, "some:override"),  # Overrides
)


def host_load_model(channel, model: str, model_path: str, options: list[str], threads: int = 2):
    """LoadModel as the host sends it: declared fields plus the host-only ones, as raw bytes."""
    declared = backend_pb2.ModelOptions(
        Model=model, ModelPath=model_path, ModelFile=os.path.join(model_path, model), Threads=threads, Options=options
    ).SerializeToString()
    raw = declared + b"".join(_field(n, v) for n, v in HOST_ONLY_FIELDS)
    load = channel.unary_unary(  # the generated stub would re-serialise the message
        "/backend.Backend/LoadModel",
        request_serializer=lambda b: b,
        response_deserializer=backend_pb2.Result.FromString,
    )
    return load(raw, timeout=CALL_TIMEOUT)


def link(target_dir: str, name: str, source: str) -> None:
    os.makedirs(target_dir, exist_ok=True)
    os.symlink(os.path.abspath(support.model_path(source)), os.path.join(target_dir, name))


class HostConfigurationTest(GrpcAssertions, unittest.TestCase):
    """One server; each configuration is loaded into it the way the host would."""

    tmp: str

    @classmethod
    def setUpClass(cls):
        cls.serve()
        cls.tmp = support.temp_dir(cls, prefix="host-models-")

    def models_dir(self, name: str, pack_layout: str) -> tuple[str, list[str]]:
        """A host models directory with buffalo_sc laid out `flat`, `nested` or under a `root`
        of its own, beside the other models' files; returns it and the extra options it needs."""
        models = os.path.join(self.tmp, name)
        for neighbour in NEIGHBOURS:
            link(models, neighbour, neighbour)
        link(models, "w600k_mbf_copy_of_another_model.onnx", "w600k_mbf.onnx")
        extra: list[str] = []
        if pack_layout == "flat":
            pack_dir = models
        elif pack_layout == "nested":
            pack_dir = os.path.join(models, "buffalo_sc")
        elif pack_layout == "root":
            pack_dir = os.path.join(self.tmp, name + "-root")
            extra = [f"root:{pack_dir}"]
        else:
            raise ValueError(pack_layout)
        for member, source in support.pack_files("buffalo_sc").items():
            link(pack_dir, member, source)
        return models, extra

    def configurations(self):
        """(gallery name, models dir, options, embedding dim, attributes) of every configuration."""
        for layout in ("flat", "nested", "root"):
            models, extra = self.models_dir(f"buffalo-sc-{layout}", layout)
            # The host appends `<artifact>:<path>` options of its own to the entry's.
            options = [
                "engine:insightface",
                "model_pack:buffalo_sc",
                *support.LIVENESS_OPTIONS,
                *extra,
                f"buffalo_sc.zip:{os.path.join(models, 'buffalo_sc.zip')}",
            ]
            yield f"insightface-buffalo-sc ({layout})", "insightface-buffalo-sc", models, options, 512, ()
        models, _ = self.models_dir("opencv", "flat")
        # The gallery's insightface-opencv entry with the default set's files (MobileFaceNet standing
        # in for SFace, not obtainable here); the host's backend spells the engine `opencv`.
        options = ["engine:OpenCV", *catalog.default().load_options("default"), "backend_specific_option:true"]
        yield "insightface-opencv", "insightface-opencv", models, options, 128, ("age", "gender", "emotion")

    def test_every_gallery_configuration_answers_what_the_host_reads(self):
        for label, model, models, options, dim, attributes in self.configurations():
            with self.subTest(label):
                self.run_configuration(model, models, options, dim, attributes)

    def run_configuration(self, model, models, options, dim, attributes):
        result = host_load_model(self.running.channel, model, models, options)
        self.assertTrue(result.success, result.message)
        self.assert_healthy()
        status = self.stub.Status(backend_pb2.HealthMessage(), timeout=CALL_TIMEOUT)
        self.assertEqual(status.state, backend_pb2.StatusResponse.READY)
        self.assertEqual(status.model, model)
        for attribute in attributes:
            self.assertIn(attribute, status.attributes)
        self.assertIn("MiniFASNetV2.onnx", status.model_description)

        detected = self.stub.Detect(
            backend_pb2.DetectOptions(src=support.b64_file(support.GROUP_PHOTO), ModelIdentity=model),
            timeout=CALL_TIMEOUT,
        )
        self.assertEqual(len(detected.Detections), 6)
        self.assertTrue(all(d.class_name == "face" for d in detected.Detections))

        embedding = self.stub.Embedding(
            backend_pb2.PredictOptions(Images=[photo(SAME[0])], ModelIdentity=model), timeout=CALL_TIMEOUT
        )
        self.assertEqual(embedding.dim, dim)
        self.assertAlmostEqual(float(np.linalg.norm(embedding.embeddings)), 1.0, places=4)

        for pair, expected in ((SAME, True), (DIFFERENT, False)):
            for anti_spoofing in (False, True):
                response = self.stub.FaceVerify(
                    backend_pb2.FaceVerifyRequest(
                        img1=photo(pair[0]), img2=photo(pair[1]), anti_spoofing=anti_spoofing, ModelIdentity=model
                    ),
                    timeout=CALL_TIMEOUT,
                )
                self.assertEqual(response.verified, expected, (pair, anti_spoofing, response.distance))
                self.assertEqual(response.model, model)
                self.assertEqual(response.HasField("img1_is_real"), anti_spoofing)
                self.assertEqual(response.HasField("img2_antispoof_score"), anti_spoofing)

        analyzed = self.stub.FaceAnalyze(
            backend_pb2.FaceAnalyzeRequest(
                img=support.b64_file(support.GROUP_PHOTO),
                actions=["age", "gender", "emotion", "race"],
                anti_spoofing=True,
                ModelIdentity=model,
            ),
            timeout=CALL_TIMEOUT,
        )
        self.assertEqual(len(analyzed.faces), 6)
        for face in analyzed.faces:
            self.assertTrue(face.HasField("is_real"))
            self.assertEqual(face.age > 0, "age" in attributes)
            self.assertEqual(bool(face.dominant_gender), "gender" in attributes)
            self.assertEqual(bool(face.dominant_emotion), "emotion" in attributes)
            self.assertEqual(len(face.emotion), 7 if "emotion" in attributes else 0)
            self.assertEqual(face.dominant_race, "")
        faceless = self.stub.FaceAnalyze(
            backend_pb2.FaceAnalyzeRequest(img=support.b64_image(support.faceless_image()), ModelIdentity=model),
            timeout=CALL_TIMEOUT,
        )
        self.assertEqual(list(faceless.faces), [])

        mismatch = backend_pb2.FaceVerifyRequest(
            img1=photo(SAME[0]), img2=photo(SAME[1]), ModelIdentity="another-model"
        )
        self.assert_status(
            lambda: self.stub.FaceVerify(mismatch, timeout=CALL_TIMEOUT),
            grpc.StatusCode.NOT_FOUND,
            f"model identity mismatch: loaded '{model}'",
            clean=False,  # the gallery name insightface-opencv says "opencv"
        )

    def test_flat_and_nested_buffalo_sc_give_the_same_distances(self):
        distances = {}
        for layout in ("flat", "nested"):
            models, _ = self.models_dir(f"distances-{layout}", layout)
            result = host_load_model(
                self.running.channel, "insightface-buffalo-sc", models, ["engine:insightface", "model_pack:buffalo_sc"]
            )
            self.assertTrue(result.success, result.message)
            # Which of the same-named files was loaded, relative to ModelPath.
            folder = "buffalo_sc/" if layout == "nested" else ""
            self.assertIn(f"detector {folder}det_500m.onnx;", result.message)
            self.assertIn(f"recognizer {folder}w600k_mbf.onnx;", result.message)
            self.assertNotIn("MobileFaceNet", result.message)
            distances[layout] = [
                self.stub.FaceVerify(
                    backend_pb2.FaceVerifyRequest(img1=photo(a), img2=photo(b)), timeout=CALL_TIMEOUT
                ).distance
                for a, b in (SAME, DIFFERENT)
            ]
        np.testing.assert_allclose(distances["flat"], distances["nested"], atol=1e-6)


class RunScriptTest(unittest.TestCase):
    """run.sh, the host's entry point, started without a model: LoadModel and FaceVerify over the
    wire (SIGTERM with a request in flight is test_hardening's LifecycleTest)."""

    def test_run_sh_starts_the_server_from_another_directory(self):
        with (
            tempfile.TemporaryDirectory() as elsewhere,
            BackendProcess(command=[os.path.join(support.REPO, "run.sh")], cwd=elsewhere) as server,
        ):
            result = server.stub.LoadModel(
                backend_pb2.ModelOptions(
                    Model="m", ModelPath=support.MODELS_DIR, Options=["engine:insightface", "model_pack:buffalo_sc"]
                ),
                timeout=CALL_TIMEOUT,
            )
            self.assertTrue(result.success, result.message)
            response = server.stub.FaceVerify(
                backend_pb2.FaceVerifyRequest(img1=photo(SAME[0]), img2=photo(SAME[1])), timeout=CALL_TIMEOUT
            )
            self.assertTrue(response.verified)


if __name__ == "__main__":
    unittest.main()
