"""``controlnet annotate``: make condition images with a registered annotator.

    controlnet annotate --list                                   # every annotator and its parameters
    controlnet annotate canny photo.jpg edges.png --low_threshold 50 --high_threshold 150
    controlnet annotate scribble photos/ scribbles/ --seed 3     # folder mode: every image, all cores
    controlnet annotate pose_json people.json pose.png --width 768 --height 512
    controlnet annotate --plugin my_hed.py my_hed photo.jpg hed.png --weights hed.safetensors

Annotator parameters come after IN and OUT as ``--name value``, ``--name=value`` or ``name=value`` (the syntax of
``generate --annotator-param`` and the web UI); all three are read by :func:`controlnet.annotators.parse_params`,
which checks them against the annotator's declared parameters (an unknown name or a wrong type is a one-line
error, exit code 2). A bare ``--flag`` sets a boolean parameter to true. The command's own options
(``--workers``, ``--plugin``, ``-q/--quiet``, ``--list``) may go anywhere.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
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
        if key == "workers":
            if value is None or not value.lstrip("-").isdigit():
                raise UserError(f"--workers expects an integer, got {value!r}")
            args.workers = int(value)
        elif key == "plugin":
            if value is None:
                raise UserError("--plugin needs a Python file or module name")
            args.plugin.append(value)
        elif key in _OWN_FLAGS and value is None:
            setattr(args, key, True)
        else:
            rest.append((key, value))
    return rest


# --- plugins -------------------------------------------------------------------------------------------------


def load_plugin(spec: str) -> None:
    """Import a plugin (a ``.py`` file or a module name) that calls ``controlnet.annotators.register``."""
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise UserError(f"--plugin {spec}: no such Python file")
        module_name = f"controlnet_plugin_{abs(hash(str(path))):x}"
        if module_name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"--plugin {spec}: cannot import this file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except UserError:
            raise
        except Exception as err:  # a broken plugin is the user's input: one line, no traceback
            del sys.modules[module_name]
            raise UserError(f"--plugin {spec}: failed to import ({type(err).__name__}: {err})") from None
    else:
        try:
            importlib.import_module(spec)
        except ImportError as err:
            raise UserError(f"--plugin {spec}: cannot import module ({err})") from None


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


def _jsonable(params: dict[str, Any]) -> str:
    return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()}, sort_keys=True)


def annotate_file(name: str, src: Path, dest: Path, params: dict[str, Any]) -> Path:
    """Run annotator ``name`` on the file ``src`` and write ``dest`` (PNG, atomically, params in its metadata)."""
    from controlnet import annotators
    from controlnet.images import save_png

    annotator = annotators.get(name)
    params = dict(params)
    image: Any = src
    if annotator.input_kind == "keypoints" and src.suffix.lower() == ".json":
        params["keypoints"] = src  # the JSON is the input; the canvas comes from it or --width/--height
        image = None
    out = annotator(image, **params)
    metadata = {"controlnet:annotator": name, "controlnet:params": _jsonable(params), "controlnet:source": src.name}
    return save_png(dest, out, metadata)


def _per_file_params(params: dict[str, Any], rel: Path) -> dict[str, Any]:
    """In folder mode a path parameter that names a folder (masks/, keypoints/) means "the file with the same
    relative name in that folder"."""
    resolved = dict(params)
    for key, value in params.items():
        if isinstance(value, Path) and value.is_dir():
            candidates = [value / rel] + [value / rel.with_suffix(s) for s in (".png", ".jpg", ".jpeg", ".json")]
            match = next((c for c in candidates if c.is_file()), None)
            if match is None:
                raise UserError(f"--{key} {value}: no file for {rel} (looked for {rel.stem}.png/.jpg/.json)")
            resolved[key] = match
    return resolved


def _worker_init(plugins: list[str]) -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already
    for spec in plugins:
        load_plugin(spec)


def _work(job: tuple[str, Path, Path, Path, dict[str, Any]]) -> tuple[Path, str | None]:
    name, src, dest, rel, params = job
    try:
        annotate_file(name, src, dest, _per_file_params(params, rel))
        return src, None
    except UserError as err:
        return src, str(err)
    except Exception as err:  # keep the batch going; report the file
        return src, f"{src}: {type(err).__name__}: {err}"


def collect_inputs(folder: Path, suffixes: tuple[str, ...], exclude: Path | None = None) -> list[Path]:
    """Files under ``folder`` (recursively; hidden ones and those under ``exclude`` skipped) with one of
    ``suffixes``, sorted."""
    skip = exclude.resolve() if exclude is not None else None
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and (skip is None or skip not in p.resolve().parents)
    )


def run_folder(name: str, src: Path, dest: Path, params: dict[str, Any], workers: int, plugins: list[str],
               quiet: bool = False) -> tuple[int, list[str]]:
    """Annotate every matching file under ``src`` into ``dest`` (same relative paths, ``.png``) with a pool of
    ``workers`` processes (0: all cores) and a progress bar; return (number written, error lines)."""
    import multiprocessing

    from tqdm import tqdm

    from controlnet import annotators
    from controlnet.annotators.inputs import SUFFIXES

    suffixes = SUFFIXES[annotators.get(name).input_kind]
    if dest.resolve() == src.resolve():
        raise UserError(f"{dest}: OUT must differ from IN (outputs would overwrite inputs)")
    files = collect_inputs(src, suffixes, exclude=dest)  # OUT may lie inside IN
    if not files:
        raise UserError(f"{src}: no input files ({', '.join(suffixes)}) in this folder")
    jobs = []
    for f in files:
        rel = f.relative_to(src)
        jobs.append((name, f, dest / rel.with_suffix(".png"), rel, params))
    n_workers = min(len(jobs), workers or os.cpu_count() or 1)
    errors: list[str] = []
    bar = tqdm(total=len(jobs), desc=f"annotate {name}", unit="img", disable=quiet)
    try:
        if n_workers <= 1:
            results = map(_work, jobs)
            for _, err in results:
                _record(err, errors, bar)
        else:
            # "spawn": fresh interpreters; forking a parent that holds threads (torch, tqdm) can deadlock.
            context = multiprocessing.get_context("spawn")
            with context.Pool(n_workers, initializer=_worker_init, initargs=(plugins,)) as pool:
                for _, err in pool.imap_unordered(_work, jobs):
                    _record(err, errors, bar)
    finally:
        bar.close()
    return len(jobs) - len(errors), errors


def _record(err: str | None, errors: list[str], bar: Any) -> None:
    if err is not None:
        errors.append(err)
        bar.write(f"error: {err}", file=sys.stderr)
    bar.update(1)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``controlnet annotate``."""
    from controlnet import annotators

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
    params = params_from_options(annotator, pairs)
    src, dest = Path(args.input), Path(args.output)
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")

    if src.is_dir():
        if dest.exists() and not dest.is_dir():
            raise UserError(f"{dest}: IN is a folder, so OUT must be a folder too")
        written, errors = run_folder(annotator.name, src, dest, params, args.workers or 0, args.plugin, args.quiet)
        if errors:
            raise UserError(f"{len(errors)} of {written + len(errors)} files failed; first: {errors[0]}")
        print(f"wrote {written} {annotator.name} images to {dest}")
        return 0

    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if dest.is_dir():
        dest = dest / (src.stem + ".png")
    elif dest.suffix.lower() != ".png":
        raise UserError(f"{dest}: OUT must be a .png file (control images are stored losslessly) or a folder")
    annotate_file(annotator.name, src, dest, params)
    print(f"wrote {dest}")
    return 0
