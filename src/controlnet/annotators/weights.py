"""Where a detector's weights come from (they are read by :func:`controlnet.safe_io.read_state_dict`).

``--weights PATH`` (a file or a folder) always works offline. Without it, the detector's default hub
repository and file resolve through huggingface_hub's cache (:mod:`controlnet.hub`): downloaded on first use,
or one line naming the repository, the file and the fetch command when offline.
"""

from __future__ import annotations


# The hub repository that A1111 and ComfyUI users keep the ControlNet 1.1 annotator weights in.
ANNOTATORS_REPO = "lllyasviel/Annotators"


def weights_status(repo_id: str, filename: str) -> str:
    """A short line for listings: whether the default weights are in the hub cache (no network)."""
    from controlnet import hub

    if hub.is_cached(repo_id, filename):
        return f"weights cached ({repo_id}/{filename})"
    return f"weights not cached: `{hub.fetch_command(repo_id, filename)}` or --weights FILE"
