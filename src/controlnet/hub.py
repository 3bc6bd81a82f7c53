"""Models named by Hugging Face hub id: resolved through huggingface_hub's cache, as diffusers and A1111 do.

A name that is an existing local path is used as it is. Otherwise ``org/name`` (a repository) or
``org/name/file.ext`` (one file inside it) is looked up in the hub cache (``HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``) and downloaded there on first use, unless ``HF_HUB_OFFLINE=1``. Offline and not
cached, the error is one line naming the repository, the file and the command that fetches it. Any id may end in
``@REV`` (a branch, tag or commit: ``lllyasviel/control_v11p_sd15_canny@main``), as pip and git name revisions;
:func:`hub_ref` reads it. :func:`quiet_loading` hides the libraries' per-file bars while models load.

This module sits near the bottom of the package: it imports only the error type, and huggingface_hub,
diffusers and transformers when a function needs them.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from controlnet.errors import UserError

# "org/name" with the characters the hub allows in repository ids (huggingface_hub's validate_repo_id).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def is_repo_id(text: str | os.PathLike) -> bool:
    """Whether ``text`` reads as a hub repository id (``org/name``) rather than a local path."""
    text = str(text)
    return bool(_REPO_ID.match(text)) and not Path(text).expanduser().exists()


def spelled_as_hub_id(text: str) -> bool:
    """Whether ``text`` is spelled ``org/name`` or ``org/name/path/file``, by its spelling alone: what the local
    disk holds plays no part (for names from an untrusted source, whose answer must not tell what exists)."""
    parts = text.split("/")
    return len(parts) >= 2 and "" not in parts and not {".", ".."} & set(parts) \
        and bool(_REPO_ID.match("/".join(parts[:2])))


def split_file_id(text: str | os.PathLike) -> tuple[str, str] | None:
    """``org/name/path/to/file.ext`` → (``org/name``, ``path/to/file.ext``); ``None`` for anything else."""
    text = str(text)
    parts = text.split("/")
    if len(parts) < 3 or Path(text).expanduser().exists() or not _REPO_ID.match("/".join(parts[:2])):
        return None
    if not Path(parts[-1]).suffix:
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


@dataclass(frozen=True)
class HubRef:
    """A model on the hub: its repository, one file in it (None: the repository) and the revision (None: main)."""

    repo_id: str
    filename: str | None
    revision: str | None


# "org/name[/file]@REV": git's ref characters, without "@" itself.
_REVISION = re.compile(r"^(?P<id>[^@]+)@(?P<rev>[\w.\-/]+)$")


def hub_ref(text: str | os.PathLike, revision: str | None = None) -> HubRef | None:
    """``org/name``, ``org/name/file.ext``, either with ``@REV``, as a :class:`HubRef` (``revision`` applies when
    the text names none; two different ones are a :class:`UserError`); ``None`` for an existing path or a text
    that is no hub id."""
    text = str(text)
    if Path(text).expanduser().exists():
        return None
    match = _REVISION.match(text)
    if match is not None:
        if revision is not None and revision != match["rev"]:
            raise UserError(f"{text} names revision {match['rev']!r} and --revision says {revision!r}; give one")
        text, revision = match["id"], match["rev"]
    file_id = split_file_id(text)
    if file_id is not None:
        return HubRef(file_id[0], file_id[1], revision)
    return HubRef(text, None, revision) if is_repo_id(text) else None


def fetch_command(repo_id: str, filename: str | None = None, revision: str | None = None) -> str:
    """The shell command that puts ``repo_id`` (or one file of it) into the hub cache."""
    words = ["hf", "download", repo_id] + ([filename] if filename else [])
    if revision:
        words += ["--revision", revision]
    return " ".join(words)


def hub_file(repo_id: str, filename: str, revision: str | None = None, cached_only: bool = False) -> Path:
    """The local path of ``filename`` in hub repository ``repo_id``, downloading it on first use (never with
    ``cached_only``: then it must be in the cache already)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=cached_only))
    except Exception as err:  # noqa: BLE001 - offline, missing repo/file, network: the user needs one line
        raise UserError(_not_available(repo_id, filename, revision, err)) from None


def hub_folder(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None,
               cached_only: bool = False) -> Path:
    """The local snapshot folder of hub repository ``repo_id``, downloading it on first use (never with
    ``cached_only``)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns,
                                      local_files_only=cached_only))
    except Exception as err:  # noqa: BLE001 - as in hub_file
        raise UserError(_not_available(repo_id, None, revision, err)) from None


def pipeline_folder(repo_id: str, revision: str | None = None, variant: str | None = None) -> Path:
    """The local snapshot of diffusers pipeline repository ``repo_id`` with the files a Stable Diffusion base
    needs, as diffusers' ``DiffusionPipeline.download`` chooses them (safetensors over pickles, ``variant``
    weights when asked; no safety checker, feature extractor or image encoder), downloading them on first use."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    try:
        with quiet_loading():
            return Path(DiffusionPipeline.download(repo_id, revision=revision, variant=variant, safety_checker=None,
                                                   feature_extractor=None, image_encoder=None,
                                                   local_files_only=constants.HF_HUB_OFFLINE))
    except Exception as err:  # noqa: BLE001 - as in hub_file
        raise UserError(_not_available(repo_id, None, revision, err)) from None


def model_file(repo_id: str, weights: str, revision: str | None = None, variant: str | None = None) -> Path:
    """The weights file of a single-model diffusers repository (a ControlNet, a VAE: ``config.json`` beside
    ``weights``, e.g. diffusion_pytorch_model.safetensors), its ``variant`` (``*.fp16.safetensors``) when asked
    and present; both files downloaded on first use."""
    hub_file(repo_id, "config.json", revision)
    if variant:
        stem, dot, suffix = weights.rpartition(".")
        try:
            return hub_file(repo_id, f"{stem}.{variant}.{suffix}", revision)
        except UserError:
            pass  # no such variant: the plain weights, as diffusers falls back
    return hub_file(repo_id, weights, revision)


def is_cached(repo_id: str, filename: str, revision: str | None = None) -> bool:
    """Whether ``filename`` of ``repo_id`` is already in the hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return isinstance(found, str)


def resolve(name: str | os.PathLike, revision: str | None = None) -> Path:
    """A local path for ``name``: the path itself if it exists, else a hub file (``org/name/file[@REV]``) or a hub
    repository snapshot (``org/name[@REV]``). Anything else is a one-line :class:`UserError`."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    ref = hub_ref(name, revision)
    if ref is not None and ref.filename is not None:
        return hub_file(ref.repo_id, ref.filename, revision=ref.revision)
    if ref is not None:
        return hub_folder(ref.repo_id, revision=ref.revision)
    raise UserError(f"{name} not found: give an existing file or folder, or a hub id like org/name")


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' per-file loading bars while loading (restored afterwards); the
    pipeline's own progress bar is the one over the sampling steps."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in enabled:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was_enabled in enabled:
            if was_enabled:
                lib.enable_progress_bar()


def _not_available(repo_id: str, filename: str | None, revision: str | None, err: Exception) -> str:
    what = f"{filename} of {repo_id}" if filename else repo_id
    fetch = fetch_command(repo_id, filename, revision)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return f"{what} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; fetch it with `{fetch}`"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (f"cannot get {what} from the Hugging Face hub ({type(err).__name__}: {first}); fetch it with `{fetch}`, "
            "or set HF_HUB_OFFLINE=1 to use only the Hugging Face cache without network retries")
