"""Measure tiled upscaling 128 → 512 on held-out fill circles: the tile ControlNet against a plain Lanczos
upscale (and plain img2img tiles without a ControlNet).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/evaluate_tile.py [--n 16] [--controlnet tile] [--out docs/runs/tile.json]

Ground truth: each circle rendered at 512 px (controlnet.data.fill at size 512); the input is that picture
shrunk to 128 (INTER_AREA). Measures, per method, averaged over the circles:

- PSNR (dB) against the 512 px rendering: closeness to the true high-resolution picture;
- edge sharpness: gradient energy (mean squared Sobel gradient, grey) within 6 px of the circle's outline, over
  the true rendering's (1.0: as sharp as the truth; a blurred edge spreads the same step over more pixels and has
  less energy: a 4x Lanczos upscale is < 1). The mean gradient *magnitude* would not do: across one edge it
  sums to the step's height whatever the blur;
- edge error: mean absolute difference (0..255) within 6 px of the outline, where blur shows;
- fidelity: PSNR of the result shrunk back to 128 px against the input (did the upscaler keep the picture).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from controlnet.demo import EVAL_SEED, held_out_samples, load_pipeline
from controlnet.fileio import atomic_write_text
from controlnet.images import make_grid, save_png
from controlnet.upscale import upscale

SCALE = 4
EDGE_BAND_PX = 6


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def gradient_energy(image: np.ndarray, where: np.ndarray) -> float:
    """Mean squared Sobel gradient of the grey picture over the pixels ``where``."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
    gx, gy = cv2.Sobel(grey, cv2.CV_64F, 1, 0), cv2.Sobel(grey, cv2.CV_64F, 0, 1)
    return float(np.mean((gx**2 + gy**2)[where]))


def edge_band(sample) -> np.ndarray:
    yy, xx = np.mgrid[: sample.size, : sample.size]
    return np.abs(np.hypot(xx - sample.cx, yy - sample.cy) - sample.radius) <= EDGE_BAND_PX


def scores(result: np.ndarray, truth: np.ndarray, small: np.ndarray, band: np.ndarray) -> dict[str, float]:
    back = cv2.resize(result, small.shape[1::-1], interpolation=cv2.INTER_AREA)
    return {"psnr": psnr(result, truth), "edge_sharpness": gradient_energy(result, band) / gradient_energy(truth, band),
            "edge_error": float(np.mean(np.abs(result[band].astype(float) - truth[band]))),
            "fidelity_psnr": psnr(back, small)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--controlnet", default="tile")
    ap.add_argument("--denoise", type=float, default=0.5)
    ap.add_argument("--with-prompt", action="store_true",
                    help="give each tile the circle's prompt (default: empty, as `controlnet upscale`)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("docs/runs/tile_upscale.json"))
    ap.add_argument("--grid", type=Path, default=None, help="also write input | Lanczos | ours | truth for 4")
    args = ap.parse_args()
    pipe = load_pipeline()
    start = time.perf_counter()
    methods = {"lanczos": [], "tiles_without_controlnet": [], "tile_controlnet": []}
    rows = []
    for sample in held_out_samples(args.n, EVAL_SEED + 3, size=128 * SCALE):
        truth = sample.target
        small = cv2.resize(truth, (128, 128), interpolation=cv2.INTER_AREA)
        band = edge_band(sample)
        lanczos = np.asarray(Image.fromarray(small).resize(truth.shape[1::-1], Image.LANCZOS))
        common = dict(prompt=sample.prompt if args.with_prompt else "", denoise=args.denoise, steps=args.steps,
                      guidance=args.guidance)
        plain = upscale(pipe, small, SCALE, controlnet=None, **common).image
        ours = upscale(pipe, small, SCALE, controlnet=args.controlnet, strength=args.strength, **common).image
        for name, result in (("lanczos", lanczos), ("tiles_without_controlnet", plain), ("tile_controlnet", ours)):
            methods[name].append(scores(result, truth, small, band))
        if len(rows) < 4:
            rows += [np.asarray(Image.fromarray(small).resize(truth.shape[1::-1], Image.NEAREST)), lanczos, ours, truth]
    summary = {name: {k: round(float(np.mean([s[k] for s in runs])), 4) for k in runs[0]}
               for name, runs in methods.items()}
    report = {"n": args.n, "scale": SCALE, "controlnet": args.controlnet, "denoise": args.denoise,
              "prompt": "the circle's" if args.with_prompt else "empty",
              "steps": args.steps, "guidance": args.guidance, "strength": args.strength,
              "seconds": round(time.perf_counter() - start, 1), "mean": summary}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    if args.grid:
        save_png(args.grid, make_grid(rows, columns=4, pad=4, background=(255, 255, 255)))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
