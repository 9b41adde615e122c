"""5-point face alignment to the ArcFace 112x112 template (insightface `face_align.norm_crop`)."""

from __future__ import annotations

import cv2
import numpy as np

# insightface/utils/face_align.py `arcface_dst`: where the two eyes, the nose tip and the two
# mouth corners sit in a 112x112 crop. Every recognizer here was trained on crops made with it.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
ARCFACE_SIZE = 112


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst.

    Umeyama's closed form, as skimage's SimilarityTransform.estimate computes it for insightface;
    unlike cv2.estimateAffinePartial2D it has no random sampling, so the crop is deterministic.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    src_var = (src_c**2).sum() / len(src)
    scale = (s * d).sum() / src_var if src_var > 0 else 1.0
    matrix = np.zeros((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def chip_magnification(landmarks: np.ndarray, template_px: np.ndarray) -> float:
    """How many times the warp that puts `landmarks` onto `template_px` (in chip pixels) enlarges
    the image: above 1 the chip interpolates detail the image does not have."""
    matrix = similarity_transform(landmarks, template_px)
    return float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))


def similarity_chip(
    image: np.ndarray, landmarks: np.ndarray, template: np.ndarray, size: int, oversample: int = 1
) -> np.ndarray:
    """The size x size BGR crop with the 5 landmarks moved onto `template` (units of the side).

    With oversample > 1 the warp is made at oversample * size (bilinear) and shrunk with INTER_AREA.
    """
    side = size * oversample
    matrix = similarity_transform(landmarks, template * side)
    chip = cv2.warpAffine(image, matrix, (side, side), flags=cv2.INTER_LINEAR, borderValue=0.0)
    if oversample > 1:
        chip = cv2.resize(chip, (size, size), interpolation=cv2.INTER_AREA)
    return chip


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """The size x size crop with the 5 landmarks moved onto the ArcFace template."""
    return similarity_chip(image, landmarks, ARCFACE_TEMPLATE / ARCFACE_SIZE, size)


def arcface_magnification(landmarks: np.ndarray) -> float:
    """chip_magnification of align_face's 112x112 chip."""
    return chip_magnification(landmarks, ARCFACE_TEMPLATE)
