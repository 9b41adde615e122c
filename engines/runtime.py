"""The one place that creates onnxruntime sessions, so every model gets the same threading policy."""
from __future__ import annotations

import os
from typing import Optional

import onnxruntime as ort

from .errors import ModelFileError

# Threads each session may use for one Run. Concurrency comes from the gRPC worker pool running
# several requests side by side; letting every session also spin up all cores makes concurrent
# requests fight over them. Overridden by ModelOptions.Threads via set_default_threads().
_default_intra_op_threads = 1


def set_default_threads(threads: int) -> None:
    global _default_intra_op_threads
    _default_intra_op_threads = max(1, int(threads))


def default_threads() -> int:
    return _default_intra_op_threads


def create_session(path: str, threads: Optional[int] = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for `path`; a missing or unreadable file is a ModelFileError."""
    if not os.path.isfile(path):
        raise ModelFileError(f"model file not found: {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or _default_intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn a core waiting for work; with many requests in flight that core is
    # better spent on another request.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types for bad files
        raise ModelFileError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0][:200]}") from exc
