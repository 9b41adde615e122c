"""Every model fact lives once, in catalog/catalog.json: these tests fail when one is written again.

Scanned: the repository's own text files (not .venv, models/, generated stubs or test data).
- No sha256 the catalog knows appears anywhere else.
- No Python literal restates a recognizer's threshold, the default set (a collection naming every
  file of the `default` group) or a pack's member list (a collection naming every member), or
  lists the packs.
- The README may quote the catalog for its readers (the thresholds table, the default set, the
  packs LoadModel knows), and a test here checks each quote against the catalog.
"""

from __future__ import annotations

import ast
import os
import re
import unittest
from collections.abc import Iterator

import catalog
from tests.support import REPO
from tests.test_catalog import all_hashes

HEX64 = re.compile(r"\b[0-9a-f]{64}\b")
SKIPPED_DIRS = {
    ".git",
    ".venv",
    "models",
    "__pycache__",
    ".hypothesis",
    os.path.join("tests", "data"),
    os.path.join("bench", "results"),
}
GENERATED = re.compile(r"^backend_pb2.*\.pyi?$")


def repository_files() -> Iterator[tuple[str, str]]:
    """(path relative to the repository, text) of every text file the project writes itself."""
    for top, dirs, files in os.walk(REPO):
        rel_top = os.path.relpath(top, REPO)
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in SKIPPED_DIRS
            and os.path.normpath(os.path.join(rel_top, d)) not in SKIPPED_DIRS
            and not os.path.islink(os.path.join(top, d))
        )
        for name in sorted(files):
            path = os.path.join(top, name)
            if GENERATED.match(name) or os.path.islink(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            if b"\0" not in data:
                yield os.path.normpath(os.path.relpath(path, REPO)), data.decode("utf-8", errors="replace")


def names_in(text: str, names: set[str]) -> set[str]:
    """The file names of `names` that `text` is or ends with (`key:name`, `dir/name`)."""
    return {n for n in names if text == n or text.endswith((":" + n, "/" + n))}


def names_in_text(text: str, names: set[str]) -> set[str]:
    """The file names of `names` that appear as whole words in `text`."""
    return {n for n in names if re.search(rf"(?<![\w.-]){re.escape(n)}(?![\w.-])", text)}


class Literals(ast.NodeVisitor):
    """Collects what a Python module's literals say: floats, and the strings of each collection.
    Module-level `NAME = "text"` constants are resolved where a collection uses the name."""

    def __init__(self, tree: ast.Module) -> None:
        self.constants = {
            t.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        }
        self.floats: list[tuple[int, float]] = []
        self.collections: list[tuple[int, list[str]]] = []
        self.strings: list[tuple[int, str]] = []
        self.visit(tree)

    def text(self, node: ast.expr | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return self.constants.get(node.id)
        if isinstance(node, ast.JoinedStr):  # f"emotion_onnx:{FILE}": its constant parts, names resolved
            parts = [self.text(v.value if isinstance(v, ast.FormattedValue) else v) for v in node.values]
            return "".join(p or "" for p in parts)
        return None

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, float):
            self.floats.append((node.lineno, node.value))
        elif isinstance(node.value, str):
            self.strings.append((node.lineno, node.value))

    def _collection(self, node: ast.expr, items: list[ast.expr | None]) -> None:
        texts = [t for t in map(self.text, items) if t is not None]
        if texts:
            self.collections.append((node.lineno, texts))
        self.generic_visit(node)

    def visit_List(self, node: ast.List) -> None:
        self._collection(node, list(node.elts))

    def visit_Tuple(self, node: ast.Tuple) -> None:
        self._collection(node, list(node.elts))

    def visit_Set(self, node: ast.Set) -> None:
        self._collection(node, list(node.elts))

    def visit_Dict(self, node: ast.Dict) -> None:
        self._collection(node, list(node.keys))


class SingleSourceTest(unittest.TestCase):
    cat: catalog.Catalog
    files: dict[str, str]  # path relative to the repository -> text
    default_files: set[str]
    packs: dict[str, set[str]]  # pack -> member names, for packs of several members
    all_names: set[str]
    thresholds: set[float]

    @classmethod
    def setUpClass(cls) -> None:
        cls.cat = catalog.default()
        cls.files = dict(repository_files())
        cls.default_files = {e.name for e in cls.cat.expand(["default"])}
        cls.packs = {p.name: {m.name for m in p.members} for p in cls.cat.packs.values() if len(p.members) > 1}
        cls.all_names = cls.default_files | set().union(*cls.packs.values())
        thresholds = {f.threshold for f in cls.cat.files.values() if f.role == "recognizer" and f.threshold}
        # A threshold is also written as the similarity it is derived from (1 - distance).
        cls.thresholds = thresholds | {round(1 - t, 4) for t in thresholds}

    def python_files(self) -> Iterator[tuple[str, Literals]]:
        for rel, text in self.files.items():
            if rel.endswith(".py"):
                yield rel, Literals(ast.parse(text, rel))

    def test_scan_sees_the_code(self) -> None:
        for rel in (
            "face_service.py",
            os.path.join("engines", "recognition.py"),
            "README.md",
            os.path.join("tests", "support.py"),
            os.path.join("bench", "bench.py"),
        ):
            self.assertIn(rel, self.files)
        self.assertFalse([rel for rel in self.files if rel.startswith((".venv", "models" + os.sep))])

    def test_no_catalog_hash_outside_the_catalog(self) -> None:
        known = all_hashes(self.cat)
        found = {
            f"{rel}: {h}"
            for rel, text in self.files.items()
            if rel != os.path.join("catalog", "catalog.json")
            for h in HEX64.findall(text)
            if h in known
        }
        self.assertFalse(
            found, "sha256 of catalogued files written outside catalog/catalog.json (read them with catalog.default())"
        )

    def test_no_recognizer_threshold_literal(self) -> None:
        found = [
            f"{rel}:{line}: {value}"
            for rel, module in self.python_files()
            for line, value in module.floats
            if round(value, 4) in self.thresholds
        ]
        self.assertFalse(
            found,
            "a recognizer threshold written in code: read it from the catalog "
            "(engines.recognition.recognizer_profile / catalog.default().files[...].threshold)",
        )

    def test_no_default_set_or_pack_member_list(self) -> None:
        pack_names = set(self.cat.packs)
        found = []
        for rel, module in self.python_files():
            for line, texts in module.collections:
                mentioned = set().union(*(names_in(t, self.all_names) for t in texts))
                if self.default_files <= mentioned:
                    found.append(f"{rel}:{line}: the default set (catalog group 'default')")
                found += [
                    f"{rel}:{line}: the members of {pack}"
                    for pack, members in self.packs.items()
                    if members <= mentioned
                ]
                if pack_names <= set(texts):
                    found.append(f"{rel}:{line}: the catalog's packs")
            found += [
                f"{rel}:{line}: the catalog's packs"
                for line, text in module.strings
                if pack_names <= set(re.findall(r"[\w.]+", text))
            ]
        self.assertFalse(found, "written again instead of read from catalog.default()")

    # -- the README's quotes of the catalog ------------------------------------------------------
    def readme(self) -> str:
        return self.files["README.md"]

    def test_readme_thresholds_table_matches_the_catalog(self) -> None:
        section = self.readme().split("\n## Thresholds\n", 1)[1].split("\n## ", 1)[0]
        quoted = {}
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            names = re.findall(r"`([^`]+\.onnx)`", cells[0]) if line.startswith("|") and len(cells) > 2 else []
            if names:
                quoted[names[0]] = float(cells[1])
        recognizers = {f.name: f.threshold for f in self.cat.files.values() if f.role == "recognizer"}
        self.assertEqual(quoted, recognizers)

    def test_readme_default_set_matches_the_catalog(self) -> None:
        blocks = re.findall(r"```[a-z]*\n(.*?)```", self.readme(), flags=re.DOTALL)
        # A block naming most of the default set quotes it (and must quote all of it, in order).
        quoting = [b for b in blocks if 2 * len(names_in_text(b, self.default_files)) > len(self.default_files)]
        self.assertGreaterEqual(len(quoting), 2, "the LocalAI YAML example and the default set block")
        expected = list(self.cat.load_options("default"))
        for block in quoting:
            options = re.findall(r"\b([a-z0-9_]+:[\w.-]+\.onnx)\b", block)
            self.assertEqual(options, expected, block)

    def test_readme_lists_the_catalog_packs(self) -> None:
        pack_names = set(self.cat.packs)
        lines = [
            line for line in self.readme().splitlines() if len(pack_names & set(re.findall(r"`([\w.]+)`", line))) > 2
        ]
        self.assertTrue(lines, "the model_pack row of the LoadModel options table")
        for line in lines:
            self.assertTrue(pack_names <= set(re.findall(r"`([\w.]+)`", line)), line)


if __name__ == "__main__":
    unittest.main()
