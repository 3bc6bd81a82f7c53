"""Deterministic stand-in weights for the annotator fixtures (tests/fixtures/annotators/README.md, "Files in
every folder"): the state dict the stored reference outputs were computed with, rebuilt bit for bit.

    from fixture_weights import stand_in_weights, state_dict_digest, FIXTURES
    sd = stand_in_weights(FIXTURES / "hed" / "keys.json", conv_gain=1.0)
    assert state_dict_digest(sd) == metadata["weights_sha256"]
    path = write_released_weights("pidinet", tmp_path)  # tmp_path/table5_pidinet.pth, as the release stores it

Every tensor has its own generator, seeded with the CRC-32 of its key, and is one ``torch.randn`` draw ``r``
scaled by the first matching rule: ``num_batches_tracked`` → 0 (int64); BatchNorm weight/bias/running_mean/
running_var → 1 + 0.1r / 0.1r / 0.1r / 1 + 0.1|r|; a weight with >= 2 dims → r · conv_gain / sqrt(fan_in)
(fan_in = numel / shape[0]); a bias → 0.01r; anything else → 64r.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections import OrderedDict
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "annotators"
# The recipe's CONV_GAIN per fixture folder (README table): He gain for the deep plain OpenPose stacks.
CONV_GAINS = {
    "hed": 1.0, "pidinet": 1.0, "lineart": 1.0, "mlsd": 1.0,
    "openpose_body": math.sqrt(2.0), "openpose_hand": math.sqrt(2.0),
}
# Annotators whose network has a fixture folder: annotator → (fixture folder, released file name).
ANNOTATOR_FIXTURES = {
    "hed": ("hed", "ControlNetHED.pth"), "pidinet": ("pidinet", "table5_pidinet.pth"),
    "lineart": ("lineart", "sk_model.pth"), "lineart_coarse": ("lineart", "sk_model2.pth"),
    "mlsd": ("mlsd", "mlsd_large_512_fp32.pth"),
}


def _stand_in(key: str, shape: list[int], batchnorm: bool, conv_gain: float) -> torch.Tensor:
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    r = torch.randn(shape, generator=generator, dtype=torch.float32)
    leaf = key.rpartition(".")[2]
    if batchnorm:
        scaled = {"weight": 1.0 + 0.1 * r, "bias": 0.1 * r, "running_mean": 0.1 * r, "running_var": 1.0 + 0.1 * r.abs()}
        if leaf not in scaled:
            raise ValueError(f"unexpected BatchNorm tensor {key}")
        return scaled[leaf]
    if key.endswith("weight") and len(shape) >= 2:
        fan_in = r.numel() // shape[0]
        return r * (conv_gain / math.sqrt(fan_in))
    if key.endswith("bias"):
        return r * 0.01
    return r * 64.0


def stand_in_weights(keys_json_path: str | Path, conv_gain: float) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` for every key of ``keys.json`` (``{key: shape}``), in the file's order."""
    keys = json.loads(Path(keys_json_path).read_text())
    # A BatchNorm module is recognised by its running_mean entry.
    batchnorms = {k.rpartition(".")[0] for k in keys if k.endswith(".running_mean")}
    return {k: _stand_in(k, list(shape), k.rpartition(".")[0] in batchnorms, conv_gain) for k, shape in keys.items()}


def fixture_weights(name: str) -> dict[str, torch.Tensor]:
    """The stand-in state dict of fixture folder ``name`` (hed, pidinet, ..., openpose_hand)."""
    return stand_in_weights(FIXTURES / name / "keys.json", CONV_GAINS[name])


def released_object(fixture: str, state: dict[str, torch.Tensor]) -> dict:
    """What ``torch.load`` returns for the released file of fixture ``fixture`` holding ``state`` (README, per
    network): PiDiNet ``{'epoch', 'state_dict'}`` with DataParallel's ``module.`` prefix; OpenPose flat layer
    names (the key without its first component); the others the state dict itself."""
    if fixture == "pidinet":
        return {"epoch": 19, "state_dict": OrderedDict(("module." + k, v) for k, v in state.items())}
    if fixture.startswith("openpose"):
        return OrderedDict((k.split(".", 1)[1], v) for k, v in state.items())
    return OrderedDict(state)


def write_released_weights(annotator: str, folder: str | Path) -> Path:
    """Stand-in weights of ``annotator`` (a key of :data:`ANNOTATOR_FIXTURES`) saved in ``folder`` under the
    released file's name and layout; returns the file."""
    fixture, filename = ANNOTATOR_FIXTURES[annotator]
    path = Path(folder) / filename
    torch.save(released_object(fixture, fixture_weights(fixture)), path)
    return path


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over key, dtype string, JSON shape and raw bytes, in order (the fixtures' ``weights_sha256``)."""
    digest = hashlib.sha256()
    for key, value in state_dict.items():
        digest.update(key.encode())
        digest.update(str(value.dtype).encode())
        digest.update(json.dumps(list(value.shape)).encode())
        digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_io(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an ``io*.safetensors`` fixture file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
