"""The training loop: read the inputs and set up (:mod:`controlnet.train.setup`), then for each optimizer step:
micro-batches → loss → backward (DDP averages the gradients over the processes on the last one) → clip → AdamW
step → log / validate / checkpoint; then the outputs.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from controlnet.data.cache import module_digest
from controlnet.train.config import TrainConfig, TrainResult
from controlnet.train.distributed import data_parallel, gradient_sync, make_accelerator
from controlnet.train.folder import run_folder
from controlnet.train.log import write_plot
from controlnet.train.flow import save_trained
from controlnet.train.setup import LOG_FILE, Run, read_inputs, save_unet, set_up
from controlnet.train.state import save_checkpoint
from controlnet.train.validation import sudden_convergence_step

PLOT_FILE = "training.png"


def train(config: TrainConfig) -> TrainResult:
    """Train a ControlNet as ``config`` says (see :mod:`controlnet.train` for the recipe).

    Run it under ``accelerate launch`` (or ``torchrun``) for several processes; each process calls it alike.
    """
    config.check()
    accelerator = make_accelerator(config.mixed_precision)
    out = Path(config.out).expanduser()
    inputs = read_inputs(config, accelerator, out)
    with run_folder(out, accelerator):
        run = set_up(config, accelerator, out, inputs)
        del inputs  # the run holds what it needs; the base's VAE and text encoders can go
        run.log.write({"kind": "start", "step": run.step, "examples": run.examples, "skipped": len(run.skipped),
                       "processes": accelerator.num_processes, "global_batch": _global_batch(run),
                       "cache": run.cache.as_dict(), "resumed_from": str(run.resume_dir) if run.resume_dir else None,
                       "locked_base": run.locked_digest})
        if run.validator is not None and run.step == 0:
            run.log.write(run.validator.run(0, run.controlnet))
        losses, empty_prompts = optimize(run)
        return finish(run, losses, empty_prompts)


def optimize(run: Run) -> tuple[list[float], int]:
    """Run the optimizer steps left; each step's mean loss over the processes, and the empty prompts seen."""
    from tqdm.auto import tqdm

    config, accelerator = run.config, run.accelerator
    controlnet, unet = data_parallel(run.controlnet, accelerator), run.unet  # unet: wrapped once it trains
    trainable = list(run.controlnet.parameters())
    unlocked = False
    losses: list[float] = []
    empty_prompts = 0
    micro_loss = torch.zeros((), device=accelerator.device)
    micro_empty = torch.zeros((), device=accelerator.device)
    bar = tqdm(total=config.max_steps, initial=run.step, desc="training", dynamic_ncols=True,
               disable=not accelerator.is_main_process or config.quiet)
    started = time.perf_counter()
    for micro, batch in enumerate(run.loader):
        if run.decoder and not unlocked and run.step >= config.unlock_decoder_after:  # sd_locked=False
            for p in run.decoder.values():
                p.requires_grad_(True)
            unet = data_parallel(run.unet, accelerator)  # a DDP wrapper's parameters are fixed when it is made
            trainable += list(run.decoder.values())
            unlocked = True
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        last = (micro + 1) % config.grad_accum == 0  # the step's last micro-batch
        with gradient_sync((controlnet, unet), sync=last):
            with accelerator.autocast():
                loss = run.objective(controlnet, unet, batch)
            accelerator.backward(loss / config.grad_accum)
        micro_loss += loss.detach().float() / config.grad_accum
        micro_empty += batch["empty"].sum()
        if not last:
            continue

        grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm) if config.max_grad_norm else None
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        run.position += _global_batch(run)
        losses.append(accelerator.reduce(micro_loss, "mean").item())
        step_empty = int(accelerator.reduce(micro_empty, "sum").item())
        empty_prompts += step_empty
        micro_loss.zero_()
        micro_empty.zero_()
        rate = _global_batch(run) / max(time.perf_counter() - started, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_s=f"{rate:.2f}")
        run.log.write({"kind": "train", "step": run.step, "loss": losses[-1], "lr": run.lr_scheduler.get_last_lr()[0],
                       "samples_per_s": rate, "samples": _global_batch(run), "empty_prompts": step_empty,
                       "grad_norm": float(grad_norm) if grad_norm is not None else None})
        if run.validator is not None and run.step % config.validate_every == 0:
            run.log.write(run.validator.run(run.step, run.controlnet))
        if config.checkpoint_every and run.step % config.checkpoint_every == 0:
            _checkpoint(run)
        accelerator.wait_for_everyone()
        started = time.perf_counter()  # validation and checkpoints do not count against samples/s
    bar.close()
    return losses, empty_prompts


def finish(run: Run, losses: list[float], empty_prompts: int) -> TrainResult:
    """The last checkpoint and validation, the outputs, the end record and the plot."""
    config, out, main = run.config, run.out, run.accelerator.is_main_process
    unet_path = export = plot = None
    if main:
        if run.last_saved != run.step:
            _checkpoint(run)
        if run.validator is not None and run.step not in {r["step"] for r in _validations(run)}:
            run.log.write(run.validator.run(run.step, run.controlnet))
        save_trained(run.controlnet, out / "controlnet")
        if run.decoder and run.step > config.unlock_decoder_after:  # the decoder trained in at least one step
            unet_path = save_unet(run.unet, out / "unet")
        if config.export_original:
            from controlnet.checkpoints import save_controlnet

            export = save_controlnet(run.controlnet, Path(config.export_original).expanduser(), format="original")
        locked_after = module_digest(run.unet, exclude=run.decoder)
    validations = _validations(run) if main else []
    jump = sudden_convergence_step([r["step"] for r in validations], [r["score"] for r in validations])
    if main:
        run.log.write({"kind": "end", "step": run.step, "convergence_step": jump, "locked_base": locked_after,
                       "mean_loss_last_100": statistics.fmean(losses[-100:]) if losses else None})
        if locked_after != run.locked_digest:
            raise RuntimeError("the locked base model changed during training; this is a bug, please report it")
        if config.plot:
            plot = write_plot(out / PLOT_FILE, run.log.records(), jump)
    run.log.close()
    run.accelerator.wait_for_everyone()
    if run.accelerator.num_processes > 1:
        run.accelerator.end_training()  # destroys the process group (gloo aborts at exit otherwise)
    return TrainResult(
        out=out, controlnet=out / "controlnet", step=run.step, losses=losses,
        samples=len(losses) * _global_batch(run), empty_prompts=empty_prompts, skipped=run.skipped, cache=run.cache,
        checkpoints=run.checkpoints, validations=validations, convergence_step=jump, log=out / LOG_FILE, plot=plot,
        unet=unet_path, export_original=export, resumed_from=run.resume_dir,
    )


def _global_batch(run: Run) -> int:
    """Samples per optimizer step, all processes together."""
    return run.config.batch_size * run.config.grad_accum * run.accelerator.num_processes


def _checkpoint(run: Run) -> None:
    if run.accelerator.is_main_process:
        run.checkpoints = save_checkpoint(run.out, run.step, run.position, run.controlnet, run.decoder, run.optimizer,
                                          run.lr_scheduler, run.config, run.accelerator.scaler)
        run.log.write({"kind": "checkpoint", "step": run.step, "path": str(run.checkpoints[-1])})
    run.last_saved = run.step


def _validations(run: Run) -> list[dict]:
    return [r for r in run.log.records() if r.get("kind") == "validation"]
