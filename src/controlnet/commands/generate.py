"""``controlnet generate``: a prompt and control images → PNGs with their settings, and a grid.

Per ControlNet, repeat a group in order (the options after a ``--controlnet``/``--control`` apply to it)::

    controlnet generate --prompt "a red circle on a white background" \\
        --controlnet fill --control circle.png --strength 0.8 \\
        --controlnet edges.safetensors --control photo.jpg --annotator canny --start 0 --end 0.5

Writes ``NNNNN-<seed>.png`` per image (settings as PNG text), ``NNNNN-control<j>.png`` (the condition each
ControlNet actually used) and ``NNNNN-grid.png`` (conditions | outputs) into ``--out``, all at the end and
atomically: on any error nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path
from typing import Any

from controlnet.defaults import (
    DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, DTYPE_CHOICES, MAX_NUM_IMAGES, SCHEDULERS,
)
from controlnet.errors import UserError


class _UnitOption(argparse.Action):
    """Record every per-ControlNet option, in command-line order, as (option, value) in ``args.unit_options``."""

    def __call__(self, parser, namespace, values, option_string=None):
        recorded = list(getattr(namespace, self.dest, None) or [])
        recorded.append((option_string, values))
        setattr(namespace, self.dest, recorded)


def register(subparsers: Any) -> None:
    """Add the ``generate`` sub-command."""
    p = subparsers.add_parser(
        "generate",
        help="generate images from a prompt and control images",
        description="Generate images from a prompt and one or more ControlNets with their condition images. "
        "Repeat --controlnet NAME_OR_PATH --control IMAGE [--annotator NAME [--annotator-param KEY=VALUE ...]] "
        "[--strength S] [--start A] [--end B] once per ControlNet, in order.",
    )
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what to avoid (the unconditional branch of guidance)")
    p.add_argument("--base", default=None, help="base model: a diffusers folder or a .safetensors/.ckpt file "
                   "(default: the embedded tiny model)")
    p.add_argument("--base-config", default=None, metavar="DIR",
                   help="for a single-file --base offline: a diffusers folder of the same family (configs, tokenizer)")
    p.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=list(SCHEDULERS), help="sampler")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale, <= 1 turns it off")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k; -1 picks a random seed")
    p.add_argument("--num-images", type=int, default=1, metavar="N",
                   help=f"images to generate, one batch, 1..{MAX_NUM_IMAGES}")
    p.add_argument("--size", default=None, metavar="WxH",
                   help="output size, multiples of 8 (default: the first control image's aspect ratio at the base's resolution)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta, 0 = deterministic sampling")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_CHOICES],
                   help="model precision (auto: fp16 on cuda, fp32 on mps, bf16 on CPUs with AMX or AVX-512 BF16, else fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--guess-mode", action="store_true",
                   help="control on the conditional branch only, residual scales 0.825**(N-1-i) (works with an empty prompt)")
    p.add_argument("--reuse-residuals", type=int, default=1, metavar="N",
                   help="compute each ControlNet every N steps and reuse its residuals in between (faster, less exact; default 1: every step)")
    p.add_argument("--out", default="outputs", metavar="DIR", help="output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    unit = p.add_argument_group("per ControlNet (repeat the group, in order)")
    unit.add_argument("--controlnet", action=_UnitOption, dest="unit_options", metavar="NAME_OR_PATH",
                      help="a bundled ControlNet name (e.g. fill) or a path (diffusers folder, .safetensors, .pth)")
    unit.add_argument("--control", action=_UnitOption, dest="unit_options", metavar="IMAGE",
                      help="its condition image (resized to the output size: cover, then centre-crop)")
    unit.add_argument("--annotator", action=_UnitOption, dest="unit_options", metavar="NAME",
                      help="run this annotator on the image first (see `controlnet annotate --list`)")
    unit.add_argument("--annotator-param", action=_UnitOption, dest="unit_options", metavar="KEY=VALUE",
                      help="an annotator parameter, repeatable (e.g. low_threshold=50, mask=mask.png)")
    unit.add_argument("--strength", action=_UnitOption, dest="unit_options", type=float, metavar="S",
                      help="residual scale, >= 0 (default 1.0)")
    unit.add_argument("--start", action=_UnitOption, dest="unit_options", type=float, metavar="A",
                      help="first fraction of the steps it applies to, in [0, 1] (default 0)")
    unit.add_argument("--end", action=_UnitOption, dest="unit_options", type=float, metavar="B",
                      help="last fraction of the steps it applies to, in [0, 1] (default 1)")
    p.set_defaults(func=run, unit_options=[])


def parse_units(options: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Group per-ControlNet options into units: the i-th --controlnet pairs with the i-th --control, and every
    other option applies to the unit of the --controlnet/--control given last before it."""
    n_controlnets = sum(1 for opt, _ in options if opt == "--controlnet")
    n_controls = sum(1 for opt, _ in options if opt == "--control")
    if n_controlnets != n_controls:
        raise UserError(f"got {n_controlnets} --controlnet and {n_controls} --control; give one --control IMAGE per --controlnet")
    units: list[dict[str, Any]] = []
    seen = {"--controlnet": 0, "--control": 0}
    for option, value in options:
        if option in seen:
            seen[option] += 1
            index = seen[option] - 1
            while len(units) <= index:
                units.append({})
        elif not units:
            raise UserError(f"{option} must come after the --controlnet/--control it applies to")
        else:
            index = max(seen.values()) - 1
        key = option.lstrip("-")
        if key == "annotator-param":
            units[index].setdefault(key, []).append(value)
            continue
        if key in units[index]:
            raise UserError(f"{option} given twice for ControlNet {index + 1}; give it once per --controlnet group")
        units[index][key] = value
    return units


def parse_size(text: str | None) -> tuple[int, int] | None:
    """"WxH" (or "N" for a square) → (width, height)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", text)
    if not match or int(match.group(1)) == 0 or (match.group(2) is not None and int(match.group(2)) == 0):
        raise UserError(f"--size {text!r}: give WIDTHxHEIGHT in pixels, e.g. 512x768")
    width = int(match.group(1))
    return width, int(match.group(2)) if match.group(2) else width


def annotator_params(name: str | None, items: list[str], index: int) -> dict[str, Any]:
    """``KEY=VALUE`` strings → the annotator's typed parameters, checked now (before any model is loaded)."""
    if name is None:
        if items:
            raise UserError(f"--annotator-param given for ControlNet {index + 1}, which has no --annotator")
        return {}
    from controlnet import annotators

    annotator = annotators.get(name)  # unknown name: a one-line error listing the known ones
    params = annotator.parse_params(items)
    annotator.resolve(params)  # missing required parameters (inpaint's mask, pose's keypoints)
    return params


def next_run_number(out: Path) -> int:
    """The first run number not used by a ``NNNNN-*.png`` file in ``out``."""
    numbers = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))] if out.is_dir() else []
    return max(numbers, default=-1) + 1


def run(args: argparse.Namespace) -> int:
    """Check every input, load the models, generate, then write all outputs at once."""
    from controlnet.conditions import round_size, to_condition_array
    from controlnet.embedded import resolve_controlnet
    from controlnet.fileio import atomic_path
    from controlnet.images import make_grid, png_metadata, save_png
    from controlnet.pipeline import ControlUnit, Pipeline

    # 1. Inputs first (cheap, before loading any model): units, files, numbers.
    size = parse_size(args.size)
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if not 1 <= args.num_images <= MAX_NUM_IMAGES:
        raise UserError(f"--num-images must be in 1..{MAX_NUM_IMAGES} (one batch), got {args.num_images}; "
                        "run the command again for more images")
    units = []
    for index, spec in enumerate(parse_units(args.unit_options)):
        resolve_controlnet(spec["controlnet"])  # a one-line error for an unknown name or a missing path
        to_condition_array(spec["control"])  # missing / unreadable images fail here
        units.append(ControlUnit(
            controlnet=spec["controlnet"], image=spec["control"],
            strength=spec.get("strength", 1.0), start=spec.get("start", 0.0), end=spec.get("end", 1.0),
            annotator=spec.get("annotator"),
            annotator_params=annotator_params(spec.get("annotator"), spec.get("annotator-param", []), index),
        ))
    seed = None if args.seed == -1 else args.seed
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")

    # 2. Models, then the generation.
    pipe = Pipeline.from_pretrained(args.base, dtype=args.dtype, device=args.device, base_config=args.base_config)
    if size is not None:
        rounded = round_size(*size, multiple=pipe.vae_scale_factor)
        if rounded != size:
            print(f"note: --size {size[0]}x{size[1]} is not a multiple of {pipe.vae_scale_factor}; "
                  f"rounded to {rounded[0]}x{rounded[1]}", file=sys.stderr)
        size = rounded
    result = pipe(
        prompt=args.prompt, controls=units, negative_prompt=args.negative_prompt, steps=args.steps,
        guidance=args.guidance, scheduler=args.scheduler, seed=seed, size=size, num_images=args.num_images,
        eta=args.eta, guess_mode=args.guess_mode, progress=not args.quiet, reuse_residuals=args.reuse_residuals,
    )

    # 3. Outputs: every file to a temporary name first; all are renamed into place only when all are written.
    run_no = next_run_number(out)
    files: list[tuple[Path, Any, dict[str, str]]] = []
    for k, image in enumerate(result.images):
        files.append((out / f"{run_no:05d}-{result.settings['seeds'][k]}.png", image, png_metadata(result.settings, k)))
    for j, (condition, spec) in enumerate(zip(result.conditions, result.settings["controlnets"])):
        meta = {key: str(value) for key, value in spec.items()}
        files.append((out / f"{run_no:05d}-control{j}.png", condition, meta))
    grid_meta = png_metadata(result.settings, 0)
    files.append((out / f"{run_no:05d}-grid.png", make_grid([*result.conditions, *result.images]), grid_meta))
    with contextlib.ExitStack() as stack:
        for path, image, meta in files:
            save_png(stack.enter_context(atomic_path(path)), image, meta)
    for path, _, _ in files:
        print(path)
    return 0
