"""Measure the embedded model against its quality targets on 64 held-out random conditions, 20 steps.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/evaluate_demo.py [--n 64] [--steps 20]   # → outputs/evaluation.json
    OMP_NUM_THREADS=2 .venv/bin/python scripts/evaluate_demo.py --ship    # replace the tracked docs/evaluation.json
    OMP_NUM_THREADS=2 .venv/bin/python scripts/evaluate_demo.py --controlnet outputs/train_fill/lite/controlnet \
        --out outputs/evaluation_lite.json      # another ControlNet (e.g. an ablation run) on the same conditions

Targets: mean IoU >= 0.80 with the fill ControlNet and <= 0.35 without it; circle colour accuracy >= 0.90 with
the ControlNet. The conditions come from a seed (controlnet.demo.EVAL_SEED) that no training run uses.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from controlnet.defaults import DEMO_GUIDANCE
from controlnet.demo import BACKBONES, EVAL_SEED, FILL_CONTROLNET, compare, comparison_grid, held_out_samples, load_pipeline
from controlnet.fileio import atomic_write_text
from controlnet.images import save_png
from controlnet.options import shipped_or_out

DEFAULT_OUT = Path("outputs/evaluation.json")
SHIPPED_OUT = Path("docs/evaluation.json")  # tracked: the README's figures; written only with --ship
TARGETS = {"iou_with_controlnet": (">=", 0.80), "iou_without_controlnet": ("<=", 0.35),
           "colour_accuracy_with_controlnet": (">=", 0.90)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``--ship`` makes the output the tracked docs/evaluation.json (and refuses another --out)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=DEMO_GUIDANCE)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--reuse-residuals", type=int, default=1,
                    help="compute the ControlNet every N steps (the speed option's controllability cost)")
    ap.add_argument("--controlnet", default=FILL_CONTROLNET, help="a ControlNet folder or bundled name (default: fill)")
    ap.add_argument("--backbone", choices=BACKBONES, default="sd", help="the embedded base (controlnet demo's option)")
    ap.add_argument("--out", type=Path, default=None, help=f"the report (default: {DEFAULT_OUT})")
    ap.add_argument("--ship", action="store_true", help=f"write the report to the tracked {SHIPPED_OUT}")
    ap.add_argument("--grid", type=Path, default=None, help="also write a grid of the first 8 (PNG)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no line per sample")
    args = ap.parse_args(argv)
    args.out = shipped_or_out(ap, args.ship, args.out, SHIPPED_OUT, DEFAULT_OUT)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"evaluating {args.n} held-out conditions, {args.steps} steps, with and without {args.controlnet}; "
          f"report: {args.out}", flush=True)

    start = time.perf_counter()
    pipe = load_pipeline(backbone=args.backbone)
    samples = held_out_samples(args.n, args.seed)
    result = compare(pipe, samples, controlnet=args.controlnet, steps=args.steps, guidance=args.guidance, seed=args.seed,
                     reuse_residuals=args.reuse_residuals, progress=not args.quiet)
    summary = result.summary()
    checks = {}
    for key, (op, bound) in TARGETS.items():
        value = summary[key]
        checks[key] = {"value": round(value, 4), "target": f"{op} {bound}",
                       "met": value >= bound if op == ">=" else value <= bound}
    report = {"backbone": args.backbone, "controlnet": str(args.controlnet), "n": args.n, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
              "reuse_residuals": args.reuse_residuals,
              "seconds": round(time.perf_counter() - start, 1), "targets": checks,
              **{k: round(v, 4) for k, v in summary.items() if k != "n"}}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    if args.grid:
        result.samples, result.base_images, result.control_images = (
            result.samples[:8], result.base_images[:8], result.control_images[:8])
        result.iou_base, result.iou_control = result.iou_base[:8], result.iou_control[:8]
        save_png(args.grid, comparison_grid(result))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
