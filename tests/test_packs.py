"""Where an insightface pack is found: in a pack directory (`<dir>/<pack>/`, `<dir>/<pack>/<pack>/`)
or flat among other models' files, as the host extracts buffalo_l/s/sc into ModelPath. The
layouts are built in temporary directories from the installed real weights (symlinks), and what
they load is checked by the files the engine reports and by real verifications.
"""

from __future__ import annotations

import os
import unittest
from unittest import mock

import catalog
from core.errors import ModelFileError
from engines import build_engine, parse_load_request
from engines.detection import SCRFDDetector
from face_service import FaceService
from tests import support

PACK = "buffalo_sc"
# Other models' files the host keeps in the same ModelPath. The recognizers and the second SCRFD
# export are ones a role-by-tensors reading of the directory could pick instead of the pack's.
NEIGHBOURS = (
    "face_detection_yunet_2023mar.onnx",
    "MobileFaceNet.onnx",
    "MiniFASNetV2.onnx",
    "MiniFASNetV1SE.onnx",
    "scrfd_500m_bnkps.onnx",
    "age-v1.onnx",
    "gender-v1.onnx",
)


def build(options, model_path: str, name: str = PACK):
    return build_engine(parse_load_request(name, model_path, 0, list(options)))


def pack_options(pack: str = PACK, *extra: str) -> list[str]:
    return ["engine:insightface", f"model_pack:{pack}", *extra]


class PackLayoutTest(unittest.TestCase):
    pack_files: dict[str, str]
    neighbours: dict[str, str]
    photos: list[str]

    @classmethod
    def setUpClass(cls):
        support.engine_setup(support.ENGINE_INSIGHTFACE)
        cls.pack_files = support.pack_files(PACK)
        cls.neighbours = {n: support.model_path(n) for n in NEIGHBOURS}
        cls.photos = [path for path, _ in support.single_face_photos()]

    def setUp(self):
        self.tmp = support.temp_dir(self)
        # ~/.insightface is a search place: an empty home keeps the user's own packs out of the test.
        home = self.place("home")
        patcher = mock.patch.dict(os.environ, {"HOME": home})
        patcher.start()
        self.addCleanup(patcher.stop)

    def place(self, *parts: str, files: dict[str, str] | None = None) -> str:
        """A directory under the test's temporary one, holding symlinks name -> real file."""
        directory = os.path.join(self.tmp, *parts)
        os.makedirs(directory, exist_ok=True)
        for name, source in (files or {}).items():
            os.symlink(source, os.path.join(directory, name))
        return directory

    def host_model_path(self, *parts: str) -> str:
        """ModelPath as the host leaves it: buffalo_sc.zip extracted flat beside other models."""
        return self.place(
            *parts,
            files={
                **self.neighbours,
                **self.pack_files,
                # another pack's recognizer (buffalo_l's name, some ArcFace bytes)
                "w600k_r50.onnx": self.neighbours["MobileFaceNet.onnx"],
            },
        )

    def assert_loaded_from(self, engine, directory: str) -> None:
        self.assertEqual(engine.name, PACK)
        self.assertEqual(
            engine.files,
            {
                "detector": os.path.join(directory, "det_500m.onnx"),
                "recognizer": os.path.join(directory, "w600k_mbf.onnx"),
            },
        )
        self.assertIsInstance(engine.detector, SCRFDDetector)
        self.assertEqual(engine.recognizer.profile.name, "w600k_mbf")
        self.assertEqual(engine.embedding_dim, 512)
        self.assertEqual(engine.attribute_heads, ())

    def distances(self, model_path: str, options) -> list[float]:
        """FaceVerify distances of neighbouring pairs of the single-face photos."""
        service = FaceService(helpers=0)
        service.load(parse_load_request(PACK, model_path, 0, list(options)))
        images = [support.b64_file(p) for p in self.photos]
        return [service.verify(a, b, identity=PACK).distance for a, b in zip(images, images[1:])]

    # -- found --------------------------------------------------------------------------------

    def test_flat_model_path_loads_exactly_the_pack_files(self):
        flat = self.host_model_path("flat")
        self.assert_loaded_from(build(pack_options(), flat), flat)
        nested = self.place("nested", PACK, files=self.pack_files)
        flat_distances = self.distances(flat, pack_options())
        nested_distances = self.distances(os.path.dirname(nested), pack_options())
        self.assertEqual(len(flat_distances), len(self.photos) - 1)
        for got, want in zip(flat_distances, nested_distances):
            self.assertAlmostEqual(got, want, places=6)

    def test_pack_directory_once_and_twice(self):
        for parts in ((PACK,), (PACK, PACK)):
            with self.subTest("/".join(parts)):
                model_path = self.place(f"depth{len(parts)}")
                directory = self.place(f"depth{len(parts)}", *parts, files=self.pack_files)
                self.assert_loaded_from(build(pack_options(), model_path), directory)

    def test_pack_directory_comes_before_flat_files_in_the_same_place(self):
        model_path = self.host_model_path("both")
        directory = self.place("both", PACK, files=self.pack_files)
        self.assert_loaded_from(build(pack_options(), model_path), directory)

    def test_root_option_holding_a_flat_pack(self):
        root = self.host_model_path("root")
        empty = self.place("empty")
        self.assert_loaded_from(build(pack_options(PACK, f"root:{root}"), empty), root)

    def test_flat_pack_under_models_subdirectory(self):
        model_path = self.place("above")
        below = self.host_model_path("above", "models")
        self.assert_loaded_from(build(pack_options(), model_path), below)

    def test_model_name_names_the_pack_when_model_pack_is_absent(self):
        flat = self.host_model_path("byname")
        self.assert_loaded_from(build(["engine:insightface"], flat, name=PACK), flat)

    # -- told apart ---------------------------------------------------------------------------

    def test_a_pack_with_more_members_is_not_loaded_from_a_smaller_one(self):
        flat = self.host_model_path("sc_only")
        with self.assertRaises(ModelFileError) as caught:
            build(pack_options("buffalo_s"), flat)
        message = str(caught.exception)
        for expected in ("buffalo_s", flat, "genderage.onnx", "2d106det.onnx", "1k3d68.onnx", f"complete {PACK}"):
            self.assertIn(expected, message)

    def test_smaller_pack_loads_only_its_members_beside_a_bigger_one(self):
        # buffalo_s's extra members, by name only: MiniFASNet stands in for each (no real one here).
        stand_in = self.neighbours["MiniFASNetV2.onnx"]
        flat = self.host_model_path("s_and_sc")
        self.place("s_and_sc", files={n: stand_in for n in ("genderage.onnx", "2d106det.onnx", "1k3d68.onnx")})
        self.assert_loaded_from(build(pack_options(), flat), flat)
        with self.assertRaises(ModelFileError) as caught:
            build(pack_options("buffalo_s"), flat)
        message = str(caught.exception)
        self.assertIn(os.path.join(flat, "genderage.onnx"), message)
        self.assertIn("not a genderage", message)

    def test_member_name_with_other_bytes_is_refused(self):
        # Each member in turn replaced by another model's file of its role.
        impostors = {"recognizer": "MobileFaceNet.onnx", "detector": "face_detection_yunet_2023mar.onnx"}
        for member, impostor in ((m.name, impostors[m.role]) for m in catalog.default().packs[PACK].members):
            with self.subTest(member):
                flat = self.place(f"wrong_{member}", files={**self.pack_files, member: self.neighbours[impostor]})
                with self.assertRaises(ModelFileError) as caught:
                    build(pack_options(), flat)
                message = str(caught.exception)
                self.assertIn(f"{os.path.join(flat, member)} is not {PACK}'s {member}", message)
                self.assertIn(catalog.file_sha256(self.neighbours[impostor]), message)
                self.assertIn(impostor, message)  # the catalog knows whose bytes they are

    def test_alternative_bytes_of_a_member_are_accepted(self):
        # scrfd_500m_bnkps.onnx is another export of det_500m (catalog alt_sha256).
        flat = self.place("alt", files={**self.pack_files, "det_500m.onnx": self.neighbours["scrfd_500m_bnkps.onnx"]})
        self.assert_loaded_from(build(pack_options(), flat), flat)

    # -- not found ----------------------------------------------------------------------------

    def test_missing_pack_names_every_place_and_the_files_expected(self):
        model_path = self.host_model_path("no_l")
        root = self.place("root_no_l")
        with self.assertRaises(ModelFileError) as caught:
            build(pack_options("buffalo_l", f"root:{root}"), model_path)
        message = str(caught.exception)
        home = os.path.expanduser("~/.insightface")
        for place in (
            root,
            os.path.join(root, "models"),
            model_path,
            os.path.join(model_path, "models"),
            home,
            os.path.join(home, "models"),
        ):
            self.assertIn(place, message)
        for member in catalog.default().packs["buffalo_l"].members:
            self.assertIn(member.name, message)
        self.assertIn("buffalo_l/buffalo_l/", message)

    def test_unknown_pack_lists_the_catalog_packs(self):
        with self.assertRaises(ModelFileError) as caught:
            build(pack_options("buffalo_xx"), self.host_model_path("xx"))
        for pack in catalog.default().packs:
            self.assertIn(pack, str(caught.exception))


if __name__ == "__main__":
    unittest.main()
