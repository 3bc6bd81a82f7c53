"""What a generation records: its settings as a JSON-safe dict, enough to reproduce the images.

:class:`controlnet.pipeline.Pipeline` returns them in ``GenerationResult.settings``;
:func:`controlnet.images.png_metadata` writes them into the PNG (as JSON, and as A1111's ``parameters`` text),
and ``generate --from-png`` reads them back. Objects that are not data (an in-memory image or ControlNet) are
recorded by their kind, so the dict always serialises.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def generation_settings(*, prompt: str, negative_prompt: str, seed: int, steps: int, scheduler: str,
                        guidance: float, width: int, height: int, eta: float, guess_mode: bool, reuse_residuals: int,
                        num_images: int, controls: Sequence[Any], dtype: str, base: str) -> dict[str, Any]:
    """The settings of a text-to-image generation with its control units (``ControlUnit`` s)."""
    return {
        "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed,
        "seeds": [seed + k for k in range(num_images)], "steps": steps, "scheduler": scheduler,
        "guidance": float(guidance), "size": f"{width}x{height}", "eta": float(eta), "guess_mode": bool(guess_mode),
        **({"reuse_residuals": reuse_residuals} if reuse_residuals > 1 else {}),
        "num_images": num_images, "dtype": dtype, "base": base,
        "controlnets": [
            {"controlnet": describe_controlnet(u.controlnet), "control": describe_image(u.image),
             "strength": u.strength, "start": u.start, "end": u.end, "control_mode": u.control_mode,
             "annotator": u.annotator or "",
             "annotator_params": {k: describe_value(v) for k, v in u.annotator_params.items()}}
            for u in controls
        ],
    }


def image_settings(*, init_image: Any, denoise: float, mask: Any, mask_blur: float, mask_invert: bool,
                   full_res: bool, padding: int, hires: Any, steps: int) -> dict[str, Any]:
    """The settings of image to image and of a hires fix (none for plain text-to-image)."""
    settings: dict[str, Any] = {}
    if init_image is not None:
        settings.update(init_image=describe_image(init_image), denoise=denoise)
    if mask is not None:
        settings.update(mask=describe_image(mask), mask_blur=float(mask_blur), mask_invert=bool(mask_invert),
                        inpaint_full_res=bool(full_res), inpaint_padding=int(padding))
    if hires is not None:
        settings["hires"] = {"scale": float(hires.scale), "denoise": float(hires.denoise),
                             "steps": int(hires.steps or steps), "upscaler": hires.upscaler}
    return settings


def describe_controlnet(controlnet: Any) -> str:
    """A ControlNet as given (name or path), or the source of an in-memory model."""
    if isinstance(controlnet, (str, os.PathLike)):
        return str(controlnet)
    return str(getattr(controlnet, "name_or_path", "") or "ControlNet (in memory)")


def describe_image(image: Any) -> str:
    """A path as given, or the kind of in-memory image."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"<{type(image).__name__}>"


def describe_value(value: Any) -> Any:
    """A setting value as JSON can hold it: numbers, strings and booleans as they are, paths as text, others by type."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    return f"<{type(value).__name__}>"
