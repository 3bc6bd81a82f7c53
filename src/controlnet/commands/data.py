"""``controlnet data``: make training data sets.

    controlnet data fill OUT --n 50000 --size 128 --seed 0     # the fill50k layout, synthetic circles
    controlnet data shapes OUT --n 16000 --size 128 --seed 0   # captioned shapes images (conditions: --annotator)
    controlnet data examples DIR                                # first inputs for the README's examples
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from controlnet.defaults import FILL_SAMPLES, FILL_SIZE
from controlnet.errors import UserError
from controlnet.limits import BYTES_PER_PIXEL, MAX_PIXELS_FLAG, check_max_pixels

EXAMPLE_FILES = ("circle.png", "picture.png", "photo.png", "photo.jpg", "mask.png")
# The README's example prompt is "red circle with yellow background"; the photo is a second, other circle.
EXAMPLE_CIRCLE = dict(cx=64, cy=64, radius=36, circle="red", background="yellow")
EXAMPLE_PHOTO = dict(cx=56, cy=72, radius=30, circle="blue", background="white")
EXAMPLE_MASK_MARGIN = 6  # px the mask reaches beyond the photo's circle, so its anti-aliased edge is repainted too


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its sub-commands."""
    parser = subparsers.add_parser("data", help="make training data sets (synthetic fill circles, shapes)",
                                   description="Make training data sets: fill circles with their conditions, "
                                               "captioned shapes images, the README's example inputs.")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    fill = kinds.add_parser(
        "fill", help="synthetic circles in the fill50k layout (prompt.json, source/, target/)",
        description="Write N circles: source/i.png a white outline on black, target/i.png the circle filled "
                    "with one colour on a background of another, prompt.json '<colour> circle with <colour> "
                    "background'.",
    )
    _add_sample_options(fill)
    fill.set_defaults(func=run_fill)
    shapes = kinds.add_parser(
        "shapes", help="synthetic shapes images with captions (prompt.json, target/); conditions by --annotator",
        description="Write N images of one to three overlapping circles, squares and triangles of distinct "
                    "colours on a background of another: target/i.png, and prompt.json rows {\"target\", "
                    "\"prompt\"} with captions such as 'red circle, blue square on yellow background'. No "
                    "conditions are stored: 'controlnet train --annotator canny|softedge|shapes' makes them.",
    )
    _add_sample_options(shapes)
    shapes.set_defaults(func=run_shapes)
    examples = kinds.add_parser(
        "examples", help="first inputs for the README's examples, sized for the embedded model",
        description=f"Write {', '.join(EXAMPLE_FILES)} into DIR ({FILL_SIZE}x{FILL_SIZE}, the embedded model's "
                    "size): circle.png a fill condition (a white outline on black), picture.png the picture it "
                    "describes (a red circle on yellow), photo.png / photo.jpg another such picture (a blue circle "
                    "on white) and mask.png white where that circle is (the part to repaint). Existing files of "
                    "those names are refused.",
    )
    examples.add_argument("dir", type=Path, help="folder to write the files into (made if missing)")
    examples.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    examples.set_defaults(func=run_examples)


def _add_sample_options(parser: argparse.ArgumentParser) -> None:
    """The options of a synthetic data set: OUT, --n, --size, --max-pixels, --seed, -q."""
    parser.add_argument("out", type=Path, help="new folder to write")
    parser.add_argument("--n", type=int, default=FILL_SAMPLES, help="number of samples")
    parser.add_argument("--size", type=int, default=FILL_SIZE, help="image side in px")
    parser.add_argument(MAX_PIXELS_FLAG, type=int, default=None, metavar="N",
                        help="largest image, in pixels (default: this machine's memory / "
                        f"{BYTES_PER_PIXEL} bytes per pixel)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary line")


def run_fill(args: argparse.Namespace) -> int:
    """Write the fill data set."""
    from controlnet.data.fill import make_fill_dataset

    return _write_samples(make_fill_dataset, args, "fill samples")


def run_shapes(args: argparse.Namespace) -> int:
    """Write the shapes data set."""
    from controlnet.data.shapes import make_shapes_dataset

    return _write_samples(make_shapes_dataset, args, "shapes images with captions")


def _write_samples(make: Callable[..., Path], args: argparse.Namespace, what: str) -> int:
    """``make(out, n, size=, seed=, max_pixels=)`` with the options of :func:`_add_sample_options`; one summary line."""
    out = make(args.out, args.n, size=args.size, seed=args.seed, max_pixels=check_max_pixels(args.max_pixels))
    if not args.quiet:
        print(f"wrote {args.n} {what} to {out}")
    return 0


def write_examples(folder: Path) -> list[Path]:
    """Write :data:`EXAMPLE_FILES` into ``folder`` (each atomically); the paths written. Refuses, in one line and
    before writing anything, a folder that already holds one of them."""
    import numpy as np
    from PIL import Image

    from controlnet.data.fill import FillSample
    from controlnet.fileio import atomic_path, check_writable_folder

    folder = Path(folder).expanduser()
    check_writable_folder(folder, "controlnet data examples")
    taken = [name for name in EXAMPLE_FILES if (folder / name).exists()]
    if taken:
        raise UserError(f"{folder} already holds {', '.join(taken)}; remove them or choose another folder")
    circle, photo = FillSample(**EXAMPLE_CIRCLE, size=FILL_SIZE), FillSample(**EXAMPLE_PHOTO, size=FILL_SIZE)
    grown = FillSample(**{**EXAMPLE_PHOTO, "radius": EXAMPLE_PHOTO["radius"] + EXAMPLE_MASK_MARGIN}, size=FILL_SIZE)
    pictures = {"circle.png": circle.condition, "picture.png": circle.target, "photo.png": photo.target,
                "photo.jpg": photo.target, "mask.png": np.where(grown.disk, 255, 0).astype(np.uint8)}
    written = []
    for name in EXAMPLE_FILES:
        with atomic_path(folder / name) as tmp:
            Image.fromarray(pictures[name]).save(tmp, format="JPEG" if name.endswith(".jpg") else "PNG", quality=95)
        written.append(folder / name)
    return written


def run_examples(args: argparse.Namespace) -> int:
    """Write the example inputs."""
    written = write_examples(args.dir)
    if not args.quiet:
        print(f"wrote {', '.join(p.name for p in written)} to {args.dir}")
    return 0
