"""Training datasets: manifests of (image, condition, prompt) rows, their preparation into cached entries, and the
dataset a training step reads.

Layouts (``DATA`` is a folder, or the manifest file itself):

* **fill50k** (the original tutorial's): ``DATA/prompt.json``, one JSON object per line,
  ``{"source": "source/0.png", "target": "target/0.png", "prompt": "..."}``; source = condition, target = image.
* **diffusers** (as diffusers' ``train_controlnet.py`` reads an image folder): ``DATA/metadata.jsonl`` with
  ``{"image": ..., "conditioning_image": ..., "text": ...}``.
* Either one with an annotator (``--annotator canny``): the condition column may be absent; conditions are made
  from the images by the annotator and cached.

Paths in a manifest are relative to the manifest's folder. A row with bad JSON, a missing column or a missing or
unreadable file is counted and skipped (``strict=True`` fails instead, naming the row).

Preprocessing: the image is scaled to cover ``R`` x ``R`` and centre-cropped (the same rule as the
pipeline's conditions, :func:`controlnet.conditions.resize_cover`), then mapped to ``[-1, 1]``; the condition gets
the same transform and is mapped to ``[0, 1]``. A condition whose size differs from its image's is first resized
to the image's size, with a warning. ``hflip``: a sample is mirrored with probability 1/2, the image and its
condition together; the cache holds the latents of both orientations (a flipped latent is not the latent of the
flipped image) and the condition once (mirroring a condition is exact). For a ControlNet that takes the
condition's VAE latents (Flux, SD3) the cache also holds the condition's VAE posterior in both orientations.

Randomness is a function of (seed, position in the sample stream), never of a global RNG: sample ``p`` of the
stream is example ``order[p]`` of epoch ``p // N`` (a seeded permutation per epoch), and its empty-prompt draw,
flip, timestep, latent sample and noise come from a generator seeded with (seed, p). So a resumed run sees
exactly the samples an uninterrupted one would, whatever the number of processes or data-loader workers.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from controlnet.conditions import resize_cover
from controlnet.data.cache import CacheStats, CacheStore, entry_key, sha256_file
from controlnet.errors import UserError
from controlnet.images import load_image

MANIFEST_NAMES = ("prompt.json", "metadata.jsonl")
# layout → (image column, condition column, prompt column)
COLUMNS = {
    "fill50k": ("target", "source", "prompt"),
    "diffusers": ("image", "conditioning_image", "text"),
}
EMPTY_PROMPT = ""  # the paper (Sec. 3.3) replaces prompts by the empty string
# How many bad rows a message names before "and N more".
_SHOW = 5


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class Example:
    """One row of a manifest: the image (target), its condition (``None`` when an annotator makes it), the prompt."""

    image: Path
    condition: Path | None
    prompt: str
    line: int  # 1-based line in the manifest


@dataclass(frozen=True)
class SkippedRow:
    """A manifest row that was skipped, and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class Manifest:
    """The rows of a dataset that passed the checks, and the ones that did not."""

    path: Path
    layout: str
    examples: list[Example]
    skipped: list[SkippedRow] = field(default_factory=list)


def describe_skipped(skipped: Sequence[SkippedRow], path: Path | str) -> str:
    """``N rows of PATH skipped (line 3: ..., ...)``: one line for a warning or an error."""
    shown = "; ".join(str(s) for s in skipped[:_SHOW])
    more = f"; and {len(skipped) - _SHOW} more" if len(skipped) > _SHOW else ""
    return f"{len(skipped)} row(s) of {path} skipped ({shown}{more})"


def find_manifest(data: str | Path) -> Path:
    """The manifest file of ``data`` (a folder holding prompt.json or metadata.jsonl, or the file itself)."""
    data = Path(data).expanduser()
    if data.is_file():
        return data
    if data.exists() and not data.is_dir():  # a FIFO or a device would block the read or never end
        raise UserError(f"--data {data} is not a regular file (a FIFO, a device, ...); pass a folder or a manifest file")
    if not data.is_dir():
        raise UserError(f"--data {data} does not exist; pass a folder with prompt.json or metadata.jsonl")
    for name in MANIFEST_NAMES:
        if (data / name).is_file():
            return data / name
        if (data / name).exists():
            raise UserError(f"--data {data}: its {name} is not a regular file (a FIFO, a device, ...); make it one")
    raise UserError(
        f"--data {data} has no prompt.json (fill50k layout) or metadata.jsonl (image, conditioning_image, text); "
        "add one, or pass the manifest file itself"
    )


def _layout_of(row: dict[str, Any]) -> str | None:
    for layout, (image, _, prompt) in COLUMNS.items():
        if image in row and prompt in row:
            return layout
    return None


def read_manifest(data: str | Path, need_conditions: bool = True, strict: bool = False) -> Manifest:
    """Read and check a manifest (module docstring). ``need_conditions=False`` when an annotator makes them.

    Rows with bad JSON, missing columns or missing files are skipped and listed in ``Manifest.skipped``;
    with ``strict`` the first such row raises :class:`UserError`. No row left → :class:`UserError`.
    """
    path = find_manifest(data)
    root = path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the manifest {path} ({err}); pass a UTF-8 JSONL file") from None
    layout: str | None = None
    examples: list[Example] = []
    skipped: list[SkippedRow] = []

    def skip(line: int, reason: str) -> None:
        if strict:
            raise UserError(f"{path} line {line}: {reason} (--strict; drop the row or fix it)")
        skipped.append(SkippedRow(line, reason))

    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            skip(number, f"not JSON ({err.msg})")
            continue
        if not isinstance(row, dict):
            skip(number, "not a JSON object")
            continue
        row_layout = _layout_of(row)
        if layout is None and row_layout is not None:
            layout = row_layout
        if layout is None or row_layout != layout:
            want = " or ".join("/".join(c) for c in COLUMNS.values())
            skip(number, f"missing columns (want {want})")
            continue
        image_col, cond_col, prompt_col = COLUMNS[layout]
        prompt = row[prompt_col]
        if not isinstance(prompt, str):
            skip(number, f"{prompt_col!r} is not a string")
            continue
        image = root / str(row[image_col])
        if not image.is_file():
            skip(number, f"missing file {image}")
            continue
        condition: Path | None = None
        if need_conditions:
            if cond_col not in row:
                skip(number, f"no {cond_col!r} column (pass an annotator to make conditions from the images)")
                continue
            condition = root / str(row[cond_col])
            if not condition.is_file():
                skip(number, f"missing file {condition}")
                continue
        examples.append(Example(image, condition, prompt, number))
    if not examples:
        detail = f": {describe_skipped(skipped, path)}" if skipped else ""
        raise UserError(f"no usable rows in {path}{detail}")
    return Manifest(path, layout or "fill50k", examples, skipped)


# --------------------------------------------------------------------------- preprocessing


def load_rgb(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB (controlnet.images rules: EXIF, alpha on black, 16-bit by range)."""
    return load_image(path)


def to_resolution(image: np.ndarray, resolution: int) -> np.ndarray:
    """Scale ``image`` to cover ``resolution`` x ``resolution`` and cut the centre (the pipeline's rule)."""
    return resize_cover(image, resolution, resolution)


def match_size(condition: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """``condition`` resized to ``image_hw`` (H, W) when it differs (plain resize; the caller warns)."""
    import cv2

    h, w = image_hw
    if condition.shape[:2] == (h, w):
        return condition
    shrink = condition.shape[0] * condition.shape[1] > h * w
    return cv2.resize(condition, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(3, H, W)`` float in [-1, 1] (the VAE's input range)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0


def condition_to_tensor(condition: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(3, H, W)`` float in [0, 1] (the hint encoder's input range)."""
    return torch.from_numpy(np.ascontiguousarray(condition)).permute(2, 0, 1).float() / 255.0


# --------------------------------------------------------------------------- preparation (fills the caches)


@dataclass(frozen=True)
class PreparedExample:
    """An example whose latents, text embedding and condition are in the cache, by key."""

    index: int  # position in the manifest's examples
    prompt: str
    latent_keys: tuple[str, ...]  # (unflipped,) or (unflipped, flipped)
    text_key: str
    condition_key: str
    image: Path
    line: int
    condition_latent_keys: tuple[str, ...] = ()  # the condition's VAE posterior, as latent_keys; () when not cached


@dataclass
class Encoders:
    """What preparation needs from the locked models, and their identities (cache keys).

    ``encode_images``: ``(B, 3, R, R)`` in [-1, 1] → the VAE's latent distribution parameters ``(B, 2C, h, w)``.
    ``encode_prompts``: prompts → ``(hidden (N, L, D), pooled (N, D2) or None)``; ``hidden`` may be a list of
    each prompt's own ``(L_i, D)`` (Qwen-Image: the valid tokens, padded per batch by :func:`collate_samples`).
    ``annotate``: optional, ``(R, R, 3)`` uint8 image → ``(R, R, 3)`` uint8 condition.
    """

    encode_images: Callable[[torch.Tensor], torch.Tensor]
    encode_prompts: Callable[[list[str]], tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None]]
    vae_id: str
    text_id: str
    annotate: Callable[[np.ndarray], np.ndarray] | None = None
    annotator_id: str | None = None


@dataclass
class Preparation:
    """The result of :func:`prepare_examples`."""

    examples: list[PreparedExample]
    skipped: list[SkippedRow]
    stats: CacheStats
    resized: list[str]  # conditions resized to their image's size ("line N: WxH → WxH")
    empty_text_key: str


def text_key(text_id: str, prompt: str) -> str:
    return entry_key("text", text_id, prompt)


def prepare_examples(
    manifest: Manifest,
    store: CacheStore,
    encoders: Encoders,
    resolution: int,
    hflip: bool = False,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[list[Any]], list[Any]] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    condition_latents: bool = False,
) -> Preparation:
    """Make sure every example's latents (both orientations with ``hflip``), text embedding and condition (with
    ``condition_latents``, its VAE posteriors too: :func:`cache_condition_latents`) are in ``store``; compute only
    what is missing. Rows whose files cannot be decoded are skipped.

    With several processes, each prepares every ``world_size``-th example (starting at ``rank``) and ``gather``
    (e.g. ``accelerate.utils.gather_object``) collects the results, so all processes return the same lists.
    """
    from tqdm.auto import tqdm

    stats = CacheStats()
    records: list[tuple[int, Any]] = []  # (index, PreparedExample | SkippedRow)
    resized: list[str] = []
    pending: list[tuple[str, torch.Tensor]] = []  # (latent key, (3, R, R) image) to encode
    prompts_needed: set[str] = set()
    flips = (False, True) if hflip else (False,)

    mine = range(rank, len(manifest.examples), world_size)
    for index in tqdm(mine, desc="caching latents", disable=not progress, leave=False):
        ex = manifest.examples[index]
        try:
            image_hash = sha256_file(ex.image)
            cond_hash = sha256_file(ex.condition) if ex.condition is not None else None
        except OSError as err:
            records.append((index, SkippedRow(ex.line, f"unreadable file ({err.strerror or err})")))
            continue
        latent_keys = tuple(entry_key("latents", encoders.vae_id, image_hash, resolution, flip) for flip in flips)
        cond_key = (entry_key("condition-annotated", encoders.annotator_id, image_hash, resolution)
                    if ex.condition is None else entry_key("condition-file", cond_hash, image_hash, resolution))
        need_latents = [k for k in latent_keys if not store.has("latents", k)]
        need_condition = not store.has("conditions", cond_key)
        stats.latents_cached += len(latent_keys) - len(need_latents)
        stats.conditions_cached += 0 if need_condition else 1
        if need_latents or need_condition:
            try:
                image = load_rgb(ex.image)
                condition = load_rgb(ex.condition) if need_condition and ex.condition is not None else None
            except UserError as err:
                records.append((index, SkippedRow(ex.line, str(err))))
                continue
            target = to_resolution(image, resolution)  # (R, R, 3) uint8
            for key, flip in zip(latent_keys, flips):
                if key in need_latents:
                    pending.append((key, image_to_tensor(target[:, ::-1] if flip else target)))
            if need_condition:
                if condition is not None and condition.shape[:2] != image.shape[:2]:
                    resized.append(f"line {ex.line}: {condition.shape[1]}x{condition.shape[0]} → "
                                   f"{image.shape[1]}x{image.shape[0]}")
                store.save_condition(cond_key, _make_condition(condition, image, target, encoders, resolution))
                stats.conditions_made += 1
            if len(pending) >= batch_size:
                _encode_latents(pending, store, encoders, stats)
        cond_latent_keys = cache_condition_latents(store, encoders, cond_key, flips, stats) if condition_latents else ()
        prompts_needed.add(ex.prompt)
        records.append((index, PreparedExample(index, ex.prompt, latent_keys, text_key(encoders.text_id, ex.prompt),
                                               cond_key, ex.image, ex.line, cond_latent_keys)))
    _encode_latents(pending, store, encoders, stats)

    if rank == 0:
        prompts_needed.add(EMPTY_PROMPT)  # the empty prompt, once
    _cache_prompts(prompts_needed, store, encoders, stats, batch_size)

    if gather is not None and world_size > 1:
        records, stats, resized = _gathered(gather, records, stats, resized)
    records.sort(key=lambda r: r[0])
    prepared = [r for _, r in records if isinstance(r, PreparedExample)]
    skipped = [r for _, r in records if isinstance(r, SkippedRow)]
    return Preparation(prepared, skipped, stats, resized, text_key(encoders.text_id, EMPTY_PROMPT))


def _gathered(gather: Callable[[list[Any]], list[Any]], records: list[tuple[int, Any]], stats: CacheStats,
              resized: list[str]) -> tuple[list[tuple[int, Any]], CacheStats, list[str]]:
    """Every process's records, stats and resized conditions, collected by ``gather``."""
    gathered = gather([(records, stats, resized)])
    return ([r for part, _, _ in gathered for r in part], CacheStats.total(s for _, s, _ in gathered),
            [r for _, _, part in gathered for r in part])


def _encode_latents(pending: list[tuple[str, torch.Tensor]], store: CacheStore, encoders: Encoders,
                    stats: CacheStats) -> None:
    """Encode the queued ``(latent key, (3, R, R) image)`` pairs in one VAE batch, store them, empty the queue."""
    if not pending:
        return
    batch = torch.stack([x for _, x in pending])  # (B, 3, R, R)
    with torch.no_grad():
        params = encoders.encode_images(batch)  # (B, 2C, h, w)
    for (key, _), p in zip(pending, params):
        store.save_tensors("latents", key, {"params": p.float()})
    stats.latents_encoded += len(pending)
    pending.clear()


def condition_latents_key(vae_id: str, condition_key: str, flip: bool) -> str:
    """The cache key of a stored condition's VAE posterior: the VAE, the condition's own key (its content, image,
    annotator and resolution) and the orientation."""
    return entry_key("condition-latents", vae_id, condition_key, flip)


def cache_condition_latents(store: CacheStore, encoders: Encoders, condition_key: str, flips: Sequence[bool],
                            stats: CacheStats) -> tuple[str, ...]:
    """The keys of the VAE posteriors ``(2C, h, w)`` of the stored condition ``condition_key``, one per orientation
    in ``flips``, encoded where missing. The VAE gets the condition as the uncached training path gives it
    (``condition_to_tensor(c) * 2 - 1``), one image per call: a batched encode differs in the last bits."""
    keys = tuple(condition_latents_key(encoders.vae_id, condition_key, flip) for flip in flips)
    missing = [(key, flip) for key, flip in zip(keys, flips) if not store.has("latents", key)]
    stats.condition_latents_cached += len(keys) - len(missing)
    if missing:
        condition = store.load_condition(condition_key)  # (R, R, 3) uint8, what the training step reads
        for key, flip in missing:
            pixels = condition_to_tensor(condition[:, ::-1] if flip else condition)[None] * 2 - 1  # (1, 3, R, R)
            with torch.no_grad():
                params = encoders.encode_images(pixels)  # (1, 2C, h, w)
            store.save_tensors("latents", key, {"params": params[0].float()})
            stats.condition_latents_encoded += 1
    return keys


def _make_condition(condition: np.ndarray | None, image: np.ndarray, target: np.ndarray, encoders: Encoders,
                    resolution: int) -> np.ndarray:
    """The condition at the training resolution: the file's, resized to its image first when their sizes differ, or
    (no file) made by the annotator from the resized image ``target``."""
    if condition is None:
        return np.asarray(encoders.annotate(target), dtype=np.uint8)  # type: ignore[misc]
    return to_resolution(match_size(condition, image.shape[:2]), resolution)


def _cache_prompts(prompts: set[str], store: CacheStore, encoders: Encoders, stats: CacheStats,
                   batch_size: int) -> None:
    """One text encoding per distinct prompt missing from the cache, in batches of ``batch_size``."""
    missing = sorted(p for p in prompts if not store.has("text", text_key(encoders.text_id, p)))
    stats.prompts_cached += len(prompts) - len(missing)
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        with torch.no_grad():
            hidden, pooled = encoders.encode_prompts(chunk)  # (N, L, D) or N x (L_i, D), (N, D2) | None
        for i, prompt in enumerate(chunk):
            entry = {"hidden": hidden[i].float()}
            if pooled is not None:
                entry["pooled"] = pooled[i].float()
            store.save_tensors("text", text_key(encoders.text_id, prompt), entry)
        stats.prompts_encoded += len(chunk)


# --------------------------------------------------------------------------- the sample stream


def _seed_of(*parts: Any) -> int:
    """A 63-bit generator seed derived from ``parts`` (SHA-256: nearby positions give unrelated streams)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The seeded permutation of ``n`` examples used in ``epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(seed, "order", epoch)))


@dataclass(frozen=True)
class Draws:
    """The random choices for one sample of the stream."""

    empty_prompt: bool
    flip: bool
    timestep: int
    generator: torch.Generator  # continues with the latent sample and the noise


def sample_draws(seed: int, position: int, empty_prompt_prob: float, hflip: bool, num_timesteps: int) -> Draws:
    """The draws of sample ``position``: empty prompt with probability ``empty_prompt_prob``, flip with 1/2
    (when ``hflip``), timestep uniform in ``[0, num_timesteps)``. Always drawn in this order, all three."""
    g = torch.Generator().manual_seed(_seed_of(seed, "sample", position))
    empty = torch.rand((), generator=g).item() < empty_prompt_prob
    flip = torch.rand((), generator=g).item() < 0.5
    timestep = int(torch.randint(0, num_timesteps, (), generator=g))
    return Draws(bool(empty), bool(hflip and flip), timestep, g)


class TrainDataset(torch.utils.data.Dataset):
    """Training samples by position in the stream (module docstring), read from the caches.

    ``dataset[p]`` is a dict of tensors: ``latents`` (C, h, w) sampled from the cached distribution, less
    ``shift_factor``, times the VAE's ``scaling_factor`` (with ``latent_std``: over it, per channel; Qwen-Image);
    ``noise`` (C, h, w); ``timesteps`` (); ``hidden`` (L, D) (and ``pooled`` (D2,) for SDXL, Flux, SD3; Qwen-Image:
    the prompt's own L tokens) — the empty prompt's when ``empty``; ``condition`` (3, R, R) in [0, 1], or, for an
    example with cached condition latents, ``condition_params`` (2C, h, w), the condition's VAE posterior (the
    objective samples it); ``empty`` (); and ``position`` ().
    """

    def __init__(self, examples: Sequence[PreparedExample], store: CacheStore, seed: int, empty_prompt_prob: float,
                 hflip: bool, num_timesteps: int, scaling_factor: float, empty_text_key: str,
                 shift_factor: float | torch.Tensor = 0.0, latent_std: torch.Tensor | None = None):
        if not examples:
            raise UserError("the dataset is empty after skipping bad rows; fix the manifest")
        self.examples = list(examples)
        self.store = store
        self.seed = seed
        self.empty_prompt_prob = empty_prompt_prob
        self.hflip = hflip
        self.num_timesteps = num_timesteps
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        self.latent_std = latent_std
        self.empty_text_key = empty_text_key
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def example_at(self, position: int) -> PreparedExample:
        """The example that sample ``position`` of the stream shows."""
        n = len(self.examples)
        epoch, offset = divmod(position, n)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.seed, epoch, n)}  # one epoch at a time
        return self.examples[int(self._orders[epoch][offset])]

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        position = int(position)
        draws = sample_draws(self.seed, position, self.empty_prompt_prob, self.hflip, self.num_timesteps)
        ex = self.example_at(position)
        params = self.store.load_tensors("latents", ex.latent_keys[1 if draws.flip else 0])["params"]  # (2C, h, w)
        z = DiagonalGaussianDistribution(params[None]).sample(generator=draws.generator)[0]  # (C, h, w)
        if self.latent_std is not None:
            latents = (z - self.shift_factor) / self.latent_std
        else:
            latents = (z - self.shift_factor) * self.scaling_factor
        noise = torch.randn(latents.shape, generator=draws.generator)
        text = self.store.load_tensors("text", self.empty_text_key if draws.empty_prompt else ex.text_key)
        item = {
            "latents": latents,
            "noise": noise,
            "timesteps": torch.tensor(draws.timestep, dtype=torch.long),
            "hidden": text["hidden"],
            "empty": torch.tensor(draws.empty_prompt),
            "position": torch.tensor(position, dtype=torch.long),
        }
        if ex.condition_latent_keys:
            key = ex.condition_latent_keys[1 if draws.flip else 0]
            item["condition_params"] = self.store.load_tensors("latents", key)["params"]  # (2C, h, w)
        else:
            condition = self.store.load_condition(ex.condition_key)  # (R, R, 3) uint8
            item["condition"] = condition_to_tensor(condition[:, ::-1] if draws.flip else condition)
        if "pooled" in text:
            item["pooled"] = text["pooled"]
        return item


def collate_samples(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The DataLoader's batch of :class:`TrainDataset` samples: ``default_collate``, except that text embeddings of
    different lengths (Qwen-Image's, cached unpadded) are zero-padded at the end to the longest, with
    ``hidden_mask`` (B, T), 1 for tokens, 0 for padding (as Qwen-Image's pipeline pads a batch of prompts)."""
    lengths = [item["hidden"].shape[0] for item in items]
    if len(set(lengths)) == 1:
        return torch.utils.data.default_collate(items)
    longest = max(lengths)
    padded = [{**item, "hidden": torch.nn.functional.pad(item["hidden"], (0, 0, 0, longest - n)),
               "hidden_mask": (torch.arange(longest) < n).long()} for item, n in zip(items, lengths)]
    return torch.utils.data.default_collate(padded)


class StreamBatches(torch.utils.data.Sampler):
    """The positions of this process's next ``count`` micro-batches, the first starting at ``first_position``.

    Global micro-batch ``j`` covers the positions ``first_position + j*G ... + (j+1)*G - 1`` with
    ``G = batch_size * world_size``; process ``rank`` takes its ``batch_size`` consecutive positions of it. That is
    the data sharding of a distributed run, and a single process with batch ``G`` sees the same samples.
    """

    def __init__(self, batch_size: int, first_position: int, count: int, rank: int = 0, world_size: int = 1):
        self.batch_size, self.first_position, self.count = batch_size, first_position, count
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        g = self.batch_size * self.world_size
        for j in range(self.count):
            first = self.first_position + j * g + self.rank * self.batch_size
            yield list(range(first, first + self.batch_size))

    def __len__(self) -> int:
        return max(0, self.count)


def warn_resized(resized: Sequence[str]) -> None:
    """One warning for the conditions that were resized to their image's size."""
    if resized:
        shown = "; ".join(resized[:_SHOW]) + (f"; and {len(resized) - _SHOW} more" if len(resized) > _SHOW else "")
        warnings.warn(f"{len(resized)} condition(s) differ in size from their image and were resized: {shown}",
                      stacklevel=2)
