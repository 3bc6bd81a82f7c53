"""A Flux, SD3/SD3.5 or Qwen-Image base as its diffusers folder holds it, generating under our transformer
ControlNets.

:class:`TransformerPipeline` holds the diffusers transformer, the VAE, the text encoders (CLIP + T5, or Qwen2.5-VL,
from transformers) and the base's FlowMatchEulerDiscreteScheduler config. It encodes prompts as diffusers'
FluxPipeline / StableDiffusion3Pipeline / QwenImagePipeline do, turns each unit's condition image into what its
ControlNet takes (:meth:`TransformerPipeline.encode_condition`) and runs :func:`controlnet.flow_sampling.sample`::

    pipe = TransformerPipeline.from_pretrained("FLUX.1-dev")              # a diffusers folder or hub id
    cn = load_transformer_controlnet("FLUX.1-dev-Controlnet-Union", base=pipe.transformer)
    images = pipe("a red circle", [TransformerUnit(cn, canny, mode="canny", end=0.8)], seed=0)

:meth:`TransformerPipeline.generate` is ``controlnet generate`` 's entry: :class:`controlnet.pipeline.ControlUnit` s and
a :class:`controlnet.generation_config.GenerationConfig` (the family's defaults: :data:`FLOW_DEFAULTS`) in, a
:class:`controlnet.pipeline.GenerationResult` with its settings out, as the UNet pipeline's call.

Generation order (one generator, seeded once): the starting noise first, then the condition latents (a VAE
posterior sample each, as diffusers' pipelines draw them), so that a seed gives the same noise with or without
ControlNets. A unit that never acts (strength 0, no step in its range) is neither encoded nor run.

Text: Flux, CLIP's pooled output + T5's last hidden states (``max_sequence_length`` tokens: the family's default,
diffusers' Flux 512 / SD3 256, or the T5 tokenizer's ``model_max_length`` where shorter) with zero text position
ids; SD3, the two CLIPs' penultimate hidden states side by side, padded to T5's width and followed by T5's tokens,
and their pooled projections side by side; the negative prompt ("" by default) gives SD3's unconditional rows.
Qwen-Image: the prompt in Qwen's chat template through Qwen2.5-VL, the last hidden states of each prompt's tokens
past the template's system part, padded to the longest with a mask; under true CFG the negative prompt ("" by
default) is encoded alone, of its own length.

Latents: Flux's and SD3's VAE latents are shifted and scaled by the VAE config's two numbers; Qwen-Image's VAE
(a video VAE: frames of one image in and out) is normalised per channel by its ``latents_mean`` / ``latents_std``.
Flux and Qwen-Image pack them 2x2 into tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from controlnet import runtime
from controlnet.errors import UserError
from controlnet.flow_lora import FlowLoras
from controlnet.flow_sampling import FlowControl, FlowInpaint, FlowText, acts, flow_schedule, flux_sigmas, sample
from controlnet.devices import placement
from controlnet.generation_config import FLOW_DEFAULTS, FLOW_SIZE_MULTIPLE, GenerationConfig
from controlnet.pipeline import GenerationResult
from controlnet.transformer_controlnet import (FLUX, FLUX_LATENT_PATCH, QWEN, SD3, FluxControlNet,
                                               TransformerControlNet, check_fits, base_family, latent_image_ids,
                                               pack_latents)


# Flux's and Qwen-Image's default size: 128 latents (diffusers FluxPipeline / QwenImagePipeline
# .default_sample_size) times the VAE's 8x.
FLUX_DEFAULT_SAMPLE_SIZE = 128
# A tokenizer's model_max_length above this is no length but transformers' "no limit" sentinel (int(1e30)).
NO_TOKEN_LIMIT = 100_000
# Components of a diffusers folder (model_index.json) → whether it is a torch model, by family.
_CLIP_T5 = {"transformer": True, "vae": True, "text_encoder": True, "tokenizer": False, "text_encoder_2": True,
            "tokenizer_2": False, "text_encoder_3": True, "tokenizer_3": False}
COMPONENTS = {FLUX: _CLIP_T5, SD3: _CLIP_T5,
              QWEN: {"transformer": True, "vae": True, "text_encoder": True, "tokenizer": False}}
# What each family needs; SD3 may lack T5 (text_encoder_3: null), whose tokens are then zeros.
_CLIP_T5_REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
REQUIRED = {FLUX: _CLIP_T5_REQUIRED, SD3: _CLIP_T5_REQUIRED, QWEN: ("transformer", "vae", "text_encoder", "tokenizer")}
# Qwen-Image's prompt: Qwen's chat template, whose first 34 tokens (the system part) are dropped from the encoder's
# hidden states; at most 1024 tokens past them (diffusers QwenImagePipeline prompt_template_encode,
# prompt_template_encode_start_idx, tokenizer_max_length).
QWEN_PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
                        "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
                        "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
QWEN_TEMPLATE_TOKENS = 34
QWEN_TOKENIZER_MAX_LENGTH = 1024
OUTPUT_TYPES = ("pil", "pt", "latent")


@dataclass
class TransformerUnit:
    """One control for :class:`TransformerPipeline`: a ControlNet, its condition image, strength, step range (the
    fractions of the steps it acts in, :func:`controlnet.sampling.in_step_range`) and a union ControlNet's mode.

    ``image``: a PIL image or an (H, W, 3) array (resized to the output size), or a tensor (1, 3, H, W) in [0, 1]
    of the output size.
    """

    controlnet: TransformerControlNet
    image: Any
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: int | str | None = None


class TransformerPipeline:
    """A flow-matching transformer base (FLUX.1, SD3/SD3.5, Qwen-Image) with its VAE and text encoders (module
    docstring). Qwen-Image has one text encoder (Qwen2.5-VL) and its tokenizer: no ``text_encoder_2``."""

    def __init__(self, transformer: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any,
                 text_encoder_2: nn.Module | None = None, tokenizer_2: Any = None,
                 scheduler_config: dict[str, Any] | None = None, text_encoder_3: nn.Module | None = None,
                 tokenizer_3: Any = None):
        self.family = base_family(transformer)
        if self.family not in (FLUX, SD3, QWEN):
            raise UserError("a transformer pipeline needs a Flux, SD3 or Qwen-Image transformer, got "
                            f"{type(transformer).__name__}")
        if scheduler_config is None:
            raise UserError("a transformer pipeline needs the base's scheduler config (scheduler_config)")
        self.transformer, self.vae, self.scheduler_config = transformer, vae, dict(scheduler_config)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.defaults = FLOW_DEFAULTS[self.family]
        if self.family == QWEN:  # diffusers QwenImagePipeline: 2 ** len(vae.temperal_downsample)
            self.vae_scale_factor = 2 ** len(vae.config.temperal_downsample)
        else:
            self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_tiling = "auto"  # controlnet.runtime: "auto", "on", "off"
        self.offload: str | None = None  # controlnet.runtime: None, "model", "sequential"
        self._offload_device = torch.device("cpu")
        self._offload_hooks: list[Any] = []
        self._offloaded_controlnets: list[nn.Module] = []
        self.base = ""  # where the base came from (settings / metadata)
        self.variant: str | None = None  # weights variant for hub ControlNets, as from_pretrained got it
        self.max_pixels: int | None = None  # largest output, pixels per image (controlnet.limits)
        self._controlnets: dict[str, TransformerControlNet] = {}
        self.loras = FlowLoras(self.family, {"transformer": transformer, "text_encoder": text_encoder,
                                             "text_encoder_2": text_encoder_2}, self._offload_paused)
        self.batch_units = True  # units sharing a ControlNet: one forward (controlnet.flow_sampling.unit_residuals)
        self.compiled: dict[str, Any] | None = None  # torch.compile's arguments once compile() ran

    # ------------------------------------------------------------------------------------------- runtime

    def models(self) -> list[nn.Module]:
        """The base's models in the order a generation runs them: text encoders, transformer, VAE."""
        encoders = [self.text_encoder, self.text_encoder_2, self.text_encoder_3]
        return [m for m in encoders if m is not None] + [self.transformer, self.vae]

    def enable_offload(self, mode: str | None, device: str | torch.device = "cuda") -> None:
        """Keep the models on the CPU and run each on ``device`` (:mod:`controlnet.runtime`: "model" moves whole
        models in turn, "sequential" layer by layer; the ControlNets get their hooks when a generation first
        uses them); None: no offload, every model (and every ControlNet it offloaded) on ``device``."""
        runtime.check_offload(mode)
        offloaded = [m for m in [*self.models(), *self._offloaded_controlnets] if runtime.is_offloaded(m)]
        self._offloaded_controlnets = []
        if offloaded:
            runtime.remove_offload_hooks(offloaded, torch.device(device))
        self.offload, self._offload_device = mode, torch.device(device)
        self._offload_hooks = runtime.add_offload_hooks(self.models(), [], mode, self._offload_device) if mode else []

    def compile(self, mode: str | None = None, backend: str = "inductor") -> None:
        """``torch.compile`` the transformer and the ControlNets (those loaded now and those a generation uses
        later); the first generation compiles (:func:`controlnet.runtime.compile_model`)."""
        self.compiled = {"mode": mode, "backend": backend}
        for model in [self.transformer, *self._controlnets.values()]:
            runtime.compile_model(model, mode, backend)

    def _prepare_controlnets(self, controls: Sequence[TransformerUnit]) -> None:
        """The runtime options for the ControlNets of ``controls`` that lack them: compiled (after :meth:`compile`),
        offload hooks (with :meth:`enable_offload`)."""
        if self.compiled:
            for cn in dict.fromkeys(u.controlnet for u in controls):
                if getattr(cn, "_compiled_call_impl", None) is None:  # nn.Module.compile's mark
                    runtime.compile_model(cn, **self.compiled)
        if self.offload:
            fresh = [cn for cn in dict.fromkeys(u.controlnet for u in controls) if not runtime.is_offloaded(cn)]
            self._offloaded_controlnets += fresh
            self._offload_hooks += runtime.add_offload_hooks([], fresh, self.offload, self._offload_device)

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", revision: str | None = None,
                        variant: str | None = None) -> "TransformerPipeline":
        """A Flux, SD3 or Qwen-Image base from a diffusers folder (model_index.json + transformer/ vae/
        text_encoder*/ tokenizer*/ scheduler/) or a hub id, its models in ``dtype`` on ``device``."""
        from controlnet.devices import move
        from controlnet.hub import quiet_loading
        from controlnet.loading import FLOW_TRANSFORMERS, load_component, resolve_base

        from diffusers import DiffusionPipeline

        path = resolve_base(name, revision, variant)
        try:
            index = DiffusionPipeline.load_config(path, local_files_only=True)  # model_index.json
        except (OSError, ValueError):
            raise UserError(f"{path}: not a diffusers model folder (no model_index.json, or an unreadable one); "
                            "pass a Flux, SD3 or Qwen-Image folder") from None
        entry = index.get("transformer")
        family = FLOW_TRANSFORMERS.get(entry[-1] if isinstance(entry, list) and entry else None)
        if family is None:
            raise UserError(f"{path}: not a Flux, SD3 or Qwen-Image folder (its transformer is {entry}); pass one of "
                            "those, or use the UNet pipeline for SD1.x/SD2.x/SDXL")
        with quiet_loading():
            parts = {name: load_component(path, name, index[name], is_model, dtype, variant)
                     for name, is_model in COMPONENTS[family].items() if index.get(name) and index[name][0] is not None}
        missing = [n for n in REQUIRED[family] if n not in parts]
        if missing:
            raise UserError(f"{path}: model_index.json lists no {', '.join(missing)}; the base folder is incomplete")
        for part in parts.values():
            if isinstance(part, nn.Module):
                move(part.eval(), torch.device(device), dtype)
        pipe = cls(scheduler_config=_scheduler_config(path), **parts)
        pipe.base = str(Path(name).expanduser()) if Path(name).expanduser().exists() else str(name)
        pipe.variant = variant
        return pipe

    def load_controlnet(self, name_or_path: str | os.PathLike) -> TransformerControlNet:
        """A Flux, SD3 or Qwen-Image ControlNet by path or hub id (:func:`controlnet.loading.resolve_controlnet_source`;
        any layout :func:`controlnet.transformer_formats.load_transformer_controlnet` reads), checked against the base
        and placed like the transformer; cached by path."""
        from controlnet.hub import quiet_loading
        from controlnet.loading import resolve_controlnet_source
        from controlnet.transformer_formats import load_transformer_controlnet

        path = resolve_controlnet_source(str(name_or_path), variant=self.variant)
        if path.is_file() and path.name.startswith("diffusion_pytorch_model") and (path.parent / "config.json").is_file():
            path = path.parent  # a diffusers ControlNet repository from the hub: its config.json with the weights
        key = str(path.resolve())
        if key not in self._controlnets:
            with quiet_loading():
                self._controlnets[key] = load_transformer_controlnet(path, base=self.transformer,
                                                                     **placement(self.transformer)).eval()
        return self._controlnets[key]

    def load_lora(self, source: str | os.PathLike, weight: float = 1.0, revision: str | None = None) -> str:
        """Apply a LoRA made for this base's family (a file, a hub id, or a name under ``self.loras.lora_dir``; the
        kohya, XLabs, ai-toolkit or diffusers layout, read by diffusers' loader) with ``weight`` (its scale), to
        every generation from now on. Returns its name (:class:`controlnet.flow_lora.FlowLoras`)."""
        return self.loras.load(source, weight, revision)

    def unload_lora(self, name: str) -> None:
        """Remove the LoRA ``name`` (:meth:`load_lora` 's, or a prompt tag's) from the base."""
        self.loras.unload(name)

    @property
    def lora_dir(self) -> Path | None:
        """Where ``--lora NAME`` and ``<lora:NAME>`` prompt tags are looked for (None: nowhere)."""
        return self.loras.lora_dir

    @lora_dir.setter
    def lora_dir(self, folder: str | os.PathLike | None) -> None:
        self.loras.lora_dir = None if folder is None else Path(folder).expanduser()

    @contextlib.contextmanager
    def _offload_paused(self) -> Iterator[None]:
        """The models without offload hooks (on the offload device) while LoRA layers are added to them."""
        mode, device = self.offload, self._offload_device
        if mode:
            self.enable_offload(None, device)
        try:
            yield
        finally:
            if mode:
                self.enable_offload(mode, device)

    # ------------------------------------------------------------------------------------------- encoders

    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
                      max_sequence_length: int | None = None) -> FlowText:
        """The text conditioning of ``prompts`` (with ``negative_prompts``: SD3's [uncond, cond] rows, Qwen-Image's
        ``negative`` text), T5's part ``max_sequence_length`` tokens long (Qwen-Image: at most that many tokens;
        default :attr:`max_sequence_length`)."""
        length = max_sequence_length or self.max_sequence_length
        if self.family == QWEN:
            negative = None if negative_prompts is None else FlowText(*self._qwen_text(negative_prompts, length))
            embeds, mask = self._qwen_text(prompts, length)
            return FlowText(embeds, None, mask=mask, negative=negative)
        if self.family == FLUX:
            embeds = self._t5(list(prompts), length)
            pooled = self.text_encoder(self._ids(self.tokenizer, prompts, self.text_encoder)).pooler_output
            ids = torch.zeros(embeds.shape[1], 3)
            return FlowText(embeds, pooled, ids)
        rows = [*negative_prompts, *prompts] if negative_prompts is not None else list(prompts)
        (h1, p1), (h2, p2) = (self._clip_with_projection(tok, enc, rows) for tok, enc in
                              ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)))
        t5 = self._t5(rows, length)
        clip = torch.cat([h1, h2.to(h1)], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (N, 77, T5 width)
        return FlowText(torch.cat([clip, t5.to(clip)], dim=-2), torch.cat([p1, p2.to(p1)], dim=-1))

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens a prompt is encoded to by default: the family's (diffusers' FluxPipeline 512,
        StableDiffusion3Pipeline 256), or the T5 tokenizer's ``model_max_length`` where that is shorter (a base
        whose T5 was trained on short prompts, as the embedded tiny-flux)."""
        default = self.defaults.max_sequence_length
        if self.family == QWEN:  # diffusers' QwenImagePipeline: the tokenizer's own limit plays no part
            return default
        tokenizer = self.tokenizer_2 if self.family == FLUX else self.tokenizer_3
        limit = getattr(tokenizer, "model_max_length", None)
        if limit is None or limit > NO_TOKEN_LIMIT:
            return default
        return min(default, int(limit))

    def _ids(self, tokenizer: Any, texts: Sequence[str], encoder: nn.Module, length: int | None = None) -> torch.Tensor:
        return tokenizer(list(texts), padding="max_length", max_length=length or tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(placement(encoder)["device"])

    def _clip_with_projection(self, tokenizer: Any, encoder: nn.Module, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SD3's CLIP features: the penultimate hidden states (N, 77, D) and the pooled projection (N, P)."""
        out = encoder(self._ids(tokenizer, texts, encoder), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _qwen_text(self, texts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Qwen-Image's text (diffusers QwenImagePipeline.encode_prompt): Qwen2.5-VL's last hidden states of each
        text in :data:`QWEN_PROMPT_TEMPLATE`, its tokens past the first :data:`QWEN_TEMPLATE_TOKENS`, zero-padded to
        the longest (N, T, D) and cut to ``length`` tokens, with the mask (N, T) of real tokens (None: no padding)."""
        where = placement(self.text_encoder)
        tokens = self.tokenizer([QWEN_PROMPT_TEMPLATE.format(t) for t in texts], padding=True, truncation=True,
                                max_length=QWEN_TOKENIZER_MAX_LENGTH + QWEN_TEMPLATE_TOKENS,
                                return_tensors="pt").to(where["device"])
        hidden = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                   output_hidden_states=True).hidden_states[-1]
        rows = [h[m][QWEN_TEMPLATE_TOKENS:] for h, m in zip(hidden, tokens.attention_mask.bool())]  # (T_i, D) each
        longest = max(len(r) for r in rows)
        embeds = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, longest - len(r))) for r in rows])[:, :length]
        mask = torch.stack([(torch.arange(longest, device=hidden.device) < len(r)).long() for r in rows])[:, :length]
        return embeds, None if bool(mask.all()) else mask

    def _t5(self, texts: list[str], length: int) -> torch.Tensor:
        """T5's last hidden states (N, length, D); SD3 without T5 (text_encoder_3 None): zeros, as diffusers."""
        encoder = self.text_encoder_2 if self.family == FLUX else self.text_encoder_3
        if encoder is None:
            width = self.transformer.config.joint_attention_dim
            return torch.zeros(len(texts), length, width, **placement(self.text_encoder))
        tokenizer = self.tokenizer_2 if self.family == FLUX else self.tokenizer_3
        return encoder(self._ids(tokenizer, texts, encoder, length))[0]

    @torch.inference_mode()
    def encode_latents(self, image: torch.Tensor, generator: torch.Generator | None = None,
                       shift: bool = True) -> torch.Tensor:
        """The base's latents (B, C, h, w), float32, of ``image`` (B, 3, H, W) in [0, 1]: a sample of the VAE
        posterior (drawn from ``generator``), less the VAE's shift factor (unless ``shift`` is False), times its
        scaling factor; Qwen-Image's normalised per channel (:meth:`_latent_statistics`)."""
        vae = self.vae
        if self.family == QWEN:  # a video VAE: the image as one frame (B, 3, 1, H, W)
            posterior = vae.encode((image * 2 - 1)[:, :, None].to(**placement(vae))).latent_dist
            latents = posterior.sample(generator).float()[:, :, 0]
            mean, std = self._latent_statistics(latents)
            return (latents - mean) / std
        posterior = vae.encode((image * 2 - 1).to(**placement(vae))).latent_dist
        latents = posterior.sample(generator).float()
        return (latents - ((vae.config.shift_factor or 0.0) if shift else 0.0)) * vae.config.scaling_factor

    def encode_condition(self, image: torch.Tensor, controlnet: TransformerControlNet,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """What ``controlnet`` takes for the condition ``image`` (B, 3, H, W) in [0, 1]: pixels for XLabs' hint
        encoder; an inpainting ControlNet's masked image and mask (:meth:`encode_inpaint_condition`; masked pixels
        -1 in ``image``); otherwise :meth:`encode_latents` (InstantX SD3 ControlNets,
        ``force_zeros_for_pooled_projection``, were trained without the shift, as diffusers' pipeline encodes for
        them), packed for Flux and Qwen-Image."""
        if isinstance(controlnet, FluxControlNet) and controlnet.input_hint_block is not None:
            return image
        if inpaint_channels(controlnet):
            return self.encode_inpaint_condition(image, controlnet, generator)
        if self.family in (FLUX, QWEN):
            return pack_latents(self.encode_latents(image, generator))
        return self.encode_latents(image, generator, shift=not controlnet.config.force_zeros_for_pooled_projection)

    def encode_inpaint_condition(self, image: torch.Tensor, controlnet: TransformerControlNet,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
        """An inpainting ControlNet's condition (alimama's SD3, InstantX's Qwen-Image) from ``image`` (B, 3, H, W),
        [0, 1] with the masked pixels -1 (the ``inpaint`` annotator's condition), as diffusers'
        ``prepare_image_with_mask`` builds it: the masked image (masked pixels -1 in [-1, 1]) as the base's latents
        (:meth:`encode_latents`, SD3's with the shift), then 1 - mask at the latents' size (nearest) as one more
        channel; packed 2x2 for Qwen-Image (16 + 1 channels -> 68 features)."""
        expected = {SD3: 1, QWEN: FLUX_LATENT_PATCH**2}.get(self.family)  # one mask channel (Qwen: packed 2x2)
        if inpaint_channels(controlnet) != expected:
            raise UserError(f"this {self.defaults.label} ControlNet takes {inpaint_channels(controlnet)} extra "
                            "condition channels, which no inpainting ControlNet format of this base has")
        masked = (image < 0).any(dim=1, keepdim=True)  # (B, 1, H, W): the inpaint annotator's -1 pixels
        if not masked.any():
            raise UserError("this ControlNet is an inpainting one: its condition needs a mask; give --annotator "
                            "inpaint --annotator-param mask=MASK.png (white = repaint)")
        latents = self.encode_latents(torch.where(masked, 0.0, image.clamp(0, 1)), generator)  # masked: -1
        keep = 1 - torch.nn.functional.interpolate(masked.float(), size=latents.shape[-2:])  # nearest, as diffusers
        condition = torch.cat([latents, keep.to(latents)], dim=1)  # (B, C + 1, h, w)
        return pack_latents(condition) if self.family == QWEN else condition

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen-Image's per-channel latent mean and std (:func:`qwen_latent_statistics`), as ``like``."""
        mean, std = qwen_latent_statistics(self.vae.config)
        return mean.to(like), std.to(like)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] from the sampler's latents (Flux, Qwen-Image: packed tokens)."""
        vae = self.vae
        if self.family in (FLUX, QWEN):
            latents = unpack_latents(latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        where = placement(vae)
        runtime.set_vae_tiling(vae, runtime.wants_tiling(self.vae_tiling, width, height, where["device"].type))
        if self.family == QWEN:
            mean, std = self._latent_statistics(latents)
            image = vae.decode((latents * std + mean)[:, :, None].to(**where)).sample[:, :, 0].float()
            return (image / 2 + 0.5).clamp(0, 1)
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        image = vae.decode(latents.to(**where)).sample.float()
        return (image / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------------------------------- generation

    def check_size(self, height: int, width: int) -> None:
        """Refuse, in one line, a size the latents cannot tile (Flux: VAE factor x 2x2 packing; SD3, Qwen-Image:
        x patch)."""
        patch = FLUX_LATENT_PATCH if self.family == FLUX else self.transformer.config.patch_size
        step = self.vae_scale_factor * patch
        if height <= 0 or width <= 0 or height % step or width % step:
            raise UserError(f"image size {width}x{height} does not fit this {self.defaults.label} base; use a width "
                            f"and height divisible by {step}")

    def __call__(self, prompt: str | Sequence[str], controls: Sequence[TransformerUnit] = (), *,
                 height: int | None = None, width: int | None = None, steps: int | None = None,
                 guidance: float | None = None, negative_prompt: str | Sequence[str] = "", seed: int | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 init_image: Any = None, image_latents: torch.Tensor | None = None, denoise: float = 1.0,
                 mask: Any = None, mask_blur: float = 0.0, max_sequence_length: int | None = None,
                 output_type: str = "pil", progress: bool = False,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> Any:
        """Text-to-image (or image-to-image from ``init_image``) under ``controls``; returns PIL images ("pil"), a
        (B, 3, H, W) tensor in [0, 1] ("pt") or the final latents ("latent"; Flux: packed tokens, as diffusers'
        ``output_type="latent"``).

        ``guidance``: Flux's distilled guidance scale (default 3.5), SD3's CFG weight (default 7.0) or Qwen-Image's
        true CFG weight (default 4.0; the negative prompt's pass, :func:`controlnet.flow_sampling.qwen_velocity`).
        The size defaults to the first condition image's (or ``init_image``'s), else the base's default. ``latents``: the
        noise (B, C, h, w) instead of drawing it from ``generator`` / ``seed``. ``denoise``: with ``init_image``,
        the last round(denoise * steps) steps run, from the image's latents noised to their first sigma
        (diffusers' ``scale_noise``); the units' step ranges are fractions of the steps that run. ``image_latents``:
        the picture as the base's latents (B, C, h, w) (Flux's and Qwen-Image's unpacked) instead of ``init_image``
        (the hires pass's upscaled latents), noised the same way; the size defaults to theirs. ``mask``: inpaint
        ``init_image`` where the mask (of the output size: a PIL image, an (H, W) array, white / True / > 0.5 =
        repaint, or a (1, 1, H, W) tensor) is set (:class:`controlnet.flow_sampling.FlowInpaint`); images (not
        latents) come back with the unmasked pixels pasted back through the mask feathered over ``mask_blur`` px
        (:func:`controlnet.img2img.feather`). ``callback(i, t, latents)`` runs after every step.
        """
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"unknown output type {output_type!r}; use one of {', '.join(OUTPUT_TYPES)}")
        if mask is not None and init_image is None:
            raise UserError("a mask needs an init image to inpaint; pass init_image (--init-image IMG)")
        if image_latents is not None:
            if init_image is not None:
                raise UserError("give init_image or image_latents, not both")
            height = height or image_latents.shape[-2] * self.vae_scale_factor
            width = width or image_latents.shape[-1] * self.vae_scale_factor
        if not 0.0 < denoise <= 1.0:
            raise UserError(f"denoise must be in (0, 1], got {denoise}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = steps or self.defaults.steps
        guidance = self.defaults.guidance if guidance is None else float(guidance)
        height, width = self._size([u.image for u in controls] + [init_image], height, width)
        for unit in controls:
            check_fits(unit.controlnet, self.transformer)
            if unit.mode is not None and not getattr(unit.controlnet.config, "num_mode", None):
                raise UserError(f"a control mode ({unit.mode}) was given for a ControlNet that is not a union "
                                "ControlNet; give modes to union ControlNets only")
        if generator is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
        negatives = None
        if self.family in (SD3, QWEN) and guidance > 1.0:  # CFG: SD3's negative rows first, Qwen-Image's own text
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        self._prepare_controlnets(controls)
        try:
            text = self.encode_prompt(prompts, negatives, max_sequence_length)
            noise = self._noise(len(prompts), height, width, generator, latents)
            schedule, timesteps = self.schedule(steps, height, width)
            inpaint = None
            if init_image is not None or image_latents is not None:
                noise, schedule, timesteps, inpaint = self._image_start(init_image, mask, noise, schedule, timesteps,
                                                                        denoise, generator, image_latents)
            n = len(timesteps)
            # A unit that never acts (strength 0, or no step in its range) is not encoded, nor run.
            flow_controls = [self._flow_control(u, height, width, generator) for u in controls
                             if any(acts(u.strength, u.start, u.end, i, n) for i in range(n))]
            h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
            packed = self.family in (FLUX, QWEN)
            out = sample(self.transformer, pack_latents(noise) if packed else noise, schedule, timesteps, text,
                         flow_controls, guidance, img_ids=latent_image_ids(h // 2, w // 2) if packed else None,
                         inpaint=inpaint, progress=progress, callback=callback, batch_units=self.batch_units)
            if output_type == "latent":
                return out
            images = self.decode(out, height, width)
            if mask is not None:  # the unmasked pixels pasted back through the feathered mask
                from controlnet.img2img import feather

                weight = torch.from_numpy(feather(_mask_array(mask, height, width), mask_blur)).to(images)
                images = condition_tensor(init_image, height, width).to(images) * (1 - weight) + images * weight
            return images if output_type == "pt" else [_to_pil(im) for im in images]
        finally:
            runtime.release(self._offload_hooks)  # offloaded models back to the CPU

    def _image_start(self, init_image: Any, mask: Any, noise: torch.Tensor, schedule: torch.Tensor,
                     timesteps: torch.Tensor, denoise: float, generator: torch.Generator | None,
                     image_latents: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, FlowInpaint | None]:
        """Image-to-image: the starting latents (the picture's latents, ``image_latents`` or a posterior sample of
        ``init_image`` drawn after the noise, noised to the first sigma that runs), the sigmas and timesteps that
        run, and with a mask the known region (for Flux and Qwen-Image packed like the image tokens; the starting latents are returned unpacked)."""
        from controlnet.img2img import latent_mask

        steps = len(timesteps)
        height, width = (side * self.vae_scale_factor for side in noise.shape[-2:])
        first = steps - min(round_half_up(denoise * steps), steps)  # as controlnet.img2img.img2img_timesteps
        if first == steps:
            raise UserError(f"denoise {denoise} runs no step of {steps}; raise --denoise or --steps")
        masked = None if mask is None else _mask_array(mask, height, width)
        if image_latents is None:
            image = self.encode_latents(condition_tensor(init_image, height, width), generator).expand_as(noise)
        elif tuple(image_latents.shape) != tuple(noise.shape):
            raise UserError(f"the image latents are {list(image_latents.shape)}; this size needs {list(noise.shape)}")
        else:
            image = image_latents.to(noise)
        start = schedule[first] * noise + (1 - schedule[first]) * image  # the forward flow to sigma_first
        inpaint = None
        if masked is not None:
            m = latent_mask(masked, self.vae_scale_factor).repeat(noise.shape[0], noise.shape[1], 1, 1)  # (B, C, h, w)
            pack = pack_latents if self.family in (FLUX, QWEN) else (lambda x: x)
            inpaint = FlowInpaint(pack(image.contiguous()), pack(noise), pack(m))
        return start, schedule[first:], timesteps[first:], inpaint

    def schedule(self, steps: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sigmas (steps + 1) and timesteps (steps) of a generation at this size (the shift ``mu`` depends
        on the number of image tokens)."""
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        if self.family in (FLUX, QWEN):  # diffusers QwenImagePipeline spaces its sigmas as FluxPipeline
            return flow_schedule(self.scheduler_config, steps, (h // 2) * (w // 2), flux_sigmas(steps))
        patch = self.transformer.config.patch_size
        return flow_schedule(self.scheduler_config, steps, (h // patch) * (w // patch))

    def _size(self, images: Sequence[Any], height: int | None, width: int | None) -> tuple[int, int]:
        """The output size: as given, else the first image's (condition or init image), else the base's default."""
        first = next((im for im in images if im is not None), None)
        if (height is None or width is None) and first is not None:
            h0, w0 = first.shape[-2:] if torch.is_tensor(first) else _pil(first).size[::-1]
            height, width = height or h0, width or w0
        height, width = int(height or self.default_size), int(width or self.default_size)
        self.check_size(height, width)
        return height, width

    def _noise(self, batch: int, height: int, width: int, generator: torch.Generator | None,
               latents: torch.Tensor | None) -> torch.Tensor:
        """The starting noise (B, C, h, w), float32: ``latents`` as given, or drawn from ``generator``."""
        from diffusers.utils.torch_utils import randn_tensor

        channels = self.vae.config.z_dim if self.family == QWEN else self.vae.config.latent_channels
        shape = (batch, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise UserError(f"the starting latents are {list(latents.shape)}; this size needs {list(shape)}")
            return latents.float()
        return randn_tensor(shape, generator=generator, dtype=torch.float32)

    # ------------------------------------------------------------------------------------------- GenerationConfig

    def generate(self, prompt: str, controls: Sequence[Any] = (), config: GenerationConfig | None = None, *,
                 progress: bool = True,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> GenerationResult:
        """``controlnet generate`` on this base: ``controls`` are :class:`controlnet.pipeline.ControlUnit` s (a
        ControlNet path or hub id, a condition image, its annotator; a union ControlNet's mode as its
        ``control_type``), ``config`` a :class:`GenerationConfig` (checked with this family's rules and defaults).

        As on UNet bases: the conditions are resized by "cover, then centre-crop" (and annotated), image k uses
        seed + k, the init image is fitted to the output size, and the result carries the settings that reproduce
        it; ``latents`` are (B, C, h, w) (Flux's and Qwen-Image's tokens unpacked). With a mask: inpainting (the
        unmasked pixels pasted back through the feathered mask; ``inpaint_full_res``: the mask's box, generated at the given size or
        with its short side at the base's native size, then pasted into the picture). ``callback(i, t, latents)``
        runs after every step, ``i`` counting on across the images (one sampling run per image). With ``hires``:
        the hires fix (:meth:`_hires_pass`), the settings' size the first pass's and their hires block the
        output's."""
        from PIL import Image

        from controlnet.conditions import condition_to_pil, prepare_condition
        from controlnet.devices import DTYPE_NAMES
        from controlnet.img2img import load_source, only_masked, paste_back_all
        from controlnet.limits import check_output_size
        from controlnet.settings import unit_settings

        config = config or GenerationConfig()  # a checked copy: the caller's object stays as it was
        config = dataclasses.replace(config, image=dataclasses.replace(config.image)).check(self.family)
        seed = random.SystemRandom().randrange(2**31) if config.seed is None else config.seed
        image = config.image
        source = None
        if image.init_image is not None:
            source = load_source(image.init_image, image.mask, image.mask_invert)
        whole, box, cropped = source, None, list(controls)
        if source is not None and image.inpaint_full_res:  # "only masked": the mask's box, its conditions cut
            source, (width, height), box, cropped = only_masked(
                source, image.inpaint_padding, cropped, lambda area: self._full_res_size(config.size, area))
        else:
            width, height = self.output_size(config.size, controls, source)
        check_output_size(width, height, self.max_pixels, device=str(placement(self.transformer)["device"]),
                          what="output size")
        conditions = [prepare_condition(u.image, width, height, u.annotator, u.annotator_params) for u in cropped]
        units = [self._unit(u, condition, j) for j, (u, condition) in enumerate(zip(cropped, conditions))]
        source = None if source is None else source.fit(width, height)
        init = None if source is None else torch.from_numpy(source.image).permute(2, 0, 1)[None] / 255.0
        text, active_loras = self.loras.apply_prompt(prompt)  # <lora:name:w> tags out of the text, their LoRAs on
        counter = itertools.count()
        step_callback = None if callback is None else (lambda i, t, x: callback(next(counter), t, x))
        generators = [torch.Generator().manual_seed(seed + k) for k in range(config.num_images)]
        outputs = [self(text, units, height=height, width=width, steps=config.steps, guidance=config.guidance,
                        negative_prompt=config.negative_prompt, generator=generator, init_image=init,
                        mask=None if source is None else source.mask, denoise=image.strength, output_type="latent",
                        progress=progress, callback=step_callback)
                   for generator in generators]  # one at a time: image k alone is seed + k's
        first_pass = (width, height)
        if config.hires is not None:
            outputs, (width, height), conditions = self._hires_pass(text, controls, config, outputs, first_pass,
                                                                    generators, progress, step_callback)
        arrays = [np.asarray(_to_pil(self.decode(out, height, width)[0])) for out in outputs]
        if source is not None and source.mask is not None:  # the unmasked pixels pasted back
            arrays = paste_back_all(arrays, source, image.mask_blur, whole, box)
        images = [Image.fromarray(a) for a in arrays]
        latents = torch.cat(outputs)
        if self.family in (FLUX, QWEN):
            latents = unpack_latents(latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        hires = None if config.hires is None else dataclasses.replace(config.hires,
                                                                      steps=config.hires.steps or config.steps)
        used = dataclasses.replace(config, seed=seed, size=first_pass, hires=hires,
                                   image=dataclasses.replace(image, denoise=image.strength) if source else image)
        settings = {"prompt": prompt, **used.to_settings(), "seeds": [seed + k for k in range(used.num_images)],
                    "dtype": DTYPE_NAMES.get(placement(self.transformer)["dtype"], ""), "base": self.base,
                    "controlnets": unit_settings(controls), **self.loras.settings(active_loras)}
        if hires is not None:
            settings["hires"]["size"] = f"{width}x{height}"  # the output's; "size" is the first pass's
        self.loras.activate({})  # only the loaded LoRAs act again (the prompt's off)
        return GenerationResult(images, latents.cpu(), [condition_to_pil(c) for c in conditions], seed, settings)

    def _hires_pass(self, prompt: str, controls: Sequence[Any], config: GenerationConfig,
                    first: Sequence[torch.Tensor], first_size: tuple[int, int], generators: Sequence[torch.Generator],
                    progress: bool, callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None
                    ) -> tuple[list[torch.Tensor], tuple[int, int], list[np.ndarray]]:
        """The hires fix's second pass (A1111's, as on UNet bases): each first-pass result (sampler latents of
        ``first_size``) upscaled by ``config.hires.scale`` (sides rounded to multiples of 16) with its upscaler, then
        image-to-image of ``hires.denoise`` over ``hires.steps`` (default: the generation's) from it, its noise
        drawn from the image's generator as it stands, the units' conditions prepared again at the larger size.
        Returns the final latents, the size (width, height) and the conditions."""
        from controlnet.conditions import prepare_condition, round_size
        from controlnet.limits import check_output_size

        hires, (width, height) = config.hires, first_size
        new_width, new_height = round_size(width * hires.scale, height * hires.scale, FLOW_SIZE_MULTIPLE)
        check_output_size(new_width, new_height, self.max_pixels, device=str(placement(self.transformer)["device"]),
                          what="hires size")
        self.check_size(new_height, new_width)
        conditions = [prepare_condition(u.image, new_width, new_height, u.annotator, u.annotator_params)
                      for u in controls]
        units = [self._unit(u, condition, j) for j, (u, condition) in enumerate(zip(controls, conditions))]
        outputs = [self(prompt, units, height=new_height, width=new_width, steps=hires.steps or config.steps,
                        guidance=config.guidance, negative_prompt=config.negative_prompt, generator=generator,
                        denoise=hires.denoise, output_type="latent", progress=progress, callback=callback,
                        **self.hires_start(latents, hires.upscaler, first_size, (new_width, new_height)))
                   for latents, generator in zip(first, generators)]
        return outputs, (new_width, new_height), conditions

    def hires_start(self, latents: torch.Tensor, upscaler: str, size: tuple[int, int],
                    new_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The picture the hires pass starts from, as :meth:`__call__` 's keyword: the sampler's ``latents`` of
        ``size`` (width, height) upscaled to ``new_size``. "latent": the latents (B, C, h, w) interpolated
        (``image_latents``); "lanczos": the decoded pictures resized (``init_image``, encoded by the pass)."""
        from controlnet.img2img import interpolate_latents, resize_pictures

        (width, height), (new_width, new_height) = size, new_size
        if upscaler == "latent":
            grid = latents
            if self.family in (FLUX, QWEN):
                grid = unpack_latents(latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
            return {"image_latents": interpolate_latents(grid, new_width, new_height, self.vae_scale_factor)}
        pictures = resize_pictures([np.asarray(_to_pil(im)) for im in self.decode(latents, height, width)],
                                   new_width, new_height)
        return {"init_image": torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous() / 255.0}

    def output_size(self, size: tuple[int, int] | None, controls: Sequence[Any] = (),
                    source: Any = None) -> tuple[int, int]:
        """(width, height): ``size`` as given (multiples of 16: :meth:`GenerationConfig.check`); else the init
        image's size, or the first condition's aspect ratio with its short side at the base's default size (as
        on UNet bases), rounded to multiples of 16; else the base's default square."""
        from controlnet.conditions import round_size, to_condition_array

        if size is not None:
            width, height = size
        elif source is not None:
            width, height = round_size(*source.size, FLOW_SIZE_MULTIPLE)
        elif controls:
            h, w = to_condition_array(controls[0].image).shape[:2]
            scale = self.default_size / min(h, w)
            width, height = round_size(w * scale, h * scale, FLOW_SIZE_MULTIPLE)
        else:
            width = height = self.default_size
        self.check_size(height, width)
        return width, height

    def _full_res_size(self, size: tuple[int, int] | None, area: np.ndarray) -> tuple[int, int]:
        """(width, height) of an "only masked" generation of ``area`` (an array of the box's shape): ``size``, else
        the box's aspect ratio with its short side at :attr:`native_size` (as on UNet bases)."""
        from controlnet.conditions import round_size

        if size is None:
            h, w = area.shape[:2]
            scale = self.native_size / min(h, w)
            size = round_size(w * scale, h * scale, FLOW_SIZE_MULTIPLE)
        return self.output_size(size)

    @property
    def native_size(self) -> int:
        """The base's training size in pixels: the transformer's sample size x the VAE's factor (SD3: 1024), or
        for Flux and Qwen-Image, whose transformer configs have none, the size the VAE config names (FLUX.1: 1024;
        the embedded tiny-flux: 128), else :attr:`default_size` (Qwen-Image: 1024)."""
        latent = getattr(self.transformer.config, "sample_size", None)
        if latent:
            return int(latent) * self.vae_scale_factor
        return int(getattr(self.vae.config, "sample_size", None) or self.default_size)

    @property
    def default_size(self) -> int:
        """The base's default side in pixels (diffusers' pipelines: Flux and Qwen-Image 1024, SD3 its sample size
        x 8)."""
        latent = self.transformer.config.sample_size if self.family == SD3 else FLUX_DEFAULT_SAMPLE_SIZE
        return int(latent) * self.vae_scale_factor

    def _unit(self, unit: Any, condition: Any, index: int) -> TransformerUnit:
        """The :class:`TransformerUnit` of a ControlUnit and its prepared condition (H, W, 3) in [0, 1] (an
        inpainting ControlNet's masked pixels kept at -1): its ControlNet loaded, a union ControlNet's mode checked
        (one line naming the modes)."""
        from controlnet.annotators.transforms import INPAINT_MASKED_VALUE
        from controlnet.transformer_controlnet import FLUX_UNION_MODES, union_mode_index

        if unit.control_mode != "balanced":
            raise UserError(f"ControlNet {index + 1}: --control-mode {unit.control_mode} is for UNet bases; drop it "
                            f"on this {self.defaults.label} base")
        if unit.residual_scales is not None or unit.residual_scale != 1.0:
            raise UserError(f"ControlNet {index + 1}: residual scales are for UNet ControlNets; on this "
                            f"{self.defaults.label} base give --strength")
        cn = self.load_controlnet(unit.controlnet)
        mode = unit.control_type
        num_mode = getattr(cn.config, "num_mode", None)
        if num_mode and mode is None:
            raise UserError(f"ControlNet {index + 1} is a union ControlNet: give --control-type, one of "
                            f"{', '.join(FLUX_UNION_MODES)}")
        if num_mode:
            union_mode_index(mode, num_mode)  # an unknown name: one line naming the modes
        hint = torch.from_numpy(condition)  # (H, W, 3)
        if inpaint_channels(cn):  # the inpaint annotator's masked pixels kept: they are the mask
            hint = torch.where(hint == INPAINT_MASKED_VALUE, hint, hint.clamp(0, 1))
        else:
            hint = hint.clamp(0, 1)
        hint = hint.permute(2, 0, 1)[None]  # (1, 3, H, W)
        return TransformerUnit(cn, hint, unit.strength, unit.start, unit.end, mode)

    def _flow_control(self, unit: TransformerUnit, height: int, width: int,
                      generator: torch.Generator | None) -> FlowControl:
        image = condition_tensor(unit.image, height, width)
        return FlowControl(unit.controlnet, self.encode_condition(image, unit.controlnet, generator),
                           strength=unit.strength, start=unit.start, end=unit.end, mode=unit.mode)


def qwen_latent_statistics(vae_config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-Image's per-channel latent mean and std (C, 1, 1), float32, from its VAE config (``latents_mean``,
    ``latents_std``): its latents are (z - mean) / std."""
    c = vae_config
    mean, std = (torch.tensor(v, dtype=torch.float32).view(c.z_dim, 1, 1) for v in (c.latents_mean, c.latents_std))
    return mean, std


def inpaint_channels(controlnet: TransformerControlNet) -> int:
    """The condition channels an inpainting ControlNet takes beyond the latents' (SD3's
    ``extra_conditioning_channels``, Qwen-Image's ``extra_condition_channels``); 0 for the others."""
    config = controlnet.config
    return getattr(config, "extra_conditioning_channels", 0) or getattr(config, "extra_condition_channels", 0)


def condition_tensor(image: Any, height: int, width: int) -> torch.Tensor:
    """A condition image as a (B, 3, height, width) float32 tensor in [0, 1]: tensors as given (their size must be
    the output's), PIL images and arrays resized (diffusers' VaeImageProcessor: Lanczos)."""
    from diffusers.image_processor import VaeImageProcessor

    if torch.is_tensor(image):
        tensor = image if image.ndim == 4 else image[None]
        if tuple(tensor.shape[-2:]) != (height, width):
            raise UserError(f"the condition is {tensor.shape[-1]}x{tensor.shape[-2]}, the image {width}x{height}; "
                            "give a condition of the image's size")
        return tensor.float()
    processor = VaeImageProcessor(do_normalize=False)
    return processor.preprocess(_pil(image), height=height, width=width).float()


def _mask_array(mask: Any, height: int, width: int) -> np.ndarray:
    """An inpainting mask as a (height, width) bool array, True = repaint (one line for another size)."""
    from controlnet.annotators.inputs import load_mask

    if torch.is_tensor(mask):
        mask = mask.detach().float().cpu().numpy().reshape(mask.shape[-2:])
    return load_mask(mask, (height, width), name="mask")


def flow_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """The dtype of a Flux, SD3 or Qwen-Image base: as given; "auto"/None: bf16 on CUDA (fp16 overflows T5's and
    FLUX.1's activations; their model cards, and Qwen-Image's, load them in bfloat16), else the device's default
    (:func:`controlnet.devices.default_dtype`)."""
    from controlnet.devices import resolve_dtype

    if (dtype is None or dtype == "auto") and torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return resolve_dtype(dtype, device)


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def unpack_latents(tokens: torch.Tensor, height: int, width: int, patch: int = FLUX_LATENT_PATCH) -> torch.Tensor:
    """(B, h/p * w/p, C*p*p) tokens → (B, C, h, w) latents: the inverse of ``pack_latents`` (diffusers
    FluxPipeline._unpack_latents), for latents of ``height`` x ``width``."""
    b, _, features = tokens.shape
    c = features // (patch * patch)
    x = tokens.view(b, height // patch, width // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def _pil(image: Any) -> Any:
    from PIL import Image

    from controlnet.images import load_image

    return image if isinstance(image, Image.Image) else Image.fromarray(load_image(image))


def _to_pil(image: torch.Tensor) -> Any:
    from PIL import Image

    return Image.fromarray((image.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8"))


def _scheduler_config(path: Path) -> dict[str, Any]:
    """The base's FlowMatchEulerDiscreteScheduler config (scheduler/scheduler_config.json)."""
    file = path / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{file}: unreadable ({err}); the base model folder is incomplete or damaged") from None
