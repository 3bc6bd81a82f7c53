"""What the memory and speed options of :mod:`controlnet.runtime` buy: ``--compile`` (and channels-last) speed per
denoising step and the compile time; ``--offload`` memory on the device.

    .venv/bin/python -m benchmarks.options compile                     # SD1.5 UNet + ControlNet, 256x256, CPU default dtype
    .venv/bin/python -m benchmarks.options compile --size tiny         # the tiny config, seconds
    .venv/bin/python -m benchmarks.options offload                     # device-resident weights per offload mode
    .venv/bin/python -m benchmarks.options offload --device cuda       # + measured peak GPU memory of a generation

Models (no download): the SD1.5 UNet architecture (``controlnet.testing.unet_config("sd1", "full")``) with seeded random
weights and our ControlNet copied from it; for ``offload`` also SD1.5's VAE and text-encoder architectures.

``compile``: one denoising step is what :func:`controlnet.sampling.sample` runs per step under CFG: the ControlNet
and then the UNet with its residuals, on a batch of 2 (unconditional, conditional) at 256x256 (32x32 latents), 77
text tokens. Rows: eager, eager with channels-last weights, and ``torch.compile`` (inductor, default mode) of both
models in place, as ``Pipeline.compile`` does. Per row: the fastest of ``steps`` timed steps after warm-up (the
median too); for compile, the first call's time is the compile time (tracing, inductor code generation, C++
compilation). Speed-up = eager / compiled step time.

``offload``: the bytes of weights on the device while a generation runs, per mode: none (every model there), "model"
(the text encoder alone, then the UNet with the ControlNet, then the VAE with the ControlNet, which keeps its hook
until the generation ends) and "sequential" (one layer at a time: the largest layer). Counted from the models'
parameters on the meta device, in fp16 (the device default on CUDA). On a machine without a GPU there is no device
memory to measure (offloading to the CPU from the CPU moves nothing); with ``--device cuda`` each mode's generation
also reports ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from controlnet.devices import DTYPE_NAMES, default_dtype, resolve_dtype

RESOLUTION = 256
TEXT_TOKENS = 77  # SD1.5's text encoder context (CLIP ViT-L/14)
CFG_BATCH = 2  # unconditional + conditional rows in one batch


def _models(size: str, dtype: torch.dtype):
    from controlnet.model import ControlNet
    from controlnet.testing import build_unet

    unet = build_unet("sd1", size, seed=0).requires_grad_(False)
    controlnet = ControlNet.from_unet(unet).requires_grad_(False).eval()
    return torch.nn.Module.to(unet, dtype=dtype), torch.nn.Module.to(controlnet, dtype=dtype)


def _step_fn(unet, controlnet, resolution: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    h = resolution // 8
    x = torch.randn(CFG_BATCH, 4, h, h, generator=g).to(dtype)  # (2, 4, h, w)
    text = torch.randn(CFG_BATCH, TEXT_TOKENS, unet.config.cross_attention_dim, generator=g).to(dtype)
    hint = controlnet.encode_hint(torch.rand(1, 3, resolution, resolution, generator=g)).expand(CFG_BATCH, -1, -1, -1)
    t = torch.tensor(500)

    @torch.inference_mode()
    def step() -> torch.Tensor:
        residuals = controlnet(x, t, text, hint_embedding=hint)
        return unet(x, t, encoder_hidden_states=text, **residuals.unet_kwargs()).sample

    return step


def _time(step, steps: int) -> tuple[float, list[float]]:
    """(first call's seconds, the next ``steps`` calls' seconds)."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return first, times


def bench_compile(size: str, resolution: int, steps: int, dtype: torch.dtype, threads: int | None) -> dict[str, Any]:
    """Eager, channels-last and compiled step times (module docstring)."""
    from controlnet.runtime import compile_model, to_channels_last

    if threads:
        torch.set_num_threads(threads)
    unet, controlnet = _models(size, dtype)
    step = _step_fn(unet, controlnet, resolution, dtype)
    rows = {}
    first, times = _time(step, steps)
    rows["eager"] = {"first_s": first, "step_s": min(times), "step_median_s": statistics.median(times), "times_s": times}
    reference = step().float()
    for model in (unet, controlnet):
        to_channels_last(model)
    first, times = _time(step, steps)
    rows["channels_last"] = {"first_s": first, "step_s": min(times), "step_median_s": statistics.median(times),
                             "times_s": times}
    for model in (unet, controlnet):
        compile_model(model)
    first, times = _time(step, steps)
    rows["compiled"] = {"compile_s": first, "step_s": min(times), "step_median_s": statistics.median(times),
                        "times_s": times, "max_abs_vs_eager": float((step().float() - reference).abs().max())}
    return {"what": "compile", "size": size, "resolution": resolution, "dtype": DTYPE_NAMES[dtype],
            "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
            "speedup_compiled": rows["eager"]["step_s"] / rows["compiled"]["step_s"],
            "speedup_channels_last": rows["eager"]["step_s"] / rows["channels_last"]["step_s"]}


def _param_bytes(module: torch.nn.Module, bytes_per_param: int) -> int:
    return sum(p.numel() for p in module.parameters()) * bytes_per_param


def offload_residency(size: str = "full", bytes_per_param: int = 2) -> dict[str, Any]:
    """Weights on the device while a generation runs, per offload mode (module docstring), in GiB."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.training import SD15_TEXT, SD15_VAE
    from controlnet.model import ControlNet
    from controlnet.testing import TINY_VAE, unet_config

    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("sd1", size))
        controlnet = ControlNet.from_unet(unet)
        vae = AutoencoderKL(**(SD15_VAE if size == "full" else TINY_VAE))
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    sizes = {name: _param_bytes(m, bytes_per_param) for name, m in
             (("text_encoder", text), ("unet", unet), ("controlnet", controlnet), ("vae", vae))}
    largest_layer = max(_param_bytes(m, bytes_per_param) for model in (text, unet, controlnet, vae)
                        for m in model.modules() if not list(m.children()))
    gib = 2**30
    return {"what": "offload", "size": size, "bytes_per_param": bytes_per_param,
            "models_gib": {k: v / gib for k, v in sizes.items()},
            "resident_gib": {
                "none": sum(sizes.values()) / gib,
                "model": max(sizes["text_encoder"], sizes["unet"] + sizes["controlnet"],
                             sizes["vae"] + sizes["controlnet"]) / gib,
                "sequential": largest_layer / gib,
            }}


def measure_offload_cuda(size: str, steps: int) -> dict[str, float]:
    """Peak GPU memory of a short generation (SD1.5 architecture, random weights, fp16) per offload mode."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.training import SD15_TEXT, SD15_VAE
    from controlnet.model import ControlNet
    from controlnet.pipeline import ControlUnit, Pipeline
    from controlnet.testing import TINY_VAE, build_tokenizer, build_unet

    peaks = {}
    for mode in (None, "model", "sequential"):
        unet = build_unet("sd1", size, seed=0)
        tok = build_tokenizer(["red", "circle"], max_length=TEXT_TOKENS)
        text = CLIPTextModel(CLIPTextConfig(**{**SD15_TEXT, "vocab_size": len(tok.get_vocab())}))
        vae = AutoencoderKL(**(SD15_VAE if size == "full" else TINY_VAE))
        pipe = Pipeline(unet, vae, text, tok, DDIMScheduler(), dtype="fp16", device="cuda")
        cn = torch.nn.Module.to(ControlNet.from_unet(unet), dtype=torch.float16)
        pipe.enable_offload(mode)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        pipe("red circle", controls=[ControlUnit(pipe.prepare_controlnet(cn), torch.rand(RESOLUTION, RESOLUTION, 3))],
             steps=steps, size=(RESOLUTION, RESOLUTION), progress=False)
        peaks[str(mode or "none")] = torch.cuda.max_memory_allocated() / 2**30
        del pipe, unet, text, vae, cn
        torch.cuda.empty_cache()
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.options", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["compile", "offload"])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--resolution", type=int, default=RESOLUTION)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (compile) / generation steps (offload)")
    parser.add_argument("--dtype", default="auto", help="auto: the CPU's default (bf16 with AMX/AVX-512 BF16)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cuda: also measure offload on the GPU")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.what == "compile":
        dtype = default_dtype("cpu") if args.dtype == "auto" else resolve_dtype(args.dtype, "cpu")
        result = bench_compile(args.size, args.resolution, args.steps, dtype, args.threads)
    else:
        result = offload_residency(args.size)
        if args.device.startswith("cuda"):
            result["measured_peak_gib"] = measure_offload_cuda(args.size, args.steps)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
