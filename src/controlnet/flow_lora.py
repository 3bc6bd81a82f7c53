"""LoRA on a flow-matching transformer base (Flux, SD3/SD3.5, Qwen-Image), read and applied by diffusers' loaders.

Per file (:meth:`FlowLoras.load`)::

    check the file's own layers                    controlnet.lora.check_lora_layers (pairs, ranks, alphas, finite)
    refuse a LoRA of another family                by its key names (UNet blocks, Flux double/single blocks, SD3
                                                   joint blocks, Qwen-Image img/txt MLPs)
    state, alphas = <Family>LoraLoaderMixin.lora_state_dict(raw)
                                                   diffusers: kohya / XLabs / ai-toolkit / BFL layouts → diffusers
                                                   names (transformer.…, text_encoder.…)
    check every layer against the models           a missing layer or a wrong shape is a one-line UserError
    transformer    its load_lora_adapter           (diffusers' PeftAdapterMixin: peft layers named after the LoRA)
    text encoders  controlnet.lora's peft loader   the CLIPs of Flux (text_encoder) and SD3 (both), as diffusers
                                                   loads them; other text-encoder parts are ignored, with a warning

The LoRAs stay loaded as peft adapters; :meth:`FlowLoras.activate` sets which act with what weight (diffusers'
``set_adapters`` scale) before each generation. ``<lora:name:weight>`` prompt tags are found under ``lora_dir`` as
on UNet bases (:func:`controlnet.lora.split_prompt_loras`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

from controlnet import lora as lora_lib
from controlnet.errors import UserError
from controlnet.transformer_controlnet import FLUX, QWEN, SD3

# diffusers' LoRA loader (the state-dict converter) of each family, in diffusers.loaders.
LOADERS = {FLUX: "FluxLoraLoaderMixin", SD3: "SD3LoraLoaderMixin", QWEN: "QwenImageLoraLoaderMixin"}
# The models diffusers' loader of each family puts LoRA layers into (its _lora_loadable_modules).
LOADABLE = {FLUX: ("transformer", "text_encoder"), SD3: ("transformer", "text_encoder", "text_encoder_2"),
            QWEN: ("transformer",)}
LABELS = {FLUX: "Flux", SD3: "SD3", QWEN: "Qwen-Image"}
UNET = "SD1.x/SD2.x/SDXL"
# Key fragments that only one family's LoRAs have (kohya, diffusers and original layouts), checked in this order:
# a UNet's blocks also hold "transformer_blocks".
FAMILY_MARKS = (
    (UNET, ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")),
    (LABELS[FLUX], ("double_blocks", "single_blocks", "single_transformer_blocks")),
    (LABELS[SD3], ("joint_blocks", "context_block", "x_block")),
    (LABELS[QWEN], ("img_mlp", "txt_mlp", "img_mod", "txt_mod")),
)


def lora_family(raw: Mapping[str, torch.Tensor]) -> str | None:
    """The family a LoRA's key names show it was made for (UNet ones by their cross-attention width), or None."""
    for family, marks in FAMILY_MARKS:
        if any(mark in key for key in raw for mark in marks):
            if family == UNET:
                return _unet_family(raw) or family
            return family
    return None


def _unet_family(raw: Mapping[str, torch.Tensor]) -> str | None:
    """SD1.x / SD2.x / SDXL by the width of the context the LoRA's cross-attention key projection takes."""
    for key, tensor in raw.items():
        if "attn2" in key and "to_k" in key and key.endswith(("lora_down.weight", "lora_A.weight")):
            return lora_lib.CROSS_ATTENTION_FAMILIES.get(int(tensor.shape[1]))
    return None


def read_flow_lora(path: Path, family: str) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict | None]:
    """(state dict with diffusers' names, network alphas or None, adapter metadata or None) of the LoRA file at
    ``path`` for a ``family`` base, converted by diffusers' loader of that family; a LoRA whose names show another
    family, or one the converter cannot read, is a one-line UserError."""
    import diffusers.loaders

    from controlnet.safe_io import read_state_dict

    label = LABELS[family]
    raw = read_state_dict(path)  # safetensors, or a pickle with weights_only=True
    if not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise UserError(f"LoRA {path}: not a LoRA file (it does not hold only tensors)")
    if not any("lora" in k for k in raw):
        raise UserError(f"LoRA {path}: no LoRA layers in it (no key names 'lora'); is it a full model or an embedding?")
    made_for = lora_family(raw)
    if made_for is not None and made_for != label:
        raise UserError(f"LoRA {path} is made for {made_for}, not {label}: use a LoRA made for {label}")
    replaced = sorted(k for k in raw if "lora" not in k and not k.endswith(".alpha"))
    if replaced:  # BFL's FLUX.1 Canny/Depth LoRAs: new norm scales (and a wider input layer) beside the LoRA layers
        raise UserError(f"LoRA {path} also replaces base weights ({replaced[0]}): it is a control LoRA for diffusers' "
                        "FluxControlPipeline, not a style LoRA; give a ControlNet for the control instead")
    lora_lib.check_lora_layers(raw, path)
    metadata = lora_lib.adapter_metadata(path)
    loader = getattr(diffusers.loaders, LOADERS[family])
    try:
        if family == FLUX:
            state, alphas = loader.lora_state_dict(dict(raw), return_alphas=True)
        else:
            state, alphas = loader.lora_state_dict(dict(raw)), None
    except Exception as err:  # noqa: BLE001 - diffusers raises many types for layouts it cannot convert
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"LoRA {path}: diffusers cannot read this layout for {label} ({first[:160]}); LoRA in the "
                        "kohya, XLabs, ai-toolkit or diffusers/peft layout is supported (not LyCORIS LoHa/LoKr)") from None
    return state, alphas or None, metadata


def check_flow_lora_fits(state: Mapping[str, torch.Tensor], models: Mapping[str, nn.Module | None], name: str,
                         family: str) -> list[str]:
    """Refuse, in one line, a LoRA whose transformer or text-encoder layers do not all exist with the same shapes
    in ``models``; returns the components present in the file that this base does not load (ignored)."""
    label = LABELS[family]
    prefixes = sorted({k.split(".", 1)[0] for k in state})
    unknown = [p for p in prefixes if p not in ("transformer", "text_encoder", "text_encoder_2")]
    if unknown:
        raise UserError(f"LoRA {name} has layers for {', '.join(unknown)}, which a {label} base does not have; it is "
                        f"for another kind of model: use a LoRA made for {label}")
    loaded = [p for p in prefixes if p in LOADABLE[family] and models.get(p) is not None]
    if not loaded:
        raise UserError(f"LoRA {name} has layers only for {', '.join(prefixes)}, none of which a {label} base takes "
                        f"LoRA layers into ({', '.join(LOADABLE[family])}); use a LoRA made for {label}")
    ignored = []
    for component in prefixes:
        model = models.get(component)
        if model is None or component not in LOADABLE[family]:
            ignored.append(component)
            continue
        if component == "transformer":
            layers = {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
        else:
            layers = lora_lib.component_state_dict(state, component, model)
        for key, tensor in layers.items():
            problem = lora_lib.misfit(model, key, tensor)
            if problem:
                raise UserError(f"LoRA {name} does not fit this {label} base ({component} {problem}); it is for "
                                f"another model or family: use a LoRA made for {label}")
    return ignored


def inject_flow_lora(state: dict[str, torch.Tensor], alphas: dict[str, float] | None, metadata: dict | None,
                     models: Mapping[str, nn.Module | None], components: list[str], adapter: str) -> None:
    """Add the LoRA as peft adapter ``adapter`` to the models of ``components`` (the transformer with its own
    ``load_lora_adapter``, the CLIP text encoders with :mod:`controlnet.lora`'s peft loader)."""
    for component in components:
        model = models[component]
        if component == "transformer":
            # diffusers takes the "transformer." part of the state dict and of the metadata itself; it takes
            # either alphas or metadata.
            model.load_lora_adapter(state, prefix="transformer", adapter_name=adapter, metadata=metadata,
                                    network_alphas=None if metadata else alphas)
        else:
            lora_lib.inject_text_encoder(state, alphas, metadata, model, component, adapter)


class FlowLoras(Mapping[str, tuple[float, float]]):
    """The LoRAs of a transformer base: loaded once each (by file), acting with their weights per generation. As a
    mapping, like :attr:`controlnet.pipeline.Pipeline.loras`: those loaded with :meth:`load`, name → (weight, weight).

    ``models``: the base's transformer and text encoders by diffusers' component name (``transformer``,
    ``text_encoder``, ``text_encoder_2``; None where the base has none); ``paused``: a context in which they carry no
    offload hooks (LoRA layers are added inside it).
    """

    def __init__(self, family: str, models: Mapping[str, nn.Module | None],
                 paused: Callable[[], ContextManager[None]] = contextlib.nullcontext):
        self.family, self.models, self._paused = family, dict(models), paused
        self.lora_dir: Path | None = None  # where --lora NAME and <lora:NAME> prompt tags are looked for
        self.specs: dict[str, lora_lib.LoraSpec] = {}  # loaded with load: adapter name → its spec
        self._files: dict[str, str] = {}  # resolved file → adapter name (prompt-tag LoRAs stay loaded)

    @property
    def weights(self) -> dict[str, tuple[float, float]]:
        """The LoRAs loaded with :meth:`load`: name → (weight, weight)."""
        return {name: (spec.weight, spec.weight) for name, spec in self.specs.items()}

    def __getitem__(self, name: str) -> tuple[float, float]:
        return self.weights[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def unload(self, name: str) -> None:
        """Remove the LoRA (adapter) ``name`` from the models, whether loaded by :meth:`load` or by a prompt tag."""
        with torch.inference_mode(False), self._paused():
            lora_lib.remove(self.models, name)
        self.specs.pop(name, None)
        self._files = {key: n for key, n in self._files.items() if n != name}

    def load(self, source: str | os.PathLike, weight: float = 1.0, revision: str | None = None) -> str:
        """Load the LoRA ``source`` (a file, a hub id, or a name under :attr:`lora_dir`) with ``weight`` (its
        scale); loading the same file again only changes the weight. Returns its adapter name."""
        name = self._inject(str(source), revision)
        self.specs[name] = lora_lib.LoraSpec(str(source), float(weight))
        self.activate({})
        return name

    def _inject(self, source: str, revision: str | None) -> str:
        path = lora_lib.find_lora(source, self.lora_dir, revision)
        key = str(path.resolve())
        if key in self._files:
            return self._files[key]
        lora_lib.require_peft()
        state, alphas, metadata = read_flow_lora(path, self.family)
        ignored = check_flow_lora_fits(state, self.models, source, self.family)
        if ignored:
            warnings.warn(f"LoRA {source}: its layers for {', '.join(ignored)} are ignored (diffusers loads "
                          f"{LABELS[self.family]} LoRAs into {', '.join(LOADABLE[self.family])} only)", stacklevel=3)
        components = [c for c in LOADABLE[self.family] if self.models.get(c) is not None
                      and any(k.startswith(c + ".") for k in state)]
        name = lora_lib.adapter_name(path, {n: None for n in self._files.values()})
        with torch.inference_mode(False), self._paused():  # ordinary tensors even inside a generation
            inject_flow_lora(state, alphas, metadata, self.models, components, name)
        self._files[key] = name
        return name

    def activate(self, extra: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        """Make the loaded LoRAs plus ``extra`` (name → weights, from prompt tags, which win) act; returns them."""
        active = {**self.weights, **extra}
        if self._files:
            lora_lib.activate(self.models, active)
        return active

    def apply_prompt(self, prompt: str) -> tuple[str, dict[str, tuple[float, float]]]:
        """``prompt`` without its ``<lora:name:w>`` tags, and the LoRAs acting for it (loaded ones and the tags',
        loaded from :attr:`lora_dir` on first use; one weight for the whole model: the tag's last number)."""
        text, specs = lora_lib.split_prompt_loras(prompt)
        files = [str(lora_lib.find_tag_lora(spec.source, self.lora_dir)) for spec in specs]
        extra = {self._inject(file, None): (spec.weight, spec.weight) for file, spec in zip(files, specs)}
        return text, self.activate(extra)

    def settings(self, active: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
        """The LoRA part of a generation's settings, as the UNet pipeline writes it (``loras``: those that acted;
        ``lora_files``: those loaded with :meth:`load`, name → [source, weight, weight]; ``lora_dir``)."""
        settings: dict[str, Any] = {}
        if active:
            settings["loras"] = {name: list(w) for name, w in active.items()}
        if self.specs:
            settings["lora_files"] = {name: [spec.source, spec.weight, spec.weight] for name, spec in self.specs.items()}
        if self.lora_dir is not None:
            settings["lora_dir"] = str(self.lora_dir)
        return settings
