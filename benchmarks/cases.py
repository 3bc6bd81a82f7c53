"""The benchmark cases: the models both implementations share, and the call each implementation makes.

Models (no download): the SD1.5 UNet architecture (``configs.unet_config("sd1", "full")``, 859.5M parameters)
with seeded random weights, our ControlNet copied from it (361.3M) with its zero convolutions given small random
values (so residuals are not zero and the two implementations' outputs can be compared), and the *same tensors*
loaded into diffusers' ``ControlNetModel`` (our module names are diffusers' key layout). The text encoder and the
VAE are tiny (a 1-layer CLIP text model of the UNet's context width with 77 positions; ``configs.TINY_VAE``):
inside a denoising step only the UNet and the ControlNets run, so per-step times do not depend on them; the full
generation (case 6) runs them once per generation in both implementations. ``size="tiny"`` swaps the UNet for
``configs.unet_config("sd1", "tiny")`` (the CI smoke test).

Each case is one call of a pipeline: ours (:class:`controlnet.pipeline.Pipeline`) and diffusers'
(``StableDiffusionPipeline`` for the UNet alone, ``StableDiffusionControlNetPipeline`` otherwise), built from the
same module objects, with the same scheduler (DDIM, SD1.5's schedule), prompt, guidance (CFG on, a batch of 2 per
UNet call), initial latents, condition images and settings. Per-step cases (1-5) run a generation of ``steps``
steps with ``output_type="latent"`` and report its time divided by ``steps`` (hence including each pipeline's
per-generation work: prompt encoding, condition preprocessing, our once-per-generation hint encoding).
"""

from __future__ import annotations

import gc
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from controlnet.devices import DTYPE_NAMES, DTYPES

PROMPT = "a red circle on a white background, best quality"
# diffusers' StableDiffusion(ControlNet)Pipeline default guidance_scale; > 1 turns CFG on in both pipelines.
GUIDANCE = 7.5
# SD1.5's text encoder context: CLIP ViT-L/14's 77 positions (so the cross-attention sees 77 keys, as with SD1.5).
TEXT_TOKENS = 77
# CLIP ViT-L/14 uses 64-channel attention heads (768 = 12 x 64).
TEXT_HEAD_CHANNELS = 64
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (DDIM fields).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
# Std of the random values given to parameters that start at zero (zero convs) and of the fast-init fill.
RANDOM_STD = 0.02
IMPLS = ("ours", "reference")


@dataclass(frozen=True)
class Case:
    """One benchmark case: what both pipelines are asked to do."""

    name: str
    number: str
    title: str
    controlnets: int  # 0: the UNet alone
    guess_mode: bool = False
    end: float = 1.0
    steps: int | None = None  # None: the per-step cases' generation length (``--step-steps``)
    output_type: str = "latent"
    target: float | None = 1.0  # the target for ours/diffusers (1.0: no slower than diffusers)
    reuse: int = 1  # ours only: Pipeline(reuse_residuals=...); > 1 is an option whose outputs differ from diffusers'
    min_steps: int = 2  # a per-step case times a generation of max(--step-steps, min_steps) steps

    @property
    def per_step(self) -> bool:
        return self.steps is None

    def timed_steps(self, step_steps: int) -> int:
        """Length of the generation a per-step case times (``step_steps``: the harness's ``--step-steps``)."""
        return max(step_steps, self.min_steps)


CASES: dict[str, Case] = {c.name: c for c in (
    Case("unet", "1", "UNet alone (s/step)", 0),
    Case("controlnet", "2", "one ControlNet (s/step)", 1),
    Case("two_controlnets", "3", "two ControlNets (s/step)", 2),
    Case("guess_mode", "4", "one ControlNet, guess mode (s/step)", 1, guess_mode=True),
    Case("end_half", "5", "one ControlNet, end=0.5 (s/step, mean over the generation)", 1, end=0.5, target=0.8),
    # A full generation: 10 steps, CFG, one ControlNet, decoded to a PIL image (tiny VAE).
    Case("generation", "6", "10-step generation, CFG, one ControlNet (s)", 1, steps=10, output_type="pil"),
    # The optional residual reuse (off by default; its outputs differ, its controllability cost is measured on the
    # demo model) against diffusers' default. 4 steps at least, so that end=0.5 leaves 2 controlled steps to share.
    Case("controlnet_reuse2", "2r", "one ControlNet, ours reusing residuals for 2 steps (option) (s/step)", 1,
         reuse=2, min_steps=4, target=None),
    Case("end_half_reuse2", "5r", "one ControlNet, end=0.5, ours reusing residuals for 2 steps (option) (s/step)", 1,
         end=0.5, reuse=2, min_steps=4, target=0.8),
)}


@dataclass(frozen=True)
class Setting:
    """Where and how a case runs."""

    size: str  # "full" (SD1.5) or "tiny"
    resolution: int  # square images, pixels
    dtype: torch.dtype
    device: torch.device

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


@dataclass
class Models:
    """The modules both pipelines share (one set per process, cast in place between dtypes)."""

    size: str
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    ours_cn: nn.Module | None = None
    reference_cn: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.ours_cn, self.reference_cn) if m is not None]

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move and cast every module in place (``nn.Module.to``: diffusers' ``to`` warns on every cast)."""
        for m in self.modules():
            nn.Module.to(m, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------- building


def _fill_random(module: nn.Module, seed: int) -> None:
    """Give every parameter and buffer of a freshly ``to_empty``-ed module small seeded random values."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(RANDOM_STD))
            else:
                t.zero_()


def _materialize(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A module built on the meta device → real storage in ``dtype`` on ``device``, random values."""
    nn.Module.to(module, dtype=dtype)  # on meta: free
    module.to_empty(device=device)
    _fill_random(module, seed)
    return module.eval()


def build_models(size: str, dtype: torch.dtype, device: torch.device, controlnet_impls: tuple[str, ...] = IMPLS,
                 fast_init: bool = False) -> Models:
    """The shared modules. ``fast_init``: build on the meta device and fill with random values (no init
    functions run, no float32 copy made): for the memory subprocesses, whose numbers do not depend on values."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from controlnet.diffusers_compat import diffusers_config, to_diffusers
    from controlnet.model import ControlNet
    from controlnet.testing import build_text_encoder, build_tokenizer, build_unet, build_vae, unet_config

    cfg = unet_config("sd1", size)
    if fast_init:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg)
        _materialize(unet, device, dtype, seed=0)
    else:
        unet = build_unet("sd1", size, seed=0)  # float32, seeded init
    context = cfg["cross_attention_dim"]
    tokenizer = build_tokenizer(PROMPT.replace(",", " ").split(), max_length=TEXT_TOKENS)
    heads = context // TEXT_HEAD_CHANNELS if context % TEXT_HEAD_CHANNELS == 0 else 1
    text_encoder = build_text_encoder(len(tokenizer), hidden_size=context, layers=1, heads=heads,
                                      max_positions=TEXT_TOKENS, seed=0)
    vae = build_vae(seed=0)
    models = Models(size, unet, vae, text_encoder, tokenizer)

    if controlnet_impls:
        if fast_init:
            with torch.device("meta"):
                ours_cn = ControlNet.from_unet(UNet2DConditionModel(**cfg))
        else:
            ours_cn = ControlNet.from_unet(unet).eval()
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():  # zero convs (and the hint encoder's last conv) start at zero: make them act
                for conv in [*ours_cn.zero_convs(), ours_cn.controlnet_cond_embedding.conv_out]:
                    for p in conv.parameters():
                        p.copy_(torch.randn(p.shape, generator=g) * RANDOM_STD)
        if "reference" in controlnet_impls:
            if fast_init:
                with torch.device("meta"):
                    reference_cn = ControlNetModel.from_config(diffusers_config(ours_cn))
                _materialize(reference_cn, device, dtype, seed=2)
            else:  # the same tensors as ours (copies)
                reference_cn = to_diffusers(ours_cn)
            models.reference_cn = reference_cn.eval()
        if "ours" in controlnet_impls:
            models.ours_cn = _materialize(ours_cn, device, dtype, seed=1) if fast_init else ours_cn
    models.to(device, dtype)
    return models


def build_models_fast(size: str, dtype: torch.dtype, device: torch.device, impl: str) -> Models:
    """Fast-init modules for one implementation (memory subprocesses): see :func:`build_models`."""
    return build_models(size, dtype, device, controlnet_impls=(impl,), fast_init=True)


# --------------------------------------------------------------------------------------------- inputs and calls


def condition_images(resolution: int, count: int) -> list[Image.Image]:
    """``count`` seeded random RGB condition images, ``resolution`` square (resizing is then a no-op)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)) for _ in range(count)]


def initial_noise(models: Models, resolution: int) -> torch.Tensor:
    """Seeded initial latents (1, 4, h, w), float32 (both pipelines scale them by the scheduler's init sigma)."""
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    h = resolution // factor
    g = torch.Generator().manual_seed(0)
    return torch.randn((1, models.unet.config.in_channels, h, h), generator=g)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD15_SCHEDULER)


def make_pipeline(impl: str, models: Models, case: Case, setting: Setting) -> Any:
    """Our Pipeline, or diffusers' pipeline for ``case``, over the shared modules (nothing is copied)."""
    if impl == "ours":
        from controlnet.pipeline import Pipeline

        return Pipeline(unet=models.unet, vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                        scheduler=_scheduler(), dtype=setting.dtype, device=setting.device)
    from controlnet.diffusers_compat import diffusers_pipeline

    return diffusers_pipeline(models.unet, models.vae, models.text_encoder, models.tokenizer, _scheduler(),
                              controlnets=[models.reference_cn] * case.controlnets)


def make_call(impl: str, pipe: Any, models: Models, case: Case, setting: Setting,
              steps: int) -> Callable[[], torch.Tensor]:
    """A zero-argument function running ``case`` once with ``impl``; it returns the output as a float tensor
    (final latents for ``output_type="latent"``, images in [0, 1] otherwise) to compare the implementations.

    Two ControlNets are the same model used twice with two different condition images: the work of two
    ControlNets, with the weights held once (the SD1.5 models of both implementations fit in this machine's memory).
    """
    r = setting.resolution
    images = condition_images(r, case.controlnets)
    noise = initial_noise(models, r)
    if impl == "ours":
        from controlnet.diffusers_compat import diffusers_guess_mode_scales
        from controlnet.pipeline import ControlUnit

        scales = diffusers_guess_mode_scales(models.ours_cn.num_residuals) if case.guess_mode else None
        units = [ControlUnit(controlnet=models.ours_cn, image=im, end=case.end, residual_scales=scales) for im in images]

        def call() -> torch.Tensor:
            out = pipe(PROMPT, controls=units, steps=steps, guidance=GUIDANCE, seed=0, size=(r, r),
                       guess_mode=case.guess_mode, latents=noise, output_type=case.output_type, progress=False,
                       reuse_residuals=case.reuse)
            if case.output_type == "latent":
                return out.latents.float()
            return torch.from_numpy(np.stack([np.asarray(im) for im in out.images])).float() / 255.0

        return call

    from controlnet.diffusers_compat import diffusers_call_kwargs

    kwargs = diffusers_call_kwargs(images, steps=steps, guidance=GUIDANCE, size=(r, r),
                                   latents=noise.to(setting.device, setting.dtype), ends=[case.end] * case.controlnets,
                                   guess_mode=case.guess_mode, output_type=case.output_type)

    def call() -> torch.Tensor:
        out = pipe(PROMPT, **kwargs).images
        if case.output_type == "latent":
            return out.float().cpu()
        return torch.from_numpy(np.stack([np.asarray(im) for im in out])).float() / 255.0

    return call


# --------------------------------------------------------------------------------------------- the load case


def write_original_file(models: Models, directory: Path) -> tuple[Path, Path]:
    """Our ControlNet saved as an original-layout fp16 ``.safetensors`` (like the widely shared
    ``control_v11*_fp16.safetensors``), plus a folder with its diffusers config.json for ``from_single_file``."""
    import json

    from controlnet.checkpoints import save_controlnet
    from controlnet.diffusers_compat import diffusers_config

    path = save_controlnet(models.ours_cn, directory / "control_sd15_bench.safetensors", format="original", dtype="fp16")
    config_dir = directory / "config"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "config.json").write_text(json.dumps(diffusers_config(models.ours_cn)))
    return path, config_dir


def make_load_call(impl: str, path: Path, config_dir: Path) -> Callable[[], Any]:
    """Load the original-layout file into float32 (both loaders' default).

    Ours: ``load_controlnet`` (reads the file, renames keys, infers the config from shapes). diffusers:
    ``ControlNetModel.from_single_file`` with ``config=`` a local folder holding the config.json (offline; its
    default would fetch lllyasviel/control_v11p_sd15_canny's config from the Hub), which runs its own converter.
    """
    if impl == "ours":
        from controlnet.checkpoints import load_controlnet

        return lambda: load_controlnet(path)
    from diffusers import ControlNetModel

    return lambda: ControlNetModel.from_single_file(str(path), config=str(config_dir), local_files_only=True)


# --------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call; garbage collected before, the device synchronised around it."""
    gc.collect()
    synchronize(device)
    t0 = time.perf_counter()
    out = call()
    synchronize(device)
    return time.perf_counter() - t0, out


def reset_peak_memory(device: torch.device) -> str:
    """Start a new peak-memory window; returns how the peak is measured (for the JSON).

    CPU (Linux): writing 5 to /proc/self/clear_refs resets the resident-set high-water mark, read back as VmHWM
    from /proc/self/status. Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux keeps, in it, the high-water mark of
    the address space the process had before exec, i.e. a subprocess's ``ru_maxrss`` is at least its parent's peak
    at the time of the fork (a 6 GB harness parent made every subprocess report >= 6 GB). CUDA:
    ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated``.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM (peak resident set) of a fresh process, reset after building the models"
    except OSError:
        return "ru_maxrss of the whole process (the high-water mark could not be reset)"


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _vm_hwm_mb()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one case with one implementation, in this (fresh) process.

    ``spec``: impl, case, size, resolution, dtype, device, steps; for the load case also file and config_dir.
    Models are built fast (:func:`build_models_fast`), the peak window is reset, then the case runs once.
    """
    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    impl, name = spec["impl"], spec["case"]
    if name == "load":
        call = make_load_call(impl, Path(spec["file"]), Path(spec["config_dir"]))
        base = current_memory_mb(device)
        how = reset_peak_memory(device)
        with torch.inference_mode():
            call()
        return {"peak_mb": peak_memory_mb(device), "base_mb": base, "how": how}
    case = CASES[name]
    setting = Setting(spec["size"], spec["resolution"], dtype, device)
    models = build_models_fast(spec["size"], dtype, device, impl)
    pipe = make_pipeline(impl, models, case, setting)
    call = make_call(impl, pipe, models, case, setting, spec["steps"])
    gc.collect()
    base = current_memory_mb(device)
    how = reset_peak_memory(device)
    call()
    return {"peak_mb": peak_memory_mb(device), "base_mb": base, "how": how}
