"""Resuming a run that writes one output per input: what counts as done.

An output counts as done only when it is a regular file (a folder or a dangling link at its path is not an
output), and, where the run records what made it in the PNG's text chunks, when those chunks say the same.
Outputs are written atomically (:mod:`controlnet.fileio`), so a half-written file never exists under its name.
Used by ``controlnet annotate`` folder mode (:mod:`controlnet.annotators.folder`); ``generate --control-dir``
(:mod:`controlnet.batch`) asks the same question of its outputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def is_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a written output: a regular file (following links)."""
    return Path(path).is_file()


def png_text(path: str | os.PathLike) -> dict[str, str] | None:
    """The text chunks of the PNG at ``path`` (read from the header, no pixel decoded), or ``None`` when it is not
    a readable image file."""
    from PIL import Image

    if not is_output(path):
        return None
    try:
        with Image.open(path) as png:
            return {k: v for k, v in png.info.items() if isinstance(v, str)}
    except (OSError, ValueError):
        return None


def made_with(path: str | os.PathLike, expected: Mapping[str, str]) -> bool:
    """Whether the PNG at ``path`` exists and its text chunks hold every ``expected`` key with that value."""
    found = png_text(path)
    return found is not None and all(found.get(k) == v for k, v in expected.items())


def split_done(items: Iterable[T], done: Callable[[T], bool]) -> tuple[list[T], int]:
    """``(items still to do, how many are done)``, in the given order."""
    todo, skipped = [], 0
    for item in items:
        if done(item):
            skipped += 1
        else:
            todo.append(item)
    return todo, skipped
