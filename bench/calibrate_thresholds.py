"""Where each recognizer's default threshold comes from: `python bench/calibrate_thresholds.py`.

On the calibration photos it prints the widest same-person and the closest different-person
distance, and the midpoint of the gap between them; then the accept/reject rates at the shipped
threshold on calibration and held-out pairs (see face_eval.py for the two sets).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engines import build_engine, parse_load_request
from face_eval import calibration_faces, heldout_faces, pair_stats
from harness.paths import DATA, MODELS_DIR

SETUPS = {
    "w600k_mbf via SCRFD-500M (buffalo_sc)": ["engine:insightface", "model_pack:buffalo_sc"],
    "w600k_mbf via YuNet": ["detector_onnx:face_detection_yunet_2023mar.onnx", "recognizer_onnx:w600k_mbf.onnx"],
    "MobileFaceNet via YuNet (default set)": [
        "detector_onnx:face_detection_yunet_2023mar.onnx",
        "recognizer_onnx:MobileFaceNet.onnx",
    ],
    "MobileFaceNet via SCRFD-500M": ["detector_onnx:scrfd_500m_bnkps.onnx", "recognizer_onnx:MobileFaceNet.onnx"],
}


def main() -> None:
    report = {}
    for label, options in SETUPS.items():
        engine = build_engine(parse_load_request("calibration", MODELS_DIR, 0, options))
        calibration = calibration_faces(engine, DATA)
        heldout = heldout_faces(engine, DATA)
        threshold = engine.default_threshold
        cal = pair_stats(calibration, threshold)
        held = pair_stats(calibration + heldout, threshold, only_with=heldout)
        report[label] = {
            "shipped_threshold": threshold,
            "calibration": {
                "pairs_same": cal.same,
                "pairs_different": cal.different,
                "max_same_distance": round(cal.max_same_distance, 4),
                "min_different_distance": round(cal.min_different_distance, 4),
                "gap_midpoint": round((cal.max_same_distance + cal.min_different_distance) / 2, 4),
                "tar": cal.tar,
                "true_reject_rate": cal.true_reject_rate,
            },
            "heldout": {
                "pairs_same": held.same,
                "pairs_different": held.different,
                "max_same_distance": round(held.max_same_distance, 4),
                "min_different_distance": round(held.min_different_distance, 4),
                "tar": held.tar,
                "true_reject_rate": held.true_reject_rate,
            },
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
