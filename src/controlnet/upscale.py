"""Tiled upscaling under the tile ControlNet (ControlNet 1.1's control_v11f1e_sd15_tile): ``controlnet upscale``.

::

    picture (W x H) → Lanczos to (s W x s H), multiples of 8                      the starting picture
    → tiles of T x T px overlapping by at least O px, spread edge to edge         tile_boxes
    → each tile: img2img (denoise S) with the tile ControlNet, whose condition    Pipeline(init_image=tile, ...)
      is the tile annotator of the tile (shrunk s times, enlarged again)
    → blended: each tile weighted 1 inside and ramping linearly to 0 across the   tile_weights
      O px of every edge it shares with a neighbour; weights normalised

One tile is generated at a time, so memory is that of a T x T generation whatever the output's size (plus the
output's own arrays, 28 bytes per output pixel).

Decisions:

* Tile size: the base's native resolution by default (512 px for SD1.5), overlap 1/8 of it (64 px), as the
  "Ultimate SD upscale" and MultiDiffusion defaults for SD1.5.
* Condition: the ``tile`` annotator with ``factor`` = the scale (``tile_factor`` overrides): the enlarged tile
  shrunk back to the source's own detail and enlarged again, the blur the tile ControlNet learned to remove
  (lllyasviel's tile model was trained on images blurred by random down-sampling; the bundled one on factor 4).
* Seeds: tile k uses ``seed + k``, so neighbouring tiles do not repeat the same noise.
* Blending in pixel space (after decoding each tile), not in latent space, so each tile's decoder sees whole
  latents; seams are hidden by the overlap ramps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from controlnet.defaults import DEFAULT_SCHEDULER, DEFAULT_STEPS, DEFAULT_UPSCALE_DENOISE, TILE_OVERLAP_FRACTION
from controlnet.errors import UserError
from controlnet.images import load_image
from controlnet.limits import check_scale

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive

# The bundled tile ControlNet's name (src/controlnet/assets/controlnets/tile/).
TILE_CONTROLNET = "tile"


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of ``tile`` px start along a side of ``length`` px: as few as overlap by at least ``overlap``
    px, spread evenly from one end to the other."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_boxes(width: int, height: int, tile: int, overlap: int) -> list[Box]:
    """The tiles covering a ``width`` x ``height`` picture, row by row (each ``tile`` px square, or the picture's
    side where it is smaller)."""
    if tile < 8 or not 0 <= overlap < tile:
        raise UserError(f"tile must be >= 8 px and overlap in [0, tile); got tile {tile}, overlap {overlap}")
    tw, th = min(tile, width), min(tile, height)
    return [(x, y, x + tw, y + th) for y in _starts(height, tile, overlap) for x in _starts(width, tile, overlap)]


def _ramp(start: int, end: int, length: int, overlap: int) -> np.ndarray:
    """1-D weights of a tile spanning [start, end) of ``length``: 1, ramping to 0 over ``overlap`` px at each end
    that has a neighbour (not at the picture's border)."""
    x = np.arange(start, end, dtype=np.float32) + 0.5
    w = np.ones(end - start, np.float32)
    if overlap > 0 and start > 0:
        w = np.minimum(w, (x - start) / overlap)
    if overlap > 0 and end < length:
        w = np.minimum(w, (end - x) / overlap)
    return w


def tile_weights(box: Box, width: int, height: int, overlap: int) -> np.ndarray:
    """``(h, w)`` float32 blending weights of a tile (module docstring); positive everywhere."""
    left, top, right, bottom = box
    return np.outer(_ramp(top, bottom, height, overlap), _ramp(left, right, width, overlap))


@dataclass
class UpscaleResult:
    """The upscaled picture ``(sH, sW, 3)`` uint8, and the settings that made it (PNG metadata)."""

    image: np.ndarray
    settings: dict[str, Any]


def upscale(pipe: Any, image: Any, scale: float = 2.0, *, tile: int | None = None, overlap: int | None = None,
            controlnet: Any = TILE_CONTROLNET, strength: float = 1.0, tile_factor: float | None = None,
            prompt: str = "", negative_prompt: str = "", denoise: float = DEFAULT_UPSCALE_DENOISE,
            steps: int = DEFAULT_STEPS, guidance: float | None = None, scheduler: str = DEFAULT_SCHEDULER,
            seed: int = 0, progress: bool = False, max_pixels: int | None = None,
            on_tile: Callable[[int, int], None] | None = None) -> UpscaleResult:
    """Upscale ``image`` (path, PIL image or array) ``scale`` times, tile by tile (module docstring).

    ``pipe``: a :class:`controlnet.pipeline.Pipeline`; ``controlnet``: the tile ControlNet (bundled name or path;
    None: plain img2img tiles); ``tile``/``overlap`` in output pixels (None: the native size and 1/8 of it);
    ``on_tile(k, n)`` is called after each of the ``n`` tiles; ``max_pixels`` bounds the output as
    :func:`controlnet.limits.check_output_size` does (None: from the device's memory).
    """
    from controlnet.conditions import round_size
    from controlnet.pipeline import ControlUnit

    source = load_image(image)
    device = getattr(pipe, "device", None)
    check_scale(scale, source.shape[1], source.shape[0], max_pixels, None if device is None else str(device))
    tile = int(tile or pipe.native_size)
    overlap = int(tile // TILE_OVERLAP_FRACTION if overlap is None else overlap)
    if tile % pipe.vae_scale_factor:
        raise UserError(f"--tile must be a multiple of {pipe.vae_scale_factor}, got {tile}")
    width, height = round_size(source.shape[1] * scale, source.shape[0] * scale, pipe.vae_scale_factor)
    big = np.asarray(Image.fromarray(source).resize((width, height), Image.LANCZOS))  # (sH, sW, 3)
    boxes = tile_boxes(width, height, tile, overlap)
    total = np.zeros((height, width, 3), np.float32)
    weights = np.zeros((height, width, 1), np.float32)
    factor = float(tile_factor or scale)
    kwargs = dict(negative_prompt=negative_prompt, denoise=denoise, steps=steps, scheduler=scheduler,
                  progress=progress, output_type="np", **({} if guidance is None else {"guidance": guidance}))
    for k, (left, top, right, bottom) in enumerate(boxes):
        crop = np.ascontiguousarray(big[top:bottom, left:right])
        units = [] if controlnet is None else [
            ControlUnit(controlnet, crop, strength=strength, annotator="tile", annotator_params={"factor": factor})]
        out = pipe(prompt, controls=units, init_image=crop, seed=seed + k, **kwargs)
        w = tile_weights((left, top, right, bottom), width, height, overlap)[..., None]
        total[top:bottom, left:right] += out.images[0].astype(np.float32) * w
        weights[top:bottom, left:right] += w
        if on_tile is not None:
            on_tile(k, len(boxes))
    result = np.clip(np.rint(total / weights), 0, 255).astype(np.uint8)
    settings = {**out.settings, "size": f"{width}x{height}", "seed": seed, "seeds": [seed],
                "upscale": {"scale": float(scale), "tile": tile, "overlap": overlap, "tiles": len(boxes),
                            "tile_factor": factor}}
    settings.pop("init_image", None)
    return UpscaleResult(result, settings)
