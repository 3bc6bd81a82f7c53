"""``controlnet annotate``: make condition images with a registered annotator.

    controlnet annotate --list                                   # every annotator and its parameters
    controlnet annotate canny photo.jpg edges.png --low_threshold 50 --high_threshold 150
    controlnet annotate scribble photos/ scribbles/ --seed 3     # folder mode: every image, all cores
    controlnet annotate hed photos/ edges/ --device cuda --batch-size 8  # 8 images per network forward
    controlnet annotate openpose photos/ poses/ --json keypoints/ # and keypoints/NAME.json per image
    controlnet annotate pose_json people.json pose.png --width 768 --height 512
    controlnet annotate --plugin my_hed.py my_hed photo.jpg hed.png --weights hed.safetensors

Annotator parameters come after IN and OUT as ``--name value``, ``--name=value`` or ``name=value`` (the syntax of
``generate --annotator-param`` and the web UI); all three are read by :func:`controlnet.annotators.parse_params`,
which checks them against the annotator's declared parameters (an unknown name or a wrong type is a one-line
error, exit code 2). A bare ``--flag`` sets a boolean parameter to true. The command's own options
(``--workers``, ``--batch-size``, ``--plugin``, ``-q/--quiet``, ``--list``) may go anywhere.

Folder mode (:mod:`controlnet.annotators.folder`) checks the parameters, the device and the weights once, before
the first file; skips an image whose PNG already holds this annotator's output for the same parameters (its
metadata says so) and whose ``--json`` file exists, so an interrupted run resumes; and writes each file
atomically. The detectors with a batch form (hed, pidinet, lineart, lineart_coarse, mlsd) run up to
``--batch-size`` images of one aspect ratio per network forward (default: 1 on the CPU, where batches were
slower, 4 on a GPU; a size over what memory holds is lowered, with a note); the last line reports the images per
second.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from controlnet.errors import UserError

# Flags of the command itself that argparse leaves among the parameter tokens after IN/OUT (with their short forms).
_OWN_FLAGS = ("list", "quiet", "help")
_SHORT_FLAGS = {"-q": "quiet", "-h": "help"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``annotate`` command."""
    parser = subparsers.add_parser(
        "annotate",
        help="make condition images (canny, lines, scribble, softedge, pose, segmentation, depth, normal, ...)",
        description="Run annotator NAME on IN (a file, or a folder: every file in it) and write OUT (a .png, or "
                    "a folder). Annotator parameters follow as --name value (or name=value); see --list.",
        epilog="examples: controlnet annotate --list | controlnet annotate canny in.jpg out.png --low_threshold 50",
    )
    parser.add_argument("name", nargs="?", help="annotator (see --list)")
    parser.add_argument("input", nargs="?", help="input file or folder")
    parser.add_argument("output", nargs="?", help="output .png file or folder")
    parser.add_argument("--list", action="store_true", help="list annotators and their parameters (with NAME: one)")
    parser.add_argument("--workers", type=int, default=0, help="processes for folder mode (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="folder mode: images per network forward for hed, pidinet, lineart, lineart_coarse, "
                             "mlsd (default: 1 on the CPU, more on a GPU; lowered to what memory holds)")
    parser.add_argument("--plugin", action="append", default=[],
                        help="Python file or module that registers extra annotators (repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument("params", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


# --- parameters ----------------------------------------------------------------------------------------------


def split_options(tokens: list[str]) -> list[tuple[str, str | None]]:
    """``["--a", "1", "--b=2", "--flag", "c=3", "-q"]`` -> ``[("a", "1"), ("b", "2"), ("flag", None), ("c", "3"),
    ("quiet", None)]``; dashes in names become underscores. A value may start with ``-`` (a negative number) but
    not with ``--``."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in _SHORT_FLAGS:
            pairs.append((_SHORT_FLAGS[token], None))
            i += 1
            continue
        if not token.startswith("-") and "=" in token:
            key, _, value = token.partition("=")
            pairs.append((key.replace("-", "_"), value))
            i += 1
            continue
        if not token.startswith("--") or len(token) == 2:
            raise UserError(f"unexpected argument {token!r}; annotator parameters are given as --name value")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            pairs.append((key, value))
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--") and tokens[i + 1] not in _SHORT_FLAGS:
            pairs.append((key, tokens[i + 1]))
            i += 2
        else:
            pairs.append((key, None))
            i += 1
    return pairs


def params_from_options(annotator: Any, pairs: list[tuple[str, str | None]]) -> dict[str, Any]:
    """``(name, text)`` pairs as ``name=text`` strings for :meth:`Annotator.parse_params` (the one parser); a bare
    ``--flag`` (text ``None``) means ``flag=true`` for a boolean parameter and is an error for any other."""
    items = []
    for key, text in pairs:
        if text is None:
            param = annotator.param(key)  # unknown name -> UserError naming the known ones
            if param.type is not bool:
                raise UserError(f"{annotator.name}: --{key} needs a value ({param.type_name})")
            text = "true"
        items.append(f"{key}={text}")
    return annotator.parse_params(items)


def _take_own_options(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """Move the command's own options out of the parameter tokens (argparse leaves them there after IN/OUT)."""
    rest = []
    for key, value in split_options(list(args.params or [])):
        if key in ("workers", "batch_size"):
            if value is None or not value.lstrip("-").isdigit():
                raise UserError(f"--{key.replace('_', '-')} expects an integer, got {value!r}")
            setattr(args, key, int(value))
        elif key == "plugin":
            if value is None:
                raise UserError("--plugin needs a Python file or module name")
            args.plugin.append(value)
        elif key in _OWN_FLAGS and value is None:
            setattr(args, key, True)
        else:
            rest.append((key, value))
    return rest


# --- listing -------------------------------------------------------------------------------------------------


def format_listing(names: list[str] | None = None) -> str:
    """Annotators with their description, input kind and parameters (name, type, default, help)."""
    from controlnet import annotators

    lines = []
    for name in names or annotators.list_annotators():
        a = annotators.get(name)
        kind = "" if a.input_kind == "image" else f" [input: {a.input_kind}]"
        lines.append(f"{a.name}: {a.description}{kind}")
        if a.weights is not None:
            lines.append(f"    {a.weights()}")
        for p in a.params:
            lines.append(f"    --{p.describe()}")
    return "\n".join(lines)


# --- running -------------------------------------------------------------------------------------------------


def _json_target(annotator: Any, pairs: list[tuple[str, str | None]]) -> None:
    """Refuse ``--json`` for an annotator that finds no keypoints, naming those that do."""
    from controlnet import annotators

    if any(key == "json" for key, _ in pairs) and not any(p.name == "json" for p in annotator.params):
        with_json = [n for n in annotators.list_annotators() if any(p.name == "json" for p in annotators.get(n).params)]
        raise UserError(f"{annotator.name}: --json writes OpenPose keypoints, which only {', '.join(with_json)} find")


def _json_folder(json_dir: Path) -> Path:
    """``--json DIR`` of folder mode: a folder that can be made or written (nothing is created yet)."""
    from controlnet.fileio import check_writable_folder

    if json_dir.is_file():
        raise UserError(f"--json {json_dir}: is a file; with a folder IN, --json names a folder (one NAME.json "
                        "per image)")
    check_writable_folder(json_dir, "--json")
    return json_dir


def _json_file(json_path: Path, src: Path) -> Path:
    """``--json FILE`` of single-image mode (an existing folder: FOLDER/NAME.json), its folder writable."""
    from controlnet.fileio import check_writable_folder

    if json_path.is_dir():
        json_path = json_path / (src.stem + ".json")
    check_writable_folder(json_path.parent, "--json")
    return json_path


def run(args: argparse.Namespace) -> int:
    """Entry point of ``controlnet annotate``."""
    from controlnet import annotators
    from controlnet.annotators.folder import annotate_file, run_folder
    from controlnet.annotators.plugins import load_plugin

    pairs = _take_own_options(args)
    for spec in args.plugin:
        load_plugin(spec)
    if args.list or getattr(args, "help", False):
        names = [annotators.get(args.name).name] if args.name else None
        print(format_listing(names))
        return 0
    if not args.name:
        raise UserError("give an annotator NAME, IN and OUT (or --list to see the annotators)")
    annotator = annotators.get(args.name)
    if not args.input or not args.output:
        raise UserError(f"{annotator.name}: give IN and OUT (a file and a .png, or two folders)")
    _json_target(annotator, pairs)
    params = params_from_options(annotator, pairs)
    src, dest = Path(args.input), Path(args.output)
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")

    if src.is_dir():
        if dest.exists() and not dest.is_dir():
            raise UserError(f"{dest}: IN is a folder, so OUT must be a folder too")
        json_dir = params.pop("json", None)
        result = run_folder(annotator.name, src, dest, params, args.workers or 0, args.plugin, args.quiet,
                            args.batch_size, _json_folder(json_dir) if json_dir is not None else None)
        if result.errors:
            total = result.written + len(result.errors)
            raise UserError(f"{len(result.errors)} of {total} files failed; first: {result.errors[0]}")
        if not result.written:
            print(f"nothing to do: all {result.skipped} {annotator.name} images in {dest} are done already")
            return 0
        skipped = f"; {result.skipped} done already, skipped" if result.skipped else ""
        print(f"wrote {result.written} {annotator.name} images to {dest} in {result.seconds:.1f} s "
              f"({result.images_per_second:.2f} images/s){skipped}")
        return 0

    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if dest.is_dir():
        dest = dest / (src.stem + ".png")
    elif dest.suffix.lower() != ".png":
        raise UserError(f"{dest}: OUT must be a .png file (control images are stored losslessly) or a folder")
    if params.get("json") is not None:
        params["json"] = _json_file(params["json"], src)
    annotate_file(annotator.name, src, dest, params)
    print(f"wrote {dest}")
    return 0
