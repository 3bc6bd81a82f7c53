"""Flow-matching generation timings: our TransformerPipeline against diffusers' FluxControlNetPipeline and
StableDiffusion3ControlNetPipeline on the same modules (the same weight tensors), per denoising step.

Configs (``--shape``):

* ``tiny``: the seeded tiny Flux and SD3 bases of :mod:`controlnet.testing_flow`, one ControlNet of 2 (+ 2) blocks.
* ``real``: the released widths, random weights. Flux: FLUX.1-dev's transformer (24 heads x 128 = 3072 features, T5
  4096, CLIP pooled 768, 64 input features, guidance embedding) and an InstantX-layout ControlNet of that width
  (double and single blocks, packed VAE latents; a union one has the 10-mode embedding). SD3: SD3-medium's (24 heads
  x 64 = 1536, T5 4096, pooled 2048, caption projection 1536, 2x2 patches of 16 channels, position embedding 192)
  and an SD3 ControlNet of that width. Depth is ``--depth``; the default, "real width, Flux base 1 double + 2
  single blocks, ControlNet 1 + 1; SD3 base 4 blocks, ControlNet 2", is about 5 GB (Flux) / 2.6 GB (SD3) in
  fp32. Full depth is the same flag on a bigger machine: ``--depth 19 38 5 10`` (FLUX.1-dev with InstantX
  FLUX.1-dev-Controlnet-Union's 5 double + 10 single blocks; about 60 GB in fp32, 30 GB in bf16) or
  ``--depth 24 12`` (SD3-medium, a 12-block ControlNet; about 13 GB in fp32). The text encoders are one layer at the released output
  widths (T5 4096; Flux's CLIP 768; SD3's CLIPs 768 + 1280 with projections), T5 16 tokens.

``--union K`` (Flux): one union ControlNet given K (condition, mode) pairs. Ours runs the K passes of a step as one
batched forward; diffusers' FluxMultiControlNetModel loops over them. Printed: ours batched, ours looped
(``TransformerPipeline.batch_units = False``: one forward per pair, as diffusers) and diffusers'.

    python -m benchmarks.flow                                        # both families, tiny, 64 px, 8 steps
    python -m benchmarks.flow --family flux --shape real --steps 3 --repeats 2
    python -m benchmarks.flow --family flux --shape tiny --union 3 --resolution 256
    python -m benchmarks.flow --family flux --shape real --union 2 --steps 3 --repeats 2 --json flux_union2.json
    python -m benchmarks.flow --family sd3 --shape real --depth 24 12 --dtype bf16   # full depth, ~6.5 GB

Per step: (time of an ``--steps`` generation - time of a 1-step generation) / (steps - 1), so the prompt and
condition encodings, paid once per generation by every side, cancel out. Each call runs once as a warm-up, then
``--repeats`` rounds in alternated order; printed: each side's median seconds per step, the median over the
rounds of ours / diffusers' within a round and the ratio of the fastest rounds (both robust to a loaded machine in
their own way), and the largest difference of the final latents (the same work: in fp32 Flux's agree to float
rounding (identical with one ControlNet); SD3's differ by the condition's VAE posterior sample, drawn from the
global generator by diffusers, whose std is made the smallest diffusers allows (log-variance clamped at -30: 3e-7),
and which a random real-width model under CFG amplifies). Printed: the largest difference and the relative one
(||ours - diffusers|| / ||diffusers||). No assertions: timings are the machine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.img2img import measure
from controlnet.transformer_controlnet import FLUX_UNION_MODES, FluxControlNet, SD3ControlNet, pack_latents
from controlnet.transformer_pipeline import TransformerPipeline, TransformerUnit

PROMPT = "a red circle on blue"
SEED = 0
TEXT_TOKENS = 16
GUIDANCE = {"flux": 3.5, "sd3": 5.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (base blocks..., ControlNet blocks...): Flux (double, single, double, single), SD3 (joint, joint).
DEFAULT_DEPTH = {("flux", "tiny"): (3, 4, 2, 2), ("flux", "real"): (1, 2, 1, 1),
                 ("sd3", "tiny"): (4, 2), ("sd3", "real"): (4, 2)}
UNION_MODES = 10  # the mode embedding of InstantX/FLUX.1-dev-Controlnet-Union (config.json "num_mode")


@dataclass(frozen=True)
class FlowBench:
    """One benchmarked configuration."""

    family: str  # "flux" or "sd3"
    shape: str = "tiny"  # controlnet.testing_flow: "tiny" or "real" (released widths)
    depth: tuple[int, ...] = ()  # DEFAULT_DEPTH's layout; () = the default
    resolution: int = 64
    union: int = 0  # K (condition, mode) pairs of one union ControlNet (Flux); 0: one plain ControlNet
    dtype: str = "fp32"

    @property
    def blocks(self) -> tuple[int, ...]:
        return self.depth or DEFAULT_DEPTH[(self.family, self.shape)]

    def describe(self) -> str:
        b = self.blocks
        width = "tiny" if self.shape == "tiny" else "real width"
        if self.family == "flux":
            text = f"flux {width}, base {b[0]} double + {b[1]} single blocks, ControlNet {b[2]} + {b[3]}"
        else:
            text = f"sd3 {width}, base {b[0]} blocks, ControlNet {b[1]}"
        union = f", union ControlNet x {self.union} (condition, mode) pairs" if self.union else ""
        return f"{text}{union}, {self.resolution} px, {self.dtype}, T5 {TEXT_TOKENS} tokens"


def check(bench: FlowBench) -> None:
    """Refuse a configuration that cannot run, naming the bad value."""
    need = len(DEFAULT_DEPTH[(bench.family, bench.shape)])
    if bench.depth and len(bench.depth) != need:
        raise SystemExit(f"--depth for {bench.family} takes {need} numbers "
                         f"({'base double, base single, ControlNet double, ControlNet single' if need == 4 else 'base blocks, ControlNet blocks'}), "
                         f"got {len(bench.depth)}")
    if bench.union and bench.family != "flux":
        raise SystemExit("--union needs --family flux (SD3 ControlNets have no control modes)")
    if not 0 <= bench.union <= UNION_MODES:
        raise SystemExit(f"--union takes 1..{UNION_MODES} pairs, got {bench.union}")
    if bench.resolution % 16:
        raise SystemExit(f"--resolution must be a multiple of 16, got {bench.resolution}")


def build_pipelines(bench: FlowBench) -> tuple[TransformerPipeline, Any, dict[str, Any], dict[str, Any]]:
    """Our pipeline, diffusers' pipeline on the same modules, and each one's call arguments but the steps."""
    from accelerate import init_empty_weights
    from diffusers import (FluxControlNetModel, FluxControlNetPipeline, SD3ControlNetModel,
                           StableDiffusion3ControlNetPipeline)
    from diffusers.utils.torch_utils import randn_tensor

    from controlnet.testing import trained_like
    from controlnet.testing_flow import diffusers_components, flux_components, sd3_components

    flux, b, dtype, res = bench.family == "flux", bench.blocks, DTYPES[bench.dtype], bench.resolution
    if flux:
        components = flux_components(shape=bench.shape, depth=b[:2])
    else:
        components = sd3_components(posterior_std=1e-7, shape=bench.shape, depth=b[0])
    for module in components.values():
        if isinstance(module, torch.nn.Module) and dtype != torch.float32:
            module.to(dtype)
    base = components["transformer"]
    cn = (FluxControlNet.from_transformer(base, b[2], b[3], num_mode=UNION_MODES if bench.union else None) if flux
          else SD3ControlNet.from_transformer(base, b[1]))
    cn = trained_like(cn, seed=1)
    with init_empty_weights():  # diffusers' model holds our tensors: no second copy
        ref = (FluxControlNetModel if flux else SD3ControlNetModel).from_config(cn.config.to_dict())
    ref.load_state_dict(cn.state_dict(), assign=True)
    pairs = max(bench.union, 1)
    g = torch.Generator().manual_seed(2)
    conditions = [torch.rand(1, 3, res, res, generator=g, dtype=dtype) for _ in range(pairs)]
    modes = FLUX_UNION_MODES[:pairs] if bench.union else [None]
    strengths = [0.7 - 0.1 * k for k in range(pairs)]
    noise = randn_tensor((1, 16, res // 8, res // 8), generator=torch.Generator().manual_seed(SEED))
    units = [TransformerUnit(cn, c, s, mode=m) for c, s, m in zip(conditions, strengths, modes)]
    ours_kwargs = dict(controls=units, guidance=GUIDANCE[bench.family], seed=SEED, output_type="latent",
                       max_sequence_length=TEXT_TOKENS)
    # Per pair step ranges too: by default diffusers makes one range per ControlNet, and its zip then drops all
    # but the first (condition, mode) pair of a union ControlNet.
    control = dict(control_image=[c * 2 - 1 for c in conditions], controlnet_conditioning_scale=strengths,
                   control_mode=[FLUX_UNION_MODES.index(m) for m in modes], control_guidance_start=[0.0] * pairs,
                   control_guidance_end=[1.0] * pairs) if bench.union else dict(
                   control_image=conditions[0] * 2 - 1, controlnet_conditioning_scale=strengths[0])
    theirs_kwargs = dict(**control, height=res, width=res, guidance_scale=GUIDANCE[bench.family],
                         latents=pack_latents(noise) if flux else noise, output_type="latent",
                         max_sequence_length=TEXT_TOKENS)
    theirs = (FluxControlNetPipeline if flux else StableDiffusion3ControlNetPipeline)(
        **diffusers_components(components), controlnet=[ref.eval()] if bench.union else ref.eval())
    theirs.set_progress_bar_config(disable=True)
    return TransformerPipeline(**components), theirs, ours_kwargs, theirs_kwargs


def timed_calls(bench: FlowBench, steps: int) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """The timed calls (ours, ours looped with ``--union``, diffusers'; each at ``steps`` and at 1 step), and a
    dict with the models' parameter counts where the ``steps`` calls leave their final latents (by side name)."""
    ours, theirs, ours_kwargs, theirs_kwargs = build_pipelines(bench)
    res = bench.resolution
    outputs: dict[str, Any] = {
        "base_parameters": sum(p.numel() for p in ours.transformer.parameters()),
        "controlnet_parameters": sum(p.numel() for p in ours_kwargs["controls"][0].controlnet.parameters())}

    def run_ours(n: int, batch: bool = True) -> torch.Tensor:
        ours.batch_units = batch
        return ours(PROMPT, steps=n, **ours_kwargs)

    def run_theirs(n: int) -> torch.Tensor:
        # The generator as ours leaves it after drawing the noise: its condition latents are drawn from there.
        g = torch.Generator().manual_seed(SEED)
        torch.randn(1, 16, res // 8, res // 8, generator=g)
        return theirs(PROMPT, num_inference_steps=n, generator=g, **theirs_kwargs).images

    sides: dict[str, Callable[[int], torch.Tensor]] = {"ours": run_ours}
    if bench.union:
        sides["ours_looped"] = lambda n: run_ours(n, batch=False)
    sides["diffusers"] = run_theirs
    calls: dict[str, Callable[[], Any]] = {}
    for name, run in sides.items():
        calls[name] = lambda run=run, name=name: outputs.__setitem__(name, run(steps))
        calls[f"{name}_1"] = lambda run=run: run(1)
    return calls, outputs


def per_step(times: dict[str, list[float]], name: str, steps: int) -> list[float]:
    """Seconds per step of ``name`` in each round: the ``steps`` call less the 1-step call, over steps - 1."""
    return [(a - b) / (steps - 1) for a, b in zip(times[name], times[f"{name}_1"])]


def run(bench: FlowBench, steps: int, repeats: int) -> dict[str, Any]:
    """Time one configuration; its record (config, per-step medians, ratios, latent differences, raw rounds)."""
    calls, outputs = timed_calls(bench, steps)
    times = measure(calls, repeats)
    sides = [name for name in calls if not name.endswith("_1")]
    steps_of = {name: per_step(times, name, steps) for name in sides}
    theirs = steps_of["diffusers"]
    record: dict[str, Any] = {**asdict(bench), "blocks": bench.blocks, "config": bench.describe(), "steps": steps,
                              "repeats": repeats, "threads": torch.get_num_threads(),
                              "base_parameters": outputs["base_parameters"],
                              "controlnet_parameters": outputs["controlnet_parameters"]}
    for name in sides:
        record[f"{name}_s_per_step"] = statistics.median(steps_of[name])
    for name in sides[:-1]:
        record[f"{name}_over_diffusers"] = statistics.median(a / b for a, b in zip(steps_of[name], theirs))
        record[f"fastest_{name}_over_fastest_diffusers"] = min(steps_of[name]) / min(theirs)
        difference = outputs[name].float() - outputs["diffusers"].float()
        record[f"max_latent_difference_{name}_diffusers"] = difference.abs().max().item()
        record[f"relative_latent_difference_{name}_diffusers"] = (difference.norm() / outputs["diffusers"].norm()).item()
    if bench.union:  # the gain of batching alone: ours batched over ours looped, paired within each round
        record["ours_over_ours_looped"] = statistics.median(
            a / b for a, b in zip(steps_of["ours"], steps_of["ours_looped"]))
    record["rounds"] = times
    return record


def report(record: dict[str, Any]) -> str:
    sides = [k[: -len("_s_per_step")] for k in record if k.endswith("_s_per_step")]
    times = ", ".join(f"{s.replace('_', ' ')} {record[f'{s}_s_per_step']:.3f} s/step" for s in sides)
    ratios = "; ".join(f"{s.replace('_', ' ')}/diffusers {record[f'{s}_over_diffusers']:.2f} (fastest rounds "
                       f"{record[f'fastest_{s}_over_fastest_diffusers']:.2f}, final latents differ by "
                       f"{record[f'max_latent_difference_{s}_diffusers']:.1e}, relative "
                       f"{record[f'relative_latent_difference_{s}_diffusers']:.1e})" for s in sides[:-1])
    size = f"{record['base_parameters'] / 1e6:.3g}M + {record['controlnet_parameters'] / 1e6:.3g}M parameters"
    batching = (f"\n  ours batched/ours looped {record['ours_over_ours_looped']:.2f}"
                if "ours_over_ours_looped" in record else "")
    return f"{record['config']} ({size}), {record['threads']} threads:\n  {times}\n  {ratios}{batching}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=("flux", "sd3", "both"), default="both")
    ap.add_argument("--shape", choices=("tiny", "real"), default="tiny", help="tiny bases or the released widths")
    ap.add_argument("--depth", type=int, nargs="+", default=(),
                    help="Flux: base double, base single, ControlNet double, ControlNet single blocks; "
                         "SD3: base blocks, ControlNet blocks (default: see the module docstring)")
    ap.add_argument("--union", type=int, default=0, metavar="K",
                    help="Flux: one union ControlNet with K (condition, mode) pairs")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--resolution", type=int, default=None, help="pixels, a multiple of 16 (tiny 64, real 256)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the records here")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (per step = steps-call less 1-step call)")
    if args.depth and args.family == "both":
        ap.error("--depth needs one --family (Flux and SD3 count blocks differently)")
    resolution = args.resolution or (64 if args.shape == "tiny" else 256)
    records = []
    for family in ("flux", "sd3") if args.family == "both" else (args.family,):
        bench = FlowBench(family, args.shape, tuple(args.depth), resolution, args.union, args.dtype)
        check(bench)
        records.append(run(bench, args.steps, args.repeats))
        print(report(records[-1]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
