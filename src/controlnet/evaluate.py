"""Controllability as the field measures it (ControlNet++, Li et al. ECCV 2024, liming-ai/ControlNet_Plus_Plus
eval/): generate from each example's condition and caption, re-detect the condition from every generated image
with the same annotator and parameters, and compare the two.

::

    examples   = read_examples(data)               training layout (prompt.json / metadata.jsonl) or images + .txt
    condition  = the dataset's, or annotator(image)  at the evaluation resolution
    images_k   = generate(example, seed + k)        k < K, Pipeline with the ControlNet (or a given function)
    detected_k = annotator(images_k)                the same annotator and parameters
    score      = compare(detected_k, condition)     by condition type, mean over k

Scores by condition type (:data:`SCORES`; the annotator names the type, :data:`SCORE_OF_ANNOTATOR`):

* canny → ``edge_f1``: F1 of edge pixels (:func:`controlnet.metrics.edge_f1`, torchmetrics' ``BinaryF1Score`` on
  flattened pixels as eval/eval_edge.py).
* hed, pidinet, softedge, scribble, lineart, lines, mlsd → ``ms_ssim``: multi-scale SSIM (Wang, Simoncelli, Bovik
  2003) of the grey conditions in [0, 1] with torchmetrics' ``multiscale_structural_similarity_index_measure``,
  the function eval/eval_edge.py calls (``MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)``); also
  ``ssim``, single-scale (:func:`controlnet.metrics.ssim`). MS-SSIM's five scales need images of 176 px or more; a
  smaller image (under 176 px) uses the first scales that fit, their weights rescaled to sum to 1 (:func:`ms_ssim`).
* depth → ``rmse``: root mean squared error of the 8-bit depth images (eval/eval_depth.py), in 0..255.
* segmentation, shapes → ``miou``: mean IoU over the classes present in either label map (ADE20K palette colours
  → classes).
* openpose, openpose_hand, pose → ``pck``: the fraction of the reference person's keypoints that the re-detected
  pose has within :data:`PCK_ALPHA` times the longer side of that person's keypoint box; the reference keypoints
  are the annotator's on the dataset's image.
* fill (the bundled ``fill`` ControlNet's circles, no annotator) → ``iou``: :func:`controlnet.data.fill.fill_iou`,
  the demo's metric, and ``colour_accuracy`` (:func:`controlnet.data.fill.circle_colour_correct`).

Resumable: each example's scores go to ``OUT/examples/ID.json`` (atomically, after its images), and an example
whose file holds the same settings is not generated again. The end of a run writes ``OUT/results.jsonl``,
``OUT/summary.json`` and ``OUT/worst.png`` (see :func:`evaluate`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from controlnet.errors import UserError
from controlnet.eval_protocol import (DEFAULT_CLIP_WEIGHTS, NO_WEIGHTS, PROTOCOL_GUIDANCE, PROTOCOL_NEGATIVE_PROMPT,
                                      PROTOCOL_PER_EXAMPLE, PROTOCOL_SCHEDULER, PROTOCOL_STEPS)

# --------------------------------------------------------------------------- protocol settings

# PCK threshold: a keypoint is right within this fraction of the longer side of the person's keypoint box
# (the bounding-box normalised PCK@0.1).
PCK_ALPHA = 0.1
# MS-SSIM's scale weights (Wang, Simoncelli, Bovik 2003; torchmetrics' default betas) and its window.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 11
WORST_SHOWN = 8  # rows of worst.png

# The primary score of each condition type: name, what it measures.
SCORES: dict[str, str] = {
    "edge_f1": "F1 of edge pixels, re-detected vs given (canny)",
    "ms_ssim": "multi-scale SSIM of the grey conditions (soft edges, line art, scribbles, lines)",
    "rmse": "RMSE of the 8-bit depth images, 0..255 (depth)",
    "miou": "mean IoU over the classes present (segmentation)",
    "pck": f"keypoints within {PCK_ALPHA} x the person's box (pose)",
    "iou": "IoU of the drawn circle with the condition's disk (fill)",
}
SCORE_OF_ANNOTATOR: dict[str, str] = {
    "canny": "edge_f1",
    **{name: "ms_ssim" for name in ("hed", "pidinet", "softedge", "scribble", "lineart", "lineart_coarse",
                                    "lines", "mlsd")},
    "depth": "rmse",
    "segmentation": "miou",
    "shapes": "miou",  # the shapes world's label maps, black and ADE20K colours (controlnet.data.shapes)
    **{name: "pck" for name in ("openpose", "openpose_hand", "pose")},
}
FILL = "fill"
# Words in a ControlNet's name (lllyasviel/control_v11p_sd15_canny, diffusers/controlnet-depth-sdxl-1.0, the bundled
# "fill") → the annotators whose conditions it was trained on.
CONDITION_WORDS: dict[str, tuple[str, ...]] = {
    "canny": ("canny",),
    "softedge": ("hed", "pidinet", "softedge"), "hed": ("hed", "pidinet", "softedge"),
    "scribble": ("scribble", "hed", "pidinet", "softedge"),
    "lineart": ("lineart", "lineart_coarse"),
    "mlsd": ("mlsd", "lines"),
    "depth": ("depth",),
    "seg": ("segmentation", "shapes"), "segmentation": ("segmentation", "shapes"),
    "openpose": ("openpose", "openpose_hand", "pose"), "pose": ("openpose", "openpose_hand", "pose"),
    "fill": (FILL,),
    "tile": (), "inpaint": (), "shuffle": (), "normal": (), "normalbae": (), "ip2p": (),
}


@dataclass
class EvalConfig:
    """Settings of an evaluation; every field that changes the images or scores is recorded in summary.json.

    ``controlnet`` None evaluates the base alone (the "without ControlNet" row). ``negative_prompt`` None: the
    protocol's, except on the embedded base, whose vocabulary has none of its words (there: the empty prompt
    it was trained with). ``scheduler`` None: the base's own. ``resolution`` None: the base's native size
    (with a given generator: the dataset's image size). ``limit``: the first N examples only.
    """

    data: Path
    out: Path
    controlnet: str | None = FILL
    annotator: str | None = None
    annotator_params: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    per_example: int = PROTOCOL_PER_EXAMPLE
    steps: int = PROTOCOL_STEPS
    guidance: float = PROTOCOL_GUIDANCE
    scheduler: str | None = PROTOCOL_SCHEDULER
    negative_prompt: str | None = None
    strength: float = 1.0
    guess_mode: bool = False
    seed: int = 0
    resolution: int | None = None
    limit: int | None = None
    clip_weights: str | None = None
    fid_weights: str | None = None
    bootstrap: int = 1000

    def check(self) -> None:
        """One-line :class:`UserError` for a setting out of range."""
        if self.per_example < 1:
            raise UserError(f"--per-example must be at least 1 (images per example), got {self.per_example}")
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, got {self.limit}")
        if self.resolution is not None and (self.resolution < 16 or self.resolution % 8):
            raise UserError(f"--resolution must be a multiple of 8 and at least 16, got {self.resolution}")
        if self.bootstrap < 1:
            raise UserError(f"--bootstrap must be at least 1, got {self.bootstrap}")


@dataclass
class EvalExample:
    """One example at the evaluation resolution: its id, caption, the dataset's image and the condition
    (``(R, R, 3)`` uint8 each)."""

    id: str
    prompt: str
    image: np.ndarray
    condition: np.ndarray


# ``generate(example, seeds) -> images``: one (R, R, 3) uint8 image per seed.
Generator = Callable[[EvalExample, Sequence[int]], Sequence[np.ndarray]]


# --------------------------------------------------------------------------- condition types


def score_kind(annotator: str | None, controlnet: str | None, prompts: Sequence[str]) -> str:
    """The primary score of the run (a key of :data:`SCORES`): the annotator's, else the one the ControlNet's
    name says, else fill when every caption is a fill prompt; a one-line error when it cannot be known or the
    annotator does not make the ControlNet's conditions."""
    from controlnet.data.fill import is_fill_prompt

    expected = controlnet_annotators(controlnet)
    if annotator is not None:
        from controlnet import annotators

        annotators.get(annotator)  # unknown name: one line listing the known ones
        if annotator not in SCORE_OF_ANNOTATOR:
            raise UserError(f"--annotator {annotator} has no controllability score (it does not re-detect a "
                            f"condition from a photo); use one of {', '.join(sorted(SCORE_OF_ANNOTATOR))}")
        if expected is not None and annotator not in expected:
            made = ", ".join(expected) or "no annotator evaluate scores"
            raise UserError(f"--annotator {annotator} does not make the conditions of the ControlNet {controlnet} "
                            f"(its name says: {made}); pass the annotator it was trained with")
        return SCORE_OF_ANNOTATOR[annotator]
    if expected == (FILL,) or (controlnet is None and prompts and all(is_fill_prompt(p) for p in prompts)):
        return "iou"
    raise UserError("pass --annotator, the detector the conditions were made with (e.g. canny, hed, depth); it "
                    "re-detects the condition from each generated image")


def controlnet_annotators(controlnet: str | None) -> tuple[str, ...] | None:
    """The annotators whose conditions a ControlNet takes, from the words of its name; None when unknown."""
    if controlnet is None:
        return None
    name = Path(str(controlnet).rstrip("/")).name if Path(str(controlnet)).exists() else str(controlnet)
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    found = [CONDITION_WORDS[w] for w in words if w in CONDITION_WORDS]
    return found[0] if found else None


def _grey(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` float64 in [0, 1]: the mean of an (H, W, 3) uint8 image's channels."""
    return np.asarray(image, np.float64).mean(axis=2) / 255.0 if image.ndim == 3 else image / 255.0


def ms_ssim(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """(MS-SSIM, scales used) of two (H, W, 3) uint8 conditions, grey in [0, 1], torchmetrics' computation.

    torchmetrics needs ``side // max(1, scales - 1) ** 2 > kernel - 1`` (and ``side >= 2 ** scales``); the most scales
    (of 5) that fit are used, with :data:`MS_SSIM_BETAS` cut to them and rescaled to sum to 1.
    """
    import torch
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    side = min(a.shape[:2])
    scales = max((n for n in range(1, len(MS_SSIM_BETAS) + 1)
                  if side // max(1, n - 1) ** 2 > MS_SSIM_KERNEL - 1 and side >= 2**n), default=0)
    if scales == 0:
        raise UserError(f"MS-SSIM needs images over {MS_SSIM_KERNEL - 1} pixels, got {side}; raise --resolution")
    betas = np.array(MS_SSIM_BETAS[:scales]) / sum(MS_SSIM_BETAS[:scales])
    x, y = (torch.from_numpy(_grey(v)).float()[None, None] for v in (a, b))  # (1, 1, H, W)
    value = multiscale_structural_similarity_index_measure(x, y, data_range=1.0, kernel_size=MS_SSIM_KERNEL,
                                                           betas=tuple(float(v) for v in betas))
    return float(value), scales


def palette_labels(image: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``(H, W)`` int64: the index of the nearest palette colour of each pixel; of classes that share a colour
    (ADE20K's 6 and 48), the first."""
    pixels = image.reshape(-1, 1, 3).astype(np.int32)
    distance = ((pixels - palette[None].astype(np.int32)) ** 2).sum(axis=2)  # (H*W, classes)
    return distance.argmin(axis=1).reshape(image.shape[:2])


def pck(reference: Sequence[np.ndarray], detected: Sequence[np.ndarray], alpha: float = PCK_ALPHA) -> float:
    """PCK of ``(K, 3)`` (x, y, confidence) keypoint arrays, people matched greedily (each detected person once,
    to the reference person it gets most keypoints right for); NaN when the reference has no keypoint."""
    total, correct = 0, 0
    free = list(range(len(detected)))
    for ref in reference:
        seen = ref[:, 2] > 0
        if not seen.any():
            continue
        total += int(seen.sum())
        box = ref[seen, :2].max(axis=0) - ref[seen, :2].min(axis=0)
        threshold = alpha * max(float(box.max()), 1.0)

        def hits(j: int) -> int:
            other = detected[j]
            ok = seen & (other[:, 2] > 0) & (np.linalg.norm(other[:, :2] - ref[:, :2], axis=1) <= threshold)
            return int(ok.sum())

        if free:
            best = max(free, key=hits)
            correct += hits(best)
            free.remove(best)
    return correct / total if total else float("nan")


class Scorer:
    """Re-detects a condition from a generated image and scores it against the example's, for one score kind."""

    def __init__(self, kind: str, annotator: str | None, params: dict[str, Any]):
        self.kind, self.annotator, self.params = kind, annotator, dict(params)
        self._references: dict[str, list[np.ndarray]] = {}  # pose: the reference keypoints per example id
        self._detected_people: list[np.ndarray] = []  # pose: the keypoints of the last detect()

    def condition(self, image: np.ndarray) -> np.ndarray:
        """The annotator's condition of ``image`` (the run's parameters)."""
        from controlnet import annotators

        return annotators.get(str(self.annotator))(image, **self.params)

    def pose(self, image: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The pose annotator's picture of ``image`` and each person's ``(18, 3)`` body keypoints (its JSON)."""
        import tempfile

        from controlnet import annotators
        from controlnet.annotators.pose import parse_people

        with tempfile.TemporaryDirectory() as folder:
            doc = Path(folder) / "pose.json"
            picture = annotators.get(str(self.annotator))(image, **{**self.params, "json": doc})
            people = parse_people(json.loads(doc.read_text(encoding="utf-8")))
        return picture, [person["body"] for person in people]

    def detect(self, image: np.ndarray, example: EvalExample) -> np.ndarray:
        """The condition re-detected from a generated image, as an (H, W, 3) uint8 picture."""
        if self.kind == "iou":
            from controlnet.data.fill import circle_mask, is_fill_prompt

            mask = circle_mask(image, example.prompt if is_fill_prompt(example.prompt) else None)
            return np.repeat(mask[:, :, None], 3, axis=2).astype(np.uint8) * 255
        if self.kind == "pck":
            picture, self._detected_people = self.pose(image)
            return picture
        return self.condition(image)

    def score(self, image: np.ndarray, detected: np.ndarray, example: EvalExample) -> dict[str, float]:
        """The scores of one generated image (``detected``: :meth:`detect` of it)."""
        from controlnet import metrics

        given = example.condition
        if self.kind == "iou":
            from controlnet.data.fill import circle_colour_correct, fill_iou, is_fill_prompt

            fill_prompt = is_fill_prompt(example.prompt)
            scores = {"iou": fill_iou(image, given, example.prompt if fill_prompt else None)}
            if fill_prompt:
                scores["colour_accuracy"] = float(circle_colour_correct(image, example.prompt))
            return scores
        if self.kind == "edge_f1":
            return {"edge_f1": metrics.edge_f1(detected, given), "ms_ssim": ms_ssim(detected, given)[0]}
        if self.kind == "ms_ssim":
            return {"ms_ssim": ms_ssim(detected, given)[0], "ssim": metrics.ssim(_grey(detected), _grey(given))}
        if self.kind == "rmse":
            return {"rmse": metrics.rmse(_grey(detected) * 255.0, _grey(given) * 255.0)}
        if self.kind == "miou":
            from controlnet.annotators.palettes import ADE20K

            return {"miou": metrics.mean_iou(palette_labels(detected, ADE20K), palette_labels(given, ADE20K),
                                             len(ADE20K))}
        if example.id not in self._references:  # pck: the annotator's keypoints of the dataset's image
            self._references[example.id] = self.pose(example.image)[1]
        return {"pck": pck(self._references[example.id], self._detected_people)}


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DatasetRow:
    """One example as listed: id, caption, the image file and the condition file (None: the annotator makes it)."""

    id: str
    prompt: str
    image: Path
    condition: Path | None


def read_dataset(data: str | Path, annotator: str | None) -> list[DatasetRow]:
    """The examples of ``data``: a training-layout manifest (:func:`controlnet.data.datasets.read_manifest`; its
    conditions are used without ``annotator``, made from the images with one) or a folder of images with
    same-name ``.txt`` captions (conditions made by ``annotator``). A row with a missing file is an error."""
    from controlnet.data.datasets import MANIFEST_NAMES, describe_skipped, read_manifest

    path = Path(data).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in MANIFEST_NAMES):
        return _caption_folder(path, annotator)
    manifest = read_manifest(path, need_conditions=annotator is None)
    if manifest.skipped:
        raise UserError(f"{describe_skipped(manifest.skipped, manifest.path)}; fix or drop those rows: an "
                        "evaluation scores every example")
    return [DatasetRow(f"{e.line:06d}", e.prompt, e.image, e.condition) for e in manifest.examples]


def _caption_folder(folder: Path, annotator: str | None) -> list[DatasetRow]:
    """Images of ``folder`` (by suffix, sorted by name) with their captions in ``NAME.txt``."""
    from controlnet.batch import IMAGE_SUFFIXES

    if annotator is None:
        raise UserError(f"--data {folder} is a folder of images; pass --annotator to make their conditions")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"--data {folder} has no prompt.json, metadata.jsonl or images; give a dataset folder")
    stems = [p.stem for p in images]
    twice = sorted({stem for stem in stems if stems.count(stem) > 1})
    if twice:
        raise UserError(f"--data {folder}: images share a name ({', '.join(twice[:5])}) and would share a caption "
                        "file; rename them")
    missing = [p.with_suffix(".txt").name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"--data {folder}: {len(missing)} image(s) have no caption file ({shown}); add them or "
                        "move those images out")
    return [DatasetRow(p.stem, p.with_suffix(".txt").read_text(encoding="utf-8").strip(), p, None) for p in images]


def load_example(row: DatasetRow, resolution: int | None, scorer: Scorer) -> EvalExample:
    """The example at ``resolution`` (cover, centre-crop; None: the image's size): the image, and the dataset's
    condition resized the same way or the annotator's condition of the resized image."""
    from controlnet.conditions import resize_cover
    from controlnet.data.datasets import load_rgb

    image = load_rgb(row.image)
    height, width = (resolution, resolution) if resolution else image.shape[:2]
    image = resize_cover(image, width, height)
    condition = scorer.condition(image) if row.condition is None else resize_cover(load_rgb(row.condition),
                                                                                   width, height)
    return EvalExample(row.id, row.prompt, image, condition)


# --------------------------------------------------------------------------- generation


def pipeline_generator(pipe: Any, config: EvalConfig, negative_prompt: str) -> Generator:
    """The default generator: ``pipe`` with the run's ControlNet on each example's condition."""
    return lambda example, seeds: generate_images(pipe, example.prompt, config.controlnet, example.condition,
                                                  seeds, config, negative_prompt)


def generate_images(pipe: Any, prompt: str, controlnet: str | None, condition: np.ndarray, seeds: Sequence[int],
                    config: EvalConfig, negative_prompt: str) -> list[np.ndarray]:
    """Images for consecutive ``seeds`` (image k from seed ``seeds[0] + k``), in batches of at most
    :data:`controlnet.defaults.MAX_NUM_IMAGES`: the one place that calls the pipeline."""
    from controlnet.defaults import MAX_NUM_IMAGES
    from controlnet.pipeline import ControlUnit

    controls = [] if controlnet is None else [ControlUnit(controlnet, condition, strength=config.strength)]
    height, width = condition.shape[:2]
    images: list[np.ndarray] = []
    for start in range(0, len(seeds), MAX_NUM_IMAGES):
        batch = seeds[start : start + MAX_NUM_IMAGES]
        result = pipe(prompt, controls, negative_prompt=negative_prompt, steps=config.steps, guidance=config.guidance,
                      scheduler=config.scheduler, seed=batch[0], size=(width, height), num_images=len(batch),
                      guess_mode=config.guess_mode, output_type="np", progress=False)
        images += list(result.images)
    return images


def negative_prompt_of(config: EvalConfig, pipe: Any) -> str:
    """The negative prompt: the configured one, else the protocol's, except on the embedded base (module doc)."""
    if config.negative_prompt is not None:
        return config.negative_prompt
    from controlnet.embedded import is_embedded

    return "" if pipe is not None and is_embedded(getattr(pipe, "base", "")) else PROTOCOL_NEGATIVE_PROMPT


def settings_key(settings: dict[str, Any]) -> str:
    """A short digest of the settings an example's scores depend on (resume: same digest, same scores)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the run

EXAMPLES_DIR, IMAGES_DIR = "examples", "images"


@dataclass
class EvalPlan:
    """A checked evaluation, nothing loaded or written yet: the examples, the score kind, the annotator's
    parameters as :meth:`check_ready` completed them."""

    config: EvalConfig
    rows: list[DatasetRow]
    kind: str
    params: dict[str, Any]


def plan_evaluation(config: EvalConfig) -> EvalPlan:
    """Check ``config`` against its dataset, score kind and annotator (one-line errors); load and write nothing."""
    from controlnet import annotators

    config.check()
    rows = read_dataset(config.data, config.annotator)[: config.limit]
    kind = score_kind(config.annotator, config.controlnet, [r.prompt for r in rows])
    # Missing detector weights fail here, once, before anything is written.
    params = annotators.get(config.annotator).check_ready(dict(config.annotator_params)) if config.annotator else {}
    return EvalPlan(config, rows, kind, params)


def evaluate(config: EvalConfig, generate: Generator | None = None, progress: bool = True,
             pipe: Any = None) -> dict[str, Any]:
    """Run the protocol over ``config.data`` into ``config.out``; return the summary (also in summary.json).

    ``generate`` replaces the pipeline (a function of an :class:`EvalExample` and K seeds returning K images);
    ``pipe``: an already loaded pipeline on ``config.base``. Everything is checked before ``config.out`` is
    written to; examples already scored with the same settings are read back, not generated again.
    """
    return run_plan(plan_evaluation(config), generate, progress, pipe)


def run_plan(plan: EvalPlan, generate: Generator | None = None, progress: bool = True,
             pipe: Any = None) -> dict[str, Any]:
    """Generate and score the examples of a checked :class:`EvalPlan` not yet done (:func:`evaluate`)."""
    from tqdm.auto import tqdm

    config = plan.config
    if generate is None:
        if pipe is None:
            from controlnet.demo import load_pipeline

            pipe = load_pipeline(config.base)
        if config.controlnet is not None:
            pipe.load_controlnet(config.controlnet)  # a bad name or an incompatible model: one line, now
        generate = pipeline_generator(pipe, config, negative_prompt_of(config, pipe))
    else:
        pipe = None
    settings = {
        "data": str(Path(config.data).expanduser().resolve()), "score": plan.kind, "controlnet": config.controlnet,
        "annotator": config.annotator, "annotator_params": {k: str(v) for k, v in plan.params.items()},
        "base": "embedded" if config.base is None else config.base, "per_example": config.per_example,
        "steps": config.steps, "guidance": config.guidance, "scheduler": config.scheduler,
        "negative_prompt": negative_prompt_of(config, pipe), "strength": config.strength, "seed": config.seed,
        "guess_mode": config.guess_mode, "resolution": config.resolution or (pipe.native_size if pipe is not None else None),
        "generator": "pipeline" if pipe is not None else "given",
    }
    key = settings_key(settings)
    scorer = Scorer(plan.kind, config.annotator, plan.params)
    results = []
    desc = "evaluate" if config.controlnet is None else f"evaluate {config.controlnet}"
    for row in tqdm(plan.rows, desc=desc, unit="example", disable=not progress, file=sys.stderr):
        result = read_done(config.out, row.id, key)
        if result is None:
            example = load_example(row, settings["resolution"], scorer)
            result = score_example(example, generate, scorer, config, key)
        results.append(result)
    return finish(config, settings, results)


def read_done(out: Path, example_id: str, key: str) -> dict[str, Any] | None:
    """The stored result of an example scored with the settings ``key``, or None."""
    path = Path(out) / EXAMPLES_DIR / f"{example_id}.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("settings") == key else None


def score_example(example: EvalExample, generate: Generator, scorer: Scorer, config: EvalConfig,
                  key: str) -> dict[str, Any]:
    """Generate the example's K images, re-detect and score each; write the images, then the result (atomically)."""
    from controlnet.fileio import atomic_write_text
    from controlnet.images import save_png

    seeds = [config.seed + k for k in range(config.per_example)]
    images = [np.asarray(im) for im in generate(example, seeds)]
    if len(images) != len(seeds) or any(im.shape != example.condition.shape or im.dtype != np.uint8 for im in images):
        shapes = ", ".join(f"{im.shape} {im.dtype}" for im in images)
        raise UserError(f"the generator returned {len(images)} images ({shapes}) for {len(seeds)} seeds; it must "
                        f"return one {example.condition.shape} uint8 image per seed")
    folder = Path(config.out) / IMAGES_DIR
    save_png(folder / f"{example.id}_condition.png", example.condition)
    per_image = []
    for k, image in enumerate(images):
        detected = scorer.detect(image, example)
        save_png(folder / f"{example.id}_{k}.png", image)
        save_png(folder / f"{example.id}_{k}_detected.png", detected)
        scores = scorer.score(image, detected, example)
        per_image.append({"seed": seeds[k], "scores": {m: _number(v) for m, v in scores.items()}})
    metrics = list(per_image[0]["scores"])
    scores = {m: _number(_mean([p["scores"][m] for p in per_image])) for m in metrics}
    result = {"id": example.id, "prompt": example.prompt, "settings": key, "scores": scores, "images": per_image}
    atomic_write_text(Path(config.out) / EXAMPLES_DIR / f"{example.id}.json", json.dumps(result) + "\n")
    return result


def _number(value: float) -> float | None:
    """``value`` as a float, None for NaN (null in JSON: a score that is undefined for this image)."""
    return float(value) if value is not None and math.isfinite(value) else None


def _mean(values: Sequence[float | None]) -> float:
    """The mean of the finite values; NaN when there is none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def finish(config: EvalConfig, settings: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Add the image-quality scores, then write results.jsonl, summary.json and worst.png; return the summary."""
    from controlnet.eval_stats import RESULTS_FILE, SUMMARY_FILE, describe
    from controlnet.fileio import atomic_write_text
    from controlnet.images import save_png

    out = Path(config.out)
    notes, fid = image_quality(config, results)
    metrics = list(dict.fromkeys(m for r in results for m in r["scores"]))
    scores = {m: describe([r["scores"].get(m) for r in results], config.bootstrap, config.seed) for m in metrics}
    if fid is not None:
        scores["fid"] = {"n": len(results) * config.per_example, "mean": fid, "low": None, "high": None}
    summary = {"score": settings["score"], "measures": SCORES[settings["score"]], "examples": len(results),
               "scores": scores, "settings": settings, "bootstrap": {"samples": config.bootstrap, "seed": config.seed,
                                                                   "confidence": 0.95}, "notes": notes}
    atomic_write_text(out / RESULTS_FILE, "".join(json.dumps(_public(r)) + "\n" for r in results))
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    save_png(out / "worst.png", worst_grid(out, results, settings["score"]))
    return summary


def _public(result: dict[str, Any]) -> dict[str, Any]:
    """A results.jsonl row: the stored result without the settings digest."""
    return {k: v for k, v in result.items() if k != "settings"}


def image_quality(config: EvalConfig, results: list[dict[str, Any]]) -> tuple[list[str], float | None]:
    """CLIP score per example (added to ``results``) and the CLIP-feature FID, where the weights are here;
    otherwise one note per skipped score saying how to get them. Returns (notes, FID or None)."""
    from controlnet import eval_quality
    from controlnet.data.datasets import load_rgb
    from controlnet.images import load_image

    clip_weights = config.clip_weights or DEFAULT_CLIP_WEIGHTS
    fid_weights = config.fid_weights or clip_weights
    notes: list[str] = []
    models: dict[str, Any] = {}
    wanted = {"CLIP score": clip_weights, "FID": fid_weights}
    for weights in dict.fromkeys(w for w in wanted.values() if w != NO_WEIGHTS):
        uses = [what for what, w in wanted.items() if w == weights]
        folder, why = eval_quality.locate(weights)
        if folder is None:
            flags = " / ".join("--clip-weights" if what == "CLIP score" else "--fid-weights" for what in uses)
            notes.append(f"{' and '.join(uses)} skipped: {why} ({flags})")
            continue
        features = eval_quality.ClipFeatures(folder)
        models.update({what: features for what in uses})
    if not models:
        return notes, None
    out = Path(config.out) / IMAGES_DIR
    generated = [load_image(out / f"{r['id']}_{k}.png") for r in results for k in range(len(r["images"]))]
    if "CLIP score" in models:
        model = models["CLIP score"]
        values = eval_quality.clip_scores(model.images(generated), model.texts(
            [r["prompt"] for r in results for _ in r["images"]]))
        start = 0
        for r in results:
            r["scores"]["clip_score"] = float(np.mean(values[start : start + len(r["images"])]))
            start += len(r["images"])
    fid = None
    if "FID" in models:
        rows = {row.id: row for row in read_dataset(config.data, config.annotator)}
        real = [_resized(load_rgb(rows[r["id"]].image), generated[0].shape[:2]) for r in results]
        fid = eval_quality.frechet_distance(models["FID"].images(real), models["FID"].images(generated))
    return notes, fid


def _resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from controlnet.conditions import resize_cover

    return resize_cover(image, size[1], size[0])


def _shown(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def worst_grid(out: Path, results: list[dict[str, Any]], kind: str, shown: int = WORST_SHOWN,
               pad: int = 4, label_height: int = 14) -> np.ndarray:
    """(H, W, 3) uint8: the ``shown`` worst examples by the primary score, each its worst image, in rows
    condition | generated | re-detected, labelled with the id and score."""
    from PIL import Image, ImageDraw

    from controlnet.eval_stats import LOWER_IS_BETTER
    from controlnet.images import load_image

    sign = -1.0 if kind in LOWER_IS_BETTER else 1.0  # sort ascending by sign * score: worst first

    def badness(value: float | None) -> float:
        return math.inf if value is None or not math.isfinite(value) else sign * value

    ranked = sorted(results, key=lambda r: badness(r["scores"].get(kind)))[:shown]
    folder = Path(out) / IMAGES_DIR
    rows = []
    for r in ranked:
        k = min(range(len(r["images"])), key=lambda i: badness(r["images"][i]["scores"].get(kind)))
        cells = [load_image(folder / f"{r['id']}{suffix}") for suffix in
                 ("_condition.png", f"_{k}.png", f"_{k}_detected.png")]
        mean, value = (_shown(v) for v in (r["scores"].get(kind), r["images"][k]["scores"].get(kind)))
        rows.append((f"{r['id']}: {kind} {mean} (this image, seed {r['images'][k]['seed']}: {value})", cells))
    side_h, side_w = rows[0][1][0].shape[:2]
    width = max(3 * (side_w + pad) + pad, 480)  # room for the label
    canvas = Image.new("RGB", (width, label_height + len(rows) * (side_h + label_height + pad) + pad), (255,) * 3)
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(("condition", "generated", "re-detected")):
        draw.text((pad + j * (side_w + pad) + 2, 1), name, fill=(0, 0, 0))
    for i, (label, cells) in enumerate(rows):
        y = label_height + i * (side_h + label_height + pad)
        draw.text((pad + 2, y), label[:80], fill=(0, 0, 0))
        for j, cell in enumerate(cells):
            canvas.paste(Image.fromarray(cell), (pad + j * (side_w + pad), y + label_height))
    return np.asarray(canvas)
