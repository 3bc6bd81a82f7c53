"""The configuration of a UNet ControlNet: :class:`ControlNetConfig`, its limits and its checks.

Field names are diffusers' ``ControlNetModel`` config.json keys, so one config.json serves both libraries; the
fields that are ours (``hint_encoder``, ``vae_scale_factor``, ``architecture``) are documented on the class.
Every value is checked when a config is made, before any module is built: a config.json with a wrong type, an
absurd size or fields that do not fit together is refused in one line naming the field and the value, instead
of failing deep in torch. No torch import: the command line checks a config without loading torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

from controlnet.errors import UserError

# Hint encoder channels of every released checkpoint (cldm.py `input_hint_block`, diffusers
# `conditioning_embedding_out_channels`): 16 → 32 → 96 → 256, one stride-2 conv between consecutive widths.
RELEASED_HINT_CHANNELS = (16, 32, 96, 256)
# The paper's text (Sec. 3.2): "four convolution layers with 4x4 kernels ... channels are 16, 32, 64, 128".
PAPER_HINT_CHANNELS = (16, 32, 64, 128)
HINT_ENCODERS = ("released", "paper")
# "copy": the paper's ControlNet (a trainable copy of the encoder), class ControlNet. "lite": the paper's ablation
# "ControlNet-lite" (Sec. 4.2, Fig. 8c), class ControlNetLite.
ARCHITECTURES = ("copy", "lite")
# The class name a lite ControlNet's config.json carries, so diffusers' ControlNetModel refuses it by name.
LITE_CLASS_NAME = "ControlNetLiteModel"

# Limits of a ControlNetConfig, checked before any module is built: far above every SD-family model, low enough
# that a config.json with absurd values is refused in one line instead of failing deep in torch.
MAX_CHANNELS = 16_384  # the widest SD-family width is 2816 (SDXL's addition embedding input, sd_xl_base.yaml)
MAX_DOWN_BLOCKS = 8  # SD1.x/SD2.x have 4 down blocks, SDXL 3
MAX_LAYERS = 64  # layers_per_block (SD: 2) and transformer layers per block (SDXL: up to 10)
MAX_HINT_CONVS = 8  # widths of the hint encoder: 4 in the releases and in the paper
MAX_VAE_SCALE_FACTOR = 64  # SD-family VAEs downsample 8x
MAX_CLASS_EMBEDS = 100_000  # the SD x4 upscaler's UNet has 1000 (num_class_embeds)
# What the trainable copy and the checkpoint key map are written for: the blocks of SD1.x, SD2.x and SDXL.
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")  # diffusers.models.activations.get_activation


@dataclass
class ControlNetConfig:
    """Everything needed to build a ControlNet; field names match diffusers' ControlNetModel config.json.

    Build one with ``ControlNetConfig.from_unet_config(unet.config)`` or from a saved config.json with
    ``ControlNetConfig.from_dict``. ``hint_encoder`` is ours: "released" (every published checkpoint) or "paper".
    Every field is checked when the config is made (:meth:`check`): a bad one raises a one-line
    :class:`~controlnet.errors.UserError` naming the field and the value.
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = RELEASED_HINT_CHANNELS
    global_pool_conditions: bool = False
    hint_encoder: str = "released"
    # The base VAE's downsampling. The "paper" hint encoder's stride-2 convs follow it (its weight shapes do not
    # tell); the released encoder's follow ``conditioning_embedding_out_channels``. Ours: diffusers ignores it.
    vae_scale_factor: int = 8
    architecture: str = "copy"  # ARCHITECTURES; ours: diffusers knows only "copy"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # JSON lists as tuples: configs compare equal and hash
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Raise a one-line :class:`~controlnet.errors.UserError` naming the first field whose type, range or
        length is wrong, then the first pair of fields that do not fit together."""
        check_list("down_block_types", self.down_block_types, MAX_DOWN_BLOCKS,
                   lambda v: isinstance(v, str) and v in DOWN_BLOCK_TYPES, f"one of {', '.join(DOWN_BLOCK_TYPES)}")
        n = len(self.down_block_types)
        check_integer("in_channels", self.in_channels, 1, MAX_CHANNELS)
        check_integer("conditioning_channels", self.conditioning_channels, 1, MAX_CHANNELS)
        check_bool("flip_sin_to_cos", self.flip_sin_to_cos)
        check_number("freq_shift", self.freq_shift, 0, 1)
        check_choice("mid_block_type", self.mid_block_type, MID_BLOCK_TYPES)
        check_per_block("only_cross_attention", self.only_cross_attention, n, _is_bool, "true or false")
        check_per_block("block_out_channels", self.block_out_channels, n, _is_channels,
                        f"an integer in 1..{MAX_CHANNELS}", scalar=False)
        check_integer("layers_per_block", self.layers_per_block, 1, MAX_LAYERS)
        check_integer("downsample_padding", self.downsample_padding, 0, 1)
        check_positive("mid_block_scale_factor", self.mid_block_scale_factor)
        check_choice("act_fn", self.act_fn, ACTIVATIONS)
        check_integer("norm_num_groups", self.norm_num_groups, 1, MAX_CHANNELS)
        check_positive("norm_eps", self.norm_eps)
        check_integer("cross_attention_dim", self.cross_attention_dim, 1, MAX_CHANNELS)
        check_per_block("transformer_layers_per_block", self.transformer_layers_per_block, n,
                        lambda v: _is_int(v) and 1 <= v <= MAX_LAYERS, f"an integer in 1..{MAX_LAYERS}")
        check_per_block("attention_head_dim", self.attention_head_dim, n, _is_channels,
                        f"an integer in 1..{MAX_CHANNELS}")
        if self.num_attention_heads is not None:
            check_per_block("num_attention_heads", self.num_attention_heads, n, _is_channels,
                            f"an integer in 1..{MAX_CHANNELS}", nullable=True)
        check_bool("use_linear_projection", self.use_linear_projection)
        check_choice("class_embed_type", self.class_embed_type, (None, "timestep", "projection"))
        check_choice("addition_embed_type", self.addition_embed_type, (None, "text_time"))
        check_integer("addition_time_embed_dim", self.addition_time_embed_dim, 1, MAX_CHANNELS, nullable=True)
        check_integer("num_class_embeds", self.num_class_embeds, 1, MAX_CLASS_EMBEDS, nullable=True)
        check_bool("upcast_attention", self.upcast_attention)
        check_choice("resnet_time_scale_shift", self.resnet_time_scale_shift, ("default", "scale_shift"))
        check_integer("projection_class_embeddings_input_dim", self.projection_class_embeddings_input_dim,
                      1, MAX_CHANNELS, nullable=True)
        check_choice("controlnet_conditioning_channel_order", self.controlnet_conditioning_channel_order,
                     ("rgb", "bgr"))
        check_list("conditioning_embedding_out_channels", self.conditioning_embedding_out_channels, MAX_HINT_CONVS,
                   _is_channels, f"an integer in 1..{MAX_CHANNELS}")
        check_bool("global_pool_conditions", self.global_pool_conditions)
        check_choice("hint_encoder", self.hint_encoder, HINT_ENCODERS)
        check_vae_scale_factor(self.vae_scale_factor)
        check_choice("architecture", self.architecture, ARCHITECTURES)
        self._check_consistency()

    def _check_consistency(self) -> None:
        """The rules between fields: what the modules built from them need to fit together."""
        groups = self.norm_num_groups
        if any(c % groups for c in self.block_out_channels):
            refuse(f"norm_num_groups {groups} must divide every block_out_channels entry "
                   f"{shown(self.block_out_channels)} (group normalisation)")
        for i, (heads, width) in enumerate(zip(self.heads_per_block(), self.block_out_channels)):
            if heads > width:
                refuse(f"block {i} has {heads} attention heads but only {width} channels "
                       "(attention_head_dim / num_attention_heads)")
        if self.addition_embed_type == "text_time" and None in (
                self.addition_time_embed_dim, self.projection_class_embeddings_input_dim):
            refuse("addition_embed_type 'text_time' needs addition_time_embed_dim and "
                   "projection_class_embeddings_input_dim")
        if self.class_embed_type == "projection" and self.projection_class_embeddings_input_dim is None:
            refuse("class_embed_type 'projection' needs projection_class_embeddings_input_dim")
        stride2 = self.vae_scale_factor.bit_length() - 1
        if self.hint_encoder == "paper" and stride2 > len(self.conditioning_embedding_out_channels):
            refuse(f"the paper's hint encoder has {len(self.conditioning_embedding_out_channels)} convs "
                   f"(conditioning_embedding_out_channels); it cannot downsample {self.vae_scale_factor}x")

    def per_block(self, value: Any) -> tuple[Any, ...]:
        """A per-block field's value (one value for all blocks, or a sequence) as one entry per down block."""
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(self.block_out_channels)

    def heads_per_block(self) -> tuple[int, ...]:
        """Attention heads of each down block (diffusers' historical naming: ``attention_head_dim`` holds the
        number of heads unless ``num_attention_heads`` is set)."""
        return self.per_block(self.num_attention_heads or self.attention_head_dim)

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding: 4x the first block's (diffusers' ``UNet2DConditionModel``)."""
        return self.block_out_channels[0] * 4

    @property
    def num_residuals(self) -> int:
        """Number of residuals the ControlNet outputs: one per skip connection of the base, plus the mid block."""
        return len(self.skip_layout()) + 1

    def skip_layout(self) -> list[tuple[int, bool]]:
        """(channels, made by a downsampler) of each skip connection of the base's encoder, in order.

        The first is conv_in's output; then each down block gives ``layers_per_block`` skips at its width and,
        except the last block, one more from its stride-2 downsampler (diffusers' ``UNet2DConditionModel``).
        """
        skips = [(self.block_out_channels[0], False)]
        for i, width in enumerate(self.block_out_channels):
            skips += [(width, False)] * self.layers_per_block
            if i < len(self.block_out_channels) - 1:
                skips.append((width, True))
        return skips

    @classmethod
    def from_unet_config(cls, unet_config: Any, **overrides: Any) -> "ControlNetConfig":
        """The ControlNet config that copies a diffusers ``UNet2DConditionModel`` config."""
        src = dict(unet_config)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: src[k] for k in names if k in src and src[k] is not None or (k in src and k in _NULLABLE)}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ControlNetConfig":
        """Build from a config.json dict (ours or diffusers'); keys we do not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown_required = {"encoder_hid_dim", "encoder_hid_dim_type"} & {k for k, v in config.items() if v}
        if unknown_required:
            raise UserError(f"unsupported ControlNet config options {sorted(unknown_required)}")
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-compatible config dict (``_class_name`` ControlNetModel; the lite ablation's is its own)."""
        out: dict[str, Any] = {"_class_name": "ControlNetModel" if self.architecture == "copy" else LITE_CLASS_NAME}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "architecture" and value == "copy":
                continue  # the default: the paper's ControlNet writes no new key, so its files stay as before
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


# Config keys that may legitimately be None in a UNet config and should be copied as such.
_NULLABLE = {
    "num_attention_heads",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "projection_class_embeddings_input_dim",
    "mid_block_type",
}


def released_hint_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The released hint encoder's widths for a VAE that downsamples ``vae_scale_factor`` times: (16, 32, 96, 256)
    for 8x as released; other factors keep the released widths, one width more per stride-2 conv."""
    check_vae_scale_factor(vae_scale_factor)
    n_down = vae_scale_factor.bit_length() - 1
    if n_down < len(RELEASED_HINT_CHANNELS):
        return RELEASED_HINT_CHANNELS[: n_down + 1]
    return RELEASED_HINT_CHANNELS + (RELEASED_HINT_CHANNELS[-1],) * (n_down + 1 - len(RELEASED_HINT_CHANNELS))


# --------------------------------------------------------------------------------------------- the checks
# Each raises a one-line UserError "invalid ControlNet config: <field> must be <what>, got <value>". Types are
# spelled as JSON spells them (a config.json is where a bad value comes from).


def refuse(problem: str) -> NoReturn:
    raise UserError(f"invalid ControlNet config: {problem}")


def shown(value: Any) -> str:
    """A config value as an error message shows it: lists as JSON writes them, long ones cut."""
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_channels(value: Any) -> bool:
    return _is_int(value) and 1 <= value <= MAX_CHANNELS


def check_integer(field: str, value: Any, low: int, high: int, nullable: bool = False) -> None:
    if nullable and value is None:
        return
    if not (_is_int(value) and low <= value <= high):
        refuse(f"{field} must be {'null or ' if nullable else ''}an integer in {low}..{high}, got {shown(value)}")


def check_number(field: str, value: Any, low: float, high: float) -> None:
    if not ((_is_int(value) or isinstance(value, float)) and low <= value <= high):
        refuse(f"{field} must be a number in {low}..{high}, got {shown(value)}")


def check_positive(field: str, value: Any) -> None:
    finite = _is_int(value) or isinstance(value, float) and math.isfinite(value)
    if not (finite and value > 0):
        refuse(f"{field} must be a finite number > 0, got {shown(value)}")


def check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        refuse(f"{field} must be true or false, got {shown(value)}")


def check_choice(field: str, value: Any, choices: tuple[Any, ...]) -> None:
    if not (isinstance(value, (str, type(None))) and value in choices):
        names = ", ".join("null" if c is None else str(c) for c in choices)
        refuse(f"{field} must be one of {names}, got {shown(value)}")


def check_list(field: str, value: Any, max_len: int, ok: Callable[[Any], bool], each: str) -> None:
    """A list of 1..``max_len`` entries, each accepted by ``ok`` (described by ``each``)."""
    if not (isinstance(value, tuple) and 1 <= len(value) <= max_len and all(map(ok, value))):
        refuse(f"{field} must be a list of 1..{max_len} entries, each {each}, got {shown(value)}")


def check_per_block(field: str, value: Any, n: int, ok: Callable[[Any], bool], each: str, scalar: bool = True,
                    nullable: bool = False) -> None:
    """A list of ``n`` entries (one per down block), each accepted by ``ok`` (described by ``each``); with
    ``scalar``, one value for all blocks is accepted too."""
    if scalar and ok(value):
        return
    if isinstance(value, tuple) and len(value) == n and all(map(ok, value)):
        return
    if scalar:
        expected = f"{each}, or a list of {n} of them (one per down block)"
    else:
        expected = f"a list of {n} entries (one per down block), each {each}"
    refuse(f"{field} must be {'null or ' if nullable else ''}{expected}, got {shown(value)}")


def check_vae_scale_factor(value: Any) -> None:
    """A power of two: the VAE's stride-2 convs, which the hint encoder's stride-2 convs follow."""
    if not (_is_int(value) and 1 <= value <= MAX_VAE_SCALE_FACTOR and value & (value - 1) == 0):
        refuse(f"vae_scale_factor must be a power of two in 1..{MAX_VAE_SCALE_FACTOR}, got {shown(value)}")
