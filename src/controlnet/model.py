"""The ControlNet: a trainable copy of a locked SD-family UNet encoder plus zero convolutions.

Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models" (ICCV 2023), Sec. 3:
for a locked block F(x; Θ) the ControlNet computes

    y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2)

where Θc is a trainable copy of Θ and Z are 1x1 convolutions whose weight and bias start at zero, so at
initialisation y_c == y exactly. For a UNet the "copy" is the encoder (conv_in, time embedding, down blocks,
mid block); its skip activations go through one zero conv each and are *added* to the locked UNet's skip
connections (``down_block_additional_residuals`` / ``mid_block_additional_residual`` in diffusers).

:class:`ControlNet` is that model. :class:`ControlNetLite` is the paper's ablation "ControlNet-lite" (Sec. 4.2,
Fig. 8c), the same model with the trainable copy replaced by one convolution per encoder layer.
:func:`build_controlnet` builds either from a :class:`ControlNetConfig` (its ``architecture``).

Module attribute names follow diffusers' ``ControlNetModel`` (``controlnet_cond_embedding``,
``controlnet_down_blocks``, ``controlnet_mid_block``, ...) so state dicts move between the two unconverted, and
:meth:`ControlNet.save_pretrained` writes diffusers' folder layout. The building blocks themselves (down blocks,
mid block, time embedding) come from diffusers, the field's library for the base models.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

import diffusers
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UNetMidBlock2DCrossAttn, get_down_block
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from controlnet.errors import UserError
from controlnet.fileio import atomic_path

# Guess mode ("CFG resolution weighting") scales residual i of N by 0.825**(N-1-i); the mid residual gets 1.0.
# Source: lllyasviel/ControlNet, gradio_*2image.py: `[strength * (0.825 ** float(12 - i)) for i in range(13)]`.
GUESS_MODE_BASE = 0.825

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

# The native (diffusers ControlNetModel) folder layout.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Weight files of a diffusers folder, in order of preference.
DIFFUSERS_WEIGHT_NAMES = (WEIGHTS_NAME, "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin")

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


def guess_mode_scales(num_residuals: int, strength: float = 1.0) -> list[float]:
    """Per-residual scales of the original guess mode: residual i of N gets strength * 0.825**(N-1-i).

    ``num_residuals`` counts the down residuals *and* the mid residual (13 for SD1.5), so the mid residual
    (the last) gets ``strength``. Source: lllyasviel/ControlNet gradio demos (``0.825 ** float(12 - i)``).
    """
    if num_residuals < 1:
        raise ValueError(f"num_residuals must be >= 1, got {num_residuals}")
    return [strength * GUESS_MODE_BASE ** float(num_residuals - 1 - i) for i in range(num_residuals)]


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class _Rule:
    """What a config field accepts: ``ok(value, num_blocks)``, and the words an error message uses for it
    (``{n}`` stands for the number of down blocks)."""

    expected: str
    ok: Callable[[Any, int], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float) and math.isfinite(value)


def _integer(low: int, high: int) -> _Rule:
    return _Rule(f"an integer in {low}..{high}", lambda v, n: _is_int(v) and low <= v <= high)


def _number(low: float, high: float) -> _Rule:
    return _Rule(f"a number in {low}..{high}", lambda v, n: _is_real(v) and low <= v <= high)


_POSITIVE = _Rule("a finite number > 0", lambda v, n: _is_real(v) and v > 0)
_BOOL = _Rule("true or false", lambda v, n: isinstance(v, bool))


def _one_of(choices: tuple[Any, ...]) -> _Rule:
    names = ", ".join("null" if c is None else str(c) for c in choices)
    return _Rule(f"one of {names}", lambda v, n: isinstance(v, (str, type(None))) and v in choices)


def _optional(rule: _Rule) -> _Rule:
    return _Rule(f"null or {rule.expected}", lambda v, n: v is None or rule.ok(v, n))


def _list(rule: _Rule, max_len: int) -> _Rule:
    return _Rule(f"a list of 1..{max_len} entries, each {rule.expected}",
                 lambda v, n: isinstance(v, tuple) and 1 <= len(v) <= max_len and all(rule.ok(x, n) for x in v))


def _per_block(rule: _Rule, scalar: bool = True) -> _Rule:
    """One entry per down block (a list of ``n``); with ``scalar``, one value for all blocks is accepted too."""
    words = f"{rule.expected}, or a list of {{n}} of them (one per down block)" if scalar else (
        f"a list of {{n}} entries (one per down block), each {rule.expected}")
    return _Rule(words, lambda v, n: (scalar and rule.ok(v, n)) or (
        isinstance(v, tuple) and len(v) == n and all(rule.ok(x, n) for x in v)))


def _power_of_two(high: int) -> _Rule:
    return _Rule(f"a power of two in 1..{high}", lambda v, n: _is_int(v) and 1 <= v <= high and v & (v - 1) == 0)


# Every field of ControlNetConfig and what it accepts (ControlNetConfig.check); types as JSON spells them.
_CHANNELS = _integer(1, MAX_CHANNELS)
_RULES: dict[str, _Rule] = {
    "in_channels": _CHANNELS,
    "conditioning_channels": _CHANNELS,
    "flip_sin_to_cos": _BOOL,
    "freq_shift": _number(0, 1),
    "down_block_types": _list(_one_of(DOWN_BLOCK_TYPES), MAX_DOWN_BLOCKS),
    "mid_block_type": _one_of(MID_BLOCK_TYPES),
    "only_cross_attention": _per_block(_BOOL),
    "block_out_channels": _per_block(_CHANNELS, scalar=False),
    "layers_per_block": _integer(1, MAX_LAYERS),
    "downsample_padding": _integer(0, 1),
    "mid_block_scale_factor": _POSITIVE,
    "act_fn": _one_of(ACTIVATIONS),
    "norm_num_groups": _CHANNELS,
    "norm_eps": _POSITIVE,
    "cross_attention_dim": _CHANNELS,
    "transformer_layers_per_block": _per_block(_integer(1, MAX_LAYERS)),
    "attention_head_dim": _per_block(_CHANNELS),
    "num_attention_heads": _optional(_per_block(_CHANNELS)),
    "use_linear_projection": _BOOL,
    "class_embed_type": _one_of((None, "timestep", "projection")),
    "addition_embed_type": _one_of((None, "text_time")),
    "addition_time_embed_dim": _optional(_CHANNELS),
    "num_class_embeds": _optional(_integer(1, MAX_CLASS_EMBEDS)),
    "upcast_attention": _BOOL,
    "resnet_time_scale_shift": _one_of(("default", "scale_shift")),
    "projection_class_embeddings_input_dim": _optional(_CHANNELS),
    "controlnet_conditioning_channel_order": _one_of(("rgb", "bgr")),
    "conditioning_embedding_out_channels": _list(_CHANNELS, MAX_HINT_CONVS),
    "global_pool_conditions": _BOOL,
    "hint_encoder": _one_of(HINT_ENCODERS),
    "vae_scale_factor": _power_of_two(MAX_VAE_SCALE_FACTOR),
    "architecture": _one_of(ARCHITECTURES),
}


def _shown(value: Any) -> str:
    """A config value as an error message shows it: lists as JSON writes them, long ones cut."""
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class ControlNetConfig:
    """Everything needed to build a ControlNet; field names match diffusers' ControlNetModel config.json.

    Build one with ``ControlNetConfig.from_unet_config(unet.config)`` or from a saved config.json with
    ``ControlNetConfig.from_dict``. ``hint_encoder`` is ours: "released" (every published checkpoint) or "paper".
    Every field is checked when the config is made (:meth:`check`): a bad one raises a one-line
    :class:`UserError` naming the field and the value.
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
        """Raise a one-line :class:`UserError` naming the first field whose type, range or length is wrong."""
        n = len(self.down_block_types) if _RULES["down_block_types"].ok(self.down_block_types, 0) else 0
        for f in dataclasses.fields(self):
            rule, value = _RULES[f.name], getattr(self, f.name)
            if not rule.ok(value, n):
                raise UserError(f"invalid ControlNet config: {f.name} must be {rule.expected.format(n=n)}, "
                                f"got {_shown(value)}")
        self._check_consistency()

    def _check_consistency(self) -> None:
        """The rules between fields: what the modules built from them need to fit together."""

        def refuse(problem: str) -> NoReturn:
            raise UserError(f"invalid ControlNet config: {problem}")

        groups = self.norm_num_groups
        if any(c % groups for c in self.block_out_channels):
            refuse(f"norm_num_groups {groups} must divide every block_out_channels entry "
                   f"{_shown(self.block_out_channels)} (group normalisation)")
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


# --------------------------------------------------------------------------------------------- building blocks


def _zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 convolution with weight and bias exactly zero (the paper's Z(·; Θz))."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def zero_convs(config: ControlNetConfig) -> nn.ModuleList:
    """One zero conv per skip connection of the base's encoder (``controlnet_down_blocks``)."""
    return nn.ModuleList([_zero_conv(channels) for channels, _ in config.skip_layout()])


def released_hint_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The released hint encoder's widths for a VAE that downsamples ``vae_scale_factor`` times: (16, 32, 96, 256)
    for 8x as released; other factors keep the released widths, one width more per stride-2 conv."""
    if not _RULES["vae_scale_factor"].ok(vae_scale_factor, 0):
        raise UserError(f"vae_scale_factor must be {_RULES['vae_scale_factor'].expected}, got {vae_scale_factor!r}")
    n_down = vae_scale_factor.bit_length() - 1
    if n_down < len(RELEASED_HINT_CHANNELS):
        return RELEASED_HINT_CHANNELS[: n_down + 1]
    return RELEASED_HINT_CHANNELS + (RELEASED_HINT_CHANNELS[-1],) * (n_down + 1 - len(RELEASED_HINT_CHANNELS))


class HintEncoder(nn.Module):
    """The released hint encoder E(c): image-space condition (B, 3, H, W) → (B, C0, H/s, W/s).

    Layout of every released checkpoint (cldm.py ``input_hint_block``, diffusers
    ``ControlNetConditioningEmbedding``): conv 3→c0, then for each consecutive pair (a, b) of ``channels`` a
    3x3 conv a→a and a stride-2 3x3 conv a→b, SiLU after each; then a zero-initialised 3x3 conv to C0. So
    ``len(channels) - 1`` stride-2 convs: 3 for (16, 32, 96, 256), matching the VAE's 8x downsampling.
    """

    def __init__(self, out_channels: int, conditioning_channels: int = 3, channels: Sequence[int] = RELEASED_HINT_CHANNELS):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(hint))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class PaperHintEncoder(nn.Module):
    """The hint encoder as the paper's text describes it (Sec. 3.2), an option for new training runs.

    "Four convolution layers with 4x4 kernels and 2x2 strides (activated by ReLU, channels are 16, 32, 64,
    128, initialised with Gaussian weights, trained jointly with the full model)". Four stride-2 convs would
    downsample 16x, not the VAE's 8x (512 → 64), so only the last log2(vae_scale_factor) convs use stride 2
    and the first ones stride 1 (4x4 kernels with asymmetric padding keep the size). The encoder's output
    enters through a zero 1x1 conv, the paper's Z(c; Θz1), so the model still starts as the locked base.
    """

    GAUSSIAN_STD = 0.02  # the paper says "Gaussian weights" without a value; 0.02 is the usual choice.

    def __init__(self, out_channels: int, conditioning_channels: int = 3, channels: Sequence[int] = PAPER_HINT_CHANNELS, vae_scale_factor: int = 8):
        super().__init__()
        num_down = vae_scale_factor.bit_length() - 1
        if 2**num_down != vae_scale_factor or num_down > len(channels):
            raise ValueError(f"the paper's hint encoder has {len(channels)} convs; cannot downsample {vae_scale_factor}x")
        self.stride2 = [i >= len(channels) - num_down for i in range(len(channels))]
        layers = []
        c_in = conditioning_channels
        for c_out, s2 in zip(channels, self.stride2):
            conv = nn.Conv2d(c_in, c_out, kernel_size=4, stride=2 if s2 else 1, padding=1 if s2 else 0)
            nn.init.normal_(conv.weight, std=self.GAUSSIAN_STD)
            nn.init.zeros_(conv.bias)
            layers.append(conv)
            c_in = c_out
        self.convs = nn.ModuleList(layers)
        self.conv_out = nn.Conv2d(c_in, out_channels, kernel_size=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = hint
        for conv, s2 in zip(self.convs, self.stride2):
            if not s2:
                h = F.pad(h, (1, 2, 1, 2))  # a 4x4 kernel at stride 1 needs 3 pixels of padding in total
            h = F.relu(conv(h))
        return self.conv_out(h)


def make_hint_encoder(config: ControlNetConfig) -> nn.Module:
    """The config's hint encoder E(c), its output ``block_out_channels[0]`` wide and exactly zero at init."""
    c = config
    if c.hint_encoder == "released":
        return HintEncoder(c.block_out_channels[0], c.conditioning_channels, c.conditioning_embedding_out_channels)
    return PaperHintEncoder(c.block_out_channels[0], c.conditioning_channels, c.conditioning_embedding_out_channels,
                            c.vae_scale_factor)


@dataclass
class ControlNetOutput:
    """Residuals for the locked UNet, in encoder order.

    ``down_residuals`` go to ``down_block_additional_residuals`` (one per skip connection) and
    ``mid_residual`` to ``mid_block_additional_residual``.
    """

    down_residuals: tuple[torch.Tensor, ...]
    mid_residual: torch.Tensor

    def __add__(self, other: "ControlNetOutput") -> "ControlNetOutput":
        """Composition of several ControlNets: their residuals add, with no other weighting (the paper, Sec. 3.4,
        "Composing multiple ControlNets")."""
        return ControlNetOutput(
            tuple(a + b for a, b in zip(self.down_residuals, other.down_residuals)),
            self.mid_residual + other.mid_residual,
        )

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a diffusers ``UNet2DConditionModel`` call."""
        return {
            "down_block_additional_residuals": self.down_residuals,
            "mid_block_additional_residual": self.mid_residual,
        }


# --------------------------------------------------------------------------------------------- the paper's model


class ControlNet(nn.Module):
    """A ControlNet for an SD-family UNet (SD1.x, SD2.x, SDXL): the paper's model.

    Build a new one with :meth:`from_unet` (a copy of the base's encoder, zero convs at zero), or load one with
    ``controlnet.load_controlnet``. Call it like the base's encoder and feed the output to the locked UNet::

        cn = ControlNet.from_unet(unet)
        res = cn(latents, t, text_emb, hint)               # hint: (B, 3, 8h, 8w) in [0, 1]
        eps = unet(latents, t, text_emb, **res.unet_kwargs()).sample
    """

    architecture = "copy"  # the config's architecture this class builds
    # The base UNet's modules that from_unet copies, weights included, into the new ControlNet.
    copied_from_unet = ("time_proj", "time_embedding", "class_embedding", "add_time_proj", "add_embedding",
                        "conv_in", "down_blocks", "mid_block")

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        _check_architecture(self, config)
        self.config = config
        c = config
        # Modules are registered in the order of the first releases of this class: training checkpoints stored
        # the optimizer state by parameter index, so the order must not change (resuming would mix tensors up).
        self._build_time_embedding()  # copied from the base: sinusoidal projection then a 2-layer MLP
        # x + Z(c): the copied conv_in and the hint encoder E(c), their outputs added.
        self.conv_in = nn.Conv2d(c.in_channels, c.block_out_channels[0], kernel_size=3, padding=1)
        self.controlnet_cond_embedding = make_hint_encoder(c)
        # The trainable copy of the encoder, one zero conv per skip connection, the copied mid block and its zero conv.
        self.down_blocks = self._copied_down_blocks()
        self.controlnet_down_blocks = zero_convs(c)
        self.mid_block = self._copied_mid_block()
        self.controlnet_mid_block = _zero_conv(c.block_out_channels[-1])

    def _build_time_embedding(self) -> None:
        """The time embedding (+ class / SDXL addition embeddings) of the copy, as the base's."""
        c = self.config
        c0 = c.block_out_channels[0]
        time_embed_dim = c.time_embed_dim
        self.time_proj = Timesteps(c0, c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(c0, time_embed_dim, act_fn=c.act_fn)
        if c.class_embed_type is None and c.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(c.num_class_embeds, time_embed_dim)
        elif c.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(c0, time_embed_dim)
        elif c.class_embed_type == "projection":
            self.class_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, time_embed_dim)
        else:
            self.class_embedding = None
        if c.addition_embed_type == "text_time":  # SDXL: pooled text embedding + size/crop time ids
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, time_embed_dim)

    def _copied_down_blocks(self) -> nn.ModuleList:
        """The trainable copy's down blocks (diffusers' blocks, the base's layout)."""
        c = self.config
        heads, head_dim = c.heads_per_block(), c.per_block(c.attention_head_dim)
        cross_only, layers = c.per_block(c.only_cross_attention), c.per_block(c.transformer_layers_per_block)
        blocks = nn.ModuleList()
        out_ch = c.block_out_channels[0]
        for i, block_type in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, c.block_out_channels[i]
            blocks.append(
                get_down_block(
                    block_type,
                    num_layers=c.layers_per_block,
                    transformer_layers_per_block=layers[i],
                    in_channels=in_ch,
                    out_channels=out_ch,
                    temb_channels=c.time_embed_dim,
                    add_downsample=i < len(c.down_block_types) - 1,
                    resnet_eps=c.norm_eps,
                    resnet_act_fn=c.act_fn,
                    resnet_groups=c.norm_num_groups,
                    cross_attention_dim=c.cross_attention_dim,
                    num_attention_heads=heads[i],
                    attention_head_dim=head_dim[i],
                    downsample_padding=c.downsample_padding,
                    use_linear_projection=c.use_linear_projection,
                    only_cross_attention=cross_only[i],
                    upcast_attention=c.upcast_attention,
                    resnet_time_scale_shift=c.resnet_time_scale_shift,
                )
            )
        return blocks

    def _copied_mid_block(self) -> nn.Module:
        """The trainable copy's mid block."""
        c = self.config
        mid_ch = c.block_out_channels[-1]
        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            return UNetMidBlock2DCrossAttn(
                transformer_layers_per_block=c.per_block(c.transformer_layers_per_block)[-1],
                in_channels=mid_ch,
                temb_channels=c.time_embed_dim,
                resnet_eps=c.norm_eps,
                resnet_act_fn=c.act_fn,
                output_scale_factor=c.mid_block_scale_factor,
                resnet_time_scale_shift=c.resnet_time_scale_shift,
                cross_attention_dim=c.cross_attention_dim,
                num_attention_heads=c.heads_per_block()[-1],
                resnet_groups=c.norm_num_groups,
                use_linear_projection=c.use_linear_projection,
                upcast_attention=c.upcast_attention,
            )
        return UNetMidBlock2D(
            in_channels=mid_ch,
            temb_channels=c.time_embed_dim,
            num_layers=0,
            resnet_eps=c.norm_eps,
            resnet_act_fn=c.act_fn,
            output_scale_factor=c.mid_block_scale_factor,
            resnet_groups=c.norm_num_groups,
            resnet_time_scale_shift=c.resnet_time_scale_shift,
            add_attention=False,
        )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        conditioning_channels: int = 3,
        hint_encoder: str = "released",
        vae_scale_factor: int = 8,
        global_pool_conditions: bool = False,
        load_weights_from_unet: bool = True,
        architecture: str | None = None,
    ) -> "ControlNet":
        """A new ControlNet whose encoder is a copy, with weights, of a diffusers ``UNet2DConditionModel``'s.

        ``architecture`` (default: this class's) picks the model: "copy" builds :class:`ControlNet`, "lite" the
        paper's ControlNet-lite ablation (:class:`ControlNetLite`: only conv_in is copied).

        The hint encoder has log2(``vae_scale_factor``) stride-2 convs so conditions are given at image
        resolution. Zero convs (and the hint encoder's last conv) start at exactly zero, so the augmented UNet's
        output equals the base's bit for bit until training moves them.
        """
        channels = PAPER_HINT_CHANNELS if hint_encoder == "paper" else released_hint_channels(vae_scale_factor)
        config = ControlNetConfig.from_unet_config(
            unet.config,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=channels,
            hint_encoder=hint_encoder,
            global_pool_conditions=global_pool_conditions,
            vae_scale_factor=vae_scale_factor,
            architecture=architecture or cls.architecture,
        )
        cn = build_controlnet(config)
        if load_weights_from_unet:
            for name in cn.copied_from_unet:
                module = getattr(unet, name, None)
                if module is not None:
                    setattr(cn, name, copy.deepcopy(module))
        # The copy is trainable even when the base was frozen first (deepcopy keeps requires_grad=False).
        cn.requires_grad_(True)
        return cn.to(dtype=next(unet.parameters()).dtype)

    # ------------------------------------------------------------------ forward

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """E(c): condition image (B, 3, H, W) in [0, 1] → features (B, C0, H/8, W/8).

        Independent of the timestep: a sampler computes it once per generation and passes it as
        ``hint_embedding``.
        """
        if self.config.controlnet_conditioning_channel_order == "bgr":
            hint = torch.flip(hint, dims=[1])
        return self.controlnet_cond_embedding(hint.to(self.dtype))

    def time_embed(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                   added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The copied time (+ class / SDXL addition) embedding, (B, 4*C0)."""
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
        t = t.reshape(-1).to(sample.device).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(dtype=sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this ControlNet needs class_labels (class_embed_type is set)")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(dtype=emb.dtype)
        if self.config.addition_embed_type == "text_time":
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise ValueError("an SDXL ControlNet needs added_cond_kwargs with 'text_embeds' and 'time_ids'")
            text_embeds = added_cond_kwargs["text_embeds"]
            time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].flatten()).reshape(text_embeds.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        return emb

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        hint: torch.Tensor | None = None,
        conditioning_scale: float | Sequence[float] = 1.0,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        hint_embedding: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> ControlNetOutput:
        """Residuals for the locked UNet.

        Args:
            sample: noisy latents (B, 4, h, w).
            timestep: scalar or (B,) diffusion timesteps.
            encoder_hidden_states: text embeddings (B, L, D).
            hint: condition image (B, 3, 8h, 8w) in [0, 1]; or pass ``hint_embedding`` from :meth:`encode_hint`.
            conditioning_scale: one float, or one value per residual (``num_residuals``: down residuals then mid),
                e.g. :func:`guess_mode_scales`.
            added_cond_kwargs: SDXL's ``text_embeds`` and ``time_ids``.
        """
        emb = self.time_embed(sample, timestep, added_cond_kwargs, class_labels)  # (B, 4*C0)
        h = self.conv_in(sample) + self._hint_embedding(hint, hint_embedding)  # (B, C0, h, w): x + Z(c)
        skips = [h]
        for block in self.down_blocks:  # the trainable copy F(·; Θc), one skip per layer
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips.extend(res)
        if getattr(self.mid_block, "has_cross_attention", False):
            h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h = self.mid_block(h, emb)
        return self._residuals(skips, h, conditioning_scale)

    def _hint_embedding(self, hint: torch.Tensor | None, hint_embedding: torch.Tensor | None) -> torch.Tensor:
        if hint_embedding is not None:
            return hint_embedding
        if hint is None:
            raise ValueError("pass either hint or hint_embedding")
        return self.encode_hint(hint)

    def _residuals(self, skips: list[torch.Tensor], mid: torch.Tensor,
                   conditioning_scale: float | Sequence[float]) -> ControlNetOutput:
        """The zero convs Z(·; Θz2) over the skips and the mid features, scaled (and pooled) as configured."""
        down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(mid)
        n = len(down) + 1
        if isinstance(conditioning_scale, (int, float)):
            scales = [float(conditioning_scale)] * n
        else:
            scales = [float(s) for s in conditioning_scale]
            if len(scales) != n:
                raise ValueError(f"conditioning_scale has {len(scales)} values; this ControlNet has {n} residuals")
        if any(s != 1.0 for s in scales):
            down = [r * s for r, s in zip(down, scales)]
            mid = mid * scales[-1]
        if self.config.global_pool_conditions:  # ControlNet 1.1 shuffle: residuals averaged over H, W
            down = [r.mean(dim=(2, 3), keepdim=True) for r in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return ControlNetOutput(tuple(down), mid)

    @property
    def num_residuals(self) -> int:
        return len(self.controlnet_down_blocks) + 1

    def zero_convs(self) -> list[nn.Conv2d]:
        """The zero 1x1 convs (down then mid), e.g. to check they start at zero or to inspect their growth."""
        return [*self.controlnet_down_blocks, self.controlnet_mid_block]

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write the native layout, atomically: ``directory/config.json`` + ``diffusion_pytorch_model.safetensors``.

        That is diffusers' ControlNetModel folder: ``ControlNetModel.from_pretrained`` reads it (keys it does not
        know, like ``hint_encoder``, are ignored there). ``dtype``: cast on the way out (default: the model's).
        A file, or a folder holding other files, is not replaced; a failed write leaves nothing behind.
        Other layouts: :func:`controlnet.checkpoints.save_controlnet`.
        """
        path = Path(directory).expanduser()
        check_folder_destination(path)
        tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        config = {**self.config.to_dict(), "_diffusers_version": diffusers.__version__}
        try:
            with atomic_path(path) as tmp:
                tmp.mkdir()
                (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        except (OSError, SafetensorError) as err:
            raise write_error(path, err) from None
        return path


def _check_architecture(model: nn.Module, config: ControlNetConfig) -> None:
    if config.architecture != model.architecture:
        raise ValueError(f"{type(model).__name__} builds architecture {model.architecture!r}, the config says "
                         f"{config.architecture!r}; build it with build_controlnet(config)")


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


# --------------------------------------------------------------------------------------------- the lite ablation


class ControlNetLite(ControlNet):
    """The paper's ablation "ControlNet-lite" (Sec. 4.2, Fig. 8c): the trainable copy replaced by one convolution
    per encoder layer, so it sees the latent and the condition but neither the timestep nor the prompt.

    It is used wherever a :class:`ControlNet` is: the same call, the same residuals, hint encoder, zero convs and
    native layout (``_class_name`` ``ControlNetLiteModel``, ``"architecture": "lite"``, so diffusers refuses it by
    name; the original layout has no place for it). It builds its own modules instead of the trainable copy.
    """

    architecture = "lite"
    copied_from_unet = ("conv_in",)

    def __init__(self, config: ControlNetConfig):
        nn.Module.__init__(self)  # not ControlNet.__init__: that builds the trainable copy this model replaces
        _check_architecture(self, config)
        self.config = config
        c = config
        # Registered in the order lite checkpoints were first saved with.
        self.conv_in = nn.Conv2d(c.in_channels, c.block_out_channels[0], kernel_size=3, padding=1)
        self.controlnet_cond_embedding = make_hint_encoder(c)
        self.lite_blocks = self._lite_convs()
        self.controlnet_down_blocks = zero_convs(c)
        self.controlnet_mid_block = _zero_conv(c.block_out_channels[-1])

    def _lite_convs(self) -> nn.ModuleList:
        """One 3x3 conv (then SiLU) per skip connection after conv_in, and one for the mid block.

        Each conv maps the previous skip's features to the next skip's width, with stride 2 where the base's
        encoder downsamples, so the residuals have the shapes the locked UNet expects.
        """
        skips = self.config.skip_layout()
        convs = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2 if down else 1)
                 for (c_in, _), (c_out, down) in zip(skips[:-1], skips[1:])]
        convs.append(nn.Conv2d(skips[-1][0], self.config.block_out_channels[-1], kernel_size=3, padding=1))  # mid
        return nn.ModuleList(convs)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        hint: torch.Tensor | None = None,
        conditioning_scale: float | Sequence[float] = 1.0,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        hint_embedding: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> ControlNetOutput:
        """Residuals from x + E(c) alone, as :meth:`ControlNet.forward` (whose arguments it takes):
        ``timestep``, ``encoder_hidden_states``, ``added_cond_kwargs`` and ``class_labels`` are ignored."""
        h = self.conv_in(sample) + self._hint_embedding(hint, hint_embedding)  # (B, C0, h, w): x + Z(c)
        skips = [h]
        for conv in self.lite_blocks[:-1]:  # one conv per skip connection of the base
            h = F.silu(conv(h))
            skips.append(h)
        mid = F.silu(self.lite_blocks[-1](h))  # (B, C_last, h', w'): the mid block's conv
        return self._residuals(skips, mid, conditioning_scale)


# The class of each architecture name (ControlNetConfig.architecture).
MODEL_CLASSES: dict[str, type[ControlNet]] = {"copy": ControlNet, "lite": ControlNetLite}


def build_controlnet(config: ControlNetConfig) -> ControlNet:
    """A new model of ``config.architecture`` (:class:`ControlNet` or :class:`ControlNetLite`), zero convs at zero.

    Weights are freshly initialised; build it under ``torch.device("meta")`` to load weights into it instead.
    """
    return MODEL_CLASSES[config.architecture](config)
