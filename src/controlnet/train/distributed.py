"""Several processes: ``accelerate launch`` (or ``torchrun``) starts them, accelerate gives each its device, mixed
precision and collective operations, and PyTorch's DistributedDataParallel averages the gradients.

Each process takes its share of every global micro-batch (:class:`controlnet.data.datasets.StreamBatches`);
after the last micro-batch of an optimizer step DDP has averaged the gradients over the processes (bucketed
all-reduces overlapping the backward pass); the micro-batches before it run under ``no_sync``. The trainable set
changes once, at ``--unlock-decoder-after``: a DDP wrapper's parameters are fixed when it is made, so the
ControlNet is wrapped at the start and the base UNet, whose decoder then starts training, is wrapped at the
unlock.

The wrappers are made here rather than by ``Accelerator.prepare_model``: under ``--mixed-precision`` that method
also replaces the module's own ``forward`` by an autocast wrapper, which stays on the unwrapped ControlNet (the
validation samples and the saved model would then run under autocast too); the loop autocasts explicitly instead.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch

from controlnet.errors import UserError


def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def make_accelerator(mixed_precision: str) -> Any:
    """This process's ``accelerate.Accelerator`` (the cpu when no GPU is present)."""
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=not has_accelerator())
    except ValueError as err:  # accelerate: one mixed-precision setting per process
        first = str(err).splitlines()[0]
        raise UserError(f"{first} (start a new Python process for another --mixed-precision)") from None


def data_parallel(module: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """``module`` in a DistributedDataParallel wrapper over its parameters that require gradients (made alike on
    every process; the main process's weights are broadcast to the others); ``module`` itself in one process."""
    if accelerator.num_processes == 1:
        return module
    device = accelerator.device
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(models: Iterable[torch.nn.Module], sync: bool) -> Iterator[None]:
    """Run a micro-batch's forward and backward; without ``sync``, DDP wrappers only accumulate gradients locally
    (gradient accumulation: they are averaged once, on the step's last micro-batch)."""
    with contextlib.ExitStack() as stack:
        if not sync:
            for model in models:
                if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                    stack.enter_context(model.no_sync())
        yield


def raise_on_every_process(message: str | None, accelerator: Any) -> None:
    """Raise ``UserError(message)`` on every process when the main process found one (``message`` is only read
    there), so a problem only the main process can see stops the others too."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message], from_process=0)[0]
    if message:
        raise UserError(message)
