"""Which kind of control model a file holds, told from its keys (and config.json) without building a model.

Five families share the ``--controlnet`` door: ControlNets in the original layout (lllyasviel's
``control_model.*`` / ``input_hint_block.*``) and in diffusers' layout (``controlnet_cond_embedding.*``), xinsir's
Union/ProMax ControlNets (a diffusers ControlNet plus ``task_embedding``, ``transformer_layes.*``,
``control_add_embedding.*``), Stability's Control-LoRAs (original-layout keys, low-rank ``.up``/``.down`` pairs
and the ``lora_controlnet`` marker key) and TencentARC's T2I-Adapters (``conv_in`` + ``body.*`` or
diffusers' ``adapter.body.*``). :func:`detect_family` names the family; :func:`require_family` refuses a file of
one family where another is needed, in one line naming both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


from controlnet.errors import UserError

# What each family name means, as messages say it.
FAMILIES: dict[str, str] = {
    "controlnet": "a ControlNet (original layout)",
    "controlnet-diffusers": "a ControlNet (diffusers layout)",
    "union": "a Union/ProMax ControlNet",
    "control-lora": "a Control-LoRA",
    "t2i-adapter": "a T2I-Adapter",
}
# The two ControlNet layouts, for callers that take either.
CONTROLNET_FAMILIES = ("controlnet", "controlnet-diffusers")
# Stability's Control-LoRA files carry this key (an empty tensor) as their marker (ComfyUI comfy/controlnet.py
# `if "lora_controlnet" in controlnet_data`, diffusers `is_sai_sd_control_lora`).
CONTROL_LORA_MARKER = "lora_controlnet"
# Keys only xinsir's Union/ProMax ControlNets have (diffusers ControlNetUnionModel's extra modules). Not
# "transformer_layes.": TencentARC's style adapter has that module name too.
UNION_PREFIXES = ("task_embedding", "spatial_ch_projs.", "control_add_embedding.")
# diffusers' class names in config.json, for folders.
CLASS_FAMILIES = {"T2IAdapter": "t2i-adapter", "ControlNetUnionModel": "union", "ControlNetModel": "controlnet-diffusers"}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin")


def family_of_keys(keys: Iterable[str], name: str = "state dict") -> str:
    """The family of a state dict from its key names alone (see the module docstring)."""
    keys = set(keys)
    if CONTROL_LORA_MARKER in keys:
        return "control-lora"
    if any(k.startswith(UNION_PREFIXES) for k in keys):
        return "union"
    if any(k.startswith(("controlnet_cond_embedding.", "controlnet_down_blocks.")) for k in keys):
        return "controlnet-diffusers"
    if any(k.startswith(("control_model.", "input_hint_block.", "zero_convs.", "middle_block_out.")) for k in keys):
        return "controlnet"
    if any(k.startswith("adapter.body.") for k in keys) or "adapter" in keys or (
            any(k.startswith("body.0.") for k in keys) and not any(k.startswith("down_blocks.") for k in keys)):
        return "t2i-adapter"
    shown = ", ".join(sorted(keys)[:3]) or "none"
    raise UserError(f"{name} is no control model we know (ControlNet, Union, Control-LoRA, T2I-Adapter); "
                    f"keys e.g. {shown}")


def _file_keys(path: Path) -> list[str]:
    """The key names of a weights file; a .safetensors file's header only, a pickle through weights_only."""
    from controlnet.checkpoints import _read_file, check_regular_file

    check_regular_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return list(f.keys())
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise UserError(f"{path} is not a valid .safetensors file (truncated or corrupt?): {err}") from None
    return list(_read_file(path))


def detect_family(source: str | os.PathLike | Mapping[str, Any]) -> str:
    """The family (a key of :data:`FAMILIES`) of a file, a diffusers folder or a state dict.

    Nothing is built and, for .safetensors files, no tensor is read. A folder's config.json ``_class_name``
    decides when it names a family we know; a ControlNetModel folder whose weights are a Union's is a Union.
    """
    if isinstance(source, Mapping):
        return family_of_keys(source.keys())
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist; give a control model file or diffusers folder")
    if not path.is_dir():
        return family_of_keys(_file_keys(path), str(path))
    weights = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
    config = path / "config.json"
    class_name = None
    if config.is_file():
        try:
            class_name = json.loads(config.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError) as err:
            raise UserError(f"{config} is not a readable JSON config: {err}") from None
    if weights is None:
        raise UserError(f"{path} has no {' / '.join(WEIGHT_NAMES)}; give a diffusers folder or a weights file")
    from_keys = family_of_keys(_file_keys(weights), str(weights))
    return from_keys if from_keys == "union" else CLASS_FAMILIES.get(class_name, from_keys)


def describe(family: str) -> str:
    return FAMILIES.get(family, family)


def require_family(source: str | os.PathLike | Mapping[str, Any], expected: str | tuple[str, ...],
                   name: str | None = None) -> str:
    """The family of ``source`` if it is ``expected`` (one name or several); otherwise a one-line
    :class:`UserError` naming both families."""
    wanted = (expected,) if isinstance(expected, str) else tuple(expected)
    found = detect_family(source)
    if found not in wanted:
        name = name or (str(source) if not isinstance(source, Mapping) else "the state dict")
        raise UserError(f"{name} is {describe(found)}, but {' or '.join(describe(w) for w in wanted)} is needed "
                        "here; give a file of that family, or load this one where "
                        f"{describe(found).removeprefix('a ').removeprefix('an ')} is taken")
    return found
