"""Controllability scores of validation samples: the table of ``--score`` names.

The score follows ControlNet++'s protocol (Li et al. 2024, Sec. 4), scaled down: the condition is re-extracted
from the generated sample and compared with the condition it was given. :data:`SCORERS` lists every score by
name: "canny" (edge F1 of the sample's Canny edges), "segmentation" (mean IoU of the re-extracted label map, for
the annotators :mod:`controlnet.evaluate` scores by mIoU: segmentation, shapes), "ssim" (SSIM of the re-extracted
condition), and "fill" (:func:`controlnet.data.fill.fill_scorer`, which knows its circles). ``--score auto`` picks
the first scorer, in table order, whose ``detect`` accepts the run (annotator and validation prompts), else
:data:`FALLBACK_SCORER`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from controlnet import annotators
from controlnet.annotators.palettes import ADE20K
from controlnet.data import fill
from controlnet.errors import UserError
from controlnet.evaluate import SCORE_OF_ANNOTATOR, palette_labels
from controlnet.metrics import edge_f1, mean_iou, ssim

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


def _canny_scorer(annotator: str | None, params: dict[str, Any]) -> ScoreFn:
    """Edge F1 between the sample's Canny edges (the run's Canny parameters) and the condition."""
    canny = annotators.get("canny")
    canny_params = params if annotator == "canny" else {}
    return lambda sample, condition, prompt, target: float(edge_f1(canny(sample, **canny_params), condition))


def _ssim_scorer(annotator: str | None, params: dict[str, Any]) -> ScoreFn:
    """SSIM of the condition re-extracted by the run's annotator; without one, SSIM of sample and dataset image."""
    if annotator is None:
        return lambda sample, condition, prompt, target: float(ssim(sample, target))
    annotate = annotators.get(annotator)
    return lambda sample, condition, prompt, target: float(ssim(annotate(sample, **params), condition))


def _segmentation_scorer(annotator: str | None, params: dict[str, Any]) -> ScoreFn:
    """Mean IoU over the classes present of the label maps (ADE20K palette) of the sample's re-extracted condition
    and the condition, as ``controlnet evaluate`` scores segmentation."""
    if annotator is None or SCORE_OF_ANNOTATOR.get(annotator) != "miou":
        raise UserError(f"--score segmentation needs a segmentation annotator (--annotator one of "
                        f"{', '.join(_segmentation_annotators())}), got {annotator or 'none'}")
    annotate = annotators.get(annotator)

    def score(sample: np.ndarray, condition: np.ndarray, prompt: str, target: np.ndarray) -> float:
        detected = palette_labels(annotate(sample, **params), ADE20K)
        return float(mean_iou(detected, palette_labels(condition, ADE20K), len(ADE20K)))

    return score


def _segmentation_annotators() -> list[str]:
    return sorted(name for name, kind in SCORE_OF_ANNOTATOR.items() if kind == "miou")


SCORERS: dict[str, Scorer] = {scorer.name: scorer for scorer in (
    Scorer("canny", "edge_f1", _canny_scorer, detect=lambda annotator, prompts: annotator == "canny"),
    Scorer("segmentation", "miou", _segmentation_scorer,
           detect=lambda annotator, prompts: annotator in _segmentation_annotators()),
    Scorer("ssim", "ssim", _ssim_scorer),
    Scorer("fill", "fill_iou", fill.fill_scorer, detect=fill.is_fill_run),
)}
FALLBACK_SCORER = "ssim"  # --score auto when no scorer detects the run


def scorers() -> dict[str, Scorer]:
    """The scorers by name."""
    return dict(SCORERS)


def scorer_names() -> list[str]:
    return sorted(SCORERS)


def choose_scorer(score: str, annotator: str | None, annotator_params: dict[str, Any],
                  prompts: Sequence[str]) -> tuple[str, ScoreFn]:
    """(metric name, score function) of ``--score`` (a name of :data:`SCORERS`, or "auto") for this run."""
    if score == "auto":
        found = [s for s in SCORERS.values() if s.detect is not None and s.detect(annotator, prompts)]
        score = found[0].name if found else FALLBACK_SCORER
    scorer = SCORERS[score]
    return scorer.metric, scorer.make(annotator, dict(annotator_params))
