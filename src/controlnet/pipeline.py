"""Inference: a prompt and one or more control images → images.

:class:`Pipeline` composes :mod:`controlnet.loading`, :mod:`controlnet.conditions` and
:mod:`controlnet.sampling`; a call, top to bottom::

    ControlNets = load_controlnet(unit.controlnet)                  cached by path, checked against the base
    conditions  = prepare_condition(unit.image, W, H, annotator)    cover-resize, centre-crop, annotate
    text        = encode_prompt([negative, prompt])                 [unconditional, conditional] rows for CFG
    noise_k     = randn(generator seeded seed + k)                  one per image
    latents     = sample(unet, scheduler, noise * init_sigma, all timesteps, text, controls, guidance)
    images      = VAE.decode(latents)

Python use::

    from controlnet import Pipeline, ControlUnit
    pipe = Pipeline.from_pretrained()                     # the embedded tiny base; or a folder / .safetensors
    result = pipe(prompt="a red circle", controls=[ControlUnit("fill", "circle.png")], steps=20, seed=0)
    result.images[0].save("out.png")

Decisions (the sampler's and the conditions' own are in :mod:`controlnet.sampling` and :mod:`controlnet.conditions`):

* Guess mode (lllyasviel/ControlNet gradio_*.py, "guess_mode"): control on the conditional half of the CFG batch
  only, residual j of N scaled by ``strength * 0.825**(N-1-j)`` (:func:`controlnet.model.guess_mode_scales`).
  ``residual_scales`` on a unit overrides the per-residual factors (e.g. diffusers' ``logspace(-1, 0, N)``).
* Size: multiples of the VAE factor (8); other sizes are rounded to the nearest multiple, with a warning.
  Without ``size``: the first control image's aspect ratio with its short side at the base's native
  resolution (the original's ``image_resolution`` rule), or a square at the native resolution.
* Text as diffusers computes it: the last hidden state of the text encoder; for SDXL the penultimate layer of
  both encoders, concatenated, the second's pooled embedding, and zeros for an empty negative prompt.
* Seeds: image k of a generation starts from noise drawn with its own generator seeded ``seed + k`` (also used
  for the ancestral / eta noise), so each image is reproducible alone with ``seed + k``.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from controlnet.conditions import ImageInput, condition_to_pil, prepare_condition, round_size, to_condition_array
from controlnet.defaults import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS
from controlnet.errors import UserError
from controlnet.loading import DTYPE_NAMES, load_base, move, placement, quiet_loading, resolve_device, resolve_dtype
from controlnet.model import ControlNet, guess_mode_scales
from controlnet.sampling import Control, in_step_range, make_scheduler, sample

ControlNetRef = Union[ControlNet, str, os.PathLike]

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class ControlUnit:
    """One ControlNet with its condition and its settings for a generation.

    Args:
        controlnet: a loaded :class:`~controlnet.model.ControlNet`, a bundled name ("fill") or a path.
        image: the condition: a path, a PIL image (any mode), an array ``(H, W[, C])`` (uint8, or float in
            [0, 1]) or a tensor ``([1,] 3, H, W)`` / ``(H, W, 3)`` in [0, 1]. Resized to the output size by
            "cover, then centre-crop".
        strength: multiplies the unit's residuals (>= 0; 0 turns the unit off).
        start, end: fractions of the steps during which the unit applies (0 <= start <= end <= 1).
        annotator: name of a :mod:`controlnet.annotators` annotator run on the (resized) image first.
        annotator_params: keyword arguments for the annotator.
        residual_scales: optional per-residual factors (down residuals then mid, ``num_residuals`` values),
            multiplied by ``strength``; replaces guess mode's ``0.825**(N-1-j)``.
    """

    controlnet: ControlNetRef
    image: ImageInput
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    annotator: str | None = None
    annotator_params: dict[str, Any] = field(default_factory=dict)
    residual_scales: Sequence[float] | None = None

    def __post_init__(self) -> None:
        self.strength, self.start, self.end = float(self.strength), float(self.start), float(self.end)
        if not math.isfinite(self.strength) or self.strength < 0:
            raise UserError(f"ControlNet strength must be a number >= 0, got {self.strength}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise UserError(f"ControlNet {name} must be in [0, 1] (a fraction of the steps), got {value}")
        if self.start > self.end:
            raise UserError(f"ControlNet start {self.start} is after end {self.end}; give start <= end")

    def active(self, step: int, num_steps: int) -> bool:
        """Whether the unit runs at step ``step`` of ``num_steps`` (:func:`controlnet.sampling.in_step_range`;
        never at strength 0)."""
        return self.strength > 0 and in_step_range(self.start, self.end, step, num_steps)


@dataclass
class GenerationResult:
    """What a generation returns.

    ``images``: PIL images (``output_type="pil"``), ``(H, W, 3)`` uint8 arrays (``"np"``) or ``[]`` (``"latent"``);
    ``latents``: the final latents ``(B, C, h, w)`` float32; ``conditions``: the condition image each unit actually
    used (after resizing and annotating), as PIL; ``seed``: the seed of the first image (image k used seed + k);
    ``settings``: everything needed to reproduce the images (also written as PNG metadata).
    """

    images: list[Any]
    latents: torch.Tensor
    conditions: list[Image.Image]
    seed: int
    settings: dict[str, Any]


class Pipeline:
    """Text-to-image with ControlNets over an SD-family base (SD1.x, SD2.x incl. v-prediction, SDXL).

    Build it with :meth:`from_pretrained` (embedded base, a diffusers folder or a single file; dtype None → the
    device's default, :func:`controlnet.loading.default_dtype`) or from diffusers/transformers components
    (dtype/device None → the components run as given; otherwise they are moved and cast in place). Call it to
    generate; see the module docstring for the steps and the rules they follow.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any,
                 text_encoder_2: nn.Module | None = None, tokenizer_2: Any | None = None,
                 dtype: str | torch.dtype | None = None, device: str | torch.device | None = None):
        given = placement(unet)
        self.device = resolve_device(device) if device is not None else given["device"]
        self.dtype = resolve_dtype(dtype, self.device) if dtype is not None else given["dtype"]
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("text_encoder_2 and tokenizer_2 go together (SDXL); pass both or neither")
        if dtype is not None or device is not None:
            # SDXL's VAE overflows in fp16 (its config sets force_upcast): it decodes in fp32 there.
            upcast = self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
            for module, module_dtype in ((unet, self.dtype), (vae, torch.float32 if upcast else self.dtype),
                                         (text_encoder, self.dtype), (text_encoder_2, self.dtype)):
                if module is not None:
                    move(module, self.device, module_dtype)
        self.unet, self.vae, self.text_encoder, self.text_encoder_2 = unet, vae, text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.scheduler_config = dict(scheduler.config)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.is_sdxl = getattr(self.unet.config, "addition_embed_type", None) == "text_time"
        if self.is_sdxl and text_encoder_2 is None:
            raise ValueError("an SDXL UNet (addition_embed_type 'text_time') needs text_encoder_2 and tokenizer_2")
        self.base = ""  # where the base came from (settings / metadata)
        self._controlnets: dict[str, ControlNet] = {}
        self._checked: set[int] = set()

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        base_config: str | os.PathLike | None = None) -> "Pipeline":
        """Load a base model: ``None`` → the embedded tiny model; a diffusers folder; or a single
        .safetensors/.ckpt file (needs ``base_config``, a diffusers folder of the same family, or its config
        in the Hugging Face cache: nothing is downloaded)."""
        from controlnet.embedded import default_base_dir

        device_ = resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_)
        path = default_base_dir() if base is None else base
        pipe = cls(**load_base(path, dtype_, base_config), dtype=dtype_, device=device_)
        pipe.base = "embedded" if base is None else str(Path(base).expanduser())
        return pipe

    def load_controlnet(self, name_or_path: ControlNetRef) -> ControlNet:
        """A ControlNet by bundled name or path (cached), or a given model, checked against the base's family."""
        if isinstance(name_or_path, ControlNet):
            cn = name_or_path
        else:
            from controlnet.checkpoints import load_controlnet
            from controlnet.embedded import resolve_controlnet

            path = resolve_controlnet(str(name_or_path))
            key = str(path.resolve())
            if key not in self._controlnets:
                with quiet_loading():
                    self._controlnets[key] = load_controlnet(path, dtype=self.dtype, device=self.device)
            cn = self._controlnets[key]
        if id(cn) not in self._checked:
            from controlnet.checkpoints import check_compatible

            check_compatible(cn, self.unet)
            self._checked.add(id(cn))
        return cn

    @property
    def native_size(self) -> int:
        """The base's training resolution in pixels (UNet sample size x VAE factor): 512 for SD1.5."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def __call__(self, prompt: str, controls: Sequence[ControlUnit] = (), negative_prompt: str = "",
                 steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, scheduler: str = DEFAULT_SCHEDULER,
                 seed: int | None = 0, size: tuple[int, int] | None = None, num_images: int = 1, eta: float = 0.0,
                 guess_mode: bool = False, latents: torch.Tensor | None = None, output_type: str = "pil",
                 progress: bool = True, reuse_residuals: int = 1,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> GenerationResult:
        """Generate ``num_images`` images for ``prompt`` under the ControlNets of ``controls``.

        Args:
            prompt, negative_prompt: the text; the negative prompt is the unconditional branch of CFG.
            controls: :class:`ControlUnit` s; their residuals add.
            steps, scheduler, eta: sampler settings (``eta`` is DDIM's noise; other samplers ignore it).
            guidance: classifier-free guidance weight (<= 1: no CFG, one branch).
            seed: image k uses seed + k (``None``: a random seed, reported in the result).
            size: (width, height); ``None``: see the module docstring.
            guess_mode: control on the conditional branch only, residual scales 0.825**(N-1-j).
            latents: initial noise ``(num_images, C, h, w)`` (unscaled; multiplied by the scheduler's
                ``init_noise_sigma``), instead of drawing it from the seed.
            output_type: "pil", "np" (uint8 arrays) or "latent" (no decoding).
            progress: show a tqdm bar over the steps (stderr).
            callback: called as ``callback(i, t, latents)`` after every step.
            reuse_residuals: compute each ControlNet every N active steps and reuse its residuals in between
                (1, the default: every step; an approximation that trades controllability for speed).
        """
        _check_settings(output_type, steps, num_images, guidance, eta, reuse_residuals)
        steps, num_images, reuse_residuals = int(steps), int(num_images), int(reuse_residuals)
        sampler = make_scheduler(scheduler, self.scheduler_config)
        seed = random.SystemRandom().randrange(2**31) if seed is None else int(seed)

        # 1. Conditions at the output size, each with its ControlNet.
        width, height = self.output_size(size, to_condition_array(controls[0].image) if controls else None)
        prepared = [self._prepare_unit(unit, width, height, guess_mode) for unit in controls]

        # 2. Text: [unconditional, conditional] rows in one batch when guiding (diffusers' order).
        text, added = self.text_conditioning(prompt, negative_prompt, num_images, guidance > 1.0, width, height)

        # 3. The start: noise from one generator per image, seeded seed + k (also the samplers' noise).
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(num_images)]
        noise = self._initial_noise(latents, generators, width, height)  # (B, C, h, w)
        sampler.set_timesteps(steps, device=self.device)
        start = noise.to(self.device, torch.float32) * sampler.init_noise_sigma

        # 4. The loop, over the units that can act (strength > 0).
        active = [control for (control, _), unit in zip(prepared, controls) if unit.strength > 0]
        final = sample(self.unet, sampler, start, sampler.timesteps, text, active, guidance, added=added,
                       reuse=reuse_residuals, eta=eta, generators=generators, progress=progress, callback=callback)

        # 5. Decode and report.
        settings = self._settings(prompt, negative_prompt, seed, steps, scheduler, guidance, width, height, eta,
                                  guess_mode, reuse_residuals, num_images, controls)
        conditions = [condition_to_pil(condition) for _, condition in prepared]
        return GenerationResult(self._output(final, output_type), final.cpu(), conditions, seed, settings)

    # ------------------------------------------------------------------ pieces of a generation

    def output_size(self, size: tuple[int, int] | None, first_condition: np.ndarray | None) -> tuple[int, int]:
        """(width, height): ``size`` rounded to multiples of the VAE factor, or the default rule (module doc)."""
        m = self.vae_scale_factor
        if size is not None:
            width, height = (int(v) for v in size)
            if width <= 0 or height <= 0:
                raise UserError(f"size must be positive, got {width}x{height}")
            rounded = round_size(width, height, m)
            if rounded != (width, height):
                warnings.warn(f"size {width}x{height} rounded to {rounded[0]}x{rounded[1]} (multiples of {m})", stacklevel=3)
            return rounded
        if first_condition is None:
            return self.native_size, self.native_size
        h, w = first_condition.shape[:2]
        scale = self.native_size / min(h, w)
        return round_size(w * scale, h * scale, m)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings ``(N, L, D)`` and, for SDXL, pooled embeddings ``(N, D2)`` (as diffusers computes them)."""
        if self.text_encoder_2 is None:
            ids = _tokenize(self.tokenizer, prompts, self.text_encoder)
            return self.text_encoder(ids)[0], None  # last hidden state, after the final layer norm
        hidden = []
        pooled = None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(_tokenize(tokenizer, prompts, encoder), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL uses the penultimate layer of both encoders
            pooled = out[0]  # the second encoder's projected pooled embedding ("text_embeds")
        return torch.cat(hidden, dim=-1), pooled

    def text_conditioning(self, prompt: str, negative_prompt: str, num_images: int, cfg: bool, width: int,
                          height: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The sampler's ``text`` ``(2B or B, L, D)`` ([negative, positive] rows when ``cfg``) and, for SDXL, its
        ``added_cond_kwargs`` (pooled text and the micro-conditioning sizes)."""
        text, pooled = self.encode_prompt([prompt])  # (1, L, D), (1, D2) | None
        rows = [(text, pooled)]
        if cfg:
            if self.is_sdxl and not negative_prompt:  # SDXL: zeros for an empty negative prompt
                negative = (torch.zeros_like(text), torch.zeros_like(pooled) if pooled is not None else None)
            else:
                negative = self.encode_prompt([negative_prompt])
            rows.insert(0, negative)
        text = torch.cat([t.expand(num_images, -1, -1) for t, _ in rows]).to(self.device, self.dtype)
        if not self.is_sdxl:
            return text, None
        pooled = torch.cat([p.expand(num_images, -1) for _, p in rows])
        # SDXL micro-conditioning: original size, crop top-left, target size (h, w order).
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        return text, {"text_embeds": pooled.to(self.device, self.dtype), "time_ids": time_ids.repeat(text.shape[0], 1)}

    def _prepare_unit(self, unit: ControlUnit, width: int, height: int,
                      guess_mode: bool) -> tuple[Control, np.ndarray]:
        """The sampler's :class:`~controlnet.sampling.Control` for ``unit``, and its condition ``(H, W, 3)``."""
        cn = self.load_controlnet(unit.controlnet)
        condition = prepare_condition(unit.image, width, height, unit.annotator, unit.annotator_params)
        if unit.residual_scales is not None:
            scales: float | list[float] = [unit.strength * float(s) for s in unit.residual_scales]
            if len(scales) != cn.num_residuals:
                raise UserError(f"residual_scales has {len(scales)} values; this ControlNet has {cn.num_residuals} residuals")
        elif guess_mode:
            scales = guess_mode_scales(cn.num_residuals, unit.strength)
        else:
            scales = unit.strength
        hint = torch.from_numpy(condition).permute(2, 0, 1)[None]  # (1, 3, H, W) in [0, 1]
        # A pooled ControlNet (global_pool_conditions) controls the conditional branch only, as in diffusers.
        cond_only = guess_mode or bool(cn.config.global_pool_conditions)
        return Control(cn, hint, scales, unit.start, unit.end, cond_only), condition

    def _initial_noise(self, latents: torch.Tensor | None, generators: list[torch.Generator], width: int,
                       height: int) -> torch.Tensor:
        """``latents`` (checked), or noise ``(B, C, h, w)`` float32 drawn from one generator per image."""
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        if tuple(latents.shape) != (len(generators), *shape[1:]):
            raise UserError(f"latents must have shape {(len(generators), *shape[1:])}, got {tuple(latents.shape)}")
        return latents

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents ``(B, C, h, w)`` → images ``(B, H, W, 3)`` uint8, one image at a time (bounded memory)."""
        scaling = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        images = []
        for z in latents:
            z = (z[None] / scaling + shift).to(**placement(self.vae))
            x = self.vae.decode(z).sample.float()  # (1, 3, H, W) in [-1, 1]
            x = (x / 2 + 0.5).clamp(0, 1)
            images.append((x[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
        return np.stack(images)

    def _output(self, latents: torch.Tensor, output_type: str) -> list[Any]:
        if output_type == "latent":
            return []
        arrays = self.decode(latents)
        return [Image.fromarray(a) for a in arrays] if output_type == "pil" else list(arrays)

    def _settings(self, prompt: str, negative_prompt: str, seed: int, steps: int, scheduler: str, guidance: float,
                  width: int, height: int, eta: float, guess_mode: bool, reuse_residuals: int, num_images: int,
                  controls: Sequence[ControlUnit]) -> dict[str, Any]:
        """Everything needed to reproduce a generation (JSON-safe; written as PNG metadata)."""
        return {
            "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed,
            "seeds": [seed + k for k in range(num_images)], "steps": steps, "scheduler": scheduler,
            "guidance": float(guidance), "size": f"{width}x{height}", "eta": float(eta), "guess_mode": bool(guess_mode),
            **({"reuse_residuals": reuse_residuals} if reuse_residuals > 1 else {}),
            "num_images": num_images, "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype)), "base": self.base,
            "controlnets": [
                {"controlnet": _describe_controlnet(u.controlnet), "control": _describe_image(u.image),
                 "strength": u.strength, "start": u.start, "end": u.end, "annotator": u.annotator or "",
                 "annotator_params": {k: _describe_value(v) for k, v in u.annotator_params.items()}}
                for u in controls
            ],
        }


def _check_settings(output_type: str, steps: int, num_images: int, guidance: float, eta: float,
                    reuse_residuals: int) -> None:
    """One-line :class:`UserError` for a generation setting out of its range."""
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if int(steps) < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    if int(num_images) < 1:
        raise UserError(f"num_images must be >= 1, got {num_images}")
    if not math.isfinite(float(guidance)) or guidance < 0:
        raise UserError(f"guidance must be a number >= 0, got {guidance}")
    if not 0.0 <= float(eta) <= 1.0:
        raise UserError(f"eta must be in [0, 1], got {eta}")
    if int(reuse_residuals) < 1:
        raise UserError(f"reuse_residuals must be >= 1 (1: compute the residuals every step), got {reuse_residuals}")


def _tokenize(tokenizer: Any, prompts: list[str], encoder: nn.Module) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(placement(encoder)["device"])


def _describe_controlnet(controlnet: ControlNetRef) -> str:
    """A ControlNet as given (name or path), or the source of an in-memory model (for settings)."""
    if isinstance(controlnet, ControlNet):
        return str(getattr(controlnet, "name_or_path", "") or "ControlNet (in memory)")
    return str(controlnet)


def _describe_image(image: ImageInput) -> str:
    """A path as given, or the kind of in-memory image (for settings)."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"<{type(image).__name__}>"


def _describe_value(value: Any) -> Any:
    """A setting value as JSON can hold it: numbers, strings and booleans as they are, paths as text, others by type."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    return f"<{type(value).__name__}>"
