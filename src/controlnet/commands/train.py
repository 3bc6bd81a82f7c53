"""``controlnet train``: train a ControlNet on a locked base (see :mod:`controlnet.train`).

    controlnet train --data fill50k/ --out runs/fill --max-steps 2000 --validate-every 200
    accelerate launch --num_processes 2 -m controlnet train --data fill50k/ --out runs/fill   # data parallel

The options are :class:`controlnet.train.config.TrainConfig`'s fields: ``--grad-accum`` sets ``grad_accum``;
the help text, option group and default come from the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from controlnet.errors import UserError
from controlnet.options import add_config_options

# accelerate's launcher re-raises a failed process as a CalledProcessError traceback unless given --quiet
# (accelerate/commands/launch.py, _run_subprocess).
_LAUNCH = ("Several processes (GPUs, or CPU processes): accelerate launch --quiet -m controlnet train ... ; with "
           "--quiet a refused option is its one line, without accelerate's traceback of the failed process.")
_HELP = "train a ControlNet on a locked base model (the paper's recipe), resumable"


def register(subparsers: Any) -> None:
    """Add the ``train`` sub-command."""
    from controlnet.train.config import TrainConfig

    p = subparsers.add_parser("train", help=_HELP, description=_HELP + ". Defaults follow the original recipe.",
                              epilog=_LAUNCH)
    add_config_options(p, TrainConfig)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`TrainConfig` of parsed ``controlnet train`` options."""
    from controlnet.train.config import TrainConfig

    values = {}
    for f in dataclasses.fields(TrainConfig):
        values[f.name] = not getattr(args, "no_" + f.name) if hasattr(args, "no_" + f.name) else getattr(args, f.name)
    if values["annotator_params"]:
        if values["annotator"] is None:
            raise UserError("--annotator-param needs --annotator")
        from controlnet.annotators import parse_params

        values["annotator_params"] = parse_params(values["annotator"], values["annotator_params"])
    else:
        values["annotator_params"] = {}
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from controlnet.train import train

    config = config_from_args(args)
    result = train(config)
    from accelerate import PartialState

    if config.quiet or not PartialState().is_main_process:
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
