"""Synthetic "fill" data (the original tutorial's fill50k layout) and its controllability metrics.

Each sample is a circle: the *condition* is its white outline (about 2 px) on black, the *target* is the same
circle filled with one named colour on a background of another, and the prompt names both colours:
"red circle with blue background". A model that follows the condition draws the disk where the outline is;
one that follows the prompt gets the colours right. The two metrics measure exactly that:

- :func:`fill_iou`: IoU between the generated circle (segmented by colour) and the condition's filled disk;
- :func:`circle_colour_correct`: whether the generated circle's colour is nearest the prompt's circle colour.

The IoU is also the trainer's "fill" validation score (``controlnet train --score fill``: :func:`fill_scorer`,
listed in :data:`controlnet.train.scores.SCORERS`).

Layout written by :func:`make_fill_dataset` (as lllyasviel/ControlNet's tutorial ``training/fill50k``)::

    OUT/prompt.json      one JSON object per line: {"source": "source/0.png", "target": "target/0.png",
                         "prompt": "red circle with blue background"}
    OUT/source/i.png     condition (RGB, white outline on black)
    OUT/target/i.png     image (RGB)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from controlnet.defaults import FILL_SIZE
from controlnet.errors import UserError
from controlnet.fileio import atomic_path
from controlnet.images import save_png
from controlnet.limits import check_output_size

# The palette: name → RGB. Well separated in RGB so "the nearest palette colour" is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 225, 40),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "orange": (245, 135, 20),
    "purple": (130, 40, 170),
}
MIN_RADIUS, MAX_RADIUS = 12, 48  # px at size 128, scaled with the image size
OUTLINE_PX = 2  # thickness of the condition's outline
MARGIN_PX = 2  # keeps the outline (radius + 1 px) inside the image
DEFAULT_SIZE = FILL_SIZE
FILL_PNG_LEVEL = 1  # zlib level of the PNGs: fast, as OpenCV's default (the files are written once, read often)

_PROMPT_RE = re.compile(r"^\s*([a-z]+) circle with ([a-z]+) background\s*$")


@dataclass(frozen=True)
class FillSample:
    """One circle: centre (x, y) and radius in px, the two colour names, and the image size."""

    cx: int
    cy: int
    radius: int
    circle: str
    background: str
    size: int = DEFAULT_SIZE

    @property
    def prompt(self) -> str:
        return make_prompt(self.circle, self.background)

    @property
    def condition(self) -> np.ndarray:
        """(H, W, 3) uint8: the white outline on black."""
        img = np.zeros((self.size, self.size, 3), np.uint8)
        cv2.circle(img, (self.cx, self.cy), self.radius, (255, 255, 255), OUTLINE_PX, cv2.LINE_AA)
        return img

    @property
    def target(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB: the disk in the circle colour on the background colour."""
        # Anti-aliased over one pixel: coverage 1/2 exactly at the radius, so the colour boundary is the
        # outline's centre line (cv2's filled circles reach about 0.6 px beyond it).
        yy, xx = np.mgrid[: self.size, : self.size]
        dist = np.sqrt((xx - self.cx) ** 2 + (yy - self.cy) ** 2)
        alpha = np.clip(self.radius + 0.5 - dist, 0.0, 1.0)[:, :, None]  # (H, W, 1)
        fg, bg = np.array(COLOURS[self.circle], np.float64), np.array(COLOURS[self.background], np.float64)
        return np.rint(alpha * fg + (1.0 - alpha) * bg).astype(np.uint8)

    @property
    def disk(self) -> np.ndarray:
        """(H, W) bool: the exact filled disk (distance from the centre <= radius)."""
        yy, xx = np.mgrid[: self.size, : self.size]
        return (xx - self.cx) ** 2 + (yy - self.cy) ** 2 <= self.radius**2


def make_prompt(circle: str, background: str) -> str:
    """The prompt of a sample: "<circle colour> circle with <background colour> background"."""
    return f"{circle} circle with {background} background"


def is_fill_prompt(prompt: str) -> bool:
    """Whether ``prompt`` reads "<colour> circle with <colour> background" with colours of the palette."""
    m = _PROMPT_RE.match(prompt.lower())
    return bool(m) and m.group(1) in COLOURS and m.group(2) in COLOURS


def parse_prompt(prompt: str) -> tuple[str, str]:
    """(circle colour, background colour) of a fill prompt; ``UserError`` if it is not one over the palette."""
    if not is_fill_prompt(prompt):
        raise UserError(
            f"{prompt!r} is not a fill prompt; write '<colour> circle with <colour> background' with colours "
            f"from {', '.join(COLOURS)}"
        )
    m = _PROMPT_RE.match(prompt.lower())
    return m.group(1), m.group(2)


def _radius_range(size: int) -> tuple[int, int]:
    scale = size / DEFAULT_SIZE
    return max(2, round(MIN_RADIUS * scale)), max(3, round(MAX_RADIUS * scale))


def random_condition(rng: np.random.Generator, size: int = DEFAULT_SIZE) -> FillSample:
    """A random circle inside a ``size`` x ``size`` image with two distinct random palette colours."""
    if size < 16:
        raise ValueError(f"fill images must be at least 16 px, got size={size}")
    lo, hi = _radius_range(size)
    radius = int(rng.integers(lo, hi + 1))
    edge = radius + MARGIN_PX
    cx, cy = (int(v) for v in rng.integers(edge, size - edge, size=2))
    names = list(COLOURS)
    circle, background = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    return FillSample(cx, cy, radius, circle, background, size)


def make_fill_dataset(out: str | Path, n: int, size: int = DEFAULT_SIZE, seed: int = 0,
                      max_pixels: int | None = None) -> Path:
    """Write ``n`` seeded fill samples in the fill50k layout to the new folder ``out`` (atomically); return it.

    ``size`` squared is checked against the output limit first (:func:`controlnet.limits.check_output_size`;
    ``max_pixels`` None: derived from this machine's memory). Every file write is checked: a failed one (no space,
    a file-size limit) is a one-line :class:`UserError` naming the file, and nothing is left at ``out``.
    """
    out = check_new_set(out, n, size, 16, max_pixels)
    rng = np.random.default_rng(seed)
    with atomic_path(out) as tmp:
        (tmp / "source").mkdir(parents=True)
        (tmp / "target").mkdir()
        with open(tmp / "prompt.json", "w", encoding="utf-8") as prompts:  # one line per sample, as written
            for i in range(n):
                s = random_condition(rng, size)
                # In place: the folder itself is moved into place only once every file is written.
                save_png(tmp / "source" / f"{i}.png", s.condition, atomic=False, compress_level=FILL_PNG_LEVEL)
                save_png(tmp / "target" / f"{i}.png", s.target, atomic=False, compress_level=FILL_PNG_LEVEL)
                row = {"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": s.prompt}
                write_checked(prompts, json.dumps(row) + "\n", out / "prompt.json")
            write_checked(prompts, "", out / "prompt.json", flush=True)
    return out


def check_new_set(out: str | Path, n: int, size: int, min_size: int, max_pixels: int | None) -> Path:
    """``out`` as a Path once the arguments of a synthetic set are valid (``n`` >= 1, ``size`` a multiple of 8 of at
    least ``min_size`` and within the output limit, ``out`` new or an empty folder); one-line UserErrors."""
    out = Path(out)
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if size < min_size or size % 8:
        raise UserError(f"--size must be a multiple of 8 and at least {min_size}, got {size}")
    check_output_size(size, size, max_pixels, device="cpu", what=f"--size {size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; pick a new folder")
    return out


def write_checked(f: Any, text: str, name: Path, flush: bool = False) -> None:
    """``f.write(text)`` (and a flush), a failure being a one-line :class:`UserError` naming ``name``."""
    try:
        f.write(text)
        if flush:
            f.flush()
    except OSError as err:
        raise UserError(f"{name}: cannot write ({err.strerror or err}); check the folder's free space") from None


# --------------------------------------------------------------------------- metrics


def _as_rgb_uint8(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image, a uint8 array, or a float array in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return arr


def condition_disk(condition: Any) -> np.ndarray:
    """(H, W) bool: the filled disk of a condition's circle outline.

    The centre is the intensity-weighted centroid of the outline and the radius its weighted mean distance
    from the centre (the outline is centred on the radius), so the disk matches the target's, not the outline's
    outer edge.
    """
    cond = _as_rgb_uint8(condition).astype(np.float64).mean(axis=2) / 255.0  # (H, W)
    w = np.where(cond > 0.1, cond, 0.0)
    total = w.sum()
    h, wd = cond.shape
    if total == 0:
        return np.zeros((h, wd), bool)
    yy, xx = np.mgrid[:h, :wd]
    cx, cy = (w * xx).sum() / total, (w * yy).sum() / total
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    radius = (w * dist).sum() / total
    return dist <= radius


def _border_colour(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float64)  # (4W, 3)
    return np.median(border, axis=0)


# Without a prompt, a pixel is "circle" when it is farther than this from the border's colour (RGB 0..255),
# or half the largest such distance when that is larger (a faint but uniform circle still separates).
MIN_SEGMENT_DISTANCE = 48.0


def circle_mask(image: Any, prompt: str | None = None) -> np.ndarray:
    """(H, W) bool: the generated circle's pixels.

    With a prompt: pixels nearer to the prompt's circle colour than to its background colour. Without: pixels
    far from the border's majority (median) colour.
    """
    img = _as_rgb_uint8(image).astype(np.float64)
    if prompt is not None:
        circle, background = parse_prompt(prompt)
        d_circle = np.linalg.norm(img - np.array(COLOURS[circle], np.float64), axis=2)
        d_bg = np.linalg.norm(img - np.array(COLOURS[background], np.float64), axis=2)
        return d_circle < d_bg
    dist = np.linalg.norm(img - _border_colour(img), axis=2)
    return dist > max(MIN_SEGMENT_DISTANCE, dist.max() / 2)


def fill_iou(image: Any, condition: Any, prompt: str | None = None) -> float:
    """IoU between the generated circle in ``image`` and the filled disk of ``condition``'s outline.

    1.0 when the circle is exactly where the condition says; 0.0 when disjoint (or when nothing is drawn).
    """
    mask = circle_mask(image, prompt)
    disk = condition_disk(condition)
    if mask.shape != disk.shape:
        raise ValueError(f"image {mask.shape} and condition {disk.shape} differ in size")
    union = np.logical_or(mask, disk).sum()
    return float(np.logical_and(mask, disk).sum() / union) if union else 0.0


def nearest_colour(rgb: Any) -> str:
    """The palette name nearest (Euclidean, RGB) to ``rgb``."""
    rgb = np.asarray(rgb, np.float64)
    return min(COLOURS, key=lambda name: float(np.linalg.norm(rgb - np.array(COLOURS[name], np.float64))))


def circle_colour_correct(image: Any, prompt: str) -> bool:
    """Whether the generated circle's colour (median of the pixels that differ from the border's colour) is
    nearest, in the palette, to the prompt's circle colour. False when no circle is drawn."""
    circle, _ = parse_prompt(prompt)
    img = _as_rgb_uint8(image)
    mask = circle_mask(img)
    if not mask.any():
        return False
    return nearest_colour(np.median(img[mask].astype(np.float64), axis=0)) == circle


def is_fill_run(annotator: str | None, prompts: Any) -> bool:
    """Whether a training run is on fill data: no annotator, and every validation prompt a fill prompt."""
    return annotator is None and bool(prompts) and all(is_fill_prompt(p) for p in prompts)


def fill_scorer(annotator: str | None, params: dict[str, Any]) -> Callable[[Any, Any, str, Any], float]:
    """The trainer's "fill" score: :func:`fill_iou` of a validation sample, segmented by its prompt's colours
    when the prompt is a fill prompt (by the border colour otherwise)."""
    return lambda sample, condition, prompt, target: fill_iou(sample, condition,
                                                              prompt if is_fill_prompt(prompt) else None)
