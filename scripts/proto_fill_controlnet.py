"""Prototype: train a fill ControlNet on the locked tiny base with a short private loop (not the shipped path).

The shipped ControlNet is trained with ``controlnet train`` (scripts/train_fill_controlnet.sh). This loop exists
to check the base and the recipe before that trainer was ready, and for the zero-conv ablation
(scripts/ablation.py), which needs variants the trainer does not offer.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/proto_fill_controlnet.py --out outputs/proto_fill --steps 2000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from controlnet.data.fill import circle_colour_correct, fill_iou, random_condition
from controlnet.model import ControlNet

BASE = Path("src/controlnet/assets/tiny-sd")


def load_base(base: Path = BASE):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    f32 = torch.float32
    return dict(
        unet=UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=f32).eval().requires_grad_(False),
        vae=AutoencoderKL.from_pretrained(base / "vae", torch_dtype=f32).eval().requires_grad_(False),
        text=CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=f32).eval().requires_grad_(False),
        tok=CLIPTokenizer.from_pretrained(base / "tokenizer"),
        sched=DDIMScheduler.from_pretrained(base / "scheduler"),
    )


def embed(m, prompts: list[str]) -> torch.Tensor:
    ids = m["tok"](prompts, padding="max_length", max_length=m["tok"].model_max_length, truncation=True,
                   return_tensors="pt").input_ids
    return m["text"](ids).last_hidden_state


def hint_tensor(conds: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(conds)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]


@torch.no_grad()
def sample(m, prompts, conds=None, controlnet=None, steps=20, guidance=5.0, seed=0) -> np.ndarray:
    """(B, H, W, 3) uint8 images; DDIM with classifier-free guidance; control on both branches."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(m["sched"].config)
    sched.set_timesteps(steps)
    b = len(prompts)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, 16, 16, generator=g)
    emb = torch.cat([embed(m, [""] * b), embed(m, prompts)])
    hint_emb = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if controlnet is not None:
            hint_emb = controlnet.encode_hint(hint_tensor(conds)).repeat(2, 1, 1, 1)
        for t in sched.timesteps:
            zin = torch.cat([z, z])
            kw = {}
            if controlnet is not None:
                kw = controlnet(zin, t, emb, hint_embedding=hint_emb).unet_kwargs()
            eps = m["unet"](zin, t, emb, **kw).sample.float()
            eu, ec = eps.chunk(2)
            z = sched.step(eu + guidance * (ec - eu), t, z).prev_sample
        img = m["vae"].decode(z / m["vae"].config.scaling_factor).sample.float()
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def evaluate(m, samples, controlnet=None, steps=20, guidance=5.0, seed=0, batch=32) -> dict:
    ious, cols = [], []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        imgs = sample(m, [s.prompt for s in chunk], [s.condition for s in chunk], controlnet, steps, guidance, seed + i)
        for s, im in zip(chunk, imgs):
            ious.append(fill_iou(im, s.condition, s.prompt))
            cols.append(circle_colour_correct(im, s.prompt))
    return {"iou": float(np.mean(ious)), "colour": float(np.mean(cols))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("outputs/proto_fill"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--minutes", type=float, default=25)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--empty", type=float, default=0.5)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--variant", default="zero", choices=["zero", "gaussian", "lite"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    m = load_base()
    cn = ControlNet.from_unet(m["unet"]).train()
    opt = torch.optim.AdamW([p for p in cn.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + 10)
    val = [random_condition(np.random.default_rng(12345), 128) for _ in range(1)]
    vrng = np.random.default_rng(999)
    val = [random_condition(vrng, 128) for _ in range(32)]
    sched = m["sched"]
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    log = open(args.out / "log.jsonl", "a")
    for step in range(1, args.steps + 1):
        ss = [random_condition(rng, 128) for _ in range(args.batch)]
        x = torch.from_numpy(np.stack([s.target for s in ss])).permute(0, 3, 1, 2).float() / 127.5 - 1
        prompts = [("" if rng.random() < args.empty else s.prompt) for s in ss]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            z0 = m["vae"].encode(x).latent_dist.mean.float() * m["vae"].config.scaling_factor
            emb = embed(m, prompts)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        zt = sched.add_noise(z0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res = cn(zt, t, emb, hint=hint_tensor([s.condition for s in ss]))
            eps = m["unet"](zt, t, emb, **res.unet_kwargs()).sample
        loss = F.mse_loss(eps.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.val_every == 0 or step == 1:
            cn.eval()
            r = evaluate(m, val, cn, steps=10)
            cn.train()
            row = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - t0, 1), **r}
            log.write(json.dumps(row) + "\n"); log.flush()
            print(json.dumps(row), flush=True)
        if time.time() - t0 > args.minutes * 60:
            break
    torch.save(cn.state_dict(), args.out / "controlnet.pt")


if __name__ == "__main__":
    main()
