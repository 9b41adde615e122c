"""The figures of `client.py evaluate --plot` and `evaluate-liveness --plot` (matplotlib, Agg:
files only, never a window). Imported only when a plot is asked for; the numbers come from
evaluation.py. A file that cannot be written raises OSError."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from evaluation import MAX_DISTANCE, liveness_candidates, rate


def plotted_rate(mask: np.ndarray) -> float:
    """Share of True in `mask` for a curve point; an empty class plots at 0."""
    return rate(int(np.sum(mask)), mask.size) or 0.0


def finish_curve(axes, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    """The unit-square rate plot (ROC or DET) both evaluate commands draw."""
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8, loc=legend_loc)


def finish_histogram(axes, recommended: float, xlabel: str, ylabel: str, title: str) -> None:
    """The histogram half of both figures, with the recommended threshold marked."""
    axes.axvline(recommended, color="tab:blue", linestyle=":", label=f"recommended {recommended:.4f}")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8)


def finish_figure(figure, title: str, path: str) -> None:
    figure.suptitle(title)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)


def plot_identity(
    path: str,
    same: np.ndarray,
    different: np.ndarray,
    threshold: float,
    recommended: float,
    title: str,
    threshold_name: str = "default threshold",
) -> None:
    """Distance histograms of same- and different-person pairs, and the ROC curve, with the
    evaluated and the recommended threshold marked."""
    figure, (hist, roc) = plt.subplots(1, 2, figsize=(12, 4.8))
    bins = np.linspace(0.0, max(1.2, float(np.max(np.concatenate([same, different]))) + 0.05), 41)
    hist.hist(different, bins=bins, alpha=0.6, color="tab:red", label=f"different person ({len(different)})")
    hist.hist(same, bins=bins, alpha=0.6, color="tab:green", label=f"same person ({len(same)})")
    hist.axvline(threshold, color="black", linestyle="--", label=f"{threshold_name} {threshold:.4f}")
    finish_histogram(hist, recommended, "cosine distance (1 - cos)", "pairs", "pair distances")
    thresholds = np.concatenate([[0.0], np.unique(np.concatenate([same, different])), [MAX_DISTANCE + 1e-6]])
    far = [plotted_rate(different < t) for t in thresholds]
    tar = [plotted_rate(same < t) for t in thresholds]
    roc.plot(far, tar, color="tab:purple", drawstyle="steps-post")
    for t, style, label in ((threshold, "ko", threshold_name), (recommended, "bs", "recommended")):
        roc.plot([plotted_rate(different < t)], [plotted_rate(same < t)], style, label=f"{label} ({t:.4f})")
    roc.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    finish_curve(roc, "false accept rate", "true accept rate", "ROC", "lower right")
    finish_figure(figure, title, path)


def plot_liveness(
    path: str, real: np.ndarray, spoof: np.ndarray, server_threshold: float | None, recommended: float, title: str
) -> None:
    """Score histograms of real and spoof images, and the DET curve, with the server's and the
    recommended threshold marked."""
    figure, (hist, det) = plt.subplots(1, 2, figsize=(12, 4.8))
    bins = np.linspace(0.0, 1.0, 21)
    hist.hist(spoof, bins=bins, alpha=0.6, color="tab:red", label=f"spoof ({len(spoof)})")
    hist.hist(real, bins=bins, alpha=0.6, color="tab:green", label=f"real ({len(real)})")
    if server_threshold is not None:
        hist.axvline(server_threshold, color="black", linestyle="--", label=f"server threshold {server_threshold:g}")
    finish_histogram(hist, recommended, "antispoof_score = P(real)", "images", "liveness scores")
    thresholds = [0.0] + liveness_candidates(np.concatenate([real, spoof])) + [1.0 + 1e-6]
    apcer = [plotted_rate(spoof >= t) for t in thresholds]
    bpcer = [plotted_rate(real < t) for t in thresholds]
    det.plot(apcer, bpcer, color="tab:purple", marker=".")
    points = [(recommended, "bs", "recommended")]
    if server_threshold is not None:
        points.insert(0, (server_threshold, "ko", "server"))
    for t, style, label in points:
        det.plot([plotted_rate(spoof >= t)], [plotted_rate(real < t)], style, label=f"{label} ({t:.4f})")
    finish_curve(det, "APCER (spoofs accepted)", "BPCER (real faces rejected)", "DET (linear axes)", "upper right")
    finish_figure(figure, title, path)
