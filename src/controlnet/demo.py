"""The demo: the embedded tiny base, once alone and once with the bundled ``fill`` ControlNet.

For 8 fixed circle conditions it generates with the same prompt, seed and steps, with and without the
ControlNet, writes a grid (condition | base alone | with ControlNet) and measures what the paper claims:

- controllability: IoU between the generated circle and the condition's filled disk
  (:func:`controlnet.data.fill.fill_iou`), high only with the ControlNet;
- the locked base keeps its skills: the circle's colour matches the prompt
  (:func:`controlnet.data.fill.circle_colour_correct`) with the ControlNet as without it.

``backbone="flux"`` runs the same comparison on the embedded tiny Flux-layout base (assets/tiny-flux, a diffusers
FluxPipeline folder) and its ``fill`` ControlNet (assets/tiny-flux/controlnets/fill), through
:class:`controlnet.transformer_pipeline.TransformerPipeline`.

``scripts/evaluate_demo.py`` runs the same measurement on 64 held-out random conditions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from controlnet.data.fill import FillSample, circle_colour_correct, fill_iou, random_condition
from controlnet.defaults import DEMO_GUIDANCE, DEMO_SEED, DEMO_STEPS  # noqa: F401 - re-exported for scripts
from controlnet.fileio import atomic_write_text

FILL_CONTROLNET = "fill"
BACKBONES = ("sd", "flux")  # the embedded tiny-sd UNet base; the embedded tiny Flux-layout transformer base
FLUX_BASE_NAME = "tiny-flux"
FLUX_FILL_SUBFOLDER = "controlnets/fill"  # the Flux base's fill ControlNet, inside its folder
EVAL_SEED = 20260  # the held-out conditions of scripts/evaluate_demo.py; training data uses other seeds

# The 8 fixed demo conditions: positions, radii and colour pairs spread over the palette (128 px images).
DEMO_SAMPLES: tuple[FillSample, ...] = (
    FillSample(40, 40, 24, "red", "blue"),
    FillSample(88, 70, 34, "yellow", "purple"),
    FillSample(64, 64, 46, "green", "white"),
    FillSample(30, 95, 16, "orange", "black"),
    FillSample(95, 30, 20, "blue", "yellow"),
    FillSample(70, 90, 28, "purple", "green"),
    FillSample(50, 60, 38, "white", "red"),
    FillSample(100, 100, 14, "black", "orange"),
)


@dataclass
class DemoResult:
    """Per-sample images and scores of a with/without comparison, and their means."""

    samples: list[FillSample]
    base_images: list[np.ndarray] = field(default_factory=list)
    control_images: list[np.ndarray] = field(default_factory=list)
    iou_base: list[float] = field(default_factory=list)
    iou_control: list[float] = field(default_factory=list)
    colour_base: list[bool] = field(default_factory=list)
    colour_control: list[bool] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "n": len(self.samples),
            "iou_with_controlnet": float(np.mean(self.iou_control)),
            "iou_without_controlnet": float(np.mean(self.iou_base)),
            "colour_accuracy_with_controlnet": float(np.mean(self.colour_control)),
            "colour_accuracy_without_controlnet": float(np.mean(self.colour_base)),
        }


def held_out_samples(n: int, seed: int = EVAL_SEED, size: int = 128) -> list[FillSample]:
    """``n`` random conditions from a seed no training run uses."""
    rng = np.random.default_rng(seed)
    return [random_condition(rng, size) for _ in range(n)]


def flux_base_dir() -> Path:
    """The embedded tiny Flux-layout base (a diffusers FluxPipeline folder)."""
    from controlnet.embedded import assets_dir
    from controlnet.errors import UserError

    path = assets_dir() / FLUX_BASE_NAME
    if not (path / "model_index.json").is_file():
        raise UserError(f"the embedded Flux base is missing from {path}; reinstall the package or use --backbone sd")
    return path


def load_pipeline(base: str | Path | None = None, backbone: str = "sd") -> Any:
    """The inference pipeline on ``base`` (None: the embedded tiny base of ``backbone``, "sd" or "flux")."""
    from controlnet.pipeline import Pipeline

    if backbone not in BACKBONES:
        from controlnet.errors import UserError

        raise UserError(f"unknown demo backbone {backbone!r}; use one of {', '.join(BACKBONES)}")
    if backbone == "flux":
        from controlnet.transformer_pipeline import TransformerPipeline

        return TransformerPipeline.from_pretrained(flux_base_dir() if base is None else base)
    # fp32 on every device: the demo's figures (README) are fp32 figures, whatever base it is given.
    return Pipeline.from_pretrained(None if base is None else str(base), dtype="fp32")


def _to_uint8(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 4:  # (1, H, W, 3) batch of one
        arr = arr[0]
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return arr


def generate(pipe: Any, sample: FillSample, controlnet: str | None, steps: int, guidance: float,
             seed: int, reuse_residuals: int = 1) -> np.ndarray:
    """(H, W, 3) uint8: the sample's prompt, with the named ControlNet on its condition or with none."""
    from PIL import Image

    from controlnet.pipeline import ControlUnit

    if getattr(pipe, "family", None) == "flux":
        return _generate_flux(pipe, sample, controlnet, steps, guidance, seed, reuse_residuals)

    controls = [] if controlnet is None else [ControlUnit(controlnet=controlnet, image=Image.fromarray(sample.condition))]
    out = pipe(prompt=sample.prompt, controls=controls, steps=steps, guidance=guidance, seed=seed,
               size=(sample.size, sample.size), output_type="np", progress=False, reuse_residuals=reuse_residuals)
    return _to_uint8(out.images[0])


def _generate_flux(pipe: Any, sample: FillSample, controlnet: str | None, steps: int, guidance: float, seed: int,
                   reuse_residuals: int) -> np.ndarray:
    """:func:`generate` on a Flux :class:`~controlnet.transformer_pipeline.TransformerPipeline`: "fill" names the
    embedded Flux base's fill ControlNet."""
    from controlnet.errors import UserError
    from controlnet.transformer_pipeline import TransformerUnit

    if reuse_residuals != 1:
        raise UserError("reusing ControlNet residuals is for UNet bases; drop it with the Flux backbone")
    units = []
    if controlnet is not None:
        path = flux_base_dir() / FLUX_FILL_SUBFOLDER if controlnet == FILL_CONTROLNET else controlnet
        units = [TransformerUnit(pipe.load_controlnet(path), sample.condition)]
    out = pipe(sample.prompt, units, height=sample.size, width=sample.size, steps=steps, guidance=guidance,
               seed=seed, output_type="pt")
    return _to_uint8(out[0].permute(1, 2, 0).float().numpy())


def compare(pipe: Any, samples: Sequence[FillSample], controlnet: str = FILL_CONTROLNET,
            steps: int = DEMO_STEPS, guidance: float = DEMO_GUIDANCE, seed: int = DEMO_SEED,
            progress: bool = False, reuse_residuals: int = 1) -> DemoResult:
    """Generate every sample with and without ``controlnet`` (same prompt, seed, steps) and score both."""
    result = DemoResult(list(samples))
    for i, s in enumerate(samples):
        base = generate(pipe, s, None, steps, guidance, seed + i)
        ctrl = generate(pipe, s, controlnet, steps, guidance, seed + i, reuse_residuals)
        result.base_images.append(base)
        result.control_images.append(ctrl)
        result.iou_base.append(fill_iou(base, s.condition, s.prompt))
        result.iou_control.append(fill_iou(ctrl, s.condition, s.prompt))
        result.colour_base.append(circle_colour_correct(base, s.prompt))
        result.colour_control.append(circle_colour_correct(ctrl, s.prompt))
        if progress:
            print(f"  {i + 1}/{len(samples)} {s.prompt}: IoU {result.iou_base[-1]:.2f} alone, "
                  f"{result.iou_control[-1]:.2f} with ControlNet", flush=True)
    return result


def comparison_grid(result: DemoResult, pad: int = 4, label_height: int = 14) -> np.ndarray:
    """(H, W, 3) uint8: one row per sample, columns condition | base alone | with ControlNet, labelled."""
    from PIL import Image, ImageDraw

    size = result.samples[0].size
    cols = ("condition", "base alone", "with ControlNet")
    width = len(cols) * (size + pad) + pad
    height = label_height + len(result.samples) * (size + label_height + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(cols):
        draw.text((pad + j * (size + pad) + 2, 1), name, fill=(0, 0, 0))
    for i, s in enumerate(result.samples):
        y = label_height + i * (size + label_height + pad)
        draw.text((pad + 2, y), f"{s.prompt}  IoU {result.iou_base[i]:.2f} -> {result.iou_control[i]:.2f}",
                  fill=(0, 0, 0))
        for j, img in enumerate((s.condition, result.base_images[i], result.control_images[i])):
            canvas.paste(Image.fromarray(img), (pad + j * (size + pad), y + label_height))
    return np.asarray(canvas)


def run_demo(out_dir: str | Path = "outputs/demo", steps: int = DEMO_STEPS, guidance: float = DEMO_GUIDANCE,
             seed: int = DEMO_SEED, samples: Sequence[FillSample] = DEMO_SAMPLES, pipe: Any = None,
             progress: bool = True, backbone: str = "sd") -> tuple[DemoResult, Path]:
    """The demo: compare with and without the bundled fill ControlNet of the ``backbone``'s embedded base;
    write grid.png and metrics.json."""
    import json

    from controlnet.images import save_png

    pipe = pipe if pipe is not None else load_pipeline(backbone=backbone)
    result = compare(pipe, samples, FILL_CONTROLNET, steps, guidance, seed, progress=progress)
    out_dir = Path(out_dir)
    grid = save_png(out_dir / "grid.png", comparison_grid(result))
    metrics = dict(result.summary(), steps=steps, guidance=guidance, seed=seed, backbone=backbone)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return result, grid
