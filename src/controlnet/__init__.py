"""controlnet: spatial control for pretrained text-to-image diffusion models.

Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models", ICCV 2023.

The public API is imported lazily (PEP 562), so ``import controlnet`` is cheap and has no side effects::

    from controlnet import ControlNet, load_controlnet, save_controlnet, Pipeline
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ControlNet": "controlnet.model",
    "ControlNetConfig": "controlnet.model_config",
    "Residuals": "controlnet.residuals",
    "original_guess_mode_scales": "controlnet.residuals",
    "UserError": "controlnet.errors",
    "load_controlnet": "controlnet.checkpoints",
    "save_controlnet": "controlnet.checkpoints",
    "detect_family": "controlnet.checkpoints",
    "Pipeline": "controlnet.pipeline",
    "ControlUnit": "controlnet.pipeline",
    "GenerationConfig": "controlnet.generation_config",
    "HiresFix": "controlnet.generation_config",
    "ImageToImage": "controlnet.generation_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'controlnet' has no attribute {name!r}")
