"""ControlNet checkpoint files: the original releases' layout, diffusers' layout, safe loading, family detection.

Two layouts exist for the same tensors:

* original (lllyasviel/ControlNet ``cldm.py``): ``control_model.input_blocks.*``, ``input_hint_block.*``,
  ``zero_convs.*``, ``middle_block_out.*`` in ``.pth`` / ``.ckpt`` / ``.safetensors`` files, sometimes without the
  ``control_model.`` prefix, sometimes inside a whole ControlLDM state dict (with ``model.diffusion_model.*``);
* diffusers (``ControlNetModel``): a folder with ``config.json`` + ``diffusion_pytorch_model.safetensors``. Our
  :class:`~controlnet.model.ControlNet` uses these module names, so this is our native layout.

Converting between them is a renaming of module prefixes (no tensor is reshaped). Original files carry no config:
it is inferred from the tensor shapes plus the family's defaults for what shapes cannot tell (attention heads).
Pickles are only read with ``torch.load(weights_only=True)``: a file that tries to run code is refused. Weights
that are not finite (NaN/Inf) are refused too, naming the first bad tensor.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from controlnet.devices import parse_dtype
from controlnet.embedded import resolve_controlnet
from controlnet.errors import UserError
from controlnet.fileio import atomic_path
from controlnet.model import ControlNet, build_controlnet
from controlnet.model_config import LITE_CLASS_NAME, ControlNetConfig
from controlnet.safe_io import check_regular_file, first_sentence, read_safetensors, read_torch_file

FAMILIES = ("sd1", "sd2", "sdxl")
# Text-encoder context width of each family's base: CLIP ViT-L/14 (SD1.x), OpenCLIP ViT-H/14 (SD2.x),
# CLIP ViT-L + OpenCLIP ViT-bigG concatenated (SDXL). Their unet/config.json `cross_attention_dim`.
CONTEXT_DIMS = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
# Attention heads cannot be read from weight shapes. SD1.x: 8 heads per layer (v1-inference.yaml `num_heads: 8`,
# diffusers `attention_head_dim: 8`); SD2.x and SDXL: 64-channel heads (v2-inference.yaml and sd_xl_base.yaml
# `num_head_channels: 64`, diffusers `attention_head_dim: [5, 10, 20, 20]` / `[5, 10, 20]`).
SD1_NUM_HEADS = 8
SD2_HEAD_CHANNELS = 64
# SDXL embeds each of its 6 time ids (original size, crop top-left, target size) with 256 sinusoidal channels
# (sd_xl_base.yaml, diffusers `addition_time_embed_dim: 256`); the pooled text embedding is the rest of the
# addition embedding's input (2816 = 1280 + 6 * 256).
SDXL_TIME_EMBED_DIM = 256
SDXL_NUM_TIME_IDS = 6
# A ControlNet config.json is about 2 KB; anything far larger is not one (and is not read into memory).
MAX_CONFIG_BYTES = 1 << 20
# ControlNet 1.1's shuffle model is the only release with global average pooling
# (control_v11e_sd15_shuffle.yaml `global_average_pooling: True`); its files are named "*shuffle*".
GLOBAL_POOL_NAME_HINT = "shuffle"

ORIGINAL_PREFIX = "control_model."
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
FORMATS = ("diffusers", "original")

# The native (diffusers ControlNetModel) folder layout.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Weight files of a diffusers folder, in order of preference.
DIFFUSERS_WEIGHT_NAMES = (WEIGHTS_NAME, "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin")

# Original ResBlock (ldm openaimodel.py) sub-modules → diffusers ResnetBlock2D names.
_RESNET_RENAMES = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)

StateDict = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------- small helpers


def _examples(items: Iterable[str], limit: int = 3) -> str:
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------- key layouts


@dataclass(frozen=True)
class _Layout:
    """What the key renaming depends on: the encoder's block structure and the hint encoder's length."""

    num_blocks: int
    layers_per_block: int
    num_hint_convs: int

    @classmethod
    def from_config(cls, config: ControlNetConfig) -> "_Layout":
        # conv_in, then (a→a, a→b stride 2) per consecutive pair of widths, then conv_out.
        hint_convs = 2 * len(config.conditioning_embedding_out_channels)
        return cls(len(config.block_out_channels), config.layers_per_block, hint_convs)

    @classmethod
    def from_original(cls, sd: Mapping[str, Any], name: str) -> "_Layout":
        inputs = {int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))}
        downs = sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))})
        hints = {int(m.group(1)) for k in sd if (m := re.match(r"input_hint_block\.(\d+)\.", k))}
        if not inputs or not hints:
            raise UserError(f"{name}: no input_blocks.* or input_hint_block.* keys; not a ControlNet in the original layout")
        num_blocks = len(downs) + 1
        # input_blocks: conv_in, then per level `layers_per_block` res(+attn) blocks and a downsampler (not the last).
        layers, rest = divmod(max(inputs) - len(downs), num_blocks)
        expected_downs = [(i + 1) * (layers + 1) for i in range(num_blocks - 1)]
        if rest or layers < 1 or downs != expected_downs:
            raise UserError(f"{name}: input_blocks 0..{max(inputs)} with downsamplers at {downs} is not a layout we know")
        return cls(num_blocks, layers, len(hints))

    @classmethod
    def from_diffusers(cls, sd: Mapping[str, Any], name: str) -> "_Layout":
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.(\d+)\.", k))}
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
        hint_blocks = {int(m.group(1)) for k in sd if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))}
        if not blocks or not layers:
            raise UserError(f"{name}: no down_blocks.* keys; not a ControlNet in the diffusers layout")
        return cls(len(blocks), len(layers), len(hint_blocks) + 2)


def _module_map(layout: _Layout) -> dict[str, str]:
    """Original module path → diffusers module path, for every module a ControlNet of ``layout`` may have."""
    m = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1",  # SDXL (sgm `label_emb` = diffusers text_time add_embedding)
        "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "zero_convs.0.0": "controlnet_down_blocks.0",
        "middle_block_out.0": "controlnet_mid_block",
        "middle_block.1": "mid_block.attentions.0",
    }

    def resnet(original: str, diffusers: str) -> None:
        for a, b in _RESNET_RENAMES:
            m[f"{original}.{a}"] = f"{diffusers}.{b}"

    n = 1  # index of input_blocks / zero_convs: one per skip connection
    for i in range(layout.num_blocks):
        for j in range(layout.layers_per_block):
            resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}")
            m[f"input_blocks.{n}.1"] = f"down_blocks.{i}.attentions.{j}"
            m[f"zero_convs.{n}.0"] = f"controlnet_down_blocks.{n}"
            n += 1
        if i < layout.num_blocks - 1:
            m[f"input_blocks.{n}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
            m[f"zero_convs.{n}.0"] = f"controlnet_down_blocks.{n}"
            n += 1
    resnet("middle_block.0", "mid_block.resnets.0")
    resnet("middle_block.2", "mid_block.resnets.1")
    # input_hint_block = Sequential(conv, SiLU, conv, SiLU, ..., zero conv): convs at even indices.
    m["input_hint_block.0"] = "controlnet_cond_embedding.conv_in"
    for k in range(1, layout.num_hint_convs - 1):
        m[f"input_hint_block.{2 * k}"] = f"controlnet_cond_embedding.blocks.{k - 1}"
    m[f"input_hint_block.{2 * (layout.num_hint_convs - 1)}"] = "controlnet_cond_embedding.conv_out"
    return m


def _rename(key: str, mapping: Mapping[str, str]) -> str | None:
    """Rename ``key`` by the longest module prefix found in ``mapping``; None if no prefix matches."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in mapping:
            return ".".join([mapping[prefix], *parts[cut:]])
    return None


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor], name: str = "state dict") -> StateDict:
    """Rename an original-layout ControlNet state dict (without the ``control_model.`` prefix) to diffusers'."""
    mapping = _module_map(_Layout.from_original(state_dict, name))
    return _rename_all(state_dict, mapping, f"{name}: {{n}} unexpected keys for a ControlNet: {{examples}}")


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], name: str = "state dict") -> StateDict:
    """Rename a diffusers-layout ControlNet state dict to the original layout (without ``control_model.``)."""
    mapping = {v: k for k, v in _module_map(_Layout.from_diffusers(state_dict, name)).items()}
    return _rename_all(state_dict, mapping, f"{name}: {{n}} keys have no original-layout name: {{examples}}")


def _rename_all(state_dict: Mapping[str, torch.Tensor], mapping: Mapping[str, str], error: str) -> StateDict:
    """Every key renamed through ``mapping``; keys it has no name for are one :class:`UserError` (``error`` is
    formatted with ``n`` and ``examples``)."""
    out: StateDict = {}
    unknown = []
    for key, value in state_dict.items():
        new = _rename(key, mapping)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise UserError(error.format(n=len(unknown), examples=_examples(unknown)))
    return out


def original_state_dict(controlnet: ControlNet, dtype: str | torch.dtype | None = None) -> StateDict:
    """The ControlNet's weights in the original layout, ``control_model.*`` keys (as the released .pth files)."""
    if controlnet.config.architecture != "copy":
        raise UserError(
            f"the original layout has no place for a {controlnet.config.architecture!r} ControlNet; "
            "save it in the diffusers layout instead"
        )
    if controlnet.config.hint_encoder != "released":
        raise UserError(
            f"the original layout has no place for the {controlnet.config.hint_encoder!r} hint encoder; "
            "save it in the diffusers layout instead"
        )
    dtype = parse_dtype(dtype)
    sd = {k: v.detach() if dtype is None else v.detach().to(dtype) for k, v in controlnet.state_dict().items()}
    return {ORIGINAL_PREFIX + k: v for k, v in diffusers_to_original(sd, "ControlNet").items()}


# --------------------------------------------------------------------------------------------- families


def _family_from_config(cfg: Mapping[str, Any]) -> str:
    if cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    cross = cfg.get("cross_attention_dim")
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if cross == CONTEXT_DIMS["sd1"]:
        return "sd1"
    if cross == CONTEXT_DIMS["sd2"]:
        return "sd2"
    # Other widths (custom or tiny models): SD2.x introduced linear projections in the transformers.
    return "sd2" if cfg.get("use_linear_projection") else "sd1"


def _shape_facts(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What a diffusers-layout state dict tells about family: context width, linear proj_in, SDXL embedding."""
    cross = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    proj = next((v for k, v in sd.items() if k.endswith("proj_in.weight")), None)
    return {
        "cross_attention_dim": cross,
        "use_linear_projection": proj is not None and proj.ndim == 2,
        "addition_embed_type": "text_time" if "add_embedding.linear_1.weight" in sd else None,
    }


def _normalize_state_dict(sd: Mapping[str, Any], name: str) -> tuple[str, StateDict]:
    """("original" | "diffusers", the ControlNet's tensors) from any state dict a user may have."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in sd):
        # control_v11*.pth, or a whole ControlLDM (model.diffusion_model.*, first_stage_model.*, ...): the control model only.
        sd = {k[len(ORIGINAL_PREFIX):]: v for k, v in sd.items() if k.startswith(ORIGINAL_PREFIX)}
        layout = "original"
    elif any(k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")) for k in sd):
        layout = "original"
    elif any(k.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.")) for k in sd):
        layout = "diffusers"
    elif any(k.startswith("model.diffusion_model.") for k in sd):
        raise UserError(f"{name} is a Stable Diffusion checkpoint without a ControlNet (no control_model.* keys)")
    else:
        raise UserError(
            f"{name} is not a ControlNet checkpoint we know (expected control_model.*/input_hint_block.* or "
            f"controlnet_cond_embedding.* keys; found e.g. {_examples(list(sd)[:50])})"
        )
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{name}: entries that are not tensors: {_examples(bad)}")
    return layout, dict(sd)


def detect_family(obj: Any) -> str:
    """"sd1", "sd2" or "sdxl" for a ControlNet, a diffusers UNet/ControlNetModel, a config, or a state dict.

    SDXL has the text_time addition embedding; SD1.x and SD2.x differ in context width (768 vs 1024) and, for
    other widths, in the transformers' projections (SD2.x: linear).
    """
    if isinstance(obj, ControlNetConfig):
        return _family_from_config(obj.to_dict())
    config = getattr(obj, "config", None)
    if config is not None and not isinstance(obj, Mapping):
        return detect_family(config)
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            layout, sd = _normalize_state_dict(obj, "state dict")
            if layout == "original":
                sd = original_to_diffusers(sd)
            return _family_from_config(_shape_facts(sd))
        return _family_from_config(obj)
    raise TypeError(f"detect_family expects a model, a config or a state dict, got {type(obj).__name__}")


def _config_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, ControlNetConfig):
        return obj.to_dict()
    config = getattr(obj, "config", obj)
    if isinstance(config, ControlNetConfig):
        return config.to_dict()
    return dict(config)


def check_compatible(controlnet: Any, unet: Any) -> None:
    """Raise :class:`UserError` unless ``controlnet``'s residuals fit ``unet`` (models or their configs).

    A ControlNet is a copy of one base's encoder: its family (context width), block widths and layers per block
    must be the base's, or its residuals do not fit the base's skip connections.
    """
    cn, base = _config_dict(controlnet), _config_dict(unet)
    fam_cn, fam_base = detect_family(cn), detect_family(base)
    cross_cn, cross_base = cn.get("cross_attention_dim"), base.get("cross_attention_dim")
    if fam_cn != fam_base or cross_cn != cross_base:
        raise UserError(
            f"this ControlNet is for {fam_cn} (context dim {cross_cn}) but the base model is {fam_base} "
            f"(context dim {cross_base}); use a ControlNet made for {fam_base}, or a {fam_cn} base model"
        )
    blocks_cn, blocks_base = tuple(cn.get("block_out_channels", ())), tuple(base.get("block_out_channels", ()))
    layers_cn, layers_base = cn.get("layers_per_block"), base.get("layers_per_block")
    if blocks_cn != blocks_base or layers_cn != layers_base:
        raise UserError(
            f"this ControlNet ({fam_cn}, block channels {list(blocks_cn)}, {layers_cn} layers per block) does not "
            f"fit the base UNet ({fam_base}, block channels {list(blocks_base)}, {layers_base} layers per block); "
            "use a ControlNet made from this base"
        )


# --------------------------------------------------------------------------------------------- configs


def infer_config(state_dict: Mapping[str, torch.Tensor], name: str = "state dict") -> ControlNetConfig:
    """The ControlNet config of a diffusers-layout state dict, from its shapes and its family's defaults.

    Shapes give the widths, depths, context width, projections, SDXL embedding and hint encoder; the number of
    attention heads comes from the family (SD1.x: 8 heads; SD2.x/SDXL: 64-channel heads).
    """
    sd = state_dict
    if any(k.startswith("lite_blocks.") for k in sd):
        raise UserError(f"{name} is a ControlNet-lite, which shapes cannot describe; load its folder (with config.json)")
    layout = _Layout.from_diffusers(sd, name)
    try:
        blocks = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(layout.num_blocks))
        in_channels = sd["conv_in.weight"].shape[1]
        hint = ["controlnet_cond_embedding.conv_in.weight"] + [
            f"controlnet_cond_embedding.blocks.{2 * k + 1}.weight" for k in range((layout.num_hint_convs - 2) // 2)
        ]
        hint_channels = tuple(sd[k].shape[0] for k in hint)
        conditioning_channels = sd[hint[0]].shape[1]
    except KeyError as err:
        raise UserError(f"{name}: missing {err.args[0]}; the file is incomplete or not a ControlNet") from None
    if any(k.startswith("class_embedding.") for k in sd):
        raise UserError(f"{name} has a class embedding, which shapes cannot describe; pass its config.json (config=...)")

    def depth(prefix: str) -> int:
        return len({m.group(1) for k in sd if (m := re.match(re.escape(prefix) + r"transformer_blocks\.(\d+)\.", k))})

    has_attn = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd) for i in range(layout.num_blocks)]
    mid_attn = any(k.startswith("mid_block.attentions.") for k in sd)
    mid_depth = depth("mid_block.attentions.0.") if mid_attn else 1
    # Blocks without attention have no depth of their own; the last block's depth is the mid block's (diffusers).
    depths = [depth(f"down_blocks.{i}.attentions.0.") if a else 1 for i, a in enumerate(has_attn)]
    if not has_attn[-1]:
        depths[-1] = mid_depth
    if has_attn[-1] and depths[-1] != mid_depth:
        raise UserError(f"{name}: the mid block has {mid_depth} transformer layers but the last block {depths[-1]}; pass config=")

    facts = _shape_facts(sd)
    family = _family_from_config(facts)
    if family == "sd1":
        heads: int | tuple[int, ...] = SD1_NUM_HEADS
    else:
        if any(c % SD2_HEAD_CHANNELS for c in blocks):
            raise UserError(
                f"{name}: cannot infer the attention heads ({family} uses {SD2_HEAD_CHANNELS}-channel heads but "
                f"block channels are {list(blocks)}); pass its config (config=... / --config)"
            )
        heads = tuple(c // SD2_HEAD_CHANNELS for c in blocks)
    kwargs: dict[str, Any] = dict(
        in_channels=in_channels,
        conditioning_channels=conditioning_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        mid_block_type="UNetMidBlock2DCrossAttn" if mid_attn else "UNetMidBlock2D",
        block_out_channels=blocks,
        layers_per_block=layout.layers_per_block,
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else tuple(depths),
        attention_head_dim=heads,
        use_linear_projection=facts["use_linear_projection"],
        conditioning_embedding_out_channels=hint_channels,
        vae_scale_factor=2 ** (len(hint_channels) - 1),
    )
    if facts["cross_attention_dim"] is not None:
        kwargs["cross_attention_dim"] = facts["cross_attention_dim"]
    if facts["addition_embed_type"]:
        adm_in = sd["add_embedding.linear_1.weight"].shape[1]
        if adm_in <= SDXL_NUM_TIME_IDS * SDXL_TIME_EMBED_DIM:
            raise UserError(f"{name}: cannot infer SDXL's addition_time_embed_dim from width {adm_in}; pass config=")
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                      projection_class_embeddings_input_dim=adm_in)
    try:
        return ControlNetConfig(**kwargs)
    except UserError as err:  # shapes no SD-family model has
        raise UserError(f"{name}: {err} (inferred from the tensor shapes); pass its config (config=... / --config)") from None


def _as_config(config: ControlNetConfig | Mapping[str, Any] | str | Path) -> ControlNetConfig:
    """A ControlNetConfig from itself, a dict, a config.json path or a folder holding one.

    A dict with a "controlnet" entry (the fixtures' diffusers_config.json) uses that entry.
    """
    if isinstance(config, ControlNetConfig):
        return config
    source = "config"
    if isinstance(config, (str, Path)):
        path = Path(config).expanduser()
        if path.is_dir():
            path = path / CONFIG_NAME
        source = str(path)
        if not path.exists():
            raise UserError(f"config file {path} does not exist")
        check_regular_file(path, MAX_CONFIG_BYTES)
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as err:  # ValueError: bad UTF-8, bad JSON, a 5000-digit number
            raise UserError(f"{path} is not a readable JSON config: {first_sentence(err)}") from None
    if not isinstance(config, Mapping):
        raise UserError(f"{source}: expected a JSON object, got {type(config).__name__}")
    if isinstance(config.get("controlnet"), Mapping):
        config = config["controlnet"]
    class_name = config.get("_class_name")
    if class_name not in (None, "ControlNetModel", LITE_CLASS_NAME):
        raise UserError(f"{source} describes a {class_name}, not a ControlNetModel")
    try:
        return ControlNetConfig.from_dict(dict(config))
    except UserError as err:  # "invalid ControlNet config: <field> must be ..., got ..."
        raise UserError(f"{source}: {err}") from None


# --------------------------------------------------------------------------------------------- reading files


def _read_file(path: Path) -> dict[str, Any]:
    """The raw key → tensor mapping of a single checkpoint file (format sniffed from its first bytes)."""
    check_regular_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if len(head) < 9:
        raise UserError(f"{path} is empty or truncated ({len(head)} bytes)")
    if head[8:9] == b"{":  # safetensors: 8-byte little-endian header length, then the JSON header
        return read_safetensors(path, want=ORIGINAL_PREFIX)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save zip archive, or a legacy pickle
        obj = read_torch_file(path)
        while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):  # Lightning .ckpt nesting
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict")
        return dict(obj)
    raise UserError(f"{path} is neither a .safetensors nor a PyTorch (.pth/.ckpt) file")


def _diffusers_weights(folder: Path) -> Path:
    for name in DIFFUSERS_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder} has no {' / '.join(DIFFUSERS_WEIGHT_NAMES)}; is it a diffusers ControlNet folder?")


# --------------------------------------------------------------------------------------------- loading


def controlnet_from_state_dict(
    state_dict: Mapping[str, Any],
    config: ControlNetConfig | Mapping[str, Any] | str | Path | None = None,
    name: str = "state dict",
    global_pool_conditions: bool | None = None,
) -> ControlNet:
    """A ControlNet holding the tensors of ``state_dict`` (either layout; the tensors are used as they are).

    Without ``config`` it is inferred from the shapes (:func:`infer_config`); ``global_pool_conditions``, when
    given, overrides the config's. Keys and shapes must match the config exactly and every value must be finite;
    anything missing, extra, mis-shaped, NaN or Inf is a :class:`UserError` naming ``name``.
    """
    layout, sd = _normalize_state_dict(state_dict, name)
    original = layout == "original"
    if original:
        sd = original_to_diffusers(sd, name)
    cfg = _as_config(config) if config is not None else infer_config(sd, name)
    if global_pool_conditions is not None:
        cfg = dataclasses.replace(cfg, global_pool_conditions=global_pool_conditions)

    with torch.device("meta"):  # no random init: every tensor comes from the file
        cn = build_controlnet(cfg)
    to_file = _file_names(cfg) if original else {}
    check_tensors(sd, {k: tuple(v.shape) for k, v in cn.state_dict().items()}, name, "ControlNet config",
                  lambda k: to_file.get(k, k))
    cn.load_state_dict(sd, strict=True, assign=True)
    return cn


def check_tensors(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], name: str, what: str,
                  file_key: Callable[[str], str] = lambda k: k) -> None:
    """Refuse ``sd`` in one line unless it has exactly the ``expected`` keys and shapes, floating point and finite.
    ``what`` names the model in messages; ``file_key`` spells a key as the file does."""
    examples = _examples
    missing = [file_key(k) for k in expected if k not in sd]
    unexpected = [file_key(k) for k in sd if k not in expected]
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys ({examples(missing)})"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys ({examples(unexpected)})"] if unexpected else []
        raise UserError(f"{name} does not match the {what}: {'; '.join(parts)}")
    wrong = [f"{file_key(k)} {list(v.shape)} != {list(expected[k])}" for k, v in sd.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise UserError(f"{name}: {len(wrong)} tensors have the wrong shape for the {what}, e.g. {examples(wrong)}")
    not_float = [file_key(k) for k, v in sd.items() if not v.is_floating_point()]
    if not_float:
        raise UserError(f"{name}: tensors that are not floating point: {examples(not_float)}")
    refuse_non_finite(sd, name, file_key)


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], name: str,
                      file_key: Callable[[str], str] = lambda k: k, cause: str | None = None) -> None:
    """Raise a one-line :class:`UserError` naming the first tensor that holds NaN or Inf (meta tensors, which
    hold no values, are skipped). ``cause``: what the message blames (default: a damaged or diverged checkpoint)."""
    for key, value in tensors.items():
        if value.is_meta or _all_finite(value):
            continue
        nan, count = int(value.isnan().sum()), int((~torch.isfinite(value)).sum())
        what = "NaN" if nan == count else "Inf" if nan == 0 else "NaN and Inf"
        raise UserError(
            f"{name}: tensor {file_key(key)} holds {what} ({count} of {value.numel()} values); "
            + (cause or "the checkpoint is damaged or was saved after training diverged; use another checkpoint")
        )


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite. A finite sum proves it (NaN and Inf propagate through a sum) at a
    fraction of the cost of ``isfinite`` over every value, which only a non-finite sum (overflow) needs."""
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def _file_names(cfg: ControlNetConfig) -> dict[str, str]:
    """Our (diffusers) key → the original layout's key with ``control_model.``, for error messages."""
    mapping = {v: k for k, v in _module_map(_Layout.from_config(cfg)).items()}
    with torch.device("meta"):
        keys = build_controlnet(cfg).state_dict().keys()
    return {k: ORIGINAL_PREFIX + (_rename(k, mapping) or k) for k in keys}


def load_controlnet(
    path: str | Path,
    config: ControlNetConfig | Mapping[str, Any] | str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> ControlNet:
    """Load a ControlNet from a diffusers folder or a single file, in eval mode.

    ``path``: a diffusers folder (config.json + diffusion_pytorch_model.safetensors, or .bin), a single file in the
    original layout (``.pth``/``.ckpt``/``.safetensors``; ``control_model.*`` keys, bare keys, or a whole ControlLDM
    state dict), a single diffusers-layout ``.safetensors``, or the name of a bundled ControlNet.
    ``config``: overrides the folder's config.json or the config inferred from shapes (a ControlNetConfig, a dict,
    or a path to a config.json; a "controlnet" entry in it is used). ``dtype``: default float32.
    Pickles are read with ``weights_only=True``; bad files (truncated, corrupt, NaN/Inf weights, weights that
    overflow fp16) raise a one-line :class:`UserError`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        path = resolve_controlnet(str(path))
    name = str(path)
    pool = None
    if path.is_dir():
        if config is None:
            if not (path / CONFIG_NAME).is_file():
                raise UserError(f"{path} has no {CONFIG_NAME}; pass a diffusers ControlNet folder or a checkpoint file")
            config = path / CONFIG_NAME
        weights = _diffusers_weights(path)
        name = str(weights)
        raw = read_safetensors(weights) if weights.suffix == ".safetensors" else _read_file(weights)
    else:
        raw = _read_file(path)
        if config is None:
            layout, _ = _normalize_state_dict(raw, name)
            beside = path.parent / CONFIG_NAME
            if layout == "diffusers" and beside.is_file():  # e.g. a folder's diffusion_pytorch_model.safetensors
                config = beside
            elif layout == "original" and GLOBAL_POOL_NAME_HINT in path.stem.lower():
                pool = True  # original files carry no config; ControlNet 1.1 shuffle pools (see the constant)
    cn = controlnet_from_state_dict(raw, config, name, global_pool_conditions=pool)
    target = parse_dtype(dtype) or torch.float32
    cast = any(v.dtype != target for v in raw.values())
    cn = cn.to(device=device, dtype=target).eval()
    if cast and target == torch.float16:  # fp16's range ends at 65504: larger fp32/bf16 weights become Inf
        refuse_non_finite(cn.state_dict(), name, cause="it overflows fp16; load it as fp32 or bf16")
    return cn


# --------------------------------------------------------------------------------------------- saving


def check_destination(path: str | Path, format: str = "diffusers") -> Path:
    """Refuse a destination :func:`save_controlnet` cannot write (before any work is done); return it as a Path.

    ``format="diffusers"`` writes a folder: not a weights-file name, not over a file or a folder holding other
    files. ``format="original"`` writes one ``.safetensors`` or ``.pth`` file, not over a folder.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if format == "diffusers":
        if suffix in (".safetensors", *PICKLE_SUFFIXES):
            raise UserError(f"{path}: the diffusers layout is a folder; give a folder name, or use format 'original' for a single file")
        check_folder_destination(path)
    elif format == "original":
        if path.is_dir():
            raise UserError(f"{path} is a folder; the original layout is one file (.safetensors or .pth)")
        if suffix not in (".safetensors", *PICKLE_SUFFIXES):
            raise UserError(f"{path}: the original layout is written as .safetensors or .pth; got suffix {suffix or '(none)'!r}")
    else:
        raise UserError(f"unknown checkpoint format {format!r}; use one of {', '.join(FORMATS)}")
    return path


def save_controlnet(
    controlnet: ControlNet,
    path: str | Path,
    format: str = "diffusers",
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write ``controlnet`` atomically and return the path written.

    ``format="diffusers"``: a folder with config.json + diffusion_pytorch_model.safetensors, loadable by diffusers'
    ``ControlNetModel.from_pretrained`` (keys it does not know, like ``hint_encoder``, are ignored there); see
    :func:`save_diffusers_folder`. ``format="original"``: one file with the released checkpoints'
    ``control_model.*`` keys, ``.safetensors`` or ``.pth`` by the suffix of ``path``. ``dtype``: cast on the way
    out (default: the model's). A failed write (no space, no permission) is a one-line :class:`UserError` and
    leaves nothing behind.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = check_destination(path, format)
    dtype = parse_dtype(dtype)
    if format == "diffusers":
        return save_diffusers_folder(controlnet, path, dtype)
    sd = {k: _for_file(v, dtype) for k, v in original_state_dict(controlnet).items()}
    try:
        with atomic_path(path) as tmp:
            if path.suffix.lower() == ".safetensors":
                save_file(sd, str(tmp), metadata={"format": "pt"})
            else:
                torch.save(sd, tmp)
    except (OSError, SafetensorError) as err:
        raise write_error(path, err) from None
    except RuntimeError:  # torch.save's zip writer reports a failed write as "[enforce fail ...] unexpected pos"
        raise write_error(path, "the write stopped part-way: no space left or a file-size limit") from None
    return path


def save_diffusers_folder(controlnet: ControlNet, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the native layout, atomically: ``directory/config.json`` + ``diffusion_pytorch_model.safetensors``.

    That is diffusers' ControlNetModel folder: ``ControlNetModel.from_pretrained`` reads it (keys it does not
    know, like ``hint_encoder``, are ignored there). ``dtype``: cast on the way out (default: the model's).
    A file, or a folder holding other files, is not replaced; a failed write leaves nothing behind.
    Other layouts: :func:`save_controlnet`.
    """
    return write_model_folder(directory, controlnet.config.to_dict(), controlnet.state_dict(), dtype)


def write_model_folder(directory: str | Path, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                       dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers model folder atomically: ``config.json`` (``config`` plus ``_diffusers_version``) and
    ``diffusion_pytorch_model.safetensors`` (``tensors`` on the CPU, cast to ``dtype`` if given). A file, or a
    folder holding other files, is not replaced; a failed write is a one-line :class:`UserError`."""
    import diffusers
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(directory).expanduser()
    check_folder_destination(path)
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in tensors.items()}
    config = {**config, "_diffusers_version": diffusers.__version__}
    try:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    except (OSError, SafetensorError) as err:
        raise write_error(path, err) from None
    return path


def check_folder_destination(path: Path) -> None:
    """Refuse to write a ControlNet folder over a file, or over a folder holding files a ControlNet folder does
    not (replacing a folder removes what it holds)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a ControlNet folder (a file); choose a new folder name")
    if path.is_dir():
        foreign = sorted(p.name for p in path.iterdir() if p.name not in (CONFIG_NAME, *DIFFUSERS_WEIGHT_NAMES))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 3 else "")
            raise UserError(f"{path} exists and is not a ControlNet folder ({shown}); choose a new folder name")


def write_error(path: Path, err: BaseException | str) -> UserError:
    """A failed checkpoint write (no space, no permission, a file-size limit) as a one-line :class:`UserError`;
    ``err`` is the exception or the words for its cause."""
    cause = err if isinstance(err, str) else getattr(err, "strerror", None) or str(err).strip() or type(err).__name__
    return UserError(f"{path}: cannot write the ControlNet ({cause}); check the folder's permissions and free space")


def _for_file(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to("cpu")
    return (t if dtype is None else t.to(dtype)).contiguous()
