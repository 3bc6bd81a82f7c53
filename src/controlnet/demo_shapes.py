"""The shapes-world demo: the embedded tiny-shapes base alone and with each of its ControlNets, and two composed.

For fixed held-out images of the shapes world (:mod:`controlnet.data.shapes`), each condition type's annotator
makes the condition from the image; the caption is generated with the same seed and steps once by the base alone
and once with that type's bundled ControlNet, and the condition is re-detected from both results and scored as
``controlnet evaluate`` does (:class:`controlnet.evaluate.Scorer`): canny edge F1, shapes-segmentation mIoU,
soft-edge MS-SSIM.

Composition (the paper's Fig. 6, several conditions summed): the segmentation ControlNet on one image's label map
gives the layout, and the canny ControlNet on the edges of one of its shapes only (the others masked out) gives
that shape's outline; both residuals are added, each at strength 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from controlnet.data.shapes import Shape, ShapesSample
from controlnet.defaults import DEMO_GUIDANCE, DEMO_SEED, DEMO_STEPS
from controlnet.fileio import atomic_write_text

SHAPES_BASE_NAME = "tiny-shapes"


@dataclass(frozen=True)
class ConditionType:
    """A condition of the shapes world: the annotator that makes it, the bundled ControlNet trained on it, and the
    score kind of :class:`controlnet.evaluate.Scorer`."""

    name: str
    annotator: str
    controlnet: str
    score: str


CONDITION_TYPES: tuple[ConditionType, ...] = (
    ConditionType("canny", "canny", "shapes-canny", "edge_f1"),
    ConditionType("segmentation", "shapes", "shapes-segmentation", "miou"),
    ConditionType("softedge", "softedge", "shapes-softedge", "ms_ssim"),
)

# Fixed demo images (128 px): two or three overlapping shapes each, every kind and most colours.
DEMO_SHAPES: tuple[ShapesSample, ...] = (
    ShapesSample((Shape("circle", "red", 44, 48, 30), Shape("square", "yellow", 86, 84, 30, 20)), "blue"),
    ShapesSample((Shape("triangle", "green", 60, 70, 40, 10), Shape("circle", "white", 96, 36, 22)), "purple"),
    ShapesSample((Shape("square", "orange", 40, 88, 26, 0), Shape("triangle", "blue", 88, 44, 32, 200),
                  Shape("circle", "black", 70, 80, 18)), "yellow"),
    ShapesSample((Shape("circle", "purple", 64, 64, 38), Shape("square", "green", 30, 30, 20, 45)), "white"),
)
COMPOSED = 0  # index into DEMO_SHAPES of the composed example; its shape COMPOSED_SHAPE gets the canny outline
COMPOSED_SHAPE = 1


def shapes_base_dir() -> Path:
    """The embedded tiny shapes-world base (a diffusers Stable Diffusion folder)."""
    from controlnet.embedded import assets_dir
    from controlnet.errors import UserError

    path = assets_dir() / SHAPES_BASE_NAME
    if not (path / "model_index.json").is_file():
        raise UserError(f"the embedded shapes base is missing from {path}; reinstall the package")
    return path


def _scorer(kind: ConditionType) -> Any:
    from controlnet.evaluate import Scorer

    return Scorer(kind.score, kind.annotator, {})


def _generate(pipe: Any, prompt: str, units: list[tuple[str, np.ndarray]], steps: int, guidance: float,
              seed: int, size: int) -> np.ndarray:
    """(H, W, 3) uint8 of ``prompt`` with the (ControlNet, condition) ``units`` (none: the base alone)."""
    from PIL import Image

    from controlnet.demo import _to_uint8
    from controlnet.pipeline import ControlUnit

    controls = [ControlUnit(controlnet=name, image=Image.fromarray(cond)) for name, cond in units]
    out = pipe(prompt=prompt, controls=controls, steps=steps, guidance=guidance, seed=seed, size=(size, size),
               output_type="np", progress=False)
    return _to_uint8(out.images[0])


def compare_type(pipe: Any, kind: ConditionType, samples: tuple[ShapesSample, ...], steps: int, guidance: float,
                 seed: int) -> dict[str, Any]:
    """Conditions, images and scores of every sample with and without ``kind``'s ControlNet."""
    from controlnet.evaluate import EvalExample

    scorer = _scorer(kind)
    rows: dict[str, Any] = {"conditions": [], "base": [], "control": [], "score_base": [], "score_control": []}
    for i, s in enumerate(samples):
        image = s.target
        example = EvalExample(str(i), s.prompt, image, scorer.condition(image))
        rows["conditions"].append(example.condition)
        for column, units in (("base", []), ("control", [(kind.controlnet, example.condition)])):
            generated = _generate(pipe, s.prompt, units, steps, guidance, seed + i, s.size)
            rows[column].append(generated)
            rows[f"score_{column}"].append(scorer.score(generated, scorer.detect(generated, example), example)[kind.score])
    return rows


def outline_of(sample: ShapesSample, index: int, edges: np.ndarray) -> np.ndarray:
    """``edges`` kept only within 2 px of shape ``index``'s visible region of ``sample``."""
    import cv2

    region = (sample.labels_by_shape() == index + 1).astype(np.uint8)
    near = cv2.dilate(region, np.ones((5, 5), np.uint8)) > 0
    return np.where(near[:, :, None], edges, 0).astype(np.uint8)


def compose(pipe: Any, steps: int, guidance: float, seed: int) -> dict[str, Any]:
    """The composed example: segmentation (layout) + canny (one shape's outline)."""
    from controlnet import annotators

    sample = DEMO_SHAPES[COMPOSED]
    segmentation = annotators.get("shapes")(sample.target)
    outline = outline_of(sample, COMPOSED_SHAPE, annotators.get("canny")(sample.target))
    units = [(CONDITION_TYPES[1].controlnet, segmentation), (CONDITION_TYPES[0].controlnet, outline)]
    seg_only = _generate(pipe, sample.prompt, units[:1], steps, guidance, seed + COMPOSED, sample.size)
    both = _generate(pipe, sample.prompt, units, steps, guidance, seed + COMPOSED, sample.size)
    return {"prompt": sample.prompt, "segmentation": segmentation, "outline": outline, "segmentation_only": seg_only,
            "composed": both}


def grid(results: dict[str, dict[str, Any]], composed: dict[str, Any], pad: int = 4, label: int = 14) -> np.ndarray:
    """(H, W, 3) uint8: per condition type a row of (condition | base alone | with ControlNet) triples, then the
    composition row (segmentation | outline | segmentation only | both)."""
    from PIL import Image, ImageDraw

    size = DEMO_SHAPES[0].size
    per_row = len(DEMO_SHAPES) * 3
    width = per_row * (size + pad) + pad
    height = (len(results) + 1) * (size + label + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (name, rows) in enumerate(results.items()):
        y = r * (size + label + pad) + pad
        mean_base, mean_ctrl = np.mean(rows["score_base"]), np.mean(rows["score_control"])
        draw.text((pad, y), f"{name}: condition | base alone | with ControlNet   {mean_base:.2f} -> {mean_ctrl:.2f}",
                  fill=(0, 0, 0))
        images = [img for i in range(len(DEMO_SHAPES)) for img in
                  (rows["conditions"][i], rows["base"][i], rows["control"][i])]
        for j, img in enumerate(images):
            canvas.paste(Image.fromarray(img), (pad + j * (size + pad), y + label))
    y = len(results) * (size + label + pad) + pad
    draw.text((pad, y), "composed: segmentation | one shape's edges | segmentation ControlNet | both ControlNets",
              fill=(0, 0, 0))
    for j, key in enumerate(("segmentation", "outline", "segmentation_only", "composed")):
        canvas.paste(Image.fromarray(composed[key]), (pad + j * (size + pad), y + label))
    return np.asarray(canvas)


def run_shapes_demo(out_dir: str | Path = "outputs/demo-shapes", steps: int = DEMO_STEPS,
                    guidance: float = DEMO_GUIDANCE, seed: int = DEMO_SEED, pipe: Any = None,
                    progress: bool = True) -> tuple[dict[str, Any], Path]:
    """Run the comparison for every condition type and the composition; write grid.png and metrics.json."""
    from controlnet.images import save_png
    from controlnet.pipeline import Pipeline

    pipe = pipe if pipe is not None else Pipeline.from_pretrained(shapes_base_dir())
    results = {}
    for kind in CONDITION_TYPES:
        results[kind.name] = compare_type(pipe, kind, DEMO_SHAPES, steps, guidance, seed)
        if progress:
            print(f"  {kind.name}: {kind.score} {np.mean(results[kind.name]['score_base']):.2f} base alone -> "
                  f"{np.mean(results[kind.name]['score_control']):.2f} with {kind.controlnet}", flush=True)
    composed = compose(pipe, steps, guidance, seed)
    out_dir = Path(out_dir)
    path = save_png(out_dir / "grid.png", grid(results, composed))
    metrics = {kind.name: {"score": kind.score, "controlnet": kind.controlnet,
                           "without_controlnet": float(np.mean(results[kind.name]["score_base"])),
                           "with_controlnet": float(np.mean(results[kind.name]["score_control"]))}
               for kind in CONDITION_TYPES}
    metrics.update(n=len(DEMO_SHAPES), steps=steps, guidance=guidance, seed=seed, world="shapes")
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics, path
