"""Transformer ControlNet files: the released key layouts, config inference, fit to the base, loading, saving.

Layouts a user may have (all converted to diffusers' module names, our native layout):

* diffusers ``FluxControlNetModel`` (InstantX, Shakker-Labs Union/Union-Pro/Union-Pro-2.0) and
  ``SD3ControlNetModel`` (InstantX SD3, SD3.5 after diffusers' conversion): folders with config.json, or single
  ``.safetensors`` files with the same keys;
* XLabs' Flux ControlNets (x-flux ``ControlNetFlux``): BFL's module names (``img_in``, ``double_blocks.*`` with
  fused ``qkv``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``), ``pos_embed_input`` for the condition,
  ``input_hint_block.{0,2,...,14}`` for the hint encoder;
* Stability's SD3.5 ControlNets (sd3.5_large_controlnet_{canny,depth,blur}.safetensors): ``transformer_blocks.*``
  with fused ``attn.qkv``, ``attn.proj``, ``mlp.fc1/fc2``, ``adaLN_modulation.1``, and a ``control_type`` scalar
  (read the same way as diffusers' scripts/convert_sd3_controlnet_to_diffusers.py and ComfyUI's
  load_controlnet_sd35);
* diffusers ``QwenImageControlNetModel`` (InstantX Qwen-Image-ControlNet-Union, -Inpainting): folders with
  config.json, or single ``.safetensors`` files with the same keys.

Files without a config get one inferred from the tensor shapes, plus the base's config (or FLUX.1/SD3's
values) for what shapes cannot tell (rotary axes, head width). A file made for another base is refused in one
line naming both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from controlnet.checkpoints import (
    CONFIG_NAME,
    DIFFUSERS_WEIGHT_NAMES,
    MAX_CONFIG_BYTES,
    check_tensors,
    _read_file,
    check_destination,
    detect_family,
    refuse_non_finite,
)
from controlnet.devices import parse_dtype
from controlnet.errors import UserError
from controlnet.safe_io import check_regular_file, read_safetensors
from controlnet.transformer_controlnet import (
    CLASS_NAMES,
    FAMILY_NAMES,
    FLUX,
    FLUX1_AXES_DIMS_ROPE,
    FLUX1_HEAD_DIM,
    QWEN,
    QWEN_AXES_DIMS_ROPE,
    QWEN_HEAD_DIM,
    QWEN_PATCH_SIZE,
    SD3,
    SD35_CONTROL_TYPES,
    FluxControlNetConfig,
    QwenImageControlNetConfig,
    SD3ControlNetConfig,
    TransformerControlNet,
    TransformerControlNetConfig,
    base_config,
    describe_base,
    config_get,
    base_family,
    build_transformer_controlnet,
    check_fits,
)

StateDict = dict[str, torch.Tensor]

LAYOUTS = ("diffusers", "xlabs", "stability")
# The class name InstantX's first SD3 ControlNet configs carry (InstantX/SD3-Controlnet-Canny config.json, diffusers
# 0.29.0.dev0), before diffusers named the class SD3ControlNetModel.
OLD_SD3_CLASS_NAME = "ControlNetSD3Model"
# SD3 and SD3.5 use 64-wide attention heads (stabilityai/stable-diffusion-3-medium-diffusers and
# stable-diffusion-3.5-large transformer/config.json `attention_head_dim`); shapes cannot tell without qk-norm.
SD3_HEAD_DIM = 64
# diffusers' SD3 default sample size (SD3Transformer2DModel `sample_size`: 128 latents, 1024 px).
SD3_SAMPLE_SIZE = 128
# The key Stability's SD3.5 ControlNet files carry besides the weights.
CONTROL_TYPE_KEY = "control_type"
LAYOUT_NAMES = {"diffusers": "diffusers layout", "xlabs": "XLabs layout", "stability": "Stability's SD3.5 layout"}

# XLabs / BFL module → diffusers module, outside the blocks (x-flux src/flux/controlnet.py; diffusers
# convert_flux_transformer_checkpoint_to_diffusers).
_XLABS_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "pos_embed_input": "controlnet_x_embedder",
}
# Inside double_blocks.{i} → transformer_blocks.{i}; RMSNorm `scale` tensors become `weight`.
_XLABS_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_XLABS_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                       "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
# Inside single_blocks.{i} → single_transformer_blocks.{i}; linear1 fuses q, k, v and the MLP's input.
_XLABS_SINGLE = {"modulation.lin": "norm.linear", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k",
                 "linear2": "proj_out"}
_XLABS_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
# Stability's SD3.5 blocks (SD3 reference code's DismantledBlock) → diffusers SD3SingleTransformerBlock.
_STABILITY_BLOCK = {"attn.proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
                    "adaLN_modulation.1": "norm1.linear"}
_STABILITY_BLOCK_FUSED = {"attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}


# --------------------------------------------------------------------------------------------- layouts


def _indices(sd: Mapping[str, Any], prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def _unet_family(sd: Mapping[str, Any]) -> str | None:
    """"sd1"/"sd2"/"sdxl" for a UNet ControlNet's state dict, None for anything else."""
    if not any(k.startswith(("control_model.", "controlnet_cond_embedding.", "zero_convs.", "controlnet_down_blocks."))
               for k in sd):
        return None
    try:
        return detect_family(dict(sd))
    except UserError:
        return "unet"


def detect_layout(sd: Mapping[str, Any], name: str = "state dict", base: Any = None) -> tuple[str, str]:
    """(family, layout) of a transformer ControlNet state dict: ("flux" | "sd3" | "qwenimage", "diffusers" |
    "xlabs" | "stability").

    Anything else (a UNet ControlNet, a layout we do not read) is a one-line :class:`UserError`.
    """
    if any(k.startswith("double_blocks.") for k in sd):
        return FLUX, "xlabs"
    if any(".adaLN_modulation." in k for k in sd) and "pos_embed_input.proj.weight" in sd:
        return SD3, "stability"
    if "pos_embed_input.proj.weight" in sd:
        return SD3, "diffusers"
    if "controlnet_x_embedder.weight" in sd and "x_embedder.weight" in sd:
        return FLUX, "diffusers"
    if "controlnet_x_embedder.weight" in sd and "img_in.weight" in sd:
        return QWEN, "diffusers"
    unet = _unet_family(sd)
    if unet is not None:
        target = "a Flux, SD3 or Qwen-Image transformer" if base is None else f"the base, {describe_base(base)}"
        raise UserError(f"{name} is a ControlNet for {FAMILY_NAMES.get(unet, unet)} (a UNet ControlNet), not for "
                        f"{target}; use it with a UNet base, or a ControlNet made for the transformer")
    if "controlnet_blocks.0.linear.weight" in sd:
        raise UserError(f"{name} is a Mistoline Flux ControlNet, a layout this version does not read; convert it to "
                        "diffusers' FluxControlNetModel layout first")
    shown = ", ".join(sorted(sd)[:3])
    raise UserError(f"{name} is not a Flux, SD3 or Qwen-Image ControlNet we know (expected controlnet_x_embedder.*, "
                    f"double_blocks.* or pos_embed_input.* keys; found e.g. {shown})")


def _convert_blocks(sd: StateDict, prefix: str, target: str, renames: Mapping[str, str],
                    fused: Mapping[str, tuple[str, ...]], splits: Any, out: StateDict, name: str) -> None:
    """Rename the keys under ``prefix{i}.`` to ``target{i}.`` by module (``renames``), splitting fused
    projections (``fused``) into chunks of ``splits(module, tensor)`` rows. Consumed keys leave ``sd``."""
    for i in _indices(sd, prefix):
        head = f"{prefix}{i}."
        for key in [k for k in sd if k.startswith(head)]:
            module, _, param = key[len(head):].rpartition(".")
            if module in fused:
                chunks = torch.split(sd.pop(key), splits(module, sd), dim=0)
                for part, chunk in zip(fused[module], chunks):
                    out[f"{target}{i}.{part}.{param}"] = chunk.clone()
            elif module in renames:
                out[f"{target}{i}.{renames[module]}.{'weight' if param == 'scale' else param}"] = sd.pop(key)
            else:
                raise UserError(f"{name}: unexpected key {key} for its layout; the file is damaged or of another kind")


def xlabs_to_diffusers(state_dict: Mapping[str, torch.Tensor], name: str = "state dict") -> StateDict:
    """Rename an XLabs Flux ControlNet state dict to diffusers' ``FluxControlNetModel`` names (qkv split)."""
    sd = dict(state_dict)
    out: StateDict = {}
    try:
        inner = sd["img_in.weight"].shape[0]
        single_out = next((v.shape[0] for k, v in sd.items() if k.endswith("linear1.weight")), 3 * inner)
    except KeyError:
        raise UserError(f"{name}: missing img_in.weight; not a complete XLabs ControlNet") from None

    def double_split(module: str, _: Any) -> list[int]:
        return [inner] * 3

    def single_split(module: str, _: Any) -> list[int]:
        return [inner, inner, inner, single_out - 3 * inner]

    _convert_blocks(sd, "double_blocks.", "transformer_blocks.", _XLABS_DOUBLE, _XLABS_DOUBLE_FUSED, double_split, out, name)
    _convert_blocks(sd, "single_blocks.", "single_transformer_blocks.", _XLABS_SINGLE, _XLABS_SINGLE_FUSED,
                    single_split, out, name)
    hints = _indices(sd, "input_hint_block.")
    hint_names = {idx: "conv_in" if n == 0 else "conv_out" if n == len(hints) - 1 else f"blocks.{n - 1}"
                  for n, idx in enumerate(hints)}
    for key in list(sd):
        module, _, param = key.rpartition(".")
        if module in _XLABS_TOP:
            out[f"{_XLABS_TOP[module]}.{param}"] = sd.pop(key)
        elif m := re.fullmatch(r"input_hint_block\.(\d+)", module):
            out[f"input_hint_block.{hint_names[int(m.group(1))]}.{param}"] = sd.pop(key)
        elif re.fullmatch(r"controlnet_(single_)?blocks\.\d+", module):
            out[key] = sd.pop(key)
    if sd:
        raise UserError(f"{name}: {len(sd)} keys an XLabs ControlNet does not have, e.g. {', '.join(sorted(sd)[:3])}")
    return out


def stability_to_diffusers(state_dict: Mapping[str, torch.Tensor], name: str = "state dict") -> tuple[StateDict, int | None]:
    """Rename a Stability SD3.5 ControlNet state dict to diffusers' ``SD3ControlNetModel`` names (qkv split);
    also return its ``control_type`` (:data:`SD35_CONTROL_TYPES`), None when it has none."""
    sd = dict(state_dict)
    control = sd.pop(CONTROL_TYPE_KEY, None)
    control_type = None if control is None else round(float(control.reshape(-1)[0]))
    out: StateDict = {}
    inner = _shape(sd, "pos_embed_input.proj.weight", name)[0]

    def split(module: str, _: Any) -> int:
        return inner

    _convert_blocks(sd, "transformer_blocks.", "transformer_blocks.", _STABILITY_BLOCK, _STABILITY_BLOCK_FUSED, split, out, name)
    for key in list(sd):
        if key.startswith(("time_text_embed.", "pos_embed_input.", "controlnet_blocks.")):
            out[key] = sd.pop(key)
    if sd:
        raise UserError(f"{name}: {len(sd)} keys a Stability SD3.5 ControlNet does not have, e.g. {', '.join(sorted(sd)[:3])}")
    return out, control_type


# --------------------------------------------------------------------------------------------- configs


def _shape(sd: Mapping[str, torch.Tensor], key: str, name: str) -> tuple[int, ...]:
    if key not in sd:
        raise UserError(f"{name}: missing {key}; the file is incomplete or not a transformer ControlNet")
    return tuple(sd[key].shape)


def _rope_axes(base: Any, head: int, released_head: int, released_axes: tuple[int, ...], name: str) -> tuple[int, ...]:
    """The rotary axes of ``head``-wide attention heads: the base's, else the released model's when its heads are
    ``released_head`` wide; shapes cannot tell them."""
    axes = config_get(base_config(base), "axes_dims_rope")
    if axes is not None:
        return tuple(axes)
    if head != released_head:
        raise UserError(f"{name}: cannot tell the rotary axes of {head}-wide heads from the file; load it with its "
                        "base (base=...) or pass its config")
    return released_axes


def infer_flux_config(sd: Mapping[str, torch.Tensor], name: str = "state dict", base: Any = None) -> FluxControlNetConfig:
    """The config of a diffusers-layout Flux ControlNet state dict, from its shapes; the rotary axes (which
    shapes cannot tell) from ``base`` (a FluxTransformer2DModel or its config), else FLUX.1's."""
    inner, in_channels = _shape(sd, "x_embedder.weight", name)
    layers, singles = _indices(sd, "transformer_blocks."), _indices(sd, "single_transformer_blocks.")
    norm = "transformer_blocks.0.attn.norm_q.weight" if layers else "single_transformer_blocks.0.attn.norm_q.weight"
    head = _shape(sd, norm, name)[0]
    axes = _rope_axes(base, head, FLUX1_HEAD_DIM, FLUX1_AXES_DIMS_ROPE, name)
    hint = sd.get("input_hint_block.conv_out.weight")
    hint_channels = None if hint is None else hint.shape[0]
    patch = math.isqrt(in_channels // hint_channels) if hint_channels else 1
    mode = sd.get("controlnet_mode_embedder.weight")
    try:
        return FluxControlNetConfig(
            patch_size=patch, in_channels=in_channels, num_layers=len(layers), num_single_layers=len(singles),
            attention_head_dim=head, num_attention_heads=inner // head,
            joint_attention_dim=_shape(sd, "context_embedder.weight", name)[1],
            pooled_projection_dim=_shape(sd, "time_text_embed.text_embedder.linear_1.weight", name)[1],
            guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in sd, axes_dims_rope=tuple(axes),
            num_mode=None if mode is None else mode.shape[0], conditioning_embedding_channels=hint_channels,
        )
    except UserError as err:
        raise UserError(f"{name}: {err} (inferred from the tensor shapes); pass its config") from None


def infer_sd3_config(sd: Mapping[str, torch.Tensor], name: str = "state dict", base: Any = None,
                     layout: str = "diffusers", control_type: int | None = None) -> SD3ControlNetConfig:
    """The config of a diffusers-layout SD3 ControlNet state dict (``layout="stability"``: converted from
    Stability's), from its shapes; the head width and sample size, when shapes cannot tell, from ``base``
    (an SD3Transformer2DModel or its config), else SD3's."""
    inner, cond_channels, patch, _ = _shape(sd, "pos_embed_input.proj.weight", name)
    b = base_config(base)
    use_pos = "pos_embed.proj.weight" in sd
    in_channels = _shape(sd, "pos_embed.proj.weight", name)[1] if use_pos else config_get(b, "in_channels", cond_channels)
    context = sd.get("context_embedder.weight")
    norm = sd.get("transformer_blocks.0.attn.norm_q.weight")
    head = norm.shape[0] if norm is not None else config_get(b, "attention_head_dim", SD3_HEAD_DIM)
    if inner % head:
        raise UserError(f"{name}: width {inner} is not a whole number of {head}-wide heads; pass its config")
    layers = _indices(sd, "transformer_blocks.")
    grid = sd.get("pos_embed.pos_embed")
    try:
        return SD3ControlNetConfig(
            sample_size=config_get(b, "sample_size", SD3_SAMPLE_SIZE), patch_size=patch, in_channels=in_channels,
            num_layers=len(layers), attention_head_dim=head, num_attention_heads=inner // head,
            joint_attention_dim=None if context is None else context.shape[1],
            caption_projection_dim=inner if context is None else context.shape[0],
            pooled_projection_dim=_shape(sd, "time_text_embed.text_embedder.linear_1.weight", name)[1],
            out_channels=in_channels,
            pos_embed_max_size=None if grid is None else math.isqrt(grid.shape[1]),
            extra_conditioning_channels=cond_channels - in_channels,
            dual_attention_layers=tuple(i for i in layers if f"transformer_blocks.{i}.attn2.to_q.weight" in sd),
            qk_norm=None if norm is None else "layer_norm" if "transformer_blocks.0.attn.norm_q.bias" in sd else "rms_norm",
            pos_embed_type="sincos" if use_pos else None, use_pos_embed=use_pos,
            # InstantX's SD3 ControlNets were trained with zero pooled embeddings (diffusers' default); Stability's
            # SD3.5 ones with the real ones (diffusers' conversion script: force_zeros_for_pooled_projection=False).
            force_zeros_for_pooled_projection=layout != "stability", control_type=control_type,
        )
    except UserError as err:
        raise UserError(f"{name}: {err} (inferred from the tensor shapes); pass its config") from None


def infer_qwen_config(sd: Mapping[str, torch.Tensor], name: str = "state dict",
                      base: Any = None) -> QwenImageControlNetConfig:
    """The config of a diffusers-layout Qwen-Image ControlNet state dict, from its shapes; the rotary axes, patch size
    and output channels (which shapes cannot tell) from ``base`` (a QwenImageTransformer2DModel or its config),
    else Qwen-Image's."""
    inner, in_channels = _shape(sd, "img_in.weight", name)
    cond_channels = _shape(sd, "controlnet_x_embedder.weight", name)[1]
    layers = _indices(sd, "transformer_blocks.")
    head = _shape(sd, "transformer_blocks.0.attn.norm_q.weight", name)[0]
    axes = _rope_axes(base, head, QWEN_HEAD_DIM, QWEN_AXES_DIMS_ROPE, name)
    b = base_config(base)
    patch = config_get(b, "patch_size", QWEN_PATCH_SIZE)
    try:
        return QwenImageControlNetConfig(
            patch_size=patch, in_channels=in_channels,
            out_channels=config_get(b, "out_channels", in_channels // patch ** 2),
            num_layers=len(layers), attention_head_dim=head, num_attention_heads=inner // head,
            joint_attention_dim=_shape(sd, "txt_in.weight", name)[1], axes_dims_rope=tuple(axes),
            extra_condition_channels=cond_channels - in_channels,
        )
    except UserError as err:
        raise UserError(f"{name}: {err} (inferred from the tensor shapes); pass its config") from None


def config_from_dict(config: Mapping[str, Any], source: str = "config",
                     family: str | None = None) -> TransformerControlNetConfig:
    """A Flux, SD3 or Qwen-Image ControlNet config from a config.json dict, by its ``_class_name`` (``family``
    where it has none, as a diffusers model's ``.config``)."""
    class_name = config.get("_class_name") or (CLASS_NAMES[family] if family else None)
    if class_name == CLASS_NAMES[FLUX]:
        return FluxControlNetConfig.from_dict(config)
    if class_name in (CLASS_NAMES[SD3], OLD_SD3_CLASS_NAME):
        return SD3ControlNetConfig.from_dict(config)
    if class_name == CLASS_NAMES[QWEN]:
        return QwenImageControlNetConfig.from_dict(config)
    if class_name in ("ControlNetModel", "ControlNetLiteModel", "ControlNetUnionModel", "ControlNetXSAdapter"):
        raise UserError(f"{source} describes a {class_name}, a UNet ControlNet, not one for a Flux, SD3 or "
                        "Qwen-Image transformer")
    raise UserError(f"{source} describes a {class_name}, not a FluxControlNetModel, SD3ControlNetModel or "
                    "QwenImageControlNetModel")


# --------------------------------------------------------------------------------------------- fit to the base


# --------------------------------------------------------------------------------------------- loading


def transformer_controlnet_from_state_dict(
    state_dict: Mapping[str, Any],
    config: TransformerControlNetConfig | Mapping[str, Any] | None = None,
    base: nn.Module | Any = None,
    name: str = "state dict",
) -> TransformerControlNet:
    """A Flux, SD3 or Qwen-Image ControlNet holding the tensors of ``state_dict`` (any layout of :data:`LAYOUTS`).

    Without ``config`` it is inferred from the shapes (and ``base``); with ``base`` (a diffusers transformer)
    the ControlNet is checked to fit it and attached (:meth:`TransformerControlNet.attach_base`). Missing,
    extra, mis-shaped or non-finite tensors are a one-line :class:`UserError` naming ``name``.
    """
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{name}: entries that are not tensors: {', '.join(sorted(bad)[:3])}")
    family, layout = detect_layout(state_dict, name, base)
    if base is not None and base_family(base) != family:
        raise UserError(f"{name} is a {FAMILY_NAMES[family]} ControlNet ({LAYOUT_NAMES[layout]}) but the base is "
                        f"{describe_base(base)}; use a ControlNet made for {FAMILY_NAMES.get(base_family(base), 'that base')}")
    control_type = None
    if layout == "xlabs":
        sd = xlabs_to_diffusers(state_dict, name)
    elif layout == "stability":
        sd, control_type = stability_to_diffusers(state_dict, name)
    else:
        sd = dict(state_dict)
    if isinstance(config, Mapping):
        cfg = config_from_dict(config, name, family)
        if cfg.family == SD3 and "extra_conditioning_channels" not in config and "pos_embed_input.proj.weight" in sd:
            # alimama's SD3-Controlnet-Inpainting config.json omits it (diffusers' docs pass it to from_pretrained)
            extra = sd["pos_embed_input.proj.weight"].shape[1] - cfg.in_channels
            cfg = dataclasses.replace(cfg, extra_conditioning_channels=max(extra, 0))
    elif config is not None:
        cfg = config
    elif family == FLUX:
        cfg = infer_flux_config(sd, name, base)
    elif family == QWEN:
        cfg = infer_qwen_config(sd, name, base)
    else:
        cfg = infer_sd3_config(sd, name, base, layout, control_type)
    if layout == "stability" and cfg.family == SD3 and cfg.control_type is None:
        cfg = dataclasses.replace(cfg, control_type=control_type)
    if cfg.family != family:
        raise UserError(f"{name} holds a {FAMILY_NAMES[family]} ControlNet but its config describes a "
                        f"{FAMILY_NAMES[cfg.family]} one")
    with torch.device("meta"):  # no random init: every tensor comes from the file
        cn = build_transformer_controlnet(cfg)
    check_tensors(sd, {k: tuple(v.shape) for k, v in cn.persistent_state_dict().items()}, name, "ControlNet config")
    cn.load_state_dict(sd, strict=True, assign=True)
    _materialize_buffers(cn)
    if base is not None:
        check_fits(cn, base, name)
        cn.attach_base(base)
    return cn.eval()


def _materialize_buffers(cn: TransformerControlNet) -> None:
    """Rebuild what a file does not hold and the meta build left empty: SD3's computed position grid."""
    c = cn.config
    if c.family == SD3 and c.use_pos_embed and c.pos_embed_type and not c.pos_embed_max_size:  # a buffer not saved
        proj = cn.pos_embed.proj
        cn.pos_embed = cn._patch_embed(c.in_channels, c.pos_embed_type, c.pos_embed_max_size)
        cn.pos_embed.proj.load_state_dict(proj.state_dict(), assign=True)


def _read_folder(path: Path) -> tuple[Path, dict[str, Any]]:
    """A diffusers folder's weights file and config.json."""
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"{path} has no {CONFIG_NAME}; pass a diffusers ControlNet folder or a checkpoint file")
    weights = next((path / n for n in DIFFUSERS_WEIGHT_NAMES if (path / n).is_file()), None)
    if weights is None:
        raise UserError(f"{path} has no {' / '.join(DIFFUSERS_WEIGHT_NAMES)}; is it a diffusers ControlNet folder?")
    return weights, _config_argument(path)


def is_transformer_controlnet(path: str | Path) -> bool:
    """Whether ``path`` holds a Flux, SD3 or Qwen-Image ControlNet: a folder whose config.json names one, or a
    .safetensors file with their keys (read from the header only). False for anything else, including what does not
    exist."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    try:
        if path.is_dir():
            class_name = json.loads((path / CONFIG_NAME).read_text()).get("_class_name")
            return class_name in (*CLASS_NAMES.values(), OLD_SD3_CLASS_NAME)
        if path.is_file() and path.suffix.lower() == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = dict.fromkeys(f.keys())
            detect_layout(keys)
            return True
    except (OSError, ValueError, AttributeError, SafetensorError, UserError, RecursionError):
        return False
    return False


def _config_argument(config: Any) -> Any:
    """A config given as a path to a config.json (or a folder holding one) → its dict; anything else as it is."""
    if not isinstance(config, (str, Path)):
        return config
    path = Path(config).expanduser()
    path = path / CONFIG_NAME if path.is_dir() else path
    if not path.exists():
        raise UserError(f"config file {path} does not exist")
    check_regular_file(path, MAX_CONFIG_BYTES)
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise UserError(f"{path} is not a readable JSON config: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def load_transformer_controlnet(
    path: str | Path,
    base: nn.Module | Any = None,
    config: TransformerControlNetConfig | Mapping[str, Any] | str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> TransformerControlNet:
    """Load a Flux, SD3 or Qwen-Image ControlNet, in eval mode, from a diffusers folder or a single file of any layout.

    ``base``: the diffusers transformer it will control (or its config): the file must fit it, and it supplies
    the residuals' placement (and SD3.5's patch embedding). ``config``: overrides the folder's config.json or the
    config inferred from the shapes (a config, a dict, or a config.json path). ``dtype``: default float32. Bad
    files are a one-line :class:`UserError`.
    """
    config = _config_argument(config)
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"ControlNet {path} does not exist")
    if path.is_dir():
        weights, folder_config = _read_folder(path)
        if config is None:
            config_from_dict(folder_config, str(path))  # a config of another kind refused, naming the folder
            config = folder_config
        raw = read_safetensors(weights) if weights.suffix == ".safetensors" else _read_file(weights)
        name = str(weights)
    else:
        raw, name = _read_file(path), str(path)
    cn = transformer_controlnet_from_state_dict(raw, config, base, name)
    target = parse_dtype(dtype) or torch.float32
    cast = any(v.dtype != target for v in raw.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    cn = cn.to(device=device, dtype=target)
    if cast and target == torch.float16:  # fp16's range ends at 65504: larger weights become Inf
        refuse_non_finite(cn.state_dict(), name, cause="it overflows fp16; load it as fp32 or bf16")
    return cn


def save_transformer_controlnet(controlnet: TransformerControlNet, path: str | Path,
                                dtype: str | torch.dtype | None = None) -> Path:
    """Write ``controlnet`` as a diffusers folder (config.json + diffusion_pytorch_model.safetensors), atomically;
    diffusers' ``FluxControlNetModel`` / ``SD3ControlNetModel.from_pretrained`` read it."""
    return controlnet.save_pretrained(check_destination(path, "diffusers"), parse_dtype(dtype))


def control_type_name(config: SD3ControlNetConfig) -> str | None:
    """The condition a Stability SD3.5 ControlNet was trained on ("blur", "canny", "depth"), None if not recorded."""
    return None if config.control_type is None else SD35_CONTROL_TYPES.get(config.control_type, str(config.control_type))
