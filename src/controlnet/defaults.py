"""Defaults and limits shared by the library, the command line and the web UI.

This module imports nothing, so the command line can show these values in ``--help`` without loading torch;
:mod:`controlnet.sampling`, :mod:`controlnet.loading` and :mod:`controlnet.demo` take their values from here.
"""

from __future__ import annotations

from typing import Any

# The original demos' sampler settings (lllyasviel/ControlNet gradio_*2image.py: ddim_steps=20, scale=9.0,
# DDIMSampler, eta=0, strength=1.0).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 9.0
DEFAULT_SCHEDULER = "ddim"

# --scheduler name → (diffusers scheduler class name, options over the base's scheduler config).
# "dpmpp_2m" is DPM-Solver++(2M) (Lu et al. 2022); "_karras" uses Karras et al.'s sigma spacing.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# The precisions a user can name (the canonical names of controlnet.loading.DTYPES; "auto" picks one per device).
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
