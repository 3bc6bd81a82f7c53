"""Annotators from structured data: segmentation label maps, depth maps, and normals derived from depth.

- :func:`segmentation`: class index k -> colour k of the ADE20K (150) or COCO-Stuff (171) palette, exactly.
- :func:`depth`: 16-bit, 32-bit or float depth -> 8-bit with near = bright (the depth ControlNets' convention).
- :func:`normal`: a normal map from a depth map as the original ControlNet 1.0 normal annotator computed it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from controlnet.annotators.palettes import PALETTES
from controlnet.errors import UserError

# Original normal annotator (annotator/midas, ControlNet 1.0): z component a = 2 pi, background threshold 0.1 on
# the [0, 1]-normalised depth.
NORMAL_Z = 2.0 * math.pi
NORMAL_BG_THRESHOLD = 0.1
# Our depth input is normalised to [0, 1] and multiplied by this before the gradients, so an 8-bit depth image
# keeps its own units (the original took gradients of MiDaS' raw output, whose scale depends on the model).
NORMAL_DEPTH_SCALE = 255.0


def segmentation(labels: np.ndarray, palette: str = "ade20k", offset: int = 0) -> np.ndarray:
    """Colour a label map: class ``labels - offset`` = k gets palette colour k; out-of-range labels are black.

    ADE20K indices are the 150 classes 0..149 as segmentation models predict them; a raw ADEChallenge annotation
    PNG (0 = "other", classes 1..150) needs ``offset=1``. COCO-Stuff uses 0..170 (255 = ignore → black).
    """
    colours = PALETTES[palette]  # (N, 3)
    index = np.asarray(labels, dtype=np.int64) - offset  # (H, W)
    valid = (index >= 0) & (index < len(colours))
    out = np.zeros(index.shape + (3,), dtype=np.uint8)
    out[valid] = colours[index[valid]]
    return out


def _near_is_large(values: np.ndarray, near: str) -> bool:
    if near == "auto":
        return values.dtype == np.uint8  # 8-bit depth images follow the near = bright convention already
    return near == "large"


def normalised_nearness(values: np.ndarray, near: str = "auto", low: float = 0.0, high: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """``(nearness, valid)``: ``(H, W)`` float64 in [0, 1] with 1 = nearest, and the mask of valid pixels.

    ``near="small"``: values are distances (metric depth; 0 or non-finite = no measurement); ``"large"``:
    values grow toward the camera (disparity, MiDaS); ``"auto"``: uint8 input is "large", anything else "small".
    The percentiles ``low``/``high`` of the valid values map to the ends of the range (0/100 = min/max).
    """
    large = _near_is_large(values, near)
    v = values.astype(np.float64)
    valid = np.isfinite(v)
    if not large:
        valid &= v > 0
    nearness = np.zeros(v.shape, dtype=np.float64)
    if not valid.any():
        return nearness, valid
    lo, hi = np.percentile(v[valid], [low, high])
    if hi > lo:
        t = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    else:
        t = np.full(v.shape, 0.5)  # a constant depth map: mid grey
    nearness[valid] = t[valid] if large else 1.0 - t[valid]
    return nearness, valid


def depth(values: np.ndarray, near: str = "auto", low: float = 0.0, high: float = 100.0) -> np.ndarray:
    """8-bit depth image, near = bright, invalid pixels black (see :func:`normalised_nearness` for the params)."""
    if low >= high:
        raise UserError(f"depth: low percentile ({low}) must be below high ({high})")
    nearness, _ = normalised_nearness(values, near, low, high)
    grey = np.round(nearness * 255.0).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def normal(
    values: np.ndarray,
    a: float = NORMAL_Z,
    bg_threshold: float = NORMAL_BG_THRESHOLD,
    depth_scale: float = NORMAL_DEPTH_SCALE,
    near: str = "auto",
    layout: str = "xyz",
) -> np.ndarray:
    """Normal map from depth, as ControlNet 1.0's normal annotator: ``n = normalise(dD/dx, dD/dy, a)``.

    D is the depth as nearness (near = large) in [0, 1] times ``depth_scale``; dD/dx, dD/dy are 3x3 Sobel
    derivatives; pixels with nearness below ``bg_threshold`` are background (flat, facing the camera). The unit
    vector is encoded ``n * 127.5 + 127.5``. ``layout="xyz"`` puts x, y, z in R, G, B (the map as the annotator
    returns and shows it: a surface whose right side is nearer has R > 128); ``"zyx"`` reverses the channels, as
    the original demo did before feeding control_sd15_normal (it used the map as BGR).
    """
    nearness, _ = normalised_nearness(values, near)
    d = (nearness * depth_scale).astype(np.float32)  # (H, W)
    gx = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3)
    background = nearness < bg_threshold
    gx[background] = 0.0
    gy[background] = 0.0
    gz = np.full_like(gx, a)
    n = np.stack([gx, gy, gz], axis=2)  # (H, W, 3)
    n /= np.sqrt(np.sum(n * n, axis=2, keepdims=True))
    encoded = np.clip(n * 127.5 + 127.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(encoded[..., ::-1]) if layout == "zyx" else encoded
