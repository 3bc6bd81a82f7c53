"""What a generation records about its ControlNets, as JSON-safe values.

The settings of a generation are :meth:`controlnet.generation_config.GenerationConfig.to_settings` plus what the
pipeline adds (:meth:`controlnet.pipeline.Pipeline.__call__`): the prompt, the seeds, the dtype and base, the
LoRAs and embeddings, and the control units as :func:`unit_settings` describes them. Objects that are not data (an
in-memory image or ControlNet) are recorded by their kind, so the dict always serialises.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from controlnet.generation_config import describe_image


def unit_settings(controls: Sequence[Any]) -> list[dict[str, Any]]:
    """The settings of the control units (``ControlUnit`` s) of a generation."""
    return [
        {"controlnet": describe_controlnet(u.controlnet), "control": describe_image(u.image),
         "strength": u.strength, "start": u.start, "end": u.end, "control_mode": u.control_mode,
         "annotator": u.annotator or "",
         "annotator_params": {k: describe_value(v) for k, v in u.annotator_params.items()},
         **({"control_type": u.control_type} if getattr(u, "control_type", None) else {}),
         **({"residual_scale": u.residual_scale} if getattr(u, "residual_scale", 1.0) != 1.0 else {})}
        for u in controls
    ]


def describe_controlnet(controlnet: Any) -> str:
    """A ControlNet as given (name or path), or the source of an in-memory model."""
    if isinstance(controlnet, (str, os.PathLike)):
        return str(controlnet)
    return str(getattr(controlnet, "name_or_path", "") or "ControlNet (in memory)")


def describe_value(value: Any) -> Any:
    """A setting value as JSON can hold it: numbers, strings and booleans as they are, paths as text, others by type."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    return f"<{type(value).__name__}>"


__all__ = ["describe_controlnet", "describe_image", "describe_value", "unit_settings"]
