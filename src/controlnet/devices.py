"""Where models run and in what dtype: the device and dtype policy, and the placement of a loaded model.

Device: the one asked for, else cuda, then mps, then cpu. Dtype: the one asked for (any name of :data:`DTYPES`),
else the device's default (:func:`default_dtype`): fp16 on cuda (tensor cores; the released checkpoints are fp16),
fp32 on mps (partial bf16 support), and on cpu bf16 only where the CPU multiplies bf16 in hardware (AMX or
AVX-512 BF16: about 2.4x faster than fp32 for SD1.5 UNet + ControlNet, docs/performance.md), else fp32 (bf16 is
emulated there, and slower). The embedded tiny base stays fp32 on the CPU: its 16-64-channel convolutions gain
nothing from bf16 (20 steps took 3.1 s in both on an AMX CPU) and would lose precision.

This module sits at the bottom of the package: it imports torch and nothing of ours but the error type and
the defaults.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from controlnet.defaults import DTYPE_CHOICES
from controlnet.errors import UserError

# The one table of dtype names: ours, torch's, and accelerate's mixed-precision names ("no" = full precision).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "no": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
# The short name of each supported dtype (settings, file names; the choices of --dtype).
DTYPE_NAMES: dict[torch.dtype, str] = {DTYPES[name]: name for name in DTYPE_CHOICES}

# /proc/cpuinfo flags of x86 CPUs that multiply bf16 in hardware: Intel AMX tiles, and AVX-512 BF16 dot products
# (Intel Cooper Lake+, AMD Zen 4+). Without them oneDNN emulates bf16 and it is slower than fp32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or the best available one: cuda, then mps, then cpu."""
    if device is not None:
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
        _check_available(resolved)
        return resolved
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_available(device: torch.device) -> None:
    """A one-line :class:`UserError` for a device this machine does not have (before anything is loaded)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device {device} is not available: torch sees no CUDA GPU here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"device {device} is not available: there are {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"device {device} is not available on this machine (no Apple MPS); use --device cpu")


def cpu_bf16_flags() -> list[str]:
    """Which of :data:`BF16_CPU_FLAGS` this CPU has (Linux; elsewhere an empty list)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split())
                    return [flag for flag in BF16_CPU_FLAGS if flag in flags]
    except OSError:
        pass
    return []


def default_dtype(device: str | torch.device, tiny: bool = False) -> torch.dtype:
    """The dtype models run in on ``device`` unless told otherwise (the rule in the module docstring); ``tiny``:
    the embedded base, which stays fp32 on the CPU."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16
    if kind == "cpu" and cpu_bf16_flags() and not tiny:
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device, tiny: bool = False) -> torch.dtype:
    """A torch dtype from ``dtype`` (a name of :data:`DTYPES`, "auto"/None for the device's default, or a torch
    dtype); ``tiny`` as in :func:`default_dtype`."""
    if dtype is None or dtype == "auto":
        return default_dtype(device, tiny)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise UserError(f"unsupported dtype {dtype}; use fp32, bf16 or fp16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16") from None



def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A name of :data:`DTYPES` (``"fp16"``/``"bf16"``/``"fp32"``, ...), a torch dtype, or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


def placement(module: nn.Module) -> dict[str, Any]:
    """Where a model runs and its dtype, as keyword arguments for ``Tensor.to``: its parameters' device, or for a
    model offloaded by accelerate's hooks (:mod:`controlnet.runtime`) the device the hooks run it on."""
    p = next(module.parameters())
    return {"device": execution_device(module) or p.device, "dtype": p.dtype}


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate's offload hooks run ``module`` on (None without hooks), as diffusers'
    ``DiffusionPipeline._execution_device`` finds it: on the model ("model" offload) or on its layers
    ("sequential" offload, whose parameters wait on the meta device)."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is None and next(module.parameters()).device.type == "meta":
        for sub in module.modules():
            device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
            if device is not None:
                break
    return torch.device(device) if device is not None else None


def move(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move and cast a model in place. diffusers' ``ModelMixin.to`` warns on every dtype cast (0.42) even when no
    sub-module must stay fp32, so models without ``_keep_in_fp32_modules`` use ``nn.Module.to`` directly."""
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(device=device, dtype=dtype)
    return nn.Module.to(module, device=device, dtype=dtype)
