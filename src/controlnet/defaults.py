"""Defaults and limits shared by the library, the command line and the web UI.

This module imports nothing heavy (no torch), so the command line can show these values in ``--help`` quickly;
:mod:`controlnet.sampling`, :mod:`controlnet.devices` and :mod:`controlnet.demo` take their values from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from controlnet.errors import UserError

# The original demos' sampler settings (lllyasviel/ControlNet gradio_*2image.py: ddim_steps=20, scale=9.0,
# DDIMSampler, eta=0, strength=1.0).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 9.0
DEFAULT_SCHEDULER = "ddim"

# --scheduler name → (diffusers scheduler class name, options over the base's scheduler config). The classes are
# those of diffusers' table of A1111 / k-diffusion samplers (diffusers docs, api/schedulers/overview).
# "dpmpp_2m" is DPM-Solver++(2M) (Lu et al. 2022); "_sde" its stochastic variant; "_karras" uses Karras et al.'s
# sigma spacing. "pndm" skips the Runge-Kutta warm-up, i.e. PLMS, as SD1.5's scheduler_config.json sets
# (skip_prk_steps). "lcm" and "tcd" are the few-step samplers of latent consistency models (Luo et al. 2023) and
# trajectory consistency distillation (Zheng et al. 2024): 4-8 steps, meant for an LCM/TCD LoRA or model.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
# Other names for the same samplers (after :func:`scheduler_name`'s normalisation, which already turns A1111's
# "DPM++ 2M SDE Karras" into "dpmpp_2m_sde_karras" and "Euler a" into "euler_a"): A1111's "PLMS" and "DPM2 a".
SCHEDULER_ALIASES: dict[str, str] = {"plms": "pndm", "dpm2_ancestral": "dpm2_a", "euler_ancestral": "euler_a"}


def scheduler_name(name: str) -> str:
    """The :data:`SCHEDULERS` key for ``name``: ours ("dpmpp_2m_karras") or A1111's ("DPM++ 2M Karras"), any case.
    An unknown name is a one-line :class:`UserError` listing the known ones."""
    key = re.sub(r"[\s\-]+", "_", str(name).strip().lower().replace("+", "p"))
    key = SCHEDULER_ALIASES.get(key, key)
    if key not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} "
                        "(A1111's names such as 'DPM++ 2M Karras' work too)")
    return key


@dataclass(frozen=True)
class FamilyDefaults:
    """The sampler settings a base model family is used with."""

    guidance: float
    scheduler: str


# Per base family (controlnet.checkpoints.detect_family; "embedded" is the tiny model shipped in the package).
# SD1.x/SD2.x: the original's demos (above) and Stability-AI/stablediffusion scripts/txt2img.py (scale 9.0).
# SDXL: diffusers' StableDiffusionXLPipeline default guidance 5.0, and the Euler sampler of
# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json. Embedded: DEMO_GUIDANCE below.
FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "sd1": FamilyDefaults(DEFAULT_GUIDANCE, DEFAULT_SCHEDULER),
    "sd2": FamilyDefaults(DEFAULT_GUIDANCE, DEFAULT_SCHEDULER),
    "sdxl": FamilyDefaults(5.0, "euler"),
    "embedded": FamilyDefaults(5.0, DEFAULT_SCHEDULER),
}
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "embedded": "the embedded model"}


def family_defaults(family: str) -> FamilyDefaults:
    """The defaults of ``family`` (a key of :data:`FAMILY_DEFAULTS`); an unknown family gets SD1.x's."""
    return FAMILY_DEFAULTS.get(family, FAMILY_DEFAULTS["sd1"])


def describe_family_defaults(field: str) -> str:
    """``field`` ("guidance" or "scheduler") per family, for --help: "9.0 for SD1.x and SD2.x, 5.0 for SDXL ..."."""
    by_value: dict[Any, list[str]] = {}
    for family, values in FAMILY_DEFAULTS.items():
        by_value.setdefault(getattr(values, field), []).append(FAMILY_LABELS[family])
    return ", ".join(f"{value} for {' and '.join(labels)}" for value, labels in by_value.items())


# The precisions a user can name (the canonical names of controlnet.devices.DTYPES; "auto" picks one per device).
DTYPE_CHOICES = ("fp32", "bf16", "fp16")

# Images generated in one call (one batch): the original demos' "Images" slider goes to 12.
MAX_NUM_IMAGES = 12

# `controlnet demo`: the embedded tiny base with and without the bundled fill ControlNet.
DEMO_STEPS = DEFAULT_STEPS
# Classifier-free guidance scale for the tiny base (the original's default is 9.0 for SD1.5). Not tuned: the
# retrained base and the fill ControlNet meet the targets at 5 (docs/evaluation.json); other values untried.
DEMO_GUIDANCE = 5.0
DEMO_SEED = 0

# `controlnet data fill`: fill50k's sample count (lllyasviel/ControlNet docs/train.md) and the image side of the
# embedded tiny base (the original's fill50k images are 512 px).
FILL_SAMPLES = 50000
FILL_SIZE = 128

# Image to image (controlnet.img2img). Denoising strength without a mask: A1111's img2img default (0.75); with a
# mask: 1.0, diffusers' inpaint pipelines' default. Mask blur 4 px and "only masked" padding 32 px: A1111's.
DEFAULT_DENOISE = 0.75
DEFAULT_INPAINT_DENOISE = 1.0
DEFAULT_MASK_BLUR = 4.0
DEFAULT_INPAINT_PADDING = 32
# Hires fix: A1111's defaults (upscale by 2, denoising 0.7, its "Latent" upscaler, hires steps = sampling steps).
HIRES_UPSCALERS = ("latent", "lanczos")
DEFAULT_HIRES_SCALE = 2.0
DEFAULT_HIRES_DENOISE = 0.7
# Control modes per ControlNet, as the sd-webui-controlnet extension names them (controlnet.pipeline.ControlUnit).
CONTROL_MODES = ("balanced", "prompt", "controlnet")
# `controlnet upscale` (controlnet.upscale): tiles overlap by 1/8 of their side (64 px at SD1.5's 512);
# denoising strength of each tile's img2img pass.
TILE_OVERLAP_FRACTION = 8
DEFAULT_UPSCALE_DENOISE = 0.5
