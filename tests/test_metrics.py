"""controlnet.metrics on inputs with known answers: identical -> 1, disjoint -> 0, hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controlnet.errors import UserError
from controlnet.metrics import edge_f1, mask_iou, mean_iou, rmse, ssim


def test_edge_f1():
    a = np.zeros((4, 5), np.uint8)
    a[1, :4] = 255  # 4 edge pixels
    assert edge_f1(a, a) == 1.0
    assert edge_f1(a, np.roll(a, 2, axis=0)) == 0.0  # disjoint
    b = np.zeros((4, 5), bool)
    b[1, 1:5] = True  # 3 shared, 1 extra
    b[3, :2] = True  # 2 more extra: 6 target pixels
    # pred a (4 px), target b (6 px), TP 3, FP 1, FN 3: F1 = 6 / (6 + 1 + 3)
    assert edge_f1(a, b) == pytest.approx(0.6)
    assert edge_f1(np.zeros((3, 3)), np.zeros((3, 3))) == 0.0  # torchmetrics' zero_division
    rgb = np.repeat(a[..., None], 3, axis=2)
    assert edge_f1(rgb, a / 255.0) == 1.0  # colour and float inputs binarise the same way
    with pytest.raises(UserError, match="shape"):
        edge_f1(a, a[:3])


def test_mask_iou():
    a = np.zeros((6, 6), bool)
    a[1:3, 1:3] = True
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, np.roll(a, 3, axis=1)) == 0.0
    # shifted by one column: intersection 2, union 6
    assert mask_iou(a, np.roll(a, 1, axis=1)) == pytest.approx(2 / 6)
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_mean_iou():
    t = np.array([[0, 0, 1, 1], [2, 2, 2, 255]])
    assert mean_iou(t, t, num_classes=3, ignore_index=255) == 1.0
    assert mean_iou((t + 1) % 3, t, num_classes=3, ignore_index=255) == 0.0
    p = np.array([[0, 1, 1, 1], [2, 2, 0, 7]])
    # class 0: TP 1, union |{p=0} ∪ {t=0}| = 3 -> 1/3; class 1: TP 2, union 3 -> 2/3; class 2: TP 2, union 3 -> 2/3
    assert mean_iou(p, t, num_classes=3, ignore_index=255) == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)
    # a class absent from both maps is left out of the mean
    assert mean_iou(np.zeros((2, 2)), np.zeros((2, 2)), num_classes=150) == 1.0
    # the ignored pixel's prediction does not count; without ignore_index 255 is out of range and skipped too
    assert mean_iou(p, t, num_classes=3) == mean_iou(p, t, num_classes=3, ignore_index=255)
    assert math.isnan(mean_iou(np.zeros((1, 1)), np.full((1, 1), 255), num_classes=3, ignore_index=255))


def test_rmse():
    a = np.zeros((2, 2))
    assert rmse(a, a) == 0.0
    assert rmse(np.array([[0, 0], [0, 4]], np.uint8), a) == pytest.approx(2.0)  # sqrt(16 / 4)
    assert rmse(np.array([3.0, -3.0]), np.zeros(2)) == pytest.approx(3.0)


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Wang et al.'s formula evaluated window by window (explicit loops): the oracle for :func:`ssim`."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_known_answers():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 15), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    # constant images: only the luminance term, (2 * 100 * 150 + C1) / (100^2 + 150^2 + C1), C1 = (0.01 * 255)^2
    c1 = (0.01 * 255) ** 2
    flat = ssim(np.full((12, 12), 100, np.uint8), np.full((12, 12), 150, np.uint8))
    assert flat == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1))
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    expected = _ssim_reference(a.astype(float), b.astype(float), 255.0)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)
    assert ssim(a, 255 - a) < 0  # anti-correlated structure
    # float images in [0, 1] give the same value as their uint8 versions (constants scale with the range)
    assert ssim(a / 255.0, b / 255.0) == pytest.approx(ssim(a, b), rel=1e-9)
    # RGB: the mean over channels
    rgb_a = np.stack([a, b, a], axis=2)
    rgb_b = np.stack([b, b, 255 - a], axis=2)
    assert ssim(rgb_a, rgb_b) == pytest.approx((ssim(a, b) + 1.0 + ssim(a, 255 - a)) / 3)
    with pytest.raises(UserError, match="same scale"):
        ssim(a, b / 255.0)  # uint8 against float: ambiguous scale
    assert ssim(a.astype(float), b, data_range=255) == pytest.approx(ssim(a, b), rel=1e-12)
    with pytest.raises(UserError, match="at least 11x11"):
        ssim(np.zeros((10, 40)), np.zeros((10, 40)))
