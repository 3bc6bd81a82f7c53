"""Batch generation: ``controlnet generate --control-dir DIR`` (one generation per condition image) and
``--prompts FILE`` (one per line of the file), or both (every condition with every prompt).

Every job has a name, and its outputs a fixed path in ``--out``::

    --control-dir only      <condition file's stem>.png
    --prompts only          prompt<NNNNN>.png             NNNNN: the prompt's index among the file's prompts
    both                    <stem>-prompt<NNNNN>.png
    (--num-images N > 1:    <name>-<k>.png for k = 0..N-1)

A job whose outputs all exist as files is skipped, so an interrupted batch resumes where it stopped; each output
is written atomically (a half-written PNG never counts as done); an output path taken by a folder (or anything but
a file) is refused. The settings are the same for every job.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from controlnet.errors import UserError

# Files of --control-dir taken as condition images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Job:
    """One generation of a batch: its name (its outputs' file names), its prompt and its condition file."""

    name: str
    prompt: str
    control: Path | None = None


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file: one per line, blank lines skipped (UTF-8)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--prompts {path}: no such file; give a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--prompts {path}: unreadable ({err}); give a UTF-8 text file, one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in it; write one prompt per line")
    return prompts


def list_controls(folder: str | os.PathLike) -> list[Path]:
    """The condition images of ``folder`` (by suffix, :data:`IMAGE_SUFFIXES`), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--control-dir {folder}: not a folder; give a folder of condition images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--control-dir {folder}: no images in it ({', '.join(IMAGE_SUFFIXES)})")
    return files


def make_jobs(prompt: str | None, prompts: Sequence[str] | None = None,
              controls: Sequence[Path] | None = None) -> list[Job]:
    """The jobs of a batch (the names of the module docstring): every control with every prompt."""
    texts = list(enumerate(prompts)) if prompts else [(None, prompt or "")]
    files: list[Path | None] = list(controls) if controls else [None]
    jobs = []
    for control in files:
        for index, text in texts:
            parts = ([control.stem] if control is not None else []) + ([f"prompt{index:05d}"] if index is not None else [])
            jobs.append(Job("-".join(parts), text, control))
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"--control-dir has several images named {twice[0]}.* (outputs would collide); rename one")
    return jobs


def output_paths(out: Path, job: Job, num_images: int) -> list[Path]:
    """Where a job's images go."""
    if num_images == 1:
        return [out / f"{job.name}.png"]
    return [out / f"{job.name}-{k}.png" for k in range(num_images)]


def job_done(paths: Sequence[Path]) -> bool:
    """Whether every output of a job is there as a regular file; one that is something else (a folder, a FIFO):
    a one-line :class:`UserError`."""
    for path in paths:
        if path.exists() and not path.is_file():
            raise UserError(f"{path} is there but is not a file (a folder?); move it away, or give another --out")
    return all(path.is_file() for path in paths)


def run_jobs(generate: Callable[..., Any], jobs: Sequence[Job], out: Path, num_images: int,
             units: Sequence[Any] = (), control_unit: int | None = None, quiet: bool = False) -> list[Path]:
    """Run the jobs not done yet: ``generate(prompt=..., controls=...)`` (a :class:`controlnet.pipeline.Pipeline`
    with the batch's :class:`~controlnet.generation_config.GenerationConfig` bound) for each, the job's condition in unit ``control_unit``; write its images
    with their metadata. Returns the paths written."""
    from controlnet.images import png_metadata, save_png

    written = []
    for job in jobs:
        paths = output_paths(out, job, num_images)
        if job_done(paths):
            if not quiet:
                print(f"{job.name}: done already, skipped", file=sys.stderr)
            continue
        controls = list(units)
        if control_unit is not None:
            controls[control_unit] = replace(controls[control_unit], image=str(job.control))
        result = generate(prompt=job.prompt, controls=controls)
        for k, (path, image) in enumerate(zip(paths, result.images)):
            written.append(save_png(path, image, png_metadata(result.settings, k)))
            print(path)
    return written
