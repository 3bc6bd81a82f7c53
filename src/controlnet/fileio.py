"""Atomic file writes: nothing a user made is lost if we are killed half-way.

Write to a temporary file in the destination folder, flush and fsync it, then ``os.replace`` it over the
destination (atomic on POSIX and Windows). Directories are written to a temporary sibling and renamed. What is
moved into place gets the permissions the user's umask gives a new file or folder (0644 / 0755 with umask 022),
whatever the writer chose: safetensors' ``save_file`` and ``tempfile`` make private (0600) files.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    Works for files and directories: whatever the body creates at the yielded path is moved into place.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the body decides whether it is a file or a directory
    try:
        yield tmp
        apply_umask(tmp)
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if dest.is_dir() and tmp.is_dir():
            # Directories cannot be replaced atomically over a non-empty one: swap through a second rename.
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    """This process's umask, read without changing it where the system says it (Linux's /proc), else by setting
    and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the mode the umask gives new files: 0666 / 0777 less the
    umask. Links are left alone."""
    if not os.path.lexists(path):  # the body wrote nothing: os.replace reports it
        return
    mask = current_umask()
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        paths += [Path(root) / name for root, dirs, files in os.walk(path) for name in (*dirs, *files)]
    for p in paths:
        mode = os.lstat(p).st_mode
        if stat.S_ISDIR(mode):
            os.chmod(p, 0o777 & ~mask)
        elif stat.S_ISREG(mode):
            os.chmod(p, 0o666 & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


# The name atomic_path gives a temporary: ".NAME.XXXXXXXX.tmp" beside NAME.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")


def destination_of(path: str | os.PathLike) -> Path:
    """``path`` with every temporary of :func:`atomic_path` in it replaced by the name it will get (for messages:
    ".out.k2j4abcd.tmp/source/0.png" → "out/source/0.png")."""
    path = Path(path)
    parts = [match.group("name") if (match := _TEMPORARY.match(part)) else part for part in path.parts]
    return Path(*parts) if parts else path


def check_writable_folder(path: str | os.PathLike, flag: str) -> None:
    """Refuse, in one line, an output folder that cannot be made or written: a file where it or a folder above it
    should be, or no write permission in the nearest existing folder. Nothing is created."""
    from controlnet.errors import UserError

    path = Path(path).expanduser()
    existing = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
    if existing is None:  # pragma: no cover - the root always exists
        return
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {existing} (permission denied); choose another folder")
