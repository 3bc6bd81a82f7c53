"""Cost of one training step on the SD1.5 architecture (random weights): our step against the alternatives.

    .venv/bin/python -m benchmarks.training                      # 256x256, batch 2, bf16, 3 timed steps
    .venv/bin/python -m benchmarks.training --threads 1          # one core each (steadier on a shared machine)
    .venv/bin/python -m benchmarks.training --size tiny --steps 2  # the tiny config, seconds

Cases (each in a fresh subprocess):

(i)   ``controlnet_cached``: our step. Latents and text embeddings come from the cache (random tensors of the same
      shapes stand in for it), the locked UNet is stored in ``dtype`` with ``requires_grad=False`` (its encoder
      builds no autograd graph), the ControlNet has fp32 master weights under autocast; the loss is
      :func:`controlnet.train.objective.denoising_loss`, then clipping and AdamW, as ``controlnet train`` does.
(ii)  ``controlnet_diffusers_way``: diffusers' ``examples/controlnet/train_controlnet.py``: the same ControlNet and
      UNet step, plus the VAE encoding of the images and the text encoder on the token ids at every step
      (both in ``dtype``, as that script's ``weight_dtype``).
(iii) ``full_finetune``: full fine-tuning of the UNet (fp32 master weights under autocast, AdamW over all of it,
      no ControlNet), from cached latents and embeddings like (i): the paper's comparison point.

Time: the fastest of ``steps`` steps after one warm-up step (the least disturbed by other work on a shared
machine; the median and every step are in the row too), wall clock and CPU time. Peak memory: the peak resident set size of the case's
process, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, in a fresh process per case (``tracemalloc`` does not see
torch's allocations); it includes building the models, which is below the training peak for all three cases
(``rss_before_gb`` is the resident size once built, before the first step). Work: FLOPs per step counted on the
meta device (:func:`count_tflops`), a figure no other process on the machine can disturb. Targets: time (i)/(ii) <= 0.8, peak
memory (i)/(iii) <= 0.8. The paper (A100, fp16, 512px) reports +23% memory and +34% time for ControlNet against
fine-tuning SD; here the locked base in reduced precision and the optimizer over 361M instead of 860M parameters
make the ControlNet step the cheaper one in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from controlnet.devices import DTYPE_NAMES, DTYPES

CASES = ("controlnet_cached", "controlnet_diffusers_way", "full_finetune")
REPO = Path(__file__).resolve().parents[1]

# runwayml/stable-diffusion-v1-5 vae/config.json
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
# openai/clip-vit-large-patch14 text config (SD1.5's text encoder)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_TOKENS = 77
# SD1.5's scheduler/scheduler_config.json
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# The estimated bytes per parameter a case needs, to refuse a case the machine cannot hold (fp32 weights + grads +
# AdamW's two moments = 16; a locked bf16 weight = 2) and the activations' share on top.
ACTIVATION_MARGIN = 1.3


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _locked_encoders(size: str, cross_dim: int, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The VAE and CLIP text encoder that the uncached ("diffusers way") case runs every step, locked, in ``dtype``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from controlnet.testing import TINY_VAE

    vae = AutoencoderKL(**(SD15_VAE if size == "full" else TINY_VAE)).requires_grad_(False).eval()
    text_cfg = SD15_TEXT if size == "full" else dict(SD15_TEXT, hidden_size=cross_dim, intermediate_size=4 * cross_dim,
                                                      num_hidden_layers=2, num_attention_heads=2, projection_dim=cross_dim)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg)).requires_grad_(False).eval()
    for model in (vae, text_encoder):
        torch.nn.Module.to(model, dtype=dtype)
    return vae, text_encoder


def run_case(case: str, resolution: int, batch: int, dtype: torch.dtype, steps: int, size: str = "full",
             threads: int | None = None) -> dict:
    """One case in this process (call it in a fresh process: the peak RSS is the process's)."""
    if threads:
        torch.set_num_threads(threads)
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from controlnet.model import ControlNet
    from controlnet.testing import build_unet, unet_config
    from controlnet.train.config import DEFAULT_LR, DEFAULT_MAX_GRAD_NORM
    from controlnet.train.objective import denoising_loss, make_adamw

    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; one of {CASES}")
    torch.manual_seed(0)
    reduced = dtype != torch.float32
    unet = build_unet("sd1", size)  # fp32
    cross_dim = unet_config("sd1", size)["cross_attention_dim"]
    controlnet = None
    if case == "full_finetune":
        unet.train()
        trainable = list(unet.parameters())
    else:
        controlnet = ControlNet.from_unet(unet).train()  # fp32 master weights
        unet.requires_grad_(False).eval()
        if reduced:
            torch.nn.Module.to(unet, dtype=dtype)  # the locked base in reduced precision
        trainable = list(controlnet.parameters())
    vae, text_encoder = _locked_encoders(size, cross_dim, dtype) if case == "controlnet_diffusers_way" else (None, None)
    optimizer = make_adamw([{"params": trainable, "lr": DEFAULT_LR}])  # the trainer's optimizer
    scheduler = DDPMScheduler(**SD15_SCHEDULER)
    n_trainable = sum(p.numel() for p in trainable)
    rss_before = _current_rss_gb()

    g = torch.Generator().manual_seed(0)
    h = resolution // 8
    cached_latents = torch.randn(batch, 4, h, h, generator=g)  # (B, 4, h, w): what the cache gives
    cached_text = torch.randn(batch, SD15_TOKENS, cross_dim, generator=g)  # (B, 77, 768)
    pixels = torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    token_ids = torch.randint(0, SD15_TEXT["vocab_size"], (batch, SD15_TOKENS), generator=g)
    condition = torch.rand(batch, 3, resolution, resolution, generator=g)  # (B, 3, H, W) in [0, 1]

    def step() -> None:
        if case == "controlnet_diffusers_way":
            with torch.no_grad():
                latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=g).float() * SD15_VAE["scaling_factor"]
                text = text_encoder(token_ids)[0].float()
        else:
            latents, text = cached_latents, cached_text
        batch_ = {"latents": latents, "noise": torch.randn(latents.shape, generator=g),
                  "timesteps": torch.randint(0, 1000, (batch,), generator=g), "hidden": text, "condition": condition}
        with torch.autocast("cpu", dtype=dtype, enabled=reduced):
            if controlnet is not None:
                loss = denoising_loss(controlnet, unet, scheduler, batch_, "epsilon", unet.dtype, resolution)
            else:
                noisy = scheduler.add_noise(batch_["latents"], batch_["noise"], batch_["timesteps"])
                loss = F.mse_loss(unet(noisy, batch_["timesteps"], text).sample.float(), batch_["noise"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, DEFAULT_MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates the optimizer state and the gradients
    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {"case": case, "size": size, "resolution": resolution, "batch": batch, "dtype": str(dtype).split(".")[-1],
            "step_s": min(times), "step_median_s": statistics.median(times), "step_times_s": times,
            "cpu_s": min(cpu_times), "cpu_times_s": cpu_times, "peak_rss_gb": _peak_rss_gb(),
            "rss_before_gb": rss_before, "trainable_params_m": n_trainable / 1e6, "threads": torch.get_num_threads()}


def count_tflops(resolution: int = 256, batch: int = 2, size: str = "full") -> dict[str, float]:
    """Floating-point work of one step of each case, counted by ``torch.utils.flop_counter`` on the meta device (no
    weights, no arithmetic: seconds, and independent of what else the machine runs). TFLOP per step."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from controlnet.model import ControlNet
    from controlnet.testing import TINY_VAE, unet_config
    from controlnet.train.objective import denoising_loss

    meta = torch.device("meta")
    cfg = unet_config("sd1", size)
    with meta:
        unet = UNet2DConditionModel(**cfg)
        controlnet = ControlNet.from_unet(unet)
        vae = AutoencoderKL(**(SD15_VAE if size == "full" else TINY_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    scheduler = DDPMScheduler(**SD15_SCHEDULER)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(meta)
    h = resolution // 8
    batch_ = {"latents": torch.empty(batch, 4, h, h, device=meta), "noise": torch.empty(batch, 4, h, h, device=meta),
              "timesteps": torch.zeros(batch, dtype=torch.long, device=meta),
              "hidden": torch.empty(batch, SD15_TOKENS, cfg["cross_attention_dim"], device=meta),
              "condition": torch.empty(batch, 3, resolution, resolution, device=meta)}

    def tflop(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    def controlnet_step() -> None:
        denoising_loss(controlnet, unet.requires_grad_(False), scheduler, batch_, "epsilon", torch.float32,
                       resolution).backward()

    def full_step() -> None:
        noisy = scheduler.add_noise(batch_["latents"], batch_["noise"], batch_["timesteps"])
        F.mse_loss(unet.requires_grad_(True)(noisy, batch_["timesteps"], batch_["hidden"]).sample,
                   batch_["noise"]).backward()

    ours = tflop(controlnet_step)
    encode = tflop(lambda: vae.encode(torch.empty(batch, 3, resolution, resolution, device=meta)))
    encode += tflop(lambda: text_encoder(torch.zeros(batch, SD15_TOKENS, dtype=torch.long, device=meta)))
    return {"controlnet_cached": ours, "controlnet_diffusers_way": ours + encode, "full_finetune": tflop(full_step)}


def _estimate_gb(case: str, size: str) -> float:
    """A rough need of a case, to skip one the machine cannot hold instead of being killed for memory."""
    if size != "full":
        return 1.0
    # parameters: SD1.5 UNet 860M, its ControlNet 361M (tests/test_checkpoints), VAE 84M + CLIP-L text 123M
    unet, cn, vae_text = 0.86e9, 0.361e9, 0.207e9
    per = {"controlnet_cached": unet * 2 + cn * 16, "controlnet_diffusers_way": unet * 2 + cn * 16 + vae_text * 2,
           "full_finetune": unet * 16}[case]
    return per * ACTIVATION_MARGIN / 2**30


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def bench_training(resolution: int = 256, batch: int = 2, dtype: torch.dtype = torch.bfloat16, steps: int = 3,
                   size: str = "full", threads: int | None = None) -> list[dict]:
    """Run the three cases, each in a fresh subprocess; print a table and the two target ratios; return the rows.

    A case the machine has too little free memory for is reported with ``"skipped"`` instead of run.
    """
    name = DTYPE_NAMES[dtype]
    rows: list[dict[str, Any]] = []
    for case in CASES:
        need, free = _estimate_gb(case, size), _available_gb()
        if need > free:
            rows.append({"case": case, "skipped": f"needs ~{need:.1f} GiB, {free:.1f} GiB available"})
            continue
        cmd = [sys.executable, "-m", "benchmarks.training", "--case", case, "--resolution", str(resolution),
               "--batch", str(batch), "--dtype", name, "--steps", str(steps), "--size", size]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"case": case, "skipped": f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    tflops = count_tflops(resolution, batch, size)
    for row in rows:
        row["tflop_per_step"] = tflops[row["case"]]
    _report(rows)
    return rows


def _report(rows: list[dict]) -> None:
    """A table, then the target ratios on wall time and on CPU time (the process's user + system seconds: less
    disturbed by other work on a shared machine; equal to threads x wall time on a quiet one)."""
    print(f"{'case':28s} {'s/step':>8s} {'CPU s/step':>11s} {'TFLOP/step':>11s} {'peak GiB':>9s} {'built GiB':>10s} "
          f"{'trainable M':>12s}")
    by_case = {}
    for r in rows:
        if "skipped" in r:
            print(f"{r['case']:28s} skipped: {r['skipped']} ({r.get('tflop_per_step', float('nan')):.3f} TFLOP/step)")
            continue
        by_case[r["case"]] = r
        print(f"{r['case']:28s} {r['step_s']:8.2f} {r['cpu_s']:11.2f} {r['tflop_per_step']:11.3f} {r['peak_rss_gb']:9.2f} "
              f"{r['rss_before_gb']:10.2f} {r['trainable_params_m']:12.1f}")
    ours, theirs, full = (by_case.get(c) for c in CASES)
    if ours and theirs:
        wall, cpu = ours["step_s"] / theirs["step_s"], ours["cpu_s"] / theirs["cpu_s"]
        work = ours["tflop_per_step"] / theirs["tflop_per_step"]
        print(f"time   (i)/(ii)  = {wall:.2f} wall, {cpu:.2f} CPU, {work:.2f} FLOP  "
              f"(target <= 0.8: {'met' if wall <= 0.8 else 'NOT met'})")
    if ours and full:
        ratio = ours["peak_rss_gb"] / full["peak_rss_gb"]
        print(f"memory (i)/(iii) = {ratio:.2f}  (target <= 0.8: {'met' if ratio <= 0.8 else 'NOT met'})")
        print(f"time   (i)/(iii) = {ours['step_s'] / full['step_s']:.2f} wall, {ours['cpu_s'] / full['cpu_s']:.2f} CPU"
              "  (for reference; the paper: 1.34)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=CASES, help="run one case in this process and print its row as JSON")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", choices=list(DTYPE_NAMES.values()), default="bf16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--threads", type=int, default=None, help="torch threads per case (default: torch's)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.resolution, args.batch, DTYPES[args.dtype], args.steps, args.size,
                                  args.threads)))
        return
    rows = bench_training(args.resolution, args.batch, DTYPES[args.dtype], args.steps, args.size, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
