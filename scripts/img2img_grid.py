"""The README's picture of image-to-image on the embedded model (tiny-sd + the fill ControlNet, 128 px).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/img2img_grid.py [--out docs/img2img.png]

Rows (held-out fill circles; every picture shown at 256 px, 128 px ones enlarged by pixel doubling):

1. inpainting: the picture | the mask (white = repaint) | the condition | the result (outside the mask: the input)
2. img2img: the picture | the condition of a circle elsewhere | denoise 0.5 | denoise 0.8
3. hires fix: the condition | 128 px | 256 px (latent upscale, denoise 0.5)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from controlnet.defaults import DEMO_GUIDANCE
from controlnet.demo import EVAL_SEED, held_out_samples, load_pipeline
from controlnet.images import make_grid, save_png
from controlnet.pipeline import ControlUnit, HiresFix

CELL = 256


def shown(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image).resize((CELL, CELL), Image.NEAREST)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/img2img.png"))
    args = ap.parse_args()
    pipe = load_pipeline()
    samples = held_out_samples(8, EVAL_SEED + 4)
    a, b = samples[:2]
    c = max(samples[2:], key=lambda s: (s.cx - b.cx) ** 2 + (s.cy - b.cy) ** 2)  # a circle elsewhere
    common = dict(steps=20, guidance=DEMO_GUIDANCE, seed=0, progress=False, output_type="np")

    mask = np.zeros((128, 128), np.uint8)
    cv2.circle(mask, (a.cx, a.cy), int(a.radius * 1.5) + 4, 255, -1)
    inpainted = pipe(a.prompt, controls=[ControlUnit("fill", a.condition)], init_image=a.target, mask=mask,
                     **common).images[0]
    row1 = [a.target, mask, a.condition, inpainted]

    moved = [pipe(b.prompt, controls=[ControlUnit("fill", c.condition)], init_image=b.target, denoise=d,
                  **common).images[0] for d in (0.5, 0.8)]
    row2 = [b.target, c.condition, *moved]

    unit = [ControlUnit("fill", c.condition)]
    low = pipe(c.prompt, controls=unit, **common).images[0]
    high = pipe(c.prompt, controls=unit, hires=HiresFix(scale=2, denoise=0.5), **common).images[0]
    row3 = [c.condition, low, high]

    blank = np.full((128, 128, 3), 255, np.uint8)
    cells = [shown(np.repeat(x[..., None], 3, 2) if x.ndim == 2 else x) for x in row1 + row2 + row3 + [blank]]
    save_png(args.out, make_grid(cells, columns=4, pad=4, background=(255, 255, 255)))
    print(args.out)


if __name__ == "__main__":
    main()
