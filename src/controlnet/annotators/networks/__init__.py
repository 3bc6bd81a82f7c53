"""The ControlNet 1.1 annotator networks, and loading their released weight files as they are.

Each network is described by a :class:`NetworkSpec`: how to build it, the file it ships as in the
``lllyasviel/Annotators`` hub repository, and how that file's layout maps onto the model's state dict (the
annotator's own loading transform). :func:`load_network` reads a file safely (``weights_only``), recognises a
file of another network and refuses it in one line naming both, loads strictly, and keeps one model per process,
weights file and device (the cache of :mod:`controlnet.annotators.loader`)::

    from controlnet.annotators.networks import load_network
    model = load_network("pidinet", "table5_pidinet.pth")   # PiDiNet in eval mode, on the CPU
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from controlnet.errors import UserError

if TYPE_CHECKING:  # torch is imported when a network is built, so listing annotators stays fast
    import torch
    from torch import nn

__all__ = ["NETWORKS", "NetworkSpec", "identify", "load_network", "to_model_state_dict"]


def _plain(obj: dict[str, Any]) -> dict[str, Any]:
    """HED, lineart, M-LSD: the file is the state dict itself."""
    return dict(obj)


def _pidinet(obj: dict[str, Any]) -> dict[str, Any]:
    """PiDiNet: ``{'epoch', 'state_dict'}`` with DataParallel's ``module.`` prefix (annotator/pidinet/__init__.py:
    ``{k.replace('module.', ''): v for k, v in ckpt['state_dict'].items()}``); a flat dict (as a .safetensors
    conversion stores it) is read the same way."""
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    return {k.replace("module.", ""): v for k, v in state.items()}


def _openpose_body(obj: dict[str, Any]) -> dict[str, Any]:
    """OpenPose body: flat layer keys (``conv1_1.weight``) onto the model's (``model0.conv1_1.weight``), as
    annotator/openpose/util.py ``transfer`` maps them."""
    from controlnet.annotators.networks.openpose import body_state_dict

    return body_state_dict(obj)


def _openpose_hand(obj: dict[str, Any]) -> dict[str, Any]:
    """OpenPose hand: flat layer keys onto the model's, as ``transfer`` maps them."""
    from controlnet.annotators.networks.openpose import hand_state_dict

    return hand_state_dict(obj)


@dataclass(frozen=True)
class NetworkSpec:
    """One annotator network: ``build()`` makes it, ``unwrap`` maps its released file's object to the model's state
    dict, ``filename`` is the released file in ``lllyasviel/Annotators`` (``None``: not published there) and
    ``kind`` is what :func:`identify` calls a file of this network."""

    name: str
    title: str
    filename: str | None
    kind: str
    model_class: str  # "module.Class" inside this package
    unwrap: Callable[[dict[str, Any]], dict[str, Any]] = _plain

    def build(self) -> nn.Module:
        """A new, randomly initialised network."""
        module, cls = self.model_class.rsplit(".", 1)
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()


HED_FILE = "a HED file (ControlNetHED.pth)"
PIDINET_FILE = "a PiDiNet file (table5_pidinet.pth)"
LINEART_FILE = "a lineart file (sk_model.pth / sk_model2.pth)"  # both files share one layout
MLSD_LARGE_FILE = "an M-LSD large file (mlsd_large_512_fp32.pth)"
MLSD_TINY_FILE = "an M-LSD tiny file (mlsd_tiny_512_fp32.pth)"
OPENPOSE_BODY_FILE = "an OpenPose body file (body_pose_model.pth)"
OPENPOSE_HAND_FILE = "an OpenPose hand file (hand_pose_model.pth)"

NETWORKS: dict[str, NetworkSpec] = {
    spec.name: spec
    for spec in (
        NetworkSpec("hed", "HED", "ControlNetHED.pth", HED_FILE, "hed.ControlNetHED"),
        NetworkSpec("pidinet", "PiDiNet", "table5_pidinet.pth", PIDINET_FILE, "pidinet.PiDiNet", _pidinet),
        NetworkSpec("lineart", "lineart (realistic)", "sk_model.pth", LINEART_FILE, "lineart.LineartGenerator"),
        NetworkSpec("lineart_coarse", "lineart (coarse)", "sk_model2.pth", LINEART_FILE, "lineart.LineartGenerator"),
        NetworkSpec("mlsd", "M-LSD large", "mlsd_large_512_fp32.pth", MLSD_LARGE_FILE, "mlsd.MLSDLarge"),
        # Published in github.com/lhwcv/mlsd_pytorch (models/mlsd_tiny_512_fp32.pth), not in lllyasviel/Annotators.
        NetworkSpec("mlsd_tiny", "M-LSD tiny", None, MLSD_TINY_FILE, "mlsd.MLSDTiny"),
        NetworkSpec("openpose_body", "OpenPose body", "body_pose_model.pth", OPENPOSE_BODY_FILE,
                    "openpose.BodyPoseNet", _openpose_body),
        NetworkSpec("openpose_hand", "OpenPose hand", "hand_pose_model.pth", OPENPOSE_HAND_FILE,
                    "openpose.HandPoseNet", _openpose_hand),
    )
}

# A key that only one kind of released file holds (after the PiDiNet unwrap, which leaves other layouts as they
# are), to name a wrong file in an error. The first match wins.
_FINGERPRINTS: tuple[tuple[str, str], ...] = (
    ("block1.projection.weight", HED_FILE),
    ("moduleVggOne.0.weight", "a ControlNet 1.0 HED file (network-bsds500.pth)"),
    ("init_block.weight", PIDINET_FILE),
    ("model0.1.weight", LINEART_FILE),
    ("block23.conv3.weight", MLSD_LARGE_FILE),
    ("block16.conv3.weight", MLSD_TINY_FILE),
    ("Mconv7_stage6_L1.weight", OPENPOSE_BODY_FILE),
    ("Mconv7_stage6.weight", OPENPOSE_HAND_FILE),
    ("control_model.input_hint_block.0.weight", "a ControlNet checkpoint"),
    ("controlnet_cond_embedding.conv_in.weight", "a ControlNet checkpoint"),
)


def identify(obj: dict[str, Any]) -> str | None:
    """What a loaded weights file is (``"a PiDiNet file (table5_pidinet.pth)"``), or ``None`` if unknown."""
    keys = set(_pidinet(obj)) if isinstance(obj, dict) else set()
    for key, what in _FINGERPRINTS:
        if key in keys:
            return what
    return None


def to_model_state_dict(spec: NetworkSpec, obj: dict[str, Any], model: nn.Module, source: str) -> dict[str, Any]:
    """The released file's object mapped onto ``model``'s state dict exactly: same keys, same shapes (float
    tensors as float32). Anything else is a one-line :class:`UserError` naming the file and the network."""
    import torch

    what = identify(obj)
    expected_name = f"{spec.title} weights" + (f" ({spec.filename})" if spec.filename else "")
    if what is not None and what != spec.kind:
        raise UserError(f"{source}: this is {what}, not the {expected_name} that {spec.name} loads; "
                        "pass the right file with --weights")
    try:
        state = spec.unwrap(obj)
    except (AttributeError, TypeError):
        state = {}
    expected = model.state_dict()
    for key, value in expected.items():  # BatchNorm counters are optional (older torch did not save them)
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        counts = ((missing, "missing"), (unexpected, "unexpected"))
        detail = ", ".join(f"{len(keys)} {label} (e.g. {keys[0]})" for keys, label in counts if keys)
        raise UserError(f"{source}: not {expected_name} for {spec.name}: {detail}")
    loaded = {}
    for key, want in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(want.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(f"{source}: not {expected_name} for {spec.name}: {key} is {shape}, "
                            f"expected {tuple(want.shape)}")
        loaded[key] = value.to(want.dtype)
    return loaded


def load_network(name: str, path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Network ``name`` (a key of :data:`NETWORKS`) with the weights of the released file ``path`` (.pth read with
    ``weights_only=True``, or .safetensors), in eval mode on ``device``; cached per process
    (:func:`controlnet.annotators.loader.cached`)."""
    from controlnet.annotators.loader import cache_key, cached

    if name not in NETWORKS:
        raise ValueError(f"unknown annotator network {name!r}; choose one of {', '.join(NETWORKS)}")
    path = Path(path)
    return cached(("network", name, *cache_key(path), str(device)), lambda: _build(NETWORKS[name], path, device))


def _build(spec: NetworkSpec, path: Path, device: str | torch.device) -> nn.Module:
    from controlnet.safe_io import read_state_dict

    obj = read_state_dict(path)  # missing, unreadable or code-carrying files: one-line UserError
    model = spec.build()
    model.load_state_dict(to_model_state_dict(spec, obj, model, str(path)), strict=True)
    return model.to(device).eval().requires_grad_(False)
