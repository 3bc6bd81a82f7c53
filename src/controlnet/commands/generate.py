"""``controlnet generate``: a prompt and control images → PNGs with their settings, and a grid.

Per ControlNet, repeat a group in order (the options after a ``--controlnet``/``--control`` apply to it)::

    controlnet generate --prompt "a red circle on a white background" \\
        --controlnet fill --control circle.png --strength 0.8 \\
        --controlnet edges.safetensors --control photo.jpg --annotator canny --start 0 --end 0.5

Writes ``NNNNN-<seed>.png`` per image (settings as PNG text), ``NNNNN-control<j>.png`` (the condition each
ControlNet actually used) and ``NNNNN-grid.png`` (conditions | outputs) into ``--out``, all at the end and
atomically: on any error nothing is written.

Image to image, inpainting and hires fix (see :mod:`controlnet.img2img`)::

    controlnet generate --prompt "..." --init-image photo.png --denoise 0.6 --controlnet ... --control edges.png
    controlnet generate --prompt "..." --init-image photo.png --mask mask.png [--inpaint-full-res]
    controlnet generate --prompt "..." --controlnet ... --control c.png --hires-scale 2 --hires-denoise 0.5

Batches (:mod:`controlnet.batch`, resumable): ``--control-dir DIR`` in place of a ``--control`` (one generation
per image of DIR), ``--prompts FILE`` (one per line). ``--from-png IMG`` re-runs the settings stored in one of our
PNGs; options after it override them.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path
from typing import Any

from controlnet.defaults import (
    CONTROL_MODES, DEFAULT_HIRES_DENOISE, DEFAULT_INPAINT_PADDING, DEFAULT_MASK_BLUR, DEFAULT_STEPS, DTYPE_CHOICES,
    HIRES_UPSCALERS, MAX_NUM_IMAGES, SCHEDULERS, describe_family_defaults,
)
from controlnet.errors import UserError
from controlnet.limits import (
    BYTES_PER_PIXEL, MAX_PIXELS_FLAG, check_cover, check_max_pixels, check_output_size, check_seed,
)


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
    p.add_argument("--prompt", default=None, help="what to draw (required unless --prompts or --from-png gives it)")
    p.add_argument("--negative-prompt", default="", help="what to avoid (the unconditional branch of guidance)")
    p.add_argument("--base", default=None, help="base model: a diffusers folder, a .safetensors/.ckpt file or a "
                   "hub id (org/name, org/name/file.safetensors; downloaded into the Hugging Face cache on first use "
                   "unless HF_HUB_OFFLINE=1) (default: the embedded tiny model)")
    p.add_argument("--base-config", default=None, metavar="DIR",
                   help="for a single-file --base offline: a diffusers folder of the same family (configs, tokenizer)")
    p.add_argument("--scheduler", default=None, metavar="NAME",
                   help=f"sampler: {', '.join(SCHEDULERS)}, or A1111's name ('DPM++ 2M Karras'); lcm/tcd: 4-8 steps "
                   f"with an LCM/TCD LoRA (default: {describe_family_defaults('scheduler')})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale, <= 1 turns it off (default: {describe_family_defaults('guidance')})")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k; -1 picks a random seed (0..2**63-1)")
    p.add_argument("--num-images", type=int, default=1, metavar="N",
                   help=f"images to generate, one batch, 1..{MAX_NUM_IMAGES}")
    p.add_argument("--size", default=None, metavar="WxH",
                   help="output size, multiples of 8 (default: the first control image's aspect ratio at the base's resolution)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta, 0 = deterministic sampling")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_CHOICES],
                   help="model precision (auto: fp16 on cuda, fp32 on mps, bf16 on CPUs with AMX or AVX-512 BF16, else "
                   "fp32; the embedded base: fp32 on CPUs)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--guess-mode", action="store_true",
                   help="control on the conditional branch only, residual scales 0.825**(N-1-i) (works with an empty prompt)")
    p.add_argument("--reuse-residuals", type=int, default=1, metavar="N",
                   help="compute each ControlNet every N steps and reuse its residuals in between (faster, less exact; default 1: every step)")
    p.add_argument(MAX_PIXELS_FLAG, type=int, default=None, metavar="N",
                   help=f"largest output, in pixels per image (default: the device's memory / {BYTES_PER_PIXEL} "
                   "bytes per pixel)")
    p.add_argument("--out", default="outputs", metavar="DIR", help="output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--from-png", action=FromPng, metavar="IMG",
                   help="re-run the settings stored in a PNG written by controlnet (options after it override them)")
    add_image_options(p)
    add_model_options(p)
    unit = p.add_argument_group("per ControlNet (repeat the group, in order)")
    unit.add_argument("--controlnet", action=_UnitOption, dest="unit_options", metavar="NAME_OR_PATH",
                      help="a bundled ControlNet name (e.g. fill), a path (diffusers folder, .safetensors, .pth) or a "
                      "hub id (e.g. lllyasviel/control_v11p_sd15_canny)")
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
    unit.add_argument("--control-mode", action=_UnitOption, dest="unit_options", choices=CONTROL_MODES,
                      help="balanced; prompt: deep residuals weaker; controlnet: conditional branch only "
                      "(the A1111 extension's modes; default balanced)")
    unit.add_argument("--control-dir", action=_UnitOption, dest="unit_options", metavar="DIR",
                      help="instead of --control: one generation per image in DIR, named after it (resumable)")
    p.set_defaults(func=run, unit_options=[])


def parse_units(options: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Group per-ControlNet options into units: the i-th --controlnet pairs with the i-th --control, and every
    other option applies to the unit of the --controlnet/--control given last before it."""
    n_controlnets = sum(1 for opt, _ in options if opt == "--controlnet")
    n_controls = sum(1 for opt, _ in options if opt in ("--control", "--control-dir"))
    if n_controlnets != n_controls:
        raise UserError(f"got {n_controlnets} --controlnet and {n_controls} --control; give one --control IMAGE per --controlnet")
    units: list[dict[str, Any]] = []
    seen = {"--controlnet": 0, "--control": 0}
    for option, value in options:
        slot = "--control" if option == "--control-dir" else option  # a folder of controls takes a control's place
        if slot in seen:
            seen[slot] += 1
            index = seen[slot] - 1
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
    from controlnet.fileio import check_writable_folder
    from controlnet.devices import resolve_device
    from controlnet.loading import resolve_controlnet_source
    from controlnet.pipeline import ControlUnit, Pipeline

    # 1. Inputs first (cheap, before loading any model): units, files, numbers, sizes, the device, --out.
    if args.prompt is None and not args.prompts:
        raise UserError("give --prompt TEXT (or --prompts FILE, or --from-png IMG); see `controlnet generate --help`")
    image_options = check_image_options(args)
    model_options = check_model_options(args)
    size = parse_size(args.size)
    check_seed(args.seed, "--seed", allow_random=True)
    max_pixels = check_max_pixels(args.max_pixels)
    device = str(resolve_device(args.device))  # an unknown or absent device fails here
    if size is not None:
        check_output_size(*size, max_pixels=max_pixels, device=device, what="--size")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if not 1 <= args.num_images <= MAX_NUM_IMAGES:
        raise UserError(f"--num-images must be in 1..{MAX_NUM_IMAGES} (one batch), got {args.num_images}; "
                        "run the command again for more images")
    units = []
    batch = Batch.from_args(args)
    for index, spec in enumerate(parse_units(args.unit_options)):
        resolve_controlnet_source(spec["controlnet"], variant=args.variant)  # unknown name, missing path or hub id
        spec.setdefault("control", batch.first_control(spec, index))
        condition = to_condition_array(spec["control"])  # missing / unreadable / too large images fail here
        if size is not None:
            check_cover(condition.shape[1], condition.shape[0], *size, name=f"--control {spec['control']}")
        units.append(ControlUnit(
            controlnet=spec["controlnet"], image=spec["control"],
            strength=spec.get("strength", 1.0), start=spec.get("start", 0.0), end=spec.get("end", 1.0),
            control_mode=spec.get("control-mode", "balanced"), annotator=spec.get("annotator"),
            annotator_params=annotator_params(spec.get("annotator"), spec.get("annotator-param", []), index),
        ))
    seed = None if args.seed == -1 else args.seed
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    check_writable_folder(out, "--out")

    # 2. Models, then the generation.
    pipe = Pipeline.from_pretrained(args.base, dtype=args.dtype, device=args.device, base_config=args.base_config,
                                    revision=args.revision, variant=args.variant)
    pipe.max_pixels = max_pixels
    apply_model_options(pipe, model_options)
    if size is not None:
        rounded = round_size(*size, multiple=pipe.vae_scale_factor)
        if rounded != size:
            print(f"note: --size {size[0]}x{size[1]} is not a multiple of {pipe.vae_scale_factor}; "
                  f"rounded to {rounded[0]}x{rounded[1]}", file=sys.stderr)
        size = rounded
    settings = dict(
        negative_prompt=args.negative_prompt, steps=args.steps,
        guidance=args.guidance, scheduler=args.scheduler, seed=seed, size=size, num_images=args.num_images,
        eta=args.eta, guess_mode=args.guess_mode, progress=not args.quiet, reuse_residuals=args.reuse_residuals,
        **image_options,
    )
    if batch.active:
        batch.run(pipe, settings, units, out, args.num_images, args.quiet)
        return 0
    result = pipe(prompt=args.prompt, controls=units, **settings)

    for path in write_outputs(out, result):
        print(path)
    return 0


def write_outputs(out: Path, result: Any) -> list[Path]:
    """The images, the conditions and the grid of a generation in ``out``, with their settings as PNG text.

    Every file is written to a temporary name first; all are renamed into place only when all are written, so a
    failed write (no space, no permission) leaves nothing, not even a folder made for them.
    """
    from controlnet.fileio import atomic_path
    from controlnet.images import make_grid, png_metadata, save_png

    run_no = next_run_number(out)
    files: list[tuple[Path, Any, dict[str, str]]] = []
    for k, image in enumerate(result.images):
        files.append((out / f"{run_no:05d}-{result.settings['seeds'][k]}.png", image, png_metadata(result.settings, k)))
    for j, (condition, spec) in enumerate(zip(result.conditions, result.settings["controlnets"])):
        meta = {key: str(value) for key, value in spec.items()}
        files.append((out / f"{run_no:05d}-control{j}.png", condition, meta))
    grid_meta = png_metadata(result.settings, 0)
    files.append((out / f"{run_no:05d}-grid.png", make_grid([*result.conditions, *result.images]), grid_meta))
    made_out = not out.exists()
    try:
        with contextlib.ExitStack() as stack:
            for path, image, meta in files:
                save_png(stack.enter_context(atomic_path(path)), image, meta)
    except BaseException:
        if made_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return [path for path, _, _ in files]


# --------------------------------------------------------------------------- your models: LoRA, embeddings, VAE, speed


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options of the base model as practitioners have it (:mod:`controlnet.base_model`)."""
    g = parser.add_argument_group("your models (LoRA, embeddings, VAE, text) and memory/speed")
    g.add_argument("--revision", default=None, metavar="REV", help="branch, tag or commit of a hub --base (any hub id also takes org/name@REV)")
    g.add_argument("--variant", default=None, metavar="NAME",
                   help="weights variant of hub/diffusers models, e.g. fp16 (*.fp16.safetensors), where they have it")
    g.add_argument("--lora", action="append", default=[], metavar="FILE_OR_ID[:WEIGHT]",
                   help="a LoRA (kohya/A1111 or diffusers/peft layout) on the UNet and text encoder, weight 1 unless "
                   "given; repeatable. <lora:NAME:WEIGHT> in the prompt works too, with --lora-dir")
    g.add_argument("--lora-dir", default=None, metavar="DIR", help="where <lora:NAME> and --lora NAME are looked for")
    g.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (A1111 .pt/.safetensors or diffusers); its token is TOKEN, "
                   "else the file's name; repeatable")
    g.add_argument("--vae", default=None, metavar="FILE_OR_ID", help="another VAE (a single file, a folder or a hub id)")
    g.add_argument("--clip-skip", type=int, default=1, metavar="N",
                   help="text from the N-th last layer of the text encoder, as A1111 counts (2: the penultimate)")
    g.add_argument("--vae-tiling", choices=["auto", "on", "off"], default="auto",
                   help="decode in tiles (large outputs in bounded memory); auto: when the plain decode would need "
                   "over half the device's memory")
    g.add_argument("--offload", choices=["model", "sequential"], default=None,
                   help="keep models on the CPU, each moved to the device only to run (model: whole models; "
                   "sequential: layer by layer, least memory, slowest)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and ControlNets (the first generation compiles, later ones are faster)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format for the conv models")


def check_model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model options parsed and checked before any model is loaded."""
    from controlnet.defaults import scheduler_name

    if args.scheduler is not None:
        args.scheduler = scheduler_name(args.scheduler)  # unknown names fail here; A1111's become ours
    if args.clip_skip < 1:
        raise UserError(f"--clip-skip must be >= 1 (1: the last layer, 2: the penultimate), got {args.clip_skip}")
    if args.lora_dir is not None and not Path(args.lora_dir).expanduser().is_dir():
        raise UserError(f"--lora-dir {args.lora_dir}: not a folder")
    from controlnet.embeddings import parse_embedding_spec
    from controlnet.lora import parse_lora_spec

    return dict(loras=[parse_lora_spec(text) for text in args.lora],
                embeddings=[parse_embedding_spec(text) for text in args.embedding],
                vae=args.vae, revision=args.revision, variant=args.variant, clip_skip=args.clip_skip,
                lora_dir=args.lora_dir, vae_tiling=args.vae_tiling, offload=args.offload, compile=args.compile,
                channels_last=args.channels_last)


def apply_model_options(pipe: Any, options: dict[str, Any]) -> None:
    """Load the VAE, embeddings and LoRAs into ``pipe`` and set its text and runtime options."""
    pipe.clip_skip = options["clip_skip"]
    pipe.lora_dir = Path(options["lora_dir"]).expanduser() if options["lora_dir"] else None
    pipe.vae_tiling = options["vae_tiling"]
    if options["vae"]:
        pipe.load_vae(options["vae"], variant=options["variant"])
    for source, token in options["embeddings"]:
        pipe.load_embedding(source, token)
    for spec in options["loras"]:
        pipe.load_lora(spec.source, spec.weight)
    if options["channels_last"]:
        pipe.use_channels_last()
    if options["compile"]:
        pipe.compile()
    if options["offload"]:
        pipe.enable_offload(options["offload"])


# --------------------------------------------------------------------------- image to image, hires fix, batches


def add_image_options(parser: argparse.ArgumentParser) -> None:
    """The options of image to image, inpainting, hires fix and batches (:mod:`controlnet.img2img`)."""
    from controlnet.defaults import DEFAULT_DENOISE, DEFAULT_INPAINT_DENOISE

    g = parser.add_argument_group("image to image and inpainting")
    g.add_argument("--init-image", metavar="IMG",
                   help="start from this picture (img2img); the output has its size unless --size is given")
    g.add_argument("--denoise", type=float, default=None, metavar="S",
                   help=f"how much of the picture is redrawn, in [0, 1] (default {DEFAULT_DENOISE}; "
                   f"{DEFAULT_INPAINT_DENOISE} with --mask)")
    g.add_argument("--mask", metavar="MASK",
                   help="inpaint: white = repaint, the picture's size; every other pixel is kept exactly")
    g.add_argument("--mask-blur", type=float, default=DEFAULT_MASK_BLUR, metavar="PX",
                   help="feather the mask inward over PX pixels (pixels outside it never change)")
    g.add_argument("--mask-invert", action="store_true", help="repaint the black part of the mask instead")
    g.add_argument("--inpaint-full-res", action="store_true",
                   help="work on the mask's box (plus padding) at the full output size, then paste it back "
                   "(A1111's 'only masked')")
    g.add_argument("--inpaint-padding", type=int, default=DEFAULT_INPAINT_PADDING, metavar="PX",
                   help="pixels around the mask's box, with --inpaint-full-res")
    h = parser.add_argument_group("hires fix (text-to-image)")
    h.add_argument("--hires-scale", type=float, default=None, metavar="F",
                   help="generate, upscale by F, then refine at the larger size (default: off)")
    h.add_argument("--hires-denoise", type=float, default=DEFAULT_HIRES_DENOISE, metavar="S",
                   help="denoise of the refining pass, in [0, 1]")
    h.add_argument("--hires-steps", type=int, default=None, metavar="N",
                   help="steps of the refining pass's schedule (default: --steps)")
    h.add_argument("--hires-upscaler", choices=HIRES_UPSCALERS, default="latent",
                   help="latent: the latents, bilinear (A1111's 'Latent'); lanczos: the pictures")
    b = parser.add_argument_group("batch")
    b.add_argument("--prompts", metavar="FILE",
                   help="one generation per line of FILE, named promptNNNNN.png (resumable: done ones are skipped)")


def check_image_options(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's image-to-image and hires keyword arguments, checked (files read, mask size, ranges)."""
    from controlnet.img2img import load_source
    from controlnet.pipeline import HiresFix

    kwargs: dict[str, Any] = {}
    if args.denoise is not None and not 0.0 <= args.denoise <= 1.0:
        raise UserError(f"--denoise must be in [0, 1] (0: the picture back, 1: redraw it all), got {args.denoise}")
    if args.init_image is not None:
        load_source(args.init_image, args.mask, args.mask_invert)  # unreadable files, mask size, nothing to repaint
        kwargs.update(init_image=args.init_image, denoise=args.denoise, mask=args.mask, mask_blur=args.mask_blur,
                      mask_invert=args.mask_invert, inpaint_full_res=args.inpaint_full_res,
                      inpaint_padding=args.inpaint_padding)
    else:
        for flag, given in (("--denoise", args.denoise is not None), ("--mask", args.mask is not None),
                            ("--mask-invert", args.mask_invert), ("--inpaint-full-res", args.inpaint_full_res)):
            if given:
                raise UserError(f"{flag} needs --init-image IMG, the picture to work on")
    if args.hires_scale is not None:
        kwargs["hires"] = HiresFix(args.hires_scale, args.hires_denoise, args.hires_steps, args.hires_upscaler)
    return kwargs


class Batch:
    """``--control-dir`` (in one ControlNet's group) and ``--prompts`` of a run (:mod:`controlnet.batch`)."""

    def __init__(self, prompt: str | None, prompts: list[str] | None):
        self.prompt, self.prompts = prompt, prompts
        self.control_unit: int | None = None
        self.controls: list[Path] | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Batch":
        from controlnet.batch import read_prompts

        if args.prompt is not None and args.prompts:
            raise UserError("give --prompt or --prompts FILE, not both")
        return cls(args.prompt, read_prompts(args.prompts) if args.prompts else None)

    @property
    def active(self) -> bool:
        return self.prompts is not None or self.controls is not None

    def first_control(self, spec: dict[str, Any], index: int) -> Any:
        """A unit's condition: its --control, or the first image of its --control-dir (recorded)."""
        from controlnet.batch import list_controls

        if "control-dir" not in spec:
            return spec.get("control")
        if self.controls is not None:
            raise UserError("--control-dir given for two ControlNets; give it for one (the others take --control)")
        self.control_unit, self.controls = index, list_controls(spec["control-dir"])
        return str(self.controls[0])

    def run(self, pipe: Any, settings: dict[str, Any], units: list[Any], out: Path, num_images: int,
            quiet: bool) -> None:
        import functools

        from controlnet.batch import make_jobs, run_jobs

        jobs = make_jobs(self.prompt, self.prompts, self.controls)
        run_jobs(functools.partial(pipe, **settings), jobs, out, num_images, units, self.control_unit, quiet)


# Settings of ours → the generate options that set them (the rest are named alike, with dashes).
_SETTING_OPTIONS = ("prompt", "negative_prompt", "steps", "scheduler", "guidance", "seed", "size", "eta",
                    "guess_mode", "reuse_residuals", "init_image", "denoise", "mask", "mask_blur", "mask_invert",
                    "inpaint_full_res", "inpaint_padding", "clip_skip", "vae")


class FromPng(argparse.Action):
    """``--from-png IMG``: the settings stored in a PNG of ours (the "settings" chunk; for another tool's PNG, the
    A1111 "parameters" text) become the options' values; options given after it override them."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            options = png_options(values)
        except UserError as err:
            raise argparse.ArgumentError(self, str(err)) from None
        for dest, value in options.items():
            setattr(namespace, dest, value)


def png_options(path: str) -> dict[str, Any]:
    """The ``generate`` option values (argparse dests) that re-run the generation of the PNG at ``path``."""
    import json

    from controlnet.images import open_image

    text = {k: v for k, v in open_image(path).info.items() if isinstance(v, str)}  # the PNG's text chunks
    if "settings" not in text:
        return _a1111_options(path, text)
    settings = json.loads(text["settings"])
    options = {key: settings[key] for key in _SETTING_OPTIONS if key in settings}
    options["num_images"] = 1  # this PNG's image: its own seed
    if settings.get("dtype") in DTYPE_CHOICES:
        options["dtype"] = settings["dtype"]
    options["base"] = None if settings.get("base") in (None, "", "embedded") else settings["base"]
    for key in ("init_image", "mask"):
        if str(options.get(key, "")).startswith("<"):
            raise UserError(f"{path}: its {key.replace('_', ' ')} was an in-memory image, not a file; it cannot be re-run")
    options.update(_model_options(path, settings))
    hires = settings.get("hires")
    if hires:
        options.update(hires_scale=hires["scale"], hires_denoise=hires["denoise"], hires_steps=hires["steps"],
                       hires_upscaler=hires["upscaler"])
    units: list[tuple[str, Any]] = []
    for j, unit in enumerate(settings.get("controlnets", [])):
        if str(unit["control"]).startswith("<") or str(unit["controlnet"]).startswith("ControlNet ("):
            raise UserError(f"{path}: ControlNet {j + 1} was given in memory, not as a file; it cannot be re-run")
        units += [("--controlnet", unit["controlnet"]), ("--control", unit["control"]),
                  ("--strength", unit["strength"]), ("--start", unit["start"]), ("--end", unit["end"]),
                  ("--control-mode", unit.get("control_mode", "balanced"))]
        if unit.get("annotator"):
            units.append(("--annotator", unit["annotator"]))
            units += [("--annotator-param", f"{k}={v}") for k, v in unit.get("annotator_params", {}).items()]
    options["unit_options"] = units
    return options


def _model_options(path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The --lora, --lora-dir and --embedding values that load the LoRAs and embeddings of ``settings`` again."""
    options: dict[str, Any] = {"lora": [], "embedding": [f"{file}:{token}"
                                                       for token, file in settings.get("embeddings", {}).items()]}
    for name, (source, weight, text_weight) in settings.get("lora_files", {}).items():
        if text_weight != weight:
            raise UserError(f"{path}: LoRA {name} had the UNet weight {weight} and the text-encoder weight "
                            f"{text_weight}; --lora gives both one weight, so it cannot be re-run from the command line")
        options["lora"].append(f"{source}:{weight}")
    if settings.get("lora_dir"):
        options["lora_dir"] = settings["lora_dir"]
    return options


def _a1111_options(path: str, text: dict[str, str]) -> dict[str, Any]:
    """The options an A1111 ``parameters`` text gives: prompt, negative prompt, steps, sampler, CFG, seed, size."""
    from controlnet.a1111 import SAMPLER_NAMES, parse_parameters

    if "parameters" not in text:
        raise UserError(f"{path}: no generation settings in it (neither ours nor A1111's 'parameters')")
    found = parse_parameters(text["parameters"])
    options: dict[str, Any] = {"prompt": found["Prompt"], "negative_prompt": found["Negative prompt"], "num_images": 1}
    samplers = {name: ours for ours, name in SAMPLER_NAMES.items()}
    for key, dest, kind in (("Steps", "steps", int), ("CFG scale", "guidance", float), ("Seed", "seed", int),
                            ("Size", "size", str)):
        if key in found:
            options[dest] = kind(found[key])
    if found.get("Sampler") in samplers:
        options["scheduler"] = samplers[found["Sampler"]]
    return options
