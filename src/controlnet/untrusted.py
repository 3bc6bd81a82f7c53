"""Paths that come from an untrusted source: a web client, the settings stored in a shared PNG, a prompt tag.

One rule for all of them (:func:`resolve_untrusted_input`):

- only **inputs**: an untrusted source never names a file the program writes (an output path is refused by the
  caller before any path is looked at, whatever its value);
- only inside the **allowed roots** the caller passes (a models folder, the bundled models, an upload area);
- checked **after** resolving ``..`` and every symlink, so that neither leads out of a root;
- **one message** for a path outside the roots, a path that does not exist, and a path that is not a regular
  file (or folder, where folders are allowed): a sender learns nothing about what the disk holds.

No third-party import: the settings readers and the web UI use it before anything heavy is loaded.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from controlnet.errors import UserError

__all__ = ["is_inside", "resolve_untrusted_input"]


def is_inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether resolved ``path`` is one of resolved ``roots`` or lies below one (a plain name comparison)."""
    return any(path == root or root in path.parents for root in roots)


def resolve_untrusted_input(path: str | os.PathLike, roots: Sequence[str | os.PathLike], what: str,
                            hint: str = "give a file inside the allowed folders", folders: bool = False) -> Path:
    """The real path of input ``path`` from an untrusted source, if it is a regular file (or, with ``folders``, a
    folder) inside one of ``roots`` after resolving ``..`` and symlinks; else a :class:`UserError`.

    A relative ``path`` is taken relative to each root in turn (never to the current folder); ``~`` is not
    expanded. Every refusal is the same line, ``"{what} {path!r} is not a file in the allowed folders; {hint}"``,
    whether the path lies outside the roots, does not exist, or is a FIFO, a device or a socket, so the answer
    tells the sender nothing about the disk.

    >>> resolve_untrusted_input("lora/style.safetensors", ["/srv/models"], "LoRA")  # doctest: +SKIP
    PosixPath('/srv/models/lora/style.safetensors')
    """
    text = os.fspath(path)
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    for root in real_roots:
        candidate = _real(root / text)  # an absolute ``text`` replaces ``root`` here
        if candidate is not None and is_inside(candidate, real_roots) and _acceptable(candidate, folders):
            return candidate
    raise UserError(f"{what} {text!r} is not a file in the allowed folders; {hint}")


def _real(path: Path) -> Path | None:
    """``path`` with ``..`` and symlinks resolved, or None when the text cannot be a path (a NUL byte, too long)."""
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError):
        return None


def _acceptable(path: Path, folders: bool) -> bool:
    """A regular file, or a folder when ``folders``: never a FIFO, device or socket (reading one may block)."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(mode) or (folders and stat.S_ISDIR(mode))
