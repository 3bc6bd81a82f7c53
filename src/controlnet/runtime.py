"""How the models run: CPU offload, torch.compile, channels-last, VAE tiling.

=================  ==============================================================================================
option             what it does (and whose recipe it follows)
=================  ==============================================================================================
offload "model"    every model lives on the CPU and moves whole to the device when it runs; the text encoder(s),
                   the UNet and the VAE in a chain where each one's start sends the previous one back
                   (accelerate's ``cpu_offload_with_hook``, as diffusers' ``enable_model_cpu_offload``). The
                   ControlNets, called in turn with the UNet at every step, get their own hooks and stay on the
                   device until the generation ends, as diffusers does for its ControlNet pipelines.
offload            every layer moves to the device only while it runs (accelerate's ``cpu_offload``, as
 "sequential"      diffusers' ``enable_sequential_cpu_offload``): the least memory, and much slower.
compile            ``torch.compile`` of the UNet and the ControlNets, in place (``nn.Module.compile``): the first
                   generation compiles (slow), later ones at the same size reuse the compiled code.
channels-last      the UNet's, the ControlNets' and the VAE's weights in ``torch.channels_last`` memory format
                   (faster convolutions on GPUs with tensor cores, and with oneDNN on CPUs).
VAE tiling         diffusers' ``AutoencoderKL`` tiled decoding (overlapping tiles at the VAE's native size,
                   blended): "on", "off", or "auto" — on when the plain decode would need more than
                   :data:`AUTO_TILING_FRACTION` of the device's memory, at :data:`controlnet.limits.BYTES_PER_PIXEL`
                   (the decoder's measured peak per output pixel: SD1.5's VAE in fp32 on a CPU takes 356, 612 and
                   987 MiB over its weights at 256, 384 and 512 px square, 5.7 to 3.9 KB per pixel).
=================  ==============================================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from controlnet.errors import UserError

OFFLOAD_MODES = ("model", "sequential")
VAE_TILING_MODES = ("auto", "on", "off")
# "auto" VAE tiling: tile once the plain decode would take more than this share of the device's memory (the rest
# is for the weights and the sampler, which finished before the decode but may still hold their memory).
AUTO_TILING_FRACTION = 0.5


def check_offload(mode: str | None) -> str | None:
    """``mode`` if it is None or one of :data:`OFFLOAD_MODES`; else a one-line :class:`UserError`."""
    if mode is not None and mode not in OFFLOAD_MODES:
        raise UserError(f"unknown offload mode {mode!r}; use {' or '.join(OFFLOAD_MODES)}")
    return mode


def add_offload_hooks(chain: Sequence[nn.Module], others: Sequence[nn.Module], mode: str,
                      device: torch.device) -> list[Any]:
    """Offload ``chain`` (run in this order) and ``others`` (called repeatedly: ControlNets) to the CPU, running
    on ``device`` (the module docstring); returns the hooks of the "model" mode (for :func:`release`)."""
    from accelerate import cpu_offload, cpu_offload_with_hook

    check_offload(mode)
    hooks = []
    if mode == "sequential":
        for model in [*chain, *others]:
            cpu_offload(model, device, offload_buffers=len(model._parameters) > 0)
        return hooks
    previous = None
    for model in chain:
        model.to("cpu")
        _, previous = cpu_offload_with_hook(model, device, prev_module_hook=previous)
        hooks.append(previous)
    hooks += add_model_hooks(others, device)
    return hooks


def add_model_hooks(models: Sequence[nn.Module], device: torch.device) -> list[Any]:
    """Hooks of the "model" mode for models outside the chain (ControlNets loaded later)."""
    from accelerate import cpu_offload_with_hook

    hooks = []
    for model in models:
        model.to("cpu")
        hooks.append(cpu_offload_with_hook(model, device)[1])
    return hooks


def release(hooks: Sequence[Any]) -> None:
    """Send every model of the "model" mode back to the CPU (at the end of a generation)."""
    for hook in hooks:
        hook.offload()


def remove_offload_hooks(models: Sequence[nn.Module], device: torch.device) -> None:
    """Remove the offload hooks of ``models`` and put them on ``device`` (before LoRA or embeddings change them)."""
    from accelerate.hooks import remove_hook_from_module

    for model in models:
        remove_hook_from_module(model, recurse=True)
        model.to(device)


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate's offload hooks are on ``module`` or its layers."""
    return any(hasattr(m, "_hf_hook") for m in module.modules())


def compile_model(model: nn.Module, mode: str | None = None, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` ``model`` in place (``nn.Module.compile``); it compiles on its first call."""
    model.compile(mode=mode, backend=backend)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model``'s 4-D weights in channels-last memory format (in place)."""
    return model.to(memory_format=torch.channels_last)


def check_vae_tiling(mode: str) -> str:
    if mode not in VAE_TILING_MODES:
        raise UserError(f"unknown VAE tiling mode {mode!r}; use {', '.join(VAE_TILING_MODES)}")
    return mode


def wants_tiling(mode: str, width: int, height: int, device: str) -> bool:
    """Whether to decode a ``width`` x ``height`` image with VAE tiling (the rule of the module docstring)."""
    if check_vae_tiling(mode) != "auto":
        return mode == "on"
    from controlnet.limits import BYTES_PER_PIXEL, device_memory

    memory, _ = device_memory(device)
    return width * height * BYTES_PER_PIXEL > AUTO_TILING_FRACTION * memory


def set_vae_tiling(vae: nn.Module, on: bool) -> None:
    """Turn diffusers' tiled decoding of ``vae`` on or off (a VAE without it is left as it is)."""
    if on and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    elif not on and hasattr(vae, "disable_tiling"):
        vae.disable_tiling()


class Runtime:
    """How a pipeline's models run: its offload mode, compile and channels-last options, VAE tiling (module
    docstring). It holds the options and the offload hooks, not the models: the pipeline passes ``chain`` (the
    text encoders, the UNet and the VAE, in the order they run) and ``others`` (the ControlNets)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.offload: str | None = None
        self.compiled: dict[str, Any] | None = None  # torch.compile's arguments once compile() ran
        self.channels_last = False
        self.vae_tiling = "auto"
        self._hooks: list[Any] = []

    def enable_offload(self, mode: str | None, chain: Sequence[nn.Module], others: Sequence[nn.Module]) -> None:
        """Offload ``"model"``, ``"sequential"`` or None (off)."""
        check_offload(mode)
        self.remove(chain, others)
        self.offload = mode
        if mode is not None:
            self.apply(chain, others)

    def apply(self, chain: Sequence[nn.Module], others: Sequence[nn.Module]) -> None:
        """The offload hooks of the current mode on the models (after a model changed, e.g. another VAE)."""
        self.remove(chain, others)
        self._hooks = add_offload_hooks(chain, others, self.offload, self.device)

    def remove(self, chain: Sequence[nn.Module], others: Sequence[nn.Module]) -> None:
        offloaded = [m for m in [*chain, *others] if is_offloaded(m)]
        if offloaded:
            remove_offload_hooks(offloaded, self.device)
        self._hooks = []

    @contextlib.contextmanager
    def paused(self, chain: Sequence[nn.Module], others: Sequence[nn.Module]) -> Iterator[None]:
        """Models without offload hooks while LoRA layers or embeddings are added (diffusers' loaders do the same)."""
        if not self.offload:
            yield
            return
        self.remove(chain, others)
        try:
            yield
        finally:
            self.apply(chain, others)

    def release(self) -> None:
        """Send every offloaded model back to the CPU (the end of a generation)."""
        release(self._hooks)

    def compile(self, models: Sequence[nn.Module], mode: str | None = None, backend: str = "inductor") -> None:
        """``torch.compile`` ``models`` (and, through :meth:`prepare`, ControlNets loaded later)."""
        self.compiled = {"mode": mode, "backend": backend}
        for model in models:
            compile_model(model, mode, backend)

    def use_channels_last(self, models: Sequence[nn.Module]) -> None:
        """``models`` in channels-last memory format (and, through :meth:`prepare`, models loaded later)."""
        self.channels_last = True
        for model in models:
            to_channels_last(model)

    def prepare(self, controlnet: nn.Module) -> nn.Module:
        """Apply the options to a newly loaded ControlNet."""
        if self.channels_last:
            to_channels_last(controlnet)
        if self.compiled:
            compile_model(controlnet, **self.compiled)
        if self.offload == "model":
            self._hooks += add_model_hooks([controlnet], self.device)
        elif self.offload == "sequential":
            add_offload_hooks([], [controlnet], "sequential", self.device)
        return controlnet

    def configure_vae_tiling(self, vae: nn.Module, width: int, height: int) -> None:
        """Tiled VAE decoding for this output size, per :attr:`vae_tiling` (:func:`wants_tiling`)."""
        set_vae_tiling(vae, wants_tiling(self.vae_tiling, width, height, str(self.device)))
