"""``controlnet convert SRC DST --to original|diffusers``: move a ControlNet between checkpoint layouts.

SRC is anything :func:`controlnet.checkpoints.load_controlnet` reads (a diffusers folder, an original
``control_*.pth`` / ``.safetensors``, a whole ControlLDM checkpoint, a bundled name); DST is a folder
(``--to diffusers``) or a ``.safetensors`` / ``.pth`` file (``--to original``).
"""

from __future__ import annotations

import argparse

from controlnet.defaults import DTYPE_CHOICES

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
    from controlnet.errors import UserError
    from controlnet.transformer_formats import (is_transformer_controlnet, load_transformer_controlnet,
                                                save_transformer_controlnet)

    check_destination(args.dst, args.to)  # before loading: a bad DST is refused at once
    if is_transformer_controlnet(args.src):  # Flux / SD3 (diffusers, XLabs, Stability files) → a diffusers folder
        if args.to != "diffusers":
            raise UserError(f"{args.src} is a Flux/SD3 ControlNet; it is written in the diffusers layout only (--to diffusers)")
        cn = load_transformer_controlnet(args.src, config=args.config)
        out = save_transformer_controlnet(cn, args.dst, dtype=args.dtype)
    else:
        cn = load_controlnet(args.src, config=args.config)
        out = save_controlnet(cn, args.dst, format=args.to, dtype=args.dtype)
    if not args.quiet:
        params = sum(p.numel() for p in cn.parameters())
        print(f"wrote {out} ({args.to} layout, {params / 1e6:.2f}M parameters, {args.dtype or 'fp32'})")
    return 0
