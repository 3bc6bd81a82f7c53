"""The run folder OUT: one training run at a time, and nothing half-written left from a killed one.

``OUT/.lock`` holds the pid of the run that uses the folder, under an advisory lock (``fcntl.flock``) that the
operating system releases when that process ends however it ends: a second run refuses to start, naming the
pid; a lock file left by a killed run is simply taken over. Atomic writes (:func:`controlnet.fileio.atomic_path`)
go through hidden temporaries (``.step-000500.k2j4ab_c.tmp``, ``.step-000100.deleting``, ``.controlnet.old-PID``);
a kill can leave them behind, and the next run removes them once it holds the lock.

``OUT/.controlnet-run`` marks a folder as a run folder. Only a run folder is cleaned, and only of names the
trainer writes (:data:`TEMPORARY_RE`); an existing non-empty folder without the marker is refused as OUT, so a
user's own files (``.thesis.tmp``, ``.photos.deleting/``) are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from controlnet.errors import UserError
from controlnet.train.distributed import raise_on_every_process

LOCK_FILE = ".lock"
RUN_MARKER = ".controlnet-run"
RUN_MARKER_TEXT = "a controlnet training run folder: its temporaries are removed when a run starts\n"
# What the trainer writes in each folder of OUT (log.py, setup.py, loop.py, state.py, validation.py).
_WRITTEN = {
    ".": r"controlnet|unet|log\.jsonl|run\.json|training\.png|skipped\.jsonl",
    "checkpoints": r"step-\d{6}",
    "validation": r"step-\d{6}\.png",
}
# Temporaries of atomic writes (fileio.atomic_path: ".NAME.XXXXXXXX.tmp" from tempfile.mkstemp's 8 random
# characters, ".NAME.old-PID") and of checkpoint rotation (".NAME.deleting"), for those names only.
TEMPORARY_RE = {folder: re.compile(rf"^\.({names})\.([a-z0-9_]{{8}}\.tmp|old-\d+|deleting)$")
                for folder, names in _WRITTEN.items()}
TEMPORARY_FOLDERS = tuple(_WRITTEN)


def is_run_folder(out: Path) -> bool:
    """Whether OUT holds the run marker, or is a run folder of a version before the marker (its lock and log)."""
    return (out / RUN_MARKER).is_file() or ((out / LOCK_FILE).is_file() and (out / "log.jsonl").is_file())


def check_out_folder(out: Path) -> None:
    """Refuse, in one line, an OUT that is a non-empty folder but not a training run folder."""
    if out.is_dir() and not is_run_folder(out) and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise UserError(f"--out {out} is a folder with other files in it, not a training run folder; choose a new or "
                        "empty folder (the trainer writes and cleans up its own files there)")


@contextlib.contextmanager
def run_folder(out: Path, accelerator: Any) -> Iterator[None]:
    """OUT for the duration of the block: locked by the main process, with a killed run's temporaries removed.
    If another run holds it, every process raises the main process's :class:`UserError`."""
    with contextlib.ExitStack() as stack:
        error = None
        if accelerator.is_main_process:
            try:
                check_out_folder(out)  # before the lock file is made in it
                stack.enter_context(locked(out))
            except UserError as err:
                error = str(err)
            else:
                mark_run_folder(out)
                remove_temporaries(out)
        raise_on_every_process(error, accelerator)
        yield


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold OUT/.lock (with this process's pid in it) for the duration of the block."""
    try:
        import fcntl
    except ImportError:  # no advisory file locks on this platform (Windows): the folder is not locked
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            raise UserError(f"{out} is in use by another training run (pid {holder}); wait for it to end, or "
                            "choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: nobody's
    finally:
        os.close(fd)  # releases the flock


def mark_run_folder(out: Path) -> None:
    """Write OUT's run marker (call it while holding the lock, after :func:`check_out_folder`)."""
    if not (out / RUN_MARKER).is_file():
        (out / RUN_MARKER).write_text(RUN_MARKER_TEXT, encoding="utf-8")


def remove_temporaries(out: Path) -> list[Path]:
    """Remove the temporaries a killed run left in OUT (call it while holding the lock); the removed paths.
    Nothing is removed from a folder that is not a run folder."""
    removed: list[Path] = []
    if not is_run_folder(out):
        return removed
    for name in TEMPORARY_FOLDERS:
        folder = out / name
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in folder.iterdir():
            if TEMPORARY_RE[name].match(path.name):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed
