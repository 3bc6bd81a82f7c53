"""The synthetic "shapes" world: several coloured shapes per image, overlapping, with captions naming them.

Each sample draws one to :data:`MAX_SHAPES` shapes (circle, square, triangle; random size, rotation and place;
colours from :data:`controlnet.data.fill.COLOURS`, distinct from each other and from the background) in caption
order, so a later shape covers an earlier one. The caption lists them::

    "red circle, blue square on yellow background"

The conditions are not stored: the annotators make them from the images (``controlnet train --annotator``), so
generated images are scored by re-detecting the same condition (ControlNet++'s protocol):

- ``canny`` and ``softedge``: the existing edge annotators;
- ``shapes``: :func:`detect_shapes`, a per-shape-class label map (background, circle, square, triangle) drawn in
  the ADE20K palette (a black background; circle, square, triangle as ADE20K classes 1, 2, 7), found by colour and geometry alone, so it reads generated images as well as
  the rendered ones.

Layout written by :func:`make_shapes_dataset` (captioned images: ``controlnet train --annotator NAME`` makes the
conditions)::

    OUT/prompt.json      one JSON object per line: {"target": "target/0.png", "prompt": "red circle on blue background"}
    OUT/target/i.png     image (RGB)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from controlnet.data.fill import COLOURS, FILL_PNG_LEVEL, write_checked, check_new_set
from controlnet.defaults import FILL_SIZE
from controlnet.errors import UserError
from controlnet.fileio import atomic_path
from controlnet.images import save_png

KINDS = ("circle", "square", "triangle")  # label k + 1 in the label maps; 0 is the background
MAX_SHAPES = 3
# Circumradius range in px at 128 px, scaled with the image size: the smallest is still a few latent pixels
# (8x VAE) across, the largest leaves room for two others.
MIN_RADIUS, MAX_RADIUS = 14, 40
SUPERSAMPLE = 4  # drawn at 4x and area-averaged: anti-aliased edges
SUBPIXEL_BITS = 4  # OpenCV drawing's fractional bits (its ``shift``): shapes are placed to 1/16 px
DEFAULT_SIZE = FILL_SIZE
# Colours of the label map: the background black, the shapes ADE20K palette rows 1, 2 and 7 (mmseg's
# ADE20KDataset.METAINFO), so that ``controlnet evaluate`` scores it as a segmentation (mIoU over the classes
# present; black reads as ADE20K class 3, which no shape uses). A black background rather than ADE20K's grey row 0:
# a ControlNet trained on grey-background maps ignored them (its hint encoder's output varied by 3% between two
# conditions after 1,000 steps, against 135% for canny edges), as on white-on-black edges it does not.
LABEL_COLOURS = np.array([(0, 0, 0), (180, 120, 120), (6, 230, 230), (204, 5, 255)], np.uint8)
ADE20K_CLASSES = (3, 1, 2, 7)  # the ADE20K class each label colour reads as
# detect_shapes drops colour regions smaller than this fraction of the image (anti-aliasing slivers, noise).
MIN_REGION_FRACTION = 0.004

_CAPTION_RE = re.compile(r"^\s*(.+?)\s+on\s+([a-z]+)\s+background\s*$")


@dataclass(frozen=True)
class Shape:
    """One shape: kind (a :data:`KINDS` name), colour name, centre (x, y) and circumradius in px, rotation in
    degrees."""

    kind: str
    colour: str
    cx: float
    cy: float
    radius: float
    angle: float = 0.0

    def polygon(self) -> np.ndarray:
        """(K, 2) float vertices (squares and triangles) in px, pixel i's centre at coordinate i."""
        corners = {"square": 4, "triangle": 3}[self.kind]
        theta = np.deg2rad(self.angle) + 2 * np.pi * np.arange(corners) / corners - np.pi / 2
        return np.stack([self.cx + self.radius * np.cos(theta), self.cy + self.radius * np.sin(theta)], axis=1)


@dataclass(frozen=True)
class ShapesSample:
    """Shapes drawn in order on a background colour, in a ``size`` x ``size`` image."""

    shapes: tuple[Shape, ...]
    background: str
    size: int = DEFAULT_SIZE

    @property
    def prompt(self) -> str:
        return make_caption([(s.colour, s.kind) for s in self.shapes], self.background)

    def _masks(self, scale: int) -> list[np.ndarray]:
        """(size*scale, size*scale) uint8 masks, one per shape, in the same place at every ``scale``: pixel i's
        centre (coordinate i) is the centre of the scale x scale block it becomes, ``(i + 0.5) * scale - 0.5``."""
        side = self.size * scale
        one = 1 << SUBPIXEL_BITS

        def fixed(v: np.ndarray | float) -> np.ndarray:  # px at scale 1 -> cv2's fixed point at ``scale``
            return np.rint(((np.asarray(v) + 0.5) * scale - 0.5) * one).astype(np.int32)

        masks = []
        for s in self.shapes:
            m = np.zeros((side, side), np.uint8)
            if s.kind == "circle":
                centre = tuple(int(v) for v in fixed(np.array([s.cx, s.cy])))
                cv2.circle(m, centre, int(round(s.radius * scale * one)), 255, -1, shift=SUBPIXEL_BITS)
            else:
                cv2.fillPoly(m, [fixed(s.polygon())], 255, shift=SUBPIXEL_BITS)
            masks.append(m)
        return masks

    @property
    def target(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB image, anti-aliased by supersampling."""
        side = self.size * SUPERSAMPLE
        img = np.empty((side, side, 3), np.uint8)
        img[:] = COLOURS[self.background]
        for s, m in zip(self.shapes, self._masks(SUPERSAMPLE)):
            cv2.copyTo(np.full_like(img, COLOURS[s.colour]), m, img)  # the shape's colour where it covers
        return cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)

    def _coverage_labels(self, label_of_shape) -> np.ndarray:
        """(H, W) uint8: ``label_of_shape(i, shape)`` where shape i covers at least half of a pixel (drawn as
        :attr:`target` is, then averaged), the top shape winning; 0 elsewhere."""
        out = np.zeros((self.size, self.size), np.uint8)
        for i, (s, m) in enumerate(zip(self.shapes, self._masks(SUPERSAMPLE))):
            covered = cv2.resize(m, (self.size, self.size), interpolation=cv2.INTER_AREA)  # 0..255 coverage
            out[covered >= 128] = label_of_shape(i, s)
        return out

    @property
    def labels(self) -> np.ndarray:
        """(H, W) uint8 ground-truth classes: 0 background, k + 1 for ``KINDS[k]``."""
        return self._coverage_labels(lambda i, s: KINDS.index(s.kind) + 1)

    def labels_by_shape(self) -> np.ndarray:
        """(H, W) uint8: 0 for the background, i + 1 where shape i is visible."""
        return self._coverage_labels(lambda i, s: i + 1)


def make_caption(shapes: list[tuple[str, str]], background: str) -> str:
    """"<colour> <kind>, <colour> <kind> on <colour> background" for ``shapes`` as (colour, kind) pairs."""
    return ", ".join(f"{colour} {kind}" for colour, kind in shapes) + f" on {background} background"


def parse_caption(caption: str) -> tuple[list[tuple[str, str]], str]:
    """((colour, kind) pairs, background colour) of a shapes caption; ``UserError`` if it is not one."""
    m = _CAPTION_RE.match(caption.lower())
    pairs = [part.split() for part in m.group(1).split(",")] if m else []
    if not m or m.group(2) not in COLOURS or not all(
            len(p) == 2 and p[0] in COLOURS and p[1] in KINDS for p in pairs):
        raise UserError(f"{caption!r} is not a shapes caption; write '<colour> <shape>, ... on <colour> background' "
                        f"with shapes from {', '.join(KINDS)} and colours from {', '.join(COLOURS)}")
    return [(p[0], p[1]) for p in pairs], m.group(2)


def random_sample(rng: np.random.Generator, size: int = DEFAULT_SIZE, max_shapes: int = MAX_SHAPES) -> ShapesSample:
    """One to ``max_shapes`` random shapes, distinct colours, on a background of yet another colour."""
    if size < 32:
        raise ValueError(f"shapes images must be at least 32 px, got size={size}")
    n = int(rng.integers(1, max_shapes + 1))
    names = list(COLOURS)
    colours = [names[i] for i in rng.choice(len(names), size=n + 1, replace=False)]
    scale = size / DEFAULT_SIZE
    shapes = []
    for colour in colours[1:]:
        radius = float(rng.uniform(MIN_RADIUS, MAX_RADIUS)) * scale
        cx, cy = (float(v) for v in rng.uniform(radius * 0.8, size - radius * 0.8, size=2))
        shapes.append(Shape(KINDS[int(rng.integers(len(KINDS)))], colour, cx, cy, radius,
                            float(rng.uniform(0.0, 360.0))))
    return ShapesSample(tuple(shapes), colours[0], size)


def make_shapes_dataset(out: str | Path, n: int, size: int = DEFAULT_SIZE, seed: int = 0,
                        max_pixels: int | None = None) -> Path:
    """Write ``n`` seeded captioned shapes images to the new folder ``out`` (atomically); return it."""
    out = check_new_set(out, n, size, 32, max_pixels)
    rng = np.random.default_rng(seed)
    with atomic_path(out) as tmp:
        (tmp / "target").mkdir(parents=True)
        with open(tmp / "prompt.json", "w", encoding="utf-8") as prompts:
            for i in range(n):
                s = random_sample(rng, size)
                save_png(tmp / "target" / f"{i}.png", s.target, atomic=False, compress_level=FILL_PNG_LEVEL)
                write_checked(prompts, json.dumps({"target": f"target/{i}.png", "prompt": s.prompt}) + "\n",
                               out / "prompt.json")
            write_checked(prompts, "", out / "prompt.json", flush=True)
    return out


# --------------------------------------------------------------------------- the detector


def palette_index(image: np.ndarray) -> np.ndarray:
    """(H, W) int: index of the nearest :data:`COLOURS` entry of each pixel of an (H, W, 3) uint8 image."""
    palette = np.array(list(COLOURS.values()), np.float32)  # (C, 3)
    pixels = image.reshape(-1, 3).astype(np.float32)  # (H*W, 3)
    # |x - p|^2 without the |x|^2 term, the same for every p: -2 x.p + |p|^2
    d = pixels @ (-2.0 * palette.T) + (palette**2).sum(axis=1)  # (H*W, C)
    return d.argmin(axis=1).reshape(image.shape[:2])


def classify_region(mask: np.ndarray) -> int:
    """The :data:`KINDS` index whose smallest enclosing shape the region fills best: area / (enclosing circle,
    rotated rectangle, triangle) area. A partly covered shape still fills its own enclosing shape most."""
    points = cv2.findNonZero(mask.astype(np.uint8))
    area = float(mask.sum())
    _, radius = cv2.minEnclosingCircle(points)
    (_, (w, h), _) = cv2.minAreaRect(points)
    triangle_area, _ = cv2.minEnclosingTriangle(points)
    # +1 px on each: the enclosing shapes pass through pixel centres, the region covers whole pixels.
    fits = [area / (np.pi * (radius + 0.5) ** 2), area / ((w + 1) * (h + 1)), area / max(triangle_area + 1, 1.0)]
    return int(np.argmax(fits))


def detect_shapes(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the label map of an image of the shapes world in :data:`LABEL_COLOURS`.

    Each pixel takes the nearest palette colour; the most common one is the background. Every other colour's
    connected regions (larger than :data:`MIN_REGION_FRACTION` of the image, after a 3x3 opening that removes
    anti-aliasing slivers) are classified by :func:`classify_region`.
    """
    img = np.asarray(image)[:, :, :3].astype(np.uint8)
    index = palette_index(img)
    background = np.bincount(index.ravel()).argmax()
    labels = np.zeros(index.shape, np.uint8)
    min_area = MIN_REGION_FRACTION * index.size
    kernel = np.ones((3, 3), np.uint8)
    for colour in np.unique(index):
        if colour == background:
            continue
        mask = cv2.morphologyEx((index == colour).astype(np.uint8), cv2.MORPH_OPEN, kernel)
        count, regions = cv2.connectedComponents(mask)
        for r in range(1, count):
            region = regions == r
            if region.sum() >= min_area:
                labels[region] = classify_region(region) + 1
    return LABEL_COLOURS[labels]
