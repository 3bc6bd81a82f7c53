"""Inference: a prompt and one or more control images → images.

:class:`Pipeline` composes :mod:`controlnet.loading`, :mod:`controlnet.conditions` and
:mod:`controlnet.sampling`; a call, top to bottom::

    ControlNets = load_controlnet(unit.controlnet)                  cached by path, checked against the base
    conditions  = prepare_condition(unit.image, W, H, annotator)    cover-resize, centre-crop, annotate
    text        = encode_prompt([negative, prompt])                 [unconditional, conditional] rows for CFG
    noise_k     = randn(generator seeded seed + k)                  one per image
    latents     = sample(unet, scheduler, noise * init_sigma, all timesteps, text, controls, guidance)
    images      = VAE.decode(latents)

Image to image (``init_image``; pieces in :mod:`controlnet.img2img`): the picture is encoded (the VAE's posterior
sampled with generator k), noised to the first of the last ``round(denoise * steps)`` timesteps, and only those
run; with a ``mask`` the known region is blended back at every step (or, for an inpainting UNet, given as its
extra input) and its pixels are pasted back after decoding. Hires fix (``hires``): the text-to-image result is
upscaled and refined by an img2img pass at the larger size, its conditions prepared anew at that size.

Python use::

    from controlnet import Pipeline, ControlUnit
    from controlnet.generation_config import GenerationConfig, HiresFix
    pipe = Pipeline.from_pretrained()                     # the embedded tiny base; or a folder / .safetensors
    config = GenerationConfig(steps=20, seed=0, hires=HiresFix(scale=2))
    result = pipe("a red circle", [ControlUnit("fill", "circle.png")], config)
    result.images[0].save("out.png")                      # or, in short: pipe("a red circle", units, steps=20)

Decisions (the sampler's and the conditions' own are in :mod:`controlnet.sampling` and :mod:`controlnet.conditions`):

* Guess mode (lllyasviel/ControlNet gradio_*.py, "guess_mode"): control on the conditional half of the CFG batch
  only, residual j of N scaled by ``strength * 0.825**(N-1-j)`` (:func:`controlnet.residuals.original_guess_mode_scales`).
  ``residual_scales`` on a unit overrides the per-residual factors (e.g. diffusers' ``logspace(-1, 0, N)``).
* Control families (:meth:`Pipeline.load_controlnet` tells them from the file): a unit's ``strength``, ``start`` /
  ``end``, ``residual_scales`` and control mode act on every family's residuals alike, and the residuals of all
  units add, so ControlNets, a T2I-Adapter and union passes compose in one generation. What differs:

  - T2I-Adapter (TencentARC; diffusers' StableDiffusion[XL]AdapterPipeline): its features are computed once per
    generation and added inside the UNet's down blocks at every step in range; ``strength`` is diffusers'
    ``adapter_conditioning_scale`` and ``end`` its ``adapter_conditioning_factor`` (with ``start`` 0). The
    "prompt" mode weakens its deep features by 0.825 per level as it does a ControlNet's residuals; "controlnet"
    and guess mode keep the unconditional half uncontrolled (diffusers' adapter pipelines have neither).
  - Union/ProMax (xinsir): each unit names its ``control_type``; the units naming one union model are fused into
    one forward pass (several conditions, in unit order), so they must share ``start``/``end``, the control mode
    and ``residual_scale``. With several conditions ``strength`` scales each condition's fused input (xinsir's and
    diffusers' rule: not a linear scale of the result) and ``residual_scale`` scales the pass's residuals; with one,
    both scale the residuals.
  - Control-LoRA (Stability): built on this pipeline's base UNet at its first load (base weights plus the file's
    deltas); then a ControlNet like any other.
* Size: multiples of the VAE factor (8); other sizes are rounded to the nearest multiple, with a warning.
  Without ``size``: the first control image's aspect ratio with its short side at the base's native
  resolution (the original's ``image_resolution`` rule), or a square at the native resolution.
* Text as diffusers computes it: the last hidden state of the text encoder; for SDXL the penultimate layer of
  both encoders, concatenated, the second's pooled embedding, and zeros for an empty negative prompt.
* Seeds: image k of a generation starts from noise drawn with its own generator seeded ``seed + k`` (also used
  for the ancestral / eta noise), so each image is reproducible alone with ``seed + k``. With an init image the
  generator draws, in order: the image's posterior sample, the noise, the masked image's posterior sample
  (inpainting UNets), then a hires pass's draws; each only when it is needed (diffusers' order).
* Control modes per unit (the sd-webui-controlnet extension, Mikubill/sd-webui-controlnet scripts/controlnet.py:
  ``soft_injection = control_mode != BALANCED``, ``cfg_injection = control_mode == CONTROL``; scripts/hook.py:
  ``control_scales = weight * 0.825 ** (12 - i)`` and ``control *= cond_mark``): "balanced" scales every residual
  by the strength, on both CFG branches; "prompt" ("My prompt is more important") scales residual j of N by
  ``strength * 0.825**(N-1-j)`` (deep residuals weaker), on both branches; "controlnet" ("ControlNet is more
  important") uses the same scales on the conditional branch only, the unconditional one uncontrolled, CFG kept:
  that is the original's guess mode, which ``guess_mode=True`` applies to every unit.
* img2img steps (diffusers' StableDiffusionControlNetImg2ImgPipeline ``get_timesteps``): ``round(denoise *
  steps)`` (rounded half up; diffusers floors it) of a ``steps``-step schedule run, from the noisiest of them;
  a unit's ``start``/``end`` are fractions of the steps that run. ``denoise`` 0 returns the VAE round trip of
  the picture; 1 starts at the noisiest timestep from the picture noised there (img2img) or from pure noise
  (inpainting), as diffusers' img2img and inpaint pipelines do.
* Output size with an init image: the picture's own size rounded to multiples of 8 (``size`` overrides; the
  picture and mask are then resized by "cover, then centre-crop" and the pasted-back pixels are those of the
  resized picture). With ``inpaint_full_res``: the image at its own size, the crop generated at ``size`` or at the
  crop's aspect ratio with its short side at the native resolution.
"""

from __future__ import annotations

import dataclasses
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

from controlnet import img2img
from controlnet.conditions import ImageInput, condition_to_pil, prepare_condition, round_size, to_condition_array
from controlnet.defaults import CONTROL_MODES, FamilyDefaults, family_defaults, scheduler_name
from controlnet.errors import UserError
from controlnet.devices import DTYPE_NAMES, move, placement, resolve_device, resolve_dtype
from controlnet.generation_config import GenerationConfig, HiresFix, ImageToImage
from controlnet.hub import quiet_loading
from controlnet.img2img import Source
from controlnet.limits import check_output_size
from controlnet.loading import load_base
from controlnet.model import UNetControlNet
from controlnet.t2i_adapter import T2IAdapter, feature_layout
from controlnet.residuals import original_guess_mode_scales
from controlnet.sampling import Control, in_step_range, make_scheduler, sample
from controlnet.runtime import Runtime
from controlnet.settings import describe_controlnet, unit_settings
from controlnet.text_conditioner import TextConditioner

ControlNetRef = Union[UNetControlNet, nn.Module, str, os.PathLike]

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class ControlUnit:
    """One ControlNet with its condition and its settings for a generation.

    Args:
        controlnet: a loaded control model, a bundled name ("fill"), a path or a hub id: a ControlNet, a
            Union/ProMax ControlNet, a Control-LoRA or a T2I-Adapter (the family is told from the file).
        image: the condition: a path, a PIL image (any mode), an array ``(H, W[, C])`` (uint8, or float in
            [0, 1]) or a tensor ``([1,] 3, H, W)`` / ``(H, W, 3)`` in [0, 1]. Resized to the output size by
            "cover, then centre-crop".
        strength: multiplies the unit's residuals (>= 0; 0 turns the unit off).
        start, end: fractions of the steps during which the unit applies (0 <= start <= end <= 1).
        annotator: name of a :mod:`controlnet.annotators` annotator run on the (resized) image first.
        annotator_params: keyword arguments for the annotator.
        residual_scales: optional per-residual factors (down residuals then mid, ``num_residuals`` values),
            multiplied by ``strength``; replaces the ``0.825**(N-1-j)`` of guess mode and of the control modes.
        control_mode: "balanced", "prompt" or "controlnet" (the A1111 extension's modes; module docstring).
        control_type: the condition's type for a union ControlNet ("depth", "openpose", ...; the model's own
            names, :data:`controlnet.union.CONTROL_TYPES` for SDXL union/ProMax); None for other families.
        residual_scale: multiplies the residuals of the unit's pass (>= 0). The same as ``strength`` for every
            family but a union ControlNet fusing several conditions, where ``strength`` scales each condition's
            fused input and ``residual_scale`` the pass's residuals (module docstring).
    """

    controlnet: ControlNetRef
    image: ImageInput
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    annotator: str | None = None
    annotator_params: dict[str, Any] = field(default_factory=dict)
    residual_scales: Sequence[float] | None = None
    control_mode: str = "balanced"
    control_type: str | None = None
    residual_scale: float = 1.0

    def __post_init__(self) -> None:
        self.strength, self.start, self.end = float(self.strength), float(self.start), float(self.end)
        self.residual_scale = float(self.residual_scale)
        if not math.isfinite(self.residual_scale) or self.residual_scale < 0:
            raise UserError(f"residual scale must be a number >= 0, got {self.residual_scale}")
        if self.control_mode not in CONTROL_MODES:
            raise UserError(f"unknown control mode {self.control_mode!r}; choose one of {', '.join(CONTROL_MODES)}")
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
class _Run:
    """What every denoising pass of one call shares (the hires pass repeats the first with these)."""

    prompt: str
    negative_prompt: str
    controls: list[ControlUnit]
    guess_mode: bool
    guidance: float
    scheduler: str
    eta: float
    reuse: int
    generators: list[torch.Generator]
    progress: bool
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None


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
    device's default, :func:`controlnet.devices.default_dtype`) or from diffusers/transformers components
    (dtype/device None → the components run as given; otherwise they are moved and cast in place). Call it to
    generate; see the module docstring for the steps and the rules they follow.

    Its parts: :attr:`text` (:class:`~controlnet.text_conditioner.TextConditioner`: prompts, clip skip, LoRAs,
    embeddings), :attr:`runtime` (:class:`~controlnet.runtime.Runtime`: offload, compile, channels-last, VAE
    tiling); an init image's steps are the functions of :mod:`controlnet.img2img`, given the VAE and the sampler.
    The methods below that only forward to a part keep the short spelling (``pipe.load_lora(...)``).
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
        self._controlnets: dict[str, UNetControlNet] = {}
        self._checked: set[int] = set()
        # Largest output, pixels per image (controlnet.limits); None: derived from the device's memory.
        self.max_pixels: int | None = None
        self.variant: str | None = None  # weights variant for hub ControlNets ("fp16"), as from_pretrained got it
        self.vae_source = ""  # another VAE's source (load_vae), for the settings
        self.runtime = Runtime(self.device)
        self.text = TextConditioner(unet, text_encoder, tokenizer, text_encoder_2, tokenizer_2, self.device,
                                    self.dtype, self.is_sdxl, paused=lambda: self.runtime.paused(*self._models()))

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        base_config: str | os.PathLike | None = None, revision: str | None = None,
                        variant: str | None = None) -> "Pipeline":
        """Load a base model: ``None`` → the embedded tiny model; a diffusers folder; a single .safetensors/.ckpt
        file (needs ``base_config``, a diffusers folder of the same family, or its config in the Hugging Face
        cache); or a hub id (``org/name`` or ``org/name/file.safetensors``; ``revision``, ``variant`` as in
        diffusers), downloaded into the Hugging Face cache on first use unless HF_HUB_OFFLINE=1."""
        from controlnet.embedded import default_base_dir

        device_ = resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_, tiny=base is None)
        path = default_base_dir() if base is None else base
        pipe = cls(**load_base(path, dtype_, base_config, revision, variant), dtype=dtype_, device=device_)
        pipe.base = "embedded" if base is None else str(Path(base).expanduser() if Path(base).expanduser().exists() else base)
        pipe.variant = variant
        return pipe

    def load_controlnet(self, name_or_path: ControlNetRef) -> nn.Module:
        """A control model by bundled name, path or hub id (cached), or a given model, checked against the base.

        The family is told from the file (:func:`controlnet.families.detect_family`): a ControlNet (original or
        diffusers layout), a Union/ProMax ControlNet, a Control-LoRA (built on this pipeline's base UNet as it is
        at its first load) or a T2I-Adapter. A model for another base (family or block widths), or a transformer-base
        ControlNet on this UNet base, is refused in one line naming both."""
        if isinstance(name_or_path, nn.Module):
            cn = name_or_path
        else:
            from controlnet.loading import resolve_controlnet_source

            path = resolve_controlnet_source(str(name_or_path), variant=self.variant)  # also hub ids
            key = str(path.resolve())
            if key not in self._controlnets:
                with quiet_loading():
                    cn = self._load_control_model(path)
                self._controlnets[key] = self.runtime.prepare(cn)  # offload, compile, channels-last
            cn = self._controlnets[key]
        if id(cn) not in self._checked:
            from controlnet.t2i_adapter import T2IAdapter

            if isinstance(cn, T2IAdapter):
                from controlnet.t2i_adapter import check_compatible as check_adapter

                check_adapter(cn, dict(self.unet.config))
            else:
                from controlnet.checkpoints import check_compatible

                check_compatible(cn, self.unet)
            self._checked.add(id(cn))
        return cn

    def _load_control_model(self, path: Path) -> nn.Module:
        """The model of the control file or folder at ``path``, of the family its keys tell."""
        from controlnet.families import detect_family
        from controlnet.transformer_formats import is_transformer_controlnet

        if is_transformer_controlnet(path):
            from controlnet.checkpoints import detect_family as base_family

            raise UserError(f"{path} is a ControlNet for a transformer base (Flux, SD3 or Qwen-Image), but the base model is "
                            f"{base_family(self.unet)} (a UNet); use it with the transformer base it was made for, or a ControlNet "
                            f"made for {base_family(self.unet)}")
        family = detect_family(path)
        if family == "t2i-adapter":
            from controlnet.t2i_adapter import load_t2i_adapter

            return load_t2i_adapter(_with_config(path, "T2IAdapter"), dtype=self.dtype, device=self.device)
        if family == "union":
            from controlnet.union import load_union

            return load_union(path, dtype=self.dtype, device=self.device)
        if family == "control-lora":
            from controlnet.control_lora import load_control_lora

            return load_control_lora(path, self.unet, dtype=self.dtype, device=self.device)
        from controlnet.checkpoints import load_controlnet

        return load_controlnet(path, dtype=self.dtype, device=self.device)

    @property
    def native_size(self) -> int:
        """The base's training resolution in pixels (UNet sample size x VAE factor): 512 for SD1.5."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # ------------------------------------------------------------------ the base's family, its VAE

    @property
    def family(self) -> str:
        """"sd1", "sd2", "sdxl", or "embedded" for the tiny models shipped in the package."""
        from controlnet.embedded import is_embedded

        if is_embedded(self.base):
            return "embedded"
        from controlnet.checkpoints import detect_family

        return detect_family(self.unet)

    @property
    def defaults(self) -> FamilyDefaults:
        """Guidance and scheduler for this base's family (:data:`controlnet.defaults.FAMILY_DEFAULTS`)."""
        return family_defaults(self.family)

    def sampler_defaults(self, guidance: float | None, scheduler: str | None) -> tuple[float, str]:
        """``guidance`` and ``scheduler`` (our or A1111's name) as given, or the family's where None."""
        guidance = self.defaults.guidance if guidance is None else guidance
        return guidance, scheduler_name(self.defaults.scheduler if scheduler is None else scheduler)

    def load_vae(self, source: str | os.PathLike, revision: str | None = None, variant: str | None = None) -> None:
        """Replace the base's VAE (a file, a diffusers folder or a hub id; :func:`controlnet.loading.load_vae`)."""
        from controlnet import runtime
        from controlnet.loading import load_vae

        where = placement(self.vae)
        vae = load_vae(source, self.vae, where["dtype"], revision, variant)
        upcast = where["dtype"] == torch.float16 and getattr(vae.config, "force_upcast", False)
        device = self.device if runtime.is_offloaded(self.vae) else where["device"]
        self.vae = move(vae, device, torch.float32 if upcast else where["dtype"])
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae_source = str(source)
        if self.runtime.channels_last:
            runtime.to_channels_last(self.vae)
        if self.runtime.offload:
            self.runtime.apply(*self._models())

    # ------------------------------------------------------------------ the parts' options, in short

    def _models(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The runtime's chain (text encoders, UNet, VAE, in the order they run) and the loaded ControlNets."""
        chain = [m for m in (self.text_encoder, self.text_encoder_2, self.unet, self.vae) if m is not None]
        return chain, list(self._controlnets.values())

    def enable_offload(self, mode: str | None) -> None:
        """Keep the models on the CPU, each moved to :attr:`device` only to run: "model", "sequential" or None."""
        self.runtime.enable_offload(mode, *self._models())

    def compile(self, mode: str | None = None, backend: str = "inductor") -> None:
        """``torch.compile`` the UNet and the ControlNets (now and when loaded); the first generation compiles."""
        self.runtime.compile([self.unet, *self._controlnets.values()], mode, backend)

    def use_channels_last(self) -> None:
        """The UNet's, the VAE's and the ControlNets' weights in channels-last memory format (now and when loaded)."""
        self.runtime.use_channels_last([self.unet, self.vae, *self._controlnets.values()])

    def prepare_controlnet(self, controlnet: nn.Module) -> nn.Module:
        """Apply the runtime options to a ControlNet loaded outside :meth:`load_controlnet`."""
        return self.runtime.prepare(controlnet)

    @property
    def vae_tiling(self) -> str:
        """"auto", "on" or "off" (:mod:`controlnet.runtime`)."""
        return self.runtime.vae_tiling

    @vae_tiling.setter
    def vae_tiling(self, mode: str) -> None:
        self.runtime.vae_tiling = mode

    @property
    def clip_skip(self) -> int:
        """Text from the N-th last layer of the text encoder(s), as A1111 counts (1: the last)."""
        return self.text.clip_skip

    @clip_skip.setter
    def clip_skip(self, value: int) -> None:
        self.text.clip_skip = value

    @property
    def lora_dir(self) -> Path | None:
        """Where ``<lora:name>`` in a prompt and ``load_lora(name)`` are looked for."""
        return self.text.lora_dir

    @lora_dir.setter
    def lora_dir(self, folder: Path | None) -> None:
        self.text.lora_dir = folder

    @property
    def loras(self) -> dict[str, tuple[float, float]]:
        """The LoRAs loaded with :meth:`load_lora`: name → (UNet weight, text-encoder weight)."""
        return self.text.loras

    @property
    def embeddings(self) -> dict[str, str]:
        """The loaded embeddings: token → file."""
        return self.text.embeddings

    def load_lora(self, source: str | os.PathLike, weight: float = 1.0, text_weight: float | None = None,
                  revision: str | None = None) -> str:
        """:meth:`TextConditioner.load_lora <controlnet.text_conditioner.TextConditioner.load_lora>`."""
        return self.text.load_lora(source, weight, text_weight, revision)

    def unload_lora(self, name: str) -> None:
        """:meth:`TextConditioner.unload_lora <controlnet.text_conditioner.TextConditioner.unload_lora>`."""
        self.text.unload_lora(name)

    def load_embedding(self, source: str | os.PathLike, token: str | None = None) -> str:
        """:meth:`TextConditioner.load_embedding <controlnet.text_conditioner.TextConditioner.load_embedding>`."""
        return self.text.load_embedding(source, token)

    def encode_weighted_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`TextConditioner.encode_weighted_prompt
        <controlnet.text_conditioner.TextConditioner.encode_weighted_prompt>`."""
        return self.text.encode_weighted_prompt(prompt)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`TextConditioner.encode_prompt <controlnet.text_conditioner.TextConditioner.encode_prompt>`."""
        return self.text.encode_prompt(prompts)

    def text_conditioning(self, prompt: str, negative_prompt: str, num_images: int, cfg: bool, width: int,
                          height: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """:meth:`TextConditioner.text_conditioning <controlnet.text_conditioner.TextConditioner.text_conditioning>`."""
        return self.text.text_conditioning(prompt, negative_prompt, num_images, cfg, width, height)

    def maybe_convert_prompt(self, prompt: str, tokenizer: Any) -> str:
        """A prompt with multi-vector embedding tokens expanded (diffusers' ``maybe_convert_prompt``)."""
        return self.text.maybe_convert_prompt(prompt, tokenizer)

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def __call__(self, prompt: str, controls: Sequence[ControlUnit] = (), config: GenerationConfig | None = None, *,
                 latents: torch.Tensor | None = None, output_type: str = "pil", progress: bool = True,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                 **settings: Any) -> GenerationResult:
        """Generate ``config.num_images`` images for ``prompt`` under the ControlNets of ``controls``.

        Args:
            prompt: the text, in A1111's syntax (emphasis, BREAK, any length, ``<lora:name:w>``:
                :mod:`controlnet.prompts`, :mod:`controlnet.lora`).
            controls: :class:`ControlUnit` s; their residuals add.
            config: the settings (:class:`~controlnet.generation_config.GenerationConfig`: negative prompt, steps,
                guidance, scheduler, seed, size, image to image, hires fix, ...). Instead of it, its fields as
                keywords (``steps=20, init_image=..., hires=HiresFix(...)``; image-to-image fields flat).
            latents: initial noise ``(num_images, C, h, w)`` (unscaled; multiplied by the scheduler's
                ``init_noise_sigma``, or added to the init image's latents), instead of drawing it from the seed.
            output_type: "pil", "np" (uint8 arrays) or "latent" (no decoding, no paste-back).
            progress: show a tqdm bar over the steps (stderr).
            callback: called as ``callback(i, t, latents)`` after every step.
        """
        if config is not None and settings:
            raise TypeError(f"give config or keyword settings, not both (got {', '.join(settings)})")
        config = _checked_copy(config) if config is not None else GenerationConfig.build(**settings).check()
        guidance, scheduler = self.sampler_defaults(config.guidance, config.scheduler)
        _check_model_settings(output_type, config.steps, make_scheduler(scheduler, self.scheduler_config), scheduler)
        img2img.check_unet(self.unet, self.vae, config.image.mask)
        text_prompt, active_loras = self.text.apply_prompt_loras(prompt)  # <lora:name:w> tags out of the text
        seed = random.SystemRandom().randrange(2**31) if config.seed is None else config.seed
        image, hires, steps, size = config.image, config.hires, config.steps, config.size
        source = img2img.load_source(image.init_image, image.mask, image.mask_invert) if image.init_image is not None else None
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(config.num_images)]
        run = _Run(text_prompt, config.negative_prompt, list(controls), config.guess_mode, guidance, scheduler,
                   config.eta, config.reuse_residuals, generators, progress, callback)

        # 1. Where: the output size, the starting picture there (for "only masked": the mask's box, its conditions).
        whole, box = source, None
        if source is not None and image.inpaint_full_res:
            source, size, box, run.controls = img2img.only_masked(
                source, image.inpaint_padding, run.controls, lambda shape: self.output_size(size, shape))
        if size is None and source is not None:
            size = round_size(*source.size, self.vae_scale_factor)
        width, height = self.output_size(size, to_condition_array(controls[0].image) if controls else None)
        check_output_size(width, height, self.max_pixels, device=str(self.device), what="output size")
        source = source.fit(width, height) if source is not None else None
        first_pass = (width, height)

        # 2. The denoising pass(es): conditions, text, start, loop.
        final, prepared = self._denoise(run, width, height, steps, image.strength, source=source, latents=latents)
        if hires is not None:
            width, height = round_size(width * hires.scale, height * hires.scale, self.vae_scale_factor)
            check_output_size(width, height, self.max_pixels, device=str(self.device), what="hires size")
            upscaled = img2img.upscale_latents(self.vae, final, hires, width, height, generators, self.decode,
                                               self.device)
            final, prepared = self._denoise(run, width, height, hires.steps or steps, hires.denoise,
                                            image_latents=upscaled)

        # 3. Decode, paste back, report.
        used = dataclasses.replace(
            config, guidance=float(guidance), scheduler=scheduler, seed=seed, size=first_pass,
            image=dataclasses.replace(image, denoise=image.strength) if source is not None else image,
            hires=dataclasses.replace(hires, steps=hires.steps or steps) if hires is not None else None)
        settings = self._settings(prompt, used, controls, active_loras, (width, height))
        images = self._output(final, output_type, source, image.mask_blur, whole, box)
        conditions = [condition_to_pil(condition) for _, condition in prepared]
        self.text.activate_loras({})  # only the loaded LoRAs act again (the prompt's off)
        self.runtime.release()  # offloaded models back to the CPU
        return GenerationResult(images, final.cpu(), conditions, seed, settings)

    def _settings(self, prompt: str, used: GenerationConfig, controls: Sequence[ControlUnit],
                  active_loras: dict[str, tuple[float, float]], output: tuple[int, int]) -> dict[str, Any]:
        """What reproduces a generation (JSON-safe): the prompt, the config as it ran (:meth:`GenerationConfig.to_settings`;
        its size the first pass's), the control units, and what the pipeline adds (seeds, dtype, base, LoRAs, ...)."""
        settings = {"prompt": prompt, **used.to_settings(), "seeds": [used.seed + k for k in range(used.num_images)],
                    "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype)), "base": self.base,
                    "controlnets": unit_settings(controls)}
        if used.hires is not None:
            settings["hires"]["size"] = f"{output[0]}x{output[1]}"  # the output's; "size" is the first pass's
        settings.update(self.text.settings(active_loras))
        if self.vae_source:
            settings["vae"] = self.vae_source
        return settings

    # ------------------------------------------------------------------ pieces of a generation

    def output_size(self, size: tuple[int, int] | None, first_condition: np.ndarray | None) -> tuple[int, int]:
        """(width, height): ``size`` rounded to multiples of the VAE factor, or the default rule (module doc)."""
        m = self.vae_scale_factor
        if size is not None:
            width, height = (int(v) for v in size)  # positive: GenerationConfig.check
            rounded = round_size(width, height, m)
            if rounded != (width, height):
                warnings.warn(f"size {width}x{height} rounded to {rounded[0]}x{rounded[1]} (multiples of {m})", stacklevel=3)
            return rounded
        if first_condition is None:
            return self.native_size, self.native_size
        h, w = first_condition.shape[:2]
        scale = self.native_size / min(h, w)
        return round_size(w * scale, h * scale, m)

    def _prepare_unit(self, unit: ControlUnit, width: int, height: int,
                      guess_mode: bool) -> tuple[Control, np.ndarray]:
        """The sampler's :class:`~controlnet.sampling.Control` for ``unit``, and its condition ``(H, W, 3)``."""
        cn = self.load_controlnet(unit.controlnet)
        union = _check_control_type(cn, unit)
        condition = prepare_condition(unit.image, width, height, unit.annotator, unit.annotator_params)
        # A union pass's own strength is handed on per condition (its fused input); here only its residual scale.
        scale = unit.residual_scale * (1.0 if union else unit.strength)
        count = len(feature_layout(cn.config)) if isinstance(cn, T2IAdapter) else cn.num_residuals
        if unit.residual_scales is not None:
            scales: float | list[float] = [scale * float(s) for s in unit.residual_scales]
            if len(scales) != count:
                raise UserError(f"residual_scales has {len(scales)} values; this model has {count} residuals")
        elif guess_mode or unit.control_mode != "balanced":  # the soft injection of "prompt" and "controlnet"
            scales = original_guess_mode_scales(count, scale)
        else:
            scales = scale
        hint = torch.from_numpy(condition).permute(2, 0, 1)[None]  # (1, 3, H, W) in [0, 1], masked pixels -1
        # A pooled ControlNet (global_pool_conditions) controls the conditional branch only, as in diffusers.
        pooled = bool(getattr(getattr(cn, "config", None), "global_pool_conditions", False))
        cond_only = guess_mode or unit.control_mode == "controlnet" or pooled
        control = Control(cn, [hint] if union else hint, scales, unit.start, unit.end, cond_only,
                          [unit.control_type] if union else None, [unit.strength] if union else None)
        return control, condition

    def initial_noise(self, latents: torch.Tensor | None, generators: list[torch.Generator], width: int,
                      height: int) -> torch.Tensor:
        """``latents`` (checked), or noise ``(B, C, h, w)`` float32 drawn from one generator per image, on the
        device."""
        shape = (1, self.vae.config.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        elif tuple(latents.shape) != (len(generators), *shape[1:]):
            raise UserError(f"latents must have shape {(len(generators), *shape[1:])}, got {tuple(latents.shape)}")
        return latents.to(self.device, torch.float32)

    def _denoise(self, run: _Run, width: int, height: int, steps: int, denoise: float, *,
                 source: Source | None = None, image_latents: torch.Tensor | None = None,
                 latents: torch.Tensor | None = None) -> tuple[torch.Tensor, list[tuple[Control, np.ndarray]]]:
        """One denoising pass at ``width`` x ``height``: the final latents and the prepared units. From noise
        (text-to-image), from ``source`` (img2img / inpainting) or from ``image_latents`` (the hires pass)."""
        sampler = make_scheduler(run.scheduler, self.scheduler_config)
        prepared = [self._prepare_unit(unit, width, height, run.guess_mode) for unit in run.controls]
        # Text: [unconditional, conditional] rows in one batch when guiding (diffusers' order).
        text, added = self.text.text_conditioning(run.prompt, run.negative_prompt, len(run.generators),
                                             run.guidance > 1.0, width, height)
        sampler.set_timesteps(steps, device=self.device)
        if source is None and image_latents is None:  # text-to-image: noise at the schedule's first sigma
            noise = self.initial_noise(latents, run.generators, width, height)
            start, timesteps, inpainting = noise * sampler.init_noise_sigma, sampler.timesteps, None
        else:
            start, timesteps, inpainting = img2img.image_start(
                self.vae, self.unet, sampler, steps, denoise, run.generators,
                lambda: self.initial_noise(latents, run.generators, width, height), source, image_latents, self.device)
        active = fuse_union_passes([(control, unit) for (control, _), unit in zip(prepared, run.controls)
                                    if unit.strength > 0])
        final = sample(self.unet, sampler, start, timesteps, text, active, run.guidance, added=added, reuse=run.reuse,
                       eta=run.eta, generators=run.generators, progress=run.progress,
                       callback=_stop_if_not_finite(run.callback, len(timesteps)), inpainting=inpainting)
        return final, prepared

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents ``(B, C, h, w)`` → images ``(B, H, W, 3)`` uint8, one image at a time (bounded memory)."""
        scaling = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        self.runtime.configure_vae_tiling(self.vae, latents.shape[-1] * self.vae_scale_factor,
                                          latents.shape[-2] * self.vae_scale_factor)
        images = []
        for z in latents:
            z = (z[None] / scaling + shift).to(**placement(self.vae))
            x = self.vae.decode(z).sample.float()  # (1, 3, H, W) in [-1, 1]
            x = (x / 2 + 0.5).clamp(0, 1)
            images.append((x[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
        return np.stack(images)

    def _output(self, latents: torch.Tensor, output_type: str, source: Source | None = None, mask_blur: float = 0.0,
                whole: Source | None = None, box: tuple[int, int, int, int] | None = None) -> list[Any]:
        """The decoded images, with the unmasked pixels of ``source`` pasted back (for "only masked": the box's
        result pasted into ``whole``)."""
        if output_type == "latent":
            return []
        arrays = list(self.decode(latents))
        if source is not None and source.mask is not None:
            arrays = img2img.paste_back_all(arrays, source, mask_blur, whole, box)
        return [Image.fromarray(a) for a in arrays] if output_type == "pil" else arrays


def _with_config(path: Path, class_name: str) -> Path:
    """A diffusers weights file whose folder's config.json names ``class_name``: that folder (its config holds what
    shapes cannot tell); anything else as it is."""
    import json

    config = path.parent / "config.json"
    if path.is_file() and path.name.startswith("diffusion_pytorch_model") and config.is_file():
        try:
            if json.loads(config.read_text()).get("_class_name") == class_name:
                return path.parent
        except (OSError, ValueError, AttributeError):
            pass
    return path


def _check_control_type(cn: nn.Module, unit: ControlUnit) -> bool:
    """Whether ``cn`` is a union ControlNet; refuses, in one line, a union unit without a valid control type and a
    control type on a model of another family."""
    from controlnet.union import CONTROL_TYPES, UnionControlNet

    where = f"ControlNet {describe_controlnet(unit.controlnet)}"
    if not isinstance(cn, UnionControlNet):
        if unit.control_type is not None:
            raise UserError(f"control type {unit.control_type!r} given for {where}, which is no Union/ProMax "
                            "ControlNet; a control type is for a union model only")
        return False
    if unit.control_type is None:
        names = ", ".join(k for k, v in CONTROL_TYPES.items() if v < cn.union_config.num_control_type)
        raise UserError(f"{where} is a Union/ProMax ControlNet: give the condition's control type "
                        f"(--control-type NAME), one of {names}")
    cn.control_type_index(unit.control_type)  # an unknown name: one line naming the valid ones
    return True


def fuse_union_passes(controls: Sequence[tuple[Control, ControlUnit]]) -> list[Control]:
    """The controls of the active units, those of one union ControlNet fused into one pass (its conditions, types
    and strengths in unit order, at the place of its first unit). A fused pass runs with one step range, control
    mode and residual scale, so the units of one union model must agree on them (one-line error otherwise)."""
    from controlnet.union import UnionControlNet

    out: list[Control] = []
    first: dict[int, tuple[Control, ControlUnit]] = {}
    for control, unit in controls:
        cn = control.controlnet
        if not isinstance(cn, UnionControlNet) or id(cn) not in first:
            if isinstance(cn, UnionControlNet):
                control = dataclasses.replace(control, condition=list(control.condition),
                                              control_types=list(control.control_types),
                                              condition_scales=list(control.condition_scales))
                first[id(cn)] = (control, unit)
            out.append(control)
            continue
        fused, head = first[id(cn)]
        shared = ("start", "end", "control_mode", "residual_scale", "residual_scales")
        differ = [name for name in shared if getattr(unit, name) != getattr(head, name)]
        if differ or control.cond_only != fused.cond_only:
            raise UserError(f"the units of union ControlNet {describe_controlnet(unit.controlnet)} run in one pass, "
                            f"so they need the same {', '.join(differ or ['control mode'])}; give them alike")
        fused.condition.extend(control.condition)
        fused.control_types.extend(control.control_types)
        fused.condition_scales.extend(control.condition_scales)
    return out


def _stop_if_not_finite(callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None,
                        num_steps: int) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
    """``callback`` after a check that stops the generation (:class:`UserError`) once the latents hold NaN or Inf:
    every later step would stay non-finite, and the images would come out black."""

    def check(i: int, t: torch.Tensor, latents: torch.Tensor) -> None:
        if not bool(torch.isfinite(latents).all()):
            raise UserError(f"generation stopped at step {i + 1} of {num_steps}: the latents became NaN or Inf "
                            "(an overflow: try --dtype fp32 or a smaller guidance; or non-finite weights)")
        if callback is not None:
            callback(i, t, latents)

    return check


def _checked_copy(config: GenerationConfig) -> GenerationConfig:
    """A checked copy of ``config`` (checking normalises some fields; the caller's object stays as it was)."""
    hires = dataclasses.replace(config.hires) if config.hires is not None else None
    return dataclasses.replace(config, image=dataclasses.replace(config.image), hires=hires).check()


def _check_model_settings(output_type: str, steps: int, sampler: Any, scheduler: str) -> None:
    """One-line :class:`UserError` for what only the loaded base can tell: more steps than its schedule has (the
    rest of the rules: :meth:`GenerationConfig.check`), and an unknown output type."""
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    # No more steps than the base's training schedule has timesteps (diffusers' DDIM raises; others repeat).
    limit = int(getattr(sampler.config, "num_train_timesteps", 1000))
    if steps > limit:
        raise UserError(f"steps {steps} is more than the scheduler {scheduler!r} supports for this base (its schedule "
                        f"has {limit} timesteps); give steps <= {limit}")


__all__ = ["ControlUnit", "GenerationConfig", "GenerationResult", "HiresFix", "ImageToImage", "OUTPUT_TYPES", "Pipeline"]
