"""Train the embedded tiny Flux-layout base on synthetic fill data, then its ``fill`` ControlNet.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_embedded_flux.py --work outputs/train_flux   # → outputs/tiny-flux
    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_embedded_flux.py --work outputs/train_flux --ship
        # → src/controlnet/assets/tiny-flux (base) and src/controlnet/assets/tiny-flux/controlnets/fill

The base is a diffusers FluxPipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
text_encoder_2/, tokenizer_2/, scheduler/). What it reuses and what it trains:

- **VAE**: the embedded tiny-sd VAE, weights unchanged (4 latent channels, 8x; 2x2 packing gives the
  transformer 16 input features). Its ``shift_factor`` and ``scaling_factor`` are set to the mean and 1 / std of
  the latents of the training set (SD's VAE has no shift; FLUX.1's has 0.1159 and 0.3611, chosen the same way).
- **CLIP** (``text_encoder``, ``tokenizer``): tiny-sd's trained text encoder and tokenizer; Flux uses its pooled
  output. Frozen.
- **T5** (``text_encoder_2``, ``tokenizer_2``): a 1-layer, 64-wide T5EncoderModel with random, frozen weights and
  a SentencePiece tokenizer built in code over the prompts' words (:func:`controlnet.testing_flow.build_t5_tokenizer`).
  The cheapest encoder both diffusers' FluxPipeline and our TransformerPipeline load offline; frozen, its
  outputs are computed once per prompt. Prompts are encoded to :data:`T5_TOKENS` tokens: generate with
  ``max_sequence_length=T5_TOKENS`` (the demo does).
- **Transformer**: FluxTransformer2DModel, 2 double + 2 single blocks, width 128 (4 heads x 32), patch 1 on the
  2x2-packed latents, no guidance embedding (as FLUX.1-schnell: the tiny model is not guidance-distilled).
  Flow matching (x_t = (1 - s) x_0 + s noise, target noise - x_0), s drawn uniformly and shifted with the Flux
  scheduler's resolution-dependent shift at 128 px, as the sampler spaces its steps. An EMA ships (fp16).

The ControlNet (``--controlnet-minutes``; 0 skips it): :meth:`FluxControlNet.from_transformer` with
``--controlnet-layers`` double blocks and no single block, trained with the same flow-matching objective on the
locked base (the condition: the outline's VAE latents, packed, as ``encode_condition`` gives them). Every
``--eval-every`` steps the log records the held-out IoU of 8 conditions (``controlnet.demo.held_out_samples``).
A JSON line every 50 steps shows the progress; the base resumes from ``--work`` (a larger ``--minutes`` or
``--steps`` continues a finished one), the ControlNet starts anew.
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

from controlnet.data.fill import COLOURS, fill_iou, random_condition
from controlnet.fileio import atomic_path, atomic_write_text
from controlnet.options import shipped_or_out

IMAGE_SIZE = 128
SD_BASE = Path(__file__).resolve().parents[1] / "src/controlnet/assets/tiny-sd"
VOCABULARY = tuple(sorted(set(COLOURS) | {"circle", "with", "background"}))
T5_TOKENS = 16  # the prompts have 6 T5 tokens with </s>
T5_WIDTH = 64
TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
    joint_attention_dim=T5_WIDTH, pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12),
)  # in_channels: tiny-sd's 4 latent channels x 2x2 packing; pooled_projection_dim: tiny-sd's CLIP width
CONTROLNET_SUBFOLDER = "controlnets/fill"  # the fill ControlNet, inside the base folder
DEFAULT_OUT = Path("outputs/tiny-flux")
SHIPPED_OUT = Path("src/controlnet/assets/tiny-flux")  # tracked: the embedded Flux base; written only with --ship


def log(path: Path, **row) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def load_sd_parts():
    """tiny-sd's VAE, CLIP text encoder and tokenizer (fp32, frozen)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(SD_BASE / "vae", torch_dtype=torch.float32).eval()
    text = CLIPTextModel.from_pretrained(SD_BASE / "text_encoder", torch_dtype=torch.float32).eval()
    return vae.requires_grad_(False), text.requires_grad_(False), CLIPTokenizer.from_pretrained(SD_BASE / "tokenizer")


def build_t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    from controlnet.testing_flow import build_t5_tokenizer

    tok = build_t5_tokenizer(VOCABULARY)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tok), d_model=T5_WIDTH, d_ff=2 * T5_WIDTH, d_kv=16, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0)
    return T5EncoderModel(config).eval().requires_grad_(False), tok


@torch.no_grad()
def encode_set(vae, n: int, seed: int, work: Path) -> dict:
    """Targets' and conditions' VAE latents (N, 4, 16, 16), unscaled, and the prompts; cached in ``work``."""
    cache = work / "latents.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True) | {"prompts": json.loads((work / "prompts.json").read_text())}
    rng = np.random.default_rng(seed)
    targets, conditions, prompts = [], [], []
    for i in range(0, n, 250):
        samples = [random_condition(rng, IMAGE_SIZE) for _ in range(min(250, n - i))]
        for key, out in (("target", targets), ("condition", conditions)):
            x = torch.from_numpy(np.stack([getattr(s, key) for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
            out.append(vae.encode(x).latent_dist.mean)
        prompts += [s.prompt for s in samples]
        print(f"encoded {len(prompts)}/{n}", flush=True)
    data = {"targets": torch.cat(targets), "conditions": torch.cat(conditions)}
    torch.save(data, cache)
    atomic_write_text(work / "prompts.json", json.dumps(prompts))
    return data | {"prompts": prompts}


@torch.no_grad()
def text_table(prompts: list[str], clip, clip_tok, t5, t5_tok) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The distinct prompts, their T5 states (P, T5_TOKENS, 64) and CLIP pooled outputs (P, 64), as
    TransformerPipeline.encode_prompt computes them."""
    unique = sorted(set(prompts))
    ids = clip_tok(unique, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
    t5_ids = t5_tok(unique, padding="max_length", max_length=T5_TOKENS, truncation=True, return_tensors="pt").input_ids
    return unique, t5(t5_ids)[0], clip(ids).pooler_output


def shifted_sigmas(u: torch.Tensor, scheduler_config: dict) -> torch.Tensor:
    """Noise levels from uniform ``u`` shifted as the Flux scheduler shifts them at 128 px (diffusers'
    ``time_shift``: exponential, mu of the number of packed tokens)."""
    import math

    from controlnet.flow_sampling import calculate_shift

    tokens = (IMAGE_SIZE // 8 // 2) ** 2
    mu = calculate_shift(tokens, scheduler_config)
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


def flow_batch(z0: torch.Tensor, g: torch.Generator, scheduler_config: dict):
    """(x_t packed, sigma, target packed) for scaled latents ``z0`` (B, 4, 16, 16)."""
    from controlnet.transformer_controlnet import pack_latents

    noise = torch.randn(z0.shape, generator=g)
    u = torch.rand(len(z0), generator=g).clamp(1e-3, 1 - 1e-3)
    s = shifted_sigmas(u, scheduler_config)
    xt = (1 - s[:, None, None, None]) * z0 + s[:, None, None, None] * noise
    return pack_latents(xt), s, pack_latents(noise - z0)


class FlowData:
    """The cached training set as the transformer takes it: scaled latents, packed condition latents, and each
    sample's text (T5 states, CLIP pooled) with Flux's position ids."""

    def __init__(self, parts: dict, data: dict, table) -> None:
        from controlnet.transformer_controlnet import latent_image_ids, pack_latents

        self.latents = (data["targets"] - parts["shift"]) * parts["scale"]  # (N, 4, 16, 16)
        self.conditions = pack_latents((data["conditions"] - parts["shift"]) * parts["scale"])  # (N, 64, 16)
        unique, self.t5_states, self.pooled = table
        self.prompt_index = torch.tensor([unique.index(p) for p in data["prompts"]])
        self.ids = dict(img_ids=latent_image_ids(IMAGE_SIZE // 16, IMAGE_SIZE // 16), txt_ids=torch.zeros(T5_TOKENS, 3))

    def batch(self, g: torch.Generator, n: int):
        """(indices, x_t, sigma, target, text keyword arguments) of ``n`` random samples."""
        from controlnet.testing_flow import FLUX_SCHEDULER

        idx = torch.randint(0, len(self.latents), (n,), generator=g)
        xt, sigma, target = flow_batch(self.latents[idx], g, FLUX_SCHEDULER)
        text = dict(encoder_hidden_states=self.t5_states[self.prompt_index[idx]],
                    pooled_projections=self.pooled[self.prompt_index[idx]], **self.ids)
        return idx, xt, sigma, target, text


def optimiser_step(opt: torch.optim.Optimizer, loss: torch.Tensor, model: torch.nn.Module) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train_embedded.py
    opt.step()


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)


def make_pipeline(parts: dict, transformer):
    from controlnet.testing_flow import FLUX_SCHEDULER
    from controlnet.transformer_pipeline import TransformerPipeline

    return TransformerPipeline(transformer, parts["vae"], parts["clip"], parts["clip_tok"], parts["t5"],
                               parts["t5_tok"], dict(FLUX_SCHEDULER))


@torch.no_grad()
def evaluate(parts: dict, transformer, controlnet=None, n: int = 8, steps: int = 16) -> dict:
    """Colour accuracy and IoU on ``n`` held-out conditions (the demo's held-out seed), with ``controlnet`` if
    given."""
    from controlnet.data.fill import circle_colour_correct
    from controlnet.demo import held_out_samples
    from controlnet.transformer_pipeline import TransformerUnit

    pipe = make_pipeline(parts, transformer)
    ious, right = [], 0
    for i, s in enumerate(held_out_samples(n)):
        units = [] if controlnet is None else [TransformerUnit(controlnet, s.condition)]
        img = pipe(s.prompt, units, height=IMAGE_SIZE, width=IMAGE_SIZE, steps=steps, seed=i,
                   max_sequence_length=T5_TOKENS, output_type="pt")[0]
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        ious.append(fill_iou(arr, s.condition, s.prompt))
        right += circle_colour_correct(arr, s.prompt)
    return {"iou": round(float(np.mean(ious)), 4), "colour_accuracy": right / n}


def train_base(args, parts: dict, data: dict, table) -> tuple[torch.nn.Module, dict]:
    """The transformer (EMA) trained with flow matching on the cached target latents."""
    from diffusers import FluxTransformer2DModel

    ckpt = args.work / "transformer.pt"
    torch.manual_seed(args.seed)
    model = FluxTransformer2DModel(**TRANSFORMER_CONFIG).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, seconds = 0, 0.0
    if ckpt.exists():
        s = torch.load(ckpt, weights_only=True)
        model.load_state_dict(s["model"]); ema.load_state_dict(s["ema"]); opt.load_state_dict(s["opt"])
        step, seconds = s["step"], s["seconds"]
        if s["done"] and not (step < args.steps and seconds < args.minutes * 60):  # a larger budget continues it
            return ema, s
    flow = FlowData(parts, data, table)
    g = torch.Generator().manual_seed(args.seed + step)
    t0 = time.time() - seconds
    while step < args.steps and time.time() - t0 < args.minutes * 60:
        _, xt, sigma, target, text = flow.batch(g, args.batch)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        loss = F.mse_loss(model(hidden_states=xt, timestep=sigma, return_dict=False, **text)[0], target)
        optimiser_step(opt, loss, model)
        step += 1
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        if step % 50 == 0:
            log(args.work / "log.jsonl", stage="base", step=step, loss=round(loss.item(), 5),
                seconds=round(time.time() - t0, 1))
        if args.eval_base_every and step % args.eval_base_every == 0:
            log(args.work / "log.jsonl", stage="base-eval", step=step, **evaluate(parts, ema))
        if step % 500 == 0:
            _save(ckpt, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                  seconds=time.time() - t0, done=False)
    state = _save(ckpt, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                  seconds=time.time() - t0, done=True)
    return ema, state


def _save(path: Path, **state) -> dict:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return state


def train_controlnet(args, parts: dict, data: dict, table, base) -> tuple[torch.nn.Module, dict]:
    """The fill ControlNet on the locked ``base``, with the base's objective; held-out IoU every --eval-every."""
    from controlnet.transformer_controlnet import FluxControlNet, transformer_kwargs

    base = base.eval().requires_grad_(False)
    torch.manual_seed(args.seed + 7)
    cn = FluxControlNet.from_transformer(base, num_layers=args.controlnet_layers, num_single_layers=0).train()
    opt = torch.optim.AdamW(cn.parameters(), lr=args.controlnet_lr, weight_decay=0.0)
    flow = FlowData(parts, data, table)
    g = torch.Generator().manual_seed(args.seed + 11)
    step, t0 = 0, time.time()
    log(args.work / "log.jsonl", stage="controlnet-eval", step=0, **evaluate(parts, base, cn.eval()))
    while step < args.controlnet_steps and time.time() - t0 < args.controlnet_minutes * 60:
        cn.train()
        idx, xt, sigma, target, text = flow.batch(g, args.batch)
        residuals = cn(hidden_states=xt, timestep=sigma, condition=flow.conditions[idx], **text)
        pred = base(hidden_states=xt, timestep=sigma, return_dict=False, **text,
                    **transformer_kwargs(residuals, base))[0]
        loss = F.mse_loss(pred, target)
        optimiser_step(opt, loss, cn)
        step += 1
        if step % 50 == 0:
            log(args.work / "log.jsonl", stage="controlnet", step=step, loss=round(loss.item(), 5),
                seconds=round(time.time() - t0, 1))
        if args.eval_every and step % args.eval_every == 0:
            log(args.work / "log.jsonl", stage="controlnet-eval", step=step, **evaluate(parts, base, cn.eval()))
    return cn.eval(), {"controlnet_steps": step, "controlnet_seconds": round(time.time() - t0, 1)}


def save_base(out: Path, parts: dict, transformer) -> None:
    """The base as a diffusers FluxPipeline folder, fp16 weights, readable by every user."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from controlnet.testing_flow import FLUX_SCHEDULER

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                        vae=copy.deepcopy(parts["vae"]).half(), text_encoder=copy.deepcopy(parts["clip"]).half(),
                        tokenizer=parts["clip_tok"], text_encoder_2=copy.deepcopy(parts["t5"]).half(),
                        tokenizer_2=parts["t5_tok"], transformer=copy.deepcopy(transformer).half())
    with atomic_path(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _readable(tmp)


def save_controlnet(out: Path, controlnet) -> None:
    from controlnet.transformer_formats import save_transformer_controlnet

    dest = out / CONTROLNET_SUBFOLDER
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_transformer_controlnet(controlnet, dest, dtype=torch.float16)
    _readable(out)


def _readable(root: Path) -> None:
    for f in [root, *root.rglob("*")]:  # package data must be readable by every user
        f.chmod(0o755 if f.is_dir() else 0o644)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``--ship`` makes the output the tracked embedded Flux base (and refuses another --out)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("outputs/train_flux"))
    ap.add_argument("--out", type=Path, default=None, help=f"the pipeline folder (default: {DEFAULT_OUT})")
    ap.add_argument("--ship", action="store_true", help=f"write the base to the tracked {SHIPPED_OUT}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latent-set", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--minutes", type=float, default=18.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--eval-base-every", type=int, default=1000)
    ap.add_argument("--controlnet-minutes", type=float, default=10.0, help="0: train no ControlNet")
    ap.add_argument("--controlnet-steps", type=int, default=20000)
    ap.add_argument("--controlnet-layers", type=int, default=2)
    ap.add_argument("--controlnet-lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=50)
    args = ap.parse_args(argv)
    args.out = shipped_or_out(ap, args.ship, args.out, SHIPPED_OUT, DEFAULT_OUT)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"training the embedded Flux base: work folder {args.work}, result {args.out}; a line every 50 steps",
          flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    vae, clip, clip_tok = load_sd_parts()
    t5, t5_tok = build_t5(args.seed + 5)
    data = encode_set(vae, args.latent_set, args.seed + 2, args.work)
    shift, std = float(data["targets"].mean()), float(data["targets"].std())
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    parts = dict(vae=vae, clip=clip, clip_tok=clip_tok, t5=t5, t5_tok=t5_tok, shift=shift, scale=1.0 / std)
    log(args.work / "log.jsonl", stage="latents", n=len(data["targets"]), shift_factor=shift, scaling_factor=1 / std)
    table = text_table(data["prompts"], clip, clip_tok, t5, t5_tok)
    base, state = train_base(args, parts, data, table)
    save_base(args.out, parts, base)
    summary = {"seed": args.seed, "latent_set": len(data["targets"]), "shift_factor": shift, "scaling_factor": 1 / std,
               "base_steps": state["step"], "base_seconds": round(state["seconds"], 1), "batch": args.batch,
               "lr": args.lr, "params": sum(p.numel() for p in base.parameters()),
               "base_eval": evaluate(parts, base, n=16, steps=20)}
    if args.controlnet_minutes > 0:
        cn, cn_state = train_controlnet(args, parts, data, table, base)
        save_controlnet(args.out, cn)
        summary |= cn_state | {"controlnet_params": sum(p.numel() for p in cn.parameters())}
    atomic_write_text(args.work / "summary.json", json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
