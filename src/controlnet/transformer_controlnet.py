"""ControlNets for transformer bases (FLUX.1, SD3/SD3.5): a trainable copy of the base's first blocks.

The paper's construction (Zhang, Rao, Agrawala, ICCV 2023, Sec. 3) carries over unchanged: a trainable copy of
the locked base's input embedders and first blocks, a zero-initialised embedder for the condition added to the
copy's image tokens, and one zero-initialised linear per copied block, whose output is a residual added to the
image tokens of a block of the locked base. At initialisation every residual is exactly zero, so the base's
output is reproduced bit for bit.

Two models, one per backbone, with the module names of diffusers' ``FluxControlNetModel`` /
``SD3ControlNetModel`` so that state dicts move between them unconverted:

* :class:`FluxControlNet`: copies of ``FluxTransformerBlock`` (double-stream) and ``FluxSingleTransformerBlock``
  blocks. The condition is VAE latents packed like the image tokens (InstantX, Shakker-Labs) or pixels through a
  hint encoder (XLabs). Union ControlNets add a learnt mode embedding as an extra text token.
* :class:`SD3ControlNet`: copies of ``JointTransformerBlock`` blocks (InstantX SD3), or, for Stability's SD3.5
  ControlNets, ``SD3SingleTransformerBlock`` blocks over the image tokens alone, which share the base's patch
  embedding.
* :class:`QwenImageControlNet` (at the end): copies of ``QwenImageTransformerBlock`` blocks (InstantX Qwen-Image
  ControlNet-Union and -Inpainting); the condition is packed VAE latents, placed by Flux's "interval" rule.

All return :class:`~controlnet.residuals.Residuals` keyed by the base block each residual is added to:
``("block", i)`` for Flux's double-stream and SD3's joint block i, ``("single", i)`` for Flux's single-stream
block i, placed by the family's rule (:func:`residual_index`); :func:`transformer_kwargs` hands them to a diffusers
transformer.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.utils.checkpoint
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import (CombinedTimestepGuidanceTextProjEmbeddings, CombinedTimestepTextProjEmbeddings,
                                         PatchEmbed)
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxSingleTransformerBlock, FluxTransformerBlock
from diffusers.models.transformers.transformer_qwenimage import (QwenEmbedRope, QwenImageTransformerBlock,
                                                                 QwenTimestepProjEmbeddings, compute_text_seq_len_from_mask)
from diffusers.models.transformers.transformer_sd3 import SD3SingleTransformerBlock
from torch import nn

from controlnet.checkpoints import write_model_folder
from controlnet.errors import UserError
from controlnet.hint_encoders import HintEncoder  # XLabs' hint encoder has the released UNet ControlNets' layout
from controlnet.residuals import BLOCK, SINGLE, Residuals

FLUX = "flux"
SD3 = "sd3"
QWEN = "qwenimage"
# diffusers' class names, written into config.json so that diffusers' from_pretrained reads our folders.
CLASS_NAMES = {FLUX: "FluxControlNetModel", SD3: "SD3ControlNetModel", QWEN: "QwenImageControlNetModel"}
FAMILY_TITLES = {FLUX: "Flux", SD3: "SD3", QWEN: "Qwen-Image"}

# Where residual i of a ControlNet with n blocks goes among the N blocks of the base:
#   "interval" (InstantX/Shakker Flux, diffusers FluxTransformer2DModel): base block b gets b // ceil(N / n);
#   "repeat"   (XLabs Flux, diffusers `controlnet_blocks_repeat=True`): base block b gets b % n;
#   "sd3"      (diffusers SD3Transformer2DModel): base block b gets int(b / (N / n)), except the last block,
#              which is context-pre-only and gets none.
PLACEMENTS = ("interval", "repeat", "sd3")

# FLUX.1's rotary axes (black-forest-labs/FLUX.1-dev transformer/config.json `axes_dims_rope`) for its 128-wide
# attention heads: what a Flux ControlNet file without a config is given.
FLUX1_AXES_DIMS_ROPE = (16, 56, 56)
FLUX1_HEAD_DIM = 128
# Rotary frequency base of every Flux model (diffusers FluxTransformer2DModel: FluxPosEmbed(theta=10000)).
FLUX_ROPE_THETA = 10000
# Flux packs 2x2 latent patches into one token (diffusers FluxPipeline._pack_latents).
FLUX_LATENT_PATCH = 2
# XLabs' hint encoder (x-flux src/flux/controlnet.py `input_hint_block`): 8 convs of 16 channels, three of them
# stride 2; the same layout as diffusers' ControlNetConditioningEmbedding with block_out_channels (16, 16, 16, 16).
XLABS_HINT_CHANNELS = (16, 16, 16, 16)

# Union ControlNets: the index of each control mode in the mode embedding. Source: the "Control Mode" table of the
# InstantX/FLUX.1-dev-Controlnet-Union model card, repeated by Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro ("canny
# (0), tile (1), depth (2), blur (3), pose (4), gray (5), low quality (6)"). Their config has num_mode 10; 7 are named.
FLUX_UNION_MODES = ("canny", "tile", "depth", "blur", "pose", "gray", "lq")
UNION_MODE_ALIASES = {"low quality": "lq", "low-quality": "lq", "low_quality": "lq", "grey": "gray"}
# Stability's SD3.5 ControlNets store a `control_type` scalar. Source: ComfyUI comfy/controlnet.py
# load_controlnet_sd35 ("blur_cnet = control_type == 0", canny == 1, depth == 2).
SD35_CONTROL_TYPES = {0: "blur", 1: "canny", 2: "depth"}


def residual_index(placement: str, block: int, num_base: int, num_control: int) -> int | None:
    """Which of ``num_control`` ControlNet residuals base block ``block`` (of ``num_base``) gets; None: none."""
    if placement == "interval":
        return block // math.ceil(num_base / num_control)
    if placement == "repeat":
        return block % num_control
    if placement == "sd3":
        # diffusers: `interval_control = len(blocks) / len(samples)`; `samples[int(index / interval_control)]`.
        return None if block == num_base - 1 else int(block / (num_base / num_control))
    raise ValueError(f"unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)}")


# --------------------------------------------------------------------------------------------- residuals


def transformer_kwargs(residuals: Residuals, base: nn.Module) -> dict[str, Any]:
    """Keyword arguments that add ``residuals`` (keyed by base block) in a diffusers ``FluxTransformer2DModel`` or
    ``SD3Transformer2DModel`` call: one sample per base block (zeros where none is added), so diffusers' own
    placement maps block i to sample i."""
    config = base.config

    def per_block(kind: str, num_blocks: int) -> list[torch.Tensor] | None:
        present = [residuals.tensors.get((kind, i)) for i in range(num_blocks)]
        like = next((t for t in present if t is not None), None)
        return None if like is None else [torch.zeros_like(like) if t is None else t for t in present]

    if base_family(base) == FLUX:
        return {"controlnet_block_samples": per_block(BLOCK, config.num_layers),
                "controlnet_single_block_samples": per_block(SINGLE, config.num_single_layers)}
    if base_family(base) == QWEN:
        return {"controlnet_block_samples": per_block(BLOCK, config.num_layers)}
    return {"block_controlnet_hidden_states": per_block(BLOCK, config.num_layers)}


def base_family(base: Any) -> str:
    """"flux", "sd3", or another name ("unet", the class name) for a base transformer, its config or a dict."""
    name = type(base).__name__
    if name == "FluxTransformer2DModel":
        return FLUX
    if name == "SD3Transformer2DModel":
        return SD3
    if name == "QwenImageTransformer2DModel":
        return QWEN
    config = getattr(base, "config", base)
    keys = set(config.keys()) if isinstance(config, Mapping) else set(vars(config)) if hasattr(config, "__dict__") else set()
    if "axes_dims_rope" in keys and "num_single_layers" not in keys:  # Qwen-Image: double-stream blocks only
        return QWEN
    if "axes_dims_rope" in keys:
        return FLUX
    if "caption_projection_dim" in keys:
        return SD3
    if "down_block_types" in keys or "block_out_channels" in keys:
        return "unet"
    return name


FAMILY_NAMES = {FLUX: "Flux", SD3: "SD3/SD3.5", QWEN: "Qwen-Image", "sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL",
                "unet": "a UNet model (SD1.x/SD2.x/SDXL)"}


def base_config(base: Any) -> Any:
    return None if base is None else getattr(base, "config", base)


def config_get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def config_value(base: Any, key: str) -> Any:
    """Entry ``key`` of a base's config (``base``: a diffusers model, its config, or a dict); None if absent."""
    return config_get(base_config(base), key)


def describe_base(base: Any) -> str:
    family = base_family(base)
    return f"{FAMILY_NAMES.get(family, family)} ({type(base).__name__})"


def check_fits(controlnet: TransformerControlNet | TransformerControlNetConfig, base: Any, name: str = "this ControlNet") -> None:
    """Raise a one-line :class:`UserError` unless ``controlnet`` (a model or config) fits ``base`` (a diffusers
    Flux/SD3 transformer or its config): same family, width, latent channels, text and pooled widths."""
    c = getattr(controlnet, "config", controlnet)
    family = c.family
    b = base_config(base)
    base_fam = base_family(base)
    if base_fam != family:
        raise UserError(f"{name} is a {FAMILY_NAMES[family]} ControlNet but the base is {describe_base(base)}; "
                        f"use a ControlNet made for {FAMILY_NAMES.get(base_fam, base_fam)}")
    inner = config_get(b, "num_attention_heads") * config_get(b, "attention_head_dim")
    checks = [("width", c.inner_dim, inner), ("latent channels", c.in_channels, config_get(b, "in_channels")),
              ("pooled text width", c.pooled_projection_dim, config_get(b, "pooled_projection_dim"))]
    if c.joint_attention_dim is not None:
        checks.append(("text width", c.joint_attention_dim, config_get(b, "joint_attention_dim")))
    if family == SD3:
        checks.append(("patch size", c.patch_size, config_get(b, "patch_size")))
    wrong = [f"{what} {mine} vs {theirs}" for what, mine, theirs in checks if mine != theirs]
    if wrong:
        raise UserError(f"{name} ({FAMILY_NAMES[family]}) does not fit the base {describe_base(base)}: "
                        f"{'; '.join(wrong)}; use a ControlNet made for this base")


def _zero_linear(features_in: int, features_out: int) -> nn.Linear:
    """A linear layer with weight and bias exactly zero (the paper's zero convolution, for tokens)."""
    layer = nn.Linear(features_in, features_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def pack_latents(latents: torch.Tensor, patch: int = FLUX_LATENT_PATCH) -> torch.Tensor:
    """(B, C, H, W) latents → (B, H/p * W/p, C*p*p) tokens, as diffusers' FluxPipeline._pack_latents packs them."""
    b, c, h, w = latents.shape
    if h % patch or w % patch:
        raise UserError(f"latents of {h}x{w} cannot be packed in {patch}x{patch} patches; use an image size "
                        f"divisible by {patch * 8} (the VAE's 8x times the packing)")
    x = latents.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def latent_image_ids(height: int, width: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flux's position ids (h*w, 3) of an h x w grid of packed tokens: (0, row, column)."""
    ids = torch.zeros(height, width, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width, device=device, dtype=dtype)[None, :]
    return ids.reshape(height * width, 3)


def scale_rows(residual: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``residual`` (B, L, D) times a conditioning scale: one float, or (B,) one per row, multiplied in float32 as a
    float scale is (so that a row scaled by s equals the whole batch scaled by s)."""
    if not torch.is_tensor(scale):
        return residual * scale
    factor = scale.to(residual.device, torch.float32).reshape(-1, *[1] * (residual.ndim - 1))
    return (residual * factor).to(residual.dtype)


def union_mode_index(mode: int | str, num_mode: int) -> int:
    """The mode-embedding index of a union control mode given by name (:data:`FLUX_UNION_MODES`) or index."""
    if isinstance(mode, str):
        key = UNION_MODE_ALIASES.get(mode.strip().lower(), mode.strip().lower())
        if key not in FLUX_UNION_MODES:
            raise UserError(f"unknown control mode {mode!r}; use one of {', '.join(FLUX_UNION_MODES)}")
        mode = FLUX_UNION_MODES.index(key)
    if not 0 <= int(mode) < num_mode:
        raise UserError(f"control mode {mode} is out of range; this union ControlNet has modes 0..{num_mode - 1}")
    return int(mode)


# --------------------------------------------------------------------------------------------- configs


class _TransformerConfig:
    """What the Flux and SD3 configs share: the width, integer checks, the config.json round trip (lists in JSON,
    tuples here; unknown keys such as diffusers' ``_class_name`` ignored)."""

    family: str
    integers: tuple[str, ...] = ()  # fields that must be non-negative integers (or null)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        for name in self.integers:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise UserError(f"invalid {FAMILY_TITLES[self.family]} ControlNet config: {name} must be a "
                                f"non-negative integer, got {value!r}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"_class_name": CLASS_NAMES[self.family], **d}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


@dataclass
class FluxControlNetConfig(_TransformerConfig):
    """A Flux ControlNet; field names and defaults are diffusers' ``FluxControlNetModel`` config.json's.

    ``conditioning_embedding_channels`` set: the condition is pixels through XLabs' hint encoder (residuals placed
    by "repeat"); unset: packed VAE latents (InstantX, placed by "interval"). ``num_mode``: a union ControlNet.
    ``base_num_layers`` / ``base_num_single_layers`` (ours): the base's depth, for the residuals' placement.
    """

    patch_size: int = 1
    in_channels: int = 64
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = FLUX1_AXES_DIMS_ROPE
    num_mode: int | None = None
    conditioning_embedding_channels: int | None = None
    base_num_layers: int | None = None
    base_num_single_layers: int | None = None

    family = FLUX
    integers = ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "num_mode",
                "conditioning_embedding_channels", "base_num_layers", "base_num_single_layers")

    def __post_init__(self) -> None:
        super().__post_init__()
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise UserError(f"invalid Flux ControlNet config: axes_dims_rope {list(self.axes_dims_rope)} must add up to "
                            f"attention_head_dim {self.attention_head_dim}")

    @property
    def placement(self) -> str:
        return "repeat" if self.conditioning_embedding_channels else "interval"


@dataclass
class SD3ControlNetConfig(_TransformerConfig):
    """An SD3/SD3.5 ControlNet; field names and defaults are diffusers' ``SD3ControlNetModel`` config.json's.

    ``joint_attention_dim`` None and ``use_pos_embed`` False: Stability's SD3.5 layout (blocks over the image tokens
    alone, the base's patch embedding). ``control_type`` (ours): the scalar Stability's files carry
    (:data:`SD35_CONTROL_TYPES`). ``base_num_layers`` (ours): the base's depth, for the residuals' placement.
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int | None = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int | None = 96
    extra_conditioning_channels: int = 0
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    pos_embed_type: str | None = "sincos"
    use_pos_embed: bool = True
    force_zeros_for_pooled_projection: bool = True
    control_type: int | None = None
    base_num_layers: int | None = None

    family = SD3
    integers = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size",
                "extra_conditioning_channels", "base_num_layers")
    placement = "sd3"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qk_norm not in (None, "rms_norm", "layer_norm"):
            raise UserError(f"invalid SD3 ControlNet config: qk_norm must be null, rms_norm or layer_norm, got {self.qk_norm!r}")



TransformerControlNetConfig = FluxControlNetConfig | SD3ControlNetConfig


# --------------------------------------------------------------------------------------------- the models


class TransformerControlNet(nn.Module):
    """What the Flux and SD3 ControlNets share: the zero linears' output, placement, saving, the base's depth."""

    config: TransformerControlNetConfig
    # Modules the checkpoint does not hold (taken from the base by attach_base).
    from_base: tuple[str, ...] = ()
    # Recompute each copied block's activations in the backward pass (training's --gradient-checkpointing).
    gradient_checkpointing: bool = False

    def run_block(self, block: nn.Module, *inputs: Any, **named: Any) -> Any:
        """``block(*inputs, **named)``, checkpointed while gradients are taken with :attr:`gradient_checkpointing`
        on (activations recomputed in the backward pass instead of kept)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False, **named)
        return block(*inputs, **named)

    @property
    def dtype(self) -> torch.dtype:
        return self.controlnet_blocks[0].weight.dtype if len(self.controlnet_blocks) else torch.float32

    @property
    def family(self) -> str:
        return self.config.family

    def zero_linears(self) -> list[nn.Linear]:
        """The zero linears, double/joint blocks then single blocks (e.g. to check they start at zero)."""
        return [*self.controlnet_blocks, *getattr(self, "controlnet_single_blocks", [])]

    def _base_depths(self) -> dict[str, int]:
        raise NotImplementedError

    def attach_base(self, base: nn.Module | Mapping[str, Any]) -> "TransformerControlNet":
        """Record the base's depth (for the placement) after checking this ControlNet fits ``base`` (a diffusers
        transformer, or its config); returns self."""
        check_fits(self, base)
        depth = {"base_num_layers": config_value(base, "num_layers")}
        if self.family == FLUX:
            depth["base_num_single_layers"] = config_value(base, "num_single_layers")
        self.config = dataclasses.replace(self.config, **depth)
        return self

    def place(self, kind: str, residuals: Sequence[torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
        """Key this ControlNet's ``residuals`` of ``kind`` ("block" or "single") by the base block they go to."""
        if not residuals:
            return {}
        num_base = self._base_depths()[kind]
        placement = self.config.placement if kind == BLOCK else "interval"
        out = {}
        for block in range(num_base):
            index = residual_index(placement, block, num_base, len(residuals))
            if index is not None:
                out[(kind, block)] = residuals[index]
        return out

    def _missing_base(self) -> UserError:
        return UserError(f"this {FAMILY_TITLES[self.family]} ControlNet does not know its base's depth; load it with the base "
                         "(load_transformer_controlnet(..., base=transformer)) or call attach_base(transformer)")

    def persistent_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds: everything but what :meth:`attach_base` takes from the base."""
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] not in self.from_base}

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write diffusers' folder layout, atomically: ``config.json`` + ``diffusion_pytorch_model.safetensors``,
        which diffusers' ``FluxControlNetModel`` / ``SD3ControlNetModel.from_pretrained`` read."""
        return write_model_folder(directory, self.config.to_dict(), self.persistent_state_dict(), dtype)

    def _adopt(self, base: nn.Module, names: Sequence[str], blocks: Mapping[str, int]) -> None:
        """Copy, weights included, the base's modules ``names`` and the first ``n`` of each block list in ``blocks``."""
        for name in names:
            setattr(self, name, copy.deepcopy(getattr(base, name)))
        for name, n in blocks.items():
            setattr(self, name, nn.ModuleList(copy.deepcopy(b) for b in getattr(base, name)[:n]))


class FluxControlNet(TransformerControlNet):
    """A ControlNet for FLUX.1 (InstantX, Shakker-Labs Union/Union-Pro, XLabs layouts).

    Build a new one with :meth:`from_transformer`, or load one with
    ``controlnet.transformer_formats.load_transformer_controlnet``. Call it with the base's inputs and the
    condition; add the residuals in the locked base::

        cn = FluxControlNet.from_transformer(transformer, num_layers=4, num_single_layers=10)
        res = cn(tokens, t, text, pooled, img_ids, txt_ids, condition=pack_latents(cond_latents))
        out = transformer(tokens, text, pooled, t, img_ids, txt_ids, **transformer_kwargs(res, transformer))
    """

    def __init__(self, config: FluxControlNetConfig):
        super().__init__()
        self.config = c = config
        d = c.inner_dim
        # The copy: embedders and blocks as the base's (diffusers FluxTransformer2DModel's own classes).
        self.pos_embed = FluxPosEmbed(theta=FLUX_ROPE_THETA, axes_dim=list(c.axes_dims_rope))
        embed_cls = CombinedTimestepGuidanceTextProjEmbeddings if c.guidance_embeds else CombinedTimestepTextProjEmbeddings
        self.time_text_embed = embed_cls(embedding_dim=d, pooled_projection_dim=c.pooled_projection_dim)
        self.context_embedder = nn.Linear(c.joint_attention_dim, d)
        self.x_embedder = nn.Linear(c.in_channels, d)
        heads = dict(dim=d, num_attention_heads=c.num_attention_heads, attention_head_dim=c.attention_head_dim)
        self.transformer_blocks = nn.ModuleList(FluxTransformerBlock(**heads) for _ in range(c.num_layers))
        self.single_transformer_blocks = nn.ModuleList(FluxSingleTransformerBlock(**heads) for _ in range(c.num_single_layers))
        for name, module in self._new().items():
            setattr(self, name, module)

    def _new(self) -> dict[str, nn.Module | None]:
        """The modules a new ControlNet starts with: zero linears, zero condition embedder, mode embedding."""
        c = self.config
        d = c.inner_dim
        hint = c.conditioning_embedding_channels
        return {
            "controlnet_blocks": nn.ModuleList(_zero_linear(d, d) for _ in range(c.num_layers)),
            "controlnet_single_blocks": nn.ModuleList(_zero_linear(d, d) for _ in range(c.num_single_layers)),
            "controlnet_mode_embedder": nn.Embedding(c.num_mode, d) if c.num_mode else None,
            "input_hint_block": HintEncoder(hint, 3, XLABS_HINT_CHANNELS) if hint else None,
            "controlnet_x_embedder": _zero_linear(c.in_channels, d),
        }

    @classmethod
    def from_transformer(cls, base: nn.Module, num_layers: int = 4, num_single_layers: int = 10,
                         num_mode: int | None = None, conditioning_embedding_channels: int | None = None) -> "FluxControlNet":
        """A new ControlNet copying, with weights, the embedders and first blocks of a diffusers
        ``FluxTransformer2DModel``; its zero linears and condition embedder start at zero, so the base's output is
        unchanged bit for bit. ``conditioning_embedding_channels``: pixels through XLabs' hint encoder (its
        output packed 2x2 must have ``in_channels`` features); default: packed VAE latents."""
        b = base.config
        if base_family(base) != FLUX:
            raise UserError(f"FluxControlNet.from_transformer needs a FluxTransformer2DModel, got {type(base).__name__}")
        if not (0 <= num_layers <= b.num_layers and 0 <= num_single_layers <= b.num_single_layers):
            raise UserError(f"the base has {b.num_layers} double and {b.num_single_layers} single blocks; cannot copy "
                            f"{num_layers} and {num_single_layers}")
        patch = 1
        if conditioning_embedding_channels:
            patch = math.isqrt(b.in_channels // conditioning_embedding_channels)
            if patch * patch * conditioning_embedding_channels != b.in_channels:
                raise UserError(f"a hint encoder of {conditioning_embedding_channels} channels cannot be packed into "
                                f"the base's {b.in_channels} input features")
        config = FluxControlNetConfig(
            patch_size=patch, in_channels=b.in_channels, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=b.attention_head_dim, num_attention_heads=b.num_attention_heads,
            joint_attention_dim=b.joint_attention_dim, pooled_projection_dim=b.pooled_projection_dim,
            guidance_embeds=b.guidance_embeds, axes_dims_rope=tuple(b.axes_dims_rope), num_mode=num_mode,
            conditioning_embedding_channels=conditioning_embedding_channels,
            base_num_layers=b.num_layers, base_num_single_layers=b.num_single_layers,
        )
        with torch.device("meta"):  # every tensor is copied from the base or built new below
            cn = cls(config)
        cn._adopt(base, ("pos_embed", "time_text_embed", "context_embedder", "x_embedder"),
                  {"transformer_blocks": num_layers, "single_transformer_blocks": num_single_layers})
        for name, module in cn._new().items():
            setattr(cn, name, module)
        parameter = next(base.parameters())
        return cn.requires_grad_(True).to(device=parameter.device, dtype=parameter.dtype)

    def _base_depths(self) -> dict[str, int]:
        c = self.config
        if c.base_num_layers is None or c.base_num_single_layers is None:
            raise self._missing_base()
        return {BLOCK: c.base_num_layers, SINGLE: c.base_num_single_layers}

    def embed_condition(self, condition: torch.Tensor) -> torch.Tensor:
        """The condition as tokens (B, L, in_channels): packed VAE latents as given ((B, C, h, w) latents are
        packed), or, with a hint encoder, pixels (B, 3, H, W) in [0, 1] encoded then packed."""
        c = self.config
        if self.input_hint_block is not None:
            # XLabs trained on pixels in [-1, 1] (x-flux: `image / 127.5 - 1`; diffusers' preprocessing does the same).
            features = self.input_hint_block(condition.to(self.dtype) * 2 - 1)
            return pack_latents(features, c.patch_size)
        return pack_latents(condition) if condition.ndim == 4 else condition

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        condition: torch.Tensor,
        mode: int | str | torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        conditioning_scale: float | torch.Tensor = 1.0,
    ) -> Residuals:
        """Residuals for the locked Flux base.

        Args:
            hidden_states: packed image tokens (B, L, in_channels), as the base takes them.
            timestep: (B,) in [0, 1], as the base takes it (both scale it by 1000).
            encoder_hidden_states: T5 embeddings (B, T, joint_attention_dim); pooled_projections: CLIP (B, P).
            img_ids, txt_ids: position ids (L, 3) and (T, 3).
            condition: see :meth:`embed_condition`.
            mode: a union ControlNet's control mode (name, index, or (B,) indices).
            guidance: (B,) distilled guidance scale (FLUX.1-dev).
            conditioning_scale: the residuals' factor, one for all rows or (B,) per row.
        """
        c = self.config
        tokens = self.embed_condition(condition)
        if tokens.shape[:2] != hidden_states.shape[:2]:
            raise UserError(f"the condition gives {tokens.shape[1]} tokens (batch {tokens.shape[0]}) but the image has "
                            f"{hidden_states.shape[1]} (batch {hidden_states.shape[0]}); give a condition of the image's size")
        h = self.x_embedder(hidden_states) + self.controlnet_x_embedder(tokens)  # x + Z(c)
        t = timestep.to(h.dtype) * 1000
        if c.guidance_embeds:
            if guidance is None:
                raise UserError("this Flux ControlNet embeds the distilled guidance scale; pass guidance")
            temb = self.time_text_embed(t, guidance.to(h.dtype) * 1000, pooled_projections)
        else:
            temb = self.time_text_embed(t, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        if self.controlnet_mode_embedder is not None:  # union: the mode embedding is one more text token
            context, txt_ids = self._mode_token(mode, context, txt_ids)
        rotary = self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
        double, single = [], []
        for block in self.transformer_blocks:
            context, h = self.run_block(block, hidden_states=h, encoder_hidden_states=context, temb=temb,
                                        image_rotary_emb=rotary)
            double.append(h)
        for block in self.single_transformer_blocks:
            context, h = self.run_block(block, hidden_states=h, encoder_hidden_states=context, temb=temb,
                                        image_rotary_emb=rotary)
            single.append(h)
        double = [scale_rows(z(s), conditioning_scale) for z, s in zip(self.controlnet_blocks, double)]
        single = [scale_rows(z(s), conditioning_scale) for z, s in zip(self.controlnet_single_blocks, single)]
        return Residuals({**self.place(BLOCK, double), **self.place(SINGLE, single)})

    def _mode_token(self, mode: int | str | torch.Tensor | None, context: torch.Tensor,
                    txt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_mode = self.config.num_mode
        if mode is None:
            raise UserError(f"this is a union ControlNet; give a control mode (one of {', '.join(FLUX_UNION_MODES)})")
        if not torch.is_tensor(mode):
            mode = torch.full((context.shape[0],), union_mode_index(mode, num_mode), dtype=torch.long)
        mode = mode.reshape(-1).to(context.device).expand(context.shape[0])
        token = self.controlnet_mode_embedder(mode)[:, None].to(context.dtype)  # (B, 1, D)
        return torch.cat([token, context], dim=1), torch.cat([txt_ids[:1], txt_ids], dim=0)


class SD3ControlNet(TransformerControlNet):
    """A ControlNet for SD3 / SD3.5 (InstantX SD3 layout, Stability's SD3.5 layout).

    ``cn(latents, t, text, pooled, condition=cond_latents)`` → residuals for the locked
    ``SD3Transformer2DModel``; ``transformer(..., **transformer_kwargs(res, transformer))`` adds them.
    """

    def __init__(self, config: SD3ControlNetConfig):
        super().__init__()
        self.config = c = config
        d = c.inner_dim
        self.pos_embed = self._patch_embed(c.in_channels, c.pos_embed_type, c.pos_embed_max_size) if c.use_pos_embed else None
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(embedding_dim=d, pooled_projection_dim=c.pooled_projection_dim)
        heads = dict(dim=d, num_attention_heads=c.num_attention_heads, attention_head_dim=c.attention_head_dim)
        if c.joint_attention_dim is not None:
            self.context_embedder = nn.Linear(c.joint_attention_dim, c.caption_projection_dim)
            # Every copied block is a full joint block: only the base's last block is context-pre-only.
            self.transformer_blocks = nn.ModuleList(
                JointTransformerBlock(**heads, context_pre_only=False, qk_norm=c.qk_norm,
                                      use_dual_attention=i in c.dual_attention_layers)
                for i in range(c.num_layers))
        else:  # Stability's SD3.5 layout: self-attention over the image tokens, no text stream
            self.context_embedder = None
            self.transformer_blocks = nn.ModuleList(SD3SingleTransformerBlock(**heads) for _ in range(c.num_layers))
        for name, module in self._new().items():
            setattr(self, name, module)

    @property
    def from_base(self) -> tuple[str, ...]:  # type: ignore[override]
        return () if self.config.use_pos_embed else ("pos_embed",)

    def _patch_embed(self, channels: int, pos_embed_type: str | None, max_size: int | None) -> nn.Module:
        c = self.config
        return PatchEmbed(height=c.sample_size, width=c.sample_size, patch_size=c.patch_size, in_channels=channels,
                          embed_dim=c.inner_dim, pos_embed_max_size=max_size, pos_embed_type=pos_embed_type)

    def _new(self) -> dict[str, nn.Module]:
        c = self.config
        cond = self._patch_embed(c.in_channels + c.extra_conditioning_channels, None, None)
        for p in cond.parameters():
            nn.init.zeros_(p)
        return {"controlnet_blocks": nn.ModuleList(_zero_linear(c.inner_dim, c.inner_dim) for _ in range(c.num_layers)),
                "pos_embed_input": cond}

    @classmethod
    def from_transformer(cls, base: nn.Module, num_layers: int = 12, extra_conditioning_channels: int = 0) -> "SD3ControlNet":
        """A new ControlNet copying, with weights, the embedders and first ``num_layers`` joint blocks of a diffusers
        ``SD3Transformer2DModel``; its zero linears and condition embedder start at zero."""
        b = base.config
        if base_family(base) != SD3:
            raise UserError(f"SD3ControlNet.from_transformer needs an SD3Transformer2DModel, got {type(base).__name__}")
        if not 1 <= num_layers < b.num_layers:  # the base's last block is context-pre-only: it cannot be copied
            raise UserError(f"the base has {b.num_layers} joint blocks; copy 1..{b.num_layers - 1} of them, not {num_layers}")
        config = SD3ControlNetConfig(
            sample_size=b.sample_size, patch_size=b.patch_size, in_channels=b.in_channels, num_layers=num_layers,
            attention_head_dim=b.attention_head_dim, num_attention_heads=b.num_attention_heads,
            joint_attention_dim=b.joint_attention_dim, caption_projection_dim=b.caption_projection_dim,
            pooled_projection_dim=b.pooled_projection_dim, out_channels=b.out_channels,
            pos_embed_max_size=b.pos_embed_max_size, extra_conditioning_channels=extra_conditioning_channels,
            dual_attention_layers=tuple(i for i in b.dual_attention_layers if i < num_layers), qk_norm=b.qk_norm,
            force_zeros_for_pooled_projection=False, base_num_layers=b.num_layers,
        )
        with torch.device("meta"):
            cn = cls(config)
        cn._adopt(base, ("pos_embed", "time_text_embed", "context_embedder"), {"transformer_blocks": num_layers})
        for name, module in cn._new().items():
            setattr(cn, name, module)
        parameter = next(base.parameters())
        return cn.requires_grad_(True).to(device=parameter.device, dtype=parameter.dtype)

    def attach_base(self, base: nn.Module | Mapping[str, Any]) -> "SD3ControlNet":
        """As :meth:`TransformerControlNet.attach_base`; the SD3.5 layout also takes the base's patch embedding
        (from a transformer; a config has none)."""
        super().attach_base(base)
        if not self.config.use_pos_embed and isinstance(base, nn.Module):
            parameter = next(self.parameters())
            self.pos_embed = copy.deepcopy(base.pos_embed).to(device=parameter.device, dtype=parameter.dtype)
        return self

    def _base_depths(self) -> dict[str, int]:
        if self.config.base_num_layers is None:
            raise self._missing_base()
        return {BLOCK: self.config.base_num_layers}

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        condition: torch.Tensor,
        conditioning_scale: float | torch.Tensor = 1.0,
    ) -> Residuals:
        """Residuals for the locked SD3 base.

        Args:
            hidden_states: latents (B, C, H, W), as the base takes them.
            timestep: (B,) in [0, 1000], as the base takes it.
            encoder_hidden_states: joint text embeddings (B, T, joint_attention_dim); unused by the SD3.5 layout.
            pooled_projections: (B, pooled_projection_dim); zeros where ``force_zeros_for_pooled_projection``.
            condition: VAE latents of the condition (B, C + extra_conditioning_channels, H, W).
            conditioning_scale: the residuals' factor, one for all rows or (B,) per row.
        """
        if self.pos_embed is None:
            raise UserError("this SD3.5 ControlNet uses its base's patch embedding; load it with the base "
                            "(load_transformer_controlnet(..., base=transformer)) or call attach_base(transformer)")
        if condition.shape[0] != hidden_states.shape[0] or condition.shape[-2:] != hidden_states.shape[-2:]:
            raise UserError(f"the condition latents are {list(condition.shape)}, the image latents "
                            f"{list(hidden_states.shape)}; give a condition of the image's size")
        h = self.pos_embed(hidden_states)  # patches + position embedding, (B, L, D)
        temb = self.time_text_embed(timestep, pooled_projections)
        h = h + self.pos_embed_input(condition)  # x + Z(c)
        samples = []
        if self.context_embedder is not None:
            context = self.context_embedder(encoder_hidden_states)
            for block in self.transformer_blocks:
                context, h = self.run_block(block, hidden_states=h, encoder_hidden_states=context, temb=temb)
                samples.append(h)
        else:
            for block in self.transformer_blocks:
                h = self.run_block(block, h, temb)
                samples.append(h)
        residuals = [scale_rows(z(s), conditioning_scale) for z, s in zip(self.controlnet_blocks, samples)]
        return Residuals(self.place(BLOCK, residuals))


def build_transformer_controlnet(config: TransformerControlNetConfig) -> TransformerControlNet:
    """The model of a config (Flux, SD3 or Qwen-Image)."""
    if isinstance(config, QwenImageControlNetConfig):
        return QwenImageControlNet(config)
    return FluxControlNet(config) if isinstance(config, FluxControlNetConfig) else SD3ControlNet(config)


# --------------------------------------------------------------------------------------------- Qwen-Image

# Qwen-Image's rotary frequency base and norm epsilon (diffusers QwenImageTransformer2DModel:
# QwenEmbedRope(theta=10000), RMSNorm(joint_attention_dim, eps=1e-6)).
QWEN_ROPE_THETA = 10000
QWEN_NORM_EPS = 1e-6
# Qwen-Image's rotary axes for its 128-wide heads (Qwen/Qwen-Image transformer/config.json `axes_dims_rope`).
QWEN_AXES_DIMS_ROPE = (16, 56, 56)
QWEN_HEAD_DIM = 128
# Qwen-Image packs 2x2 latent patches into one token (diffusers QwenImagePipeline._pack_latents, config patch_size 2).
QWEN_PATCH_SIZE = 2
# Base options of Qwen-Image variants (Edit-2511's zero_cond_t, Layered's extra timestep and 3-D rotary) whose blocks
# or embedders take other inputs than the text-to-image model's, which the released ControlNets were trained on.
QWEN_UNSUPPORTED_OPTIONS = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


@dataclass
class QwenImageControlNetConfig(_TransformerConfig):
    """A Qwen-Image ControlNet; field names and defaults are diffusers' ``QwenImageControlNetModel`` config.json's.

    ``extra_condition_channels``: condition features beyond the image tokens' ``in_channels`` (InstantX's inpainting
    ControlNet: masked-image latents and the mask, 16 + 1 channels packed 2x2, so 4 more than 64). No mode embedding:
    InstantX's Qwen-Image ControlNet-Union takes every condition kind through the same embedder.
    ``base_num_layers`` (ours): the base's depth, for the residuals' placement.
    """

    patch_size: int = QWEN_PATCH_SIZE
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = QWEN_HEAD_DIM
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, ...] = QWEN_AXES_DIMS_ROPE
    extra_condition_channels: int = 0
    base_num_layers: int | None = None

    family = QWEN
    integers = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "extra_condition_channels", "base_num_layers")
    # diffusers QwenImageTransformer2DModel: `controlnet_block_samples[index_block // ceil(N / n)]`, Flux's rule.
    placement = "interval"
    pooled_projection_dim = None  # Qwen-Image has no pooled text embedding (what check_fits compares)

    def __post_init__(self) -> None:
        super().__post_init__()
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise UserError(f"invalid Qwen-Image ControlNet config: axes_dims_rope {list(self.axes_dims_rope)} must add "
                            f"up to attention_head_dim {self.attention_head_dim}")


class QwenImageControlNet(TransformerControlNet):
    """A ControlNet for Qwen-Image (InstantX Qwen-Image-ControlNet-Union and -Inpainting layouts).

    What is configuration of the shared core: the trainable copy (:meth:`TransformerControlNet._adopt` of the
    embedders and first ``num_layers`` blocks), the zero linears and zero condition embedder, the residual placement
    (Flux's "interval" rule, :func:`residual_index`), attaching the base's depth, saving, loading and the family
    checks. What is new code: this class's module list (Qwen-Image's own embedders: ``img_in``, ``txt_norm`` +
    ``txt_in``, a timestep-only ``time_text_embed``, 3-axis rotary ``pos_embed`` built from the token grid) and its
    :meth:`forward`, since Qwen-Image's blocks take a text mask and rotary tables computed from ``img_shapes``
    instead of Flux's position ids and pooled text. Unlike diffusers' ``from_transformer``, :meth:`from_transformer`
    also copies the base's ``txt_norm`` weight (diffusers leaves it at ones).

    ``cn(tokens, t, text, img_shapes, condition=cond_tokens)`` → residuals for the locked
    ``QwenImageTransformer2DModel``; ``transformer(..., **transformer_kwargs(res, transformer))`` adds them.
    """

    def __init__(self, config: QwenImageControlNetConfig):
        super().__init__()
        self.config = c = config
        d = c.inner_dim
        # QwenEmbedRope's frequency tables are plain tensors, not buffers: built here even inside a meta-device
        # context, since no checkpoint holds them.
        with torch.device("cpu"):
            self.pos_embed = QwenEmbedRope(theta=QWEN_ROPE_THETA, axes_dim=list(c.axes_dims_rope), scale_rope=True)
        self.time_text_embed = QwenTimestepProjEmbeddings(embedding_dim=d)
        self.txt_norm = RMSNorm(c.joint_attention_dim, eps=QWEN_NORM_EPS)
        self.img_in = nn.Linear(c.in_channels, d)
        self.txt_in = nn.Linear(c.joint_attention_dim, d)
        self.transformer_blocks = nn.ModuleList(
            QwenImageTransformerBlock(dim=d, num_attention_heads=c.num_attention_heads,
                                      attention_head_dim=c.attention_head_dim)
            for _ in range(c.num_layers))
        for name, module in self._new().items():
            setattr(self, name, module)

    def _new(self) -> dict[str, nn.Module]:
        c = self.config
        d = c.inner_dim
        return {"controlnet_blocks": nn.ModuleList(_zero_linear(d, d) for _ in range(c.num_layers)),
                "controlnet_x_embedder": _zero_linear(c.in_channels + c.extra_condition_channels, d)}

    @classmethod
    def from_transformer(cls, base: nn.Module, num_layers: int = 5,
                         extra_condition_channels: int = 0) -> "QwenImageControlNet":
        """A new ControlNet copying, with weights, the embedders and first ``num_layers`` blocks of a diffusers
        ``QwenImageTransformer2DModel``; its zero linears and condition embedder start at zero, so the base's
        output is unchanged bit for bit. ``extra_condition_channels``: condition features beyond the image
        tokens' (4 for inpainting: a mask channel packed 2x2)."""
        b = base.config
        if base_family(base) != QWEN:
            raise UserError("QwenImageControlNet.from_transformer needs a QwenImageTransformer2DModel, got "
                            f"{type(base).__name__}")
        options = [name for name in QWEN_UNSUPPORTED_OPTIONS if b.get(name)]
        if options:
            raise UserError(f"the base sets {', '.join(options)} (a Qwen-Image edit or layered variant); a Qwen-Image "
                            "ControlNet copies the text-to-image transformer (Qwen/Qwen-Image)")
        if not 1 <= num_layers <= b.num_layers:
            raise UserError(f"the base has {b.num_layers} blocks; copy 1..{b.num_layers} of them, not {num_layers}")
        config = QwenImageControlNetConfig(
            patch_size=b.patch_size, in_channels=b.in_channels, out_channels=b.out_channels, num_layers=num_layers,
            attention_head_dim=b.attention_head_dim, num_attention_heads=b.num_attention_heads,
            joint_attention_dim=b.joint_attention_dim, axes_dims_rope=tuple(b.axes_dims_rope),
            extra_condition_channels=extra_condition_channels, base_num_layers=b.num_layers,
        )
        with torch.device("meta"):
            cn = cls(config)
        cn._adopt(base, ("pos_embed", "time_text_embed", "txt_norm", "img_in", "txt_in"),
                  {"transformer_blocks": num_layers})
        for name, module in cn._new().items():
            setattr(cn, name, module)
        parameter = next(base.parameters())
        return cn.requires_grad_(True).to(device=parameter.device, dtype=parameter.dtype)

    _base_depths = SD3ControlNet._base_depths  # one list of blocks, as SD3's

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        img_shapes: Sequence[tuple[int, int, int]],
        condition: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
    ) -> Residuals:
        """Residuals for the locked Qwen-Image base.

        Args:
            hidden_states: packed image tokens (B, L, in_channels), as the base takes them.
            timestep: (B,) in [0, 1], as the base takes it (both scale it by 1000).
            encoder_hidden_states: Qwen2.5-VL embeddings (B, T, joint_attention_dim); encoder_hidden_states_mask:
                (B, T), 1 for real tokens, 0 for padding.
            img_shapes: (frames, rows, columns) of each sample's token grid, as the base takes them.
            condition: packed condition latents (B, L, in_channels + extra_condition_channels), or unpacked
                (B, C, h, w) latents, packed 2x2 here.
        """
        c = self.config
        tokens = pack_latents(condition, c.patch_size) if condition.ndim == 4 else condition
        if tokens.shape != (*hidden_states.shape[:2], c.in_channels + c.extra_condition_channels):
            raise UserError(f"the condition gives tokens {list(tokens.shape)} but this ControlNet needs "
                            f"{[*hidden_states.shape[:2], c.in_channels + c.extra_condition_channels]} for the image's "
                            f"{list(hidden_states.shape)}; give a condition of the image's size and channels")
        h = self.img_in(hidden_states) + self.controlnet_x_embedder(tokens)  # x + Z(c)
        temb = self.time_text_embed(timestep, h)
        text_len, _, mask = compute_text_seq_len_from_mask(encoder_hidden_states, encoder_hidden_states_mask)
        rotary = self.pos_embed(list(img_shapes), max_txt_seq_len=text_len, device=h.device)
        context = self.txt_in(self.txt_norm(encoder_hidden_states))
        samples = []
        for block in self.transformer_blocks:
            context, h = self.run_block(block, hidden_states=h, encoder_hidden_states=context,
                                        encoder_hidden_states_mask=mask, temb=temb, image_rotary_emb=rotary)
            samples.append(h)
        residuals = [z(s) * conditioning_scale for z, s in zip(self.controlnet_blocks, samples)]
        return Residuals(self.place(BLOCK, residuals))
