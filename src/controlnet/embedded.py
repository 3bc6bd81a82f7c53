"""The embedded default model and the bundled ControlNets, shipped inside the package (no network).

Layout under ``controlnet/assets/``::

    tiny-sd/                  a diffusers Stable Diffusion 1.x folder (model_index.json, unet/, vae/,
                              text_encoder/, tokenizer/, scheduler/) trained on synthetic fill data
    tiny-shapes/              the same layout, trained on the shapes world (controlnet.data.shapes)
    tiny-flux/                a diffusers Flux folder, and its ControlNets under tiny-flux/controlnets/
    controlnets/<name>/       bundled ControlNets in the native (diffusers) layout, e.g. controlnets/fill/

``scripts/train_embedded.py`` makes them; ``src/controlnet/assets/README.md`` has the recipe and timings.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from controlnet.errors import UserError

BASE_NAME = "tiny-sd"


def assets_dir() -> Path:
    """The package's assets folder."""
    return Path(str(resources.files("controlnet") / "assets"))


def default_base_dir() -> Path:
    """The embedded tiny SD-layout base model (a diffusers folder)."""
    path = assets_dir() / BASE_NAME
    if not (path / "model_index.json").is_file():
        raise UserError(f"the embedded base model is missing from {path}; reinstall the package or pass --base PATH")
    return path


def embedded_base(name: str) -> Path | None:
    """The folder of the embedded base called ``name`` ("tiny-sd", "tiny-shapes", "tiny-flux"), or None."""
    path = assets_dir() / name
    if "/" in name or "\\" in name or name.startswith(".") or not (path / "model_index.json").is_file():
        return None
    return path


def local_base(name: str | os.PathLike) -> Path | None:
    """``name`` as a local base: the existing path it names (which wins), else the embedded base of that name, else
    None (a hub id, or nothing)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    return embedded_base(str(name))


def is_embedded(base: str | None) -> bool:
    """Whether ``base`` (a pipeline's ``base`` string: "embedded", a name or a path) is one of the embedded bases,
    whose vocabularies are their worlds' words only."""
    if not base:
        return False
    if base == "embedded" or embedded_base(base) is not None:
        return True
    path = Path(base).expanduser()
    return path.exists() and path.resolve().parent == assets_dir().resolve()


def controlnets_in(root: Path) -> dict[str, Path]:
    """The ControlNet folders (each with a config.json) directly inside ``root``, by name."""
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def bundled_controlnets() -> dict[str, Path]:
    """Names of the bundled ControlNets (for the embedded SD-layout bases) and their folders."""
    return controlnets_in(assets_dir() / "controlnets")


def base_controlnets(base: str | os.PathLike | None) -> dict[str, Path] | None:
    """The ControlNets an embedded base ships inside its own folder (tiny-flux's ``controlnets/``), by name; None
    for any other base (the bundled names then serve)."""
    if base is None or not is_embedded(str(base)):
        return None
    path = local_base(base)
    return controlnets_in(path / "controlnets") if path is not None and (path / "controlnets").is_dir() else None


def resolve_controlnet(name_or_path: str) -> Path:
    """A bundled ControlNet name (e.g. "fill") or a path, as a path; a one-line error if neither exists."""
    bundled = bundled_controlnets()
    if name_or_path in bundled:
        return bundled[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    names = ", ".join(bundled) or "none"
    raise UserError(f"no ControlNet named or at {name_or_path!r} (bundled: {names}); pass a bundled name or an existing path")
