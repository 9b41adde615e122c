"""The liveness engines a model was loaded with, run together and fused into one verdict per face.

Two engines exist: the Silent-Face MiniFASNet pair (V2 and/or V1SE, averaged like upstream:
minifasnet.py) and MiniFAS retrained on CelebA-Spoof (celeba_minifas.py). Any subset may be
loaded. The fused verdict is "every loaded engine says real" and the fused score is the lowest
engine P(real), so one engine fooled by a spoof cannot pass it alone; with the MiniFASNet pair
only, verdict and score are the pair's own (bench/FINDINGS.md, "liveness fusion", has the
measurements behind the rule).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np

import catalog
from catalog import ROLE_ANTISPOOF
from core.concurrency import run_side_by_side, usable_cpus
from engines.base import FaceDetection
from engines.options import LoadRequest

from .celeba_minifas import CELEBA_CROP_SCALE, CELEBA_OPTION, CelebAMiniFAS
from .gates import MIN_FACE_PX, Gate, LivenessStatus, gate
from .minifasnet import (
    INTRA_OP_THREADS,
    MINIFASNET_OPTIONS,
    REAL_CLASS,
    V1SE_CROP_SCALE,
    V2_CROP_SCALE,
    MiniFASNet,
)

# Every liveness option of the catalog, in its order, with its file; and the P(real) cut the
# engines share (the catalog says where it comes from).
LIVENESS_OPTIONS = tuple(entry.load_key for entry in catalog.default().loadable(ROLE_ANTISPOOF))
LIVENESS_FILES = tuple(entry.name for entry in catalog.default().loadable(ROLE_ANTISPOOF))
DEFAULT_THRESHOLD = catalog.default().shared_threshold(ROLE_ANTISPOOF)

# FAILED_PRECONDITION's message when anti_spoofing is asked of a model loaded without these.
LIVENESS_MISSING = (
    "anti_spoofing was requested but the loaded model has no liveness weights: load it with "
    + " and/or ".join(f"{option}:{name}" for option, name in zip(LIVENESS_OPTIONS, LIVENESS_FILES))
    + " (install the files into models/ with `make models`)"
)

# Engine names, the keys of LivenessResult.engines.
ENGINE_MINIFASNET = "minifasnet"
ENGINE_CELEBA = "celeba_minifas"


@dataclass(frozen=True)
class LivenessResult:
    """Verdict for one face: `status` LIVE, SPOOF or INCONCLUSIVE (then `gate` says why);
    `is_real` is status LIVE; `score` is the fused P(real), `engines` each engine's P(real),
    reported for a gated face too though they decide nothing there; `probabilities` are the
    MiniFASNet pair's (print, real, replay), None without the pair."""

    status: LivenessStatus
    score: float
    probabilities: tuple[float, float, float] | None
    engines: Mapping[str, float] = field(default_factory=dict)
    gate: Gate | None = None

    @property
    def is_real(self) -> bool:
        return self.status is LivenessStatus.LIVE


class LivenessEnsemble:
    """The loaded liveness models: MiniFASNetV2 and/or V1SE, and/or the CelebA-Spoof MiniFAS.

    With more than one CPU the last model runs on a helper thread while the caller runs the
    others: the MiniFASNet pair side by side as before, and the CelebA model (about as slow as
    the pair together) beside the pair. Safe to call from many threads at once (onnxruntime
    sessions are).
    """

    def __init__(
        self,
        v2_path: str | None = None,
        v1se_path: str | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        threads: int | None = None,
        celeba_path: str | None = None,
    ) -> None:
        if not v2_path and not v1se_path and not celeba_path:
            raise ValueError("liveness needs at least one model: give v2_path, v1se_path and/or celeba_path")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"liveness threshold must be within [0, 1], got {threshold}")
        self.threshold = threshold
        # A host that grants one thread (ModelOptions.Threads = 1) gets the models in turn.
        use_helper = threads != 1
        threads = threads or INTRA_OP_THREADS
        pair = []
        if v2_path:
            pair.append(MiniFASNet(v2_path, V2_CROP_SCALE, threads))
        if v1se_path:
            pair.append(MiniFASNet(v1se_path, V1SE_CROP_SCALE, threads))
        self.minifasnets: tuple[MiniFASNet, ...] = tuple(pair)
        self.celeba = CelebAMiniFAS(celeba_path, CELEBA_CROP_SCALE, threads) if celeba_path else None
        celeba = () if self.celeba is None else (self.celeba,)
        self.models: tuple[MiniFASNet | CelebAMiniFAS, ...] = (*self.minifasnets, *celeba)
        # One helper is enough: it only runs the last model while the caller runs the others;
        # when it is busy with another request, the caller runs all (core.concurrency).
        self._helper = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="liveness")
            if use_helper and len(self.models) > 1 and usable_cpus() > 1
            else None
        )

    def magnification(self, face: FaceDetection) -> float:
        """How many times the liveness crops enlarge the image's pixels of `face`, or how far the
        face falls short of the FACE_TOO_SMALL side: the engines read print grain and screen
        moire that an enlarged crop does not carry, and the gate must see the face at a size
        that decides as the full image would."""
        too_small = MIN_FACE_PX / max(min(face.width, face.height), 1e-6)
        return max(too_small, *(model.magnification(face) for model in self.models))

    @property
    def runs_models_side_by_side(self) -> bool:
        return self._helper is not None

    def score(
        self, image_bgr: np.ndarray, faces: Sequence[FaceDetection], qualities: Sequence[float] | None = None
    ) -> list[LivenessResult]:
        """One verdict per face of `image_bgr`, in the order of `faces`; `qualities`, each face's
        image quality when the face model has a quality head, adds the quality gate."""
        boxes = [face.xywh() for face in faces]
        if not boxes:
            return []
        image_h, image_w = image_bgr.shape[:2]
        runs: list[Callable[[], np.ndarray]] = [partial(m.probabilities, image_bgr, boxes) for m in self.minifasnets]
        if self.celeba is not None:
            runs.append(partial(self.celeba.real_probability, image_bgr, boxes))
        if len(runs) == 1:
            outputs = [runs[0]()]
        else:
            others, last = run_side_by_side(self._helper, lambda: [run() for run in runs[:-1]], runs[-1])
            outputs = [*others, last]
        pair = outputs[: len(self.minifasnets)]
        pair_mean = np.stack(pair).sum(axis=0) / len(pair) if pair else None
        celeba_real = outputs[-1] if self.celeba is not None else None
        return [
            self._verdict(
                None if pair_mean is None else pair_mean[i],
                None if celeba_real is None else float(celeba_real[i]),
                gate(image_w, image_h, box, None if qualities is None else qualities[i], faces[i].landmarks),
            )
            for i, box in enumerate(boxes)
        ]

    def _verdict(self, pair: np.ndarray | None, celeba_real: float | None, failed: Gate | None) -> LivenessResult:
        engines: dict[str, float] = {}
        says_real: list[bool] = []
        if pair is not None:
            p_real = float(pair[REAL_CLASS])
            engines[ENGINE_MINIFASNET] = p_real
            # Upstream's rule (the real class wins) and the cut on P(real).
            says_real.append(int(np.argmax(pair)) == REAL_CLASS and p_real >= self.threshold)
        if celeba_real is not None:
            engines[ENGINE_CELEBA] = celeba_real
            says_real.append(celeba_real >= self.threshold)
        probabilities = None if pair is None else (float(pair[0]), float(pair[1]), float(pair[2]))
        if failed is not None:
            status = LivenessStatus.INCONCLUSIVE
        else:
            status = LivenessStatus.LIVE if all(says_real) else LivenessStatus.SPOOF
        return LivenessResult(
            status=status, score=min(engines.values()), probabilities=probabilities, engines=engines, gate=failed
        )

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown(wait=True)
        for model in self.models:
            model.close()


def build_liveness(request: LoadRequest) -> LivenessEnsemble | None:
    """The liveness models a LoadModel request names, or None when it names none: the one place
    that turns liveness options into models, so a new liveness engine changes this package only."""
    v2_path, v1se_path = (request.file(option) for option in MINIFASNET_OPTIONS)
    celeba_path = request.file(CELEBA_OPTION)
    threshold = request.float_in_range("antispoof_threshold", 0.0, 1.0)
    if not v2_path and not v1se_path and not celeba_path:
        return None
    return LivenessEnsemble(
        v2_path=v2_path,
        v1se_path=v1se_path,
        threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
        threads=request.threads or None,
        celeba_path=celeba_path,
    )
