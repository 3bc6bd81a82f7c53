"""Reading weights files safely: regular files only, ``.safetensors`` through safetensors, pickles only with
``torch.load(weights_only=True)`` (a file that would run code is refused). Every failure is a one-line
:class:`~controlnet.errors.UserError` naming the file.

This module sits at the bottom of the package: it imports nothing of ours but the error type, and torch and
safetensors only when a file is read.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
from pathlib import Path
from typing import Any

from controlnet.errors import UserError


def first_sentence(err: BaseException) -> str:
    """The gist of a library's error message: its first line, cut after the first sentence."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(". ")[0]


def read_safetensors(path: Path, want: str | None = None) -> dict[str, Any]:
    """Tensors of a .safetensors file; with ``want``, only the keys under that prefix when there are any."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            if want and any(k.startswith(want) for k in keys):
                keys = [k for k in keys if k.startswith(want)]
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{path} is not a valid .safetensors file (truncated or corrupt?): {first_sentence(err)}") from None


def read_torch_file(path: Path) -> Any:
    """``torch.load(weights_only=True)``: plain tensors and containers only; a file that runs code is refused."""
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if "Weights only load failed" in text and found:
            what = found.group(1)
            raise UserError(
                f"{path} was refused: unpickling it would run code or build objects ({what}); only tensor files are "
                "loaded (torch.load weights_only=True); if you trust its source, re-save its tensors as .safetensors"
            ) from None
        raise UserError(f"{path} is not a valid PyTorch file (corrupt?): {first_sentence(err)}") from None
    except Exception as err:  # torch raises RuntimeError/EOFError/ValueError/... for damaged zip or pickle data
        raise UserError(f"{path} is not a valid PyTorch file (truncated or corrupt?): {first_sentence(err)}") from None


def check_regular_file(path: Path, max_bytes: int | None = None) -> None:
    """Refuse what is not a regular file (a FIFO or a device would block the read or never end) or is too big."""
    try:
        info = path.stat()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path} is not a regular file (a FIFO, a device, ...); give a file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise UserError(f"{path} is {info.st_size} bytes; a config file is at most {max_bytes} bytes")


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level object of a weights file (regular files only): ``.safetensors`` via safetensors, pickles only
    with ``weights_only=True`` (no code runs). Unreadable or code-carrying files are one-line :class:`UserError` s."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights file {path} not found")
    check_regular_file(path)
    obj = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj
