"""Where a detector's weights come from, and reading a released weights file safely.

``--weights PATH`` (a file or a folder) always works offline. Without it, the detector's default hub
repository and file resolve through huggingface_hub's cache (:mod:`controlnet.hub`): downloaded on first use,
or one line naming the repository, the file and the fetch command when offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from controlnet.errors import UserError

# The hub repository that A1111 and ComfyUI users keep the ControlNet 1.1 annotator weights in.
ANNOTATORS_REPO = "lllyasviel/Annotators"


def weights_status(repo_id: str, filename: str) -> str:
    """A short line for listings: whether the default weights are in the hub cache (no network)."""
    from controlnet import hub

    if hub.is_cached(repo_id, filename):
        return f"weights cached ({repo_id}/{filename})"
    return f"weights not cached: `{hub.fetch_command(repo_id, filename)}` or --weights FILE"


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level object of a weights file (regular files only): ``.safetensors`` via safetensors, pickles only
    with ``weights_only=True`` (no code runs). Unreadable or code-carrying files are one-line :class:`UserError` s."""
    from controlnet.checkpoints import check_regular_file, read_safetensors, read_torch_file

    path = Path(path)
    if not path.exists():
        raise UserError(f"weights file {path} not found")
    check_regular_file(path)
    obj = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj
