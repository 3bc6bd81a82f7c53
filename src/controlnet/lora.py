"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the base model.

A LoRA file adds ``weight * (alpha / rank) * B @ A`` to some linear and convolution weights of the UNet and the
text encoder(s). The files come in two layouts, both read by diffusers' LoRA loader
(``StableDiffusionLoraLoaderMixin.lora_state_dict``, which converts the first to the second):

    kohya / A1111      lora_unet_down_blocks_0_..._to_q.lora_down.weight / .lora_up.weight / .alpha,
                       lora_te_... (SDXL: lora_te1_..., lora_te2_...; the UNet in diffusers or SGM block names)
    diffusers / peft   unet.down_blocks.0....to_q.lora_A.weight / .lora_B.weight, text_encoder....

Loading, per file (:func:`read_lora`, :func:`check_lora_fits`, :func:`inject_lora`)::

    check the file's own layers and metadata       rank >= 1, down/up shapes agree, alpha a finite number > 0,
                                                   finite float weights, the adapter metadata well-formed JSON
    state, alphas = lora_state_dict(file)          diffusers: any layout → diffusers names
    check every LoRA layer against the model       a missing layer or a wrong shape is a one-line UserError
    UNet           diffusers' load_lora_into_unet  (peft layers injected, named after the LoRA)
    text encoders  peft's inject_adapter_in_model + set_peft_model_state_dict, with diffusers' key conversion
                   (transformers' own adapter loader needs a newer peft than is released alongside it)

The LoRAs stay in the models as separate peft adapters: :func:`activate` chooses which act and with what weight
before each generation, so switching LoRAs never reloads the base. ``<lora:name:weight>`` in a prompt is A1111's
syntax for "this LoRA, for this generation" (:func:`split_prompt_loras`), looked up by file name in a LoRA folder.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from controlnet.errors import UserError

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".pth", ".bin")
# diffusers' file name for a LoRA saved with save_lora_weights (diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE).
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
# The models a LoRA can change, by the key prefix diffusers gives their layers.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# Context width of the UNet's cross-attention per family, to name the family a misfitting LoRA was made for.
CROSS_ATTENTION_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}

# The (down, up) key suffixes of one low-rank pair in each layout: kohya, peft, diffusers' older attention
# processors. down: (rank, in[, kh, kw]); up: (out, rank[, 1, 1]).
LORA_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
              (".lora.down.weight", ".lora.up.weight"), (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
# Adapter-metadata (peft LoraConfig) fields per component that must be positive numbers, and that name modules.
_METADATA_NUMBERS = ("r", "lora_alpha")
_METADATA_PATTERNS = ("rank_pattern", "alpha_pattern")

# A1111 prompt syntax: <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TEXT_WEIGHT:UNET_WEIGHT>.
_PROMPT_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*){0,2})>")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to apply: where it is, and its weight on the UNet and on the text encoder(s)."""

    source: str
    weight: float = 1.0
    text_weight: float | None = None  # None: the same as ``weight``

    @property
    def weights(self) -> tuple[float, float]:
        """(UNet weight, text-encoder weight)."""
        return self.weight, self.weight if self.text_weight is None else self.text_weight


def parse_lora_spec(text: str) -> LoraSpec:
    """``FILE_OR_ID[:WEIGHT]`` (``--lora``) → a :class:`LoraSpec`; the weight defaults to 1."""
    source, sep, tail = str(text).rpartition(":")
    if sep and _is_number(tail) and source:
        return LoraSpec(source, float(tail))
    return LoraSpec(str(text))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def split_prompt_loras(prompt: str) -> tuple[str, list[LoraSpec]]:
    """``prompt`` without its ``<lora:...>`` tags, and the LoRAs they name (A1111: the first number is the
    text-encoder weight, the second the UNet's; one number is both)."""
    specs = []
    for match in _PROMPT_TAG.finditer(prompt):
        numbers = [n for n in match.group(2).split(":")[1:] if n.strip()]
        if not all(_is_number(n) for n in numbers):
            raise UserError(f"prompt tag {match.group(0)!r}: weights must be numbers, e.g. <lora:name:0.8>")
        text_weight = float(numbers[0]) if numbers else 1.0
        unet_weight = float(numbers[1]) if len(numbers) > 1 else text_weight
        specs.append(LoraSpec(match.group(1).strip(), unet_weight, text_weight))
    return _PROMPT_TAG.sub("", prompt), specs


# How a refused or unknown prompt tag is answered (one line, whether or not a file of that name exists elsewhere).
_TAG_HINT = ("a <lora:NAME> tag names a LoRA file (its name, with or without its suffix) inside the LoRA folder "
             "(--lora-dir; in the web UI, the first --models-dir); paths and hub ids are not read from a prompt")


def find_tag_lora(name: str, lora_dir: str | os.PathLike | None) -> Path:
    """The file of prompt tag ``<lora:NAME>``: a LoRA file named ``NAME`` (its stem or its full name) anywhere
    under ``lora_dir``, as A1111 finds it, and nothing else: a path, ``..``, a symlink leading out of the folder
    or a hub id is refused. A prompt is untrusted (it comes from a web client or a shared PNG's settings), so the
    rule is :func:`controlnet.untrusted.resolve_untrusted_input`'s, with one message for every refusal."""
    from controlnet.untrusted import resolve_untrusted_input

    what = f"LoRA tag <lora:{name}>"
    if lora_dir is None:
        raise UserError(f"{what}: there is no LoRA folder to look in; {_TAG_HINT}")
    root = Path(lora_dir).expanduser()
    plain = bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and name in (p.stem, p.name)) \
        if plain else []
    for candidate in found:
        try:
            return resolve_untrusted_input(candidate, [root], what)
        except UserError:
            continue  # a link out of the folder, a FIFO: the next candidate, else the one message below
    raise UserError(f"{what}: no LoRA of that name in the LoRA folder; {_TAG_HINT}")


def find_lora(source: str, lora_dir: str | os.PathLike | None = None, revision: str | None = None) -> Path:
    """The file of a LoRA named ``source``: a path, a file in a hub repository (``org/name/file.safetensors``), a
    hub repository holding diffusers' ``pytorch_lora_weights.safetensors``, or a file name (without suffix, as
    A1111's ``<lora:name>``) anywhere under ``lora_dir``."""
    from controlnet import hub

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / DIFFUSERS_LORA_FILE
    if path.is_file():
        return path
    if lora_dir is not None:
        root = Path(lora_dir).expanduser()
        found = sorted(p for p in root.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and source in (p.stem, p.name))
        if found:
            return found[0]
    ref = hub.hub_ref(source, revision)
    if ref is not None:
        return hub.hub_file(ref.repo_id, ref.filename or DIFFUSERS_LORA_FILE, revision=ref.revision)
    where = f" or in --lora-dir {lora_dir}" if lora_dir is not None else " (give --lora-dir DIR to find LoRAs by name)"
    raise UserError(f"LoRA {source!r} not found as a file, a hub id{where}")


def adapter_name(path: Path, taken: Mapping[str, Any]) -> str:
    """A peft adapter name for the LoRA at ``path``: its file stem (its folder's name for diffusers' file name),
    made a valid module key and unique among ``taken``."""
    stem = path.parent.name if path.name == DIFFUSERS_LORA_FILE else path.stem
    base = re.sub(r"[^\w-]", "_", stem) or "lora"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


# --------------------------------------------------------------------------- reading and checking


def require_peft() -> None:
    """A one-line :class:`UserError` when peft (the adapter library LoRAs are loaded with) is not installed."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise UserError("LoRA needs the peft package, which is not installed; install it with `pip install peft`")


def read_lora(path: Path, unet: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict | None]:
    """(state dict with diffusers' names, kohya network alphas or None, diffusers' adapter metadata or None) of
    the LoRA file at ``path``, converted by diffusers' loader. Unreadable files are a one-line UserError."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    from controlnet.safe_io import read_state_dict

    raw = read_state_dict(path)  # safetensors, or a pickle with weights_only=True
    if not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise UserError(f"LoRA {path}: not a LoRA file (it does not hold only tensors)")
    if not any("lora" in k for k in raw):
        raise UserError(f"LoRA {path}: no LoRA layers in it (no key names 'lora'); is it a full model or an embedding?")
    check_lora_layers(raw, path)
    metadata = adapter_metadata(path)
    try:
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(raw, unet_config=unet.config)
    except Exception as err:  # noqa: BLE001 - diffusers raises many types for layouts it cannot convert
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"LoRA {path}: diffusers cannot read this layout ({first}); LoRA in the kohya/A1111 or "
                        "diffusers/peft layout is supported (not LyCORIS LoHa/LoKr)") from None
    return state, alphas, metadata


def check_lora_layers(raw: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse, in one line naming ``path`` and the layer, a LoRA whose low-rank pairs cannot be applied: a down
    matrix without its up matrix, rank 0, shapes that do not agree, an alpha that is not one finite number > 0,
    or weights that are not finite floating-point numbers."""
    for key, tensor in raw.items():
        if "lora" in key or key.endswith(".alpha"):
            if not tensor.is_floating_point():
                raise UserError(f"LoRA {path}: {key} holds {str(tensor.dtype).removeprefix('torch.')} values, not "
                                "floating-point weights; the file is not a usable LoRA")
            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                raise UserError(f"LoRA {path}: {key} holds NaN or infinite values; the file is damaged")
        if key.endswith(".alpha"):
            if tensor.numel() != 1 or not float(tensor.reshape(())) > 0:
                raise UserError(f"LoRA {path}: {key} must be one number > 0 (the scale alpha / rank), got "
                                f"{tensor.flatten()[:4].tolist()}")
    for down_suffix, up_suffix in LORA_PAIRS:
        for key, down in raw.items():
            if not key.endswith(down_suffix):
                continue
            layer = key[: -len(down_suffix)]
            up = raw.get(layer + up_suffix)
            if up is None:
                raise UserError(f"LoRA {path}: layer {layer} has {down_suffix[1:]} but no {up_suffix[1:]}; the file is "
                                "incomplete")
            if down.ndim not in (2, 4) or up.ndim != down.ndim:
                raise UserError(f"LoRA {path}: layer {layer} has matrices of shapes {tuple(down.shape)} and "
                                f"{tuple(up.shape)}; a LoRA layer is two matrices (or two convolution kernels)")
            if down.shape[0] < 1:
                raise UserError(f"LoRA {path}: layer {layer} has rank 0 (no low-rank update); the file is not a "
                                "usable LoRA")
            if up.shape[1] != down.shape[0]:
                raise UserError(f"LoRA {path}: layer {layer}: its down matrix has rank {down.shape[0]} and its up "
                                f"matrix {up.shape[1]}; the shapes {tuple(down.shape)} and {tuple(up.shape)} do not "
                                "agree")


def adapter_metadata(path: Path) -> dict | None:
    """diffusers' LoRA adapter metadata (the peft LoraConfig) stored in a .safetensors header, if any, checked:
    a JSON object whose ranks and alphas are positive numbers and whose target modules are names."""
    if path.suffix != ".safetensors":
        return None
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    where = f"LoRA {path}: its {LORA_ADAPTER_METADATA_KEY!r} header"
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise UserError(f"{where} is not valid JSON ({str(err).splitlines()[0][:120]}); the file is damaged") from None
    if not isinstance(metadata, dict):
        raise UserError(f"{where} is a JSON {type(metadata).__name__}, not an object of LoRA settings")
    for key, value in metadata.items():
        field = key.rsplit(".", 1)[-1]
        if field in _METADATA_NUMBERS and not _positive_number(value):
            raise UserError(f"{where}: {key} must be a positive number, got {value!r:.60}")
        if field == "target_modules" and not (isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise UserError(f"{where}: {key} must be a module name or a list of names, got {value!r:.60}")
        if field in _METADATA_PATTERNS and not (isinstance(value, dict) and all(
                isinstance(k, str) and _positive_number(v) for k, v in value.items())):
            raise UserError(f"{where}: {key} must map module names to positive numbers, got {value!r:.60}")
    return metadata


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def component_state_dict(state: Mapping[str, torch.Tensor], component: str,
                         model: nn.Module) -> dict[str, torch.Tensor]:
    """The layers of ``state`` for ``component``, without its prefix, in peft's names
    (``path.to.module.lora_A.weight`` / ``lora_B.weight``), as diffusers' loaders convert them."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    prefix = component + "."
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not part:
        return {}
    if component == "unet":
        return part if any("lora_A" in k for k in part) else convert_unet_state_dict_to_peft(part)
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(model, "text_model"):  # transformers >= 5 flattened CLIPTextModel.text_model
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
    return part


def check_lora_fits(state: Mapping[str, torch.Tensor], models: Mapping[str, nn.Module | None], name: str,
                    family: str) -> None:
    """Refuse a LoRA whose layers do not all exist, with the same shapes, in ``models`` (unet, text_encoder,
    text_encoder_2): one line naming the LoRA, the first misfit and the family it was probably made for."""
    prefixes = {k.split(".", 1)[0] for k in state}
    unknown = sorted(prefixes - set(COMPONENTS))
    if unknown:
        raise UserError(f"LoRA {name} has layers for {', '.join(unknown)}, which an SD1.x/SD2.x/SDXL base does not "
                        "have; it is for another kind of model")
    for component in sorted(prefixes):
        model = models.get(component)
        if model is None:
            made_for = "SDXL" if component == "text_encoder_2" else "another family"
            raise UserError(f"LoRA {name} has layers for {component}, which this {family} base does not have: it is "
                            f"a LoRA for {made_for}; use one made for {family}")
        layers = component_state_dict(state, component, model)
        for key, tensor in layers.items():
            problem = misfit(model, key, tensor)
            if problem:
                hint = _made_for(layers) if component == "unet" else None
                made_for = f"it looks made for {hint}" if hint else "it is for another model or family"
                raise UserError(f"LoRA {name} does not fit this {family} base ({component} {problem}); {made_for}; "
                                f"use a LoRA made for {family}")


def misfit(model: nn.Module, key: str, tensor: torch.Tensor) -> str:
    """Why LoRA tensor ``key`` (``path.lora_A.weight``) cannot apply to ``model`` ("" when it can)."""
    if ".lora_A." not in key and ".lora_B." not in key:
        return f"layer {key} is in a layout diffusers' converter does not map to peft"
    path = key.split(".lora_")[0]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return f"has no layer {path}"
    module = getattr(module, "base_layer", module)  # already wrapped by another LoRA
    weight = getattr(module, "weight", None)
    if weight is None:
        return f"layer {path} has no weight"
    fan_in, fan_out = weight.shape[1], weight.shape[0]
    if ".lora_A." in key and tensor.shape[1] != fan_in:
        return f"layer {path} takes {fan_in} inputs, the LoRA {tensor.shape[1]}"
    if ".lora_B." in key and tensor.shape[0] != fan_out:
        return f"layer {path} gives {fan_out} outputs, the LoRA {tensor.shape[0]}"
    return ""


def _made_for(unet_layers: Mapping[str, torch.Tensor]) -> str | None:
    """The family whose cross-attention width the LoRA's ``attn2.to_k`` takes, if it is a known one."""
    for key, tensor in unet_layers.items():
        if key.endswith("attn2.to_k.lora_A.weight"):
            return CROSS_ATTENTION_FAMILIES.get(int(tensor.shape[1]))
    return None


# --------------------------------------------------------------------------- applying


def inject_lora(state: dict[str, torch.Tensor], alphas: dict[str, float] | None, metadata: dict | None,
                models: Mapping[str, nn.Module | None], adapter: str) -> list[str]:
    """Add the LoRA as peft adapter ``adapter`` to each model it has layers for; returns those models' names.
    The adapter is inactive until :func:`activate` turns it on."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    changed = []
    for component, model in models.items():
        if model is None:
            continue
        if component == "unet":
            if not any(k.startswith("unet.") for k in state):
                continue
            # diffusers takes the "unet." part of the state dict and of the metadata itself.
            StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, model, adapter_name=adapter,
                                                               metadata=metadata)
        elif not inject_text_encoder(state, alphas, metadata, model, component, adapter):
            continue
        changed.append(component)
    activate(models, {})
    return changed


def inject_text_encoder(state: dict[str, torch.Tensor], alphas: dict[str, float] | None, metadata: dict | None,
                         encoder: nn.Module, component: str, adapter: str) -> bool:
    """The text-encoder half of diffusers' ``_load_lora_into_text_encoder``, with peft's functions."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    layers = component_state_dict(state, component, encoder)
    if not layers:
        return False
    ranks = {k: v.shape[1] for k, v in layers.items() if k.endswith("lora_B.weight")}
    own_alphas = None
    if alphas:
        own_alphas = {k[len(component) + 1:]: v for k, v in alphas.items() if k.split(".")[0] == component}
    config = _metadata_for(component, metadata) or get_peft_kwargs(ranks, own_alphas, layers, is_unet=False)
    inject_adapter_in_model(LoraConfig(**config), encoder, adapter_name=adapter)
    set_peft_model_state_dict(encoder, layers, adapter_name=adapter)
    encoder.to(**_placement_of(encoder))  # the new layers where the encoder is, in its dtype
    return True


def _metadata_for(component: str, metadata: dict | None) -> dict | None:
    if not metadata:
        return None
    prefix = component + "."
    own = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
    return own or None


def _placement_of(module: nn.Module) -> dict[str, Any]:
    p = next(p for n, p in module.named_parameters() if "lora_" not in n)
    return {"device": p.device, "dtype": p.dtype}


def adapters_in(model: nn.Module | None) -> list[str]:
    """The peft adapters (LoRAs) loaded into ``model``."""
    return list(getattr(model, "peft_config", {}) or {}) if model is not None else []


def activate(models: Mapping[str, nn.Module | None], active: Mapping[str, tuple[float, float]]) -> None:
    """Make exactly the adapters of ``active`` (name → (UNet weight, text-encoder weight)) act, each with its
    weight; every other loaded LoRA is off. Weights 0 turn an adapter off in that model."""
    from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

    for component, model in models.items():
        loaded = adapters_in(model)
        if not loaded:
            continue
        which = 0 if component == "unet" else 1
        names = [n for n in active if n in loaded and active[n][which] != 0]
        if not names:
            set_adapter_layers(model, enabled=False)
            continue
        set_adapter_layers(model, enabled=True)
        set_weights_and_activate_adapters(model, names, [float(active[n][which]) for n in names])


def remove(models: Mapping[str, nn.Module | None], adapter: str) -> None:
    """Delete adapter ``adapter`` from every model that has it."""
    from diffusers.utils.peft_utils import delete_adapter_layers

    for component, model in models.items():
        if adapter not in adapters_in(model):
            continue
        if component == "unet":
            model.delete_adapters(adapter)  # diffusers' PeftAdapterMixin: layers and peft_config
        else:
            delete_adapter_layers(model, adapter)
            model.peft_config.pop(adapter, None)
