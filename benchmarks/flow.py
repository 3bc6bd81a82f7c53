"""Flow-matching generation timings: our TransformerPipeline against diffusers' FluxControlNetPipeline and
StableDiffusion3ControlNetPipeline on the same modules (tiny seeded Flux and SD3 bases, one ControlNet each).

    .venv/bin/python -m benchmarks.flow                          # both families, 64 px, 8 steps, 3 rounds
    .venv/bin/python -m benchmarks.flow --family flux --resolution 128 --steps 16 --repeats 5

Per step: (time of an ``--steps`` generation - time of a 1-step generation) / (steps - 1), so the prompt and
condition encodings, paid once per generation by both, cancel out. Each call runs once as a warm-up, then
``--repeats`` rounds in alternated order; printed: each side's median seconds per step, the median over the
rounds of ours / diffusers' within a round and the ratio of the fastest rounds (both robust to a loaded machine in
their own way), and the largest difference of the two final latents (the same work:
Flux's are identical; SD3's differ by the condition's VAE posterior sample, drawn from the global generator by
diffusers). No assertions: timings are the machine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.img2img import measure
from controlnet.transformer_controlnet import FluxControlNet, SD3ControlNet, pack_latents
from controlnet.transformer_pipeline import TransformerPipeline, TransformerUnit

PROMPT = "a red circle on blue"
SEED = 0
TEXT_TOKENS = 16
GUIDANCE = {"flux": 3.5, "sd3": 5.0}


def build_pipelines(family: str, resolution: int) -> tuple[TransformerPipeline, Any, dict[str, Any], dict[str, Any]]:
    """Our pipeline, diffusers' pipeline on the same modules, and each one's call arguments but the steps."""
    from diffusers import (FluxControlNetModel, FluxControlNetPipeline, SD3ControlNetModel,
                           StableDiffusion3ControlNetPipeline)
    from diffusers.utils.torch_utils import randn_tensor

    from controlnet.testing import trained_like
    from controlnet.testing_flow import diffusers_components, flux_components, sd3_components

    flux = family == "flux"
    components = flux_components() if flux else sd3_components(posterior_std=1e-7)
    base = components["transformer"]
    cn = FluxControlNet.from_transformer(base, 2, 2) if flux else SD3ControlNet.from_transformer(base, 2)
    cn = trained_like(cn, seed=1)
    ref = (FluxControlNetModel if flux else SD3ControlNetModel).from_config(cn.config.to_dict())
    ref.load_state_dict(cn.state_dict())
    theirs = (FluxControlNetPipeline if flux else StableDiffusion3ControlNetPipeline)(
        **diffusers_components(components), controlnet=ref.eval())
    theirs.set_progress_bar_config(disable=True)
    condition = torch.rand(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(2))
    noise = randn_tensor((1, 16, resolution // 8, resolution // 8), generator=torch.Generator().manual_seed(SEED))
    ours_kwargs = dict(controls=[TransformerUnit(cn, condition)], guidance=GUIDANCE[family], seed=SEED,
                       output_type="latent", max_sequence_length=TEXT_TOKENS)
    theirs_kwargs = dict(control_image=condition * 2 - 1, height=resolution, width=resolution,
                         guidance_scale=GUIDANCE[family], latents=pack_latents(noise) if flux else noise,
                         output_type="latent", max_sequence_length=TEXT_TOKENS)
    return TransformerPipeline(**components), theirs, ours_kwargs, theirs_kwargs


def timed_calls(family: str, resolution: int, steps: int) -> tuple[dict[str, Callable[[], Any]], float]:
    """The timed calls (ours and diffusers', at ``steps`` and at 1 step) and the largest difference of their
    final latents at ``steps``."""
    ours, theirs, ours_kwargs, theirs_kwargs = build_pipelines(family, resolution)

    def run_ours(n: int) -> torch.Tensor:
        return ours(PROMPT, steps=n, **ours_kwargs)

    def run_theirs(n: int) -> torch.Tensor:
        # The generator as ours leaves it after drawing the noise: its condition latents are drawn from there.
        g = torch.Generator().manual_seed(SEED)
        torch.randn(1, 16, resolution // 8, resolution // 8, generator=g)
        return theirs(PROMPT, num_inference_steps=n, generator=g, **theirs_kwargs).images

    difference = (run_ours(steps) - run_theirs(steps)).abs().max().item()
    calls = {"ours": lambda: run_ours(steps), "ours_1": lambda: run_ours(1),
             "diffusers": lambda: run_theirs(steps), "diffusers_1": lambda: run_theirs(1)}
    return calls, difference


def per_step(times: dict[str, list[float]], name: str, steps: int) -> list[float]:
    """Seconds per step of ``name`` in each round: the ``steps`` call less the 1-step call, over steps - 1."""
    return [(a - b) / (steps - 1) for a, b in zip(times[name], times[f"{name}_1"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=("flux", "sd3", "both"), default="both")
    ap.add_argument("--resolution", type=int, default=64, help="pixels (a multiple of 16)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the records here")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (per step = steps-call less 1-step call)")
    records = []
    for family in ("flux", "sd3") if args.family == "both" else (args.family,):
        calls, difference = timed_calls(family, args.resolution, args.steps)
        times = measure(calls, args.repeats)
        ours, theirs = per_step(times, "ours", args.steps), per_step(times, "diffusers", args.steps)
        record = {"family": family, "resolution": args.resolution, "steps": args.steps, "repeats": args.repeats,
                  "ours_s_per_step": statistics.median(ours), "diffusers_s_per_step": statistics.median(theirs),
                  "ours_over_diffusers": statistics.median(a / b for a, b in zip(ours, theirs)),
                  "fastest_ours_over_fastest_diffusers": min(ours) / min(theirs),
                  "max_latent_difference": difference, "rounds": times}
        records.append(record)
        print(f"{family}: ours {record['ours_s_per_step'] * 1000:.2f} ms/step, diffusers "
              f"{record['diffusers_s_per_step'] * 1000:.2f} ms/step, ours/diffusers {record['ours_over_diffusers']:.2f} "
              f"(fastest rounds: {record['fastest_ours_over_fastest_diffusers']:.2f}) "
              f"(final latents differ by {difference:.1e})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
