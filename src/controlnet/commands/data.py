"""``controlnet data``: make training data sets.

    controlnet data fill OUT --n 50000 --size 128 --seed 0     # the fill50k layout, synthetic circles
"""

from __future__ import annotations

import argparse
from pathlib import Path

from controlnet.defaults import FILL_SAMPLES, FILL_SIZE
from controlnet.limits import BYTES_PER_PIXEL, MAX_PIXELS_FLAG, check_max_pixels


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its sub-commands."""
    parser = subparsers.add_parser("data", help="make training data sets (synthetic fill circles)",
                                   description="Make training data sets.")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    fill = kinds.add_parser(
        "fill", help="synthetic circles in the fill50k layout (prompt.json, source/, target/)",
        description="Write N circles: source/i.png a white outline on black, target/i.png the circle filled "
                    "with one colour on a background of another, prompt.json '<colour> circle with <colour> "
                    "background'.",
    )
    fill.add_argument("out", type=Path, help="new folder to write")
    fill.add_argument("--n", type=int, default=FILL_SAMPLES, help="number of samples")
    fill.add_argument("--size", type=int, default=FILL_SIZE, help="image side in px")
    fill.add_argument(MAX_PIXELS_FLAG, type=int, default=None, metavar="N",
                      help="largest image, in pixels (default: this machine's memory / "
                      f"{BYTES_PER_PIXEL} bytes per pixel)")
    fill.add_argument("--seed", type=int, default=0, help="random seed")
    fill.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    fill.set_defaults(func=run_fill)


def run_fill(args: argparse.Namespace) -> int:
    """Write the fill data set."""
    from controlnet.data.fill import make_fill_dataset

    out = make_fill_dataset(args.out, args.n, size=args.size, seed=args.seed,
                            max_pixels=check_max_pixels(args.max_pixels))
    if not args.quiet:
        print(f"wrote {args.n} fill samples to {out}")
    return 0
