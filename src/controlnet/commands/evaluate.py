"""``controlnet evaluate``: controllability scores the way ControlNet++ measures them, and comparisons of two
ControlNets or of two runs (:data:`EXAMPLES`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from controlnet.eval_protocol import (DEFAULT_CLIP_WEIGHTS, NO_WEIGHTS, PROTOCOL_GUIDANCE, PROTOCOL_NEGATIVE_PROMPT,
                                      PROTOCOL_PER_EXAMPLE, PROTOCOL_SCHEDULER, PROTOCOL_STEPS)

EXAMPLES = """\
examples:
  controlnet evaluate --data fill_val --out runs/fill                    # the bundled fill ControlNet
  controlnet evaluate --data fill_val --out runs/base --controlnet none   # the base alone, same conditions
  controlnet evaluate --data fill_val --out runs/pair --controlnet fill --controlnet none
                                      # both (runs/pair/fill, runs/pair/none), then which is better, with intervals
  controlnet evaluate --data photos --annotator canny --controlnet lllyasviel/control_v11p_sd15_canny \\
      --base stable-diffusion-v1-5/stable-diffusion-v1-5 --out runs/canny
  controlnet evaluate --data photos --annotator canny --controlnet runs/a/final --controlnet runs/b/final \\
      --base stable-diffusion-v1-5/stable-diffusion-v1-5 --out runs/ab   # two of your own, compared
  controlnet evaluate --compare runs/base/summary.json runs/fill/summary.json   # two finished runs
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command."""
    from controlnet.options import HelpFormatter

    class ExamplesFormatter(HelpFormatter):
        """The command's help, with the examples' lines kept as written (argparse reflows an epilog)."""

        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return text if text == EXAMPLES else super()._fill_text(text, width, indent)

    parser = subparsers.add_parser(
        "evaluate", help="score how well generated images follow their conditions (ControlNet++ protocol)",
        description="For each example of a dataset generate K images from its condition and caption, re-detect "
                    "the condition from each image with the same annotator, and score the agreement by condition "
                    "type (canny: edge F1; soft edges and line art: MS-SSIM; depth: RMSE; segmentation: mIoU; "
                    "pose: PCK; fill: IoU); CLIP score and a CLIP-feature FID where the weights are on this "
                    "machine. Writes OUT/results.jsonl, OUT/summary.json and OUT/worst.png; resumes a stopped run. "
                    "With --controlnet given twice: each evaluated into its own sub-folder of OUT, then which is "
                    "better per score, with a paired bootstrap interval (OUT/comparison.json). With --compare: "
                    "the same for two finished runs.",
        epilog=EXAMPLES,
        formatter_class=ExamplesFormatter,
    )
    parser.add_argument("--data", type=Path, help="dataset: a folder with prompt.json (fill50k layout) or "
                        "metadata.jsonl (diffusers layout), or a folder of images with NAME.txt captions")
    parser.add_argument("--out", type=Path, default=Path("outputs/evaluate"), help="output folder")
    parser.add_argument("--controlnet", action="append", default=None, help="bundled name, folder, file or hub "
                        "id (default: fill); 'none': the base alone; twice: evaluate both and compare them")
    parser.add_argument("--base", default=None, help="base model (default: the embedded tiny model)")
    parser.add_argument("--annotator", default=None, help="the detector the conditions are made and re-detected "
                        "with (canny, hed, lineart, depth, segmentation, openpose, ...); without it the dataset's "
                        "conditions are used and the score follows the ControlNet's name (fill)")
    parser.add_argument("--annotator-param", action="append", default=[], metavar="KEY=VALUE",
                        help="an annotator parameter (repeatable), used for making and re-detecting alike")
    parser.add_argument("-k", "--per-example", type=int, default=PROTOCOL_PER_EXAMPLE,
                        help="images per example, seeds SEED+k")
    parser.add_argument("--steps", type=int, default=PROTOCOL_STEPS, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=PROTOCOL_GUIDANCE,
                        help="classifier-free guidance scale (the protocol's; the embedded demo uses 5)")
    parser.add_argument("--scheduler", default=PROTOCOL_SCHEDULER, help="sampler")
    parser.add_argument("--negative-prompt", default=None,
                        help=f"default: the protocol's {PROTOCOL_NEGATIVE_PROMPT!r}, or empty on the embedded base "
                        "(its vocabulary lacks those words)")
    parser.add_argument("--strength", type=float, default=1.0, help="ControlNet strength")
    parser.add_argument("--guess-mode", action="store_true",
                        help="the paper's classifier-free guidance resolution weighting (the original's guess mode): "
                             "control on the conditional branch only, residual i of N scaled by 0.825**(N-1-i)")
    parser.add_argument("--seed", type=int, default=0, help="seed of image 0; also seeds the bootstrap")
    parser.add_argument("--resolution", type=int, default=None, help="square side of the images (default: the "
                        "base's native size)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    parser.add_argument("--clip-weights", default=DEFAULT_CLIP_WEIGHTS, help="CLIP model folder or hub id in the "
                        f"Hugging Face cache (never downloaded); '{NO_WEIGHTS}': no CLIP score")
    parser.add_argument("--fid-weights", default=None, help="CLIP model for the CLIP-feature FID (default: "
                        f"--clip-weights); '{NO_WEIGHTS}': no FID")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the 95%% intervals")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                        help="compare two runs (summary.json, results.jsonl or their folders) instead")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate, compare two ControlNets, or compare two runs; print the table."""
    from controlnet.errors import UserError

    if args.compare:
        from controlnet.eval_stats import compare, format_comparison

        a, b = args.compare
        print(format_comparison(compare(a, b, samples=args.bootstrap, seed=args.seed), str(a), str(b)))
        return 0
    if args.data is None:
        raise UserError("pass --data DATASET to evaluate, or --compare A B to compare two runs")
    controlnets = [None if name == "none" else name for name in args.controlnet or ["fill"]]
    config = _config(args, controlnets[0])
    if len(controlnets) > 1:
        return _run_pair(args, config, controlnets)
    from controlnet.eval_stats import format_summary
    from controlnet.evaluate import evaluate

    summary = evaluate(config, progress=not args.quiet)
    for note in summary["notes"]:
        print(note)
    print(f"{summary['examples']} examples x {args.per_example} images; {summary['score']}: {summary['measures']}")
    print(format_summary(summary["scores"]))
    print(f"wrote {args.out / 'results.jsonl'}, summary.json, worst.png")
    return 0


def _config(args: argparse.Namespace, controlnet: str | None):
    """The :class:`controlnet.evaluate.EvalConfig` of the command line, with ``controlnet``."""
    from controlnet import annotators
    from controlnet.errors import UserError
    from controlnet.evaluate import EvalConfig

    if args.annotator_param and not args.annotator:
        raise UserError("--annotator-param needs --annotator")
    params = annotators.parse_params(args.annotator, args.annotator_param) if args.annotator else {}
    return EvalConfig(
        data=args.data, out=args.out, controlnet=controlnet, annotator=args.annotator, annotator_params=params,
        base=args.base, per_example=args.per_example, steps=args.steps, guidance=args.guidance,
        scheduler=args.scheduler, negative_prompt=args.negative_prompt, strength=args.strength, guess_mode=args.guess_mode, seed=args.seed,
        resolution=args.resolution, limit=args.limit, clip_weights=args.clip_weights, fid_weights=args.fid_weights,
        bootstrap=args.bootstrap)


def _run_pair(args: argparse.Namespace, config, controlnets: list[str | None]) -> int:
    """Evaluate each of two ControlNets into its sub-folder of --out; print and write the comparison."""
    from controlnet.eval_compare import BASE_ALONE, COMPARISON_FILE, evaluate_pair
    from controlnet.eval_stats import format_comparison

    comparison = evaluate_pair(config, controlnets, progress=not args.quiet)
    for note in comparison["notes"]:
        print(note)
    a, b = (f"{side['controlnet'] or BASE_ALONE + ' (the base alone)'}: {side['run']}"
            for side in (comparison["a"], comparison["b"]))
    print(format_comparison(comparison["scores"], a, b))
    print(f"wrote {args.out / COMPARISON_FILE}")
    return 0
