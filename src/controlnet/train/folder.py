"""The run folder OUT: one training run at a time, and nothing half-written left from a killed one.

``OUT/.lock`` holds the pid of the run that uses the folder, under an advisory lock (``fcntl.flock``) that the
operating system releases when that process ends however it ends: a second run refuses to start, naming the
pid; a lock file left by a killed run is simply taken over. Atomic writes (:func:`controlnet.fileio.atomic_path`)
go through hidden temporaries (``.step-000500.k2j4.tmp``, ``.step-000100.deleting``, ``.controlnet.old-PID``);
a kill can leave them behind, and the next run removes them once it holds the lock.
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
# Temporaries of atomic writes (fileio.atomic_path: ".NAME.XXXX.tmp", ".NAME.old-PID") and of checkpoint rotation
# (".NAME.deleting"), in the folders the trainer writes to.
TEMPORARY_RE = re.compile(r"^\..+\.(tmp|deleting|old-\d+)$")
TEMPORARY_FOLDERS = (".", "checkpoints", "validation")


@contextlib.contextmanager
def run_folder(out: Path, accelerator: Any) -> Iterator[None]:
    """OUT for the duration of the block: locked by the main process, with a killed run's temporaries removed.
    If another run holds it, every process raises the main process's :class:`UserError`."""
    with contextlib.ExitStack() as stack:
        error = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(locked(out))
            except UserError as err:
                error = str(err)
            else:
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


def remove_temporaries(out: Path) -> list[Path]:
    """Remove the temporaries a killed run left in OUT (call it while holding the lock); the removed paths."""
    removed = []
    for name in TEMPORARY_FOLDERS:
        folder = out / name
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if TEMPORARY_RE.match(path.name):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed
