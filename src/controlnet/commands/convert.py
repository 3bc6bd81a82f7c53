"""``controlnet convert SRC DST --to original|diffusers``: move a ControlNet between checkpoint layouts.

SRC is anything :func:`controlnet.checkpoints.load_controlnet` reads (a diffusers folder, an original
``control_*.pth`` / ``.safetensors``, a whole ControlLDM checkpoint, a bundled name); DST is a folder
(``--to diffusers``) or a ``.safetensors`` / ``.pth`` file (``--to original``). The other families, told from
SRC: a T2I-Adapter goes both ways (TencentARC's original file, diffusers' folder); a Union/ProMax ControlNet and a
Flux/SD3/Qwen-Image ControlNet are written as diffusers folders only; a Control-LoRA has one layout, and is refused.
"""

from __future__ import annotations

import argparse
from typing import Any

from controlnet.defaults import DTYPE_CHOICES
from controlnet.errors import UserError

# controlnet.checkpoints.FORMATS, spelled here so `--help` does not import torch (a test checks they agree).
LAYOUTS = ("diffusers", "original")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` sub-command."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a ControlNet checkpoint between the original and the diffusers layout",
        description="Convert a ControlNet checkpoint between the original layout (control_model.* keys, "
        ".pth/.safetensors) and the diffusers layout (folder with config.json).",
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint file, diffusers folder, or bundled ControlNet name")
    parser.add_argument("dst", metavar="DST", help="output folder (--to diffusers) or .safetensors/.pth file (--to original)")
    parser.add_argument("--to", required=True, choices=LAYOUTS, help="layout to write")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast the weights (default: fp32)")
    parser.add_argument(
        "--config", default=None, metavar="JSON",
        help="ControlNet config.json (or a JSON with a 'controlnet' entry) for files whose shapes do not tell "
        "everything, e.g. non-standard attention heads",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check DST, load SRC, write DST in the ``--to`` layout, print one summary line."""
    from controlnet.checkpoints import check_destination, load_controlnet, save_controlnet
    from controlnet.transformer_formats import (is_transformer_controlnet, load_transformer_controlnet,
                                                save_transformer_controlnet)

    check_destination(args.dst, args.to)  # before loading: a bad DST is refused at once
    family = _family(args.src)
    if is_transformer_controlnet(args.src):  # Flux / SD3 / Qwen-Image (diffusers, XLabs, Stability files) → a diffusers folder
        if args.to != "diffusers":
            raise UserError(f"{args.src} is a ControlNet for a transformer base (Flux, SD3, Qwen-Image); it is written in the diffusers layout only (--to diffusers)")
        cn = load_transformer_controlnet(args.src, config=args.config)
        out = save_transformer_controlnet(cn, args.dst, dtype=args.dtype)
    elif family in ("t2i-adapter", "union"):
        cn, out = _convert_family(family, args)
    else:
        cn = load_controlnet(args.src, config=args.config)
        out = save_controlnet(cn, args.dst, format=args.to, dtype=args.dtype)
    if not args.quiet:
        params = sum(p.numel() for p in cn.parameters())
        print(f"wrote {out} ({args.to} layout, {params / 1e6:.2f}M parameters, {args.dtype or 'fp32'})")
    return 0


def _family(src: str) -> str:
    """The control family of SRC (:func:`controlnet.families.detect_family`); refuses one with no other layout."""
    from pathlib import Path

    from controlnet.families import describe, detect_family

    if not Path(src).expanduser().exists():
        return "controlnet"  # a bundled name: load_controlnet resolves it
    try:
        family = detect_family(src)
    except UserError:
        return "controlnet"  # a whole checkpoint or a transformer-base file: their loaders tell what is wrong
    if family == "control-lora":
        raise UserError(f"{src} is {describe(family)}: low-rank deltas on a base model in Stability's one layout, with "
                        "no other layout to convert to (it loads as it is with --controlnet)")
    return family


def _convert_family(family: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """A T2I-Adapter (TencentARC's original file <-> diffusers folder) or a Union ControlNet (→ diffusers folder)."""
    from controlnet.devices import parse_dtype

    dtype = parse_dtype(args.dtype)
    if family == "union":
        if args.to != "diffusers":
            raise UserError(f"{args.src} is a Union/ProMax ControlNet; its one layout is diffusers' "
                            "(ControlNetUnionModel folder): use --to diffusers")
        from controlnet.union import load_union

        model = load_union(args.src)
        return model, model.save_pretrained(args.dst, dtype=dtype)
    from controlnet.t2i_adapter import load_t2i_adapter, save_original

    model = load_t2i_adapter(args.src)
    out = model.save_pretrained(args.dst, dtype=dtype) if args.to == "diffusers" else save_original(model, args.dst, dtype)
    return model, out
