"""The base model as practitioners have it: LoRAs, textual-inversion embeddings, another VAE, clip skip, A1111
prompts, and the memory and speed options, on a :class:`~controlnet.pipeline.Pipeline`.

:class:`BaseModelMixin` is mixed into the Pipeline, next to diffusers' ``TextualInversionLoaderMixin`` (which
loads the embeddings). Each piece lives in its own module and this class only wires them to the Pipeline's
models:

==================  ==================================================================  ===========================
option              Pipeline                                                            module
==================  ==================================================================  ===========================
LoRA                ``load_lora(file_or_id, weight)``, ``unload_lora(name)``,           :mod:`controlnet.lora`
                    ``<lora:name:w>`` in a prompt (found under ``lora_dir``)
embedding           ``load_embedding(file, token)``                                     diffusers' loader
VAE                 ``load_vae(file_or_id)``                                            :mod:`controlnet.loading`
prompts, clip skip  ``clip_skip``; prompts in A1111's syntax, any length                 :mod:`controlnet.prompts`
offload, compile,   ``enable_offload("model" | "sequential")``, ``compile()``,          :mod:`controlnet.runtime`
channels-last,      ``use_channels_last()``, ``vae_tiling`` ("auto", "on", "off")
VAE tiling
==================  ==================================================================  ===========================
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders import TextualInversionLoaderMixin
from torch import nn

from controlnet import lora as lora_lib
from controlnet import prompts, runtime
from controlnet.defaults import FAMILY_LABELS, FamilyDefaults, family_defaults, scheduler_name
from controlnet.errors import UserError
from controlnet.loading import placement


class BaseModelMixin(TextualInversionLoaderMixin):
    """LoRA, embeddings, VAE, text conditioning and runtime options for a Pipeline (module docstring). The Pipeline
    calls :meth:`_init_base_model_options` in its constructor."""

    hf_device_map = None  # diffusers' loaders ask: no accelerate device map here

    def _init_base_model_options(self) -> None:
        self.clip_skip = 1  # A1111's count: 1 = the last layer, 2 = the penultimate
        self.variant: str | None = None  # weights variant for hub ControlNets ("fp16"), as from_pretrained got it
        self.lora_dir: Path | None = None  # where <lora:name> in a prompt is looked for
        self.vae_tiling = "auto"
        self.offload: str | None = None
        self.compiled = False
        self.channels_last = False
        self.vae_source = ""
        self._loras: dict[str, lora_lib.LoraSpec] = {}  # loaded with load_lora: name → spec (its weights)
        self._lora_files: dict[str, str] = {}  # resolved file → adapter name (prompt-tag LoRAs stay loaded)
        self.embeddings: dict[str, str] = {}  # token → file
        self._offload_hooks: list[Any] = []

    # ------------------------------------------------------------------ family defaults

    @property
    def family(self) -> str:
        """"sd1", "sd2", "sdxl", or "embedded" for the tiny model shipped in the package."""
        if getattr(self, "base", "") == "embedded":
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

    # ------------------------------------------------------------------ components (diffusers' loaders use these)

    @property
    def components(self) -> dict[str, Any]:
        """The base's models and tokenizers by diffusers' component names."""
        names = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        return {name: getattr(self, name) for name in names if getattr(self, name, None) is not None}

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
        with self._offload_paused():
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

    def end_generation(self) -> None:
        """After a generation: only the loaded LoRAs act again, and offloaded models go back to the CPU."""
        self.activate_loras({})
        self.release_offloaded()

    def prompt_loras(self, prompt: str) -> tuple[str, dict[str, tuple[float, float]]]:
        """``prompt`` without its ``<lora:name:w>`` tags, and those LoRAs (loaded from :attr:`lora_dir` on first
        use) as name → (UNet weight, text-encoder weight)."""
        text, specs = lora_lib.split_prompt_loras(prompt)
        return text, {self._inject_lora(spec.source, None): spec.weights for spec in specs}

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
        with torch.inference_mode(False), self._offload_paused():
            lora_lib.inject_lora(state, alphas, metadata, self._lora_models(), name)
        self._lora_files[key] = name
        return name

    # ------------------------------------------------------------------ textual inversion

    def load_embedding(self, source: str | os.PathLike, token: str | None = None) -> str:
        """Load a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds, SDXL clip_l/clip_g)
        with diffusers' loader; its token (default: A1111's rule, :func:`controlnet.embeddings.read_embedding`)
        then works in prompts. Returns the token."""
        from controlnet.embeddings import check_token, find_embedding, read_embedding

        path = find_embedding(str(source))
        token, vectors = read_embedding(path, token, self._embedding_targets())
        check_token(token, path, [self.tokenizer, self.tokenizer_2])
        with self._offload_paused():
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

    # ------------------------------------------------------------------ VAE

    def load_vae(self, source: str | os.PathLike, revision: str | None = None, variant: str | None = None) -> None:
        """Replace the base's VAE (a file, a diffusers folder or a hub id; :func:`controlnet.loading.load_vae`)."""
        from controlnet.loading import load_vae, move

        where = placement(self.vae)
        vae = load_vae(source, self.vae, where["dtype"], revision, variant)
        upcast = where["dtype"] == torch.float16 and getattr(vae.config, "force_upcast", False)
        device = self.device if runtime.is_offloaded(self.vae) else where["device"]
        self.vae = move(vae, device, torch.float32 if upcast else where["dtype"])
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae_source = str(source)
        if self.channels_last:
            runtime.to_channels_last(self.vae)
        if self.offload:
            self._reapply_offload()

    # ------------------------------------------------------------------ prompts

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

    # ------------------------------------------------------------------ memory and speed

    def enable_offload(self, mode: str | None) -> None:
        """Keep the models on the CPU and move them to :attr:`device` only to run: ``"model"`` (whole models),
        ``"sequential"`` (layer by layer) or None (off). :mod:`controlnet.runtime` has the details."""
        runtime.check_offload(mode)
        self._remove_offload()
        self.offload = mode
        if mode is not None:
            self._reapply_offload()

    # diffusers' loaders re-apply offloading with these names after they change a model.
    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> None:
        self.enable_offload("model")

    def enable_sequential_cpu_offload(self, device: str | torch.device | None = None) -> None:
        self.enable_offload("sequential")

    def release_offloaded(self) -> None:
        """Send every offloaded model back to the CPU (the end of a generation)."""
        runtime.release(self._offload_hooks)

    def _offload_chain(self) -> tuple[list[nn.Module], list[nn.Module]]:
        chain = [m for m in (self.text_encoder, self.text_encoder_2, self.unet, self.vae) if m is not None]
        return chain, list(self._controlnets.values())

    def _reapply_offload(self) -> None:
        self._remove_offload()
        chain, others = self._offload_chain()
        self._offload_hooks = runtime.add_offload_hooks(chain, others, self.offload, self.device)

    def _remove_offload(self) -> None:
        chain, others = self._offload_chain()
        offloaded = [m for m in [*chain, *others] if runtime.is_offloaded(m)]
        if offloaded:
            runtime.remove_offload_hooks(offloaded, self.device)
        self._offload_hooks = []

    @contextlib.contextmanager
    def _offload_paused(self) -> Iterator[None]:
        """Models without offload hooks while LoRA layers or embeddings are added (diffusers' loaders do the same)."""
        if not self.offload:
            yield
            return
        self._remove_offload()
        try:
            yield
        finally:
            self._reapply_offload()

    def compile(self, mode: str | None = None, backend: str = "inductor") -> None:
        """``torch.compile`` the UNet and the ControlNets (now and when loaded); the first generation compiles."""
        self.compiled = {"mode": mode, "backend": backend}
        for model in (self.unet, *self._controlnets.values()):
            runtime.compile_model(model, mode, backend)

    def use_channels_last(self) -> None:
        """The UNet's, the VAE's and the ControlNets' weights in channels-last memory format (now and when loaded)."""
        self.channels_last = True
        for model in (self.unet, self.vae, *self._controlnets.values()):
            runtime.to_channels_last(model)

    def prepare_controlnet(self, controlnet: nn.Module) -> nn.Module:
        """Apply the pipeline's runtime options to a newly loaded ControlNet."""
        if self.channels_last:
            runtime.to_channels_last(controlnet)
        if self.compiled:
            runtime.compile_model(controlnet, **self.compiled)
        if self.offload == "model":
            self._offload_hooks += runtime.add_model_hooks([controlnet], self.device)
        elif self.offload == "sequential":
            runtime.add_offload_hooks([], [controlnet], "sequential", self.device)
        return controlnet

    def configure_vae_tiling(self, width: int, height: int) -> None:
        """Tiled VAE decoding for this output size, per :attr:`vae_tiling` (:func:`controlnet.runtime.wants_tiling`)."""
        runtime.set_vae_tiling(self.vae, runtime.wants_tiling(self.vae_tiling, width, height, str(self.device)))

    # ------------------------------------------------------------------ settings

    def base_model_settings(self, active_loras: dict[str, tuple[float, float]]) -> dict[str, Any]:
        """What of this module shaped a generation (JSON-safe; for the settings and the PNG metadata)."""
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
        if self.vae_source:
            settings["vae"] = self.vae_source
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
