"""On-disk caches of what the locked models compute from the training data: VAE latents, text embeddings and
conditions at the training resolution.

The paper's recipe keeps the VAE and the text encoder locked, so their outputs for a given image or prompt never
change during training. Computing them once lets a training step run only the UNet and the ControlNet (see
``benchmarks/training.py`` for what that saves).

**Keys.** Every entry's file name is a SHA-256 over

* the *content*: the bytes of the image file (never its path or modification time), or the prompt's text;
* the *model identity*: a digest of the VAE's (or the text encoders' and tokenizers') weights and configs,
  :func:`module_digest` / :func:`tokenizer_digest`;
* the *preprocessing*: the resolution, the horizontal flip, the annotator's name, parameters and output on a
  fixed probe picture (:func:`behaviour_digest`), and :data:`CACHE_VERSION`.

Change any of these and the key changes, so the entry is recomputed; a stale entry is simply never read again
(delete the cache folder to reclaim its space). Entries are written atomically (temporary file + rename), so a
killed run leaves no half-written entry and the processes of a distributed run may fill one cache together.

**Layout** (``xx`` = the key's first two hex digits, to keep folders small)::

    CACHE/latents/xx/KEY.safetensors     {"params": (2C, h, w)} the VAE's latent distribution (mean and
                                         log-variance: diffusers' DiagonalGaussianDistribution.parameters);
                                         a training step samples it, as the original's encode_first_stage does;
                                         for Flux, SD3 and Qwen-Image ControlNets, the conditions' too
    CACHE/text/xx/KEY.safetensors        {"hidden": (L, D)} and, for SDXL, Flux, SD3, {"pooled": (D2,)};
                                         Qwen-Image: the prompt's own L tokens, unpadded
    CACHE/conditions/xx/KEY.png          the condition at the training resolution, RGB uint8
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

import numpy as np
import torch
from PIL import Image

from controlnet.errors import UserError
from controlnet.fileio import atomic_write_bytes
from controlnet.images import save_png

# Bump when the meaning of an entry changes (preprocessing, stored fields): every old entry is then ignored.
CACHE_VERSION = 1

KINDS = {"latents": ".safetensors", "text": ".safetensors", "conditions": ".png"}

# Bytes read at a time when hashing files.
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (its content hash). Raises OSError if it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def entry_key(*parts: Any) -> str:
    """The cache key of an entry: SHA-256 over :data:`CACHE_VERSION` and ``parts`` (JSON-encoded)."""
    payload = json.dumps([CACHE_VERSION, *parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def module_digest(*modules: torch.nn.Module | None, exclude: Collection[str] = ()) -> str:
    """A digest of the weights (names, dtypes, shapes, bytes) and configs of ``modules``: a model's identity.

    Hashes the tensors themselves, so the same weights loaded from .bin, .safetensors or fp16 files cast to the
    same dtype give the same digest, and any changed weight gives another. State-dict entries named in
    ``exclude`` are left out.
    """
    exclude = set(exclude)
    digest = hashlib.sha256()
    for module in modules:
        if module is None:
            digest.update(b"<none>")
            continue
        config = getattr(module, "config", None)
        if config is not None:
            as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            as_dict = {k: v for k, v in as_dict.items() if not k.startswith("_")}  # e.g. _name_or_path
            digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode("utf-8"))
        for name, tensor in module.state_dict().items():
            if name in exclude:
                continue
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode("utf-8"))
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_digest(*tokenizers: Any) -> str:
    """A digest of tokenizers' vocabularies, maximum lengths and classes."""
    digest = hashlib.sha256()
    for tok in tokenizers:
        if tok is None:
            digest.update(b"<none>")
            continue
        digest.update(type(tok).__name__.encode("utf-8"))
        digest.update(str(getattr(tok, "model_max_length", "")).encode("utf-8"))
        digest.update(json.dumps(tok.get_vocab(), sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


@dataclass
class CacheStats:
    """What a preparation pass found in the cache and what it had to compute (summed over processes)."""

    latents_encoded: int = 0  # VAE encodings computed (one per image and flip)
    latents_cached: int = 0
    prompts_encoded: int = 0  # text encoder calls (one per distinct prompt, incl. the empty one)
    prompts_cached: int = 0
    conditions_made: int = 0  # conditions resized (or annotated) and stored
    conditions_cached: int = 0
    condition_latents_encoded: int = 0  # VAE encodings of conditions (Flux, SD3: one per condition and flip)
    condition_latents_cached: int = 0

    def __add__(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def total(cls, parts: Iterable["CacheStats"]) -> "CacheStats":
        out = cls()
        for part in parts:
            out = out + part
        return out


class CacheStore:
    """The cache folder: one file per entry, addressed by kind ("latents", "text", "conditions") and key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown cache kind {kind!r}; one of {sorted(KINDS)}")
        return self.root / kind / key[:2] / f"{key}{KINDS[kind]}"

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()

    def save_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store float tensors (on CPU, contiguous) under ``kind``/``key``, atomically."""
        from safetensors.torch import save

        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        path = self.path(kind, key)
        try:
            atomic_write_bytes(path, save(data))
        except OSError as err:  # nothing is left: atomic_write_bytes removes its temporary file
            raise UserError(f"{path}: cannot write the cache entry ({err.strerror or err}); check the free space "
                            "and permissions of the cache folder (--cache-dir)") from None

    def load_tensors(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path(kind, key)))

    def save_condition(self, key: str, image: np.ndarray) -> None:
        """Store a ``(H, W, 3)`` uint8 condition as a PNG, atomically (a failed write: a one-line UserError)."""
        save_png(self.path("conditions", key), np.ascontiguousarray(image))

    def load_condition(self, key: str) -> np.ndarray:
        """The stored condition, ``(H, W, 3)`` uint8."""
        with open(self.path("conditions", key), "rb") as f:
            data = f.read()
        return np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # writable (torch.from_numpy)


def bound_annotator(name: str, params: dict[str, Any]) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """The annotator ``name`` bound to ``params`` (completed with its defaults), and its identity for the cache:
    the name, the parameters and :func:`behaviour_digest` (so a changed annotator never reads stale conditions)."""
    from controlnet import annotators

    annotator = annotators.get(name)
    resolved = annotator.resolve(dict(params))

    def annotate(image: np.ndarray) -> np.ndarray:
        return annotator(image, **resolved)

    return annotate, entry_key("annotator", name, resolved, behaviour_digest(annotate))


# The probe of behaviour_digest: a 128 px picture with flat regions, edges, a gradient and a textured patch.
PROBE_SIZE = 128


def probe_image(size: int = PROBE_SIZE) -> np.ndarray:
    """A fixed (size, size, 3) uint8 picture: a gradient background, a bright disk, a dark square, a noise patch."""
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.float64) * (255.0 / (2 * size))
    image[(x - size * 0.35) ** 2 + (y - size * 0.4) ** 2 < (size * 0.2) ** 2] = (230, 60, 40)
    image[size // 2: size * 7 // 8, size // 2: size * 7 // 8] = (20, 40, 160)
    rng = np.random.default_rng(0)
    image[size // 8: size // 4, size * 5 // 8: size * 7 // 8] = rng.integers(0, 256, (size // 8, size // 4, 3))
    return image.round().astype(np.uint8)


def behaviour_digest(annotate: Callable[[np.ndarray], np.ndarray]) -> str:
    """A digest of what ``annotate`` makes of :func:`probe_image`: a change to the annotator's code (or to the
    weights it loads) that changes its output changes the cached conditions' keys, where its name and parameters
    alone would not. An annotator that cannot annotate the probe gets "unprobed" (its name and parameters key it)."""
    try:
        out = np.ascontiguousarray(annotate(probe_image()))
    except Exception:  # noqa: BLE001 - e.g. a detector that needs larger pictures; the data itself will tell
        return "unprobed"
    return hashlib.sha256(str((out.shape, out.dtype.str)).encode() + out.tobytes()).hexdigest()[:16]
