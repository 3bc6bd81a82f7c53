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

Folder mode skips an image whose PNG already holds this annotator's output for the same parameters (its metadata
says so) and whose ``--json`` file exists, so an interrupted run resumes; each file is written atomically. The
detectors with a batch form (hed, pidinet, lineart, lineart_coarse, mlsd) run up to ``--batch-size`` images of
one aspect ratio per network forward (default: 1 on the CPU, where batches were slower, 4 on a GPU); the last line
reports the images per second.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from controlnet.errors import UserError

# Flags of the command itself that argparse leaves among the parameter tokens after IN/OUT (with their short forms).
_OWN_FLAGS = ("list", "quiet", "help")
_SHORT_FLAGS = {"-q": "quiet", "-h": "help"}
# Images per network forward in folder mode for annotators with a batch form, by default: on a GPU 4 (not measured
# here); on the CPU 1, since batches of 4 took 1.03-1.38x the time per image (docs/performance.md, "Detectors").
ACCELERATOR_BATCH_SIZE = 4
# EXIF orientations that turn the picture by 90 degrees (load_image applies them): height and width swap.
_EXIF_ORIENTATION, _QUARTER_TURNS = 0x0112, (5, 6, 7, 8)


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
                             f"mlsd (default: 1 on the CPU, {ACCELERATOR_BATCH_SIZE} on a GPU)")
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


def _metadata(name: str, src: Path, params: dict[str, Any]) -> dict[str, str]:
    """The PNG text chunks of an output: the annotator, its parameters and the input's name."""
    return {"controlnet:annotator": name, "controlnet:params": _jsonable(params), "controlnet:source": src.name}


def _input(annotator: Any, src: Path, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """What the annotator is called with for the file ``src``: (image, params). A keypoints JSON is the input of a
    keypoints annotator; its canvas comes from the JSON or --width/--height."""
    if annotator.input_kind == "keypoints" and src.suffix.lower() == ".json":
        return None, {**params, "keypoints": src}
    return src, dict(params)


def _save(name: str, src: Path, dest: Path, out: Any, params: dict[str, Any]) -> Path:
    from controlnet.images import save_png

    return save_png(dest, out, _metadata(name, src, params))


def annotate_file(name: str, src: Path, dest: Path, params: dict[str, Any]) -> Path:
    """Run annotator ``name`` on the file ``src`` and write ``dest`` (PNG, atomically, params in its metadata)."""
    from controlnet import annotators

    annotator = annotators.get(name)
    image, params = _input(annotator, src, params)
    return _save(name, src, dest, annotator(image, **params), params)


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


# One file of folder mode: (input, output PNG, path relative to IN).
Item = tuple[Path, Path, Path]


def _file_call(annotator: Any, item: Item, params: dict[str, Any],
               json_dir: Path | None) -> tuple[Any, dict[str, Any]]:
    """(image, params) of one file in folder mode: folder parameters resolved, ``json`` set to JSON_DIR/NAME.json."""
    src, _, rel = item
    file_params = _per_file_params(params, rel)
    if json_dir is not None:
        file_params["json"] = json_dir / rel.with_suffix(".json")
    return _input(annotator, src, file_params)


def _done(annotator: Any, item: Item, params: dict[str, Any], json_dir: Path | None) -> bool:
    """Whether a previous run wrote this file's outputs with the same annotator and parameters: the PNG's metadata
    matches and the ``--json`` file exists."""
    from PIL import Image

    src, dest, _ = item
    try:
        _, file_params = _file_call(annotator, item, params, json_dir)
        with Image.open(dest) as png:
            found = dict(png.info)  # text chunks come before the pixels: nothing is decoded
    except (UserError, OSError, ValueError):
        return False
    json_path = file_params.get("json")
    expected = _metadata(annotator.name, src, file_params)
    return all(found.get(k) == v for k, v in expected.items()) and (json_path is None or Path(json_path).is_file())


def _failure(src: Path, err: Exception) -> str:
    if isinstance(err, UserError):
        return str(err)
    return f"{src}: {type(err).__name__}: {err}"  # keep the batch going; report the file


def _worker_init(plugins: list[str], threads: int) -> None:
    """A pool worker: the cores shared among the workers (torch reads OMP_NUM_THREADS when first imported, which
    happens in the worker after this), OpenCV single-threaded, the plugins loaded."""
    import cv2

    os.environ["OMP_NUM_THREADS"] = str(threads)
    cv2.setNumThreads(1)  # one process per core already
    for spec in plugins:
        load_plugin(spec)


def _work(job: tuple[str, list[Item], dict[str, Any], Path | None]) -> list[tuple[Path, str | None]]:
    """Annotate one chunk of files: through the annotator's batch form when it has one (files with equal
    parameters together, each loaded first so that a bad file fails alone), else one by one."""
    from controlnet import annotators

    name, items, params, json_dir = job
    annotator = annotators.get(name)
    results: list[tuple[Path, str | None]] = []
    groups: dict[str, list[tuple[Item, Any, dict[str, Any]]]] = {}
    for item in items:
        try:
            image, file_params = _file_call(annotator, item, params, json_dir)
            if annotator.batch is None:
                _save(name, item[0], item[1], annotator(image, **file_params), file_params)
                results.append((item[0], None))
                continue
            groups.setdefault(_jsonable(file_params), []).append((item, annotator.load(image), file_params))
        except Exception as err:
            results.append((item[0], _failure(item[0], err)))
    for group in groups.values():
        try:
            outs = annotator.call_batch([image for _, image, _ in group], **group[0][2])
        except Exception as err:
            results += [(item[0], _failure(item[0], err)) for item, _, _ in group]
            continue
        for (item, _, file_params), out in zip(group, outs):
            try:
                _save(name, item[0], item[1], out, file_params)
                results.append((item[0], None))
            except Exception as err:
                results.append((item[0], _failure(item[0], err)))
    return results


def _aspect(path: Path) -> Fraction:
    """Height / width of the image at ``path`` as loaded (EXIF rotation applied), from its header; 0 if unreadable.
    The detectors' network input size depends on the aspect ratio only."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in _QUARTER_TURNS:
                width, height = height, width
        return Fraction(height, width)
    except (OSError, ValueError, ZeroDivisionError):
        return Fraction(0)


def _chunks(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Jobs of up to ``batch_size`` files of one aspect ratio (one network input size); one file each for 1."""
    if batch_size <= 1:
        return [[item] for item in items]
    by_aspect: dict[Fraction, list[Item]] = {}
    for item in items:
        by_aspect.setdefault(_aspect(item[0]), []).append(item)
    return [group[i : i + batch_size] for group in by_aspect.values() for i in range(0, len(group), batch_size)]


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


@dataclass(frozen=True)
class FolderRun:
    """What folder mode did: files written, skipped (done by an earlier run), failed (one line each), and the
    seconds the annotating took."""

    written: int
    skipped: int
    errors: list[str]
    seconds: float

    @property
    def images_per_second(self) -> float:
        done = self.written + len(self.errors)
        return done / self.seconds if self.seconds > 0 else 0.0


def batch_size_for(annotator: Any, params: dict[str, Any], requested: int | None = None) -> int:
    """Images per network forward: ``requested``, else 1 on the CPU and :data:`ACCELERATOR_BATCH_SIZE` on a GPU
    (the annotator's ``device`` parameter); 1 for an annotator without a batch form."""
    if annotator.batch is None:
        return 1
    if requested is not None:
        return requested
    device = params.get("device", "cpu")
    if device == "cpu":
        return 1
    from controlnet.devices import resolve_device

    on_cpu = resolve_device(None if device == "auto" else device).type == "cpu"
    return 1 if on_cpu else ACCELERATOR_BATCH_SIZE


def run_folder(name: str, src: Path, dest: Path, params: dict[str, Any], workers: int, plugins: list[str],
               quiet: bool = False, batch_size: int | None = None, json_dir: Path | None = None) -> FolderRun:
    """Annotate every matching file under ``src`` into ``dest`` (same relative paths, ``.png``; with ``json_dir``
    also ``json_dir/NAME.json``) with a pool of ``workers`` processes (0: all cores), ``batch_size`` images per
    network forward where the annotator has a batch form (default: :func:`batch_size_for`), and a progress bar.
    Files done by an earlier run with the same parameters are skipped."""
    import multiprocessing

    from tqdm import tqdm

    from controlnet import annotators
    from controlnet.annotators.inputs import SUFFIXES

    annotator = annotators.get(name)
    suffixes = SUFFIXES[annotator.input_kind]
    if dest.resolve() == src.resolve():
        raise UserError(f"{dest}: OUT must differ from IN (outputs would overwrite inputs)")
    files = collect_inputs(src, suffixes, exclude=dest)  # OUT may lie inside IN
    if not files:
        raise UserError(f"{src}: no input files ({', '.join(suffixes)}) in this folder")
    items = [(f, dest / f.relative_to(src).with_suffix(".png"), f.relative_to(src)) for f in files]
    todo = [item for item in items if not _done(annotator, item, params, json_dir)]
    chunks = _chunks(todo, batch_size_for(annotator, params, batch_size))
    jobs = [(name, chunk, params, json_dir) for chunk in chunks]
    n_workers = min(len(jobs), workers or os.cpu_count() or 1)
    errors: list[str] = []
    bar = tqdm(total=len(todo), desc=f"annotate {name}", unit="img", disable=quiet or not todo)
    start = time.perf_counter()
    try:
        if n_workers <= 1:
            for results in map(_work, jobs):
                _record(results, errors, bar)
        else:
            # "spawn": fresh interpreters; forking a parent that holds threads (torch, tqdm) can deadlock.
            context = multiprocessing.get_context("spawn")
            threads = max(1, (os.cpu_count() or 1) // n_workers)
            with context.Pool(n_workers, initializer=_worker_init, initargs=(plugins, threads)) as pool:
                for results in pool.imap_unordered(_work, jobs):
                    _record(results, errors, bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - start if todo else 0.0
    return FolderRun(len(todo) - len(errors), len(items) - len(todo), errors, seconds)


def _record(results: list[tuple[Path, str | None]], errors: list[str], bar: Any) -> None:
    for _, err in results:
        if err is not None:
            errors.append(err)
            bar.write(f"error: {err}", file=sys.stderr)
    bar.update(len(results))


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
