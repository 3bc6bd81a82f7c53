"""Setting a run up, in two parts.

:func:`read_inputs` reads and checks what the run is given without writing anything: the base and
``--resolution``, the ControlNet to train (``--init`` checked against the base), the data's manifest and
``--resume``. Then, with OUT locked (:mod:`controlnet.train.folder`), :func:`set_up` fills the caches, locks the
base, makes the optimizer, restores a checkpoint and opens the sample stream, gathered in a :class:`Run` that the
loop (:mod:`controlnet.train.loop`) advances.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from controlnet.data.cache import CacheStats, CacheStore, bound_annotator, entry_key, module_digest, tokenizer_digest
from controlnet.data.datasets import (
    Encoders, Manifest, Preparation, SkippedRow, StreamBatches, TrainDataset, collate_samples, describe_skipped,
    prepare_examples, read_manifest, warn_resized,
)
from controlnet.errors import UserError
from controlnet.fileio import atomic_path, atomic_write_text
from controlnet.devices import DTYPES
from controlnet.model import ControlNet
from controlnet.train.config import CONTROL_LORA, DEFAULT_CONTROL_LORA_RANK, TrainConfig
from controlnet.train.flow import (FlowValidator, caches_condition_latents, check_unet_options, flow_encoders,
                                   flow_family, flow_objective, is_flow_pipeline, latent_normalisation,
                                   read_flow_base)
from controlnet.train.log import RunLog
from controlnet.train.objective import (DenoisingObjective, constant_after_warmup, enable_gradient_checkpointing,
                                        make_adamw)
from controlnet.train.state import check_fresh, list_checkpoints, load_checkpoint, resume_folder
from controlnet.train.validation import Validator

# The standard deviation of the Gaussian-initialised "zero" convs of the paper's ablation (Sec. 4.2, Fig. 8);
# the paper gives none, 0.02 is the usual choice (and model.PaperHintEncoder's).
ABLATION_GAUSSIAN_STD = 0.02
# The base's "decoder" that --unlock-decoder-after trains (the original's sd_locked=False: output_blocks + out).
DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")
LOG_FILE = "log.jsonl"


@dataclass
class Inputs:
    """What a run is given, read and checked (:func:`read_inputs`)."""

    base: Any  # the base's components (controlnet.pipeline.Pipeline; Flux/SD3: TransformerPipeline), fp32, locked
    resolution: int
    controlnet: ControlNet  # fp32, a new copy of the base's encoder (Flux/SD3: first blocks) or --init
    manifest: Manifest
    resume_dir: Path | None  # the checkpoint to resume from, None for a fresh run


@dataclass
class Run:
    """A training run's models, optimizer, data and progress. Only the main process writes files."""

    config: TrainConfig
    accelerator: Any
    out: Path
    controlnet: ControlNet  # fp32 master weights, trained
    unet: torch.nn.Module  # the locked UNet or transformer, in the mixed-precision dtype unless its decoder trains
    decoder: dict[str, torch.nn.Parameter]  # the UNet's decoder by name, when --unlock-decoder-after is set
    objective: Any  # objective(controlnet, unet, batch) -> loss: the base's (controlnet.train.objective)
    resolution: int
    unet_dtype: torch.dtype
    optimizer: Any
    lr_scheduler: Any
    loader: torch.utils.data.DataLoader  # this process's share of the sample stream, from `position` on
    log: RunLog
    validator: Validator | None
    cache: CacheStats
    examples: int
    skipped: list[SkippedRow]
    locked_digest: str | None  # of the locked base, checked again at the end
    resume_dir: Path | None
    step: int = 0  # optimizer steps done
    position: int = 0  # samples of the stream consumed (all processes)
    checkpoints: list[Path] = field(default_factory=list)
    last_saved: int = -1


def read_inputs(config: TrainConfig, accelerator: Any, out: Path) -> Inputs:
    """The manifest, the checkpoint to resume from, the base and the ControlNet to train; nothing is written."""
    main, device = accelerator.is_main_process, accelerator.device
    manifest = read_manifest(config.data, need_conditions=config.annotator is None, strict=config.strict)
    resume_dir = resume_folder(config.resume, out, say=main and not config.quiet)
    if resume_dir is None:
        check_fresh(out)  # on every process: an error must stop them all
    family = flow_family(config.base)
    if family is not None:  # Flux / SD3 / Qwen-Image: controlnet.train.flow
        base, resolution, controlnet = read_flow_base(config, family, device)
        return Inputs(base, resolution, controlnet, manifest, resume_dir)
    check_unet_options(config)
    base = load_base(config.base, device)
    resolution = check_resolution(config.resolution or base.native_size, base)
    torch.manual_seed(config.seed)  # a new ControlNet starts alike on every process
    controlnet = make_controlnet(config, base.unet, base.vae_scale_factor).to(device=device, dtype=torch.float32)
    return Inputs(base, resolution, controlnet, manifest, resume_dir)


def set_up(config: TrainConfig, accelerator: Any, out: Path, inputs: Inputs) -> Run:
    """Everything the loop needs, on every process alike; only the main process writes."""
    from diffusers import DDPMScheduler

    main, device = accelerator.is_main_process, accelerator.device
    base, resolution, controlnet, resume_dir = inputs.base, inputs.resolution, inputs.controlnet, inputs.resume_dir
    prep, skipped, store = prepare_data(config, inputs.manifest, base, resolution, accelerator, out,
                                        condition_latents=caches_condition_latents(base, controlnet))
    unet, decoder, unet_dtype = lock_base(config, base, controlnet)
    validator = None
    if config.validate_every and main:
        validator = (FlowValidator if is_flow_pipeline(base) else Validator)(config, base, prep.examples, store,
                                                                              resolution, unet_dtype, out)
    objective = (flow_objective(config, base, unet_dtype) if is_flow_pipeline(base)
                 else DenoisingObjective(DDPMScheduler.from_config(base.scheduler_config), unet_dtype, resolution))
    normalisation = latent_normalisation(base)  # latents scaled to unit variance (SD1.x: 0.18215)
    del base  # the caches hold what the VAE and the text encoders computed (the validator keeps its own refs)

    # (a Control-LoRA's copied base weights are frozen: only its deltas and whole tensors train)
    groups = [{"params": [p for p in controlnet.parameters() if p.requires_grad], "lr": config.lr}]
    if decoder:  # its parameters get gradients only once unlocked
        groups.append({"params": list(decoder.values()), "lr": config.decoder_lr})
    optimizer = make_adamw(groups, config.weight_decay)
    lr_scheduler = constant_after_warmup(optimizer, config.lr_warmup_steps)
    step = position = 0
    if resume_dir is not None:
        step, position = load_checkpoint(resume_dir, controlnet, decoder, optimizer, lr_scheduler, config,
                                         scaler=accelerator.scaler)
        if main and not config.quiet:
            print(f"resuming from {resume_dir} at step {step}", file=sys.stderr)

    dataset = TrainDataset(prep.examples, store, config.seed, config.empty_prompt_prob, config.hflip,
                           objective.num_timesteps, empty_text_key=prep.empty_text_key, **normalisation)
    micro_steps = max(0, config.max_steps - step) * config.grad_accum
    sampler = StreamBatches(config.batch_size, position, micro_steps, accelerator.process_index,
                            accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                         collate_fn=collate_samples, pin_memory=device.type == "cuda")
    log = RunLog(out / LOG_FILE, enabled=main, keep_until=step if resume_dir is not None else None,
                 tensorboard=config.tensorboard)
    return Run(
        config=config, accelerator=accelerator, out=out, controlnet=controlnet, unet=unet, decoder=decoder,
        objective=objective, resolution=resolution, unet_dtype=unet_dtype,
        optimizer=accelerator.prepare_optimizer(optimizer),  # fp16: gradient scaling happens through it
        lr_scheduler=lr_scheduler, loader=loader, log=log, validator=validator, cache=prep.stats,
        examples=len(prep.examples), skipped=skipped,
        locked_digest=module_digest(unet, exclude=decoder) if main else None, resume_dir=resume_dir,
        step=step, position=position, checkpoints=list_checkpoints(out),
        last_saved=step if resume_dir is not None else -1,
    )


def load_base(base: str | Path | None, device: torch.device) -> Any:
    """The base's components (through the inference pipeline's loader), fp32, on ``device``, all locked."""
    from controlnet.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(base, dtype=torch.float32, device=device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        if module is not None:
            module.requires_grad_(False)
    return pipe


def check_resolution(resolution: int, base: Any) -> int:
    """``resolution`` if the VAE and every UNet downsampling divide it; else a one-line error."""
    factor = base.vae_scale_factor * 2 ** (len(base.unet.config.down_block_types) - 1)
    if resolution % factor:
        lower = max(factor, resolution // factor * factor)
        raise UserError(f"--resolution {resolution} must be a multiple of {factor} for this base "
                        f"(VAE x UNet downsampling); try {lower}")
    return int(resolution)


def make_controlnet(config: TrainConfig, unet: torch.nn.Module, vae_scale_factor: int) -> ControlNet:
    """``--init`` (checked against the base), or a new copy of the base's encoder with zero convs at zero."""
    if config.init:
        from controlnet.checkpoints import check_compatible, load_controlnet

        cn = load_controlnet(config.init, dtype=torch.float32)
        check_compatible(cn, unet)
        return cn.train()
    low_rank = config.architecture == CONTROL_LORA  # a copy whose copied layers then learn low-rank deltas
    cn = ControlNet.from_unet(unet, vae_scale_factor=vae_scale_factor,
                              architecture="copy" if low_rank else config.architecture)
    if low_rank:
        from controlnet.control_lora_train import add_low_rank

        add_low_rank(cn, config.rank or DEFAULT_CONTROL_LORA_RANK)
    if config.zero_conv_init == "gaussian":  # the ablation: the base is disturbed from the first step
        with torch.no_grad():
            for conv in (*cn.zero_convs(), cn.controlnet_cond_embedding.conv_out):
                torch.nn.init.normal_(conv.weight, std=ABLATION_GAUSSIAN_STD)
                torch.nn.init.normal_(conv.bias, std=ABLATION_GAUSSIAN_STD)
    return cn.train()


def prepare_data(config: TrainConfig, manifest: Manifest, base: Any, resolution: int, accelerator: Any,
                 out: Path, condition_latents: bool = False) -> tuple[Preparation, list[SkippedRow], CacheStore]:
    """Fill the caches for the manifest's examples (only what is missing; with ``condition_latents``, the
    conditions' VAE posteriors too); bad rows are skipped and listed."""
    from accelerate.utils import gather_object

    main = accelerator.is_main_process
    store = CacheStore(Path(config.cache_dir).expanduser() if config.cache_dir else out / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' / transformers' chatter while encoding
        prep = prepare_examples(
            manifest, store, make_encoders(base, config), resolution, hflip=config.hflip,
            rank=accelerator.process_index, world_size=accelerator.num_processes, gather=gather_object,
            progress=main and not config.quiet, condition_latents=condition_latents,
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
    return prep, skipped, store


def make_encoders(base: Any, config: TrainConfig) -> Encoders:
    """The VAE / text encoder / annotator callables that fill the caches, with their identities."""
    if is_flow_pipeline(base):
        return flow_encoders(base, config)
    vae, device = base.vae, base.device

    def encode_images(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x.to(device, vae.dtype)).latent_dist.parameters.float().cpu()  # (B, 2C, h, w)

    def encode_prompts(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pooled = base.encode_prompt(prompts)
        return hidden.float().cpu(), (pooled.float().cpu() if pooled is not None else None)

    annotate = annotator_id = None
    if config.annotator:
        annotate, annotator_id = bound_annotator(config.annotator, config.annotator_params)
    return Encoders(
        encode_images=encode_images,
        encode_prompts=encode_prompts,
        vae_id=module_digest(vae),
        text_id=entry_key(module_digest(base.text_encoder, base.text_encoder_2),
                          tokenizer_digest(base.tokenizer, base.tokenizer_2)),
        annotate=annotate,
        annotator_id=annotator_id,
    )


def lock_base(config: TrainConfig, base: Any, controlnet: ControlNet
              ) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter], torch.dtype]:
    """The locked UNet (in the mixed-precision dtype, unless its decoder will train: fp32 master weights then),
    its decoder's parameters by name (empty without --unlock-decoder-after) and the UNet's dtype."""
    unet = (base.transformer if is_flow_pipeline(base) else base.unet).requires_grad_(False).eval()
    decoder = ({name: p for name, p in unet.named_parameters() if name.startswith(DECODER_PREFIXES)}
               if config.unlock_decoder_after is not None else {})
    unet_dtype = torch.float32 if decoder else DTYPES[config.mixed_precision]
    if unet_dtype != torch.float32:
        torch.nn.Module.to(unet, dtype=unet_dtype)  # (ModelMixin.to warns on every cast in diffusers 0.42)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(controlnet)
        unet.enable_gradient_checkpointing()
    return unet, decoder, unet_dtype


def save_unet(unet: torch.nn.Module, path: Path) -> Path:
    """The base UNet with its trained decoder, as a diffusers ``unet/`` folder, atomically."""
    with atomic_path(path) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    return path
