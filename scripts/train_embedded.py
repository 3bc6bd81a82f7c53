"""Train the embedded tiny SD-layout base model on synthetic fill data (target image + prompt only).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/train_embedded.py --work outputs/train_base     # → outputs/tiny-sd
    OMP_NUM_THREADS=2 .venv/bin/python scripts/train_embedded.py --work outputs/train_base --ship  # replace the shipped base
    # continue the shipped base (what the second round did: 4,000 more UNet steps, stopped after the step-4000 eval)
    OMP_NUM_THREADS=2 .venv/bin/python scripts/train_embedded.py --init src/controlnet/assets/tiny-sd \
        --work outputs/train_base2 --out outputs/tiny-sd-new --unet-batch 32 --unet-lr 5e-4 --unet-minutes 38
    # the shapes-world base (tiny-shapes): tiny-sd's VAE fine-tuned and its UNet as the start, a new text encoder
    OMP_NUM_THREADS=2 .venv/bin/python scripts/train_embedded.py --world shapes --vae-init src/controlnet/assets/tiny-sd \
        --unet-init src/controlnet/assets/tiny-sd --work outputs/train_shapes --vae-minutes 6 --vae-crop-minutes 4 \
        --unet-minutes 32 --unet-steps 20000 --eval-every 1000            # → outputs/tiny-shapes

Stages (each resumes from ``--work`` if interrupted; the final folder is written atomically; a JSON line every 50
steps shows the progress). The base goes to ``--out`` (default outputs/tiny-sd); only ``--ship`` replaces the
tracked src/controlnet/assets/tiny-sd.

1. VAE (AutoencoderKL, 8x downsampling, 4 latent channels) on random fill targets: MSE + a small KL term.
   Its ``scaling_factor`` is set to 1 / std of the latents of a held set, as SD's 0.18215 was.
2. Encode a fixed set of targets to latents once (the VAE is frozen from here on).
3. UNet2DConditionModel + CLIPTextModel jointly, epsilon prediction on the SD1.5 noise schedule, with 10% empty
   prompts so classifier-free guidance works, min-SNR loss weights. An EMA of both is what ships, with the VAE's
   posterior made deterministic (:func:`make_posterior_deterministic`). Every ``--eval-every`` steps the EMA model
   draws 16 held-out prompts and the log records its colour accuracy.

The base never sees a condition: it learns to draw "a <colour> circle with <colour> background" somewhere.
Weights are saved in fp16 in the diffusers StableDiffusionPipeline layout. The VAE trains under bf16 autocast; the
UNet in fp32 by default (``--precision``: faster here).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from controlnet.data import shapes
from controlnet.data.fill import COLOURS, random_condition
from controlnet.fileio import atomic_path, atomic_write_text
from controlnet.options import shipped_or_out
from controlnet.testing import build_text_encoder, build_tokenizer, build_vae

IMAGE_SIZE = 128
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE,
)  # 3 downsamplers: 8x as SD's VAE, so 128 px images have 16x16 latents. Few GroupNorm groups (4+ channels
# each): a flat-colour image normalised in groups of 2 channels loses its colour, and learning stalls.
# The posterior's log-variance starts at this value (std 0.05) rather than 0, so sampled latents are readable
# from the first step; a small KL term keeps it near there.
VAE_INIT_LOGVAR = -6.0
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=4,
    norm_num_groups=8,
)
TEXT_HIDDEN, TEXT_LAYERS, TEXT_HEADS, MAX_TOKENS = 64, 2, 4, 16
# SD1.5's scheduler/scheduler_config.json (scaled_linear betas 0.00085..0.012, 1000 steps, epsilon).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
VOCABULARY = sorted(set(COLOURS) | {"circle", "with", "background"})
# The shapes world (controlnet.data.shapes): captions "<colour> <shape>, ... on <colour> background".
SHAPES_VOCABULARY = sorted(set(COLOURS) | set(shapes.KINDS) | {"on", "background"})
EMPTY_PROMPT_RATE = 0.1  # classifier-free guidance needs an unconditional model
KL_WEIGHT = 1e-6  # SD's autoencoder kl_weight (on the summed KL)


WORLD = "circles"  # or "shapes": set by main() from --world


def sample_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, H, W) targets in [-1, 1] and their prompts, from the world of --world."""
    draw = shapes.random_sample if WORLD == "shapes" else random_condition
    samples = [draw(rng, IMAGE_SIZE) for _ in range(n)]
    x = torch.from_numpy(np.stack([s.target for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [s.prompt for s in samples]


def log(path: Path, **row) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def train_vae(args, work: Path) -> "torch.nn.Module":
    """Phase 1: whole 128 px images; phase 2: random ``--vae-crop`` px crops (4x cheaper per image, the same
    convolutions; flat-colour areas dominate, which is what the colours need)."""
    ckpt = work / "vae.pt"
    vae = build_vae(VAE_CONFIG, seed=args.seed).train()
    with torch.no_grad():  # conv_out gives (mean, logvar) x latent channels
        vae.encoder.conv_out.bias[VAE_CONFIG["latent_channels"]:] = VAE_INIT_LOGVAR
    if args.vae_init:  # fine-tune another base's VAE (same config) on this world
        from diffusers import AutoencoderKL

        vae.load_state_dict(AutoencoderKL.from_pretrained(args.vae_init / "vae").float().state_dict())
        with torch.no_grad():  # its posterior was made deterministic for shipping: sample again while training
            vae.quant_conv.bias[VAE_CONFIG["latent_channels"]:] = VAE_INIT_LOGVAR
    state = {"phase": "full", "steps": 0, "seconds": 0.0, "full_steps": 0, "full_seconds": 0.0}
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["model"])
        if state["done"]:
            return vae.eval()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 1 + state["steps"])
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    for phase, max_steps, minutes in (("full", args.vae_steps, args.vae_minutes),
                                      ("crop", args.vae_crop_steps, args.vae_crop_minutes)):
        if phase == "full" and state["phase"] == "crop":
            continue
        t0 = time.time() - (state["seconds"] if state["phase"] == phase else 0.0)
        step = state["steps"] if state["phase"] == phase else 0
        while step < max_steps and time.time() - t0 < minutes * 60:
            x, _ = sample_batch(rng, args.vae_batch)
            if phase == "crop":
                c = args.vae_crop
                offsets = rng.integers(0, IMAGE_SIZE - c + 1, size=(len(x), 2))
                x = torch.stack([img[:, i:i + c, j:j + c] for img, (i, j) in zip(x, offsets)])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                post = vae.encode(x).latent_dist
                rec = vae.decode(post.sample()).sample
            mse = F.mse_loss(rec.float(), x)
            kl = post.kl().float().mean()
            loss = mse + KL_WEIGHT * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                log(work / "log.jsonl", stage=f"vae-{phase}", step=step, mse=round(mse.item(), 5),
                    kl=round(kl.item(), 1), seconds=round(time.time() - t0, 1))
            if step % 100 == 0:
                state.update(model=vae.state_dict(), done=False, phase=phase, steps=step, seconds=time.time() - t0)
                torch.save(state, ckpt)
        if phase == "full":
            state.update(full_steps=step, full_seconds=time.time() - t0)
        state.update(phase=phase, steps=step, seconds=time.time() - t0)
        if phase == "full":
            state.update(phase="crop", steps=0, seconds=0.0)
    vae.eval()
    state.update(model=vae.state_dict(), done=True)
    torch.save(state, ckpt)
    return vae


@torch.no_grad()
def encode_set(vae, n: int, seed: int, work: Path) -> tuple[torch.Tensor, list[str]]:
    cache = work / "latents.pt"
    if cache.exists():
        d = torch.load(cache, weights_only=True)
        return d["latents"], json.loads((work / "prompts.json").read_text())
    rng = np.random.default_rng(seed)
    lats, prompts = [], []
    for i in range(0, n, 250):
        x, p = sample_batch(rng, min(250, n - i))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lats.append(vae.encode(x).latent_dist.mean.float())
        prompts += p
    latents = torch.cat(lats)  # (N, 4, 16, 16), unscaled
    torch.save({"latents": latents}, cache)
    (work / "prompts.json").write_text(json.dumps(prompts))
    return latents, prompts


def min_snr_weights(sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR for epsilon prediction (Hang et al. 2023, "Efficient
    Diffusion Training via Min-SNR Weighting Strategy"; gamma 5 is their value). 0 turns weighting off."""
    if gamma <= 0:
        return torch.ones(len(t))
    alpha_bar = sched.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


@torch.no_grad()
def evaluate_base(unet, vae, text, tokenizer, n: int = 16, steps: int = 20, guidance: float = 5.0) -> dict:
    """Colour accuracy of the base alone on ``n`` held-out prompts (the demo's held-out seed), and how many
    images show a circle at all. Circle placement is the ControlNet's job, not measured here."""
    from diffusers import DDIMScheduler

    from controlnet.data.fill import circle_colour_correct, circle_mask
    from controlnet.demo import held_out_samples
    from controlnet.pipeline import Pipeline

    pipe = Pipeline(unet, vae, text, tokenizer, DDIMScheduler(**SCHEDULER_CONFIG))
    if WORLD == "shapes":
        return evaluate_shapes_base(pipe, n, steps, guidance)
    right, drawn = 0, 0
    for i, s in enumerate(held_out_samples(n)):
        img = pipe(s.prompt, steps=steps, guidance=guidance, seed=i, output_type="np", progress=False).images[0]
        right += circle_colour_correct(img, s.prompt)
        drawn += bool(circle_mask(img).mean() > 0.02)
    return {"colour_accuracy": right / n, "circle_drawn": drawn / n}


def evaluate_shapes_base(pipe, n: int, steps: int, guidance: float) -> dict:
    """The fraction of the caption's colours the base draws as a region (``detect_shapes``'s palette regions), and
    the fraction of those whose detected kind is the caption's, on ``n`` held-out captions."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    found, kinds, total = 0, 0, 0
    names = list(COLOURS)
    for i in range(n):
        sample = shapes.random_sample(rng, IMAGE_SIZE)
        img = pipe(sample.prompt, steps=steps, guidance=guidance, seed=i, output_type="np", progress=False).images[0]
        img = np.asarray(img)  # (H, W, 3) uint8: the pipeline's "np" output
        index, labels = shapes.palette_index(img), shapes.LABEL_COLOURS.tolist()
        detected = shapes.detect_shapes(img).reshape(-1, 3).tolist()
        for s in sample.shapes:
            region = (index.ravel() == names.index(s.colour))
            total += 1
            if region.mean() > shapes.MIN_REGION_FRACTION:
                found += 1
                hits = [tuple(detected[j]) for j in np.flatnonzero(region)]
                kinds += max(set(hits), key=hits.count) == tuple(labels[shapes.KINDS.index(s.kind) + 1])
    return {"colours_drawn": found / total, "kinds_right": kinds / total}


HELD_OUT_SEED = 20260  # the demo's held-out seed: no training sample comes from it


def train_unet(args, work: Path, latents: torch.Tensor, prompts: list[str], tokenizer, vae=None):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(args.seed)
    if args.init:  # continue from a shipped pipeline folder (fp16 on disk, trained in fp32 here)
        unet = UNet2DConditionModel.from_pretrained(args.init / "unet", torch_dtype=torch.float32).train()
        text = CLIPTextModel.from_pretrained(args.init / "text_encoder", torch_dtype=torch.float32).train()
    else:
        unet = UNet2DConditionModel(**UNET_CONFIG).train()
        if args.unet_init:  # another base's UNet (same config) as the starting point; the text encoder is new
            unet.load_state_dict(UNet2DConditionModel.from_pretrained(args.unet_init / "unet").float().state_dict())
        text = build_text_encoder(len(tokenizer), TEXT_HIDDEN, TEXT_LAYERS, TEXT_HEADS, MAX_TOKENS,
                                  seed=args.seed).train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.0)
    step, seconds = 0, 0.0
    ckpt = work / "unet.pt"
    if ckpt.exists():
        s = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(s["unet"]); text.load_state_dict(s["text"])
        ema_unet.load_state_dict(s["ema_unet"]); ema_text.load_state_dict(s["ema_text"])
        opt.load_state_dict(s["opt"]); step, seconds = s["step"], s["seconds"]
        if s.get("done"):
            return ema_unet, ema_text, s
    sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)  # ignores DDIM-only keys
    ids_all = tokenizer(prompts + [""], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
    empty_ids, ids_all = ids_all[-1], ids_all[:-1]
    g = torch.Generator().manual_seed(args.seed + step)
    t0 = time.time() - seconds
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    while step < args.unet_steps and time.time() - t0 < args.unet_minutes * 60:
        idx = torch.randint(0, len(latents), (args.unet_batch,), generator=g)
        z0 = latents[idx] * args.scaling_factor  # (B, 4, 16, 16)
        ids = ids_all[idx].clone()
        drop = torch.rand(args.unet_batch, generator=g) < EMPTY_PROMPT_RATE
        ids[drop] = empty_ids
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.unet_batch,), generator=g)
        zt = sched.add_noise(z0, noise, t)
        warm = min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = args.unet_lr * warm
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            emb = text(ids).last_hidden_state
            pred = unet(zt, t, emb).sample
        per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(sched, t, args.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema_params, params):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0:
            log(work / "log.jsonl", stage="unet", step=step, loss=round(loss.item(), 5),
                seconds=round(time.time() - t0, 1))
        if args.eval_every and step % args.eval_every == 0 and vae is not None:
            log(work / "log.jsonl", stage="eval", step=step, **evaluate_base(ema_unet, vae, ema_text, tokenizer))
        if step % 500 == 0:
            _save_unet(ckpt, unet, text, ema_unet, ema_text, opt, step, time.time() - t0, False)
    state = _save_unet(ckpt, unet, text, ema_unet, ema_text, opt, step, time.time() - t0, True)
    return ema_unet, ema_text, state


def _save_unet(path, unet, text, ema_unet, ema_text, opt, step, seconds, done):
    state = {"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
             "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds,
             "done": done}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return state


# The log-variance the shipped VAE's posterior reports for every latent (std exp(-10) = 4.5e-5): the UNet is
# trained on posterior *means* (encode_set), while ControlNet training samples the posterior, as the original
# does. The tiny VAE's learned log-variance is meaningless (posterior std 0.02..8.5, mean 0.48, measured
# 2026-12-01) and sampling it fed the locked base latents it never saw (a step-0 ControlNet loss of 0.25 against
# the base's 0.02). A near-zero variance makes sampling give the means the base knows.
POSTERIOR_LOGVAR = -20.0


@torch.no_grad()
def make_posterior_deterministic(vae) -> None:
    """Set the posterior's log-variance to :data:`POSTERIOR_LOGVAR` everywhere (means and decoder unchanged).

    The moments come out of ``quant_conv`` (a 1x1 conv, (mean, logvar) x latent channels) when the VAE has one,
    else out of the encoder's ``conv_out``: its log-variance rows become a constant."""
    c = vae.config.latent_channels
    conv = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out
    conv.weight[c:] = 0.0
    conv.bias[c:] = POSTERIOR_LOGVAR


def save_pipeline(out: Path, vae, text, unet, tokenizer) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae = copy.deepcopy(vae)
    make_posterior_deterministic(vae)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(), text_encoder=copy.deepcopy(text).half(), tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with atomic_path(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for f in tmp.rglob("*"):  # package data must be readable by every user
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)


# Per world: the default result folder, and the tracked embedded base that only --ship writes.
DEFAULT_OUT = {"circles": Path("outputs/tiny-sd"), "shapes": Path("outputs/tiny-shapes")}
SHIPPED_OUT = {"circles": Path("src/controlnet/assets/tiny-sd"), "shapes": Path("src/controlnet/assets/tiny-shapes")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``--ship`` makes the output the tracked embedded base (and refuses another --out), and an --out
    inside the package's assets needs --ship."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("outputs/train_base"))
    ap.add_argument("--out", type=Path, default=None,
                    help=f"the trained pipeline folder (default: {DEFAULT_OUT['circles']} or {DEFAULT_OUT['shapes']})")
    ap.add_argument("--ship", action="store_true",
                    help=f"write the base to the tracked {SHIPPED_OUT['circles']} (or {SHIPPED_OUT['shapes']})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", choices=("circles", "shapes"), default="circles",
                    help="circles: one circle per image (tiny-sd); shapes: controlnet.data.shapes (tiny-shapes)")
    ap.add_argument("--vae-init", type=Path, default=None, help="fine-tune this pipeline folder's VAE")
    ap.add_argument("--unet-init", type=Path, default=None, help="start from this pipeline folder's UNet")
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--vae-minutes", type=float, default=9.0)
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--vae-lr", type=float, default=3e-4)
    ap.add_argument("--vae-crop", type=int, default=64)
    ap.add_argument("--vae-crop-steps", type=int, default=3000)
    ap.add_argument("--vae-crop-minutes", type=float, default=6.0)
    ap.add_argument("--latent-set", type=int, default=16000)
    ap.add_argument("--unet-steps", type=int, default=6000)
    ap.add_argument("--unet-minutes", type=float, default=25.0)
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--unet-lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from this pipeline folder (its VAE, tokenizer, UNet and text encoder)")
    # fp32 is the default: a bf16-autocast step of the tiny UNet took 0.99 s against 0.43 s in fp32 (batch 32,
    # measured 2026-12-01 on an Intel Xeon without AMX or AVX-512 BF16, where bf16 is emulated; the SDPA backward
    # dominated). On a CPU with hardware bf16, measure before choosing.
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--min-snr-gamma", type=float, default=5.0)
    ap.add_argument("--eval-every", type=int, default=500)
    args = ap.parse_args(argv)
    shipped = SHIPPED_OUT[args.world]
    assets = (Path(__file__).resolve().parents[1] / shipped.parent).resolve()
    if not args.ship and args.out is not None and args.out.resolve().is_relative_to(assets):
        ap.error(f"--out {args.out} is inside the package's tracked assets; pass --ship to replace them")
    args.out = shipped_or_out(ap, args.ship, args.out, shipped, DEFAULT_OUT[args.world])
    return args


def main(argv: list[str] | None = None) -> None:
    global WORLD
    args = parse_args(argv)
    WORLD = args.world
    print(f"training the embedded base: work folder {args.work}, result {args.out}; a line every 50 steps",
          flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    t_start = time.time()
    if args.init:
        from diffusers import AutoencoderKL
        from transformers import CLIPTokenizer

        vae = AutoencoderKL.from_pretrained(args.init / "vae", torch_dtype=torch.float32).eval()
        tokenizer = CLIPTokenizer.from_pretrained(args.init / "tokenizer")
        vae_state = {"full_steps": 0, "steps": 0, "full_seconds": 0.0, "seconds": 0.0}
    else:
        vae = train_vae(args, args.work)
        vae_state = torch.load(args.work / "vae.pt", weights_only=True)
        tokenizer = build_tokenizer(SHAPES_VOCABULARY if WORLD == "shapes" else VOCABULARY, max_length=MAX_TOKENS)
    latents, prompts = encode_set(vae, args.latent_set, args.seed + 2, args.work)
    if args.init:  # the shipped scaling factor: the UNet was trained with it
        args.scaling_factor = float(vae.config.scaling_factor)
    else:
        args.scaling_factor = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=args.scaling_factor)
    log(args.work / "log.jsonl", stage="latents", n=len(latents), std=float(latents.std()),
        scaling_factor=args.scaling_factor)

    unet, text, state = train_unet(args, args.work, latents, prompts, tokenizer, vae)
    save_pipeline(args.out, vae, text, unet, tokenizer)
    summary = {
        "seed": args.seed, "vae_full_steps": vae_state["full_steps"], "vae_crop_steps": vae_state["steps"],
        "vae_batch": args.vae_batch, "vae_seconds": round(vae_state["full_seconds"] + vae_state["seconds"], 1), "latent_set": len(latents),
        "scaling_factor": args.scaling_factor, "unet_steps": state["step"], "unet_batch": args.unet_batch,
        "unet_seconds": round(state["seconds"], 1), "unet_lr": args.unet_lr, "ema": args.ema,
        "total_seconds_this_run": round(time.time() - t_start, 1),
        "params": {"unet": sum(p.numel() for p in unet.parameters()),
                   "text_encoder": sum(p.numel() for p in text.parameters()),
                   "vae": sum(p.numel() for p in vae.parameters())},
    }
    atomic_write_text(args.work / "summary.json", json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
