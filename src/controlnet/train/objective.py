"""The training objective (paper Sec. 3.3) and the optimizer.

    L = E_{z0, t, c_t, c_f, ε} || ε − ε_θ(z_t, t, c_t, c_f) ||²

ε-prediction, or v / z0 when the base's scheduler says ``prediction_type``; the locked UNet predicts with the
ControlNet's residuals added to its skip connections. The locked encoder builds no autograd graph (neither its
weights nor its inputs need gradients): the graph starts where the residuals join the skip connections.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from controlnet.errors import UserError
from controlnet.train.config import DEFAULT_WEIGHT_DECAY

ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, which the original uses (cldm.py configure_optimizers)
ADAM_EPS = 1e-8
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' scheduler config `prediction_type`


def denoising_loss(controlnet: Callable, unet: Callable, scheduler: Any, batch: dict[str, torch.Tensor],
                   prediction_type: str, unet_dtype: torch.dtype, resolution: int) -> torch.Tensor:
    """MSE between the locked UNet's prediction, with the ControlNet's residuals added, and the scheduler's
    target (ε for "epsilon", v for "v_prediction", z0 for "sample"). ``controlnet`` and ``unet`` may be
    DistributedDataParallel wrappers of the modules."""
    latents, noise, t = batch["latents"], batch["noise"], batch["timesteps"]  # (B, C, h, w), (B, C, h, w), (B,)
    noisy = scheduler.add_noise(latents, noise, t)  # z_t = sqrt(ᾱ_t) z0 + sqrt(1 - ᾱ_t) ε
    text = batch["hidden"]  # (B, L, D)
    added = None
    if "pooled" in batch:  # SDXL: pooled text embedding + (original size, crop top-left, target size)
        ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=noisy.device)
        added = {"text_embeds": batch["pooled"], "time_ids": ids.expand(noisy.shape[0], -1).to(noisy.dtype)}
    res = controlnet(noisy, t, text, hint=batch["condition"], added_cond_kwargs=added)
    pred = unet(
        noisy.to(unet_dtype), t, text.to(unet_dtype),
        added_cond_kwargs={k: v.to(unet_dtype) for k, v in added.items()} if added else None,
        **res.to(unet_dtype).unet_kwargs(),
    ).sample  # (B, C, h, w)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    elif prediction_type == "sample":
        target = latents
    else:
        raise UserError(f"the base's scheduler has prediction_type {prediction_type!r}; "
                        f"supported: {', '.join(PREDICTION_TYPES)}")
    return F.mse_loss(pred.float(), target.float())


def make_adamw(param_groups: list[dict[str, Any]], weight_decay: float = DEFAULT_WEIGHT_DECAY) -> torch.optim.AdamW:
    """AdamW with the original's betas and eps; PyTorch's fused kernel where it exists (CPU, CUDA): one pass over
    each parameter instead of several, the same update."""
    devices = {p.device.type for group in param_groups for p in group["params"]}
    fused = True if devices <= {"cpu", "cuda"} else None
    return torch.optim.AdamW(param_groups, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay, fused=fused)


def constant_after_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then the constant learning rate (the original's schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """Recompute activations in the backward pass, with diffusers' own switch on each of its blocks (what
    ``ModelMixin.enable_gradient_checkpointing`` does; our ControlNet is a plain ``nn.Module``)."""

    def checkpoint(block: Callable, *args: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    for m in module.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = True
            m._gradient_checkpointing_func = checkpoint
