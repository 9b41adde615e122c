"""Where things are: the repository, the installed models (FACE_MODELS_DIR) and the labelled
photos of ../shared/data (FACE_SHARED_DIR)."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.environ.get("FACE_MODELS_DIR", os.path.join(REPO, "models"))
SHARED = os.environ.get("FACE_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
DATA = os.path.join(SHARED, "data")
IDENTITY_DIR = os.path.join(DATA, "face-recognition-examples")
SPOOF_DIR = os.path.join(DATA, "silent-face-samples")
GROUP_PHOTO = os.path.join(DATA, "insightface-wheel-images", "t1.jpg")

BACKEND = os.path.join(REPO, "backend.py")
# The interpreter the host's run.sh uses; another one only in a checkout without .venv.
_VENV_PYTHON = os.path.join(REPO, ".venv", "bin", "python")
PYTHON = _VENV_PYTHON if os.path.exists(_VENV_PYTHON) else sys.executable
