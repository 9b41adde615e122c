"""The `insightface` engine: an insightface model pack (buffalo_l/m/s/sc, antelopev2) by name.

A pack is a directory of ONNX files. Like insightface's model_zoo router, each file's role is
read from the model itself (input size, number of outputs), never from its name, so renamed or
re-exported files work and unrelated ONNX files in the same directory are ignored.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import onnxruntime as ort

from catalog import file_sha256

from .attributes import build_attribute_heads
from .detection import DEFAULT_DETECTION_SIZE, DEFAULT_SCORE_THRESHOLD, SCRFDDetector
from .errors import ModelFileError, ModelOptionError
from .modular import ModularFaceEngine
from .options import LoadRequest
from .recognition import ArcFaceRecognizer, is_arcface_session, profile_for
from .runtime import create_session

PACKS = ("buffalo_l", "buffalo_m", "buffalo_s", "buffalo_sc", "antelopev2")

ROLE_DETECTOR = "detector"
ROLE_RECOGNIZER = "recognizer"
ROLE_GENDERAGE = "genderage"
ROLE_LANDMARKS = "landmarks"


def model_role(session: ort.InferenceSession) -> Optional[str]:
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


def find_pack_dir(pack: str, search_dirs: list[str]) -> str:
    """The directory holding the pack's ONNX files, flat (`<dir>/<pack>/*.onnx`) or nested
    (`<dir>/<pack>/<pack>/*.onnx`, as the buffalo_m and antelopev2 zips extract)."""
    tried = []
    for base in search_dirs:
        for candidate in (os.path.join(base, pack), os.path.join(base, "models", pack)):
            for directory in (candidate, os.path.join(candidate, pack)):
                tried.append(directory)
                if glob.glob(os.path.join(directory, "*.onnx")):
                    return directory
    raise ModelFileError(f"model pack '{pack}' not found; looked in: {', '.join(tried)}"
                         f" (install it into models/{pack}/ or pass root:<dir>)")


def build_insightface_engine(request: LoadRequest) -> ModularFaceEngine:
    pack = request.get("model_pack") or request.model_name
    if not pack:
        raise ModelOptionError("engine insightface needs model_pack:<name> (one of " + ", ".join(PACKS) + ")")
    if os.sep in pack or pack.startswith("."):
        raise ModelOptionError(f"model_pack must be a pack name, got '{pack}'")
    search_dirs = [d for d in (request.get("root"), request.model_path, os.path.expanduser("~/.insightface"))
                   if d]
    pack_dir = find_pack_dir(pack, search_dirs)

    roles: dict[str, tuple[str, ort.InferenceSession]] = {}
    for path in sorted(glob.glob(os.path.join(pack_dir, "*.onnx"))):
        session = create_session(path, request.threads or None)
        role = model_role(session)
        if role in (ROLE_DETECTOR, ROLE_RECOGNIZER, ROLE_GENDERAGE) and role not in roles:
            roles[role] = (path, session)
    for needed in (ROLE_DETECTOR, ROLE_RECOGNIZER):
        if needed not in roles:
            raise ModelFileError(f"model pack '{pack}' in {pack_dir} has no {needed} ONNX file")

    detector = SCRFDDetector(roles[ROLE_DETECTOR][1],
                             input_size=request.det_size() or DEFAULT_DETECTION_SIZE,
                             score_threshold=request.float_in_range("det_thresh", 0.0, 1.0, DEFAULT_SCORE_THRESHOLD))
    recognizer_path, recognizer_session = roles[ROLE_RECOGNIZER]
    recognizer = ArcFaceRecognizer(
        recognizer_session, profile_for(file_sha256(recognizer_path), request.get("recognizer_preprocess")))
    # age_onnx / gender_onnx first; the pack's genderage.onnx for the actions they leave.
    heads = build_attribute_heads(request, roles.get(ROLE_GENDERAGE, (None, None))[1])
    return ModularFaceEngine(pack, detector, recognizer, heads,
                             verify_threshold=request.float_in_range("verify_threshold", 0.0, 2.0))

