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

Flux and SD3/SD3.5 bases (diffusers folders or hub ids) run :class:`controlnet.transformer_pipeline.TransformerPipeline`
with their ControlNets (diffusers folders, single files, XLabs and Stability layouts; a union ControlNet's mode by
``--control-type``); :func:`controlnet.loading.base_folder_family` makes the choice, the options and outputs are the same::

    controlnet generate --base black-forest-labs/FLUX.1-dev --prompt "..." \\
        --controlnet InstantX/FLUX.1-dev-Controlnet-Union --control edges.png --control-type canny

Batches (:mod:`controlnet.batch`, resumable): ``--control-dir DIR`` in place of a ``--control`` (one generation
per image of DIR), ``--prompts FILE`` (one per line). ``--from-png IMG`` re-runs the settings stored in one of our
PNGs; options after it override them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import re
import sys
from pathlib import Path
from typing import Any

from controlnet.defaults import CONTROL_MODES, DTYPE_CHOICES
from controlnet.errors import UserError
from controlnet.generation_config import FLOW_DEFAULTS, GenerationConfig, HiresFix, ImageToImage
from controlnet.limits import BYTES_PER_PIXEL, MAX_PIXELS_FLAG, check_cover, check_max_pixels, check_output_size
from controlnet.options import add_config_options


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
        "[--strength S] [--start A] [--end B] [--control-type NAME] once per ControlNet, in order. --controlnet takes "
        "every UNet control family, told from the file: ControlNets (original or diffusers layout), Union/ProMax "
        "ControlNets (with --control-type; units naming one union model run as one pass, and several --control "
        "after one --controlnet repeat it), Control-LoRAs and "
        "T2I-Adapters (--strength: the adapter scale; --end: the fraction of steps it acts for).",
    )
    p.add_argument("--prompt", default=None, help="what to draw (required unless --prompts or --from-png gives it)")
    p.add_argument("--base", default=None, help="base model: a diffusers folder, a .safetensors/.ckpt file or a "
                   "hub id (org/name, org/name/file.safetensors; downloaded into the Hugging Face cache on first use "
                   "unless HF_HUB_OFFLINE=1); SD1.x, SD2.x, SDXL, or a Flux / SD3 diffusers folder or hub id "
                   "(default: the embedded tiny model)")
    p.add_argument("--base-config", default=None, metavar="DIR",
                   help="for a single-file --base offline: a diffusers folder of the same family (configs, tokenizer)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_CHOICES],
                   help="model precision (auto: fp16 on cuda, fp32 on mps, bf16 on CPUs with AMX or AVX-512 BF16, else "
                   "fp32; the embedded base: fp32 on CPUs)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument(MAX_PIXELS_FLAG, type=int, default=None, metavar="N",
                   help=f"largest output, in pixels per image (default: the device's memory / {BYTES_PER_PIXEL} "
                   "bytes per pixel)")
    p.add_argument("--out", default="outputs", metavar="DIR", help="output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--from-png", action=FromPng, metavar="IMG",
                   help="re-run the settings stored in a PNG written by controlnet (options after it override them)")
    add_config_options(p, GenerationConfig)
    add_config_options(p, ImageToImage)
    add_config_options(p, HiresFix, prefix="hires_")
    p.set_defaults(hires_scale=None)  # no --hires-scale: no hires fix
    p.add_argument_group("batch").add_argument(
        "--prompts", metavar="FILE",
        help="one generation per line of FILE, named promptNNNNN.png (resumable: done ones are skipped)")
    add_model_options(p)
    unit = p.add_argument_group("per ControlNet (repeat the group, in order)")
    unit.add_argument("--controlnet", action=_UnitOption, dest="unit_options", metavar="NAME_OR_PATH",
                      help="a bundled ControlNet name (e.g. fill), a path (diffusers folder, .safetensors, .pth) or a "
                      "hub id (e.g. lllyasviel/control_v11p_sd15_canny): a ControlNet, Union/ProMax ControlNet, "
                      "Control-LoRA or T2I-Adapter (`controlnet info FILE` says which)")
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
    unit.add_argument("--control-type", action=_UnitOption, dest="unit_options", metavar="NAME",
                      help="the condition's type for a union ControlNet (e.g. depth, openpose, canny; "
                      "`controlnet info FILE` lists a file's types)")
    unit.add_argument("--residual-scale", action=_UnitOption, dest="unit_options", type=float, metavar="S",
                      help="scales the residuals of the unit's pass, >= 0 (default 1.0); the same as --strength except "
                      "for a union ControlNet given several conditions (its units fused into one pass): there "
                      "--strength scales each condition's fused input, this the pass's residuals")
    unit.add_argument("--control-dir", action=_UnitOption, dest="unit_options", metavar="DIR",
                      help="instead of --control: one generation per image in DIR, named after it (resumable)")
    p.set_defaults(func=run, unit_options=[])


def parse_units(options: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Group per-ControlNet options into units: the i-th --controlnet pairs with the i-th --control, and every
    other option applies to the unit of the --controlnet/--control given last before it. With more --control than
    --controlnet, a --control given when every --controlnet so far has its own starts a unit of the last
    --controlnet again (several conditions of one union model: ``--controlnet union.safetensors --control a.png
    --control-type depth --control b.png --control-type openpose``)."""
    n_controlnets = sum(1 for opt, _ in options if opt == "--controlnet")
    n_controls = sum(1 for opt, _ in options if opt in ("--control", "--control-dir"))
    repeat = n_controls > n_controlnets  # extra --control options repeat the --controlnet before them
    if n_controls < n_controlnets:
        raise UserError(f"got {n_controlnets} --controlnet and {n_controls} --control; give one --control IMAGE per --controlnet")
    units: list[dict[str, Any]] = []
    seen = {"--controlnet": 0, "--control": 0}
    for option, value in options:
        slot = "--control" if option == "--control-dir" else option  # a folder of controls takes a control's place
        if slot == "--control" and repeat and 0 < seen["--controlnet"] == seen["--control"]:
            units.append({"controlnet": units[seen["--controlnet"] - 1]["controlnet"]})
            seen["--controlnet"] += 1
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
    if seen["--controlnet"] != seen["--control"] or not all("controlnet" in u for u in units):
        raise UserError(f"got {n_controlnets} --controlnet and {n_controls} --control; give one --control IMAGE per "
                        "--controlnet (several --control after one --controlnet repeat it, for a union model)")
    return units


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


def config_from_args(args: argparse.Namespace) -> GenerationConfig:
    """The checked :class:`GenerationConfig` of parsed ``generate`` options (no heavy import: called first)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationConfig) if f.metadata}
    image = ImageToImage(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ImageToImage)})
    hires = None
    if args.hires_scale is not None:
        hires = HiresFix(**{f.name: getattr(args, "hires_" + f.name) for f in dataclasses.fields(HiresFix)})
    return GenerationConfig(**values, image=image, hires=hires).check()


def run(args: argparse.Namespace) -> int:
    """Check every input, load the models, generate, then write all outputs at once."""
    # 1. Inputs first, cheapest first (the settings before any heavy import), then files, the device and --out.
    if args.prompt is None and not args.prompts:
        raise UserError("give --prompt TEXT (or --prompts FILE, or --from-png IMG); see `controlnet generate --help`")
    config = config_from_args(args)
    from controlnet.loading import base_folder_family

    family = base_folder_family(args.base, args.revision)  # a hub base: its model_index.json is fetched
    config.check(family)  # a Flux or SD3 base's rules and defaults
    model_options = check_model_options(args, family)
    max_pixels = check_max_pixels(args.max_pixels)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    batch = Batch.from_args(args)
    units = _control_units(args, config, batch)
    if batch.active and not batch.pending(out, config.num_images, args.quiet):
        return 0  # every output is there: nothing to load
    from controlnet.fileio import check_writable_folder
    from controlnet.devices import resolve_device

    device = str(resolve_device(args.device))  # an unknown or absent device fails here
    if config.size is not None:
        check_output_size(*config.size, max_pixels=max_pixels, device=device, what="--size")
    if config.image.init_image is not None:
        from controlnet.img2img import load_source

        load_source(config.image.init_image, config.image.mask, config.image.mask_invert)  # files, mask size
    check_writable_folder(out, "--out")

    # 2. Models, then the generation: generate(prompt=..., controls=...) -> controlnet.pipeline.GenerationResult.
    load = _load_transformer_base if family in FLOW_DEFAULTS else _load_unet_base
    generate = functools.partial(load(args, config, model_options, max_pixels), config=config,
                                 progress=not args.quiet)
    if batch.active:
        batch.run(generate, units, out, config.num_images, quiet=args.quiet)
        return 0
    result = generate(prompt=args.prompt, controls=units)
    for path in write_outputs(out, result):
        print(path)
    return 0


# --------------------------------------------------------------------------- the base: UNet or Flux/SD3 transformer

def _load_unet_base(args: argparse.Namespace, config: GenerationConfig, options: dict[str, Any],
                    max_pixels: int | None) -> Any:
    """An SD1.x/SD2.x/SDXL (or the embedded) base, as :class:`controlnet.pipeline.Pipeline` (its ``__call__``
    generates); ``config.size`` rounded to its VAE's multiple."""
    from controlnet.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.base, dtype=args.dtype, device=args.device, base_config=args.base_config,
                                    revision=args.revision, variant=args.variant)
    pipe.max_pixels = max_pixels
    apply_model_options(pipe, options)
    config.size = _rounded_size(config.size, pipe.vae_scale_factor)
    return pipe


def _load_transformer_base(args: argparse.Namespace, config: GenerationConfig, options: dict[str, Any],
                           max_pixels: int | None) -> Any:
    """A Flux or SD3 base, as :class:`controlnet.transformer_pipeline.TransformerPipeline` (its ``generate``)."""
    from controlnet.devices import resolve_device
    from controlnet.transformer_pipeline import TransformerPipeline, flow_dtype

    device = resolve_device(args.device)
    pipe = TransformerPipeline.from_pretrained(args.base, dtype=flow_dtype(args.dtype, device),
                                               device="cpu" if options["offload"] else device,
                                               revision=args.revision, variant=args.variant)
    pipe.max_pixels = max_pixels
    pipe.vae_tiling = options["vae_tiling"]
    pipe.lora_dir = options["lora_dir"]
    for spec in options["loras"]:
        pipe.load_lora(spec.source, spec.weight)
    if options["compile"]:
        pipe.compile()
    if options["offload"]:
        pipe.enable_offload(options["offload"], device)
    return pipe.generate


def _control_units(args: argparse.Namespace, config: GenerationConfig, batch: "Batch") -> list[Any]:
    """The ControlUnits of the options, their ControlNets found and condition images read (no model loaded)."""
    from controlnet.conditions import to_condition_array
    from controlnet.loading import resolve_controlnet_source
    from controlnet.pipeline import ControlUnit

    units = []
    for index, spec in enumerate(parse_units(args.unit_options)):
        resolve_controlnet_source(spec["controlnet"], variant=args.variant)  # unknown name, missing path or hub id
        spec.setdefault("control", batch.first_control(spec, index))
        condition = to_condition_array(spec["control"])  # missing / unreadable / too large images fail here
        if config.size is not None:
            check_cover(condition.shape[1], condition.shape[0], *config.size, name=f"--control {spec['control']}")
        units.append(ControlUnit(
            controlnet=spec["controlnet"], image=spec["control"],
            strength=spec.get("strength", 1.0), start=spec.get("start", 0.0), end=spec.get("end", 1.0),
            control_mode=spec.get("control-mode", "balanced"), control_type=spec.get("control-type"),
            residual_scale=spec.get("residual-scale", 1.0),
            annotator=spec.get("annotator"),
            annotator_params=annotator_params(spec.get("annotator"), spec.get("annotator-param", []), index),
        ))
    return units


def _rounded_size(size: tuple[int, int] | None, multiple: int) -> tuple[int, int] | None:
    """``size`` rounded to multiples of the VAE factor, with a note when that changes it."""
    from controlnet.conditions import round_size

    if size is None:
        return None
    rounded = round_size(*size, multiple=multiple)
    if rounded != size:
        print(f"note: --size {size[0]}x{size[1]} is not a multiple of {multiple}; "
              f"rounded to {rounded[0]}x{rounded[1]}", file=sys.stderr)
    return rounded


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
    """The options of the base model as practitioners have it (:mod:`controlnet.text_conditioner`, :mod:`controlnet.runtime`)."""
    g = parser.add_argument_group("your models (LoRA, embeddings, VAE, text) and memory/speed")
    g.add_argument("--revision", default=None, metavar="REV", help="branch, tag or commit of a hub --base (any hub id also takes org/name@REV)")
    g.add_argument("--variant", default=None, metavar="NAME",
                   help="weights variant of hub/diffusers models, e.g. fp16 (*.fp16.safetensors), where they have it")
    g.add_argument("--lora", action="append", default=[], metavar="FILE_OR_ID[:WEIGHT]",
                   help="a LoRA (kohya/A1111 or diffusers/peft layout; Flux also XLabs, ai-toolkit) on the UNet or "
                   "Flux/SD3/Qwen-Image transformer and the text encoder, weight 1 unless given; repeatable. "
                   "<lora:NAME:WEIGHT> in the prompt works too, with --lora-dir")
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
                   help="torch.compile the UNet (or transformer) and ControlNets (the first generation compiles, later ones "
                   "are faster)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format for the conv models")


def check_model_options(args: argparse.Namespace, family: str = "unet") -> dict[str, Any]:
    """The model options parsed and checked before any model is loaded (on a Flux or SD3 base: only those it
    takes; the others are refused in one line)."""
    from controlnet.defaults import scheduler_name

    if family in FLOW_DEFAULTS:
        unet_only = (("--embedding", args.embedding), ("--vae", args.vae), ("--clip-skip", args.clip_skip != 1),
                     ("--channels-last", args.channels_last), ("--base-config", args.base_config))
        for flag, given in unet_only:
            if given:
                raise UserError(f"{flag} is not supported on {FLOW_DEFAULTS[family].label} bases yet (UNet bases "
                                "only); drop it")

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


# --------------------------------------------------------------------------- batches


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

    def jobs(self) -> list[Any]:
        from controlnet.batch import make_jobs

        return make_jobs(self.prompt, self.prompts, self.controls)

    def pending(self, out: Path, num_images: int, quiet: bool) -> bool:
        """Whether a job is left to run (done ones are reported as skipped; :func:`controlnet.batch.job_done`)."""
        from controlnet.batch import job_done, output_paths

        left = [job for job in self.jobs() if not job_done(output_paths(out, job, num_images))]
        if not left and not quiet:
            print(f"every output of the batch is in {out} already; nothing to do", file=sys.stderr)
        return bool(left)

    def run(self, generate: Any, units: list[Any], out: Path, num_images: int, quiet: bool) -> None:
        """Every job not done yet, through ``generate(prompt=..., controls=...)`` (the base, its config bound)."""
        from controlnet.batch import run_jobs

        run_jobs(generate, self.jobs(), out, num_images, units, self.control_unit, quiet=quiet)


class FromPng(argparse.Action):
    """``--from-png IMG``: the settings stored in a PNG of ours (the "settings" chunk; for another tool's PNG, the
    A1111 "parameters" text) become the options' values; options given after it override them. The PNG is
    untrusted: its settings go through :meth:`GenerationConfig.from_settings` (every rule of the options), and the
    paths it names must lie under the current folder or the PNG's (:func:`controlnet.stored_settings.stored_path`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            options = png_options(values)
        except UserError as err:
            raise argparse.ArgumentError(self, str(err)) from None
        for dest, value in options.items():
            setattr(namespace, dest, value)


# Annotator parameters that name a file the annotator writes: never taken from stored settings; and those that
# name one it reads (checked as every stored input path is, whatever their spelling).
_OUTPUT_PARAMS = ("json",)
_INPUT_PARAMS = ("weights", "mask", "keypoints")


def png_options(path: str) -> dict[str, Any]:
    """The ``generate`` option values (argparse dests) that re-run the generation of the PNG at ``path``."""
    from controlnet.images import png_text

    return stored_options(png_text(path), path)


def stored_options(text: dict[str, str], path: str) -> dict[str, Any]:
    """The option values of a PNG's text chunks ``text`` (untrusted: bounded, parsed in linear time, checked as
    the options are; ``path``: the PNG, whose folder is one of the roots its paths may lie under)."""
    from controlnet.stored_settings import check_text_size, load_json_settings

    if "settings" in text:
        settings = load_json_settings(text["settings"], f"{path}: its settings")
    elif "parameters" in text:
        from controlnet.a1111 import parse_parameters, settings_from_parameters

        settings = settings_from_parameters(parse_parameters(check_text_size(text["parameters"], f"{path}: parameters")))
    else:
        raise UserError(f"{path}: no generation settings in it (neither ours nor A1111's 'parameters')")
    try:
        return _stored_options(path, settings)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def _stored_options(path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The option values of stored ``settings`` (untrusted: checked as the options are, paths under the roots)."""
    from controlnet.embedded import embedded_base
    from controlnet.stored_settings import stored_path

    roots = [Path.cwd(), Path(path).expanduser().resolve().parent]
    config = GenerationConfig.from_settings({**settings, "num_images": 1})  # this PNG's image: its own seed
    prompt = settings.get("prompt", "")
    if not isinstance(prompt, str):
        raise UserError(f"the prompt must be text, got {type(prompt).__name__}")
    options = config_options(config)
    options["prompt"] = prompt
    for key in ("init_image", "mask"):
        if options.get(key) is not None:
            options[key] = stored_path(options[key], roots, key.replace("_", " "))
    if settings.get("dtype") in DTYPE_CHOICES:
        options["dtype"] = settings["dtype"]
    base = settings.get("base")
    if isinstance(base, str) and embedded_base(base) is not None:  # "tiny-shapes": a name, not a path
        options["base"] = base
    elif base not in (None, "", "embedded"):
        options["base"] = stored_path(base, roots, "base", folders=True)
    options.update(_model_options(settings, roots))
    options["unit_options"] = _unit_options(settings.get("controlnets", []), roots)
    return options


def config_options(config: GenerationConfig) -> dict[str, Any]:
    """The option values (argparse dests) that give ``config``."""
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata}
    options["size"] = None if config.size is None else f"{config.size[0]}x{config.size[1]}"
    options["seed"] = -1 if config.seed is None else config.seed
    options.update(dataclasses.asdict(config.image))
    hires = dataclasses.asdict(config.hires) if config.hires is not None else {"scale": None}
    options.update({"hires_" + key: value for key, value in hires.items()})
    return options


def _unit_options(units: Any, roots: list[Path]) -> list[tuple[str, Any]]:
    """The per-ControlNet options of stored units (a list of objects, each with its ControlNet and condition)."""
    from controlnet.embedded import bundled_controlnets
    from controlnet.stored_settings import stored_path

    if not isinstance(units, list) or not all(isinstance(u, dict) for u in units):
        raise UserError("the ControlNets must be a list of objects (controlnet, control, strength, ...)")
    options: list[tuple[str, Any]] = []
    for j, unit in enumerate(units):
        if not isinstance(unit.get("controlnet"), str) or not isinstance(unit.get("control"), str):
            raise UserError(f"ControlNet {j + 1} has no controlnet and control paths")
        if unit["control"].startswith("<") or unit["controlnet"].startswith("ControlNet ("):
            raise UserError(f"ControlNet {j + 1} was given in memory, not as a file; it cannot be re-run")
        options += [("--controlnet", stored_path(unit["controlnet"], roots, f"ControlNet {j + 1}",
                                                 names=list(bundled_controlnets()), folders=True)),
                    ("--control", stored_path(unit["control"], roots, f"ControlNet {j + 1}'s control image"))]
        for key, kind in (("strength", float), ("start", float), ("end", float), ("control_mode", str),
                          ("control_type", str), ("residual_scale", float)):
            value = unit.get(key)
            if value is not None:
                if not isinstance(value, (int, float) if kind is float else str) or isinstance(value, bool):
                    raise UserError(f"ControlNet {j + 1}: {key} must be {'a number' if kind is float else 'text'}")
                options.append(("--" + key.replace("_", "-"), value))
        options += _annotator_options(unit, j, roots)
    return options


def _annotator_options(unit: dict[str, Any], j: int, roots: list[Path]) -> list[tuple[str, Any]]:
    """A stored unit's --annotator and --annotator-param options: no output paths; input paths under the roots."""
    from controlnet.stored_settings import stored_path

    annotator, params = unit.get("annotator") or None, unit.get("annotator_params") or {}
    if annotator is None:
        return []
    if not isinstance(annotator, str) or not isinstance(params, dict):
        raise UserError(f"ControlNet {j + 1}: the annotator must be a name and its parameters an object")
    options: list[tuple[str, Any]] = [("--annotator", annotator)]
    for key, value in params.items():
        if key in _OUTPUT_PARAMS:
            raise UserError(f"ControlNet {j + 1}: annotator parameter {key}= names a file to write; stored settings "
                            "may not write files (give it on the command line)")
        if not isinstance(value, (str, int, float, bool)):
            raise UserError(f"ControlNet {j + 1}: annotator parameter {key} must be a single value")
        if isinstance(value, str) and value and (any(sep in value for sep in "/\\~") or key in _INPUT_PARAMS):
            value = stored_path(value, roots, f"ControlNet {j + 1}'s annotator parameter {key}", folders=True)
        options.append(("--annotator-param", f"{key}={value}"))
    return options


def _model_options(settings: dict[str, Any], roots: list[Path]) -> dict[str, Any]:
    """The --lora, --lora-dir, --embedding, --clip-skip and --vae values that load the models of ``settings`` again
    (their files under the roots)."""
    from controlnet.stored_settings import stored_path

    embeddings, loras = settings.get("embeddings", {}), settings.get("lora_files", {})
    if not isinstance(embeddings, dict) or not all(isinstance(v, str) for v in embeddings.values()):
        raise UserError("the embeddings must be an object of token: file")
    if not isinstance(loras, dict) or not all(isinstance(v, list) and len(v) == 3 for v in loras.values()):
        raise UserError("the LoRA files must be an object of name: [file, weight, text weight]")
    options: dict[str, Any] = {"lora": [], "embedding": []}
    for token, file in embeddings.items():
        options["embedding"].append(f"{stored_path(file, roots, 'embedding')}:{token}")
    for name, (source, weight, text_weight) in loras.items():
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in (weight, text_weight)):
            raise UserError(f"LoRA {name}: its weights must be numbers")
        if text_weight != weight:
            raise UserError(f"LoRA {name} had the UNet weight {weight} and the text-encoder weight {text_weight}; "
                            "--lora gives both one weight, so it cannot be re-run from the command line")
        options["lora"].append(f"{stored_path(source, roots, f'LoRA {name}')}:{weight}")
    for key, kind in (("lora_dir", str), ("vae", str), ("clip_skip", int)):
        value = settings.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{key.replace('_', ' ')} must be {'text' if kind is str else 'a whole number'}")
        what = key.replace("_", " ")
        options[key] = stored_path(value, roots, what, folders=True) if kind is str else value
    return options
