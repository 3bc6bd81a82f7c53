"""Image-to-image timings: ours at denoise 0.5 against our text-to-image, and against diffusers'
StableDiffusionControlNetImg2ImgPipeline on the same modules (one ControlNet, DDIM, CFG).

    .venv/bin/python -m benchmarks.img2img                           # tiny SD1-layout UNet, 256 px, fp32
    .venv/bin/python -m benchmarks.img2img --size full --resolution 512 --dtype bf16 --repeats 3   # SD1.5 shapes

Expected: img2img at denoise S runs round(S * steps) of the steps, so about S of text-to-image's time plus one
VAE encode; ours against diffusers about 1 (the same work). Each call runs once as a warm-up, then ``--repeats``
rounds of the three in alternated order; printed: each call's median time, and each ratio as the median over the
rounds of the ratio within a round (robust to a machine whose speed drifts between rounds). No assertions:
timings are the machine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks import cases as bc
from controlnet.diffusers_compat import diffusers_image_call_kwargs, diffusers_image_pipeline
from controlnet.devices import DTYPES
from controlnet.pipeline import ControlUnit, Pipeline

DENOISE = 0.5


def _calls(size: str, resolution: int, dtype: torch.dtype, steps: int) -> dict[str, Callable[[], Any]]:
    """The three timed calls, on one set of modules (returns latents; no decoding)."""
    models = bc.build_models(size, dtype, torch.device("cpu"), controlnet_impls=("ours",))
    ours = Pipeline(models.unet, models.vae, models.text_encoder, models.tokenizer, bc._scheduler())
    theirs = diffusers_image_pipeline("img2img", models.unet, models.vae, models.text_encoder, models.tokenizer,
                                      bc._scheduler(), [models.ours_cn])
    condition = bc.condition_images(resolution, 1)[0]
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (resolution, resolution, 3), np.uint8))
    common = dict(steps=steps, guidance=bc.GUIDANCE, seed=0, progress=False, output_type="latent")
    unit = [ControlUnit(models.ours_cn, condition)]
    kwargs = diffusers_image_call_kwargs(picture, [condition], denoise=DENOISE, steps=steps, guidance=bc.GUIDANCE,
                                         seeds=[0])
    return {
        "ours_text2img": lambda: ours(bc.PROMPT, controls=unit, size=(resolution, resolution), **common),
        "ours_img2img": lambda: ours(bc.PROMPT, controls=unit, init_image=picture, denoise=DENOISE, **common),
        "diffusers_img2img": lambda: theirs(bc.PROMPT, **{**kwargs, "generator": [torch.Generator().manual_seed(0)]}),
    }


def measure(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call: a warm-up each, then ``repeats`` rounds, the order reversed every other round."""
    names = list(calls)
    for name in names:
        calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            with torch.inference_mode():
                calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny", help="tiny UNet or SD1.5's shapes")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the records here")
    args = ap.parse_args()
    torch.manual_seed(0)
    times = measure(_calls(args.size, args.resolution, DTYPES[args.dtype], args.steps), args.repeats)
    median = {name: statistics.median(t) for name, t in times.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    record = {"size": args.size, "resolution": args.resolution, "dtype": args.dtype, "steps": args.steps,
              "denoise": DENOISE, "repeats": args.repeats, "seconds": median, "rounds": times,
              "img2img_over_text2img": paired("ours_img2img", "ours_text2img"),
              "ours_over_diffusers_img2img": paired("ours_img2img", "diffusers_img2img")}
    for name, seconds in median.items():
        print(f"{name:20s} {seconds:8.3f} s")
    print(f"img2img (denoise {DENOISE}) / text-to-image, ours: {record['img2img_over_text2img']:.2f}")
    print(f"ours / diffusers' img2img pipeline:           {record['ours_over_diffusers_img2img']:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
