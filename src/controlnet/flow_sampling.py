"""Flow-matching sampling of a locked Flux, SD3 or Qwen-Image transformer under the residuals of transformer
ControlNets.

Rectified-flow bases (FLUX.1, SD3/SD3.5, Qwen-Image) predict a velocity v = dx/dσ along the straight path
x_σ = (1 - σ) x_0 + σ ε, and generation integrates it from σ = 1 (noise) to σ = 0 with Euler steps, as diffusers'
FlowMatchEulerDiscreteScheduler does. :func:`sample`, top to bottom::

    σ_0 > σ_1 > ... > σ_n = 0                         flow_schedule(): the base's scheduler config, shifted
    for step i, t_i = 1000 σ_i:
        x_in = [x, x] (SD3 under CFG) or x
        r    = Σ_{units u active at i} ControlNet_u(x_in, t_i, text, condition_u, mode_u) * strength_u
        v    = transformer(x_in, t_i, text, + r)       Flux: + the distilled guidance scale as an input
        v    = v_uncond + w (v_cond - v_uncond)        SD3 only (classifier-free guidance, one batch)
                                                       Qwen-Image: a second pass, rescaled (base_velocity)
        x    = x + (σ_{i+1} - σ_i) v                   Euler step of the flow ODE
        x    = (1 - m) x_known(σ_{i+1}) + m x          inpainting only: FlowInpaint.blend

The unit semantics are the UNet sampler's (:mod:`controlnet.sampling`): a unit acts at step i of n iff
``in_step_range(start, end, i, n)`` and its strength is not zero; otherwise it is not run at all. Several units
add their residuals (Zhang et al. 2023, Sec. 3.4); a union ControlNet given several (condition, mode) pairs is
several units sharing one model, whose active units run as one batched pass (:func:`unit_residuals`).

Families:

* Flux: latents are packed 2x2 into tokens (B, h/2 * w/2, 4C) with position ids (``latent_image_ids``); the
  transformer and the ControlNet take t / 1000 in [0, 1]; FLUX.1-dev embeds the guidance scale (no CFG) and so do
  ControlNets with ``guidance_embeds``.
* SD3: latents stay (B, C, h, w); timesteps in [0, 1000]; CFG batches [uncond, cond]. ControlNets with
  ``force_zeros_for_pooled_projection`` (InstantX SD3) get zeros for the pooled projections, as they were trained.
* Qwen-Image: tokens packed 2x2 as Flux's, t / 1000, no pooled text but a text mask; the token grid for its rotary
  embedding comes from the position ids (``latent_image_ids``, as Flux's). "True CFG" (diffusers QwenImagePipeline):
  the negative prompt's text (its own length and mask) in a second pass, v = v_neg + w (v_cond - v_neg) rescaled
  to the norm of v_cond along the features; the ControlNets run once, on the prompt's text, and both passes take
  their residuals (diffusers QwenImageControlNetPipeline).

Latents stay float32 through the Euler steps; the models run in their own dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from controlnet.errors import UserError
from controlnet.devices import placement
from controlnet.residuals import Residuals
from controlnet.sampling import in_step_range
from controlnet.transformer_controlnet import (FLUX, QWEN, SD3, TransformerControlNet, base_family, transformer_kwargs,
                                               union_mode_index)

# Flux's distilled models take t and the guidance scale in [0, 1]-units; diffusers' schedule counts 1000 steps.
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class FlowText:
    """Text conditioning as the base takes it: ``embeds`` (B, T, D) and ``pooled`` (B, P); under SD3's CFG the
    rows are [unconditional, conditional] (2B). Flux also takes ``ids`` (T, 3), its text position ids. Qwen-Image
    has no pooled text (None) but a ``mask`` (B, T), 1 for tokens, 0 for padding (None: no padding), and under its
    true CFG the ``negative`` prompt's text, of its own length."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None
    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    negative: "FlowText | None" = None


@dataclass
class FlowControl:
    """A transformer ControlNet ready for :func:`sample`: its model, its prepared condition, when and how strongly.

    ``condition`` is what the ControlNet takes: Flux and Qwen-Image, VAE latents packed like the image tokens
    (B, L, C) or, with XLabs' hint encoder, pixels (B, 3, H, W) in [0, 1]; SD3, VAE latents (B, C, h, w).
    ``mode``: a union ControlNet's control mode (name or index).
    """

    controlnet: TransformerControlNet
    condition: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: int | str | None = None

    def active(self, step: int, num_steps: int) -> bool:
        return acts(self.strength, self.start, self.end, step, num_steps)


@dataclass
class FlowInpaint:
    """The known region of an inpainting (diffusers' FluxInpaintPipeline / StableDiffusion3InpaintPipeline): after
    every Euler step, where ``mask`` is 0 the latents are reset to the init image's latents noised to the step's
    next sigma with the starting ``noise`` (``scale_noise``: σ ε + (1 - σ) x_0), so only the masked region is
    generated, in keeping with the rest.

    ``image_latents`` and ``noise`` are shaped as the sampler's latents (Flux: packed tokens); ``mask`` (1 = repaint,
    at latent resolution, packed like the tokens for Flux) broadcasts to them.
    """

    image_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor

    def blend(self, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``latents`` in the mask, the known latents at noise level ``sigma`` outside it."""
        x0, noise, m = (t.to(latents.device, torch.float32) for t in (self.image_latents, self.noise, self.mask))
        known = sigma * noise + (1 - sigma) * x0
        return (1 - m) * known + m * latents


def acts(strength: float, start: float, end: float, step: int, num_steps: int) -> bool:
    """Whether a unit of ``strength`` and step range [start, end] runs at step ``step`` of ``num_steps``."""
    return strength != 0 and in_step_range(start, end, step, num_steps)


def calculate_shift(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """The resolution-dependent shift ``mu`` (diffusers ``calculate_shift``, FluxPipeline): linear in the number of
    image tokens between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) of the scheduler
    config."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift

    return diffusers_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def flow_schedule(scheduler_config: Mapping[str, Any], num_steps: int, image_seq_len: int,
                  sigmas: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise levels (n + 1,) ending at 0 and the timesteps (n,) = 1000 σ of a flow-matching generation.

    diffusers' FlowMatchEulerDiscreteScheduler builds them from the base's scheduler config (its static ``shift``,
    or with ``use_dynamic_shifting`` the shift ``mu`` of :func:`calculate_shift` for ``image_seq_len`` tokens; Karras,
    exponential, beta sigmas and ``shift_terminal`` where the config asks). ``sigmas``: the unshifted levels to
    start from (Flux pipelines pass ``linspace(1, 1/n, n)``; SD3's let the scheduler space its timesteps).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if num_steps < 1:
        raise UserError(f"steps must be at least 1, got {num_steps}")
    config = dict(scheduler_config)
    for option in ("stochastic_sampling", "invert_sigmas"):
        if config.get(option):
            raise UserError(f"the base's scheduler config sets {option}; only deterministic flow-matching Euler "
                            "sampling is supported (set it to false)")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(image_seq_len, config) if scheduler.config.use_dynamic_shifting else None
    scheduler.set_timesteps(num_steps if sigmas is None else None, sigmas=sigmas, mu=mu)
    return scheduler.sigmas.float(), scheduler.timesteps.float()


def flux_sigmas(num_steps: int) -> list[float]:
    """The unshifted noise levels Flux pipelines start from: ``linspace(1, 1/n, n)`` (diffusers FluxPipeline)."""
    import numpy as np

    return np.linspace(1.0, 1 / num_steps, num_steps).tolist()


@torch.inference_mode()
def sample(transformer: nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor,
           text: FlowText, controls: Sequence[FlowControl] = (), guidance: float = 3.5, *,
           img_ids: torch.Tensor | None = None, inpaint: FlowInpaint | None = None, progress: bool = False,
           callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
           batch_units: bool = True) -> torch.Tensor:
    """Euler integration of a flow-matching base from ``sigmas[0]`` to ``sigmas[-1]`` under summed ControlNet
    residuals: the loop of the module docstring.

    Args:
        transformer: a diffusers ``FluxTransformer2DModel``, ``SD3Transformer2DModel`` or
            ``QwenImageTransformer2DModel`` (locked).
        latents: float32; Flux and Qwen-Image packed tokens (B, L, 4C), SD3 (B, C, h, w); noised to ``sigmas[0]``.
        sigmas, timesteps: from :func:`flow_schedule` (or their tail, to start part-way: image-to-image).
        text: the prompt's embeddings (SD3 under CFG: [uncond, cond] rows; Qwen-Image: ``text.negative``).
        controls: the ControlNet units; guidance: Flux's distilled guidance scale, or SD3's and Qwen-Image's CFG
            weight (<= 1: one branch, no guidance).
        img_ids: Flux's and Qwen-Image's image position ids (L, 3) (``latent_image_ids``).
        inpaint: the known region, blended in after every step (:class:`FlowInpaint`); None: no inpainting.
        progress: a tqdm bar over the steps; callback: called as ``callback(i, t, latents)`` after every step.
        batch_units: run the active units that share a Flux or SD3 ControlNet as one forward (:func:`unit_residuals`).

    Returns the final latents, float32, shaped as ``latents``.
    """
    from tqdm.auto import tqdm

    family = base_family(transformer)
    if family not in (FLUX, SD3, QWEN):
        raise UserError("flow-matching sampling needs a Flux, SD3 or Qwen-Image transformer, got "
                        f"{type(transformer).__name__}")
    if len(sigmas) != len(timesteps) + 1:
        raise ValueError(f"{len(sigmas)} sigmas for {len(timesteps)} timesteps; give one more sigma than timesteps")
    cfg = family == SD3 and guidance > 1.0
    where = placement(transformer)
    latents, sigmas = latents.to(where["device"], torch.float32), sigmas.to(where["device"], torch.float32)
    n = len(timesteps)
    for i, t in enumerate(tqdm(timesteps, desc="sampling", unit="step", disable=not progress, leave=False)):
        x = torch.cat([latents] * 2) if cfg else latents  # (2B or B, ...)
        x = x.to(**where)
        t_in = t.to(where["device"], torch.float32).expand(x.shape[0])
        active = [c for c in controls if c.active(i, n)]
        residuals = unit_residuals(active, x, t_in, text, guidance, img_ids, where, batch_units)
        v = base_velocity(transformer, x, t_in, text, residuals, guidance, img_ids).float()
        if cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        latents = latents + (sigmas[i + 1] - sigmas[i]) * v  # Euler
        if inpaint is not None:
            latents = inpaint.blend(latents, sigmas[i + 1])
        if callback is not None:
            callback(i, t, latents)
    return latents


def base_velocity(transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, text: FlowText, residuals: Residuals,
                  guidance: float, img_ids: torch.Tensor | None) -> torch.Tensor:
    """The locked base's velocity for the batch ``x`` at timesteps ``t`` (B,) in [0, 1000], residuals added
    (Qwen-Image with ``text.negative`` and ``guidance`` > 1: its true CFG, :func:`qwen_velocity`)."""
    where = placement(transformer)
    added = transformer_kwargs(residuals, transformer)
    if base_family(transformer) == QWEN:
        return qwen_velocity(transformer, x, t, text, added, guidance, img_ids)
    if base_family(transformer) == FLUX:
        return transformer(hidden_states=x, timestep=t / NUM_TRAIN_TIMESTEPS,
                           guidance=_guidance(transformer.config, guidance, x),
                           pooled_projections=text.pooled.to(**where), encoder_hidden_states=text.embeds.to(**where),
                           txt_ids=text.ids.to(**where), img_ids=img_ids.to(**where), return_dict=False, **added)[0]
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text.embeds.to(**where),
                       pooled_projections=text.pooled.to(**where), return_dict=False, **added)[0]


def qwen_velocity(transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, text: FlowText, added: Mapping[str, Any],
                  guidance: float, img_ids: torch.Tensor) -> torch.Tensor:
    """Qwen-Image's velocity: the prompt's pass and, with ``text.negative`` and ``guidance`` > 1, diffusers'
    QwenImagePipeline "true CFG": the negative prompt's pass with the same ControlNet residuals ``added``, combined
    as v_neg + w (v_cond - v_neg) and rescaled to v_cond's norm along the last dim."""
    shapes, where = qwen_img_shapes(img_ids, x.shape[0]), placement(transformer)

    def velocity(branch: FlowText) -> torch.Tensor:
        mask = None if branch.mask is None else branch.mask.to(where["device"])
        return transformer(hidden_states=x, timestep=t / NUM_TRAIN_TIMESTEPS,
                           encoder_hidden_states=branch.embeds.to(**where), encoder_hidden_states_mask=mask,
                           img_shapes=shapes, return_dict=False, **added)[0]

    v = velocity(text)
    if text.negative is None or guidance <= 1.0:
        return v
    v_neg = velocity(text.negative)
    combined = v_neg + guidance * (v - v_neg)
    return combined * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


def qwen_img_shapes(img_ids: torch.Tensor, batch: int) -> list[tuple[int, int, int]]:
    """Qwen-Image's ``img_shapes`` (frames, rows, columns) of each of ``batch`` samples, from the tokens' position
    ids (L, 3) = (0, row, column) (``latent_image_ids``)."""
    rows, columns = (int(img_ids[:, k].max().item()) + 1 for k in (1, 2))
    return [(1, rows, columns)] * batch


def unit_residuals(active: Sequence[FlowControl], x: torch.Tensor, t: torch.Tensor, text: FlowText, guidance: float,
                   img_ids: torch.Tensor | None, out: Mapping[str, Any], batch_units: bool = True) -> Residuals:
    """The summed residuals of the ``active`` units for the batch ``x`` (B, ...), placed like ``out``.

    With ``batch_units``, units sharing one Flux or SD3 ControlNet (a union ControlNet's (condition, mode) pairs) run
    as one forward of K * B rows, [unit 1's B rows, unit 2's, ...], each row with its unit's condition, mode and
    strength; the K chunks of each residual are then summed. Otherwise (and for Qwen-Image) one forward per unit, as
    diffusers' FluxMultiControlNetModel loops. The two agree to float rounding.
    """
    groups: dict[tuple[int, bool], list[FlowControl]] = {}  # same model and (for a union) all with a mode
    for k, c in enumerate(active):
        batched = batch_units and c.controlnet.family in (FLUX, SD3)
        key = (id(c.controlnet), c.mode is None) if batched else (k, False)
        groups.setdefault(key, []).append(c)
    residuals = Residuals()  # nothing added: the plain base
    for group in groups.values():
        residuals = residuals + control_residuals(group, x, t, text, guidance, img_ids, out)
    return residuals


def control_residuals(controls: FlowControl | Sequence[FlowControl], x: torch.Tensor, t: torch.Tensor,
                      text: FlowText, guidance: float, img_ids: torch.Tensor | None,
                      out: Mapping[str, Any]) -> Residuals:
    """The residuals (times the strengths) of one unit, or the sum of several units of one Flux or SD3 ControlNet run
    as one forward, for the batch ``x``, placed like ``out`` (``Tensor.to`` keyword arguments). Each condition's rows
    repeat to the batch (SD3's CFG batch: both halves controlled); Qwen-Image's ControlNets see the prompt's text,
    not ``text.negative`` (whose pass takes the same residuals)."""
    controls = [controls] if isinstance(controls, FlowControl) else list(controls)
    cn, k = controls[0].controlnet, len(controls)
    where = placement(cn)
    conds = [_rows(c.condition.to(**where), x.shape[0]) for c in controls]
    cond = conds[0] if k == 1 else torch.cat(conds)  # (K B, ...)
    scale: float | torch.Tensor = controls[0].strength
    mode: int | str | torch.Tensor | None = controls[0].mode
    if k > 1:
        scale = torch.tensor([c.strength for c in controls]).repeat_interleave(x.shape[0])  # (K B,)
        if mode is not None:
            indices = [union_mode_index(c.mode, cn.config.num_mode or 0) for c in controls]
            mode = torch.tensor(indices).repeat_interleave(x.shape[0])
    rows = k * x.shape[0]
    hidden, t = _rows(x.to(**where), rows), _rows(t.to(where["device"]), rows)
    pooled = None if text.pooled is None else _rows(text.pooled.to(**where), rows)
    embeds = _rows(text.embeds.to(**where), rows)
    if cn.family == QWEN:
        mask = None if text.mask is None else text.mask.to(where["device"])
        res = cn(hidden_states=hidden, timestep=t / NUM_TRAIN_TIMESTEPS, encoder_hidden_states=embeds,
                 img_shapes=qwen_img_shapes(img_ids, rows), condition=cond, encoder_hidden_states_mask=mask,
                 conditioning_scale=scale)
    elif cn.family == FLUX:
        res = cn(hidden_states=hidden, timestep=t / NUM_TRAIN_TIMESTEPS, encoder_hidden_states=embeds,
                 pooled_projections=pooled, img_ids=img_ids.to(**where), txt_ids=text.ids.to(**where), condition=cond,
                 mode=mode, guidance=_guidance(cn.config, guidance, hidden), conditioning_scale=scale)
    else:
        c = cn.config
        res = cn(hidden_states=hidden, timestep=t,
                 encoder_hidden_states=embeds if c.joint_attention_dim is not None else None,
                 pooled_projections=torch.zeros_like(pooled) if c.force_zeros_for_pooled_projection else pooled,
                 condition=cond, conditioning_scale=scale)
    if k > 1:  # (K B, ...) -> the sum of the K units' (B, ...)
        res = res.map(lambda r: r.reshape(k, -1, *r.shape[1:]).sum(0))
    return res.to(**out) if where != dict(out) else res


def _rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """``tensor``'s rows repeated to ``batch`` rows (a condition of batch 1 to the image batch, ...)."""
    if tensor.shape[0] == batch:
        return tensor
    if batch % tensor.shape[0]:
        raise UserError(f"a condition of batch {tensor.shape[0]} cannot be repeated to the batch of {batch}")
    return tensor.repeat(batch // tensor.shape[0], *[1] * (tensor.ndim - 1))


def _guidance(config: Any, guidance: float, x: torch.Tensor) -> torch.Tensor | None:
    """The distilled guidance scale (B,) for a model that embeds it (``guidance_embeds``), else None."""
    if not getattr(config, "guidance_embeds", False):
        return None
    return torch.full((x.shape[0],), float(guidance), device=x.device, dtype=torch.float32)
