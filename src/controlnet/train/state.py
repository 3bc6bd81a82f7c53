"""Checkpoints and random-number state: what a run needs to resume and end as an uninterrupted one would.

A checkpoint is a folder ``OUT/checkpoints/step-NNNNNN/``, written to a temporary folder and renamed (a kill or a
full disk never leaves a half-written one, and never harms the previous), the last ``--keep`` kept::

    controlnet/                 the ControlNet in the native layout (``controlnet generate`` reads it too)
    unet_decoder.safetensors    the base's decoder, once --unlock-decoder-after has unlocked it
    training_state.pt           AdamW moments by parameter name, LR scheduler, gradient scaler, RNG states,
                                step, position in the sample stream, the run's settings

The AdamW moments are saved under the parameters' names ("controlnet.conv_in.weight", "unet.up_blocks.0...")
rather than torch's indices, so they find their parameters whatever order the modules register them in.
Checkpoints of format 1 (moments by index, in this version's parameter order) are still read.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controlnet.errors import UserError
from controlnet.train.config import TrainConfig

STATE_VERSION = 2  # 1: AdamW moments keyed by parameter index
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "training_state.pt"
DECODER_FILE = "unet_decoder.safetensors"
# Settings that must not change for a resumed run to end as an uninterrupted one would.
SAME_ON_RESUME = ("seed", "batch_size", "grad_accum", "resolution", "empty_prompt_prob", "hflip", "lr",
                  "decoder_lr", "unlock_decoder_after", "mixed_precision", "weight_decay", "max_grad_norm",
                  "lr_warmup_steps", "annotator", "annotator_params")


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first (temporary folders start with '.')."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resume_folder(resume: str | Path | None, out: Path, say: bool = True) -> Path | None:
    """The checkpoint ``--resume`` names ("latest": the newest in OUT), or None for a fresh run."""
    if resume is None:
        return None
    if str(resume) == "latest":
        found = list_checkpoints(out)
        if not found:
            if say:
                print(f"no checkpoint in {out / 'checkpoints'}; starting a new run", file=sys.stderr)
            return None
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {path} is not a checkpoint folder (no {STATE_FILE}); pass 'latest' or a "
                        f"folder like OUT/checkpoints/step-000500")
    return path


def check_fresh(out: Path) -> None:
    if list_checkpoints(out):
        raise UserError(f"{out} already holds checkpoints of a run; pass --resume latest to continue it, "
                        "or choose a new --out")


def rng_state() -> dict[str, Any]:
    """The global torch / numpy / Python RNG states, as tensors and plain values (``weights_only`` loads them)."""
    np_name, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_gauss), float(np_cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_parameters(controlnet: torch.nn.Module,
                         decoder: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer may hold, by the names their state is saved under."""
    return {**{f"controlnet.{n}": p for n, p in controlnet.named_parameters()},
            **{f"unet.{n}": p for n, p in decoder.items()}}


def optimizer_state_by_name(optimizer: Any, named: dict[str, torch.nn.Parameter]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameter names where torch writes indices."""
    name_of = {id(p): n for n, p in named.items()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]  # torch's numbering
    state = optimizer.state_dict()
    return {"state": {names[i]: moments for i, moments in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def load_optimizer_state(optimizer: Any, saved: dict[str, Any], named: dict[str, torch.nn.Parameter],
                         path: Path, version: int = STATE_VERSION) -> None:
    """Load a state saved by :func:`optimizer_state_by_name` (or, ``version`` 1, torch's index-keyed one, whose
    indices follow this version's parameter order) into ``optimizer``, each moment onto its parameter by name."""
    name_of = {id(p): n for n, p in named.items()}
    groups = [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    if len(saved["param_groups"]) != len(groups):
        raise UserError(f"checkpoint {path} was made with{'out' if len(groups) > 1 else ''} "
                        "--unlock-decoder-after; resume with the same setting")
    if version < 2:
        saved = _names_for_indices(saved, [n for names in groups for n in names], path)
    for names, saved_group in zip(groups, saved["param_groups"]):
        if set(saved_group["params"]) != set(names):
            raise _does_not_fit(path)
    for name, moments in saved["state"].items():
        shapes = {tuple(v.shape) for k, v in moments.items() if k in ("exp_avg", "exp_avg_sq")}
        if name not in named or any(shape != tuple(named[name].shape) for shape in shapes):
            raise _does_not_fit(path)
    index = {name: i for i, name in enumerate(n for names in groups for n in names)}
    optimizer.load_state_dict({
        "state": {index[name]: moments for name, moments in saved["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in names]} for g, names in zip(saved["param_groups"], groups)],
    })


def _names_for_indices(saved: dict[str, Any], names: list[str], path: Path) -> dict[str, Any]:
    """A format-1 optimizer state (torch's indices) with the names of the parameters those indices stand for."""
    indices = [int(i) for g in saved["param_groups"] for i in g["params"]] + [int(i) for i in saved["state"]]
    if indices and max(indices) >= len(names):
        raise _does_not_fit(path)
    return {"state": {names[int(i)]: moments for i, moments in saved["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}


def _does_not_fit(path: Path) -> UserError:
    return UserError(f"checkpoint {path}: its optimizer state does not fit this ControlNet's parameters (made by "
                     "another --architecture or another version of controlnet); start from its weights with --init")


def save_checkpoint(out: Path, step: int, position: int, controlnet: torch.nn.Module,
                    decoder: dict[str, torch.nn.Parameter], optimizer: Any, lr_scheduler: Any,
                    config: TrainConfig, scaler: Any = None) -> list[Path]:
    """Write OUT/checkpoints/step-N atomically, then drop the oldest beyond ``config.keep``; the kept ones."""
    from safetensors.torch import save_file

    from controlnet.fileio import atomic_path
    from controlnet.train.flow import save_trained

    path = out / "checkpoints" / f"step-{step:06d}"
    unlocked = bool(decoder) and any(p.requires_grad for p in decoder.values())
    state = {
        "version": STATE_VERSION,
        "step": step,
        "position": position,  # samples of the stream consumed (all processes)
        "optimizer": optimizer_state_by_name(optimizer, trainable_parameters(controlnet, decoder)),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "config": config.to_dict(),
        "decoder_unlocked": unlocked,
    }
    try:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_trained(controlnet, tmp / "controlnet")
            if unlocked:
                save_file({k: v.detach().to("cpu").contiguous() for k, v in decoder.items()}, str(tmp / DECODER_FILE))
            torch.save(state, tmp / STATE_FILE)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        raise UserError(f"writing checkpoint {path} failed ({err}); the earlier checkpoints are intact: fix the "
                        "cause (disk space?) and rerun with --resume latest") from None
    kept = list_checkpoints(out)
    if config.keep:
        for old in kept[: -config.keep]:
            doomed = old.with_name(f".{old.name}.deleting")
            os.replace(old, doomed)  # gone from the list at once, even if removal is interrupted
            shutil.rmtree(doomed, ignore_errors=True)
        kept = kept[-config.keep :]
    return kept


def load_checkpoint(path: Path, controlnet: torch.nn.Module, decoder: dict[str, torch.nn.Parameter],
                    optimizer: Any, lr_scheduler: Any, config: TrainConfig, scaler: Any = None) -> tuple[int, int]:
    """Restore a checkpoint in place; returns (step, stream position)."""
    from safetensors.torch import load_file

    from controlnet.checkpoints import WEIGHTS_NAME

    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        weights = load_file(str(path / "controlnet" / WEIGHTS_NAME))
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise UserError(f"cannot read checkpoint {path} ({str(err).splitlines()[0]}); pass another one") from None
    try:
        controlnet.load_state_dict(weights, strict=True)
    except RuntimeError:
        raise UserError(f"checkpoint {path} holds a ControlNet of another shape than this base's; "
                        "resume with the base it was trained on") from None
    if state.get("decoder_unlocked"):
        if not decoder:
            raise UserError(f"checkpoint {path} trained the base's decoder; resume with --unlock-decoder-after")
        saved = load_file(str(path / DECODER_FILE))
        with torch.no_grad():
            for name, p in decoder.items():
                p.copy_(saved[name])
    load_optimizer_state(optimizer, state["optimizer"], trainable_parameters(controlnet, decoder), path,
                         version=int(state.get("version", 1)))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    saved_config = state.get("config", {})
    changed = [k for k in SAME_ON_RESUME if k in saved_config and saved_config[k] != config.to_dict()[k]]
    if changed:
        warnings.warn(f"resuming with other settings than the checkpoint's ({', '.join(changed)}); the run will not "
                      "match an uninterrupted one", stacklevel=3)
    return int(state["step"]), int(state["position"])
