"""``controlnet info FILE``: what a control model file or folder is, without loading it into a model.

Reads only a .safetensors file's header (names, shapes and dtypes of its tensors; a .pth pickle is read through
``weights_only``) and a folder's config.json, and prints one ``name: value`` line each (here the bundled
``fill`` ControlNet)::

    $ controlnet info fill
    file: .../controlnet/assets/controlnets/fill
    family: controlnet-diffusers, a ControlNet (diffusers layout)
    base: sd1
    layers: 7 residuals (6 skips + mid); block widths [32, 64, 64]; diffusers layout
    conditions: a 3-channel image
    dtype: float16
    parameters: 1.05M

Families: ControlNets (original and diffusers layouts), Union/ProMax, Control-LoRA, T2I-Adapter
(:mod:`controlnet.families`), and the Flux / SD3 ControlNets (:mod:`controlnet.transformer_formats`).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# safetensors' dtype names → torch's attribute names (the meta tensors that stand in for the file's tensors).
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                 "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``info`` sub-command."""
    parser = subparsers.add_parser(
        "info", help="print what a control model file is (family, base, layers, conditions, dtype, parameters)",
        description="Print what a control model file or diffusers folder is: its family (ControlNet, Union/ProMax, "
        "Control-LoRA, T2I-Adapter, Flux/SD3 ControlNet), the base it fits, its layers, its conditions or modes, "
        "its dtype and parameter count. Reads the file's header and config.json only.")
    parser.add_argument("path", metavar="FILE", help="a .safetensors/.pth file, a diffusers folder or a bundled name")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for key, value in describe(args.path).items():
        print(f"{key}: {value}")
    return 0


def describe(path: str | Path) -> dict[str, str]:
    """The ``info`` lines of the file or folder at ``path`` (a one-line :class:`UserError` for anything else)."""
    from controlnet.errors import UserError

    from controlnet.embedded import bundled_controlnets

    path = bundled_controlnets().get(str(path), Path(path).expanduser())
    if not path.exists():
        raise UserError(f"{path} does not exist; give a control model file, diffusers folder or bundled name")
    weights, config = _weights_and_config(path)
    tensors = _header(weights)
    lines = {"file": str(path)}
    lines.update(_describe_tensors(tensors, config, str(weights)))
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.numel()})
    lines["dtype"] = ", ".join(dtypes) or "none"
    lines["parameters"] = _count(sum(t.numel() for t in tensors.values()))
    return lines


def _weights_and_config(path: Path) -> tuple[Path, dict[str, Any]]:
    """A folder's weights file and config.json (a file: itself, and the config.json beside a diffusers file)."""
    from controlnet.errors import UserError

    folder = path if path.is_dir() else path.parent
    weights = path
    if path.is_dir():
        weights = next((path / n for n in _WEIGHT_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise UserError(f"{path} has no {' / '.join(_WEIGHT_NAMES)}; give a diffusers folder or a weights file")
    config: dict[str, Any] = {}
    if (folder / "config.json").is_file() and (path.is_dir() or path.name.startswith("diffusion_pytorch_model")):
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{folder / 'config.json'} is not a readable JSON config: {err}") from None
        if not isinstance(config, dict):
            raise UserError(f"{folder / 'config.json'} is not a JSON object")
    return weights, config


def _header(path: Path) -> dict[str, Any]:
    """The file's tensors as meta tensors (names, shapes, dtypes; no data): a .safetensors header, or a pickle's."""
    import torch

    from controlnet.errors import UserError

    if path.suffix != ".safetensors":
        from controlnet.checkpoints import _read_file

        return {k: v.to("meta") for k, v in _read_file(path).items() if isinstance(v, torch.Tensor)}
    from safetensors import SafetensorError, safe_open

    from controlnet.safe_io import check_regular_file

    check_regular_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            entries = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
            # Scalars are read (e.g. the control type an SD3.5 ControlNet stores); the rest stay shapes only.
            scalars = {k: f.get_tensor(k) for k, (shape, _) in entries.items() if not shape or shape == [1]}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{path} is not a valid .safetensors file (truncated or corrupt?): {err}") from None
    return {k: scalars[k] if k in scalars else
            torch.empty(shape, dtype=getattr(torch, _TORCH_DTYPES.get(dtype, "float32")), device="meta")
            for k, (shape, dtype) in entries.items()}


def _describe_tensors(sd: Mapping[str, Any], config: Mapping[str, Any], name: str) -> dict[str, str]:
    from controlnet.families import describe as family_name
    from controlnet.families import family_of_keys

    transformer = _transformer_family(sd, config)
    if transformer is not None:
        return _describe_transformer(sd, config, name, transformer)
    family = family_of_keys(sd.keys(), name)
    lines = {"family": f"{family}, {family_name(family)}"}
    if family == "t2i-adapter":
        return lines | _describe_adapter(sd, config, name)
    if family == "control-lora":
        return lines | _describe_control_lora(sd)
    return lines | _describe_controlnet(sd, config, family, name)


def _transformer_family(sd: Mapping[str, Any], config: Mapping[str, Any]) -> str | None:
    from controlnet.errors import UserError
    from controlnet.transformer_formats import detect_layout

    if config.get("_class_name") in ("FluxControlNetModel", "SD3ControlNetModel"):
        return "flux" if config["_class_name"].startswith("Flux") else "sd3"
    try:
        return detect_layout(sd)[0]
    except UserError:
        return None


def _describe_transformer(sd: Mapping[str, Any], config: Mapping[str, Any], name: str, family: str) -> dict[str, str]:
    from controlnet.transformer_controlnet import FLUX_UNION_MODES
    from controlnet.transformer_formats import LAYOUT_NAMES, SD35_CONTROL_TYPES, detect_layout, stability_to_diffusers

    layout = detect_layout(sd)[1] if not config else "diffusers"
    title = {"sd3": "an SD3 ControlNet", "qwenimage": "a Qwen-Image ControlNet"}.get(family, "a Flux ControlNet")
    lines = {"family": f"{family}-controlnet, {title} ({LAYOUT_NAMES[layout]})", "base": family}
    if family == "flux":
        double, single = ("double_blocks.", "single_blocks.") if layout == "xlabs" else \
            ("transformer_blocks.", "single_transformer_blocks.")
        lines["layers"] = f"{_blocks(sd, double)} double-stream + {_blocks(sd, single)} single-stream blocks"
        mode = sd.get("controlnet_mode_embedder.weight")
        modes = config.get("num_mode") or (mode.shape[0] if mode is not None else None)
        lines["conditions"] = (f"union: {modes} modes ({', '.join(FLUX_UNION_MODES[:modes])})" if modes
                               else "one condition image")
    else:
        native, control_type = stability_to_diffusers(sd, name) if layout == "stability" else (sd, None)
        block_kind = "double-stream" if family == "qwenimage" else "joint"
        lines["layers"] = f"{_blocks(native, 'transformer_blocks.')} {block_kind} blocks"
        control_type = config.get("control_type", control_type)
        kind = SD35_CONTROL_TYPES.get(control_type) if control_type is not None else None
        lines["conditions"] = f"one condition image{f' ({kind})' if kind else ''}"
    return lines


def _blocks(sd: Mapping[str, Any], prefix: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def _describe_adapter(sd: Mapping[str, Any], config: Mapping[str, Any], name: str) -> dict[str, str]:
    from controlnet.t2i_adapter import DIFFUSERS_PREFIX, T2IAdapterConfig, adapter_family, infer_config

    if config:
        c = T2IAdapterConfig.from_dict(config, name)
        layout = "diffusers"
    else:
        native = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in sd.items()}
        layout = "diffusers" if len(native) != len(sd) or any(k.startswith(DIFFUSERS_PREFIX) for k in sd) else \
            "native" if any(".resnets." in k for k in native) else "original"
        c = infer_config(native, "native" if layout == "diffusers" else layout, name)
    return {"base": adapter_family(c),
            "layers": f"{c.adapter_type}, {len(c.channels)} feature maps (widths {list(c.channels)}), "
                      f"{c.num_res_blocks} residual blocks each; {layout} layout",
            "conditions": f"a {'gray' if c.in_channels == 1 else f'{c.in_channels}-channel'} image, "
                          f"unshuffled {c.downscale_factor}x"}


def _describe_control_lora(sd: Mapping[str, Any]) -> dict[str, str]:
    from controlnet.control_lora import control_lora_base

    made_for = control_lora_base(sd)
    ups = [v for k, v in sd.items() if k.endswith(".up")]
    ranks = sorted({v.flatten(1).shape[1] if v.ndim > 1 else 1 for v in ups})
    residuals = len({k.split(".")[1] for k in sd if k.startswith("zero_convs.")}) + ("middle_block_out.0.weight" in sd)
    hint = sd.get("input_hint_block.0.weight")
    return {"base": f"{made_for['family']} (context width {made_for['cross_attention_dim']})",
            "layers": f"{residuals} residuals ({residuals - 1} skips + mid); {len(ups)} low-rank layers, rank "
                      f"{'/'.join(map(str, ranks)) or 'none'}",
            "conditions": f"a {hint.shape[1] if hint is not None else '?'}-channel image"}


def _describe_controlnet(sd: Mapping[str, Any], config: Mapping[str, Any], family: str, name: str) -> dict[str, str]:
    from controlnet.checkpoints import detect_family
    from controlnet.errors import UserError

    try:
        base = detect_family(dict(config) if config.get("block_out_channels") else dict(sd))
    except (UserError, KeyError, TypeError, ValueError):
        base = "unknown"
    diffusers = family != "controlnet"
    prefix = "control_model." if any(k.startswith("control_model.") for k in sd) else ""
    if diffusers:
        skips = {k.split(".")[1] for k in sd if k.startswith("controlnet_down_blocks.")}
        widths = [sd[k].shape[0] for k in sorted(sd, key=_natural) if re.fullmatch(r"down_blocks\.\d+\.resnets\.0\.conv1\.weight", k)]
        hint = sd.get("controlnet_cond_embedding.conv_in.weight")
    else:
        skips = {k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + "zero_convs.")}
        widths = []
        hint = sd.get(prefix + "input_hint_block.0.weight")
    widths = list(config.get("block_out_channels", widths))
    lines = {"base": base,
             "layers": f"{len(skips) + 1} residuals ({len(skips)} skips + mid)"
                       + (f"; block widths {widths}" if widths else "")
                       + f"; {'diffusers' if diffusers else 'original'} layout",
             "conditions": f"a {hint.shape[1] if hint is not None else '?'}-channel image"}
    if family == "union":
        from controlnet.union import CONTROL_TYPES

        types = sd["task_embedding"].shape[0]
        names = ", ".join(k for k, v in CONTROL_TYPES.items() if v < types)
        lines["conditions"] += f"; {types} control types ({'ProMax' if types > 6 else 'Union'}): {names}"
    return lines


def _natural(key: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)
