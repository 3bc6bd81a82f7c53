"""Where a detector's weights come from, and reading a released weights file safely.

``--weights PATH`` (a file or a folder) always works offline. Without it, the detector's default hub
repository and file resolve through huggingface_hub's cache (:mod:`controlnet.hub`): downloaded on first use,
or one line naming the repository, the file and the fetch command when offline.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from controlnet.errors import UserError

# The hub repository that A1111 and ComfyUI users keep the ControlNet 1.1 annotator weights in.
ANNOTATORS_REPO = "lllyasviel/Annotators"
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def weights_path(weights: str | os.PathLike | None, repo_id: str, filename: str | None = None) -> Path:
    """The local weights of a detector: ``weights`` if given (an existing path, or a hub id), else ``filename``
    of ``repo_id`` (a whole snapshot when ``filename`` is None) from the hub cache."""
    from controlnet import hub

    if weights:
        return hub.resolve(weights)
    if filename is None:
        return hub.hub_folder(repo_id)
    return hub.hub_file(repo_id, filename)


def weights_status(repo_id: str, filename: str) -> str:
    """A short line for listings: whether the default weights are in the hub cache (no network)."""
    from controlnet import hub

    if hub.is_cached(repo_id, filename):
        return f"weights cached ({repo_id}/{filename})"
    return f"weights not cached: `{hub.fetch_command(repo_id, filename)}` or --weights FILE"


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level object of a weights file: ``.safetensors`` via safetensors, pickles only with
    ``weights_only=True`` (no code runs). Unreadable or code-carrying files are one-line :class:`UserError` s."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found (or not a regular file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
            raise UserError(f"{path}: not a readable .safetensors file ({str(err).splitlines()[0]})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: refused: the file holds Python objects other than tensors (loading it could "
                        "run code); use a plain state dict or .safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise UserError(f"{path}: not a readable weights file ({str(err).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj
