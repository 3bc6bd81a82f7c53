"""The sampler: classifier-free guided denoising of a locked UNet under the residuals of several ControlNets.

Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models" (ICCV 2023). At every
denoising step each active ControlNet turns (noisy latents, timestep, text, condition) into residuals; the
residuals of several ControlNets add (Sec. 3.4, "Composing multiple ControlNets"), and the locked UNet adds them
to its skip connections. :func:`sample`, top to bottom::

    hint_u = E_u(condition_u)                            once per generation (independent of t)
    for step i, timestep t:
        x     = [latents, latents]                       CFG: unconditional and conditional in ONE batch
        r     = Σ_units u active at i  ControlNet_u(x, t, text, hint_u) * scales_u
        eps   = UNet(x, t, text, + r)
        eps   = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents)

The caller chooses where the loop starts: text-to-image passes pure noise (times the scheduler's
``init_noise_sigma``) and every timestep; image-to-image passes noised image latents and the tail of the
timesteps. The step range is a fraction of the timesteps given, i.e. of the steps that actually run (as diffusers'
ControlNet img2img and inpaint pipelines measure ``control_guidance_start`` / ``_end``).

Inpainting (:class:`Inpainting`) adds two things to the loop, as diffusers' StableDiffusionControlNetInpaintPipeline:
an ordinary UNet gets *latent blending* after every step (the known region replaced by the image's latents noised
to the next timestep, the clean latents after the last step); an inpainting UNet (9 input channels: SD1.5/SD2
inpainting) gets the mask and the masked image's latents as extra input channels, and no blending. The
ControlNets always see the 4 latent channels.

Decisions:

* Defaults are the original's (lllyasviel/ControlNet gradio_*.py): 20 DDIM steps, guidance 9.0, eta 0. They and
  the table of samplers (:data:`SCHEDULERS`) live in :mod:`controlnet.defaults`, which the command line reads
  without importing torch.
* Step range (diffusers' ``control_guidance_start`` / ``control_guidance_end``): a control applies at step i of n
  iff ``start <= i/n`` and ``(i+1)/n <= end``. A control outside its range is not run at all, nor is its hint
  encoded when it is never in range.
* Control on the conditional half only (``cond_only``: guess mode, or a ControlNet with
  ``global_pool_conditions``, as diffusers' StableDiffusionControlNetPipeline does): the ControlNet runs on the
  conditional rows of the CFG batch, and the unconditional rows get zero residuals.
* Residual reuse (``reuse`` > 1, off by default): a control computes its residuals at its first active step and
  then every ``reuse`` steps, and reuses the last ones in between (about 1/reuse of the ControlNet's cost; it
  trades controllability for speed).
* Latents stay float32 through the scheduler; the models run in their own dtype.

The other control families share the loop through :class:`Control`:

* A T2I-Adapter (:mod:`controlnet.t2i_adapter`) sees neither the latents, the timestep nor the text: its features
  are computed once per generation (from the condition at batch 1, repeated over the images and the CFG halves,
  as diffusers' StableDiffusionAdapterPipeline does) and handed to every step in range as
  ``("down_intrablock", i)`` residuals; ``scales`` multiplies them (``adapter_conditioning_scale``), and the step
  range ``[0, f]`` is diffusers' ``adapter_conditioning_factor`` f. ``reuse`` changes nothing for it.
* A Union ControlNet (:mod:`controlnet.union`) runs all its conditions in one pass: ``condition`` is a list, one
  image per condition, with ``control_types`` and ``condition_scales``; ``scales`` scales the pass's residuals.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from controlnet.defaults import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, SCHEDULERS, scheduler_name
from controlnet.errors import UserError
from controlnet.devices import placement
from controlnet.residuals import Residuals

# RGB → gray for one-channel T2I-Adapters (sketch): ITU-R 601-2 luma, as PIL's convert("L") and OpenCV's
# COLOR_RGB2GRAY (TencentARC's sketch pipeline) compute it.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_SCHEDULER", "DEFAULT_STEPS", "SCHEDULERS", "Control", "Inpainting",
           "control_residuals", "in_step_range", "make_scheduler", "sample"]


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """A fresh diffusers scheduler ``name`` (see :data:`SCHEDULERS`; A1111's names are accepted too,
    :func:`controlnet.defaults.scheduler_name`) built from the base's scheduler config.

    The base's config carries its training schedule (betas, ``prediction_type`` — "v_prediction" for SD2 768-v
    —, ``steps_offset``, ``timestep_spacing``); only the sampler changes.
    """
    import diffusers

    class_name, overrides = SCHEDULERS[scheduler_name(name)]
    try:
        return getattr(diffusers, class_name).from_config(dict(base_config), **overrides)
    except ImportError as err:  # e.g. LMS needs scipy
        raise UserError(f"scheduler {name!r}: {' '.join(str(err).split())}") from None


def in_step_range(start: float, end: float, step: int, num_steps: int) -> bool:
    """Whether step ``step`` of ``num_steps`` lies in the fractions [start, end] (the rule in the module docstring)."""
    return start <= step / num_steps and (step + 1) / num_steps <= end


@dataclass
class Control:
    """A control branch ready for :func:`sample`: its model, its condition, and when and how strongly it acts.

    ``controlnet`` is a UNet ControlNet, a Union ControlNet (``condition`` a list, one image per condition, with
    ``control_types`` and ``condition_scales`` one per condition) or a T2I-Adapter (module docstring).
    """

    controlnet: nn.Module
    condition: torch.Tensor | list[torch.Tensor]  # (1, 3, H, W) in [0, 1] (masked pixels -1), at the output size
    scales: float | list[float]  # per residual or for all (the unit's strength included, except a union's fused)
    start: float = 0.0
    end: float = 1.0
    cond_only: bool = False  # control on the conditional half of the CFG batch only
    control_types: list[str] | None = None  # a union pass: one type per condition
    condition_scales: list[float] | None = None  # a union pass: one strength per condition (on its fused input)

    def active(self, step: int, num_steps: int) -> bool:
        return in_step_range(self.start, self.end, step, num_steps)

    @property
    def is_adapter(self) -> bool:
        """Whether the branch is a T2I-Adapter (features once per generation, not residuals per step)."""
        from controlnet.t2i_adapter import T2IAdapter

        return isinstance(self.controlnet, T2IAdapter)

    def encode(self) -> torch.Tensor | list[torch.Tensor] | Residuals:
        """What does not depend on the step, computed once: the hint encoder's features ``(1, C0, h, w)`` (a list
        for a union pass), or a T2I-Adapter's features, scaled, as ``("down_intrablock", i)`` residuals."""
        where = placement(self.controlnet)
        images = self.condition if isinstance(self.condition, list) else [self.condition]
        if self.is_adapter:
            image = images[0].to(**where)
            if self.controlnet.config.in_channels == 1:  # a sketch adapter: the condition's luma
                luma = torch.tensor(LUMA_WEIGHTS, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
                image = (image * luma).sum(dim=1, keepdim=True)
            return self.controlnet(image).scaled(self.scales)
        hints = [self.controlnet.encode_hint(image.to(**where)) for image in images]
        return hints if isinstance(self.condition, list) else hints[0]


@dataclass
class Inpainting:
    """The known region of an inpainting run, for :func:`sample` (module docstring).

    ``mask`` is 1 where the latents are repainted and 0 where they are kept. An ordinary UNet needs
    ``image_latents`` and ``noise`` (latent blending); an inpainting UNet needs ``masked_image_latents``.
    """

    mask: torch.Tensor  # (B, 1, h, w) float32
    image_latents: torch.Tensor | None = None  # (B, C, h, w): the image's clean latents
    noise: torch.Tensor | None = None  # (B, C, h, w): the noise that re-noises them at each step
    masked_image_latents: torch.Tensor | None = None  # (B, C, h, w): latents of the image with the mask's pixels at 0

    def unet_channels(self, cfg: bool) -> torch.Tensor | None:
        """An inpainting UNet's extra input ``(2B or B, 1 + C, h, w)``: [mask, masked-image latents]."""
        if self.masked_image_latents is None:
            return None
        extra = torch.cat([self.mask, self.masked_image_latents], dim=1)
        return torch.cat([extra] * 2) if cfg else extra

    def blend(self, scheduler: Any, latents: torch.Tensor, next_t: torch.Tensor | None) -> torch.Tensor:
        """Latent blending: the known region from the image's latents noised to ``next_t`` (clean when None)."""
        if self.image_latents is None:
            return latents
        known = self.image_latents
        if next_t is not None:
            known = scheduler.add_noise(known, self.noise, next_t.reshape(1))
        return (1 - self.mask) * known + self.mask * latents


@torch.inference_mode()
def sample(unet: nn.Module, scheduler: Any, latents: torch.Tensor, timesteps: Sequence[torch.Tensor] | torch.Tensor,
           text: torch.Tensor, controls: Sequence[Control] = (), guidance: float = DEFAULT_GUIDANCE, *,
           added: dict[str, torch.Tensor] | None = None, reuse: int = 1, eta: float = 0.0,
           generators: list[torch.Generator] | None = None, progress: bool = False,
           callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
           inpainting: Inpainting | None = None) -> torch.Tensor:
    """Classifier-free guided sampling (Ho & Salimans 2022) of a locked UNet under summed ControlNet residuals
    (Zhang et al. 2023, Sec. 3.4): the loop of the module docstring, one diffusers scheduler step per timestep.

    Args:
        unet: the locked base UNet; scheduler: a diffusers scheduler whose ``set_timesteps`` was called.
        latents: the starting latents ``(B, C, h, w)``, float32, already scaled for the first timestep.
        timesteps: the timesteps to run, in order.
        text: text embeddings ``(2B, L, D)`` [unconditional, conditional] when guiding, else ``(B, L, D)``.
        controls: the ControlNets; guidance: the CFG weight (<= 1: one branch, no guidance).
        added: SDXL's ``added_cond_kwargs`` (rows as ``text``); reuse: compute residuals every ``reuse`` steps.
        eta, generators: DDIM's eta and one generator per image for the samplers' noise (where they take them).
        progress: a tqdm bar over the steps; callback: called as ``callback(i, t, latents)`` after every step.
        inpainting: the known region (latent blending, or an inpainting UNet's extra channels).

    Returns the final latents ``(B, C, h, w)``, float32.
    """
    from tqdm.auto import tqdm

    model = placement(unet)  # where the UNet runs: the residuals must be there too
    cfg = guidance > 1.0
    n = len(timesteps)
    hints = {k: c.encode() for k, c in enumerate(controls) if any(c.active(i, n) for i in range(n))}
    step_kwargs = _step_kwargs(scheduler, eta, generators)
    last: dict[int, tuple[int, Residuals]] = {}  # control → (step, residuals) last computed
    for i, t in enumerate(tqdm(timesteps, desc="sampling", unit="step", disable=not progress, leave=False)):
        x = torch.cat([latents] * 2) if cfg else latents  # (2B or B, C, h, w)
        x = scheduler.scale_model_input(x, t).to(model["dtype"])
        residuals = Residuals()  # nothing added: the plain UNet
        for k, c in enumerate(controls):
            if not c.active(i, n):
                continue  # not computed at all
            if k not in last or i - last[k][0] >= reuse:
                last[k] = (i, control_residuals(c, hints[k], x, t, text, added, cfg, model))
            residuals = residuals + last[k][1]
        extra = inpainting.unet_channels(cfg) if inpainting is not None else None
        unet_in = x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=1)  # (2B or B, 4 [+ 5], h, w)
        eps = unet(unet_in, t, encoder_hidden_states=text, added_cond_kwargs=added,
                   **residuals.unet_kwargs()).sample.float()
        if cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        if inpainting is not None:
            latents = inpainting.blend(scheduler, latents, timesteps[i + 1] if i + 1 < n else None)
        if callback is not None:
            callback(i, t, latents)
    return latents


def control_residuals(control: Control, hint: torch.Tensor | list[torch.Tensor] | Residuals, x: torch.Tensor,
                      t: torch.Tensor, text: torch.Tensor, added: dict[str, torch.Tensor] | None, cfg: bool,
                      out: dict[str, Any]) -> Residuals:
    """One control branch's residuals for the batch ``x`` (scaled by its ``scales``), as tensors placed like ``out``
    (``Tensor.to`` keyword arguments); ``hint`` is what :meth:`Control.encode` gave. With ``cond_only`` under CFG,
    computed on the conditional half of the batch and zero on the unconditional half (which stays uncontrolled)."""
    split = cfg and control.cond_only
    if split:
        half = x.shape[0] // 2
        x, text = x[half:], text[half:]
        added = {k: v[half:] for k, v in added.items()} if added else None
    if isinstance(hint, Residuals):  # a T2I-Adapter's features: the same at every step, repeated over the batch
        res, where = hint.map(lambda f: f.expand(x.shape[0], -1, -1, -1)), placement(control.controlnet)
    else:
        cn = control.controlnet
        where = placement(cn)  # a caller's model is run as it is
        several = isinstance(hint, list)  # a union pass
        union = dict(control_type=control.control_types, condition_scale=control.condition_scales) if several else {}
        res = cn(
            x.to(**where), t, text.to(**where),
            hint_embedding=[h.expand(x.shape[0], -1, -1, -1) for h in hint] if several
            else hint.expand(x.shape[0], -1, -1, -1),
            conditioning_scale=control.scales,
            added_cond_kwargs={k: v.to(**where) for k, v in added.items()} if added else None,
            **union,
        )
    if split:  # the unconditional rows get zeros: no control there
        res = res.map(lambda r: torch.cat([torch.zeros_like(r), r]))
    return res.to(**out) if where != out else res


def _step_kwargs(scheduler: Any, eta: float, generators: list[torch.Generator] | None) -> dict[str, Any]:
    """The extra arguments ``scheduler.step`` takes: DDIM's ``eta``; the stochastic samplers' ``generator``."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = float(eta)
    if "generator" in params and generators is not None:
        kwargs["generator"] = generators
    return kwargs
