"""What a training run is told (:class:`TrainConfig`) and what it reports (:class:`TrainResult`).

This module imports nothing heavy: ``controlnet train --help`` builds its options from :class:`TrainConfig`'s
fields (the flag ``--grad-accum`` is the field ``grad_accum``, its help text the field's metadata, its default the
field's default) without loading torch. Checks that need torch import it inside :meth:`TrainConfig.check`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlnet.defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS
from controlnet.errors import UserError
from controlnet.options import option

if TYPE_CHECKING:
    from controlnet.data.cache import CacheStats
    from controlnet.data.datasets import SkippedRow

# --------------------------------------------------------------------------- defaults, with their sources

DEFAULT_LR = 1e-5  # lllyasviel/ControlNet tutorial_train.py `learning_rate = 1e-5`
DEFAULT_BATCH_SIZE = 4  # tutorial_train.py `batch_size = 4`
DEFAULT_DECODER_LR = 2e-6  # lllyasviel/ControlNet docs/train.md: with sd_locked = False use a lower lr, e.g. 2e-6
DEFAULT_EMPTY_PROMPT_PROB = 0.5  # paper Sec. 3.3: "randomly replace 50% text prompts c_t with empty strings"
DEFAULT_MAX_GRAD_NORM = 1.0  # diffusers examples/controlnet/train_controlnet.py `--max_grad_norm` default
DEFAULT_WEIGHT_DECAY = 1e-2  # torch.optim.AdamW's default, which the original uses (cldm.py configure_optimizers)

# accelerate's names of the mixed-precision modes (Accelerator(mixed_precision=...)); controlnet.devices.DTYPES
# maps each to its torch dtype ("no": float32).
MIXED_PRECISIONS = ("no", "bf16", "fp16")
# The paper's zero-convolution ablation (Sec. 4.2, Fig. 8): "replacing the zero convolutions with standard
# convolution layers initialized with Gaussian weights".
ZERO_CONV_INITS = ("zero", "gaussian")
CONTROL_LORA = "control-lora"  # --architecture: low-rank deltas on the copy (controlnet.control_lora_train)
DEFAULT_CONTROL_LORA_RANK = 128  # Stability's smaller release: control-lora-*-rank128.safetensors
AUTO_SCORE = "auto"  # --score: the scorer that fits the data (controlnet.train.scores.choose_scorer)

# The option groups of `controlnet train --help`.
DATA, RECIPE, OUTPUT = "data and model", "recipe", "checkpoints, validation, output"


@dataclass
class TrainConfig:
    """Everything a training run needs. Paths may be ``str`` or ``Path``; ``base=None`` is the embedded model.

    ``controlnet train`` builds one from its options, one per field. Defaults are the original's recipe.
    """

    data: str | Path = option(
        help="folder with prompt.json (fill50k layout) or metadata.jsonl, or the manifest file", group=DATA)
    out: str | Path = option(
        help="output folder: controlnet/, checkpoints/, log.jsonl, validation/, training.png", group=DATA)
    base: str | Path | None = option(
        None, help="base model: a diffusers Stable Diffusion, Flux, SD3 or Qwen-Image folder (default: the "
        "embedded model)", group=DATA)
    init: str | Path | None = option(
        None, help="start from this ControlNet (folder, file or bundled name) instead of a copy of the base's "
        "encoder", group=DATA)
    annotator: str | None = option(
        None, help="make conditions from the images with this annotator (e.g. canny); cached", group=DATA)
    annotator_params: dict[str, Any] = option(
        {}, help="annotator parameter (repeatable)", group=DATA, flags=("--annotator-param",), metavar="KEY=VALUE")
    resolution: int | None = option(
        None, help="training size in pixels (default: the base's native size)", group=DATA)
    max_pixels: int | None = option(
        None, help="largest --resolution squared, in pixels (default: the device's memory / 4096 bytes per pixel, "
        "controlnet.limits)", group=DATA, metavar="N")
    hflip: bool = option(False, help="mirror image and condition together with probability 1/2", group=DATA)
    strict: bool = option(False, help="fail on bad manifest rows instead of skipping them", group=DATA)
    cache_dir: str | Path | None = option(
        None, help="where latents / text embeddings / conditions are cached (default: OUT/cache)", group=DATA)
    num_workers: int = option(0, help="data-loader worker processes", group=DATA)

    max_steps: int = option(1000, help="optimizer steps", group=RECIPE)
    batch_size: int = option(DEFAULT_BATCH_SIZE, help="samples per process and micro-batch", group=RECIPE)
    grad_accum: int = option(1, help="micro-batches per optimizer step", group=RECIPE)
    lr: float = option(DEFAULT_LR, help="AdamW learning rate of the ControlNet", group=RECIPE)
    lr_warmup_steps: int = option(0, help="linear warm-up steps (then constant, as the original)", group=RECIPE)
    weight_decay: float = option(DEFAULT_WEIGHT_DECAY, help="AdamW weight decay", group=RECIPE)
    max_grad_norm: float = option(DEFAULT_MAX_GRAD_NORM, help="gradient clipping (0: off)", group=RECIPE)
    empty_prompt_prob: float = option(
        DEFAULT_EMPTY_PROMPT_PROB, help="fraction of prompts replaced by ''", group=RECIPE)
    unlock_decoder_after: int | None = option(
        None, help="from step N also train the base's decoder (the original's sd_locked=False)", group=RECIPE,
        metavar="N")
    decoder_lr: float = option(DEFAULT_DECODER_LR, help="learning rate of the unlocked decoder", group=RECIPE)
    mixed_precision: str = option(
        "no", help="accelerate's mixed precision; the locked base is stored in it", group=RECIPE,
        choices=MIXED_PRECISIONS)
    gradient_checkpointing: bool = option(
        False, help="recompute activations in the backward pass (less memory, more time)", group=RECIPE)
    zero_conv_init: str = option(
        "zero", help="zero: the paper's zero convolutions; gaussian: the paper's ablation (Gaussian-initialised "
        "1x1 convs)", group=RECIPE, choices=ZERO_CONV_INITS)
    architecture: str = option(
        "copy", help="copy: the paper's ControlNet (a trainable copy of the encoder); lite: the paper's ablation "
        "ControlNet-lite (one conv per encoder layer); control-lora: low-rank deltas on the copied layers, saved "
        "in Stability's Control-LoRA layout", group=RECIPE)
    rank: int | None = option(
        None, help=f"rank of --architecture control-lora's deltas (default {DEFAULT_CONTROL_LORA_RANK})",
        group=RECIPE, metavar="R")
    controlnet_layers: int | None = option(
        None, help="Flux, SD3 and Qwen-Image bases: the ControlNet copies the base's first N double (SD3: joint) "
        "blocks (default: Flux 4, SD3 12, as diffusers' training examples; Qwen-Image 5)", group=RECIPE, metavar="N")
    controlnet_single_layers: int | None = option(
        None, help="Flux bases: the ControlNet copies the base's first N single blocks (default 4)", group=RECIPE,
        metavar="N")
    seed: int = option(
        0, help="seed of the data order, empty prompts, timesteps, noise and the new ControlNet", group=RECIPE)

    checkpoint_every: int = option(
        500, help="checkpoint every N steps (and at the end; 0: only at the end)", group=OUTPUT, metavar="N")
    keep: int = option(3, help="checkpoints kept (0: all)", group=OUTPUT, metavar="K")
    resume: str | Path | None = option(
        None, help="continue from the latest checkpoint in OUT, or from a checkpoint folder", group=OUTPUT,
        metavar="latest|PATH")
    validate_every: int = option(
        0, help="every N steps, sample the validation conditions and score controllability (0: off)",
        group=OUTPUT, metavar="N")
    validation_count: int = option(4, help="the first N examples are the validation conditions", group=OUTPUT)
    validation_steps: int = option(
        DEFAULT_STEPS, help="DDIM steps of a validation sample (the original's)", group=OUTPUT)
    validation_guidance: float = option(
        DEFAULT_GUIDANCE, help="guidance of a validation sample (the original's)", group=OUTPUT)
    score: str = option(
        AUTO_SCORE, help="controllability score: canny (edge F1), fill (IoU of the filled circle), segmentation "
        "(mIoU), ssim, or auto (Canny conditions: canny; segmentation or shapes label maps: segmentation; fill "
        "circles: fill; otherwise ssim)", group=OUTPUT)
    export_original: str | Path | None = option(
        None, help="also write the ControlNet in the original layout (.safetensors or .pth)", group=OUTPUT,
        metavar="PATH")
    quiet: bool = option(False, help="no progress bar and no messages", group=OUTPUT, flags=("-q", "--quiet"))
    plot: bool = option(
        True, help="write OUT/training.png, loss and score against steps (needs matplotlib)", group=OUTPUT)
    tensorboard: bool = option(
        True, help="write TensorBoard events to OUT/tensorboard (when tensorboard is installed)", group=OUTPUT)

    def check(self) -> None:
        """Raise :class:`UserError` naming the first bad value; nothing is loaded or written before this."""
        _check_counts(self)
        for name in ("lr", "decoder_lr"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"{_flag(name)} must be a positive number, got {value}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise UserError(f"--max-grad-norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if not 0.0 <= self.empty_prompt_prob <= 1.0:
            raise UserError(f"--empty-prompt-prob must be in [0, 1], got {self.empty_prompt_prob}")
        if self.resolution is not None and int(self.resolution) < 8:
            raise UserError(f"--resolution must be at least 8 pixels, got {self.resolution}")
        if self.resolution is not None:  # bounded before anything of that size is allocated
            from controlnet.limits import check_max_pixels, check_output_size

            check_output_size(self.resolution, self.resolution, check_max_pixels(self.max_pixels),
                              what=f"--resolution {self.resolution}")
        _check_choices(self)
        _check_paths(self)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (paths as strings): OUT/run.json and the checkpoints' record."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_counts(config: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum", "max_steps", "validation_count", "validation_steps"):
        if int(getattr(config, name)) < 1:
            raise UserError(f"{_flag(name)} must be >= 1, got {getattr(config, name)}")
    for name in ("checkpoint_every", "keep", "validate_every", "num_workers", "lr_warmup_steps"):
        if int(getattr(config, name)) < 0:
            raise UserError(f"{_flag(name)} must be >= 0, got {getattr(config, name)}")
    for name in ("controlnet_layers", "controlnet_single_layers"):
        if getattr(config, name) is not None and int(getattr(config, name)) < 0:
            raise UserError(f"{_flag(name)} must be >= 0, got {getattr(config, name)}")
    if config.unlock_decoder_after is not None and config.unlock_decoder_after < 0:
        raise UserError(f"--unlock-decoder-after must be >= 0, got {config.unlock_decoder_after}")


def _check_choices(config: TrainConfig) -> None:
    from controlnet.model_config import ARCHITECTURES
    from controlnet.train.scores import scorer_names

    choices = {"mixed_precision": MIXED_PRECISIONS, "zero_conv_init": ZERO_CONV_INITS,
               "architecture": (*ARCHITECTURES, CONTROL_LORA), "score": (AUTO_SCORE, *scorer_names())}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise UserError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    if config.architecture == "lite" and config.export_original:
        raise UserError("--export-original: the original layout has no place for a lite ControlNet; drop the flag")
    _check_rank(config)
    if config.annotator is not None:
        from controlnet import annotators

        annotators.get(config.annotator).resolve(dict(config.annotator_params))  # unknown name or parameter
    elif config.annotator_params:
        raise UserError("--annotator-param needs --annotator")


def _check_rank(config: TrainConfig) -> None:
    if config.architecture != CONTROL_LORA:
        if config.rank is not None:
            raise UserError(f"--rank is for --architecture {CONTROL_LORA}; drop it or add that")
        return
    if config.rank is not None and int(config.rank) < 1:
        raise UserError(f"--rank must be >= 1, got {config.rank}")
    if config.export_original:
        raise UserError("--export-original: a Control-LoRA is written in Stability's layout (OUT/controlnet/); "
                        "drop the flag")
    if config.init:
        raise UserError(f"--init: --architecture {CONTROL_LORA} starts from a copy of the base's encoder; drop --init")


def _check_paths(config: TrainConfig) -> None:
    """Paths that would fail only after training (or after filling the caches) fail here instead."""
    for name in ("out", "cache_dir"):
        value = getattr(config, name)
        if value is not None and Path(value).expanduser().exists() and not Path(value).expanduser().is_dir():
            raise UserError(f"{_flag(name)} {value} is a file; give a folder")
    from controlnet.train.folder import check_out_folder

    check_out_folder(Path(config.out).expanduser())
    if config.export_original:
        from controlnet.checkpoints import PICKLE_SUFFIXES

        path = Path(config.export_original).expanduser()
        suffixes = (".safetensors", *PICKLE_SUFFIXES)
        if path.suffix.lower() not in suffixes or path.is_dir():
            raise UserError(f"--export-original {path}: the original layout is one file ending in "
                            f"{' or '.join(suffixes)}")
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UserError(f"--export-original {path}: cannot write in {parent}; choose another path")


@dataclass
class TrainResult:
    """What :func:`controlnet.train.train` did. Scores and the convergence step cover the whole run, resumed
    parts included."""

    out: Path
    controlnet: Path  # OUT/controlnet, the native (diffusers) layout
    step: int  # optimizer steps done in total
    losses: list[float]  # per optimizer step of this invocation (mean over processes)
    samples: int  # samples seen in this invocation (all processes)
    empty_prompts: int  # how many of them had their prompt replaced by ""
    skipped: list[SkippedRow]
    cache: CacheStats
    checkpoints: list[Path]
    validations: list[dict[str, Any]]
    convergence_step: int | None
    log: Path
    plot: Path | None = None
    unet: Path | None = None  # OUT/unet, when the decoder was unlocked
    export_original: Path | None = None
    resumed_from: Path | None = None

    @property
    def empty_prompt_rate(self) -> float:
        return self.empty_prompts / self.samples if self.samples else float("nan")
