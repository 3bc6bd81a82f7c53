"""The text side of a generation: prompts in A1111's syntax, clip skip, LoRAs and textual-inversion embeddings.

:class:`TextConditioner` is the part of :class:`controlnet.pipeline.Pipeline` that turns a prompt into the
sampler's text input. It holds the text encoder(s) and tokenizer(s), and the UNet only to put LoRA layers into it
(a LoRA changes the UNet and the text encoders together). Each piece lives in its own module and this class wires
them to the models:

==================  ==================================================================  ===========================
option              TextConditioner                                                     module
==================  ==================================================================  ===========================
LoRA                ``load_lora(file_or_id, weight)``, ``unload_lora(name)``,           :mod:`controlnet.lora`
                    ``<lora:name:w>`` in a prompt (found under ``lora_dir``)
embedding           ``load_embedding(file, token)``                                     diffusers' loader
prompts, clip skip  ``clip_skip``; prompts in A1111's syntax, any length                 :mod:`controlnet.prompts`
==================  ==================================================================  ===========================

Embeddings load through diffusers' ``TextualInversionLoaderMixin`` (its ``load_textual_inversion`` and
``maybe_convert_prompt``), which reads the encoders from this object's attributes.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ContextManager

import torch
from diffusers.loaders import TextualInversionLoaderMixin
from torch import nn

from controlnet import lora as lora_lib
from controlnet import prompts
from controlnet.defaults import FAMILY_LABELS
from controlnet.errors import UserError
from controlnet.devices import placement


class TextConditioner(TextualInversionLoaderMixin):
    """Prompts → text embeddings, with clip skip, LoRAs and embeddings (module docstring).

    ``paused``: a context in which the models carry no offload hooks (the pipeline's runtime gives it; LoRA layers
    and embeddings are added inside it). ``sdxl``: the UNet takes SDXL's added conditions (pooled text, sizes).
    """

    hf_device_map = None  # diffusers' loader asks: no accelerate device map here

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokenizer: Any, text_encoder_2: nn.Module | None,
                 tokenizer_2: Any | None, device: torch.device, dtype: torch.dtype, sdxl: bool,
                 paused: Callable[[], ContextManager[None]] = contextlib.nullcontext):
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.device, self.dtype, self.is_sdxl = device, dtype, sdxl
        self._paused = paused
        self.clip_skip = 1  # A1111's count: 1 = the last layer, 2 = the penultimate
        self.lora_dir: Path | None = None  # where <lora:name> in a prompt is looked for
        self._loras: dict[str, lora_lib.LoraSpec] = {}  # loaded with load_lora: name → spec (its weights)
        self._lora_files: dict[str, str] = {}  # resolved file → adapter name (prompt-tag LoRAs stay loaded)
        self.embeddings: dict[str, str] = {}  # token → file

    @property
    def components(self) -> dict[str, Any]:
        """The text models and tokenizers by diffusers' component names (diffusers' loader reads them)."""
        names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def _lora_models(self) -> dict[str, nn.Module | None]:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    # ------------------------------------------------------------------ LoRA

    @property
    def loras(self) -> dict[str, tuple[float, float]]:
        """The LoRAs loaded with :meth:`load_lora`: name → (UNet weight, text-encoder weight)."""
        return {name: spec.weights for name, spec in self._loras.items()}

    def load_lora(self, source: str | os.PathLike, weight: float = 1.0, text_weight: float | None = None,
                  revision: str | None = None) -> str:
        """Apply a LoRA (a file, a hub id, or a name under :attr:`lora_dir`; kohya/A1111 or diffusers/peft
        layout) with ``weight`` on the UNet and ``text_weight`` (default: ``weight``) on the text encoder(s).
        Loading the same file again only changes its weights. Returns its name (for :meth:`unload_lora`)."""
        name = self._inject_lora(str(source), revision)
        self._loras[name] = lora_lib.LoraSpec(str(source), float(weight), None if text_weight is None else float(text_weight))
        self.activate_loras({})
        return name

    def unload_lora(self, name: str) -> None:
        """Take LoRA ``name`` out of the models (the base is as before it was loaded)."""
        if name not in self._lora_files.values():
            raise UserError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self._lora_files.values()) or 'none'})")
        with self._paused():
            lora_lib.remove(self._lora_models(), name)
        self._loras.pop(name, None)
        self._lora_files = {f: n for f, n in self._lora_files.items() if n != name}
        self.activate_loras({})  # peft makes a remaining adapter active after a deletion: set them all again

    def activate_loras(self, extra: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        """Make the loaded LoRAs plus ``extra`` (name → weights, e.g. from prompt tags, which win) act; returns
        what acts."""
        active = {**self.loras, **extra}
        # peft sets requires_grad on the adapters it turns on, which torch allows on tensors made in inference mode
        # (sequential offload re-creates the weights during a generation) only inside inference mode.
        with torch.inference_mode():
            lora_lib.activate(self._lora_models(), active)
        return active

    def apply_prompt_loras(self, prompt: str) -> tuple[str, dict[str, tuple[float, float]]]:
        """Make the loaded LoRAs and those of ``prompt``'s tags act (:meth:`prompt_loras`); returns the prompt
        without its tags and what acts."""
        text, extra = self.prompt_loras(prompt)
        return text, self.activate_loras(extra)

    def prompt_loras(self, prompt: str) -> tuple[str, dict[str, tuple[float, float]]]:
        """``prompt`` without its ``<lora:name:w>`` tags, and those LoRAs (loaded from :attr:`lora_dir` on first
        use) as name → (UNet weight, text-encoder weight)."""
        text, specs = lora_lib.split_prompt_loras(prompt)
        files = [str(lora_lib.find_tag_lora(spec.source, self.lora_dir)) for spec in specs]  # names in lora_dir only
        return text, {self._inject_lora(file, None): spec.weights for file, spec in zip(files, specs)}

    def _inject_lora(self, source: str, revision: str | None) -> str:
        """The adapter name of LoRA ``source``, loading it into the models first if it is new."""
        path = lora_lib.find_lora(source, self.lora_dir, revision)
        key = str(path.resolve())
        if key in self._lora_files:
            return self._lora_files[key]
        from controlnet.checkpoints import detect_family

        lora_lib.require_peft()
        state, alphas, metadata = lora_lib.read_lora(path, self.unet)
        family = FAMILY_LABELS[detect_family(self.unet)]  # the architecture's family (the embedded model: SD1.x)
        lora_lib.check_lora_fits(state, self._lora_models(), str(source), family)
        name = lora_lib.adapter_name(path, {n: None for n in self._lora_files.values()})
        # New parameters must be ordinary tensors even when a generation (inference mode) loads a prompt's LoRA.
        with torch.inference_mode(False), self._paused():
            lora_lib.inject_lora(state, alphas, metadata, self._lora_models(), name)
        self._lora_files[key] = name
        return name

    def load_embedding(self, source: str | os.PathLike, token: str | None = None) -> str:
        """Load a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds, SDXL clip_l/clip_g)
        with diffusers' loader; its token (default: A1111's rule, :func:`controlnet.embeddings.read_embedding`)
        then works in prompts. Returns the token."""
        from controlnet.embeddings import check_token, find_embedding, read_embedding

        path = find_embedding(str(source))
        token, vectors = read_embedding(path, token, self._embedding_targets())
        check_token(token, path, [self.tokenizer, self.tokenizer_2])
        with self._paused():
            for component, tensor in vectors.items():
                tokenizer = self.tokenizer if component == "text_encoder" else self.tokenizer_2
                try:
                    self.load_textual_inversion(tensor, token=token, tokenizer=tokenizer,
                                                text_encoder=getattr(self, component))
                except ValueError as err:  # diffusers: token already there, wrong shape
                    raise UserError(f"embedding {path}: {' '.join(str(err).split())}") from None
        self.embeddings[token] = str(path)
        return token

    def _embedding_targets(self) -> dict[str, int]:
        """Text encoders an embedding can go into → their embedding width."""
        targets = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            targets["text_encoder_2"] = self.text_encoder_2
        return {name: int(enc.get_input_embeddings().weight.shape[-1]) for name, enc in targets.items()}

    def encode_weighted_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``prompt`` in A1111's syntax, any length (:mod:`controlnet.prompts`) → text embeddings ``(1, n * L, D)``
        and, for SDXL, the pooled embedding ``(1, D2)``; with :attr:`clip_skip` and the loaded embeddings."""
        encoders = [(self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            encoders.append((self.tokenizer_2, self.text_encoder_2))
        return prompts.encode_weighted(prompt, encoders, self.clip_skip, sdxl=self.text_encoder_2 is not None,
                                       convert=self.maybe_convert_prompt)

    def weighted_text_rows(self, texts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Text embeddings of several prompts padded to one length with the empty prompt's chunk (CFG rows)."""
        if len({t.shape[1] for t in texts}) == 1:
            return texts
        empty, _ = self.encode_weighted_prompt("")
        return prompts.pad_to_same_length(texts, empty)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings ``(N, L, D)`` and, for SDXL, pooled embeddings ``(N, D2)`` (as diffusers computes them:
        plain text cut at the tokenizer's length, with a warning naming what was cut; generation uses
        :meth:`encode_weighted_prompt`, which keeps everything)."""
        _warn_truncated(self.tokenizer, prompts)
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
        """The sampler's ``text`` ``(2B or B, L, D)`` ([negative, positive] rows when ``cfg``; prompts of any length
        in A1111's syntax, :meth:`encode_weighted_prompt`, the shorter padded) and, for SDXL, its
        ``added_cond_kwargs`` (pooled text and the micro-conditioning sizes)."""
        text, pooled = self.encode_weighted_prompt(prompt)  # (1, n * L, D), (1, D2) | None
        rows = [(text, pooled)]
        if cfg:
            if self.is_sdxl and not negative_prompt:  # SDXL: zeros for an empty negative prompt
                negative = (torch.zeros_like(text), torch.zeros_like(pooled) if pooled is not None else None)
            else:
                negative = self.encode_weighted_prompt(negative_prompt)
            rows.insert(0, negative)
            padded = self.weighted_text_rows([t for t, _ in rows])
            rows = [(t, p) for t, (_, p) in zip(padded, rows)]
        text = torch.cat([t.expand(num_images, -1, -1) for t, _ in rows]).to(self.device, self.dtype)
        if not self.is_sdxl:
            return text, None
        pooled = torch.cat([p.expand(num_images, -1) for _, p in rows])
        # SDXL micro-conditioning: original size, crop top-left, target size (h, w order).
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        return text, {"text_embeds": pooled.to(self.device, self.dtype), "time_ids": time_ids.repeat(text.shape[0], 1)}

    # ------------------------------------------------------------------ settings

    def settings(self, active_loras: dict[str, tuple[float, float]]) -> dict[str, Any]:
        """What of the text side shaped a generation (JSON-safe; for the settings and the PNG metadata)."""
        settings: dict[str, Any] = {}
        if active_loras:
            settings["loras"] = {name: list(w) for name, w in active_loras.items()}
        if self._loras:  # loaded with load_lora (--lora): name → [source, UNet weight, text weight]
            settings["lora_files"] = {name: [spec.source, *spec.weights] for name, spec in self._loras.items()}
        if self.lora_dir is not None:  # where the prompt's <lora:name> tags were found
            settings["lora_dir"] = str(self.lora_dir)
        if self.embeddings:
            settings["embeddings"] = dict(self.embeddings)
        if self.clip_skip != 1:
            settings["clip_skip"] = self.clip_skip
        return settings


def _warn_truncated(tokenizer: Any, texts: list[str]) -> None:
    """A warning naming what a plain tokenization cuts off ``texts``."""
    cut = [text for text in prompts.truncated_text(tokenizer, texts) if text]
    if cut:
        warnings.warn(f"prompt longer than {tokenizer.model_max_length - 2} tokens: cut {cut[0]!r}"
                      + (f" (and {len(cut) - 1} more prompts)" if len(cut) > 1 else ""), stacklevel=3)


def _tokenize(tokenizer: Any, texts: list[str], encoder: nn.Module) -> torch.Tensor:
    """Token ids ``(N, L)`` padded and cut to the tokenizer's length, on ``encoder``'s device."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(placement(encoder)["device"])
