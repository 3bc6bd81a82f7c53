"""Annotating a folder: every input file under IN to a PNG under OUT, in a process pool, several images per
network forward where the annotator has a batch form, resuming where an earlier run stopped.

    from controlnet.annotators.folder import run_folder
    result = run_folder("hed", Path("photos"), Path("edges"), {"device": "cpu"}, workers=2)

Before the first file, the parameters, the device and the weights are checked once
(:meth:`controlnet.annotators.registry.Annotator.check_ready`): a bad one is one line, not one failure per file.
An output counts as done (and is skipped) when its PNG's metadata names the same annotator, parameters and input
(:mod:`controlnet.resume`), and its ``--json`` file exists; each file is written atomically.

Images per forward are bounded by memory: a batch of ``n`` images of network input ``h x w`` needs about
``n * h * w * DETECT_BYTES_PER_PIXEL`` bytes plus the decoded images, and every worker holds one batch; a larger
``batch_size`` is lowered to what :data:`MEMORY_FRACTION` of the device's memory holds, with a note.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from controlnet.errors import UserError

# Images per network forward by default, for annotators with a batch form: on a GPU 4 (not measured here); on the
# CPU 1, since batches of 4 took 1.03-1.38x the time per image (docs/performance.md, "Detectors").
ACCELERATOR_BATCH_SIZE = 4
# Peak memory of a released network's forward per pixel of its input, fp32 on the CPU (resident-set growth over
# the forward, batches of 2 and 4 at 256x256 and 512x512): HED 0.80 KB, PiDiNet 0.86 KB, M-LSD 0.74 KB, lineart
# 1.24 KB at most. Rounded up to 2 KB for the resized copies and the outputs.
DETECT_BYTES_PER_PIXEL = 2048
# Per pixel of a decoded input image: the RGB array, the output condition of the same size, and their copies.
IMAGE_BYTES_PER_PIXEL = 16
# The share of the device's memory that the batches of all workers together may take; the rest is for the models,
# the other processes and the system.
MEMORY_FRACTION = 0.5
# EXIF orientations that turn the picture by 90 degrees (load_image applies them): height and width swap.
_EXIF_ORIENTATION, _QUARTER_TURNS = 0x0112, (5, 6, 7, 8)


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
    from controlnet.resume import is_output, made_with

    src, dest, _ = item
    try:
        _, file_params = _file_call(annotator, item, params, json_dir)
    except UserError:
        return False
    json_path = file_params.get("json")
    return made_with(dest, _metadata(annotator.name, src, file_params)) and (json_path is None or is_output(json_path))


def _failure(src: Path, err: Exception) -> str:
    if isinstance(err, UserError):
        return str(err)
    return f"{src}: {type(err).__name__}: {err}"  # keep the batch going; report the file


def _worker_init(plugins: list[str], threads: int) -> None:
    """A pool worker: the cores shared among the workers (torch reads OMP_NUM_THREADS when first imported, which
    happens in the worker after this), OpenCV single-threaded, the plugins loaded."""
    import cv2

    from controlnet.annotators.plugins import load_plugin

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


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of the image at ``path`` as loaded (EXIF rotation applied), from its header; ``(0, 0)``
    if unreadable (the file then fails on its own when annotated)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in _QUARTER_TURNS:
                width, height = height, width
        return width, height
    except (OSError, ValueError):
        return 0, 0


def _aspect(size: tuple[int, int]) -> Fraction:
    """Height / width (0 for an unreadable image): the detectors' network input size depends on it only."""
    width, height = size
    return Fraction(height, width) if width and height else Fraction(0)


def _chunks(items: list[Item], sizes: list[tuple[int, int]], batch_size: int) -> list[list[Item]]:
    """Jobs of up to ``batch_size`` files of one aspect ratio (one network input size); one file each for 1."""
    if batch_size <= 1:
        return [[item] for item in items]
    by_aspect: dict[Fraction, list[Item]] = {}
    for item, size in zip(items, sizes, strict=True):
        by_aspect.setdefault(_aspect(size), []).append(item)
    return [group[i : i + batch_size] for group in by_aspect.values() for i in range(0, len(group), batch_size)]


def bytes_per_image(width: int, height: int, detect_resolution: int) -> int:
    """Memory one image takes in a batch: its network input (short side ``detect_resolution``, the aspect kept) at
    :data:`DETECT_BYTES_PER_PIXEL`, plus the decoded image at :data:`IMAGE_BYTES_PER_PIXEL`."""
    short, long = sorted((max(width, 1), max(height, 1)))
    network_pixels = detect_resolution * detect_resolution * long // short
    return network_pixels * DETECT_BYTES_PER_PIXEL + width * height * IMAGE_BYTES_PER_PIXEL


def max_batch_size(image_bytes: int, memory: int, workers: int) -> int:
    """The most images per batch when each takes ``image_bytes`` and ``workers`` batches share
    :data:`MEMORY_FRACTION` of ``memory`` bytes; at least 1."""
    return max(1, int(memory * MEMORY_FRACTION) // (max(workers, 1) * max(image_bytes, 1)))


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
    """What folder mode did: files written, skipped (done by an earlier run), failed (one line each), the seconds
    the annotating took, and the images per network forward it used."""

    written: int
    skipped: int
    errors: list[str]
    seconds: float
    batch_size: int = 1

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
    from controlnet.annotators.loader import torch_device

    return 1 if torch_device(device).type == "cpu" else ACCELERATOR_BATCH_SIZE


def cap_batch_size(batch_size: int, params: dict[str, Any], sizes: list[tuple[int, int]], workers: int,
                   memory: int | None = None) -> tuple[int, str | None]:
    """``batch_size`` lowered to what memory holds (:func:`max_batch_size` for the largest of the images of
    ``sizes``), and a one-line note when it was lowered. ``memory``: bytes (default: the memory of the ``device``
    parameter's device, :func:`controlnet.limits.device_memory`)."""
    from controlnet.annotators.released import DETECT_RESOLUTION
    from controlnet.limits import device_memory

    if batch_size <= 1 or not sizes:
        return batch_size, None
    where = "given"
    if memory is None:
        device = params.get("device", "cpu")
        memory, where = device_memory(None if device == "auto" else device)
    resolution = int(params.get("detect_resolution", DETECT_RESOLUTION))
    largest = max(bytes_per_image(w, h, resolution) for w, h in sizes)
    cap = max_batch_size(largest, memory, workers)
    if batch_size <= cap:
        return batch_size, None
    return cap, (f"--batch-size {batch_size} lowered to {cap}: {workers} worker(s) x {cap} images of up to "
                 f"{largest / 2**20:.0f} MiB each fill {MEMORY_FRACTION:.0%} of the {where} memory "
                 f"({memory / 2**30:.1f} GiB)")


def pending(annotator: Any, src: Path, dest: Path, params: dict[str, Any],
            json_dir: Path | None) -> tuple[list[Item], int]:
    """The files of ``src`` to annotate into ``dest`` (those not done by an earlier run) and how many are done."""
    from controlnet.annotators.inputs import SUFFIXES
    from controlnet.resume import split_done

    suffixes = SUFFIXES[annotator.input_kind]
    if dest.resolve() == src.resolve():
        raise UserError(f"{dest}: OUT must differ from IN (outputs would overwrite inputs)")
    files = collect_inputs(src, suffixes, exclude=dest)  # OUT may lie inside IN
    if not files:
        raise UserError(f"{src}: no input files ({', '.join(suffixes)}) in this folder")
    items = [(f, dest / f.relative_to(src).with_suffix(".png"), f.relative_to(src)) for f in files]
    return split_done(items, lambda item: _done(annotator, item, params, json_dir))


def run_folder(name: str, src: Path, dest: Path, params: dict[str, Any], workers: int, plugins: list[str],
               quiet: bool = False, batch_size: int | None = None, json_dir: Path | None = None) -> FolderRun:
    """Annotate every matching file under ``src`` into ``dest`` (same relative paths, ``.png``; with ``json_dir``
    also ``json_dir/NAME.json``) with a pool of ``workers`` processes (0: all cores), ``batch_size`` images per
    network forward where the annotator has a batch form (default: :func:`batch_size_for`; lowered to what memory
    holds, :func:`cap_batch_size`), and a progress bar. Files done by an earlier run with the same parameters are
    skipped; parameters, device and weights are checked before the first file."""
    from controlnet import annotators

    annotator = annotators.get(name)
    todo, skipped = pending(annotator, src, dest, params, json_dir)
    if not todo:
        return FolderRun(0, skipped, [], 0.0)
    _check_ready(annotator, todo[0], params, json_dir)
    n_workers = min(len(todo), workers or os.cpu_count() or 1)
    size = batch_size_for(annotator, params, batch_size)
    sizes = [image_size(item[0]) for item in todo] if size > 1 else []
    size, note = cap_batch_size(size, params, sizes, n_workers)
    if note:
        print(f"note: {note}", file=sys.stderr)
    jobs = [(name, chunk, params, json_dir) for chunk in _chunks(todo, sizes or [(0, 0)] * len(todo), size)]
    start = time.perf_counter()
    errors = _run_jobs(jobs, min(len(jobs), n_workers), plugins, f"annotate {name}", len(todo), quiet)
    return FolderRun(len(todo) - len(errors), skipped, errors, time.perf_counter() - start, size)


def _check_ready(annotator: Any, first: Item, params: dict[str, Any], json_dir: Path | None) -> None:
    """The parameters, device and weights checked once, with the first file's parameters (a keypoints JSON input
    gives ``keypoints``; folder parameters name its file): a bad one is one line before any file is annotated."""
    try:
        _, file_params = _file_call(annotator, first, params, json_dir)
    except UserError:  # that file's own problem (e.g. no mask for it): it fails alone, later
        file_params = params
    annotator.check_ready(file_params)


def _run_jobs(jobs: list[Any], n_workers: int, plugins: list[str], desc: str, total: int, quiet: bool) -> list[str]:
    """Run :func:`_work` on each job, in this process or a pool of ``n_workers``, with a progress bar over
    ``total`` images; the failures, one line each."""
    import multiprocessing

    from tqdm import tqdm

    errors: list[str] = []
    bar = tqdm(total=total, desc=desc, unit="img", disable=quiet)
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
    return errors


def _record(results: list[tuple[Path, str | None]], errors: list[str], bar: Any) -> None:
    for _, err in results:
        if err is not None:
            errors.append(err)
            bar.write(f"error: {err}", file=sys.stderr)
    bar.update(len(results))


