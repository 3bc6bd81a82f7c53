"""``controlnet train``: train a ControlNet on a locked base (see :mod:`controlnet.train`).

    controlnet train --data fill50k/ --out runs/fill --max-steps 2000 --validate-every 200
    accelerate launch --num_processes 2 -m controlnet train --data fill50k/ --out runs/fill   # data parallel
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from controlnet.errors import UserError

_HELP = "train a ControlNet on a locked base model (the paper's recipe), resumable"


def register(subparsers: Any) -> None:
    from controlnet import train as t

    p = subparsers.add_parser(
        "train", help=_HELP, description=_HELP + ". Defaults follow the original recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("data and model")
    io.add_argument("--base", default=None, help="base model: a diffusers Stable Diffusion folder (default: the embedded model)")
    io.add_argument("--data", required=True, help="folder with prompt.json (fill50k layout) or metadata.jsonl, or the manifest file")
    io.add_argument("--out", required=True, help="output folder: controlnet/, checkpoints/, log.jsonl, validation/, training.png")
    io.add_argument("--init", default=None, help="start from this ControlNet (folder, file or bundled name) instead of a copy of the base's encoder")
    io.add_argument("--annotator", default=None, help="make conditions from the images with this annotator (e.g. canny); cached")
    io.add_argument("--annotator-param", action="append", default=[], metavar="KEY=VALUE", help="annotator parameter (repeatable)")
    io.add_argument("--resolution", type=int, default=None, help="training size in pixels (default: the base's native size)")
    io.add_argument("--hflip", action="store_true", help="mirror image and condition together with probability 1/2")
    io.add_argument("--strict", action="store_true", help="fail on bad manifest rows instead of skipping them")
    io.add_argument("--cache-dir", default=None, help="where latents / text embeddings / conditions are cached (default: OUT/cache)")
    io.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")

    rec = p.add_argument_group("recipe")
    rec.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    rec.add_argument("--batch-size", type=int, default=t.DEFAULT_BATCH_SIZE, help="samples per process and micro-batch")
    rec.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    rec.add_argument("--lr", type=float, default=t.DEFAULT_LR, help="AdamW learning rate of the ControlNet")
    rec.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up steps (then constant)")
    rec.add_argument("--weight-decay", type=float, default=t.DEFAULT_WEIGHT_DECAY, help="AdamW weight decay")
    rec.add_argument("--max-grad-norm", type=float, default=t.DEFAULT_MAX_GRAD_NORM, help="gradient clipping (0: off)")
    rec.add_argument("--empty-prompt-prob", type=float, default=t.DEFAULT_EMPTY_PROMPT_PROB, help="fraction of prompts replaced by '' (the paper: 0.5)")
    rec.add_argument("--unlock-decoder-after", type=int, default=None, metavar="N", help="from step N also train the base's decoder (the original's sd_locked=False)")
    rec.add_argument("--decoder-lr", type=float, default=t.DEFAULT_DECODER_LR, help="learning rate of the unlocked decoder")
    rec.add_argument("--mixed-precision", choices=list(t.MIXED_PRECISION), default="no", help="accelerate's mixed precision; the locked base is stored in it")
    rec.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass (less memory, more time)")
    rec.add_argument("--zero-conv-init", choices=list(t.ZERO_CONV_INITS), default="zero", help="zero: the paper's zero convolutions; gaussian: the paper's ablation (Gaussian-initialised 1x1 convs)")
    rec.add_argument("--architecture", choices=list(t.ARCHITECTURES), default="copy", help="copy: the paper's ControlNet (a trainable copy of the encoder); lite: the paper's ablation ControlNet-lite (one conv per encoder layer)")
    rec.add_argument("--seed", type=int, default=0, help="seed of the data order, empty prompts, timesteps, noise and the new ControlNet")

    run_ = p.add_argument_group("checkpoints, validation, output")
    run_.add_argument("--checkpoint-every", type=int, default=500, metavar="N", help="checkpoint every N steps (and at the end; 0: only at the end)")
    run_.add_argument("--keep", type=int, default=3, metavar="K", help="checkpoints kept (0: all)")
    run_.add_argument("--resume", default=None, metavar="latest|PATH", help="continue from the latest checkpoint in OUT, or from a checkpoint folder")
    run_.add_argument("--validate-every", type=int, default=0, metavar="N", help="every N steps, sample the validation conditions and score controllability (0: off)")
    run_.add_argument("--validation-count", type=int, default=4, help="the first N examples are the validation conditions")
    run_.add_argument("--validation-steps", type=int, default=20, help="DDIM steps of a validation sample")
    run_.add_argument("--validation-guidance", type=float, default=9.0, help="guidance of a validation sample")
    run_.add_argument("--score", choices=list(t.SCORES), default="auto", help="controllability score (auto: Canny → edge F1, fill circles → IoU, otherwise SSIM)")
    run_.add_argument("--export-original", default=None, metavar="PATH", help="also write the ControlNet in the original layout (.safetensors or .pth)")
    run_.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_.add_argument("--no-plot", action="store_true", help="no training.png")
    run_.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events even if tensorboard is installed")
    p.set_defaults(func=run)


def _annotator_params(name: str | None, pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, converted by the annotator's declared parameter types."""
    if not pairs:
        return {}
    if name is None:
        raise UserError("--annotator-param needs --annotator")
    from controlnet import annotators

    annotator = annotators.get(name)
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--annotator-param expects KEY=VALUE, got {pair!r}")
        params[key] = annotator.param(key).parse(value, name) if hasattr(annotator, "param") else value
    return params


def run(args: argparse.Namespace) -> int:
    from controlnet.train import TrainConfig, train

    config = TrainConfig(
        data=args.data, out=args.out, base=args.base, init=args.init, annotator=args.annotator,
        annotator_params=_annotator_params(args.annotator, args.annotator_param), resolution=args.resolution,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps, lr=args.lr,
        lr_warmup_steps=args.lr_warmup_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        empty_prompt_prob=args.empty_prompt_prob, unlock_decoder_after=args.unlock_decoder_after,
        decoder_lr=args.decoder_lr, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, hflip=args.hflip, seed=args.seed, zero_conv_init=args.zero_conv_init,
        architecture=args.architecture,
        checkpoint_every=args.checkpoint_every, keep=args.keep, resume=args.resume,
        validate_every=args.validate_every, validation_count=args.validation_count,
        validation_steps=args.validation_steps, validation_guidance=args.validation_guidance, score=args.score,
        export_original=args.export_original, strict=args.strict, num_workers=args.num_workers,
        cache_dir=args.cache_dir, progress=not args.no_progress, tensorboard=not args.no_tensorboard,
        plot=not args.no_plot,
    )
    result = train(config)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    lines = [f"trained {result.step} steps; ControlNet: {result.controlnet} "
             f"(use it: controlnet generate --controlnet {result.controlnet} ...)"]
    if result.samples:
        lines.append(f"empty prompts: {result.empty_prompts} of {result.samples} samples ({result.empty_prompt_rate:.1%})")
    if result.skipped:
        lines.append(f"skipped rows: {len(result.skipped)} (listed in {result.out / 'skipped.jsonl'})")
    if result.validations:
        first, last = result.validations[0], result.validations[-1]
        jump = (f"sudden convergence at step {result.convergence_step}" if result.convergence_step is not None
                else "no sudden convergence yet")
        lines.append(f"{last['metric']}: {first['score']:.3f} (step {first['step']}) → {last['score']:.3f} "
                     f"(step {last['step']}); {jump}")
    if result.unet is not None:
        lines.append(f"base UNet with the trained decoder: {result.unet}")
    if result.export_original is not None:
        lines.append(f"original layout: {result.export_original}")
    lines.append(f"log: {result.log}" + (f"; plot: {result.plot}" if result.plot else ""))
    print("\n".join(lines), file=sys.stderr)
    return 0
