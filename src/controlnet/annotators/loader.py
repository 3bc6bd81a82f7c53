"""What every detector with a network shares: where its weights are, the device it runs on, and one model cache.

Both kinds of detector go through here: the ControlNet 1.1 networks that load a released file of
``lllyasviel/Annotators`` (:mod:`.released`, :mod:`.openpose`) and the transformers checkpoints
(:mod:`.transformers_detectors`). A detector names its default weights with a :class:`WeightsSource`;
:func:`locate` turns the user's ``weights`` value (empty, a file, a folder or a hub id) into a local path,
:func:`torch_device` reads the one ``device`` parameter (:data:`DEVICE`), and :func:`cached` keeps one model per
process, weights and device (:func:`clear_cache` forgets them all).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from controlnet.annotators.registry import Param
from controlnet.errors import UserError

if TYPE_CHECKING:  # torch is imported on first use, so listing annotators stays fast
    import torch

DEVICE = Param("device", str, "cpu", "torch device: cpu, cuda, cuda:N, mps or auto")


@dataclass(frozen=True)
class WeightsSource:
    """Where a detector's weights come from: the released file ``filename`` of hub repository ``repo_id``, or, for
    a model folder (``fetch_folder`` given: a transformers checkpoint), the folder ``fetch_folder(repo_id)``
    returns. ``title`` names the model in messages; ``missing`` is the message when ``repo_id`` does not publish
    the file (``filename=None``), so that only ``--weights`` can give it."""

    title: str
    repo_id: str
    filename: str | None = None
    fetch_folder: Callable[[str], Path] | None = None
    missing: str | None = None

    @property
    def folder(self) -> bool:
        """Whether the weights are a model folder rather than one file."""
        return self.fetch_folder is not None

    def fetch(self, repo_id: str) -> Path:
        """The local copy of this source's file (or folder) in hub repository ``repo_id``."""
        from controlnet import hub

        if self.fetch_folder is not None:
            return self.fetch_folder(repo_id)
        if self.filename is None:
            raise UserError(self.missing or f"{self.title}: no weights file in {repo_id}; pass --weights FILE")
        return hub.hub_file(repo_id, self.filename)  # one file, not a whole snapshot of the repository


def locate(source: WeightsSource, weights: str) -> Path:
    """The local weights of ``source``: when ``weights`` is empty, the default from the hub cache; else ``weights``
    as an existing file, a folder (holding ``source.filename`` for a released file; the model folder itself for a
    transformers checkpoint) or a hub id (``org/name``, or ``org/name/file`` for a released file)."""
    from controlnet import hub

    if not weights:
        return source.fetch(source.repo_id)
    path = Path(weights).expanduser()
    if path.is_dir():
        if source.folder:
            return path
        if source.filename and (path / source.filename).is_file():
            return path / source.filename
        raise UserError(f"{source.title}: folder {path} has no {source.filename or 'weights file'}; pass the file "
                        "itself with --weights FILE")
    if path.exists():
        if source.folder:
            raise UserError(f"{path} is a file; {source.title} needs a model folder (config.json, preprocessor config "
                            f"and weights, as save_pretrained writes them) or a hub id like {source.repo_id}")
        return path
    if hub.is_repo_id(weights) and (source.folder or source.filename):
        return source.fetch(weights)
    if not source.folder:
        return hub.resolve(weights)  # org/name/file.pth (a file of another repository); else "not found"
    raise UserError(f"{weights} not found: give a {source.title} model folder or a hub id like {source.repo_id}")


def torch_device(device: str) -> torch.device:
    """The ``device`` parameter as a torch device (``auto``: cuda, then mps, then cpu); an unknown device or one
    this machine lacks is a one-line :class:`UserError`."""
    from controlnet.devices import resolve_device

    return resolve_device(None if device == "auto" else device)


# One model per (kind, weights, device) and process: annotating a folder loads each model once.
_CACHE: dict[tuple[Any, ...], Any] = {}


def cache_key(path: Path) -> tuple[str, int, int]:
    """A weights file or folder as a cache key: its resolved path, and for a file its mtime and size (a file
    replaced in place is read again)."""
    stat = path.stat() if path.is_file() else None
    return str(path.resolve()), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0


def cached(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """The model cached under ``key``, built by ``build()`` on first use."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def clear_cache() -> None:
    """Forget every loaded model, released networks and transformers checkpoints alike (tests; freeing memory)."""
    _CACHE.clear()
