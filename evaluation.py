"""Evaluation arithmetic on labelled sets, with no gRPC and no plotting: the one copy used by
`client.py evaluate` / `evaluate-liveness`, face_eval.py and bench/.

Identity: every pair of embeddings with its cosine distance, TAR/FAR at a threshold (accept is
`distance < threshold`, as the server decides), ROC AUC, and the threshold that meets a target
FAR. Liveness: APCER/BPCER/ACER at a threshold (real is `score >= threshold`), AUC and a
recommended threshold.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

import catalog

# A cosine distance is at most 2; a threshold this high accepts every pair.
MAX_DISTANCE = 2.0

LIVENESS_LABELS = {"real", "spoof"}
# antispoof_threshold when the LoadModel options do not set it
LIVENESS_DEFAULT_THRESHOLD = catalog.default().shared_threshold(catalog.ROLE_ANTISPOOF)


def rate(count: int, total: int) -> float | None:
    return count / total if total else None


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def rank_auc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """ROC AUC of scores where positives should score higher: the Mann-Whitney U statistic from
    average ranks, so a tie counts one half."""
    if len(positive) == 0 or len(negative) == 0:
        return None
    scores = np.concatenate([positive, negative])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average rank over each run of ties (ranks start at 1)
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    n_pos, n_neg = len(positive), len(negative)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# -- labelled sets ----------------------------------------------------------------------------


class LabelsError(ValueError):
    """A labels CSV that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class LabelledImage:
    file: str  # as written in the CSV
    path: str  # resolved
    label: str


def resolve_image(csv_dir: str, name: str) -> str | None:
    """`<csv dir>/<file>`, else `<csv dir>/images/<file>` (the shared sets keep photos there)."""
    for candidate in (os.path.join(csv_dir, name), os.path.join(csv_dir, "images", name)):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_labels(
    csv_path: str, label_column: str, allowed: set[str] | None = None
) -> tuple[list[LabelledImage], list[str]]:
    """Rows of a labels CSV with columns `file` and `label_column`; (images, skipped file names).

    A row whose label holds several identities (`a;b`, a photo of several people) is skipped:
    which face is whose cannot be told from the label alone.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "file" not in columns or label_column not in columns:
                raise LabelsError(f"{csv_path}: needs columns file,{label_column} (has {','.join(columns) or 'none'})")
            rows = list(reader)
    except FileNotFoundError:
        raise LabelsError(f"no such file: {csv_path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise LabelsError(f"cannot read {csv_path}: {' '.join(str(error).split())}") from None
    csv_dir = os.path.dirname(os.path.abspath(csv_path))
    images, skipped = [], []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        name, label = (row.get("file") or "").strip(), (row.get(label_column) or "").strip()
        if not name:
            continue
        if ";" in label:
            skipped.append(name)
            continue
        if not label:
            raise LabelsError(f"{csv_path}:{number}: empty {label_column} for {name}")
        if allowed is not None and label.lower() not in allowed:
            raise LabelsError(
                f"{csv_path}:{number}: {label_column} must be one of {', '.join(sorted(allowed))}, got '{label}'"
            )
        path = resolve_image(csv_dir, name)
        if path is None:
            raise LabelsError(
                f"{csv_path}:{number}: no such file: {name} (looked in {csv_dir} and {os.path.join(csv_dir, 'images')})"
            )
        images.append(LabelledImage(name, path, label.lower() if allowed is not None else label))
    return images, skipped


# -- identity ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pairs:
    """Unordered pairs of a labelled set with their cosine distances, split by whether both
    sides carry the same label. `*_index` rows are (i, j), i < j, indices into the set."""

    same: np.ndarray
    different: np.ndarray
    same_index: np.ndarray
    different_index: np.ndarray

    def accepted(self, threshold: float) -> tuple[int, int]:
        """(true accepts, false accepts) at `threshold`."""
        return int(np.sum(self.same < threshold)), int(np.sum(self.different < threshold))


def labelled_pairs(labels: Sequence[str], embeddings: np.ndarray, involving: Collection[int] | None = None) -> Pairs:
    """Every pair of the unit-length `embeddings` (one row per label), in row-major (i, j) order;
    with `involving`, only the pairs with at least one index in it."""
    vectors = np.asarray(embeddings, dtype=np.float64)
    first, second = np.triu_indices(len(vectors), k=1)
    if involving is not None:
        wanted = np.asarray(sorted(involving), dtype=np.int64)
        keep = np.isin(first, wanted) | np.isin(second, wanted)
        first, second = first[keep], second[keep]
    # One Gram matrix (n x n) rather than the pairs' vectors side by side (pairs x dim).
    distances = 1.0 - (vectors @ vectors.T)[first, second]
    names = np.asarray(labels, dtype=object)
    same = names[first] == names[second]
    index = np.stack([first, second], axis=1)
    return Pairs(distances[same], distances[~same], index[same], index[~same])


def far_threshold(different: np.ndarray, target: float) -> tuple[float, int]:
    """The largest threshold whose false-accept rate on these pairs is <= target (accept is
    `distance < threshold`, as the server decides), and how many false accepts it allows."""
    allowed = int(math.floor(target * len(different) + 1e-9))
    if allowed >= len(different):
        return MAX_DISTANCE, allowed
    # Accepting fewer than allowed+1 impostors: stop at the (allowed+1)-th closest one.
    return float(np.sort(different)[allowed]), allowed


def support_note(different: int, allowed: int, target: float) -> dict:
    """How much the recommended threshold can be trusted: with n impostor pairs and k allowed
    false accepts, the 'rule of three' bounds the true FAR at about 3/n (95%) when k = 0."""
    text = (
        f"{different} different-person pairs back this estimate; a target FAR of {target:g} allows "
        f"{allowed} false accept(s) among them"
    )
    if different and allowed == 0:
        text += (
            f", so the recommended threshold is the closest different-person distance and the true FAR "
            f"there is only known to be below about {3.0 / different:.3g} (95%, rule of three)"
        )
    if different and different * target < 10:
        text += f"; about {math.ceil(10 / target)} different-person pairs are needed to measure a FAR of {target:g}"
    return {"different_pairs": different, "allowed_false_accepts": allowed, "note": text}


@dataclass(frozen=True)
class IdentityEvaluation:
    report: dict  # the JSON `client.py evaluate` prints, after its labels and model
    pairs: Pairs
    threshold: float  # the one evaluated at
    recommended: float


def evaluate_identity(
    files: Sequence[str],
    labels: Sequence[str],
    embeddings: np.ndarray,
    *,
    default_threshold: float,
    threshold: float,
    far_target: float,
    skipped_multi_identity: Sequence[str] = (),
    skipped_no_face: Sequence[dict] = (),
) -> IdentityEvaluation:
    """TAR/FAR at `threshold` (the server's `default_threshold` unless the caller chose one),
    ROC AUC, the hardest pairs, and the threshold recommended for `far_target`."""
    pairs = labelled_pairs(labels, embeddings)
    same, different = pairs.same, pairs.different
    if len(different):
        recommended, allowed = far_threshold(different, far_target)
        # Reported to 4 decimals, rounded down so that the value shown keeps FAR <= target.
        recommended = math.floor(recommended * 1e4) / 1e4
    else:
        recommended, allowed = threshold, 0

    def accepts(t: float) -> tuple[float | None, float | None]:
        true_accepts, false_accepts = pairs.accepted(t)
        return rounded(rate(true_accepts, len(same))), rounded(rate(false_accepts, len(different)))

    def files_of(index: np.ndarray) -> list[str]:
        return [files[int(i)] for i in index]

    tar, far = accepts(threshold)
    tar_at_recommended, far_at_recommended = accepts(recommended)
    report = {
        "images": len(files),
        "identities": len(set(labels)),
        "skipped_multi_identity": list(skipped_multi_identity),
        "skipped_no_face": list(skipped_no_face),
        "embedding_dim": int(np.shape(embeddings)[1]),
        "pairs": len(same) + len(different),
        "same": len(same),
        "different": len(different),
        "default_threshold": rounded(default_threshold),
        "threshold": rounded(threshold),
        "tar": tar,
        "far": far,
        "auc": rounded(rank_auc(-same, -different)),  # closer = more alike
        "max_same_distance": rounded(same.max()) if len(same) else None,
        "max_same_pair": files_of(pairs.same_index[int(same.argmax())]) if len(same) else None,
        "min_different_distance": rounded(different.min()) if len(different) else None,
        "min_different_pair": files_of(pairs.different_index[int(different.argmin())]) if len(different) else None,
        "far_target": far_target,
        "recommended_threshold": rounded(recommended),
        "tar_at_recommended": tar_at_recommended,
        "far_at_recommended": far_at_recommended,
        "recommended_support": support_note(len(different), allowed, far_target),
    }
    if threshold != default_threshold:
        report["threshold_source"] = "--threshold"
    return IdentityEvaluation(report, pairs, threshold, recommended)


# -- liveness ---------------------------------------------------------------------------------


def liveness_rates(real: np.ndarray, spoof: np.ndarray, threshold: float) -> dict:
    """APCER, BPCER and ACER when a face counts as real at `score >= threshold`."""
    apcer = rate(int(np.sum(spoof >= threshold)), len(spoof))
    bpcer = rate(int(np.sum(real < threshold)), len(real))
    return {"apcer": rounded(apcer), "bpcer": rounded(bpcer), "acer": acer_of(apcer, bpcer)}


def acer_of(apcer: float | None, bpcer: float | None) -> float | None:
    if apcer is None or bpcer is None:
        return None
    return rounded((apcer + bpcer) / 2.0)


def liveness_candidates(scores: np.ndarray) -> list[float]:
    """One threshold per distinct outcome: below all scores, between neighbours, above all."""
    unique = np.unique(np.clip(scores, 0.0, 1.0))
    middles = (unique[:-1] + unique[1:]) / 2.0
    return [float(unique[0] / 2.0)] + [float(m) for m in middles] + [float((unique[-1] + 1.0) / 2.0)]


def recommend_liveness(real: np.ndarray, spoof: np.ndarray, apcer_target: float | None) -> tuple[float, str]:
    candidates = liveness_candidates(np.concatenate([real, spoof]))
    if apcer_target is not None:
        # The lowest threshold (fewest real faces rejected) that keeps APCER within the target.
        for t in candidates:
            apcer = rate(int(np.sum(spoof >= t)), len(spoof))
            if apcer is None or apcer <= apcer_target + 1e-12:
                return t, f"lowest threshold with APCER <= {apcer_target:g}"
        return candidates[-1], f"no threshold reaches APCER <= {apcer_target:g}: all faces rejected"

    def key(t: float):
        r = liveness_rates(real, spoof, t)
        # minimal ACER; among equals, fewer spoofs accepted, then the threshold nearest the default
        return (r["acer"] if r["acer"] is not None else 0.0, r["apcer"] or 0.0, abs(t - LIVENESS_DEFAULT_THRESHOLD))

    # The default is a candidate too: when it is already optimal on this set it is kept, rather
    # than moved to another point of the same gap on the evidence of a few images.
    return (
        min(candidates + [LIVENESS_DEFAULT_THRESHOLD], key=key),
        f"minimal ACER (ties: lower APCER, then nearest {LIVENESS_DEFAULT_THRESHOLD:g})",
    )


@dataclass(frozen=True)
class ScoredImage:
    """One labelled image as the server judged its face."""

    file: str
    label: str  # "real" or "spoof"
    faces: int
    score: float  # antispoof_score = P(real)
    is_real: bool
    # liveness_status; an INCONCLUSIVE face (gated, with `reason`) is neither accepted nor rejected
    status: str = "LIVE"
    reason: str = ""

    @property
    def judged(self) -> bool:
        return self.status != "INCONCLUSIVE"


@dataclass(frozen=True)
class LivenessEvaluation:
    report: dict  # the JSON `client.py evaluate-liveness` prints, after its labels
    real: np.ndarray  # scores of the real images
    spoof: np.ndarray
    server_threshold: float | None
    recommended: float


def evaluate_liveness(
    scored: Sequence[ScoredImage], apcer_target: float | None, skipped_no_face: Sequence[dict] = ()
) -> LivenessEvaluation:
    """APCER/BPCER/ACER of the server's verdicts, AUC, and a recommended threshold (the lowest
    meeting `apcer_target`, else the one of minimal ACER) with the rates it would give, all over
    the judged images; the inconclusive ones are counted apart, with their rate per class."""
    inconclusive = [s for s in scored if not s.judged]
    scored = [s for s in scored if s.judged]
    real = np.asarray([s.score for s in scored if s.label == "real"], dtype=np.float64)
    spoof = np.asarray([s.score for s in scored if s.label == "spoof"], dtype=np.float64)
    spoofs_accepted = sum(1 for s in scored if s.label == "spoof" and s.is_real)
    reals_rejected = sum(1 for s in scored if s.label == "real" and not s.is_real)
    apcer, bpcer = rate(spoofs_accepted, len(spoof)), rate(reals_rejected, len(real))
    # The threshold is not on the wire: the LoadModel default is reported when every verdict
    # agrees with it (is_real exactly when score >= it), otherwise it was set to something else.
    consistent = all(s.is_real == (s.score >= LIVENESS_DEFAULT_THRESHOLD) for s in scored)
    server_threshold = LIVENESS_DEFAULT_THRESHOLD if consistent else None
    recommended, criterion = recommend_liveness(real, spoof, apcer_target)
    recommended = round(recommended, 4)  # a midpoint between two scores; the rates below are at this value
    at_recommended = liveness_rates(real, spoof, recommended)
    labelled = {label: sum(1 for s in [*scored, *inconclusive] if s.label == label) for label in ("real", "spoof")}
    report = {
        "images": len(scored) + len(inconclusive),
        "real": len(real),
        "spoof": len(spoof),
        "skipped_no_face": list(skipped_no_face),
        "inconclusive": len(inconclusive),
        "inconclusive_rate_real": rounded(rate(sum(1 for s in inconclusive if s.label == "real"), labelled["real"])),
        "inconclusive_rate_spoof": rounded(rate(sum(1 for s in inconclusive if s.label == "spoof"), labelled["spoof"])),
        "server_threshold": server_threshold,
        "apcer": rounded(apcer),
        "bpcer": rounded(bpcer),
        "acer": acer_of(apcer, bpcer),
        "spoofs_accepted": spoofs_accepted,
        "reals_rejected": reals_rejected,
        "auc": rounded(rank_auc(real, spoof)),
        "recommended_threshold": rounded(recommended),
        "recommended_criterion": criterion,
        "apcer_at_recommended": at_recommended["apcer"],
        "bpcer_at_recommended": at_recommended["bpcer"],
        "acer_at_recommended": at_recommended["acer"],
        "results": [
            {
                "file": s.file,
                "label": s.label,
                "faces": s.faces,
                "antispoof_score": rounded(s.score),
                "is_real": s.is_real,
                "status": s.status,
            }
            for s in scored
        ],
        "inconclusive_results": [
            {
                "file": s.file,
                "label": s.label,
                "faces": s.faces,
                "antispoof_score": rounded(s.score),
                "reason": s.reason,
            }
            for s in inconclusive
        ],
    }
    if not consistent:
        report["server_threshold_note"] = (
            f"the is_real verdicts do not all match score >= "
            f"{LIVENESS_DEFAULT_THRESHOLD:g}: the model was loaded with another "
            "antispoof_threshold"
        )
    if recommended < LIVENESS_DEFAULT_THRESHOLD:
        report["recommended_note"] = (
            "below 0.5 the server also requires 'real' to be the most likely of "
            "its 3 classes, so antispoof_threshold set to this value may reject a little more"
        )
    return LivenessEvaluation(report, real, spoof, server_threshold, recommended)
