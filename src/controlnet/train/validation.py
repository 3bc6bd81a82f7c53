"""Validation during training: samples for fixed conditions, their controllability score
(:mod:`controlnet.train.scores`), and the step of the paper's "sudden convergence".
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from controlnet.data.datasets import PreparedExample, load_rgb, to_resolution
from controlnet.images import save_png
from controlnet.pipeline import ControlUnit, Pipeline
from controlnet.train.scores import choose_scorer

if TYPE_CHECKING:
    import torch

    from controlnet.data.cache import CacheStore
    from controlnet.train.config import TrainConfig

# Sudden convergence: the score must rise by at least this much (absolute; the scores are in [0, 1]) between the
# first validation and the final plateau to count as a jump.
SUDDEN_CONVERGENCE_MIN_GAIN = 0.1
FINAL_PLATEAU = 3  # validations averaged for the final plateau


class Validator:
    """Samples for fixed validation conditions (the first ``validation_count`` examples) with the current
    ControlNet, a PNG grid per validation (rows: condition | sample | image) and the controllability score."""

    def __init__(self, config: TrainConfig, base: Any, examples: Sequence[PreparedExample], store: CacheStore,
                 resolution: int, dtype: torch.dtype, out: Path):
        self.components = self.components_of(base)
        self.dtype, self.out, self.config, self.resolution = dtype, out, config, resolution
        self.items = [(store.load_condition(ex.condition_key), ex.prompt, to_resolution(load_rgb(ex.image), resolution))
                      for ex in examples[: config.validation_count]]
        self.metric, self.score = choose_scorer(config.score, config.annotator, config.annotator_params,
                                                [prompt for _, prompt, _ in self.items])

    def components_of(self, base: Any) -> dict[str, Any]:
        """What a sampling pipeline is made of, from the base's components."""
        from diffusers import DDIMScheduler

        return dict(
            unet=base.unet, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
            scheduler=DDIMScheduler.from_config(base.scheduler_config),  # the original's sampler
            text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, device=base.device,
        )

    def sampler(self, controlnet: Any) -> Callable[[np.ndarray, str], np.ndarray]:
        """``sample(condition, prompt)``: one validation sample (R, R, 3) uint8 under ``controlnet`` at strength 1."""
        pipe = Pipeline(**self.components, dtype=self.dtype)

        def sample(condition: np.ndarray, prompt: str) -> np.ndarray:
            result = pipe(prompt=prompt, controls=[ControlUnit(controlnet=controlnet, image=condition, strength=1.0)],
                          steps=self.config.validation_steps, guidance=self.config.validation_guidance,
                          seed=self.config.seed, size=(self.resolution, self.resolution), output_type="np",
                          progress=False)
            return np.asarray(result.images[0], dtype=np.uint8)

        return sample

    def run(self, step: int, controlnet: Any) -> dict[str, Any]:
        """Sample and score every validation condition; write the grid; return the log record."""
        sample_of = self.sampler(controlnet)
        was_training = controlnet.training
        controlnet.eval()
        rows, scores = [], []
        for condition, prompt, target in self.items:
            sample = sample_of(condition, prompt)  # (R, R, 3) uint8
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
