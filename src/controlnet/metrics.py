"""Controllability metrics (ControlNet++ protocol): compare a condition with the one re-extracted from the output.

All functions take numpy arrays and return a Python float:

- :func:`edge_f1`: binary F1 of edge pixels (Canny), as torchmetrics' ``BinaryF1Score`` on flattened pixels;
- :func:`ssim`: structural similarity (Wang et al. 2004: Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03);
- :func:`mask_iou`: intersection over union of two binary masks (the fill circles);
- :func:`mean_iou`: mean IoU over classes of two label maps (segmentation, mmseg-style);
- :func:`rmse`: root mean squared error (depth, in the arrays' units: 0..255 for 8-bit depth images).

Binary inputs may be bool, uint8 (set where > 127) or float (set where > 0.5); a 3-channel image counts a pixel
as set when any channel is.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from controlnet.errors import UserError

# SSIM constants of Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to
# structural similarity", IEEE TIP 2004.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise UserError(f"{what}: arrays differ in shape, {a.shape} vs {b.shape}; resize one to the other")
    if a.size == 0:
        raise UserError(f"{what}: empty arrays")


def to_binary(x: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: bool as is, uint8/ints > 127, floats > 0.5; any channel of an ``(H, W, C)`` array."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        b = x
    elif np.issubdtype(x.dtype, np.floating):
        b = x > 0.5
    else:
        b = x > 127
    return b.any(axis=2) if b.ndim == 3 else b


def edge_f1(pred: np.ndarray, target: np.ndarray, zero_division: float = 0.0) -> float:
    """Binary F1 of edge pixels: ``2 TP / (2 TP + FP + FN)``; ``zero_division`` when both have no edges
    (torchmetrics' default is 0)."""
    p, t = to_binary(pred), to_binary(target)
    _same_shape(p, t, "edge_f1")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    denominator = 2 * tp + fp + fn
    return float(zero_division) if denominator == 0 else 2.0 * tp / denominator


def mask_iou(a: np.ndarray, b: np.ndarray, empty: float = 1.0) -> float:
    """``|a ∩ b| / |a ∪ b|`` of two binary masks; ``empty`` (default 1: identical) when both are empty."""
    x, y = to_binary(a), to_binary(b)
    _same_shape(x, y, "mask_iou")
    union = int(np.count_nonzero(x | y))
    return float(empty) if union == 0 else int(np.count_nonzero(x & y)) / union


def mean_iou(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = None) -> float:
    """Mean over classes of ``TP / (TP + FP + FN)`` between two ``(H, W)`` label maps.

    Pixels whose target is ``ignore_index`` (or outside ``[0, num_classes)``) are left out; a class absent from
    both maps is left out of the mean (mmseg's nanmean). A predicted label outside the range is simply wrong.
    Returns NaN when no class occurs at all.
    """
    p, t = np.asarray(pred).astype(np.int64), np.asarray(target).astype(np.int64)
    _same_shape(p, t, "mean_iou")
    if num_classes < 1:
        raise UserError(f"mean_iou: num_classes must be >= 1, got {num_classes}")
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    p, t = p[keep], t[keep]
    p = np.where((p >= 0) & (p < num_classes), p, num_classes)  # out of range -> an extra "wrong" bin
    confusion = np.bincount(t * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1))
    confusion = confusion.reshape(num_classes, num_classes + 1)  # rows: target class, cols: predicted (+ wrong)
    tp = np.diag(confusion[:, :num_classes]).astype(np.float64)
    union = confusion.sum(axis=1) + confusion[:, :num_classes].sum(axis=0) - tp
    present = union > 0
    if not present.any():
        return float("nan")
    return float(np.mean(tp[present] / union[present]))


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """``sqrt(mean((a - b)^2))`` in the arrays' own units."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    _same_shape(x, y, "rmse")
    return math.sqrt(float(np.mean((x - y) ** 2)))


def _ssim_channel(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Mean SSIM of two ``(H, W)`` float64 images over the windows that fit inside (Wang's 'valid' filtering)."""
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    g = cv2.getGaussianKernel(SSIM_WINDOW, SSIM_SIGMA, cv2.CV_64F)  # (11, 1), sums to 1

    def blur(img: np.ndarray) -> np.ndarray:
        full = cv2.sepFilter2D(img, cv2.CV_64F, g, g, borderType=cv2.BORDER_REFLECT)
        r = SSIM_WINDOW // 2
        return full[r:-r, r:-r]  # keep only windows entirely inside the image

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def ssim(a: np.ndarray, b: np.ndarray, data_range: float | None = None) -> float:
    """Structural similarity of two grey ``(H, W)`` or colour ``(H, W, C)`` images (mean over channels).

    ``data_range`` defaults to 255 for integer images and 1.0 for float images (assumed in [0, 1]); an integer
    image against a float one needs an explicit ``data_range``. Both sides must be at least 11 x 11 pixels.
    """
    x, y = np.asarray(a), np.asarray(b)
    _same_shape(x, y, "ssim")
    if data_range is None:
        floats = np.issubdtype(x.dtype, np.floating), np.issubdtype(y.dtype, np.floating)
        if floats[0] != floats[1]:
            raise UserError(f"ssim: one image is {x.dtype} and the other {y.dtype}; bring both to the same scale "
                            "(uint8 0..255 or float 0..1) or pass data_range")
        data_range = 1.0 if floats[0] else 255.0
    if x.ndim not in (2, 3):
        raise UserError(f"ssim: expected (H, W) or (H, W, C) images, got shape {x.shape}")
    if min(x.shape[:2]) < SSIM_WINDOW:
        raise UserError(f"ssim: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {x.shape[:2]}")
    x, y = x.astype(np.float64), y.astype(np.float64)
    if x.ndim == 2:
        return _ssim_channel(x, y, data_range)
    return float(np.mean([_ssim_channel(x[..., c], y[..., c], data_range) for c in range(x.shape[2])]))
