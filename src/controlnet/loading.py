"""How a base model, a VAE and a ControlNet source are loaded (where they run: :mod:`controlnet.devices`).

A base model is one of (:func:`load_base`)::

    a diffusers folder     model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/ (+ the SDXL *_2)
    a single file          .safetensors/.ckpt via diffusers' from_single_file, with a diffusers config folder
                           (``base_config``) or the detected family's config from the Hugging Face cache
    a hub id               ``org/name`` (a diffusers repository: the files diffusers' DiffusionPipeline.download
                           picks, ``variant`` ones such as ``*.fp16.safetensors`` when asked) or
                           ``org/name/file.safetensors`` (a single file), through :mod:`controlnet.hub`'s cache
    the embedded model     the tiny diffusers folder shipped in the package (controlnet.embedded)

A VAE (:func:`load_vae`) and a ControlNet (:func:`resolve_controlnet_source`) are named the same ways. Once a hub
id is in the cache, every loader reads local files only (``local_files_only=True``).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from controlnet import hub
from controlnet.embedded import bundled_controlnets, resolve_controlnet
from controlnet.errors import UserError
from controlnet.hub import quiet_loading
from controlnet.safe_io import read_state_dict

# Component name in model_index.json → whether it is a torch model (cast to the pipeline dtype).
_COMPONENTS = {"unet": True, "vae": True, "text_encoder": True, "tokenizer": False, "scheduler": False,
               "text_encoder_2": True, "tokenizer_2": False}
_LIBRARIES = ("diffusers", "transformers")
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


# --------------------------------------------------------------------------- base models


def load_base(path: str | os.PathLike, dtype: torch.dtype, base_config: str | os.PathLike | None = None,
              revision: str | None = None, variant: str | None = None) -> dict[str, Any]:
    """The components of a base model (unet, vae, text_encoder, tokenizer, scheduler, and for SDXL
    text_encoder_2, tokenizer_2), in ``dtype`` on the cpu, from a diffusers folder, a single file or a hub id
    (``revision``: a branch, tag or commit of the hub repository; ``variant``: e.g. "fp16" for
    ``*.fp16.safetensors`` weights, used where a component has them)."""
    path = resolve_base(path, revision, variant)
    with quiet_loading():
        if path.is_dir():
            return _load_base_folder(path, dtype, variant)
        return _load_base_single_file(path, dtype, base_config)


def resolve_base(name: str | os.PathLike, revision: str | None = None, variant: str | None = None) -> Path:
    """A local path for base model ``name``: the path itself, an embedded base's name ("tiny-shapes"), or a hub id
    in the cache (downloaded on first use)."""
    from controlnet.embedded import local_base

    path = local_base(name)
    if path is not None:
        return path
    ref = hub.hub_ref(name, revision)
    if ref is not None and ref.filename is not None:
        return hub.hub_file(ref.repo_id, ref.filename, revision=ref.revision)
    if ref is not None:
        return hub.pipeline_folder(ref.repo_id, revision=ref.revision, variant=variant)
    raise UserError(f"base model {name} not found; pass a diffusers folder, a .safetensors/.ckpt file or a hub id "
                    "(org/name, or org/name/file.safetensors)")


def _load_base_folder(path: Path, dtype: torch.dtype, variant: str | None = None) -> dict[str, Any]:
    """The components of a diffusers Stable Diffusion (1.x/2.x) or SDXL folder (its model_index.json)."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{path}: not a diffusers model folder (no model_index.json); pass a diffusers folder or a .safetensors/.ckpt file")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{index_file}: unreadable ({err}); the base model folder is damaged") from None
    components = {name: load_component(path, name, index[name], is_model, dtype, variant)
                  for name, is_model in _COMPONENTS.items() if index.get(name) and index[name][0] is not None}
    missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if n not in components]
    if missing:
        raise UserError(f"{path}: model_index.json lists no {', '.join(missing)}; not a Stable Diffusion base folder")
    return components


def load_component(path: Path, name: str, entry: list[str], is_model: bool, dtype: torch.dtype,
                    variant: str | None = None) -> Any:
    """One component ``name`` of a diffusers folder; ``entry`` is its ``[library, class]`` in model_index.json.
    ``variant`` weights (``*.{variant}.safetensors``) are used where the component has them, as diffusers'
    DiffusionPipeline.from_pretrained falls back to the plain files for components without them."""
    index_file = path / "model_index.json"
    library, class_name = entry
    if library not in _LIBRARIES:
        raise UserError(f"{index_file}: component {name} comes from {library!r}; only diffusers/transformers components are supported")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise UserError(f"{index_file}: unknown {library} class {class_name!r} for {name}")
    kwargs: dict[str, Any] = {"torch_dtype": dtype} if is_model else {}
    if is_model and variant and _has_variant(path / name, variant):
        kwargs["variant"] = variant
    elif is_model and _only_fp16_variant(path / name):
        kwargs["variant"] = "fp16"  # e.g. diffusion_pytorch_model.fp16.safetensors without the plain file
    if library == "diffusers":
        kwargs["subfolder"] = name
        source = path
    else:
        source = path / name
    try:
        return cls.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot load its {name} ({first}); the base model folder is incomplete or damaged") from None


def _has_variant(folder: Path, variant: str) -> bool:
    """Whether ``folder`` holds ``variant`` weights (``*.{variant}.safetensors`` / ``*.{variant}.bin``)."""
    return any(f".{variant}." in p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))


def _only_fp16_variant(folder: Path) -> bool:
    """Whether ``folder`` holds only fp16-variant weight files (``*.fp16.safetensors`` / ``*.fp16.bin``)."""
    weights = [p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin")]
    return bool(weights) and all(".fp16" in name for name in weights)


class _LazyCheckpoint(Mapping):
    """The tensors of a .safetensors file read on demand (for detecting the family without loading it all)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _load_base_single_file(path: Path, dtype: torch.dtype, base_config: str | os.PathLike | None) -> dict[str, Any]:
    """The components of a single-file SD / SDXL checkpoint via diffusers' ``from_single_file``.

    Offline, diffusers needs the matching diffusers config (model_index.json, component configs, tokenizer
    files): ``base_config`` (a folder), or the default repo of the detected family in the Hugging Face cache.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if path.suffix.lower() not in _WEIGHT_SUFFIXES:
        raise UserError(f"{path}: a base model is a diffusers folder or a .safetensors/.ckpt file")
    if base_config is not None:
        config_dir = Path(base_config).expanduser()
        if not (config_dir / "model_index.json").is_file():
            raise UserError(f"--base-config {config_dir}: no model_index.json there; give a diffusers folder of the same family as {path.name}")
        class_name = json.loads((config_dir / "model_index.json").read_text()).get("_class_name", "")
        is_xl = "XL" in class_name
    else:
        config_dir, is_xl = _cached_single_file_config(path)
    pipeline_class = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    kwargs: dict[str, Any] = {"config": str(config_dir), "local_files_only": True, "torch_dtype": dtype}
    if pipeline_class is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = pipeline_class.from_single_file(str(path), **kwargs)
    except Exception as err:  # noqa: BLE001 - diffusers raises many types; the user needs one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: diffusers could not load it with config {config_dir} ({first})") from None
    return {name: getattr(pipe, name, None) for name in _COMPONENTS if getattr(pipe, name, None) is not None}


def _cached_single_file_config(path: Path) -> tuple[Path, bool]:
    """(the diffusers config folder in the Hugging Face cache of the family ``path`` belongs to, whether it is
    SDXL). The family is detected by diffusers' single-file utilities; nothing is downloaded."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, infer_diffusers_model_type, load_single_file_checkpoint
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        if path.suffix.lower() == ".safetensors":
            checkpoint: Mapping[str, Any] = _LazyCheckpoint(path)
        else:
            checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
        model_type = infer_diffusers_model_type(checkpoint)
        repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    except Exception as err:  # noqa: BLE001 - any failure here means "not a checkpoint we can read"
        raise UserError(f"{path}: cannot read it as a Stable Diffusion checkpoint ({type(err).__name__}: {err})".splitlines()[0]) from None
    del checkpoint
    try:
        # The same files diffusers' from_single_file fetches for its config (cache only: no network).
        config_dir = Path(snapshot_download(repo, local_files_only=True,
                                            allow_patterns=["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise UserError(
            f"{path.name} looks like {model_type} ({repo}) but its diffusers config is not in the Hugging Face cache; "
            f"pass --base-config DIR (a diffusers folder of {repo}, weights not needed)"
        ) from None
    return config_dir, model_type.startswith("xl")


# --------------------------------------------------------------------------- VAE and ControlNet sources

# The weights file of a diffusers model folder (diffusers.utils.SAFETENSORS_WEIGHTS_NAME).
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def load_vae(source: str | os.PathLike, like: nn.Module, dtype: torch.dtype, revision: str | None = None,
             variant: str | None = None) -> nn.Module:
    """A VAE to replace ``like`` (the base's): a diffusers folder (or a base folder's ``vae/``), a single file in
    the original (LDM) or diffusers layout — read by diffusers' ``from_single_file`` with ``like``'s config, as a
    replacement VAE has its base's architecture — or a hub id; in ``dtype`` on the cpu."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    if not path.exists():
        ref = hub.hub_ref(source, revision)
        if ref is not None and ref.filename is not None:
            path = hub.hub_file(ref.repo_id, ref.filename, revision=ref.revision)
        elif ref is not None:
            path = hub.model_file(ref.repo_id, DIFFUSERS_WEIGHTS, ref.revision, variant).parent
        else:
            raise UserError(f"VAE {source} not found; pass a diffusers folder, a .safetensors/.ckpt file or a hub id")
    try:
        with quiet_loading():
            if path.is_dir():
                folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
                use_variant = variant if variant and _has_variant(folder, variant) else None
                vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, variant=use_variant)
            else:
                vae = _vae_from_file(path, like, dtype)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - diffusers raises many types; the user needs one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"VAE {source}: cannot load it ({first})") from None
    if vae.config.latent_channels != like.config.latent_channels:
        raise UserError(f"VAE {source} has {vae.config.latent_channels} latent channels, this base's VAE "
                        f"{like.config.latent_channels}; use a VAE made for this base's family")
    return vae.eval()


def _vae_from_file(path: Path, like: nn.Module, dtype: torch.dtype) -> nn.Module:
    import tempfile

    from diffusers import AutoencoderKL

    checkpoint = read_state_dict(path)  # safetensors, or a pickle with weights_only=True
    if isinstance(checkpoint.get("state_dict"), Mapping):  # an LDM training checkpoint
        checkpoint = dict(checkpoint["state_dict"])
    with tempfile.TemporaryDirectory() as config_dir:
        Path(config_dir, "config.json").write_text(json.dumps(dict(like.config)))
        return AutoencoderKL.from_single_file(checkpoint, config=config_dir, torch_dtype=dtype, local_files_only=True)


def resolve_controlnet_source(name: str | os.PathLike, revision: str | None = None,
                              variant: str | None = None) -> Path:
    """A local path for ControlNet ``name``: a bundled name or a path (:func:`controlnet.embedded.resolve_controlnet`),
    a file in a hub repository (``org/name/file.safetensors``), or a diffusers ControlNet repository (``org/name``,
    e.g. lllyasviel/control_v11p_sd15_canny: its weights file, with its config.json beside it)."""
    text = str(name)
    if text in bundled_controlnets() or Path(text).expanduser().exists():
        return resolve_controlnet(text)
    ref = hub.hub_ref(text, revision)
    if ref is not None and ref.filename is not None:
        return hub.hub_file(ref.repo_id, ref.filename, revision=ref.revision)
    if ref is not None:
        return hub.model_file(ref.repo_id, DIFFUSERS_WEIGHTS, ref.revision, variant)
    return resolve_controlnet(text)  # its one-line error


UNET = "unet"
# model_index.json's transformer class → the flow-matching family (controlnet.generation_config.FLOW_DEFAULTS).
FLOW_TRANSFORMERS = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
                     "QwenImageTransformer2DModel": "qwenimage"}


def base_folder_family(base: str | None, revision: str | None = None) -> str:
    """"flux", "sd3" or "qwenimage" for a diffusers folder or hub repository whose model_index.json names a Flux,
    SD3 or Qwen-Image transformer; "unet" for anything else (the embedded base, single files, SD folders: the UNet
    loader reads and checks them). A hub base's model_index.json is fetched alone (the rest when the base is loaded)."""
    if base is None:
        return UNET
    from controlnet.embedded import local_base

    path = local_base(base)  # a path, or an embedded base's name ("tiny-flux", "tiny-shapes")
    if path is not None and path.is_dir():
        index_file = path / "model_index.json"
    elif path is not None:
        return UNET
    else:
        from controlnet import hub

        ref = hub.hub_ref(base, revision)
        if ref is None or ref.filename is not None:
            return UNET
        index_file = hub.hub_file(ref.repo_id, "model_index.json", revision=ref.revision)
    try:
        entry = json.loads(index_file.read_text()).get("transformer")
    except (OSError, ValueError, AttributeError):
        return UNET  # no or no readable model_index.json: the UNet loader says what is wrong with it
    return FLOW_TRANSFORMERS.get(entry[-1] if isinstance(entry, list) and entry else None, UNET)
