"""The `onnx_direct` engine: a detector ONNX plus a recognizer ONNX named by LoadModel options.

The detector is YuNet or SCRFD (both run by onnxruntime); the
recognizer is SFace (run by OpenCV's FaceRecognizerSF) or any ArcFace-style 112x112 model.
Which is which is read from the file itself.
"""

from __future__ import annotations

import os

from catalog import file_sha256
from core.errors import ModelFileError, ModelOptionError

from .attributes import build_attribute_heads
from .detection import DEFAULT_DETECTION_SIZE, SCRFDDetector, YuNetDetector
from .modular import ModularFaceEngine
from .options import LoadRequest
from .quality import build_quality_head
from .recognition import KNOWN_RECOGNIZERS, SFACE_PROFILE, SFACE_RUNNER, ArcFaceRecognizer, SFaceRecognizer, profile_for
from .runtime import create_session, follows_the_load

# YuNet scores real faces 0.88-0.95 on ../shared/data and background blobs up to 0.7; OpenCV
# Zoo's demo default of 0.9 drops turned heads in group photos (t1.jpg scores 0.88-0.93).
YUNET_SCORE_THRESHOLD = 0.8
SCRFD_SCORE_THRESHOLD = 0.5  # insightface FaceAnalysis default det_thresh


def is_yunet(output_names: list[str]) -> bool:
    # YuNet (2023mar) has separate objectness heads obj_8/16/32; SCRFD has none.
    return any(name.startswith("obj_") for name in output_names)


def build_detector(path: str, request: LoadRequest):
    session = create_session(path, request.threads or None)
    output_names = [o.name for o in session.get_outputs()]
    size = request.det_size() or DEFAULT_DETECTION_SIZE
    if is_yunet(output_names):
        del session  # exported at 640x640: YuNetDetector opens it for any input size
        return YuNetDetector(
            path,
            input_size=size,
            score_threshold=request.float_in_range("det_thresh", 0.0, 1.0, YUNET_SCORE_THRESHOLD),
            threads=request.threads or None,
        )
    if len(output_names) in (9, 15):
        del session  # the probe; the detector's own session is set up differently
        return SCRFDDetector(
            create_session(path, request.threads or None),
            input_size=size,
            score_threshold=request.float_in_range("det_thresh", 0.0, 1.0, SCRFD_SCORE_THRESHOLD),
        )
    raise ModelFileError(
        f"detector_onnx {path} is neither YuNet nor an SCRFD model with landmarks ({len(output_names)} outputs)"
    )


def build_recognizer(path: str, request: LoadRequest):
    sha256 = file_sha256(path)
    known = KNOWN_RECOGNIZERS.get(sha256)
    if known is None and "sface" in os.path.basename(path).lower():
        known = SFACE_PROFILE
    if known is not None and known.runner == SFACE_RUNNER:
        return SFaceRecognizer(path, known)
    profile = profile_for(sha256, request.get("recognizer_preprocess"))
    # Following the load (runtime.follows_the_load): one thread per Run, the two crops of a lone
    # request side by side.
    flip_beside = profile.flip and follows_the_load(request.threads or None)
    session = create_session(path, 1 if flip_beside else request.threads or None)
    return ArcFaceRecognizer(session, profile, flip_beside)


def build_onnx_direct_engine(request: LoadRequest) -> ModularFaceEngine:
    missing = [k for k in ("detector_onnx", "recognizer_onnx") if not request.get(k)]
    if missing:
        raise ModelOptionError("engine onnx_direct needs " + " and ".join(f"{k}:<file>" for k in missing))
    detector_path = request.file("detector_onnx")
    recognizer_path = request.file("recognizer_onnx")
    assert detector_path and recognizer_path  # both options are set (checked above), so file() gives a path
    detector = build_detector(detector_path, request)
    recognizer = build_recognizer(recognizer_path, request)
    name = f"{os.path.splitext(os.path.basename(detector_path))[0]}+{recognizer.profile.name}"
    heads = build_attribute_heads(request)  # age_onnx / gender_onnx
    return ModularFaceEngine(
        name,
        detector,
        recognizer,
        heads,
        verify_threshold=request.verify_threshold(),
        files={"detector": detector_path, "recognizer": recognizer_path},
        quality=build_quality_head(request),
    )
