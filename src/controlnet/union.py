"""Union / ProMax ControlNets (xinsir, controlnet-union-sdxl-1.0): one SDXL ControlNet for many condition types,
and several conditions in one pass.

On top of the ControlNet (:class:`controlnet.model.ControlNet`, whose modules and key names it keeps) a Union
model has (xinsir's ControlNetPlus, diffusers' ControlNetUnionModel):

* ``task_embedding`` (T, C0): one learned vector per control type (T = 6 for Union, 8 for ProMax, which adds
  tile and repaint);
* one transformer layer over tokens: for each condition, its hint-encoder features averaged over the image plus
  its type's task embedding; and the latent's conv_in features averaged, last;
* ``spatial_ch_projs``: a zero-initialised linear layer mapping each condition's output token to a per-channel
  offset, added to that condition's feature map; the sum over conditions is added to conv_in(latent);
* ``control_add_embedding``: the multi-hot vector of the control types in use, embedded sinusoidally per type
  (``addition_time_embed_dim`` channels each) and projected, added to the time embedding.

Strength. With one condition its scale multiplies the residuals, as a ControlNet's strength. With several, each
condition's scale multiplies its feature map and its token (the fused input), not the residuals; then
``conditioning_scale`` (1.0 by default) scales the residuals of the whole pass. This is xinsir's and diffusers'
rule, kept so outputs agree with theirs.

The transformer layer is CLIP's residual attention block with ``nn.MultiheadAttention`` (hence the released
``transformer_layes.N.attn.in_proj_weight`` keys; "layes" as released). The released code hands it the tokens
as (batch, tokens, channels) while the attention reads (sequence, batch, channels), so it attends across the
batch for each token position; we do the same, or the released weights would not give the released outputs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from controlnet.errors import UserError
from controlnet.model import ControlNet, ControlNetConfig
from controlnet.residuals import Residuals

# xinsir's control types and their indices in task_embedding (ComfyUI comfy/cldm/control_types.py,
# UNION_CONTROLNET_TYPES; xinsir's model card). Names after the first of a line are the conditions trained in
# the same slot.
CONTROL_TYPES: dict[str, int] = {
    "openpose": 0,
    "depth": 1,
    "hed": 2, "pidi": 2, "scribble": 2, "ted": 2,
    "canny": 3, "lineart": 3, "anime_lineart": 3, "mlsd": 3,
    "normal": 4,
    "segment": 5,
    "tile": 6,  # ProMax only
    "repaint": 7, "inpaint": 7,  # ProMax only
}
# xinsir's config.json (and diffusers' defaults): 8 heads in the one transformer layer; shapes cannot tell it.
DEFAULT_TRANS_HEADS = 8
# CLIP's QuickGELU, x * sigmoid(1.702 x) (openai/CLIP model.py), used by the released transformer layer.
QUICK_GELU = 1.702
UNION_CLASS_NAME = "ControlNetUnionModel"


@dataclass(frozen=True)
class UnionConfig:
    """What a Union ControlNet adds to a :class:`ControlNetConfig`; names as in diffusers' config.json."""

    num_control_type: int = 6
    num_trans_channel: int = 320
    num_trans_head: int = DEFAULT_TRANS_HEADS
    num_trans_layer: int = 1
    num_proj_channel: int = 320

    def check(self, controlnet: ControlNetConfig) -> None:
        """Raise a one-line :class:`UserError` unless these modules fit ``controlnet``'s."""
        c0 = controlnet.block_out_channels[0]
        values = asdict(self)
        bad = next((k for k, v in values.items() if not (isinstance(v, int) and 0 < v <= 16_384)), None)
        if bad:
            raise UserError(f"invalid Union config: {bad} must be an integer in 1..16384, got {values[bad]!r}")
        if self.num_trans_channel != c0 or self.num_proj_channel != c0:
            raise UserError(f"invalid Union config: num_trans_channel and num_proj_channel must equal the first "
                            f"block's width {c0}, got {self.num_trans_channel} and {self.num_proj_channel}")
        if self.num_trans_channel % self.num_trans_head:
            raise UserError(f"invalid Union config: {self.num_trans_head} heads do not divide "
                            f"{self.num_trans_channel} channels")
        if controlnet.addition_time_embed_dim is None:
            raise UserError("invalid Union config: the control-type embedding needs addition_time_embed_dim (SDXL)")


class _TokenBlock(nn.Module):
    """CLIP's residual attention block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with QuickGELU."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(width, width * 4)
        self.mlp.c_proj = nn.Linear(width * 4, width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]  # sequence axis = dim 0, as released (see module doc)
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(QUICK_GELU * h))


class UnionControlNet(ControlNet):
    """A Union/ProMax ControlNet: :class:`ControlNet` plus the task embedding, the transformer layer over the
    conditions' tokens, the spatial projection and the control-type embedding (see the module docstring)."""

    def __init__(self, config: ControlNetConfig, union: UnionConfig):
        super().__init__(config)
        union.check(config)
        self.union_config = union
        u = union
        self.task_embedding = nn.Parameter(torch.randn(u.num_control_type, u.num_trans_channel) * u.num_trans_channel**0.5)
        self.transformer_layes = nn.ModuleList([_TokenBlock(u.num_trans_channel, u.num_trans_head)
                                                for _ in range(u.num_trans_layer)])
        self.spatial_ch_projs = nn.Linear(u.num_trans_channel, u.num_proj_channel)
        nn.init.zeros_(self.spatial_ch_projs.weight)
        nn.init.zeros_(self.spatial_ch_projs.bias)
        self.control_type_proj = Timesteps(config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift)
        self.control_add_embedding = TimestepEmbedding(config.addition_time_embed_dim * u.num_control_type,
                                                       config.time_embed_dim)

    def control_type_index(self, control_type: int | str) -> int:
        """The task-embedding index of a control type name (:data:`CONTROL_TYPES`) or index."""
        index = CONTROL_TYPES.get(control_type) if isinstance(control_type, str) else control_type
        n = self.union_config.num_control_type
        if not isinstance(index, int) or not 0 <= index < n:
            names = ", ".join(k for k, v in CONTROL_TYPES.items() if v < n)
            raise UserError(f"unknown control type {control_type!r} for this Union ControlNet ({n} types); "
                            f"use one of {names}")
        return index

    def control_embedding(self, types: Sequence[int], batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The embedding of the multi-hot vector of ``types`` (B, 4*C0), added to the time embedding."""
        multi_hot = torch.zeros(batch, self.union_config.num_control_type, device=self.conv_in.weight.device)
        multi_hot[:, list(types)] = 1.0
        sinusoids = self.control_type_proj(multi_hot.flatten()).reshape(batch, -1)  # (B, T * addition_time_embed_dim)
        return self.control_add_embedding(sinusoids.to(dtype))

    def fuse(self, latent_features: torch.Tensor, conditions: Sequence[torch.Tensor], types: Sequence[int],
             scales: Sequence[float]) -> torch.Tensor:
        """The conditions' fused input (B, C0, h, w), added to conv_in(latent): each condition's features plus
        its token's projection, scaled per condition when there are several."""
        several = len(conditions) > 1
        tokens, maps = [], []
        for features, index, scale in zip(conditions, types, scales):
            token = features.mean(dim=(2, 3)) + self.task_embedding[index]  # (B, C0)
            tokens.append(token * scale if several else token)
            maps.append(features * scale if several else features)
        tokens.append(latent_features.mean(dim=(2, 3)))
        x = torch.stack(tokens, dim=1)  # (B, conditions + 1, C0)
        for layer in self.transformer_layes:
            x = layer(x)
        fused = torch.zeros_like(latent_features)
        for i, (features, scale) in enumerate(zip(maps, scales)):
            offset = self.spatial_ch_projs(x[:, i])[:, :, None, None]  # (B, C0, 1, 1)
            fused = fused + features + (offset * scale if several else offset)
        return fused

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        hint: torch.Tensor | Sequence[torch.Tensor] | None = None,
        conditioning_scale: float | Sequence[float] = 1.0,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        hint_embedding: torch.Tensor | Sequence[torch.Tensor] | None = None,
        class_labels: torch.Tensor | None = None,
        control_type: int | str | Sequence[int | str] = (),
        condition_scale: float | Sequence[float] = 1.0,
    ) -> Residuals:
        """Residuals for the locked SDXL UNet from one or several conditions in one pass.

        ``hint``: one condition image (B, 3, H, W) in [0, 1] or a list of them (or their :meth:`encode_hint`
        outputs as ``hint_embedding``); ``control_type``: one type (name or index) per condition;
        ``condition_scale``: one strength per condition (see the module docstring for how it acts);
        ``conditioning_scale``: the residuals' scale, one value or one per residual. Other arguments as
        :meth:`ControlNet.forward`.
        """
        given = hint_embedding if hint_embedding is not None else hint
        if given is None:
            raise ValueError("pass hint (condition images) or hint_embedding")
        given = [given] if torch.is_tensor(given) else list(given)
        conditions = given if hint_embedding is not None else [self.encode_hint(h) for h in given]
        names = [control_type] if isinstance(control_type, (int, str)) else list(control_type)
        scales = [float(condition_scale)] * len(conditions) if isinstance(condition_scale, (int, float)) \
            else [float(s) for s in condition_scale]
        if not len(names) == len(scales) == len(conditions):
            raise UserError(f"{len(conditions)} conditions need as many control types and strengths; got "
                            f"{len(names)} types and {len(scales)} strengths")
        types = [self.control_type_index(n) for n in names]

        emb = self.time_embed(sample, timestep, added_cond_kwargs, class_labels)  # (B, 4*C0), includes SDXL's
        emb = emb + self.control_embedding(types, sample.shape[0], emb.dtype)
        h = self.conv_in(sample)
        skips, h = self.encode(h + self.fuse(h, conditions, types, scales), emb, encoder_hidden_states)
        if len(conditions) == 1:  # one condition: its strength scales the residuals
            conditioning_scale = ([s * scales[0] for s in conditioning_scale]
                                  if isinstance(conditioning_scale, Sequence) else conditioning_scale * scales[0])
        return self._residuals(skips, h, conditioning_scale)

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write diffusers' ControlNetUnionModel folder (config.json + weights) atomically; refuses a file."""
        from controlnet.checkpoints import write_model_folder

        config = {**self.config.to_dict(), **asdict(self.union_config), "_class_name": UNION_CLASS_NAME}
        return write_model_folder(directory, config, self.state_dict(), dtype)

# --------------------------------------------------------------------------------------------- loading


def infer_union_config(sd: Mapping[str, torch.Tensor], heads: int = DEFAULT_TRANS_HEADS) -> UnionConfig:
    """The Union modules' config from their shapes (the heads of the transformer layer: ``heads``)."""
    try:
        types, width = sd["task_embedding"].shape
        proj = sd["spatial_ch_projs.weight"].shape[0]
    except KeyError as err:
        raise UserError(f"a Union ControlNet has {err.args[0]}; this file does not") from None
    layers = {m.group(1) for k in sd if (m := re.match(r"transformer_layes\.(\d+)\.", k))}
    return UnionConfig(types, width, heads, len(layers), proj)


def union_from_state_dict(state_dict: Mapping[str, Any], config: ControlNetConfig | Mapping[str, Any] | None = None,
                          name: str = "state dict") -> UnionControlNet:
    """A Union ControlNet holding ``state_dict`` (xinsir's released keys, diffusers' layout), loaded strictly.

    ``config``: a ControlNetConfig, or a config.json dict (its union fields' head count is used; the other union
    fields come from the shapes, so one config serves the Union and ProMax files). Without it the ControlNet
    config is inferred from the shapes (:func:`controlnet.checkpoints.infer_config`).
    """
    from controlnet.checkpoints import infer_config
    from controlnet.checkpoints import check_tensors
    from controlnet.families import require_family

    require_family(state_dict, "union", name)
    sd = dict(state_dict)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{name}: entries that are not tensors: {', '.join(sorted(bad)[:3])}")
    heads = DEFAULT_TRANS_HEADS
    if isinstance(config, Mapping):
        heads = config.get("num_trans_head", heads)
        config = ControlNetConfig.from_dict({k: v for k, v in config.items() if k != "_class_name"})
    base_keys = {k: v for k, v in sd.items() if not k.startswith(("task_embedding", "transformer_layes.",
                                                                  "spatial_ch_projs.", "control_add_embedding."))}
    cn_config = config or infer_config(base_keys, name)
    union = infer_union_config(sd, heads)
    with torch.device("meta"):
        model = UnionControlNet(cn_config, union)
    check_tensors(sd, {k: tuple(v.shape) for k, v in model.state_dict().items()}, name, "Union ControlNet")
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def load_union(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> UnionControlNet:
    """Load a Union/ProMax ControlNet, in eval mode, from a diffusers folder or one of its .safetensors files
    (e.g. xinsir's ``diffusion_pytorch_model_promax.safetensors``; a config.json beside it is used)."""
    from controlnet.checkpoints import _read_file, check_regular_file, read_safetensors
    from controlnet.families import WEIGHT_NAMES

    path = Path(path).expanduser()
    if path.is_dir():
        weights = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise UserError(f"{path} has no {' / '.join(WEIGHT_NAMES)}")
        path = weights
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a Union ControlNet folder or .safetensors file")
    config = None
    beside = path.parent / "config.json"
    if beside.is_file():
        check_regular_file(beside, 1 << 20)
        try:
            config = json.loads(beside.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{beside} is not a readable JSON config: {err}") from None
    raw = read_safetensors(path) if path.suffix == ".safetensors" else _read_file(path)
    return union_from_state_dict(raw, config, str(path)).to(device=device, dtype=dtype).eval()
