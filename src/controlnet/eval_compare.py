"""Two ControlNets on one dataset (``controlnet evaluate --controlnet A --controlnet B``).

Each side is an ordinary evaluation (:func:`controlnet.evaluate.run_plan`) into its own sub-folder of the output
folder, so each resumes as a single run does; both draw image k of every example from seed + k, so the two runs
are paired example by example. The comparison is :func:`controlnet.eval_stats.compare` of the two runs: per
score, the mean of the per-example differences B - A with its paired bootstrap interval, written to
``OUT/comparison.json``. Both sides are checked (condition types, annotator, dataset, models) before either
generates an image.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Sequence

from controlnet.errors import UserError
from controlnet.evaluate import EvalConfig, Generator, controlnet_annotators, plan_evaluation, run_plan

COMPARISON_FILE = "comparison.json"
BASE_ALONE = "none"  # the --controlnet value, and the sub-folder, of the base without a ControlNet
SIDES = ("A", "B")


def run_folder(controlnet: str | None) -> str:
    """The sub-folder name of one side: ``none`` for the base alone, else the name with each run of characters
    other than letters, digits, ``.``, ``_`` and ``-`` made ``--`` (``lllyasviel/control_v11p_sd15_canny`` ->
    ``lllyasviel--control_v11p_sd15_canny``)."""
    if controlnet is None:
        return BASE_ALONE
    return re.sub(r"[^A-Za-z0-9._-]+", "--", str(controlnet)).strip("-.") or "controlnet"


def _same(a: str | None, b: str | None) -> bool:
    """Whether two --controlnet values name one model: equal, or two spellings of one existing path."""
    if a is None or b is None:
        return a is b
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def check_pair(controlnets: Sequence[str | None], annotator: str | None) -> None:
    """One-line :class:`UserError` unless ``controlnets`` are two different models whose conditions one
    annotator can score: without ``annotator``, their names must not say different condition types."""
    if len(controlnets) != 2:
        raise UserError(f"--controlnet: give one to evaluate, or two to compare; got {len(controlnets)}")
    a, b = controlnets
    if _same(a, b):
        raise UserError(f"--controlnet {a or BASE_ALONE} is given twice; name two different ControlNets (or one "
                        f"and '{BASE_ALONE}', the base alone)")
    types = [controlnet_annotators(c) for c in controlnets]
    if annotator is None and None not in types and types[0] != types[1]:
        shared = [name for name in types[0] if name in types[1]]
        fix = (f"pass --annotator {shared[0]} to score both with it" if shared else
               "compare two ControlNets of one condition type")
        said = " vs ".join(", ".join(t) or "no scored condition" for t in types)
        raise UserError(f"--controlnet {a} and --controlnet {b} take different conditions ({said}); {fix}")


def pair_configs(config: EvalConfig, controlnets: Sequence[str | None]) -> tuple[EvalConfig, EvalConfig]:
    """The two sides' settings: ``config`` with each ControlNet, each into ``config.out / run_folder(it)``
    (``-A`` / ``-B`` appended when the two names make one folder name)."""
    folders = [run_folder(c) for c in controlnets]
    if folders[0] == folders[1]:
        folders = [f"{folder}-{side}" for folder, side in zip(folders, SIDES)]
    a, b = (dataclasses.replace(config, controlnet=c, out=Path(config.out) / f)
            for c, f in zip(controlnets, folders))
    return a, b


def evaluate_pair(config: EvalConfig, controlnets: Sequence[str | None],
                  generators: Sequence[Generator] | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate ``config`` with each of two ControlNets (None: the base alone) and compare them; return the
    comparison (also in ``config.out / comparison.json``).

    ``generators``: one per side, in place of the pipeline (as :func:`controlnet.evaluate.evaluate`'s
    ``generate``). Both sides are checked, and both ControlNets loaded on one pipeline, before any generation.
    """
    from controlnet.eval_stats import CONFIDENCE, compare
    from controlnet.fileio import atomic_write_text

    check_pair(controlnets, config.annotator)
    configs = pair_configs(config, controlnets)
    plans = [plan_evaluation(c) for c in configs]
    pipe = None
    if generators is None:
        from controlnet.demo import load_pipeline

        pipe = load_pipeline(config.base)
        for c in configs:
            if c.controlnet is not None:
                pipe.load_controlnet(c.controlnet)  # a bad name or an incompatible model: one line, now
        generators = (None, None)
    summaries = [run_plan(plan, generate, progress, pipe) for plan, generate in zip(plans, generators)]
    table = compare(configs[0].out, configs[1].out, config.bootstrap, config.seed)
    comparison: dict[str, Any] = {
        **{side.lower(): {"controlnet": c.controlnet, "run": str(c.out)} for side, c in zip(SIDES, configs)},
        "difference": "B - A", "score": summaries[0]["score"], "scores": table,
        "bootstrap": {"samples": config.bootstrap, "seed": config.seed, "confidence": CONFIDENCE},
        "notes": list(dict.fromkeys(note for s in summaries for note in s["notes"])),
    }
    if all("fid" in s["scores"] for s in summaries):  # one number per run: no interval, read from the summaries
        comparison["fid"] = {side.lower(): s["scores"]["fid"]["mean"] for side, s in zip(SIDES, summaries)}
    atomic_write_text(Path(config.out) / COMPARISON_FILE, json.dumps(comparison, indent=2) + "\n")
    return comparison
