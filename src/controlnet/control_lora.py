"""Control-LoRA (Stability AI, ``control-lora-{canny,depth,recolor,sketch}-rank{128,256}``): a ControlNet stored as
low-rank deltas on the base model it was trained from.

A Control-LoRA file holds, in the original (ldm) layout without ``control_model.``:

* for the copied encoder's linear and conv layers, a low-rank pair ``<module>.up`` (out, r[, 1, 1]) and
  ``<module>.down`` (r, in[, kh, kw]): the ControlNet's weight is the base's plus ``up @ down``;
* full tensors for what was trained whole: biases, norms, the hint encoder (``input_hint_block.*``) and the zero
  convs (``zero_convs.*``, ``middle_block_out.*``);
* the marker key ``lora_controlnet``.

So the ControlNet is built from the base UNet it is used with (a copy of its encoder, as
:meth:`controlnet.model.ControlNet.from_unet`), then the file's full tensors replace and its deltas are added, as
ComfyUI's ``ControlLora`` does (comfy/controlnet.py). The file fits one base family; on another it is refused in
one line naming both.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from controlnet.errors import UserError
from controlnet.checkpoints import check_tensors
from controlnet.families import CONTROL_LORA_MARKER, require_family
from controlnet.hint_encoders import HintEncoder
from controlnet.model import ControlNet

StateDict = dict[str, torch.Tensor]
UP, DOWN = ".up", ".down"
# Modules of a ControlNet that the base does not have: the file must hold them whole.
OWN_MODULES = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


def is_control_lora(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict is a Control-LoRA (it has the ``lora_controlnet`` marker key)."""
    return CONTROL_LORA_MARKER in state_dict


def control_lora_base(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What a Control-LoRA (original or diffusers key names) says about the base it was made from: family
    ("sd1"/"sd2"/"sdxl": SDXL's addition embedding, context width) and context width (the input width of a
    cross-attention key projection, low-rank or whole)."""
    from controlnet.checkpoints import detect_family

    context = None
    for key, value in state_dict.items():
        if ".attn2.to_k." in key and key.endswith((DOWN, ".weight")):
            context = value.shape[-1]
            break
    proj = next((v for k, v in state_dict.items() if k.endswith(("proj_in.down", "proj_in.weight"))), None)
    facts = {
        "cross_attention_dim": context,
        "use_linear_projection": proj is not None and proj.ndim == 2,
        "addition_embed_type": "text_time" if any(k.startswith(("label_emb.", "add_embedding.")) for k in state_dict) else None,
    }
    return {"family": detect_family(facts), "cross_attention_dim": context}


def _check_base(state_dict: Mapping[str, torch.Tensor], unet: nn.Module, name: str) -> None:
    from controlnet.checkpoints import detect_family

    made_for = control_lora_base(state_dict)
    base_family, base_context = detect_family(unet.config), unet.config.cross_attention_dim
    if made_for["family"] != base_family or made_for["cross_attention_dim"] not in (None, base_context):
        raise UserError(
            f"{name} is a Control-LoRA for {made_for['family']} (context width {made_for['cross_attention_dim']}) "
            f"but the base model is {base_family} (context width {base_context}); use a {made_for['family']} base "
            f"model, or a Control-LoRA made for {base_family}")


def _hint_widths(sd: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The hint encoder's widths (``conditioning_embedding_out_channels``) from its convs' shapes: conv_in's
    output, then the output of every stride-2 conv (the odd ``blocks``)."""
    return (sd["controlnet_cond_embedding.conv_in.weight"].shape[0],) + tuple(
        sd[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0] for i in range(1, 64, 2)
        if f"controlnet_cond_embedding.blocks.{i}.weight" in sd)


def _controlnet_for(unet: nn.Module, sd: Mapping[str, torch.Tensor], name: str) -> ControlNet:
    """A ControlNet copying ``unet``'s encoder, with a hint encoder the shape of the file's."""
    if "controlnet_cond_embedding.conv_in.weight" not in sd:
        raise UserError(f"{name}: no input_hint_block.0.weight; the Control-LoRA is incomplete")
    conditioning_channels = sd["controlnet_cond_embedding.conv_in.weight"].shape[1]
    cn = ControlNet.from_unet(unet, conditioning_channels=conditioning_channels)
    widths = _hint_widths(sd)
    if widths != cn.config.conditioning_embedding_out_channels:
        cn.config = dataclasses.replace(cn.config, conditioning_embedding_out_channels=widths,
                                        vae_scale_factor=2 ** (len(widths) - 1))
        cn.controlnet_cond_embedding = HintEncoder(cn.config.block_out_channels[0], conditioning_channels,
                                                   widths).to(cn.dtype)
    return cn


def _split(sd: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], name: str,
           file_key: Callable[[str], str]) -> tuple[StateDict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(full tensors, {weight key: (up, down)}) of a state dict in our names; an unpaired or mis-shaped
    low-rank factor is refused (``file_key`` spells a key as the file does)."""
    full = {k: v for k, v in sd.items() if not k.endswith((UP, DOWN))}
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in sorted(k for k in sd if k.endswith((UP, DOWN))):
        module = key.rsplit(".", 1)[0]
        weight = module + ".weight"
        if weight in pairs:
            continue
        up, down = sd.get(module + UP), sd.get(module + DOWN)
        if up is None or down is None:
            raise UserError(f"{name}: {file_key(key)} has no {'down' if down is None else 'up'} factor; the file is "
                            "damaged")
        module = file_key(module + UP).removesuffix(UP)
        if not (up.is_floating_point() and down.is_floating_point()):
            raise UserError(f"{name}: {module}'s low-rank factors are not floating point")
        if weight not in params:
            raise UserError(f"{name}: low-rank factors for {module}, which the ControlNet of this base does not have")
        rows, rank = up.shape[0], up.flatten(1).shape[1]
        if rank != down.shape[0] or rows * down.flatten(1).shape[1] != params[weight].numel() \
                or rows != params[weight].shape[0]:
            raise UserError(f"{name}: {module}.up {list(up.shape)} @ .down {list(down.shape)} does not make its "
                            f"weight {list(params[weight].shape)}; the Control-LoRA does not fit this base model")
        pairs[weight] = (up, down)
    return full, pairs


def control_lora_from_state_dict(state_dict: Mapping[str, Any], unet: nn.Module,
                                 name: str = "Control-LoRA") -> ControlNet:
    """The ControlNet a Control-LoRA state dict describes on ``unet`` (a diffusers ``UNet2DConditionModel``).

    Weights: the base's, with the file's full tensors in place of their own and ``up @ down`` added to each
    low-rank layer. Every key must find its place, the hint encoder and zero convs must all be in the file, and
    every tensor must be finite; otherwise a one-line :class:`UserError` naming ``name``.
    """
    from controlnet.checkpoints import diffusers_to_original, original_to_diffusers, refuse_non_finite

    if not is_control_lora(state_dict):
        require_family(state_dict, "control-lora", name)
    sd = {k: v for k, v in state_dict.items() if k != CONTROL_LORA_MARKER}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{name}: entries that are not tensors: {', '.join(sorted(bad)[:3])}")
    native = original_to_diffusers(sd, name)
    _check_base(native, unet, name)
    cn = _controlnet_for(unet, native, name)
    params = cn.state_dict()
    # Messages name keys as the file spells them (the original layout).
    spelled = dict(zip(params, diffusers_to_original(dict.fromkeys(params), name))) | dict(zip(native, sd))
    file_key = lambda key: spelled.get(key, key)  # noqa: E731
    full, pairs = _split(native, params, name, file_key)
    own = {k: tuple(v.shape) for k, v in params.items() if k.startswith(OWN_MODULES)}
    from_base = {k: tuple(v.shape) for k, v in params.items() if k in full and k not in own}
    check_tensors(full, {**own, **from_base}, name, "ControlNet of this base model", file_key)
    refuse_non_finite({file_key(k.removesuffix(".weight") + s): t for k, (u, d) in pairs.items()
                       for s, t in ((UP, u), (DOWN, d))}, name)
    with torch.no_grad():
        for key, value in full.items():
            params[key].copy_(value)
        for key, (up, down) in pairs.items():
            weight = params[key]
            delta = up.flatten(1).float() @ down.flatten(1).float()  # (out, r) @ (r, in*kh*kw)
            weight.copy_((weight.float() + delta.reshape(weight.shape)).to(weight.dtype))
    return cn


def load_control_lora(path: str | os.PathLike, unet: nn.Module, dtype: torch.dtype | None = None,
                      device: str | torch.device | None = None) -> ControlNet:
    """Load a Control-LoRA file (.safetensors or .pth) onto ``unet``'s encoder, in eval mode; default dtype and
    device: the UNet's. A file of another family is refused in one line naming both."""
    from controlnet.checkpoints import _read_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path} is not a file; give a Control-LoRA .safetensors file")
    raw = _read_file(path)
    require_family(raw, "control-lora", str(path))
    base = next(unet.parameters())
    cn = control_lora_from_state_dict(raw, unet, str(path))
    return cn.to(device=device or base.device, dtype=dtype or base.dtype).eval()
