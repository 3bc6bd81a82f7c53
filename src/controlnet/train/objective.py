"""The training objectives (paper Sec. 3.3) and the optimizer. One objective per kind of base, chosen once when
the run is set up (:mod:`controlnet.train.setup`); the loop calls ``objective(controlnet, base, batch)``.

UNet bases (:class:`DenoisingObjective`)::

    L = E_{z0, t, c_t, c_f, ε} || ε − ε_θ(z_t, t, c_t, c_f) ||²

ε-prediction, or v / z0 when the base's scheduler says ``prediction_type``; the locked UNet predicts with the
ControlNet's residuals added to its skip connections. The locked encoder builds no autograd graph (neither its
weights nor its inputs need gradients): the graph starts where the residuals join the skip connections.

Flow-matching bases, Flux, SD3 and Qwen-Image (:class:`FlowMatchingObjective`)::

    x_σ = (1 − σ) z0 + σ ε,      L = E_{z0, σ, c_t, c_f, ε} || (ε − z0) − v_θ(x_σ, σ, c_t, c_f) ||²

the rectified-flow velocity target of diffusers' examples/controlnet/train_controlnet_flux.py (and
train_controlnet_sd3.py with ``--precondition_outputs 0``; its default, 1, weights this loss by σ²). Qwen-Image
has no ControlNet training script in diffusers; its loss is the same, with σ drawn alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from controlnet.errors import UserError
from controlnet.train.config import DEFAULT_WEIGHT_DECAY

ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, which the original uses (cldm.py configure_optimizers)
ADAM_EPS = 1e-8
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' scheduler config `prediction_type`
# σ's law: logit-normal, σ-index = floor(sigmoid(N(m, s)) * N), the default `--weighting_scheme logit_normal` of
# diffusers' train_controlnet_flux.py / train_controlnet_sd3.py, with their `--logit_mean 0.0`, `--logit_std 1.0`.
LOGIT_NORMAL_MEAN = 0.0
LOGIT_NORMAL_STD = 1.0
# The distilled guidance scale given to a Flux base that embeds it (FLUX.1-dev) while training: diffusers'
# train_controlnet_flux.py `--guidance_scale` default.
FLUX_TRAINING_GUIDANCE = 3.5


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


@dataclass
class DenoisingObjective:
    """A UNet base's loss: :func:`denoising_loss` with the base's training noise schedule."""

    scheduler: Any  # diffusers DDPMScheduler
    unet_dtype: torch.dtype
    resolution: int

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def __call__(self, controlnet: Callable, unet: Callable, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return denoising_loss(controlnet, unet, self.scheduler, batch, self.scheduler.config.prediction_type,
                              self.unet_dtype, self.resolution)


def flow_sigmas(timesteps: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The noise levels σ (B,) of the sample stream's timestep draws ``timesteps`` (B,), uniform in [0, N).

    σ follows the reference's logit-normal law: u = sigmoid(m + s z), z standard normal, is drawn by the inverse
    CDF at the quantile (t + 1/2) / N (so σ is a function of the stream's draw, as the UNet timestep is), then
    σ = grid[floor(u N)], the training scheduler's N levels indexed as diffusers' examples index them.
    """
    n = len(grid)
    quantile = (timesteps.double() + 0.5) / n
    z = math.sqrt(2.0) * torch.erfinv(2 * quantile - 1)  # Φ⁻¹(quantile)
    u = torch.sigmoid(LOGIT_NORMAL_MEAN + LOGIT_NORMAL_STD * z)
    return grid.to(timesteps.device)[(u * n).long().clamp(0, n - 1)]


@dataclass
class FlowMatchingObjective:
    """A Flux, SD3 or Qwen-Image base's loss (module docstring), the condition encoded as the sampler encodes it.

    Latents ``batch["latents"]`` are the VAE's, shifted and scaled, ``(z − shift_factor) · scaling_factor``
    (Qwen-Image: per channel, ``(z − shift_factor) / latent_std``); Flux and Qwen-Image pack them (and the noise) 2x2
    into tokens with their position ids (Qwen-Image: the token grid, ``img_shapes``); Flux, when it embeds the
    distilled guidance scale, gets :data:`FLUX_TRAINING_GUIDANCE`. Qwen-Image's text is ``batch["hidden"]`` with,
    when the batch's prompts differ in length, the mask ``batch["hidden_mask"]``
    (:func:`controlnet.data.datasets.collate_samples`). The condition image is encoded by ``encode_condition``
    (:meth:`controlnet.transformer_pipeline.TransformerPipeline.encode_condition`: VAE latents, packed for Flux)
    with a posterior sample seeded by (seed, stream position); a batch holding the conditions' cached VAE
    posteriors (``condition_params``) gets the same sample, shift, scale and packing from them
    (:meth:`sample_condition`). The ControlNet's call is the sampler's
    (:func:`controlnet.flow_sampling.control_residuals`): SD3 ControlNets with ``force_zeros_for_pooled_projection``
    get zero pooled projections here too.
    """

    family: str  # "flux" | "sd3" | "qwenimage"
    sigmas: torch.Tensor  # the training scheduler's N noise levels, 1 → 1/N (N,)
    encode_condition: Callable[..., torch.Tensor]
    seed: int
    base_dtype: torch.dtype
    # For cached conditions: the VAE config's `shift_factor or 0.0` and `scaling_factor`; Qwen-Image's
    # `latents_mean` (C, 1, 1) and `latents_std` (C, 1, 1) (controlnet.train.flow.latent_normalisation).
    shift_factor: float | torch.Tensor
    scaling_factor: float
    latent_std: torch.Tensor | None = None

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    def __call__(self, controlnet: Callable, transformer: Callable, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from controlnet.flow_sampling import FlowText, base_velocity
        from controlnet.transformer_controlnet import FLUX, QWEN, latent_image_ids, pack_latents

        x0, noise = batch["latents"], batch["noise"]  # (B, C, h, w) each
        sigma = flow_sigmas(batch["timesteps"], self.sigmas).to(x0.dtype)  # (B,)
        s = sigma[:, None, None, None]
        noisy, target = (1 - s) * x0 + s * noise, noise - x0
        cn = getattr(controlnet, "module", controlnet)  # under DDP: the wrapped ControlNet's config
        condition = self.condition(batch, cn)
        text = FlowText(batch["hidden"], batch.get("pooled"), mask=batch.get("hidden_mask"))  # (B, T, D), (B, P)
        img_ids = None
        if self.family in (FLUX, QWEN):
            h, w = x0.shape[-2:]
            noisy, target = pack_latents(noisy), pack_latents(target)  # (B, h/2 * w/2, 4C)
            img_ids = latent_image_ids(h // 2, w // 2, device=x0.device)
        if self.family == FLUX:
            text.ids = torch.zeros(text.embeds.shape[1], 3, device=x0.device)  # Flux's text position ids
        t = sigma * 1000  # (B,) in [0, 1000], the sampler's timesteps
        residuals = controlnet(**self.controlnet_inputs(cn, noisy, t, text, condition, img_ids))
        pred = base_velocity(transformer, noisy.to(self.base_dtype), t, text, residuals.to(self.base_dtype),
                             FLUX_TRAINING_GUIDANCE, img_ids)
        return F.mse_loss(pred.float(), target.float())

    def condition(self, batch: dict[str, torch.Tensor], controlnet: Any) -> torch.Tensor:
        """What the ControlNet takes for each sample's condition image (``condition``, (B, 3, R, R) in [0, 1]) or
        cached VAE posterior (``condition_params``, (B, 2C, h, w)), a posterior sample per stream position."""
        from controlnet.data.cache import entry_key

        cached = "condition_params" in batch
        conditions = batch["condition_params" if cached else "condition"]
        rows = []
        for i, position in enumerate(batch["position"].tolist()):
            g = torch.Generator().manual_seed(int(entry_key("condition-latents", self.seed, position)[:15], 16))
            encode = self.sample_condition if cached else self.encode_condition
            rows.append(encode(conditions[i : i + 1], controlnet, g))
        return torch.cat(rows).clone()  # a plain tensor: the VAE ran under inference_mode

    def sample_condition(self, params: torch.Tensor, controlnet: Any, generator: torch.Generator) -> torch.Tensor:
        """``encode_condition`` from the condition's VAE posterior ``params`` (B, 2C, h, w): its sample (drawn from
        ``generator``), less the shift factor (not for SD3 ControlNets with ``force_zeros_for_pooled_projection``),
        times the scaling factor (Qwen-Image: less the per-channel mean, over the per-channel std), packed for Flux
        and Qwen-Image."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        from controlnet.transformer_controlnet import FLUX, QWEN, SD3, pack_latents

        z = DiagonalGaussianDistribution(params).sample(generator).float()  # (B, C, h, w)
        if self.latent_std is not None:
            return pack_latents((z - self.shift_factor) / self.latent_std)
        shift = self.family != SD3 or not controlnet.config.force_zeros_for_pooled_projection
        z = (z - (self.shift_factor if shift else 0.0)) * self.scaling_factor
        return pack_latents(z) if self.family in (FLUX, QWEN) else z

    def controlnet_inputs(self, cn: Any, x: torch.Tensor, t: torch.Tensor, text: Any, condition: torch.Tensor,
                          img_ids: torch.Tensor | None) -> dict[str, Any]:
        """The ControlNet's keyword arguments, as :func:`controlnet.flow_sampling.control_residuals` gives them."""
        from controlnet.flow_sampling import NUM_TRAIN_TIMESTEPS, qwen_img_shapes
        from controlnet.transformer_controlnet import FLUX, QWEN

        if self.family == QWEN:
            return dict(hidden_states=x, timestep=t / NUM_TRAIN_TIMESTEPS, encoder_hidden_states=text.embeds,
                        img_shapes=qwen_img_shapes(img_ids, x.shape[0]), condition=condition,
                        encoder_hidden_states_mask=text.mask)
        if self.family == FLUX:
            guidance = (torch.full((x.shape[0],), FLUX_TRAINING_GUIDANCE, device=x.device)
                        if cn.config.guidance_embeds else None)
            return dict(hidden_states=x, timestep=t / NUM_TRAIN_TIMESTEPS, encoder_hidden_states=text.embeds,
                        pooled_projections=text.pooled, img_ids=img_ids, txt_ids=text.ids, condition=condition,
                        guidance=guidance)
        c = cn.config
        return dict(hidden_states=x, timestep=t,
                    encoder_hidden_states=text.embeds if c.joint_attention_dim is not None else None,
                    pooled_projections=torch.zeros_like(text.pooled) if c.force_zeros_for_pooled_projection
                    else text.pooled, condition=condition)


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
