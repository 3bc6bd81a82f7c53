"""Inference: a prompt and one or more control images → images, with our own sampling loop.

Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models" (ICCV 2023). At every
denoising step each active ControlNet turns (noisy latents, timestep, text, condition) into residuals; the
residuals of several ControlNets add (Sec. 3.4, "Composing multiple ControlNets"), and the
locked UNet adds them to its skip connections. The loop, top to bottom::

    hint_i   = E_i(condition_i)                          once per generation (independent of t)
    for step i, timestep t:
        x     = [latents, latents]                       CFG: unconditional and conditional in ONE batch
        r     = Σ_units active at i  ControlNet_u(x, t, text, hint_u) * strength_u
        eps   = UNet(x, t, text, + r)
        eps   = eps_uncond + guidance * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents)
    images = VAE.decode(latents)

Python use::

    from controlnet.pipeline import Pipeline, ControlUnit
    pipe = Pipeline.from_pretrained()                     # the embedded tiny base; or a folder / .safetensors
    result = pipe(prompt="a red circle", controls=[ControlUnit("fill", "circle.png")], steps=20, seed=0)
    result.images[0].save("out.png")

Decisions (documented in the README):

* Step range (DESIGN.md): a unit applies at step i of n iff ``start <= i/n`` and ``(i+1)/n <= end``. A unit
  outside its range, or at strength 0, is not run at all.
* Guess mode ("CFG resolution weighting"): control on the conditional half of the CFG batch only, residual j of
  N scaled by ``strength * 0.825**(N-1-j)`` (:func:`controlnet.model.guess_mode_scales`). ``residual_scales``
  on a unit overrides the per-residual factors (e.g. diffusers' ``logspace(-1, 0, N)``).
* Control images are resized to the output size by "cover, then centre-crop": scale (keeping the aspect ratio)
  until the image covers W x H, then cut the centre W x H. INTER_AREA when shrinking, INTER_LANCZOS4 when
  enlarging (the original's ``resize_image``). An annotator of pictures (canny, lines, invert) runs on that
  resized image; one of depth, labels or keypoints, or with a same-size file parameter (inpaint's mask), runs on
  the image as given and its output is resized the same way.
* Size: multiples of the VAE factor (8); other sizes are rounded to the nearest multiple, with a warning.
  Without ``size``: the first control image's aspect ratio with its short side at the base's native
  resolution (the original's ``image_resolution`` rule), or a square at the native resolution.
* Latents stay float32 through the scheduler; the models run in the pipeline's dtype.
* Residual reuse (``reuse_residuals=N``, off by default): a unit computes its residuals at its first active step
  and then every N steps, and reuses the last ones in between. It trades fidelity for speed (about 1/N of the
  ControlNet's cost); the README has its measured controllability cost on the embedded model.
* Seeds: image k of a generation starts from noise drawn with its own generator seeded ``seed + k`` (also used
  for the ancestral / eta noise), so each image is reproducible alone with ``seed + k``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from controlnet.errors import UserError
from controlnet.model import ControlNet, ControlNetOutput, guess_mode_scales

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
ControlNetRef = Union[ControlNet, str, os.PathLike]

# Original defaults (DESIGN.md "Inference facts"): 20 DDIM steps, guidance 9.0, eta 0, strength 1.0.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 9.0
DEFAULT_SCHEDULER = "ddim"

# --scheduler name → (diffusers scheduler class, options over the base's scheduler config).
# "dpmpp_2m" is DPM-Solver++(2M) (Lu et al. 2022); "_karras" uses Karras et al.'s sigma spacing.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

OUTPUT_TYPES = ("pil", "np", "latent")


# --------------------------------------------------------------------------- public data types


@dataclass
class ControlUnit:
    """One ControlNet with its condition and its settings for a generation.

    Args:
        controlnet: a loaded :class:`~controlnet.model.ControlNet`, a bundled name ("fill") or a path.
        image: the condition: a path, a PIL image (any mode), an array ``(H, W[, C])`` (uint8, or float in
            [0, 1]) or a tensor ``([1,] 3, H, W)`` / ``(H, W, 3)`` in [0, 1]. Resized to the output size by
            "cover, then centre-crop".
        strength: multiplies the unit's residuals (>= 0; 0 turns the unit off).
        start, end: fractions of the steps during which the unit applies (0 <= start <= end <= 1).
        annotator: name of a :mod:`controlnet.annotators` annotator run on the (resized) image first.
        annotator_params: keyword arguments for the annotator.
        residual_scales: optional per-residual factors (down residuals then mid, ``num_residuals`` values),
            multiplied by ``strength``; replaces guess mode's ``0.825**(N-1-j)``.
    """

    controlnet: ControlNetRef
    image: ImageInput
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    annotator: str | None = None
    annotator_params: dict[str, Any] = field(default_factory=dict)
    residual_scales: Sequence[float] | None = None

    def __post_init__(self) -> None:
        self.strength, self.start, self.end = float(self.strength), float(self.start), float(self.end)
        if not math.isfinite(self.strength) or self.strength < 0:
            raise UserError(f"ControlNet strength must be a number >= 0, got {self.strength}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise UserError(f"ControlNet {name} must be in [0, 1] (a fraction of the steps), got {value}")
        if self.start > self.end:
            raise UserError(f"ControlNet start {self.start} is after end {self.end}; give start <= end")

    def active(self, step: int, num_steps: int) -> bool:
        """Whether the unit runs at step ``step`` of ``num_steps`` (DESIGN.md step-range rule; never at strength 0)."""
        return self.strength > 0 and self.start <= step / num_steps and (step + 1) / num_steps <= self.end


@dataclass
class GenerationResult:
    """What a generation returns.

    ``images``: PIL images (``output_type="pil"``), ``(H, W, 3)`` uint8 arrays (``"np"``) or ``[]`` (``"latent"``);
    ``latents``: the final latents ``(B, C, h, w)`` float32; ``conditions``: the condition image each unit actually
    used (after resizing and annotating), as PIL; ``seed``: the seed of the first image (image k used seed + k);
    ``settings``: everything needed to reproduce the images (also written as PNG metadata).
    """

    images: list[Any]
    latents: torch.Tensor
    conditions: list[Image.Image]
    seed: int
    settings: dict[str, Any]


# --------------------------------------------------------------------------- small helpers (public)


def round_size(width: int, height: int, multiple: int = 8) -> tuple[int, int]:
    """``(width, height)`` rounded to the nearest multiples of ``multiple`` (halves up; at least ``multiple``)."""
    return tuple(max(multiple, int(math.floor(v / multiple + 0.5)) * multiple) for v in (width, height))  # type: ignore[return-value]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or the best available one: cuda, then mps, then cpu."""
    if device is not None:
        try:
            return torch.device(device)
        except RuntimeError:
            raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# /proc/cpuinfo flags of x86 CPUs that multiply bf16 in hardware: Intel AMX tiles, and AVX-512 BF16 dot products
# (Intel Cooper Lake+, AMD Zen 4+). Without them oneDNN emulates bf16 and it is slower than fp32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flags() -> list[str]:
    """Which of :data:`BF16_CPU_FLAGS` this CPU has (Linux; elsewhere an empty list)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split())
                    return [flag for flag in BF16_CPU_FLAGS if flag in flags]
    except OSError:
        pass
    return []


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype we run models in on ``device`` unless told otherwise.

    cuda: fp16 (tensor cores; the released checkpoints are fp16). mps: fp32 (bf16 support is partial).
    cpu: bf16 where the CPU multiplies bf16 in hardware (AMX or AVX-512 BF16), else fp32. Measured on this
    project's AMD EPYC (Zen 4: avx512_bf16, no AMX), SD1.5 UNet + ControlNet at 256x256, batch 2: bf16 is about
    2.4x faster than fp32 (the README has the numbers); CPUs without those instructions emulate
    bf16 and are faster in fp32.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16
    if kind == "cpu" and cpu_bf16_flags():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """A torch dtype from ``dtype`` ("fp32", "bf16", "fp16", "auto"/None, or a torch dtype)."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise UserError(f"unsupported dtype {dtype}; use fp32, bf16 or fp16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16") from None


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A fresh diffusers scheduler ``name`` (see :data:`SCHEDULERS`) built from the base's scheduler config.

    The base's config carries its training schedule (betas, ``prediction_type`` — "v_prediction" for SD2 768-v
    —, ``steps_offset``, ``timestep_spacing``); only the sampler changes.
    """
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(dict(base_config), **overrides)


def to_condition_array(image: ImageInput) -> np.ndarray:
    """A condition image as float32 ``(H, W, 3)`` in [0, 1].

    Float arrays and tensors are taken as [0, 1] without quantising; everything else goes through
    :func:`controlnet.images.load_image` (paths, any PIL mode, integer arrays; one-line errors on bad files).
    """
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)  # (C, H, W) → (H, W, C)
        image = t.numpy()
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        arr = image.astype(np.float32)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise UserError(f"a float condition must be (H, W), (H, W, 3) or (3, H, W) in [0, 1]; got {image.shape}")
        return np.clip(np.nan_to_num(arr), 0.0, 1.0)
    from controlnet.images import load_image

    return load_image(image).astype(np.float32) / 255.0


def resize_cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize ``image`` (H, W, C) to exactly ``height`` x ``width``: scale to cover, then centre-crop.

    The aspect ratio is kept: scale by ``max(width / W, height / H)``, then cut the centre. INTER_AREA when
    shrinking and INTER_LANCZOS4 when enlarging, as the original ``resize_image``; floats are clipped to [0, 1].
    """
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    scale = max(width / w, height / h)
    new_w, new_h = max(width, math.ceil(w * scale - 1e-6)), max(height, math.ceil(h * scale - 1e-6))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LANCZOS4
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    if resized.ndim == 2:
        resized = resized[..., None]
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = resized[top : top + height, left : left + width]
    if np.issubdtype(out.dtype, np.floating):
        out = np.clip(out, 0.0, 1.0)
    return np.ascontiguousarray(out)


def _describe_image(image: ImageInput) -> str:
    """A path as given, or the kind of in-memory image (for settings)."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"<{type(image).__name__}>"


def annotates_pixels(annotator: Any) -> bool:
    """Whether an annotator reads a picture and nothing tied to its original size, so it may run on the condition
    already resized to the output size. Annotators of other input kinds (depth, labels, keypoints) or with a file
    parameter (inpaint's same-size mask) run on the image as given; their output is resized afterwards."""
    params = getattr(annotator, "params", ())
    return getattr(annotator, "input_kind", "image") == "image" and not any(p.type is Path for p in params)


def _describe_value(value: Any) -> Any:
    """A setting value as JSON can hold it: numbers, strings and booleans as they are, paths as text, others by type."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    return f"<{type(value).__name__}>"


def condition_to_pil(condition: np.ndarray) -> Image.Image:
    """A float (H, W, 3) [0, 1] condition as an 8-bit RGB PIL image."""
    return Image.fromarray(np.round(np.clip(condition, 0.0, 1.0) * 255.0).astype(np.uint8))


def png_metadata(settings: Mapping[str, Any], index: int = 0) -> dict[str, str]:
    """PNG text chunks for image ``index`` of a generation: one chunk per setting (with that image's own seed),
    plus all of them as JSON under "settings". Read back with ``PIL.Image.open(path).text``."""
    seeds = settings.get("seeds") or [settings["seed"]]
    per_image = {k: v for k, v in settings.items() if k != "seeds"}
    per_image["seed"] = seeds[index]
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in per_image.items()}
    meta["settings"] = json.dumps(per_image, sort_keys=True)
    return meta


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """One row of ``images`` (conditions first, then outputs), top-aligned on black."""
    widths, heights = [im.width for im in images], [im.height for im in images]
    grid = Image.new("RGB", (sum(widths), max(heights)))
    x = 0
    for im in images:
        grid.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return grid


# --------------------------------------------------------------------------- base loading


# Component name in model_index.json → whether it is a torch model (cast to the pipeline dtype).
_COMPONENTS = {"unet": True, "vae": True, "text_encoder": True, "tokenizer": False, "scheduler": False,
               "text_encoder_2": True, "tokenizer_2": False}
_LIBRARIES = ("diffusers", "transformers")


def _load_base_folder(path: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The components of a diffusers Stable Diffusion (1.x/2.x) or SDXL folder (its model_index.json)."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{path}: not a diffusers model folder (no model_index.json); pass a diffusers folder or a .safetensors/.ckpt file")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{index_file}: unreadable ({err}); the base model folder is damaged") from None
    components: dict[str, Any] = {}
    for name, is_model in _COMPONENTS.items():
        entry = index.get(name)
        if not entry or entry[0] is None:
            continue
        library, class_name = entry
        if library not in _LIBRARIES:
            raise UserError(f"{index_file}: component {name} comes from {library!r}; only diffusers/transformers components are supported")
        cls = getattr(importlib.import_module(library), class_name, None)
        if cls is None:
            raise UserError(f"{index_file}: unknown {library} class {class_name!r} for {name}")
        kwargs: dict[str, Any] = {"torch_dtype": dtype} if is_model else {}
        if is_model and _only_fp16_variant(path / name):
            kwargs["variant"] = "fp16"  # e.g. diffusion_pytorch_model.fp16.safetensors without the plain file
        if library == "diffusers":
            kwargs["subfolder"] = name
            source = path
        else:
            source = path / name
        try:
            components[name] = cls.from_pretrained(source, local_files_only=True, **kwargs)
        except (OSError, ValueError, RuntimeError, EnvironmentError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{path}: cannot load its {name} ({first}); the base model folder is incomplete or damaged") from None
    missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if n not in components]
    if missing:
        raise UserError(f"{path}: model_index.json lists no {', '.join(missing)}; not a Stable Diffusion base folder")
    return components


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

    if path.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise UserError(f"{path}: a base model is a diffusers folder or a .safetensors/.ckpt file")
    if base_config is not None:
        config_dir = Path(base_config).expanduser()
        if not (config_dir / "model_index.json").is_file():
            raise UserError(f"--base-config {config_dir}: no model_index.json there; give a diffusers folder of the same family as {path.name}")
        class_name = json.loads((config_dir / "model_index.json").read_text()).get("_class_name", "")
        pipeline_class = StableDiffusionXLPipeline if "XL" in class_name else StableDiffusionPipeline
    else:
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
        pipeline_class = StableDiffusionXLPipeline if model_type.startswith("xl") else StableDiffusionPipeline
    kwargs: dict[str, Any] = {"config": str(config_dir), "local_files_only": True, "torch_dtype": dtype}
    if pipeline_class is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = pipeline_class.from_single_file(str(path), **kwargs)
    except Exception as err:  # noqa: BLE001 - diffusers raises many types; the user needs one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path}: diffusers could not load it with config {config_dir} ({first})") from None
    return {name: getattr(pipe, name, None) for name in _COMPONENTS if getattr(pipe, name, None) is not None}


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' per-file loading bars while we load (restored afterwards); our own
    progress bar is the one over the sampling steps."""
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


def _where(module: nn.Module) -> dict[str, Any]:
    """The device and dtype of a model's parameters, as keyword arguments for ``Tensor.to``."""
    p = next(module.parameters())
    return {"device": p.device, "dtype": p.dtype}


def _move(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move and cast a model. diffusers' ``ModelMixin.to`` warns on every dtype cast (0.42) even when no
    sub-module must stay fp32, so models without ``_keep_in_fp32_modules`` use ``nn.Module.to`` directly."""
    if getattr(module, "_keep_in_fp32_modules", None):
        return module.to(device=device, dtype=dtype)
    return nn.Module.to(module, device=device, dtype=dtype)


# --------------------------------------------------------------------------- the pipeline


@dataclass
class _PreparedUnit:
    """A :class:`ControlUnit` made ready for one generation."""

    unit: ControlUnit
    controlnet: ControlNet
    name: str
    condition: np.ndarray  # (H, W, 3) float32 in [0, 1]
    scales: float | list[float]  # conditioning_scale for ControlNet.forward
    cond_only: bool  # control on the conditional branch of CFG only (guess mode, global pooling)
    hint_embedding: torch.Tensor | None = None  # (1, C0, h, w), computed once per generation
    last: tuple[int, ControlNetOutput] | None = None  # (step, residuals) last computed, for reuse_residuals


class Pipeline:
    """Text-to-image with ControlNets over an SD-family base (SD1.x, SD2.x incl. v-prediction, SDXL).

    Build it with :meth:`from_pretrained` (embedded base, a diffusers folder or a single file; dtype None → the
    device's default, :func:`default_dtype`) or from diffusers/transformers components (dtype/device None → the
    components run as given; otherwise they are moved and cast in place). Call it to generate; see the module
    docstring for the loop and the rules it follows.
    """

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any,
                 text_encoder_2: nn.Module | None = None, tokenizer_2: Any | None = None,
                 dtype: str | torch.dtype | None = None, device: str | torch.device | None = None):
        # dtype/device None: run the components as given (nothing of the caller's is cast or moved);
        # otherwise move and cast them all (from_pretrained passes the per-device default, see default_dtype).
        given = next(unet.parameters())
        self.device = resolve_device(device) if device is not None else given.device
        self.dtype = resolve_dtype(dtype, self.device) if dtype is not None else given.dtype
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("text_encoder_2 and tokenizer_2 go together (SDXL); pass both or neither")
        if dtype is not None or device is not None:
            # SDXL's VAE overflows in fp16 (its config sets force_upcast): it decodes in fp32 there.
            upcast = self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
            for module, module_dtype in ((unet, self.dtype), (vae, torch.float32 if upcast else self.dtype),
                                         (text_encoder, self.dtype), (text_encoder_2, self.dtype)):
                if module is not None:
                    _move(module, self.device, module_dtype)
        self.unet, self.vae, self.text_encoder, self.text_encoder_2 = unet, vae, text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.scheduler_config = dict(scheduler.config)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.is_sdxl = getattr(self.unet.config, "addition_embed_type", None) == "text_time"
        if self.is_sdxl and text_encoder_2 is None:
            raise ValueError("an SDXL UNet (addition_embed_type 'text_time') needs text_encoder_2 and tokenizer_2")
        self.base = ""  # where the base came from (settings / metadata)
        self._controlnets: dict[str, ControlNet] = {}
        self._checked: set[int] = set()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        base_config: str | os.PathLike | None = None) -> "Pipeline":
        """Load a base model: ``None`` → the embedded tiny model; a diffusers folder; or a single
        .safetensors/.ckpt file (needs ``base_config``, a diffusers folder of the same family, or its config
        in the Hugging Face cache: nothing is downloaded)."""
        from controlnet.embedded import default_base_dir

        path = default_base_dir() if base is None else Path(base).expanduser()
        if not path.exists():
            raise UserError(f"base model {path} not found; pass a diffusers folder or a .safetensors/.ckpt file")
        device_ = resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_)
        with _quiet_loading():
            components = _load_base_folder(path, dtype_) if path.is_dir() else _load_base_single_file(path, dtype_, base_config)
        pipe = cls(**components, dtype=dtype_, device=device_)
        pipe.base = "embedded" if base is None else str(path)
        return pipe

    def load_controlnet(self, name_or_path: ControlNetRef) -> ControlNet:
        """A ControlNet by bundled name or path (cached), or a given model, checked against the base's family."""
        if isinstance(name_or_path, ControlNet):
            cn = name_or_path
        else:
            from controlnet.checkpoints import load_controlnet
            from controlnet.embedded import resolve_controlnet

            path = resolve_controlnet(str(name_or_path))
            key = str(path.resolve())
            if key not in self._controlnets:
                with _quiet_loading():
                    self._controlnets[key] = load_controlnet(path, dtype=self.dtype, device=self.device)
            cn = self._controlnets[key]
        if id(cn) not in self._checked:
            from controlnet.checkpoints import check_compatible

            check_compatible(cn, self.unet)
            self._checked.add(id(cn))
        return cn

    @property
    def native_size(self) -> int:
        """The base's training resolution in pixels (UNet sample size x VAE factor): 512 for SD1.5."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # ------------------------------------------------------------------ pieces of a generation

    def output_size(self, size: tuple[int, int] | None, first_condition: np.ndarray | None) -> tuple[int, int]:
        """(width, height): ``size`` rounded to multiples of the VAE factor, or the default rule (module doc)."""
        m = self.vae_scale_factor
        if size is not None:
            width, height = (int(v) for v in size)
            if width <= 0 or height <= 0:
                raise UserError(f"size must be positive, got {width}x{height}")
            rounded = round_size(width, height, m)
            if rounded != (width, height):
                warnings.warn(f"size {width}x{height} rounded to {rounded[0]}x{rounded[1]} (multiples of {m})", stacklevel=3)
            return rounded
        if first_condition is None:
            return self.native_size, self.native_size
        h, w = first_condition.shape[:2]
        scale = self.native_size / min(h, w)
        return round_size(w * scale, h * scale, m)

    @staticmethod
    def _tokenize(tokenizer: Any, prompts: list[str], encoder: nn.Module) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(_where(encoder)["device"])

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings ``(N, L, D)`` and, for SDXL, pooled embeddings ``(N, D2)`` (as diffusers computes them)."""
        if self.text_encoder_2 is None:
            ids = self._tokenize(self.tokenizer, prompts, self.text_encoder)
            return self.text_encoder(ids)[0], None  # last hidden state, after the final layer norm
        hidden = []
        pooled = None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self._tokenize(tokenizer, prompts, encoder), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL uses the penultimate layer of both encoders
            pooled = out[0]  # the second encoder's projected pooled embedding ("text_embeds")
        return torch.cat(hidden, dim=-1), pooled

    def _prepare_unit(self, unit: ControlUnit, width: int, height: int, guess_mode: bool) -> _PreparedUnit:
        cn = self.load_controlnet(unit.controlnet)
        condition = resize_cover(to_condition_array(unit.image), width, height)  # (H, W, 3) float
        if unit.annotator:
            from controlnet import annotators

            annotate = annotators.get(unit.annotator)
            if annotates_pixels(annotate):  # e.g. canny: detect at the output resolution, as the original does
                annotated = annotate(np.round(condition * 255.0).astype(np.uint8), **unit.annotator_params)
            else:  # raw depth / labels / keypoints, or a same-size file parameter (mask): the input as given
                source = unit.image if isinstance(unit.image, (str, os.PathLike, Image.Image, np.ndarray)) else \
                    np.round(to_condition_array(unit.image) * 255.0).astype(np.uint8)
                annotated = annotate(source, **unit.annotator_params)
            condition = resize_cover(np.asarray(annotated, dtype=np.float32) / 255.0, width, height)
        if unit.residual_scales is not None:
            scales: float | list[float] = [unit.strength * float(s) for s in unit.residual_scales]
            if len(scales) != cn.num_residuals:
                raise UserError(f"residual_scales has {len(scales)} values; this ControlNet has {cn.num_residuals} residuals")
        elif guess_mode:
            scales = guess_mode_scales(cn.num_residuals, unit.strength)
        else:
            scales = unit.strength
        if isinstance(unit.controlnet, ControlNet):
            name = str(getattr(unit.controlnet, "name_or_path", "") or "ControlNet (in memory)")
        else:
            name = str(unit.controlnet)
        cond_only = guess_mode or bool(cn.config.global_pool_conditions)  # DESIGN.md: pooled → conditional only
        return _PreparedUnit(unit, cn, name, condition, scales, cond_only)

    def _control(self, units: list[_PreparedUnit], step: int, num_steps: int, x: torch.Tensor, t: torch.Tensor,
                 text: torch.Tensor, added: dict[str, torch.Tensor] | None, cfg: bool,
                 reuse: int = 1) -> ControlNetOutput | None:
        """The summed residuals of the units active at ``step``; ``None`` when none is. With ``reuse`` > 1 a unit
        whose residuals were computed less than ``reuse`` steps ago returns those again."""
        total: ControlNetOutput | None = None
        half = x.shape[0] // 2
        for u in units:
            if not u.unit.active(step, num_steps):
                continue  # not computed at all
            if u.last is not None and step - u.last[0] < reuse:
                total = u.last[1] if total is None else total + u.last[1]
                continue
            x_u, text_u, added_u = x, text, added
            if cfg and u.cond_only:  # the conditional half of the CFG batch only
                x_u, text_u = x[half:], text[half:]
                added_u = {k: v[half:] for k, v in added.items()} if added else None
            cn = u.controlnet
            where = _where(cn)  # a caller's model is run as it is
            res = cn(
                x_u.to(**where), t, text_u.to(**where),
                hint_embedding=u.hint_embedding.expand(x_u.shape[0], -1, -1, -1),
                conditioning_scale=u.scales,
                added_cond_kwargs={k: v.to(**where) for k, v in added_u.items()} if added_u else None,
            )
            if cfg and u.cond_only:  # zeros for the unconditional half: it stays uncontrolled
                res = ControlNetOutput(tuple(torch.cat([torch.zeros_like(r), r]) for r in res.down_residuals),
                                       torch.cat([torch.zeros_like(res.mid_residual), res.mid_residual]))
            if where != {"device": self.device, "dtype": self.dtype}:
                res = ControlNetOutput(tuple(r.to(self.device, self.dtype) for r in res.down_residuals),
                                       res.mid_residual.to(self.device, self.dtype))
            u.last = (step, res)  # reuse 1: never read again (the next step is always >= 1 later)
            total = res if total is None else total + res
        return total

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents ``(B, C, h, w)`` → images ``(B, H, W, 3)`` uint8, one image at a time (bounded memory)."""
        scaling = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        images = []
        for z in latents:
            z = (z[None] / scaling + shift).to(**_where(self.vae))
            x = self.vae.decode(z).sample.float()  # (1, 3, H, W) in [-1, 1]
            x = (x / 2 + 0.5).clamp(0, 1)
            images.append((x[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
        return np.stack(images)

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def __call__(self, prompt: str, controls: Sequence[ControlUnit] = (), negative_prompt: str = "",
                 steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, scheduler: str = DEFAULT_SCHEDULER,
                 seed: int | None = 0, size: tuple[int, int] | None = None, num_images: int = 1, eta: float = 0.0,
                 guess_mode: bool = False, latents: torch.Tensor | None = None, output_type: str = "pil",
                 progress: bool = True, reuse_residuals: int = 1,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> GenerationResult:
        """Generate ``num_images`` images for ``prompt`` under the ControlNets of ``controls``.

        Args:
            prompt, negative_prompt: the text; the negative prompt is the unconditional branch of CFG.
            controls: :class:`ControlUnit` s; their residuals add.
            steps, scheduler, eta: sampler settings (``eta`` is DDIM's noise; other samplers ignore it).
            guidance: classifier-free guidance weight (<= 1: no CFG, one branch).
            seed: image k uses seed + k (``None``: a random seed, reported in the result).
            size: (width, height); ``None``: see the module docstring.
            guess_mode: control on the conditional branch only, residual scales 0.825**(N-1-j).
            latents: initial noise ``(num_images, C, h, w)`` (unscaled; multiplied by the scheduler's
                ``init_noise_sigma``), instead of drawing it from the seed.
            output_type: "pil", "np" (uint8 arrays) or "latent" (no decoding).
            progress: show a tqdm bar over the steps (stderr).
            callback: called as ``callback(i, t, latents)`` after every step.
            reuse_residuals: compute each ControlNet every N active steps and reuse its residuals in between
                (1, the default: every step; an approximation that trades controllability for speed).
        """
        from tqdm.auto import tqdm

        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if int(steps) < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        if int(num_images) < 1:
            raise UserError(f"num_images must be >= 1, got {num_images}")
        if not math.isfinite(float(guidance)) or guidance < 0:
            raise UserError(f"guidance must be a number >= 0, got {guidance}")
        if not 0.0 <= float(eta) <= 1.0:
            raise UserError(f"eta must be in [0, 1], got {eta}")
        if int(reuse_residuals) < 1:
            raise UserError(f"reuse_residuals must be >= 1 (1: compute the residuals every step), got {reuse_residuals}")
        steps, num_images, reuse_residuals = int(steps), int(num_images), int(reuse_residuals)
        sampler = make_scheduler(scheduler, self.scheduler_config)
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        seed = int(seed)

        # 1. Conditions: load, resize to the output size, annotate.
        first = to_condition_array(controls[0].image) if controls else None
        width, height = self.output_size(size, first)
        units = [self._prepare_unit(u, width, height, guess_mode) for u in controls]

        # 2. Text: [unconditional, conditional] in one batch when guiding (diffusers' order).
        cfg = guidance > 1.0
        text, pooled = self.encode_prompt([prompt])  # (1, L, D), (1, D2) | None
        if cfg:
            if self.is_sdxl and not negative_prompt:  # SDXL: zeros for an empty negative prompt
                neg_text, neg_pooled = torch.zeros_like(text), (torch.zeros_like(pooled) if pooled is not None else None)
            else:
                neg_text, neg_pooled = self.encode_prompt([negative_prompt])
            text = torch.cat([neg_text.expand(num_images, -1, -1), text.expand(num_images, -1, -1)])
            pooled = torch.cat([neg_pooled.expand(num_images, -1), pooled.expand(num_images, -1)]) if pooled is not None else None
        else:
            text = text.expand(num_images, -1, -1)
            pooled = pooled.expand(num_images, -1) if pooled is not None else None
        text = text.to(self.device, self.dtype)  # (2B or B, L, D)
        added = None
        if self.is_sdxl:  # SDXL micro-conditioning: original size, crop top-left, target size (h, w order)
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
            added = {"text_embeds": pooled.to(self.device, self.dtype), "time_ids": time_ids.repeat(text.shape[0], 1)}

        # 3. Initial noise: one generator per image, seeded seed + k, also used for the sampler's noise.
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(num_images)]
        shape = (1, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        elif tuple(latents.shape) != (num_images, *shape[1:]):
            raise UserError(f"latents must have shape {(num_images, *shape[1:])}, got {tuple(latents.shape)}")
        sampler.set_timesteps(steps, device=self.device)
        timesteps = sampler.timesteps
        latents = latents.to(self.device, torch.float32) * sampler.init_noise_sigma  # (B, C, h, w), float32
        step_params = inspect.signature(sampler.step).parameters
        step_kwargs: dict[str, Any] = {}
        if "eta" in step_params:
            step_kwargs["eta"] = float(eta)
        if "generator" in step_params:
            step_kwargs["generator"] = generators

        # 4. Hint embeddings E(c), once per generation (they do not depend on t); none for a unit never active.
        n = len(timesteps)
        for u in units:
            if any(u.unit.active(i, n) for i in range(n)):
                hint = torch.from_numpy(u.condition).permute(2, 0, 1)[None]  # (1, 3, H, W) in [0, 1]
                u.hint_embedding = u.controlnet.encode_hint(hint.to(**_where(u.controlnet)))  # (1, C0, h, w)

        # 5. The loop.
        for i, t in enumerate(tqdm(timesteps, desc="sampling", unit="step", disable=not progress, leave=False)):
            x = torch.cat([latents] * 2) if cfg else latents  # (2B or B, C, h, w)
            x = sampler.scale_model_input(x, t).to(self.dtype)
            control = self._control(units, i, n, x, t, text, added, cfg, reuse_residuals)
            residuals = control.unet_kwargs() if control is not None else {}
            eps = self.unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added, **residuals).sample.float()
            if cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            latents = sampler.step(eps, t, latents, **step_kwargs).prev_sample
            if callback is not None:
                callback(i, t, latents)

        # 6. Decode and report.
        if output_type == "latent":
            images: list[Any] = []
        else:
            arrays = self.decode(latents)
            images = [Image.fromarray(a) for a in arrays] if output_type == "pil" else list(arrays)
        settings = {
            "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed,
            "seeds": [seed + k for k in range(num_images)], "steps": steps, "scheduler": scheduler,
            "guidance": float(guidance), "size": f"{width}x{height}", "eta": float(eta), "guess_mode": bool(guess_mode),
            **({"reuse_residuals": reuse_residuals} if reuse_residuals > 1 else {}),
            "num_images": num_images, "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype)), "base": self.base,
            "controlnets": [
                {"controlnet": u.name, "control": _describe_image(u.unit.image), "strength": u.unit.strength,
                 "start": u.unit.start, "end": u.unit.end, "annotator": u.unit.annotator or "",
                 "annotator_params": {k: _describe_value(v) for k, v in u.unit.annotator_params.items()}}
                for u in units
            ],
        }
        conditions = [condition_to_pil(u.condition) for u in units]
        return GenerationResult(images, latents.cpu(), conditions, seed, settings)
