"""Training a Control-LoRA: a ControlNet whose copied layers learn low-rank deltas on the frozen base weights,
saved in Stability AI's layout (the one :mod:`controlnet.control_lora` and ComfyUI's ``ControlLora`` load).

:func:`add_low_rank` turns a new ControlNet (a copy of the base's encoder) into one: every linear and conv layer of
the copy becomes a :class:`LoRALinear` / :class:`LoRAConv2d` whose weight is ``W + up @ down``, ``W`` the base's
(frozen), ``up`` (out, r[, 1, 1]) zero at first and ``down`` (r, in[, kh, kw]) random, so at initialisation the
model is the full copy exactly. What Stability's files store whole trains whole: biases, norms, the hint encoder
and the zero convs. The low-rank modules keep the layer's own parameter names and add ``up`` / ``down``, so the
model's state dict is the file's, renamed to the original layout, plus the frozen base weights.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from controlnet.control_lora import DOWN, OWN_MODULES, UP
from controlnet.errors import UserError
from controlnet.families import CONTROL_LORA_MARKER
from controlnet.model import ControlNet

StateDict = dict[str, torch.Tensor]
# The name of a trained Control-LoRA in OUT/controlnet, as Stability names its releases
# (control-lora-canny-rank128.safetensors).
FILE_NAME = "control-lora-rank{rank}.safetensors"


class LowRankDelta(nn.Module):
    """The ``up`` (out, r[, 1, 1]) and ``down`` (r, in[, kh, kw]) factors of a layer's weight delta, in
    Stability's shapes. ``up`` starts at zero (the delta is zero); ``down`` as ``nn.Linear``'s default
    (Kaiming-uniform, a=sqrt(5)), as peft's LoRA initialises its ``lora_A``."""

    def _init_factors(self, weight: torch.Tensor, rank: int) -> None:
        if rank < 1:
            raise UserError(f"--rank must be >= 1, got {rank}")
        rows, kernel = weight.shape[0], tuple(weight.shape[2:])
        ones = (1,) * len(kernel)
        self.up = nn.Parameter(torch.zeros(rows, rank, *ones, dtype=weight.dtype, device=weight.device))
        self.down = nn.Parameter(torch.empty(rank, *weight.shape[1:], dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.weight.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        """``up @ down`` in the weight's shape."""
        return (self.up.flatten(1) @ self.down.flatten(1)).reshape(self.weight.shape)  # (out, r) @ (r, in*kh*kw)

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.delta_weight()


class LoRALinear(nn.Linear, LowRankDelta):
    """``nn.Linear`` with weight ``W + up @ down``; ``W`` frozen."""

    @classmethod
    def from_layer(cls, layer: nn.Linear, rank: int) -> "LoRALinear":
        new = cls(layer.in_features, layer.out_features, layer.bias is not None,
                  device=layer.weight.device, dtype=layer.weight.dtype)
        new.load_state_dict(layer.state_dict())
        new._init_factors(new.weight, rank)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.bias)


class LoRAConv2d(nn.Conv2d, LowRankDelta):
    """``nn.Conv2d`` with weight ``W + up @ down``; ``W`` frozen."""

    @classmethod
    def from_layer(cls, layer: nn.Conv2d, rank: int) -> "LoRAConv2d":
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                  device=layer.weight.device, dtype=layer.weight.dtype)
        new.load_state_dict(layer.state_dict())
        new._init_factors(new.weight, rank)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.merged_weight(), self.bias)


LOW_RANK_TYPES = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def _copied(name: str) -> bool:
    """Whether a module (or parameter) name is of the copied encoder, not of the ControlNet's own modules."""
    return not (name + ".").startswith(OWN_MODULES)


def add_low_rank(controlnet: ControlNet, rank: int) -> ControlNet:
    """Make ``controlnet`` (a copy of the base's encoder, ``architecture="copy"``) a Control-LoRA in place: each
    linear and conv layer of the copy gets low-rank factors of rank ``rank`` and its weight is frozen. Any other
    weight of two or more dimensions in the copy (which the layout has no low-rank place for) is refused."""
    if controlnet.config.architecture != "copy" or controlnet.config.hint_encoder != "released":
        raise UserError("a Control-LoRA is a copy of the base's encoder with the released hint encoder; "
                        f"got architecture {controlnet.config.architecture!r}, hint encoder "
                        f"{controlnet.config.hint_encoder!r}")
    targets = [(name, module) for name, module in controlnet.named_modules()
               if name and _copied(name) and type(module) in LOW_RANK_TYPES]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = controlnet.get_submodule(parent_name) if parent_name else controlnet
        setattr(parent, child, LOW_RANK_TYPES[type(module)].from_layer(module, rank))
    other = [n for n, p in controlnet.named_parameters()
             if p.ndim >= 2 and _copied(n) and not n.endswith((UP, DOWN))
             and not isinstance(controlnet.get_submodule(n.rsplit(".", 1)[0]), LowRankDelta)]
    if other:
        raise UserError(f"a Control-LoRA has no low-rank place for {', '.join(other[:3])}; train this base's "
                        "ControlNet with --architecture copy")
    return controlnet


def is_low_rank(controlnet: nn.Module) -> bool:
    """Whether ``controlnet`` has low-rank layers (:func:`add_low_rank`)."""
    return any(isinstance(m, LowRankDelta) for m in controlnet.modules())


def control_lora_rank(controlnet: nn.Module) -> int:
    """The rank of ``controlnet``'s low-rank factors."""
    return next(m.up.shape[1] for m in controlnet.modules() if isinstance(m, LowRankDelta))


def control_lora_state_dict(controlnet: ControlNet, dtype: torch.dtype | None = None) -> StateDict:
    """The Control-LoRA file of ``controlnet`` (:func:`add_low_rank`) in Stability's layout: original-layout names
    without ``control_model.``, ``<module>.up`` / ``.down`` for the low-rank layers, whole tensors for the rest
    (biases, norms, hint encoder, zero convs), and the ``lora_controlnet`` marker. The frozen base weights are
    left out (the base the file is used with provides them)."""
    from controlnet.checkpoints import diffusers_to_original

    frozen = {name + ".weight" for name, m in controlnet.named_modules() if isinstance(m, LowRankDelta)}
    native = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in controlnet.state_dict().items()
              if k not in frozen}
    return {**diffusers_to_original(native, "Control-LoRA"), CONTROL_LORA_MARKER: torch.tensor([])}


def save_control_lora(controlnet: ControlNet, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``controlnet``'s Control-LoRA file into ``folder`` (made if missing) atomically as
    ``control-lora-rank{R}.safetensors``; return the file's path."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from controlnet.checkpoints import write_error
    from controlnet.fileio import atomic_path

    folder = Path(folder).expanduser()
    path = folder / FILE_NAME.format(rank=control_lora_rank(controlnet))
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder; choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = control_lora_state_dict(controlnet, dtype)
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
    except (OSError, SafetensorError) as err:
        raise write_error(path, err) from None
    return path
