"""``controlnet demo``: the embedded base with and without the bundled ``fill`` ControlNet.

    controlnet demo                     # writes outputs/demo/grid.png and prints the metrics
    controlnet demo --out my/folder --steps 20
    controlnet demo --backbone flux     # the embedded tiny Flux-layout base and its fill ControlNet
    controlnet demo --world shapes      # the tiny shapes-world base: canny, segmentation, softedge, composed
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from controlnet.defaults import DEMO_GUIDANCE, DEMO_SEED, DEMO_STEPS

DEFAULT_OUT = Path("outputs/demo")
DEFAULT_OUT_SHAPES = Path("outputs/demo-shapes")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command."""
    parser = subparsers.add_parser(
        "demo", help="see ControlNet work in a minute on the embedded tiny model (no download)",
        description="For 8 fixed circle conditions, generate with the embedded tiny base alone and with the "
                    "bundled 'fill' ControlNet (same prompt, seed and steps); write a grid "
                    "(condition | base alone | with ControlNet) and print IoU and colour accuracy.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default {DEFAULT_OUT}; {DEFAULT_OUT_SHAPES} with --world shapes)")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=DEMO_GUIDANCE, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="random seed")
    parser.add_argument("--backbone", choices=("sd", "flux"), default="sd",
                        help="the embedded base: the tiny SD-layout UNet (default) or the tiny Flux-layout transformer")
    parser.add_argument("--world", choices=("circles", "shapes"), default="circles",
                        help="circles: one circle per image, the fill ControlNet (default); shapes: several shapes "
                             "per image, the canny, segmentation and softedge ControlNets, and two composed")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-sample lines, only the metrics and the grid's path")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its metrics."""
    from controlnet.demo import run_demo
    from controlnet.errors import UserError

    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    start = time.perf_counter()
    if args.world == "shapes":
        return run_shapes(args, start)
    if not args.quiet:
        print(f"controlnet demo: the embedded tiny {args.backbone} base, alone and with its 'fill' ControlNet")
    result, grid = run_demo(args.out, steps=args.steps, guidance=args.guidance, seed=args.seed,
                            progress=not args.quiet, backbone=args.backbone)
    s = result.summary()
    print(f"controllability (IoU with the condition's disk): {s['iou_without_controlnet']:.2f} base alone -> "
          f"{s['iou_with_controlnet']:.2f} with ControlNet")
    print(f"circle colour accuracy: {s['colour_accuracy_without_controlnet']:.2f} base alone, "
          f"{s['colour_accuracy_with_controlnet']:.2f} with ControlNet")
    print(f"wrote {grid} ({time.perf_counter() - start:.1f} s)")
    return 0


def run_shapes(args: argparse.Namespace, start: float) -> int:
    """The shapes-world demo (``--world shapes``)."""
    from controlnet.demo_shapes import CONDITION_TYPES, run_shapes_demo
    from controlnet.errors import UserError

    if args.backbone != "sd":
        raise UserError("--world shapes has an SD-layout base only; drop --backbone")
    if not args.quiet:
        print("controlnet demo: the embedded tiny shapes base, alone and with its canny, segmentation and softedge "
              "ControlNets")
    metrics, grid = run_shapes_demo(args.out if args.out != DEFAULT_OUT else DEFAULT_OUT_SHAPES, steps=args.steps,
                                    guidance=args.guidance, seed=args.seed, progress=not args.quiet)
    for kind in CONDITION_TYPES:
        m = metrics[kind.name]
        print(f"{kind.name} ({m['score']}): {m['without_controlnet']:.2f} base alone -> "
              f"{m['with_controlnet']:.2f} with {m['controlnet']}")
    print(f"wrote {grid} ({time.perf_counter() - start:.1f} s)")
    return 0
