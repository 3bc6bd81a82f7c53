"""What a generation is told: :class:`GenerationConfig`, with its image-to-image part (:class:`ImageToImage`) and
its hires fix (:class:`HiresFix`).

The list of generation settings exists here once. ``controlnet generate`` builds its options from the fields (the
flag ``--mask-blur`` is the field ``mask_blur``, ``--hires-scale`` the hires field ``scale``; help text, group and
choices from the field's metadata), the web UI and the batches build a config, :meth:`GenerationConfig.check`
applies every rule (before any model is loaded: this module imports nothing heavy; ``check(family)`` adds a
Flux, SD3 or Qwen-Image base's defaults and rules, :data:`FLOW_DEFAULTS`), the PNG settings are
:meth:`GenerationConfig.to_settings` and ``--from-png`` is :meth:`GenerationConfig.from_settings`.
:class:`controlnet.pipeline.Pipeline` takes one: ``pipe(prompt, controls, config)``.

Settings read back from a file are untrusted: :meth:`GenerationConfig.from_settings` accepts only the keys and
types below (a number where a number belongs, a bool where a switch belongs) and checks every rule.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controlnet.defaults import (
    DEFAULT_DENOISE, DEFAULT_HIRES_DENOISE, DEFAULT_HIRES_SCALE, DEFAULT_INPAINT_DENOISE, DEFAULT_INPAINT_PADDING,
    DEFAULT_MASK_BLUR, DEFAULT_STEPS, HIRES_UPSCALERS, MAX_NUM_IMAGES, SCHEDULERS, describe_family_defaults,
    scheduler_name,
)
from controlnet.errors import UserError
from controlnet.limits import check_seed
from controlnet.options import option

# Option groups of `controlnet generate --help`.
SAMPLING, IMAGE, HIRES = "sampling", "image to image and inpainting", "hires fix (text-to-image)"
# Diffusers' schedulers are trained on 1000 timesteps; no base we load has more, so more steps cannot run.
MAX_STEPS = 1000
# Largest side of an output, in pixels (SDXL's 1024 x 16); the pixel budget of the device is checked too.
MAX_SIDE = 16384


@dataclass(frozen=True)
class FlowDefaults:
    """A flow-matching base family's generation defaults (diffusers' FluxPipeline, StableDiffusion3Pipeline and
    QwenImagePipeline ``__call__`` defaults): Flux's guidance is its distilled guidance embedding (no CFG), SD3's a
    CFG weight, Qwen-Image's its "true CFG" weight (``true_cfg_scale``)."""

    label: str
    steps: int
    guidance: float
    max_sequence_length: int


# Flow-matching (transformer) base families, by controlnet.transformer_controlnet's family names.
FLOW_DEFAULTS = {"flux": FlowDefaults("Flux", steps=28, guidance=3.5, max_sequence_length=512),
                 "sd3": FlowDefaults("SD3", steps=28, guidance=7.0, max_sequence_length=256),
                 "qwenimage": FlowDefaults("Qwen-Image", steps=50, guidance=4.0, max_sequence_length=512)}
# Output sides of flow-matching bases are multiples of 16: the VAE's 8x times Flux's and Qwen-Image's 2x2 packing /
# SD3's 2x2 patches.
FLOW_SIZE_MULTIPLE = 16


class FamilyDefault(int):
    """A steps value left to the base family (:meth:`GenerationConfig.check`): it equals DEFAULT_STEPS, the UNet
    bases' default, and a flow-matching base replaces it with its own; a value given explicitly is a plain int."""


def _flow_defaults_text(name: str) -> str:
    """``name`` ("guidance", "steps") of the flow-matching bases, for --help: "3.5 for Flux, 7.0 for SD3, ..."."""
    return ", ".join(f"{getattr(d, name)} for {d.label}" for d in FLOW_DEFAULTS.values())


def _size_text(size: tuple[int, int] | None) -> str | None:
    return None if size is None else f"{size[0]}x{size[1]}"


def parse_size(text: Any, what: str = "--size") -> tuple[int, int] | None:
    """"WxH" (or "N" for a square; or a (width, height) pair) → (width, height) of positive whole numbers."""
    if text is None:
        return None
    if isinstance(text, (tuple, list)) and len(text) == 2 and all(_is_int(v) for v in text):
        width, height = int(text[0]), int(text[1])
    elif isinstance(text, str) and 0 < len(text) <= 32:
        parts = text.strip().lower().replace("*", "x").split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise UserError(f"{what} {text!r}: give WIDTHxHEIGHT in pixels, e.g. 512x768")
        width = int(parts[0])
        height = int(parts[-1])
    else:
        raise UserError(f"{what} {str(text)[:40]!r}: give WIDTHxHEIGHT in pixels, e.g. 512x768")
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise UserError(f"{what} {width}x{height}: give WIDTHxHEIGHT with each side in 1..{MAX_SIDE} pixels")
    return width, height


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _need(name: str, value: Any, kind: str) -> None:
    """One-line :class:`UserError` when ``value`` is not of ``kind`` ("int", "number", "bool", "text", "image")."""
    ok = {"int": _is_int, "number": lambda v: _is_number(v) and math.isfinite(v), "bool": lambda v: isinstance(v, bool),
          "text": lambda v: isinstance(v, str), "image": lambda v: v is not None}[kind](value)
    if not ok:
        words = {"int": "a whole number", "number": "a finite number", "bool": "true or false", "text": "text",
                 "image": "an image"}
        raise UserError(f"{name} must be {words[kind]}, got {str(value)[:40]!r}")


@dataclass
class ImageToImage:
    """Image to image and inpainting: the starting picture, how much of it is redrawn, and its mask."""

    init_image: Any = option(None, help="start from this picture (img2img); the output has its size unless --size "
                             "is given", group=IMAGE, metavar="IMG")
    denoise: float | None = option(None, help=f"how much of the picture is redrawn, in [0, 1] (default "
                                   f"{DEFAULT_DENOISE}; {DEFAULT_INPAINT_DENOISE} with --mask)", group=IMAGE,
                                   metavar="S")
    mask: Any = option(None, help="inpaint: white = repaint, the picture's size; every other pixel is kept exactly",
                       group=IMAGE, metavar="MASK")
    mask_blur: float = option(DEFAULT_MASK_BLUR, help="feather the mask inward over PX pixels (pixels outside it "
                              "never change)", group=IMAGE, metavar="PX")
    mask_invert: bool = option(False, help="repaint the black part of the mask instead", group=IMAGE)
    inpaint_full_res: bool = option(False, help="work on the mask's box (plus padding) at the full output size, then "
                                    "paste it back (A1111's 'only masked')", group=IMAGE)
    inpaint_padding: int = option(DEFAULT_INPAINT_PADDING, help="pixels around the mask's box, with "
                                  "--inpaint-full-res", group=IMAGE, metavar="PX")

    def check(self) -> None:
        """One-line :class:`UserError` for a setting out of its range or one that needs another."""
        if self.denoise is not None:
            _need("denoise", self.denoise, "number")
            if not 0.0 <= self.denoise <= 1.0:
                raise UserError("denoise must be in [0, 1] (0: the picture back, 1: redraw it all), "
                                f"got {self.denoise}")
            self.denoise = float(self.denoise)
        _need("mask blur", self.mask_blur, "number")
        self.mask_blur = float(self.mask_blur)
        _need("inpaint padding", self.inpaint_padding, "int")
        if self.mask_blur < 0 or self.inpaint_padding < 0:
            raise UserError(f"mask blur and inpaint padding must be >= 0, got {self.mask_blur} and "
                            f"{self.inpaint_padding}")
        _need("mask invert", self.mask_invert, "bool")
        _need("inpaint full res", self.inpaint_full_res, "bool")
        if self.init_image is None:
            for given, flag in ((self.denoise is not None, "--denoise"), (self.mask is not None, "--mask"),
                                (self.mask_invert, "--mask-invert"), (self.inpaint_full_res, "--inpaint-full-res")):
                if given:
                    raise UserError(f"{flag} needs --init-image IMG: it needs an init image to work on")
        if self.mask is None:
            for given, flag in ((self.mask_invert, "--mask-invert"), (self.inpaint_full_res, "--inpaint-full-res")):
                if given:
                    raise UserError(f"{flag} works around a mask; pass --mask MASK")

    @property
    def strength(self) -> float:
        """The denoise to use: as given, or the default (with a mask: :data:`DEFAULT_INPAINT_DENOISE`)."""
        if self.denoise is not None:
            return float(self.denoise)
        return DEFAULT_INPAINT_DENOISE if self.mask is not None else DEFAULT_DENOISE


@dataclass
class HiresFix:
    """Hires fix (A1111's): generate, upscale by ``scale``, then an img2img pass of ``denoise`` at the larger size
    with the same ControlNets, their conditions prepared at that size.

    ``steps``: the second pass's schedule (None: the generation's steps; ``round(denoise * steps)`` of them run).
    ``upscaler``: "latent" (the latents, bilinear, as A1111's "Latent") or "lanczos" (the decoded images,
    Lanczos, encoded again).
    """

    scale: float = option(DEFAULT_HIRES_SCALE, help="generate, upscale by F, then refine at the larger size "
                          "(default: off)", group=HIRES, metavar="F")
    denoise: float = option(DEFAULT_HIRES_DENOISE, help="denoise of the refining pass, in [0, 1]", group=HIRES,
                            metavar="S")
    steps: int | None = option(None, help="steps of the refining pass's schedule (default: --steps)", group=HIRES,
                               metavar="N")
    upscaler: str = option("latent", help="latent: the latents, bilinear (A1111's 'Latent'); lanczos: the pictures",
                           group=HIRES, choices=HIRES_UPSCALERS)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """One-line :class:`UserError` for a hires setting out of its range."""
        _need("hires scale", self.scale, "number")
        if self.scale < 1 or self.scale > 8:  # A1111's slider goes to 4; 8 bounds the size before the pixel check
            raise UserError(f"hires scale must be a number in [1, 8], got {self.scale}")
        _need("hires denoise", self.denoise, "number")
        if not 0.0 <= self.denoise <= 1.0:
            raise UserError(f"hires denoise must be in [0, 1], got {self.denoise}")
        self.scale, self.denoise = float(self.scale), float(self.denoise)
        if self.steps is not None:
            _need("hires steps", self.steps, "int")
            if not 1 <= self.steps <= MAX_STEPS:
                raise UserError(f"hires steps must be in 1..{MAX_STEPS} (or None: the generation's steps), "
                                f"got {self.steps}")
        if self.upscaler not in HIRES_UPSCALERS:
            raise UserError(f"unknown hires upscaler {str(self.upscaler)[:40]!r}; choose one of "
                            f"{', '.join(HIRES_UPSCALERS)}")


@dataclass
class GenerationConfig:
    """Every setting of a generation but the prompt and the ControlNets (module docstring). ``guidance`` and
    ``scheduler`` None: the base family's; ``seed`` None (or -1): a random one; ``size`` None: the first control image's
    aspect ratio at the base's native resolution (or an init image's size)."""

    negative_prompt: str = option("", help="what to avoid (the unconditional branch of guidance; not on Flux, "
                                  "which has no CFG)", group=SAMPLING)
    steps: int = option(FamilyDefault(DEFAULT_STEPS), help=f"denoising steps (default: {DEFAULT_STEPS}), "
                        f"on flow-matching bases {_flow_defaults_text('steps')}", group=SAMPLING)
    guidance: float | None = option(None, help="classifier-free guidance scale, <= 1 turns it off; on Flux the "
                                    "distilled guidance (default: "
                                    f"{describe_family_defaults('guidance')}, {_flow_defaults_text('guidance')})",
                                    group=SAMPLING)
    scheduler: str | None = option(None, help=f"sampler: {', '.join(SCHEDULERS)}, or A1111's name ('DPM++ 2M Karras'); "
                                   "lcm/tcd: 4-8 steps with an LCM/TCD LoRA (default: "
                                   f"{describe_family_defaults('scheduler')}; Flux, SD3, Qwen-Image: "
                                   "flow-matching Euler only)", group=SAMPLING, metavar="NAME")
    seed: int | None = option(0, help="image k uses seed + k; -1 picks a random seed (0..2**63-1)", group=SAMPLING)
    size: tuple[int, int] | None = option(None, help="output size, multiples of 8 (16 on Flux, SD3, Qwen-Image; "
                                          "default: the first control image's aspect ratio at the base's resolution)",
                                          group=SAMPLING, metavar="WxH")
    num_images: int = option(1, help=f"images to generate, one batch, 1..{MAX_NUM_IMAGES}", group=SAMPLING, metavar="N")
    eta: float = option(0.0, help="DDIM eta, 0 = deterministic sampling (UNet bases)", group=SAMPLING)
    guess_mode: bool = option(False, help="control on the conditional branch only, residual scales 0.825**(N-1-i) "
                              "(works with an empty prompt; UNet bases)", group=SAMPLING)
    reuse_residuals: int = option(1, help="compute each ControlNet every N steps and reuse its residuals in between "
                                  "(faster, less exact; default 1: every step; UNet bases)", group=SAMPLING,
                                  metavar="N")
    image: ImageToImage = field(default_factory=ImageToImage)
    hires: HiresFix | None = None

    def check(self, family: str | None = None) -> "GenerationConfig":
        """Every rule of the settings, once (types too: settings read from a file are untrusted); returns self with
        the scheduler under our name. Rules that need the model (the scheduler's schedule length, an inpainting
        UNet, the device's pixel budget) are the pipeline's. ``family`` "flux", "sd3" or "qwenimage"
        (:data:`FLOW_DEFAULTS`): also that base's rules, and its defaults where the config leaves them to the base."""
        _need("negative prompt", self.negative_prompt, "text")
        _need("steps", self.steps, "int")
        if not 1 <= self.steps <= MAX_STEPS:
            raise UserError(f"steps must be in 1..{MAX_STEPS}, got {self.steps}")
        if self.guidance is not None:
            _need("guidance", self.guidance, "number")
            if self.guidance < 0:
                raise UserError(f"guidance must be a number >= 0, got {self.guidance}")
            self.guidance = float(self.guidance)
        if self.scheduler is not None:
            _need("scheduler", self.scheduler, "text")
            self.scheduler = scheduler_name(self.scheduler)  # unknown names fail here; A1111's become ours
        if self.seed is not None:
            _need("seed", self.seed, "int")
            check_seed(self.seed, "seed", allow_random=True)
            self.seed = None if self.seed == -1 else self.seed  # -1: a random seed, as None
        self.size = parse_size(self.size, "size")
        _need("number of images", self.num_images, "int")
        if not 1 <= self.num_images <= MAX_NUM_IMAGES:
            raise UserError(f"number of images must be in 1..{MAX_NUM_IMAGES} (one batch), got {self.num_images}; "
                            "run again for more images")
        _need("eta", self.eta, "number")
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"eta must be in [0, 1], got {self.eta}")
        self.eta = float(self.eta)
        _need("guess mode", self.guess_mode, "bool")
        _need("reuse residuals", self.reuse_residuals, "int")
        if self.reuse_residuals < 1:
            raise UserError("reuse_residuals must be >= 1 (1: compute the residuals every step), "
                            f"got {self.reuse_residuals}")
        self.image.check()
        if self.hires is not None:
            self.hires.check()
            if self.image.init_image is not None:
                raise UserError("hires fix is for text-to-image; for an init image, run img2img at the larger size")
        if family in FLOW_DEFAULTS:
            self._check_flow(FLOW_DEFAULTS[family])
        return self

    def _check_flow(self, defaults: FlowDefaults) -> None:
        """A flow-matching base's rules (one-line :class:`UserError` for what it has no use for) and defaults."""
        base = f"{defaults.label} bases"
        unet_only = (("--scheduler", self.scheduler is not None), ("--eta", self.eta != 0.0),
                     ("--guess-mode", self.guess_mode), ("--reuse-residuals", self.reuse_residuals != 1))
        for flag, given in unet_only:
            if given:
                raise UserError(f"{flag} is for UNet bases (SD1.x/SD2.x/SDXL); {base} sample with flow-matching "
                                "Euler: drop it")
        if defaults.label == "Flux" and self.negative_prompt:
            raise UserError("--negative-prompt: Flux is guidance-distilled and runs no CFG, so a negative prompt "
                            "has no effect; drop it (SD3 takes one)")
        if self.size is not None and any(side % FLOW_SIZE_MULTIPLE for side in self.size):
            width, height = (max(1, math.floor(side / FLOW_SIZE_MULTIPLE + 0.5)) * FLOW_SIZE_MULTIPLE  # halves up
                             for side in self.size)
            raise UserError(f"size {self.size[0]}x{self.size[1]} does not fit {base}: give a width and height "
                            f"divisible by {FLOW_SIZE_MULTIPLE}, e.g. {width}x{height}")
        if isinstance(self.steps, FamilyDefault):
            self.steps = defaults.steps
        if self.hires is not None:  # flow-matching img2img has no VAE round trip for a pass of no step
            steps = self.hires.steps or self.steps
            if math.floor(self.hires.denoise * steps + 0.5) == 0:
                raise UserError(f"--hires-denoise {self.hires.denoise} runs no step of {steps} on {base}; raise "
                                "--hires-denoise or --hires-steps")
        if self.guidance is None:
            self.guidance = defaults.guidance

    @classmethod
    def build(cls, **settings: Any) -> "GenerationConfig":
        """A config from flat keywords: this class's fields and :class:`ImageToImage` 's (``init_image``,
        ``mask``, ...); ints given as floats of whole value stay numbers as given. Unknown names: TypeError."""
        image_names = {f.name for f in dataclasses.fields(ImageToImage)}
        image = {k: settings.pop(k) for k in list(settings) if k in image_names}
        return cls(**settings, image=ImageToImage(**image))

    def keywords(self) -> dict[str, Any]:
        """The config as the flat keywords :meth:`build` (and ``Pipeline.__call__``) take."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "image"}
        return {**flat, **{f.name: getattr(self.image, f.name) for f in dataclasses.fields(ImageToImage)}}

    def to_settings(self) -> dict[str, Any]:
        """The settings as JSON holds them (written into the PNG): the fields, with the image-to-image ones at the
        top level when there is an init image, the size as "WxH" and in-memory images by their kind."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("image", "hires")}
        settings["size"] = _size_text(self.size)
        if self.image.init_image is not None:
            image = dataclasses.asdict(self.image)
            image.update(init_image=describe_image(self.image.init_image),
                         mask=None if self.image.mask is None else describe_image(self.image.mask))
            settings.update(image)
        if self.hires is not None:
            settings["hires"] = dataclasses.asdict(self.hires)
        return settings

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "GenerationConfig":
        """The config of settings written by :meth:`to_settings` (read from a PNG: untrusted), checked. Keys that
        are not settings (the prompt, the ControlNets, the models) are left to their readers."""
        if not isinstance(settings, Mapping):
            raise UserError(f"the settings must be a JSON object, got {type(settings).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("image", "hires")]
        values = {k: settings[k] for k in names if k in settings}
        for key in ("init_image", "mask"):
            if isinstance(settings.get(key), str) and settings[key].startswith("<"):
                raise UserError(f"the {key.replace('_', ' ')} was an in-memory image, not a file; it cannot be re-run")
        image = {f.name: settings[f.name] for f in dataclasses.fields(ImageToImage) if settings.get(f.name) is not None}
        for key in ("init_image", "mask"):
            if key in image:
                _need(key.replace("_", " "), image[key], "text")
        hires = settings.get("hires")
        if hires is not None and not isinstance(hires, Mapping):
            raise UserError(f"the hires settings must be a JSON object, got {type(hires).__name__}")
        hires_names = {f.name for f in dataclasses.fields(HiresFix)}
        config = cls(**values, image=ImageToImage(**image),
                     hires=HiresFix(**{k: v for k, v in hires.items() if k in hires_names}) if hires else None)
        return config.check()


def describe_image(image: Any) -> str:
    """A path as given, or the kind of in-memory image."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"<{type(image).__name__}>"


__all__ = ["FLOW_DEFAULTS", "FLOW_SIZE_MULTIPLE", "FamilyDefault", "FlowDefaults", "GenerationConfig", "HiresFix",
           "ImageToImage", "MAX_STEPS", "describe_image", "parse_size"]
