"""The `insightface` engine: an insightface model pack (buffalo_l/m/s/sc, antelopev2) by name.

A pack is found in one of two layouts (see `find_pack`):

- a pack directory, `<dir>/<pack>/` or `<dir>/<pack>/<pack>/`: like insightface's model_zoo
  router, each ONNX file's role is read from the model itself (input size, number of outputs),
  never from its name, so renamed or re-exported files work and unrelated ONNX files beside them
  are ignored;
- flat in `<dir>` itself, as the host extracts buffalo_l/s/sc next to every other model's files:
  there the names are all that ties a file to the pack, so the pack's own member files, as
  catalog/catalog.json lists them, are loaded and nothing else.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnxruntime as ort

import catalog
from catalog import ROLE_RECOGNIZER, ModelPack, file_sha256
from core.errors import ModelFileError, ModelOptionError

from .attributes import build_attribute_heads
from .detection import DEFAULT_DETECTION_SIZE, DEFAULT_SCORE_THRESHOLD, SCRFDDetector
from .modular import ModularFaceEngine
from .options import LoadRequest
from .quality import build_quality_head
from .recognition import ArcFaceRecognizer, is_arcface_session, profile_for
from .runtime import create_session

PACKS = tuple(catalog.default().packs)

ROLE_DETECTOR = "detector"
ROLE_GENDERAGE = "genderage"
ROLE_LANDMARKS = "landmarks"
LOADED_ROLES = (ROLE_DETECTOR, ROLE_RECOGNIZER, ROLE_GENDERAGE)  # landmarks: nothing here uses them


def model_role(session: ort.InferenceSession) -> str | None:
    """What an ONNX file in a pack is, by its tensors (insightface model_zoo ModelRouter rules)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        return None
    shape = inputs[0].shape
    if len(shape) != 4:
        return None
    height, width = shape[2], shape[3]
    if len(outputs) in (6, 9, 10, 15) and not (isinstance(height, int) and height < 128):
        return ROLE_DETECTOR
    if is_arcface_session(session):
        return ROLE_RECOGNIZER
    if height == 96 and width == 96 and outputs[0].shape[-1] == 3:
        return ROLE_GENDERAGE
    if height == 192 and width == 192:
        return ROLE_LANDMARKS
    return None


@dataclass(frozen=True)
class FoundPack:
    """Where a pack was found. `members` (role -> file) is set for a flat match, where the catalog's
    names decide; for a pack directory it is empty and every ONNX file's role is read from its tensors."""

    directory: str
    members: Mapping[str, str] = field(default_factory=dict)


def search_places(request: LoadRequest) -> list[str]:
    """The directories a pack is looked for in, in order: root, ModelPath, ~/.insightface, each
    also with its `models/` sub-directory (insightface's own layout is ~/.insightface/models/<pack>)."""
    places: list[str] = []
    for base in (request.get("root"), request.model_path, os.path.expanduser("~/.insightface")):
        for place in (base, base and os.path.join(base, "models")):
            if place and os.path.normpath(place) not in map(os.path.normpath, places):
                places.append(place)
    return places


def describe_bytes(digest: str) -> str:
    """What the catalog knows a file with this sha256 to be, for messages."""
    owners = [f"{owner}'s {blob.name}" if owner else blob.name for owner, blob in catalog.default().by_sha256(digest)]
    return f" (those are the bytes of {' / '.join(owners)})" if owners else ""


def match_flat(pack: ModelPack, place: str) -> tuple[FoundPack | None, str]:
    """The pack when `place` holds every member file the catalog lists, each with its known bytes
    where a hash is known. Otherwise (None, why not), the reason empty when no member is there.

    Every member is needed, not just the ones loaded: buffalo_sc's two files are also buffalo_s's
    detector and recognizer, and only the presence of buffalo_s's other files tells the packs apart."""
    names = [m.name for m in pack.members]
    present = [n for n in names if os.path.isfile(os.path.join(place, n))]
    if not present:
        return None, ""
    if len(present) < len(names):
        missing = [n for n in names if n not in present]
        complete = [
            other.name
            for other in catalog.default().packs.values()
            if other.name != pack.name and all(os.path.isfile(os.path.join(place, m.name)) for m in other.members)
        ]
        note = f" (they make a complete {' and '.join(complete)})" if complete else ""
        return None, f"{place} has {', '.join(present)} but not {', '.join(missing)}{note}"
    wrong = []
    for member in pack.members:
        path = os.path.join(place, member.name)
        if member.accepted_sha256 and (digest := file_sha256(path)) not in member.accepted_sha256:
            wrong.append(
                f"{path} is not {pack.name}'s {member.name}: its sha256 is {digest}, expected "
                f"{' or '.join(sorted(member.accepted_sha256))}{describe_bytes(digest)}"
            )
    if wrong:
        return None, "; ".join(wrong)
    return FoundPack(place, {m.role: os.path.join(place, m.name) for m in pack.members if m.role in LOADED_ROLES}), ""


def find_pack(pack: str, places: list[str]) -> FoundPack:
    """The first of `<place>/<pack>/`, `<place>/<pack>/<pack>/` (as the buffalo_m and antelopev2 zips
    extract) holding ONNX files, or `<place>` itself holding the whole pack flat, for each place in order."""
    known = catalog.default().packs.get(pack)
    notes = []
    for place in places:
        for directory in (os.path.join(place, pack), os.path.join(place, pack, pack)):
            if glob.glob(os.path.join(directory, "*.onnx")):
                return FoundPack(directory)
        if known is not None:
            found, note = match_flat(known, place)
            if found is not None:
                return found
            notes.append(note)
    wanted = f"a directory {pack}/ or {pack}/{pack}/ holding its ONNX files"
    if known is None:
        wanted += f" ('{pack}' is not a pack the catalog knows: {', '.join(PACKS)})"
    else:
        wanted += f", or all of its files side by side: {', '.join(m.name for m in known.members)}"
    reasons = "".join(f" {n}." for n in notes if n)
    raise ModelFileError(
        f"model pack '{pack}' not found. Looked in {', '.join(places)} for {wanted}."
        f"{reasons} Install it into models/{pack}/ or pass root:<dir>."
    )


def load_roles(found: FoundPack, pack: str, threads: int | None) -> dict[str, tuple[str, ort.InferenceSession]]:
    """(file, session) by role: the named members of a flat pack, each checked to be what its name
    says; in a pack directory the first file (by name) of each role."""
    roles: dict[str, tuple[str, ort.InferenceSession]] = {}
    if found.members:
        for role, path in found.members.items():
            session = create_session(path, threads)
            if model_role(session) != role:
                raise ModelFileError(f"{path} is named as {pack}'s {role}, but its tensors are not a {role}'s")
            roles[role] = (path, session)
        return roles
    for path in sorted(glob.glob(os.path.join(found.directory, "*.onnx"))):
        session = create_session(path, threads)
        file_role = model_role(session)
        if file_role in LOADED_ROLES and file_role not in roles:
            roles[file_role] = (path, session)
    return roles


def build_insightface_engine(request: LoadRequest) -> ModularFaceEngine:
    pack = request.get("model_pack") or request.model_name
    if not pack:
        raise ModelOptionError("engine insightface needs model_pack:<name> (one of " + ", ".join(PACKS) + ")")
    if os.sep in pack or pack.startswith("."):
        raise ModelOptionError(f"model_pack must be a pack name, got '{pack}'")
    found = find_pack(pack, search_places(request))
    roles = load_roles(found, pack, request.threads or None)
    for needed in (ROLE_DETECTOR, ROLE_RECOGNIZER):
        if needed not in roles:
            raise ModelFileError(f"model pack '{pack}' in {found.directory} has no {needed} ONNX file")

    detector_path, detector_session = roles.pop(ROLE_DETECTOR)
    detector = SCRFDDetector(
        detector_session,
        input_size=request.det_size() or DEFAULT_DETECTION_SIZE,
        score_threshold=request.float_in_range("det_thresh", 0.0, 1.0, DEFAULT_SCORE_THRESHOLD),
    )
    recognizer_path, recognizer_session = roles[ROLE_RECOGNIZER]
    recognizer = ArcFaceRecognizer(
        recognizer_session, profile_for(file_sha256(recognizer_path), request.get("recognizer_preprocess"))
    )
    # age_onnx / gender_onnx first; the pack's genderage.onnx for the actions they leave.
    genderage_path, genderage_session = roles.get(ROLE_GENDERAGE, ("", None))
    heads = build_attribute_heads(request, genderage_session, genderage_path)
    return ModularFaceEngine(
        pack,
        detector,
        recognizer,
        heads,
        verify_threshold=request.verify_threshold(),
        files={ROLE_DETECTOR: detector_path, ROLE_RECOGNIZER: recognizer_path},
        quality=build_quality_head(request),
    )
