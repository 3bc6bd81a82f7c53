"""Validation during training: samples for fixed conditions, their controllability score, and the step of the
paper's "sudden convergence".

The score follows ControlNet++'s protocol (Li et al. 2024, Sec. 4), scaled down: the condition is re-extracted
from the generated sample and compared with the condition it was given. A scorer is registered under a name
(``--score NAME``) with :func:`register_scorer`; "canny" and "ssim" are registered here, "fill" by
:mod:`controlnet.data.fill`, which knows its circles. ``--score auto`` picks the first registered scorer whose
``detect`` accepts the run (annotator and validation prompts), else :data:`FALLBACK_SCORER`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

    from controlnet.data.cache import CacheStore
    from controlnet.data.datasets import PreparedExample
    from controlnet.model import ControlNet
    from controlnet.train.config import TrainConfig

# ``score(sample, condition, prompt, target) -> float``: sample, condition and the dataset's image (target) are
# (R, R, 3) uint8 arrays.
ScoreFn = Callable[[np.ndarray, np.ndarray, str, np.ndarray], float]


@dataclass(frozen=True)
class Scorer:
    """A controllability score: ``make(annotator, annotator_params)`` returns the score function of a run,
    ``metric`` names its value in the log, ``detect(annotator, prompts)`` says whether ``--score auto`` picks it."""

    name: str
    metric: str
    make: Callable[[str | None, dict[str, Any]], ScoreFn]
    detect: Callable[[str | None, Sequence[str]], bool] | None = None


_SCORERS: dict[str, Scorer] = {}
# Modules that register scorers when imported; imported on first use of the registry.
SCORER_MODULES = ("controlnet.data.fill",)
FALLBACK_SCORER = "ssim"  # --score auto when no scorer detects the run

# Sudden convergence: the score must rise by at least this much (absolute; the scores are in [0, 1]) between the
# first validation and the final plateau to count as a jump.
SUDDEN_CONVERGENCE_MIN_GAIN = 0.1
FINAL_PLATEAU = 3  # validations averaged for the final plateau


def register_scorer(name: str, metric: str, detect: Callable[[str | None, Sequence[str]], bool] | None = None
                    ) -> Callable[[Callable[[str | None, dict[str, Any]], ScoreFn]], Callable]:
    """Decorator: register ``make(annotator, annotator_params) -> score`` as the scorer ``name``."""

    def add(make: Callable[[str | None, dict[str, Any]], ScoreFn]) -> Callable:
        if name in _SCORERS and _SCORERS[name].make is not make:
            raise ValueError(f"a scorer named {name!r} is already registered")
        _SCORERS[name] = Scorer(name, metric, make, detect)
        return make

    return add


def scorers() -> dict[str, Scorer]:
    """The registered scorers by name."""
    for module in SCORER_MODULES:
        importlib.import_module(module)
    return dict(_SCORERS)


def scorer_names() -> list[str]:
    return sorted(scorers())


def choose_scorer(score: str, annotator: str | None, annotator_params: dict[str, Any],
                  prompts: Sequence[str]) -> tuple[str, ScoreFn]:
    """(metric name, score function) of ``--score`` (a registered name, or "auto") for this run."""
    registry = scorers()
    if score == "auto":
        found = [s for s in registry.values() if s.detect is not None and s.detect(annotator, prompts)]
        score = found[0].name if found else FALLBACK_SCORER
    scorer = registry[score]
    return scorer.metric, scorer.make(annotator, dict(annotator_params))


@register_scorer("canny", metric="edge_f1", detect=lambda annotator, prompts: annotator == "canny")
def _canny_scorer(annotator: str | None, params: dict[str, Any]) -> ScoreFn:
    """Edge F1 between the sample's Canny edges (the run's Canny parameters) and the condition."""
    from controlnet import annotators
    from controlnet.metrics import edge_f1

    canny = annotators.get("canny")
    canny_params = params if annotator == "canny" else {}
    return lambda sample, condition, prompt, target: float(edge_f1(canny(sample, **canny_params), condition))


@register_scorer("ssim", metric="ssim")
def _ssim_scorer(annotator: str | None, params: dict[str, Any]) -> ScoreFn:
    """SSIM of the condition re-extracted by the run's annotator; without one, SSIM of sample and dataset image."""
    from controlnet import annotators
    from controlnet.metrics import ssim

    if annotator is None:
        return lambda sample, condition, prompt, target: float(ssim(sample, target))
    annotate = annotators.get(annotator)
    return lambda sample, condition, prompt, target: float(ssim(annotate(sample, **params), condition))


class Validator:
    """Samples for fixed validation conditions (the first ``validation_count`` examples) with the current
    ControlNet, a PNG grid per validation (rows: condition | sample | image) and the controllability score."""

    def __init__(self, config: TrainConfig, base: Any, examples: Sequence[PreparedExample], store: CacheStore,
                 resolution: int, dtype: torch.dtype, out: Path):
        from diffusers import DDIMScheduler

        from controlnet.data.datasets import load_rgb, to_resolution

        self.components = dict(
            unet=base.unet, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
            scheduler=DDIMScheduler.from_config(base.scheduler_config),  # the original's sampler
            text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
        )
        self.device, self.dtype, self.out, self.config, self.resolution = base.device, dtype, out, config, resolution
        self.items = [(store.load_condition(ex.condition_key), ex.prompt, to_resolution(load_rgb(ex.image), resolution))
                      for ex in examples[: config.validation_count]]
        self.metric, self.score = choose_scorer(config.score, config.annotator, config.annotator_params,
                                                [prompt for _, prompt, _ in self.items])

    def run(self, step: int, controlnet: ControlNet) -> dict[str, Any]:
        """Sample and score every validation condition; write the grid; return the log record."""
        from controlnet.images import save_png
        from controlnet.pipeline import ControlUnit, Pipeline

        pipe = Pipeline(**self.components, dtype=self.dtype, device=self.device)
        was_training = controlnet.training
        controlnet.eval()
        rows, scores = [], []
        for condition, prompt, target in self.items:
            result = pipe(prompt=prompt, controls=[ControlUnit(controlnet=controlnet, image=condition, strength=1.0)],
                          steps=self.config.validation_steps, guidance=self.config.validation_guidance,
                          seed=self.config.seed, size=(self.resolution, self.resolution), output_type="np",
                          progress=False)
            sample = np.asarray(result.images[0], dtype=np.uint8)  # (R, R, 3)
            scores.append(self.score(sample, condition, prompt, target))
            rows.append(np.concatenate([condition, sample, target], axis=1))  # (R, 3R, 3)
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
