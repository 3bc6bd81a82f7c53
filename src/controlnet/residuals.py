"""What a control branch hands to the locked base: residuals keyed by where the base adds them.

A ControlNet (Zhang et al. 2023) does not change the base's weights: it computes tensors that the base adds to
its own features at fixed places. Where those places are depends on the base, so a :class:`Residuals` maps a
*location* to a tensor, and a location is ``(kind, index)``:

=========================  ================================================  ==================================
location                   where the base adds the tensor                    diffusers' argument
=========================  ================================================  ==================================
``("down", i)``            UNet skip connection i (conv_in's output first)   ``down_block_additional_residuals``
``("mid", 0)``             UNet mid block output                             ``mid_block_additional_residual``
``("down_intrablock", i)`` inside UNet down block i (T2I-Adapter features)   ``down_intrablock_additional_residuals``
``("block", i)``           transformer (double-stream / joint) block i       ``controlnet_block_samples`` (Flux),
                                                                             ``block_controlnet_hidden_states`` (SD3)
``("single", i)``          Flux single-stream block i                        ``controlnet_single_block_samples``
=========================  ================================================  ==================================

A mapping keeps its locations in the order the base meets them (encoder order, mid last); a per-residual scale
list follows that order. Every control branch's forward returns one; several add with ``+`` (the paper's
Sec. 3.4, "Composing multiple ControlNets": residuals at the same location add, with no other weighting), and
residuals at different locations (a ControlNet and a T2I-Adapter) are kept side by side. The base call takes
them through a method per base: :meth:`Residuals.unet_kwargs` for a diffusers ``UNet2DConditionModel``; a
transformer base reads its kinds with :meth:`Residuals.of_kind` (its own placement rule maps index i to the
base blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

DOWN, MID, DOWN_INTRABLOCK = "down", "mid", "down_intrablock"  # UNet bases
BLOCK, SINGLE = "block", "single"  # transformer bases (Flux double/single-stream blocks, SD3 joint blocks)
# The diffusers UNet2DConditionModel argument of each UNet kind, in the order a UNet call lists them.
UNET_ARGUMENTS = {DOWN: "down_block_additional_residuals", MID: "mid_block_additional_residual",
                  DOWN_INTRABLOCK: "down_intrablock_additional_residuals"}

Location = tuple[str, int]  # (kind, index): see the table in the module docstring

# Guess mode ("CFG resolution weighting") scales residual i of N by 0.825**(N-1-i); the mid residual gets 1.0.
# Source: lllyasviel/ControlNet, gradio_*2image.py: `[strength * (0.825 ** float(12 - i)) for i in range(13)]`.
GUESS_MODE_BASE = 0.825


@dataclass(frozen=True, eq=False)
class Residuals:
    """Tensors a control branch adds to the locked base, keyed by location ``(kind, index)``.

    ``tensors`` is in the order the base meets the locations; nothing is copied, so a tensor handed to the base
    is the one the branch made. Build a UNet's with :meth:`for_unet`; ``Residuals()`` adds nothing (it is the
    start of a sum)::

        res = controlnet(latents, t, text, hint)          # Residuals: ("down", 0..N-2), ("mid", 0)
        res = res + other(latents, t, text, hint2)        # two ControlNets: added location by location
        eps = unet(latents, t, text, **res.unet_kwargs()).sample
    """

    tensors: Mapping[Location, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def for_unet(cls, down: Sequence[torch.Tensor], mid: torch.Tensor | None = None) -> "Residuals":
        """A UNet ControlNet's residuals: one per skip connection (encoder order), then the mid block's."""
        tensors: dict[Location, torch.Tensor] = {(DOWN, i): r for i, r in enumerate(down)}
        if mid is not None:
            tensors[(MID, 0)] = mid
        return cls(tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The tensors, in the order the base meets them."""
        return iter(self.tensors.values())

    def locations(self) -> list[Location]:
        return list(self.tensors)

    def of_kind(self, kind: str) -> tuple[torch.Tensor, ...]:
        """The tensors of one kind (e.g. ``"down"``), by index."""
        found = {i: t for (k, i), t in self.tensors.items() if k == kind}
        return tuple(found[i] for i in sorted(found))

    @property
    def down(self) -> tuple[torch.Tensor, ...]:
        """The UNet skip-connection residuals, in encoder order (``down_block_additional_residuals``)."""
        return self.of_kind(DOWN)

    @property
    def mid(self) -> torch.Tensor | None:
        """The UNet mid-block residual (``mid_block_additional_residual``), or None."""
        return self.tensors.get((MID, 0))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Residuals":
        """``fn`` applied to every tensor, locations kept (e.g. a device move, a pooling, a padding)."""
        return Residuals({loc: fn(t) for loc, t in self.tensors.items()})

    def to(self, *args: Any, **kwargs: Any) -> "Residuals":
        """Every tensor through ``Tensor.to(*args, **kwargs)``."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def scaled(self, scales: float | Sequence[float]) -> "Residuals":
        """Residual i times ``scales[i]`` (in the order the base meets them), or all times one float.

        A scale of exactly 1.0 leaves its tensor as it is (x * 1.0 == x in floating point).
        """
        if isinstance(scales, (int, float)):
            scales = [float(scales)] * len(self)
        scales = [float(s) for s in scales]
        if len(scales) != len(self):
            raise ValueError(f"{len(scales)} scales given for {len(self)} residuals (one per residual, in the "
                             "order the base adds them)")
        if all(s == 1.0 for s in scales):
            return self
        return Residuals({loc: t * s for (loc, t), s in zip(self.tensors.items(), scales)})

    def __add__(self, other: "Residuals") -> "Residuals":
        """Residuals at the same location add (``self``'s first); locations of one side only are kept as they are.

        Two branches that write the same kind must write the same locations of it (two ControlNets of one base
        family): otherwise one would be silently partial, so it is refused.
        """
        for kind in {k for k, _ in self.tensors} & {k for k, _ in other.tensors}:
            mine = sorted(i for k, i in self.tensors if k == kind)
            theirs = sorted(i for k, i in other.tensors if k == kind)
            if mine != theirs:
                raise ValueError(f"cannot add residuals: one has {len(mine)} {kind!r} locations, the other "
                                 f"{len(theirs)}; are both branches made for the same base?")
        tensors = dict(self.tensors)
        for loc, t in other.tensors.items():
            tensors[loc] = tensors[loc] + t if loc in tensors else t
        return Residuals(tensors)

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a diffusers ``UNet2DConditionModel`` call (none when there is nothing to add)."""
        kinds = {k for k, _ in self.tensors}
        if kinds - set(UNET_ARGUMENTS):
            raise ValueError(f"residuals at {sorted(kinds - set(UNET_ARGUMENTS))} locations have no place in a UNet")
        kwargs: dict[str, Any] = {}
        if DOWN in kinds:
            kwargs[UNET_ARGUMENTS[DOWN]] = self.down
        if MID in kinds:
            kwargs[UNET_ARGUMENTS[MID]] = self.mid
        if DOWN_INTRABLOCK in kinds:  # a fresh list: the UNet pops its entries
            kwargs[UNET_ARGUMENTS[DOWN_INTRABLOCK]] = list(self.of_kind(DOWN_INTRABLOCK))
        return kwargs


def original_guess_mode_scales(num_residuals: int, strength: float = 1.0) -> list[float]:
    """Per-residual scales of lllyasviel/ControlNet's guess mode: residual i of N gets strength * 0.825**(N-1-i).

    ``num_residuals`` counts the down residuals *and* the mid residual (13 for SD1.5), so the mid residual
    (the last) gets ``strength``. Source: lllyasviel/ControlNet gradio demos (``0.825 ** float(12 - i)``).
    diffusers' guess mode scales differently: :func:`controlnet.diffusers_compat.diffusers_guess_mode_scales`.
    """
    if num_residuals < 1:
        raise ValueError(f"num_residuals must be >= 1, got {num_residuals}")
    return [strength * GUESS_MODE_BASE ** float(num_residuals - 1 - i) for i in range(num_residuals)]
