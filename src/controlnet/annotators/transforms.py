"""Annotators that transform the image itself: content shuffle, tile (blur), inpaint masking and inversion.

ControlNet 1.1 shuffle, tile and inpaint models take (a version of) the raw image as their condition.

Inpaint convention. The 1.1 inpaint model is fed the image scaled to [0, 1] with masked pixels set to -1.0,
which uint8 cannot hold. The uint8 image this module writes uses pure black ``(0, 0, 0)`` for masked pixels and
lifts every unmasked channel to at least 1, so black means "masked" and nothing else;
:func:`inpaint_condition_from_uint8` turns it back into the float condition exactly (unmasked values are off
by at most 1/255 where the source was 0). :func:`inpaint_condition` makes the float condition directly.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from controlnet.annotators.inputs import load_mask
from controlnet.errors import UserError
from controlnet.images import load_image

# Value of masked pixels in the float condition of control_v11p_sd15_inpaint (the original's gradio_inpaint.py).
INPAINT_MASKED_VALUE = -1.0

# ControlNet 1.1 shuffle: the random flow is drawn on a grid of this many pixels per cell (the original's f=256).
SHUFFLE_CELL = 256

# ControlNet 1.1 tile: the condition is the image seen at a low resolution; 8x down is 64 px for a 512 image.
TILE_FACTOR = 8.0


def invert(image: np.ndarray) -> np.ndarray:
    """255 - image: switches black-on-white line art (what people draw) to white-on-black (what models expect)."""
    return (255 - image).astype(np.uint8)


def _noise_field(rng: np.random.Generator, h: int, w: int, cell: int, uniform: bool) -> np.ndarray:
    """``(H, W)`` float32 smooth random field in [0, 1]: uniform noise on a coarse grid, bicubically upsampled
    over a margin of one cell on every side, cropped, then stretched to span exactly [0, 1] (min-max, as the
    original) or, with ``uniform``, replaced by its rank so that its values are evenly spread over [0, 1]."""
    grid = rng.uniform(0.0, 1.0, size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    big = cv2.resize(grid, (w + 2 * cell, h + 2 * cell), interpolation=cv2.INTER_CUBIC)
    field = big[cell : cell + h, cell : cell + w]
    if uniform:
        ranks = np.empty(field.size, dtype=np.float32)
        ranks[np.argsort(field, axis=None, kind="stable")] = np.arange(field.size, dtype=np.float32)
        return (ranks / max(field.size - 1, 1)).reshape(h, w)
    field = field - field.min()
    peak = float(field.max())
    return field / peak if peak > 0 else np.zeros_like(field)


def shuffle(image: np.ndarray, seed: int = 0, cell: int = SHUFFLE_CELL, uniform: bool = True) -> np.ndarray:
    """ControlNet 1.1 content shuffle: every output pixel samples the image at a random smooth flow position.

    Two independent smooth random fields in [0, 1] (``cell`` px per random control point), scaled to the image's
    width and height, are the source x and y of each output pixel (``cv2.remap``, bilinear). Colours and textures
    survive, the layout does not. With ``uniform`` (default) each field is rank-equalised, so every source row
    and column is sampled equally often and the colour histogram is kept; ``uniform=False`` is the original
    min-max stretch, which samples the middle of the image more than its sides. The same ``seed`` gives the same
    shuffle.
    """
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    map_x = _noise_field(rng, h, w, cell, uniform) * float(w - 1)
    map_y = _noise_field(rng, h, w, cell, uniform) * float(h - 1)
    return cv2.remap(np.ascontiguousarray(image), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def tile(image: np.ndarray, factor: float = TILE_FACTOR) -> np.ndarray:
    """ControlNet 1.1 tile condition: the image shrunk ``factor`` times (area averaging) and enlarged back
    (bicubic), i.e. a blurred image that keeps colours and layout but not details."""
    h, w = image.shape[:2]
    small = (max(1, int(round(w / factor))), max(1, int(round(h / factor))))
    down = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
    up = cv2.resize(down, (w, h), interpolation=cv2.INTER_CUBIC)
    return up.reshape(h, w, 3).astype(np.uint8)


def inpaint(image: np.ndarray, mask: Any = None) -> np.ndarray:
    """The image with masked pixels (white in ``mask``) set to black; every other channel is at least 1.

    See the module docstring for the convention; :func:`inpaint_condition_from_uint8` gives the float condition.
    """
    if mask is None:
        raise UserError("inpaint: a mask is required (white = area to repaint); give the parameter mask=MASK.png "
                        "(--annotator-param mask=MASK.png in generate and train)")
    masked = load_mask(mask, image.shape[:2])
    out = np.maximum(image, 1).astype(np.uint8)  # black now only means "masked"
    out[masked] = 0
    return out


def inpaint_condition(image: Any, mask: Any) -> np.ndarray:
    """The float condition of the 1.1 inpaint ControlNet: ``(H, W, 3)`` float32 RGB in [0, 1], masked pixels -1."""
    rgb = load_image(image)
    masked = load_mask(mask, rgb.shape[:2])
    cond = rgb.astype(np.float32) / 255.0
    cond[masked] = INPAINT_MASKED_VALUE
    return cond


def inpaint_condition_from_uint8(marked: Any) -> np.ndarray:
    """Float condition (``(H, W, 3)`` float32, masked = -1) from the uint8 image :func:`inpaint` writes."""
    rgb = load_image(marked)
    cond = rgb.astype(np.float32) / 255.0
    cond[(rgb == 0).all(axis=2)] = INPAINT_MASKED_VALUE
    return cond
