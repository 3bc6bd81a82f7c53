"""Training a ControlNet on a locked base: the paper's recipe, resumable, cached, data-parallel.

Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models" (ICCV 2023), Sec. 3.3:
the base model is locked, a trainable copy of its encoder (:meth:`ControlNet.from_unet`) learns from
(image, condition, prompt) triples with the base's own objective,

    L = E_{z0, t, c_t, c_f, ε} || ε − ε_θ(z_t, t, c_t, c_f) ||²

(ε-prediction, or v / x0 when the base's scheduler says ``prediction_type``), t uniform over the scheduler's
training timesteps, and 50% of the prompts c_t replaced by the empty string. :func:`train` is the whole loop,
top to bottom: load the base, fill the caches, build the ControlNet, the optimizer, resume, then for each
optimizer step: micro-batches → loss → backward → gradient all-reduce (several processes) → clip → AdamW step →
log / validate / checkpoint. Plain PyTorch; accelerate provides the processes, the device and mixed precision.

Decisions (see the README):

* **Locked base.** Every base weight has ``requires_grad=False``. The locked encoder builds no autograd graph
  (neither its weights nor its inputs need gradients: what ``torch.no_grad`` would give), the graph starts where
  the ControlNet's residuals join the skip connections, and gradients flow through the locked decoder's
  activations into the residuals. With mixed precision the locked UNet is stored in the reduced dtype.
* **Caches.** VAE latent distributions, text embeddings (incl. the empty prompt's) and conditions at the training
  resolution are computed once and stored on disk (:mod:`controlnet.data.cache`), so a step runs only the UNet and
  the ControlNet. The latent is *sampled* from the cached distribution at every step, as the original does.
* **Randomness** is a function of (seed, sample position) (:mod:`controlnet.data.datasets`), so a resumed run, a
  run with data-loader workers and a run on N processes with the same global batch see the same samples, the
  same empty prompts, timesteps and noise.
* **Data parallelism.** Each process takes its share of every global micro-batch; after the last micro-batch of
  an optimizer step the gradients are averaged over the processes (one all-reduce per bucket, what DDP
  computes). Not DDP's wrapper: ``--unlock-decoder-after`` changes the set of trainable parameters mid-run,
  which a DDP wrapper cannot follow, and accumulation then needs no ``no_sync``.
* **Checkpoints** are folders written atomically (temporary folder + rename), the last K kept; they hold the
  ControlNet (native format), the unlocked decoder if any, optimizer, LR scheduler, RNG states, step and data
  position. Only the main process writes checkpoints, logs, samples and outputs.
* **Sudden convergence** (paper Fig. 4): see :func:`sudden_convergence_step`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from controlnet.data.cache import CacheStats, CacheStore, entry_key, module_digest, tokenizer_digest
from controlnet.data.datasets import (
    Encoders, PreparedExample, SkippedRow, StreamBatches, TrainDataset, describe_skipped, load_rgb,
    prepare_examples, read_manifest, to_resolution, warn_resized,
)
from controlnet.errors import UserError
from controlnet.fileio import atomic_path, atomic_write_text
from controlnet.model import ARCHITECTURES, ControlNet

# --------------------------------------------------------------------------- defaults, with their sources

# The paper's zero-convolution ablation (Sec. 4.2, Fig. 8): "replacing the zero convolutions with standard
# convolution layers initialized with Gaussian weights". No std is given; 0.02 is the usual choice (and the
# one model.PaperHintEncoder uses).
ZERO_CONV_INITS = ("zero", "gaussian")
ABLATION_GAUSSIAN_STD = 0.02

DEFAULT_LR = 1e-5  # lllyasviel/ControlNet tutorial_train.py `learning_rate = 1e-5`
DEFAULT_BATCH_SIZE = 4  # tutorial_train.py `batch_size = 4`
DEFAULT_DECODER_LR = 2e-6  # DESIGN.md: sd_locked=False trains the decoder too, lr ~2e-6 (original docs/train.md)
DEFAULT_EMPTY_PROMPT_PROB = 0.5  # paper Sec. 3.3: "randomly replace 50% text prompts c_t with empty strings"
DEFAULT_MAX_GRAD_NORM = 1.0  # diffusers examples/controlnet/train_controlnet.py `--max_grad_norm` default
DEFAULT_WEIGHT_DECAY = 1e-2  # torch.optim.AdamW's default, which the original uses (cldm.py configure_optimizers)
ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults (the original's)
ADAM_EPS = 1e-8
# Gradients are all-reduced in buckets of this many values (DDP's default bucket is 25 MiB; this bounds the extra
# memory of the flattened copy).
ALLREDUCE_BUCKET = 25_000_000
# Sudden convergence: the score must rise by at least this much (absolute; the scores are in [0, 1]) between the
# first validation and the final plateau to count as a jump.
SUDDEN_CONVERGENCE_MIN_GAIN = 0.1
FINAL_PLATEAU = 3  # validations averaged for the final plateau
# The base's "decoder" that --unlock-decoder-after trains (the original's sd_locked=False: output_blocks + out).
DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")
MIXED_PRECISION = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCORES = ("auto", "canny", "fill", "ssim")
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "training_state.pt"
DECODER_FILE = "unet_decoder.safetensors"
LOG_FILE = "log.jsonl"
PLOT_FILE = "training.png"


# --------------------------------------------------------------------------- configuration and result


@dataclass
class TrainConfig:
    """Everything a training run needs. Paths may be ``str`` or ``Path``; ``base=None`` is the embedded model.

    The CLI (``controlnet train``) builds one of these from its flags; the names match (``--grad-accum`` →
    ``grad_accum``). Defaults are the original's recipe (module constants name their sources).
    """

    data: str | Path
    out: str | Path
    base: str | Path | None = None
    init: str | Path | None = None  # start from this ControlNet instead of a copy of the base's encoder
    annotator: str | None = None  # make conditions from the images with this annotator (cached)
    annotator_params: dict[str, Any] = field(default_factory=dict)
    resolution: int | None = None  # None: the base's native size (UNet sample_size x VAE factor)
    batch_size: int = DEFAULT_BATCH_SIZE  # per process and micro-batch
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    lr: float = DEFAULT_LR
    lr_warmup_steps: int = 0  # linear warm-up, then constant (the original: constant)
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM  # 0 turns clipping off
    empty_prompt_prob: float = DEFAULT_EMPTY_PROMPT_PROB
    unlock_decoder_after: int | None = None  # from this step on the base's decoder trains too
    decoder_lr: float = DEFAULT_DECODER_LR
    mixed_precision: str = "no"  # accelerate's names: no | bf16 | fp16
    gradient_checkpointing: bool = False
    hflip: bool = False  # mirror image and condition together with probability 1/2
    seed: int = 0
    zero_conv_init: str = "zero"  # "gaussian": the paper's ablation (ZERO_CONV_INITS)
    architecture: str = "copy"  # "lite": the paper's ControlNet-lite ablation (controlnet.model.ARCHITECTURES)
    checkpoint_every: int = 500  # 0: only at the end
    keep: int = 3  # checkpoints kept (0: all)
    resume: str | Path | None = None  # "latest" or a checkpoint folder
    validate_every: int = 0  # 0: no validation
    validation_count: int = 4  # the first N examples of the data are the fixed validation conditions
    validation_steps: int = 20  # DDIM steps (the original's default)
    validation_guidance: float = 9.0  # the original's default
    score: str = "auto"  # auto | canny | fill | ssim
    export_original: str | Path | None = None  # also write the original layout (.safetensors / .pth) here
    strict: bool = False  # bad manifest rows fail instead of being skipped
    num_workers: int = 0
    cache_dir: str | Path | None = None  # None: OUT/cache
    progress: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed
    plot: bool = True  # when matplotlib is installed

    def check(self) -> None:
        """Raise :class:`UserError` naming the first bad value."""
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "max_steps": self.max_steps,
                    "validation_count": self.validation_count, "validation_steps": self.validation_steps}
        for name, value in positive.items():
            if int(value) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        non_negative = {"checkpoint_every": self.checkpoint_every, "keep": self.keep,
                        "validate_every": self.validate_every, "num_workers": self.num_workers,
                        "lr_warmup_steps": self.lr_warmup_steps}
        for name, value in non_negative.items():
            if int(value) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        for name in ("lr", "decoder_lr"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if self.zero_conv_init not in ZERO_CONV_INITS:
            raise UserError(f"--zero-conv-init must be one of {', '.join(ZERO_CONV_INITS)}, got {self.zero_conv_init!r}")
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"--architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.architecture == "lite" and self.export_original:
            raise UserError("--export-original: the original layout has no place for a lite ControlNet; drop the flag")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise UserError(f"--max-grad-norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if not 0.0 <= self.empty_prompt_prob <= 1.0:
            raise UserError(f"--empty-prompt-prob must be in [0, 1], got {self.empty_prompt_prob}")
        if self.unlock_decoder_after is not None and self.unlock_decoder_after < 0:
            raise UserError(f"--unlock-decoder-after must be >= 0, got {self.unlock_decoder_after}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.score not in SCORES:
            raise UserError(f"--score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.resolution is not None and int(self.resolution) < 8:
            raise UserError(f"--resolution must be at least 8 pixels, got {self.resolution}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainResult:
    """What :func:`train` did. Scores and the convergence step cover the whole run, resumed parts included."""

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


# --------------------------------------------------------------------------- the loop


def train(config: TrainConfig) -> TrainResult:
    """Train a ControlNet as ``config`` says; see the module docstring for the recipe and decisions.

    Run it under ``accelerate launch`` (or ``torchrun``) for several processes; each process calls it alike.
    """
    config.check()
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    try:
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not _has_accelerator())
    except ValueError as err:  # accelerate: one mixed-precision setting per process
        raise UserError(f"{err}".splitlines()[0] + " (start a new Python process for another --mixed-precision)") from None
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    out = Path(config.out).expanduser()
    weight_dtype = MIXED_PRECISION[config.mixed_precision]

    # 1. The base model, fp32 until the caches are filled and the ControlNet is copied from it.
    base = _load_base(config.base, device)
    unet, vae = base.unet, base.vae
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)  # the base's training noise schedule
    prediction_type = noise_scheduler.config.prediction_type  # "epsilon" | "v_prediction" | "sample"
    num_timesteps = int(noise_scheduler.config.num_train_timesteps)
    resolution = _check_resolution(config.resolution or base.native_size, base)
    scaling_factor = float(vae.config.scaling_factor)  # latents are scaled to unit variance (SD1.x: 0.18215)
    shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    # 2. Fresh run or resume.
    resume_dir = _resume_dir(config.resume, out, say=main)
    if resume_dir is None:
        _check_fresh(out)  # on every process: an error must stop them all
    accelerator.wait_for_everyone()

    # 3. Data: read the manifest, fill the caches (only what is missing), skip bad rows.
    manifest = read_manifest(config.data, need_conditions=config.annotator is None, strict=config.strict)
    store = CacheStore(Path(config.cache_dir).expanduser() if config.cache_dir else out / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' / transformers' chatter while encoding
        prep = prepare_examples(
            manifest, store, _encoders(base, config), resolution, hflip=config.hflip, rank=rank, world_size=world,
            gather=gather_object, progress=main and config.progress,
        )
    skipped = manifest.skipped + prep.skipped
    if skipped and config.strict:
        raise UserError(f"{describe_skipped(skipped, manifest.path)} (--strict)")
    if main:
        if skipped:
            warnings.warn(describe_skipped(skipped, manifest.path) + f"; the list is in {out / 'skipped.jsonl'}",
                          stacklevel=2)
            atomic_write_text(out / "skipped.jsonl", "".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in skipped))
        warn_resized(prep.resized)
    accelerator.wait_for_everyone()

    # 4. The trainable copy (seeded alike on every process) and the locked base.
    torch.manual_seed(config.seed)
    controlnet = _make_controlnet(config, unet, base.vae_scale_factor).to(device=device, dtype=torch.float32).train()
    unet.requires_grad_(False).eval()
    vae.requires_grad_(False)
    decoder = _decoder_parameters(unet) if config.unlock_decoder_after is not None else {}
    base_dtype = torch.float32 if decoder else weight_dtype  # a trained decoder keeps fp32 master weights
    if base_dtype != torch.float32:
        torch.nn.Module.to(unet, dtype=base_dtype)  # (ModelMixin.to warns on every cast in diffusers 0.42)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(controlnet)
        unet.enable_gradient_checkpointing()
    locked_digest = module_digest(unet, exclude=decoder) if main else None  # checked again at the end
    validator = None
    if config.validate_every and main:
        validator = _Validator(config, base, prep.examples, store, resolution, base_dtype, out)
    del base, vae  # the caches hold what the VAE and the text encoder computed (the validator keeps its own refs)

    # 5. AdamW over the ControlNet (and the decoder, whose parameters get gradients only once unlocked).
    groups = [{"params": list(controlnet.parameters()), "lr": config.lr}]
    if decoder:
        groups.append({"params": list(decoder.values()), "lr": config.decoder_lr})
    optimizer = make_adamw(groups, config.weight_decay)
    warmup = config.lr_warmup_steps
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)

    # 6. Resume: ControlNet, decoder, optimizer, LR scheduler, RNG states, step and data position.
    step, position = 0, 0
    if resume_dir is not None:
        step, position = _load_checkpoint(resume_dir, controlnet, decoder, optimizer, lr_scheduler, config,
                                          scaler=accelerator.scaler)
        if main:
            print(f"resuming from {resume_dir} at step {step}", file=sys.stderr)
    _broadcast_parameters(controlnet, accelerator)
    optimizer = accelerator.prepare_optimizer(optimizer)  # fp16: gradient scaling happens through it

    # 7. This process's share of the sample stream, from the current position on.
    dataset = TrainDataset(prep.examples, store, config.seed, config.empty_prompt_prob, config.hflip, num_timesteps,
                           scaling_factor, prep.empty_text_key, shift_factor=shift_factor)
    global_micro = config.batch_size * world
    micro_steps = max(0, config.max_steps - step) * config.grad_accum
    sampler = StreamBatches(config.batch_size, position, micro_steps, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                         pin_memory=device.type == "cuda")

    # 8. The loop.
    log = _RunLog(out / LOG_FILE, enabled=main, keep_until=step if resume_dir is not None else None,
                  tensorboard=config.tensorboard)
    if main:
        atomic_write_text(out / "run.json", json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        log.write({"kind": "start", "step": step, "examples": len(prep.examples), "skipped": len(skipped),
                   "processes": world, "global_batch": global_micro * config.grad_accum,
                   "cache": prep.stats.as_dict(), "resumed_from": str(resume_dir) if resume_dir else None,
                   "locked_base": locked_digest})
    if validator is not None and step == 0:
        log.write(validator.run(0, controlnet, unet))
    accelerator.wait_for_everyone()

    trainable = list(controlnet.parameters())
    unlocked = False
    losses: list[float] = []
    samples = empty = 0
    checkpoints = _list_checkpoints(out)
    last_saved = step if resume_dir is not None else -1
    bar = tqdm(total=config.max_steps, initial=step, desc="training", disable=not (main and config.progress),
               dynamic_ncols=True)
    micro_loss = torch.zeros((), device=device)
    micro_empty = torch.zeros((), device=device)
    t_step = time.perf_counter()
    for micro, batch in enumerate(loader):
        if decoder and not unlocked and step >= config.unlock_decoder_after:  # the original's sd_locked=False
            for p in decoder.values():
                p.requires_grad_(True)
            trainable += list(decoder.values())
            unlocked = True
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with accelerator.autocast():
            loss = denoising_loss(controlnet, unet, noise_scheduler, batch, prediction_type, base_dtype, resolution)
        accelerator.backward(loss / config.grad_accum)
        micro_loss += loss.detach().float() / config.grad_accum
        micro_empty += batch["empty"].sum()
        if (micro + 1) % config.grad_accum:
            continue

        # One optimizer step.
        average_gradients(trainable, world)
        grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm) if config.max_grad_norm else None
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        position += global_micro * config.grad_accum

        step_loss = accelerator.reduce(micro_loss, "mean").item()
        step_empty = int(accelerator.reduce(micro_empty, "sum").item())
        micro_loss.zero_()
        micro_empty.zero_()
        rate = global_micro * config.grad_accum / max(time.perf_counter() - t_step, 1e-9)
        losses.append(step_loss)
        samples += global_micro * config.grad_accum
        empty += step_empty
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{rate:.2f}")
        log.write({"kind": "train", "step": step, "loss": step_loss, "lr": lr_scheduler.get_last_lr()[0],
                   "samples_per_s": rate, "samples": global_micro * config.grad_accum, "empty_prompts": step_empty,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None})

        if validator is not None and step % config.validate_every == 0:
            log.write(validator.run(step, controlnet, unet))
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            if main:
                checkpoints = _save_checkpoint(out, step, position, controlnet, decoder, optimizer, lr_scheduler,
                                               config, accelerator.scaler)
                log.write({"kind": "checkpoint", "step": step, "path": str(checkpoints[-1])})
            last_saved = step
        accelerator.wait_for_everyone()
        t_step = time.perf_counter()  # validation and checkpoints do not count against samples/s
    bar.close()

    # 9. The end: last checkpoint, outputs, final validation, summary and plot.
    result_unet = export = None
    if main:
        if last_saved != step:
            checkpoints = _save_checkpoint(out, step, position, controlnet, decoder, optimizer, lr_scheduler, config,
                                           accelerator.scaler)
            log.write({"kind": "checkpoint", "step": step, "path": str(checkpoints[-1])})
        validated = {r["step"] for r in log.records() if r.get("kind") == "validation"}
        if validator is not None and step not in validated:
            log.write(validator.run(step, controlnet, unet))
        from controlnet.checkpoints import save_controlnet

        save_controlnet(controlnet, out / "controlnet")
        if decoder and step > config.unlock_decoder_after:  # the decoder trained in at least one step
            result_unet = _save_unet(unet, out / "unet")
        if config.export_original:
            export = save_controlnet(controlnet, Path(config.export_original).expanduser(), format="original")
    records = log.records() if main else []
    validations = [r for r in records if r.get("kind") == "validation"]
    jump = sudden_convergence_step([r["step"] for r in validations], [r["score"] for r in validations])
    plot = None
    if main:
        locked_after = module_digest(unet, exclude=decoder)
        log.write({"kind": "end", "step": step, "convergence_step": jump, "locked_base": locked_after,
                   "mean_loss_last_100": float(np.mean(losses[-100:])) if losses else None})
        if locked_after != locked_digest:
            raise RuntimeError("the locked base model changed during training; this is a bug, please report it")
        if config.plot:
            plot = write_plot(out / PLOT_FILE, records, jump)
    log.close()
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        accelerator.end_training()  # destroys the process group (gloo aborts at exit otherwise)
    return TrainResult(
        out=out, controlnet=out / "controlnet", step=step, losses=losses, samples=samples, empty_prompts=empty,
        skipped=skipped, cache=prep.stats, checkpoints=checkpoints, validations=validations, convergence_step=jump,
        log=out / LOG_FILE, plot=plot, unet=result_unet, export_original=export, resumed_from=resume_dir,
    )


# --------------------------------------------------------------------------- the objective


def denoising_loss(controlnet: ControlNet, unet: torch.nn.Module, scheduler: Any, batch: dict[str, torch.Tensor],
                   prediction_type: str, unet_dtype: torch.dtype, resolution: int) -> torch.Tensor:
    """The paper's objective (Sec. 3.3): MSE between the locked UNet's prediction, with the ControlNet's residuals
    added, and the scheduler's target (ε for "epsilon", v for "v_prediction", z0 for "sample")."""
    latents, noise, t = batch["latents"], batch["noise"], batch["timesteps"]  # (B, C, h, w), (B, C, h, w), (B,)
    noisy = scheduler.add_noise(latents, noise, t)  # z_t = sqrt(ᾱ_t) z0 + sqrt(1 - ᾱ_t) ε
    text = batch["hidden"]  # (B, L, D)
    added = None
    if "pooled" in batch:  # SDXL: pooled text embedding + (original size, crop top-left, target size)
        ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=noisy.device)
        added = {"text_embeds": batch["pooled"], "time_ids": ids.expand(noisy.shape[0], -1).to(noisy.dtype)}
    res = controlnet(noisy, t, text, hint=batch["condition"], added_cond_kwargs=added)
    pred = unet(
        noisy.to(unet_dtype), t, text.to(unet_dtype),
        added_cond_kwargs={k: v.to(unet_dtype) for k, v in added.items()} if added else None,
        down_block_additional_residuals=[r.to(unet_dtype) for r in res.down_residuals],
        mid_block_additional_residual=res.mid_residual.to(unet_dtype),
    ).sample  # (B, C, h, w)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    elif prediction_type == "sample":
        target = latents
    else:
        raise UserError(f"the base's scheduler has prediction_type {prediction_type!r}; "
                        "supported: epsilon, v_prediction, sample")
    return F.mse_loss(pred.float(), target.float())


def make_adamw(param_groups: list[dict[str, Any]], weight_decay: float = DEFAULT_WEIGHT_DECAY) -> torch.optim.AdamW:
    """AdamW with the original's betas and eps; PyTorch's fused kernel where it exists (CPU, CUDA): one pass over
    each parameter instead of several, the same update."""
    devices = {p.device.type for group in param_groups for p in group["params"]}
    fused = True if devices <= {"cpu", "cuda"} else None
    return torch.optim.AdamW(param_groups, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay, fused=fused)


def average_gradients(params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """Replace each gradient by its mean over the processes (data parallelism: what DDP computes), in buckets."""
    if world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel()
        if size >= ALLREDUCE_BUCKET or i == len(grads) - 1:
            flat = torch.cat([b.reshape(-1) for b in bucket])  # (size,)
            torch.distributed.all_reduce(flat)
            flat /= world_size
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def _broadcast_parameters(module: torch.nn.Module, accelerator: Any) -> None:
    """Make every process start from the main process's weights (they are seeded alike; this guarantees it)."""
    if accelerator.num_processes > 1:
        with torch.no_grad():
            for p in module.parameters():
                torch.distributed.broadcast(p.data, src=0)


def enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    """Recompute activations in the backward pass, with diffusers' own switch on each of its blocks (what
    ``ModelMixin.enable_gradient_checkpointing`` does; our ControlNet is a plain ``nn.Module``)."""

    def checkpoint(block: Callable, *args: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    for m in module.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = True
            m._gradient_checkpointing_func = checkpoint


# --------------------------------------------------------------------------- setting up


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def _load_base(base: str | Path | None, device: torch.device) -> Any:
    """The base's components (through the inference pipeline's loader), fp32, on ``device``."""
    from controlnet.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(base, dtype=torch.float32, device=device)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if pipe.text_encoder_2 is not None:
        pipe.text_encoder_2.requires_grad_(False)
    return pipe


def _check_resolution(resolution: int, base: Any) -> int:
    """``resolution`` if the VAE and every UNet downsampling divide it; else a one-line error."""
    factor = base.vae_scale_factor * 2 ** (len(base.unet.config.down_block_types) - 1)
    if resolution % factor:
        lower = max(factor, resolution // factor * factor)
        raise UserError(f"--resolution {resolution} must be a multiple of {factor} for this base "
                        f"(VAE x UNet downsampling); try {lower}")
    return int(resolution)


def _encoders(base: Any, config: TrainConfig) -> Encoders:
    """The VAE / text encoder / annotator callables that fill the caches, with their identities."""
    vae, device = base.vae, base.device

    def encode_images(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x.to(device, vae.dtype)).latent_dist.parameters.float().cpu()  # (B, 2C, h, w)

    def encode_prompts(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = base.encode_prompt(prompts)
        return hidden.float().cpu(), (pooled.float().cpu() if pooled is not None else None)

    annotate = annotator_id = None
    if config.annotator:
        annotate, annotator_id = _annotator(config.annotator, config.annotator_params)
    return Encoders(
        encode_images=encode_images,
        encode_prompts=encode_prompts,
        vae_id=module_digest(vae),
        text_id=entry_key(module_digest(base.text_encoder, base.text_encoder_2),
                          tokenizer_digest(base.tokenizer, base.tokenizer_2)),
        annotate=annotate,
        annotator_id=annotator_id,
    )


def _annotator(name: str, params: dict[str, Any]) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """The annotator ``name`` bound to ``params`` (completed with its defaults), and its identity for the cache."""
    from controlnet import annotators

    annotator = annotators.get(name)
    resolved = annotator.resolve(dict(params)) if hasattr(annotator, "resolve") else dict(params)

    def annotate(image: np.ndarray) -> np.ndarray:
        return annotator(image, **resolved)

    return annotate, entry_key("annotator", name, resolved)


def _make_controlnet(config: TrainConfig, unet: torch.nn.Module, vae_scale_factor: int) -> ControlNet:
    """``--init`` (checked against the base), or a new copy of the base's encoder with zero convs at zero."""
    if config.init:
        from controlnet.checkpoints import check_compatible, load_controlnet

        cn = load_controlnet(config.init, dtype=torch.float32)
        check_compatible(cn, unet)
        return cn
    cn = ControlNet.from_unet(unet, vae_scale_factor=vae_scale_factor, architecture=config.architecture)
    if config.zero_conv_init == "gaussian":  # the ablation: the base is disturbed from the first step
        with torch.no_grad():
            for conv in (*cn.zero_convs(), cn.controlnet_cond_embedding.conv_out):
                torch.nn.init.normal_(conv.weight, std=ABLATION_GAUSSIAN_STD)
                torch.nn.init.normal_(conv.bias, std=ABLATION_GAUSSIAN_STD)
    return cn


def _decoder_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The base's decoder (up blocks, output norm and conv), by name: what ``--unlock-decoder-after`` trains."""
    return {name: p for name, p in unet.named_parameters() if name.startswith(DECODER_PREFIXES)}


def _save_unet(unet: torch.nn.Module, path: Path) -> Path:
    """The base UNet with its trained decoder, as a diffusers ``unet/`` folder, atomically."""
    with atomic_path(path) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    return path


# --------------------------------------------------------------------------- checkpoints


def _list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first (temporary folders start with '.')."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def _resume_dir(resume: str | Path | None, out: Path, say: bool = True) -> Path | None:
    if resume is None:
        return None
    if str(resume) == "latest":
        found = _list_checkpoints(out)
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


def _check_fresh(out: Path) -> None:
    if _list_checkpoints(out):
        raise UserError(f"{out} already holds checkpoints of a run; pass --resume latest to continue it, "
                        "or choose a new --out")


def _rng_state() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_gauss), float(np_cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out: Path, step: int, position: int, controlnet: ControlNet,
                     decoder: dict[str, torch.nn.Parameter], optimizer: Any, lr_scheduler: Any,
                     config: TrainConfig, scaler: Any = None) -> list[Path]:
    """Write OUT/checkpoints/step-N atomically, then drop the oldest beyond ``config.keep``; the kept ones.

    A failure while writing leaves the earlier checkpoints as they were (the new one is never half there).
    """
    from safetensors.torch import save_file

    from controlnet.checkpoints import save_controlnet

    path = out / "checkpoints" / f"step-{step:06d}"
    unlocked = bool(decoder) and any(p.requires_grad for p in decoder.values())
    state = {
        "version": 1,
        "step": step,
        "position": position,  # samples of the stream consumed (all processes)
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        "config": config.to_dict(),
        "decoder_unlocked": unlocked,
    }
    try:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            save_controlnet(controlnet, tmp / "controlnet")
            if unlocked:
                save_file({k: v.detach().to("cpu").contiguous() for k, v in decoder.items()}, str(tmp / DECODER_FILE))
            torch.save(state, tmp / STATE_FILE)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        raise UserError(f"writing checkpoint {path} failed ({err}); the earlier checkpoints are intact: fix the "
                        "cause (disk space?) and rerun with --resume latest") from None
    kept = _list_checkpoints(out)
    if config.keep:
        for old in kept[: -config.keep]:
            doomed = old.with_name(f".{old.name}.deleting")
            os.replace(old, doomed)  # gone from the list at once, even if removal is interrupted
            shutil.rmtree(doomed, ignore_errors=True)
        kept = kept[-config.keep :]
    return kept


# Settings that must not change for a resumed run to end as an uninterrupted one would.
SAME_ON_RESUME = ("seed", "batch_size", "grad_accum", "resolution", "empty_prompt_prob", "hflip", "lr",
                  "decoder_lr", "unlock_decoder_after", "mixed_precision", "weight_decay", "max_grad_norm",
                  "lr_warmup_steps", "annotator", "annotator_params")


def _check_optimizer_state(saved: dict[str, Any], optimizer: Any, path: Path) -> None:
    """The saved AdamW moments must have the shapes of the parameters they will be matched to (by index), or
    torch's fused AdamW fails deep inside (or silently mixes tensors up)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, moments in saved.get("state", {}).items():
        i = int(index)
        shapes = {tuple(v.shape) for k, v in moments.items() if k in ("exp_avg", "exp_avg_sq")}
        if i >= len(params) or any(shape != tuple(params[i].shape) for shape in shapes):
            raise UserError(f"checkpoint {path}: its optimizer state does not fit this ControlNet's parameters "
                            "(made by another version of controlnet or another --architecture); resume with the "
                            "version that wrote it, or start from its weights with --init")


def _load_checkpoint(path: Path, controlnet: ControlNet, decoder: dict[str, torch.nn.Parameter], optimizer: Any,
                     lr_scheduler: Any, config: TrainConfig, scaler: Any = None) -> tuple[int, int]:
    """Restore a checkpoint in place; returns (step, stream position)."""
    import pickle

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
    _check_optimizer_state(state["optimizer"], optimizer, path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError:
        raise UserError(f"checkpoint {path} was made with{'out' if decoder else ''} --unlock-decoder-after; "
                        "resume with the same setting") from None
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    saved_config = state.get("config", {})
    changed = [k for k in SAME_ON_RESUME if k in saved_config and saved_config[k] != config.to_dict()[k]]
    if changed:
        warnings.warn(f"resuming with other settings than the checkpoint's ({', '.join(changed)}); the run will not "
                      "match an uninterrupted one", stacklevel=3)
    return int(state["step"]), int(state["position"])


# --------------------------------------------------------------------------- log, validation, summary


class _RunLog:
    """OUT/log.jsonl, one JSON object per line, and TensorBoard scalars when the package is installed.

    Only the main process writes. On resume, records after the checkpoint's step (written before the kill) are
    dropped, so the log reads as one run.
    """

    def __init__(self, path: Path, enabled: bool, keep_until: int | None, tensorboard: bool):
        self.path, self.enabled = path, enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        kept = [r for r in self._read() if keep_until is not None and r.get("step", 0) <= keep_until]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a", encoding="utf-8")
        if tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(path.parent / "tensorboard"))

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        return records

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            if record.get("kind") == "train":
                self._tb.add_scalar("train/loss", record["loss"], record["step"])
                self._tb.add_scalar("train/lr", record["lr"], record["step"])
                self._tb.add_scalar("train/samples_per_s", record["samples_per_s"], record["step"])
            elif record.get("kind") == "validation":
                self._tb.add_scalar(f"validation/{record['metric']}", record["score"], record["step"])

    def records(self) -> list[dict[str, Any]]:
        return self._read()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _is_fill_prompt(prompt: str) -> bool:
    from controlnet.data.fill import parse_prompt

    try:
        parse_prompt(prompt)
    except UserError:
        return False
    return True


Scorer = Callable[[np.ndarray, np.ndarray, str, np.ndarray], float]


def make_scorer(score: str, annotator: str | None, annotator_params: dict[str, Any],
                prompts: Sequence[str]) -> tuple[str, Scorer]:
    """The controllability score of a validation sample (DESIGN.md, ControlNet++'s protocol scaled down):
    the condition re-extracted from the sample and compared with the input condition.

    ``score="auto"``: Canny conditions → edge F1; fill circles (every validation prompt is a fill prompt) → IoU of
    the filled disk; another annotator → SSIM of the re-extracted condition; otherwise SSIM of the sample against
    the dataset's image. Returns (metric name, ``fn(sample, condition, prompt, target) -> float``).
    """
    if score == "auto":
        if annotator == "canny":
            score = "canny"
        elif annotator is None and prompts and all(_is_fill_prompt(p) for p in prompts):
            score = "fill"
        else:
            score = "ssim"
    if score == "canny":
        from controlnet import annotators
        from controlnet.metrics import edge_f1

        canny = annotators.get("canny")
        params = dict(annotator_params) if annotator == "canny" else {}
        return "edge_f1", lambda s, c, p, t: float(edge_f1(canny(s, **params), c))
    if score == "fill":
        from controlnet.data.fill import fill_iou

        return "fill_iou", lambda s, c, p, t: float(fill_iou(s, c, p if _is_fill_prompt(p) else None))
    from controlnet.metrics import ssim

    if annotator is not None:
        from controlnet import annotators

        annotate = annotators.get(annotator)
        return "ssim", lambda s, c, p, t: float(ssim(annotate(s, **annotator_params), c))
    return "ssim", lambda s, c, p, t: float(ssim(s, t))


class _Validator:
    """Samples for fixed validation conditions (the first ``validation_count`` examples) with the current
    ControlNet, a PNG grid per validation (rows: condition | sample | image) and the controllability score."""

    def __init__(self, config: TrainConfig, base: Any, examples: Sequence[PreparedExample], store: CacheStore,
                 resolution: int, dtype: torch.dtype, out: Path):
        from diffusers import DDIMScheduler

        self.components = dict(
            unet=base.unet, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
            scheduler=DDIMScheduler.from_config(base.scheduler_config),  # the original's sampler
            text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
        )
        self.device, self.dtype, self.out, self.config, self.resolution = base.device, dtype, out, config, resolution
        chosen = examples[: config.validation_count]
        self.items = [(store.load_condition(ex.condition_key), ex.prompt, to_resolution(load_rgb(ex.image), resolution))
                      for ex in chosen]
        self.metric, self.scorer = make_scorer(config.score, config.annotator, config.annotator_params,
                                               [p for _, p, _ in self.items])

    def run(self, step: int, controlnet: ControlNet, unet: torch.nn.Module) -> dict[str, Any]:
        from controlnet.images import save_png
        from controlnet.pipeline import ControlUnit, Pipeline

        pipe = Pipeline(**self.components, dtype=self.dtype, device=self.device)
        was_training = controlnet.training
        controlnet.eval()
        rows, scores = [], []
        for cond, prompt, target in self.items:
            result = pipe(prompt=prompt, controls=[ControlUnit(controlnet=controlnet, image=cond, strength=1.0)],
                          steps=self.config.validation_steps, guidance=self.config.validation_guidance,
                          seed=self.config.seed, size=(self.resolution, self.resolution), output_type="np",
                          progress=False)
            sample = np.asarray(result.images[0], dtype=np.uint8)  # (R, R, 3)
            scores.append(self.scorer(sample, cond, prompt, target))
            rows.append(np.concatenate([cond, sample, target], axis=1))
        controlnet.train(was_training)
        score = float(np.mean(scores))
        path = self.out / "validation" / f"step-{step:06d}.png"
        save_png(path, np.concatenate(rows, axis=0),
                 {"step": str(step), "metric": self.metric, "score": f"{score:.4f}",
                  "layout": "one row per validation example: condition | sample | dataset image"})
        return {"kind": "validation", "step": step, "metric": self.metric, "score": score, "scores": scores,
                "grid": str(path.relative_to(self.out))}


def sudden_convergence_step(steps: Sequence[int], scores: Sequence[float],
                            min_gain: float = SUDDEN_CONVERGENCE_MIN_GAIN, plateau: int = FINAL_PLATEAU) -> int | None:
    """The step of the "sudden convergence" (paper Sec. 4.1, Fig. 4) in a series of validation scores, or None.

    Rule: ``s0`` is the first score (the new ControlNet ignores its condition), ``s_end`` the mean of the last
    ``plateau`` scores after the first (the final plateau). If ``s_end - s0 < min_gain`` there was no jump
    (None). Otherwise the jump is at the first validation step from which every score stays at or above the
    midpoint ``(s0 + s_end) / 2``: the model switched from ignoring to following the condition there.
    """
    if len(scores) < 2:
        return None
    s0 = float(scores[0])
    s_end = float(np.mean(scores[1:][-plateau:]))
    if s_end - s0 < min_gain:
        return None
    mid = (s0 + s_end) / 2
    jump = None
    for step, score in zip(steps, scores):
        if score >= mid:
            jump = step if jump is None else jump
        else:
            jump = None
    return jump


def write_plot(path: Path, records: Sequence[dict[str, Any]], jump: int | None) -> Path | None:
    """A PNG of the loss and the controllability score against steps (matplotlib's object API, no pyplot state);
    None when matplotlib is not installed or nothing was logged."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    train_recs = [r for r in records if r.get("kind") == "train"]
    val_recs = [r for r in records if r.get("kind") == "validation"]
    if not train_recs and not val_recs:
        return None
    fig = Figure(figsize=(8, 6), dpi=100)
    ax_loss, ax_score = fig.subplots(2, 1, sharex=True)
    if train_recs:
        steps = [r["step"] for r in train_recs]
        losses = np.array([r["loss"] for r in train_recs])
        ema = np.empty_like(losses)
        for i, value in enumerate(losses):  # exponential moving average, 0.9 (as TensorBoard's smoothing)
            ema[i] = value if i == 0 else 0.9 * ema[i - 1] + 0.1 * value
        ax_loss.plot(steps, losses, alpha=0.3, label="loss")
        ax_loss.plot(steps, ema, label="loss (EMA 0.9)")
        ax_loss.legend()
    ax_loss.set_ylabel("MSE loss")
    if val_recs:
        ax_score.plot([r["step"] for r in val_recs], [r["score"] for r in val_recs], marker="o")
        ax_score.set_ylabel(val_recs[-1]["metric"])
    else:
        ax_score.set_ylabel("controllability (no validation)")
    if jump is not None:
        for ax in (ax_loss, ax_score):
            ax.axvline(jump, linestyle="--", color="grey")
        ax_score.annotate(f"sudden convergence: step {jump}", (jump, ax_score.get_ylim()[0]), fontsize=8)
    ax_score.set_xlabel("step")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
