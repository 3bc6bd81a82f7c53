"""``controlnet upscale``: enlarge a picture tile by tile under the tile ControlNet (see :mod:`controlnet.upscale`).

    controlnet upscale photo.png --scale 2                       # embedded base + bundled tile ControlNet
    controlnet upscale photo.png --scale 4 --tile 512 --overlap 64 --base sd15/ --controlnet control_v11f1e_sd15_tile
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from controlnet.defaults import DEFAULT_SCHEDULER, DEFAULT_STEPS, DEFAULT_UPSCALE_DENOISE, DTYPE_CHOICES, SCHEDULERS
from controlnet.errors import UserError
from controlnet.limits import BYTES_PER_PIXEL, MAX_PIXELS_FLAG


def register(subparsers: Any) -> None:
    """Add the ``upscale`` sub-command."""
    p = subparsers.add_parser(
        "upscale", help="upscale a picture tile by tile with the tile ControlNet",
        description="Enlarge IMAGE by --scale with Lanczos, then redraw it tile by tile (img2img at --denoise) "
                    "under the tile ControlNet, blending the overlapping tiles; one tile is in memory at a time.",
    )
    p.add_argument("image", help="the picture to upscale")
    p.add_argument("--scale", type=float, default=2.0, help="enlargement factor (>= 1)")
    p.add_argument("--tile", type=int, default=None, metavar="PX",
                   help="tile side in output pixels, a multiple of 8 (default: the base's native size)")
    p.add_argument("--overlap", type=int, default=None, metavar="PX",
                   help="overlap of neighbouring tiles (default: 1/8 of the tile)")
    p.add_argument("--controlnet", default="tile", metavar="NAME_OR_PATH",
                   help="the tile ControlNet: the bundled 'tile' (for the embedded base) or a path")
    p.add_argument("--strength", type=float, default=1.0, help="the ControlNet's residual scale")
    p.add_argument("--denoise", type=float, default=DEFAULT_UPSCALE_DENOISE, help="how much of each tile is redrawn, in [0, 1]")
    p.add_argument("--prompt", default="", help="what the picture shows (may stay empty)")
    p.add_argument("--negative-prompt", default="", help="what to avoid")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps of the schedule")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: generate's)")
    p.add_argument("--scheduler", default=DEFAULT_SCHEDULER, metavar="NAME",
                   help=f"sampler: {', '.join(SCHEDULERS)}, or A1111's name ('DPM++ 2M Karras')")
    p.add_argument("--seed", type=int, default=0, help="tile k uses seed + k")
    p.add_argument("--base", default=None, help="base model: a diffusers folder, a .safetensors/.ckpt file or a "
                   "Hugging Face hub id like org/name[@REV] (default: the embedded tiny model)")
    p.add_argument(MAX_PIXELS_FLAG, type=int, default=None, metavar="N",
                   help="largest output, in pixels (default: the device's memory / "
                   f"{BYTES_PER_PIXEL} bytes per pixel, as generate)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_CHOICES], help="model precision")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output PNG (default: outputs/<name>-x<scale>.png)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the inputs, load the models, upscale, write the PNG with its settings."""
    import sys

    from controlnet.defaults import scheduler_name
    from controlnet.embedded import resolve_controlnet
    from controlnet.images import load_image, png_metadata, save_png
    from controlnet.limits import check_max_pixels, check_scale

    source = load_image(args.image)  # a missing or unreadable picture fails before any model loads
    check_scale(args.scale, source.shape[1], source.shape[0], check_max_pixels(args.max_pixels), args.device)
    args.scheduler = scheduler_name(args.scheduler)  # A1111's names become ours
    if not 0.0 <= args.denoise <= 1.0:
        raise UserError(f"--denoise must be in [0, 1], got {args.denoise}")
    controlnet = None if args.controlnet in ("", "none") else args.controlnet
    if controlnet is not None:
        resolve_controlnet(controlnet)
    scale_name = f"{args.scale:g}"
    out = Path(args.out) if args.out else Path("outputs") / f"{Path(args.image).stem}-x{scale_name}.png"
    from controlnet.pipeline import Pipeline  # torch and the models only once the options are known to be good
    from controlnet.upscale import upscale

    pipe = Pipeline.from_pretrained(args.base, dtype=args.dtype, device=args.device)

    def report(k: int, n: int) -> None:
        if not args.quiet:
            print(f"tile {k + 1}/{n}", file=sys.stderr)

    result = upscale(pipe, source, args.scale, tile=args.tile, overlap=args.overlap, controlnet=controlnet,
                     strength=args.strength, prompt=args.prompt, negative_prompt=args.negative_prompt,
                     denoise=args.denoise, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                     seed=args.seed, max_pixels=args.max_pixels, on_tile=report)
    result.settings["upscale"]["source"] = str(args.image)
    save_png(out, result.image, png_metadata(result.settings))
    print(out)
    return 0
