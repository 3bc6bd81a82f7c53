"""A Hugging Face hub cache folder built by hand, so that hub ids resolve in tests without any network.

The layout is huggingface_hub's (``models--ORG--NAME/refs/main`` holds a commit hash; the files live under
``snapshots/HASH/``). Point ``HF_HUB_CACHE`` at the folder and set ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def add_to_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes | Path], revision: str = "main") -> Path:
    """Put ``files`` (path in the repo → bytes, or a local file or folder to copy) into ``cache`` as repository
    ``repo_id`` at ``revision``; returns the snapshot folder."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        elif Path(content).is_dir():
            shutil.copytree(content, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(content, target)
    return snapshot
