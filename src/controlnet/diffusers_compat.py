"""Adapters between our ControlNet and diffusers' ``ControlNetModel`` and ControlNet pipelines.

diffusers is the reference the tests and the benchmarks compare against (k-diffusion's external.py plays the same
part for other libraries' models); nothing here is on our own generation path. Our ControlNet's module names and
config fields are diffusers' ``ControlNetModel``'s, so converting one is its config without our own fields plus
its state dict as it is, loaded strictly. The rest maps our settings to diffusers' names::

    ours                                   diffusers' StableDiffusion(XL)ControlNetPipeline
    Pipeline(...)(prompt, controls=...)    pipe(prompt, image=..., **diffusers_call_kwargs(...))
    ControlUnit.strength / .end            controlnet_conditioning_scale / control_guidance_end
    guess_mode + residual_scales=          guess_mode=True (its residual scales: logspace(-1, 0, N),
      diffusers_guess_mode_scales(N)         not the original's 0.825**(N-1-j))
    steps, guidance, num_images            num_inference_steps, guidance_scale, num_images_per_prompt
    init_image, denoise, mask              image, strength, mask_image of StableDiffusionControlNet{Img2Img,
                                             Inpaint}Pipeline (their ControlNet images: control_image)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

DIFFUSERS_CLASS_NAME = "ControlNetModel"


def diffusers_config(controlnet: Any) -> dict[str, Any]:
    """diffusers' ``ControlNetModel`` config of our ControlNet (or of its config): the fields diffusers knows."""
    from diffusers import ControlNetModel

    config = getattr(controlnet, "config", controlnet).to_dict()
    if config.get("_class_name") != DIFFUSERS_CLASS_NAME:
        raise ValueError(f"a {config.get('_class_name')} has no diffusers ControlNetModel counterpart")
    known = inspect.signature(ControlNetModel.__init__).parameters
    return {"_class_name": DIFFUSERS_CLASS_NAME, **{k: v for k, v in config.items() if k in known}}


def to_diffusers(controlnet: nn.Module) -> nn.Module:
    """diffusers' ``ControlNetModel`` holding copies of our ControlNet's tensors (same dtype and device), in eval
    mode. Built on the meta device, so no initialisation runs and no second float32 copy is made."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        model = ControlNetModel.from_config(diffusers_config(controlnet))
    state = {k: v.detach().clone() for k, v in controlnet.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def diffusers_guess_mode_scales(num_residuals: int) -> list[float]:
    """diffusers' guess-mode residual scales, ``logspace(-1, 0, N)``: give them to our units as
    ``residual_scales`` (with ``guess_mode=True``) to reproduce diffusers' guess mode. Our guess mode is the
    original's, :func:`controlnet.residuals.original_guess_mode_scales` (``0.825**(N-1-j)``)."""
    return torch.logspace(-1, 0, num_residuals).tolist()


def diffusers_pipeline(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any,
                       controlnets: Sequence[nn.Module] = (), text_encoder_2: nn.Module | None = None,
                       tokenizer_2: Any | None = None) -> Any:
    """diffusers' pipeline over the same modules (nothing copied): ``StableDiffusionPipeline`` without
    ControlNets, else ``StableDiffusion(XL)ControlNetPipeline``. ``controlnets``: ours (converted with
    :func:`to_diffusers`) or diffusers' own; several become a ``MultiControlNetModel``. Progress bars off,
    no safety checker, no SDXL watermark."""
    import diffusers

    cns = [to_diffusers(cn) if not isinstance(cn, diffusers.ControlNetModel) else cn for cn in controlnets]
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    if text_encoder_2 is not None:
        pipe = diffusers.StableDiffusionXLControlNetPipeline(
            **common, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, controlnet=_one_or_list(cns),
            add_watermarker=False)
    else:
        common.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if cns:
            pipe = diffusers.StableDiffusionControlNetPipeline(**common, controlnet=_one_or_list(cns))
        else:
            pipe = diffusers.StableDiffusionPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_call_kwargs(images: Sequence[Image.Image] = (), *, steps: int, guidance: float,
                          size: tuple[int, int], latents: torch.Tensor | None = None,
                          strengths: Sequence[float] | None = None, ends: Sequence[float] | None = None,
                          guess_mode: bool = False, num_images: int = 1, output_type: str = "latent") -> dict[str, Any]:
    """Keyword arguments for a call of :func:`diffusers_pipeline`'s pipeline that does what our pipeline does with
    these settings (one value per ControlNet in ``images``, ``strengths`` and ``ends``; ``size`` is (W, H))."""
    width, height = size
    kwargs: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                                  num_images_per_prompt=num_images, output_type=output_type)
    if latents is not None:
        kwargs["latents"] = latents
    if images:
        kwargs.update(image=_one_or_list(images), guess_mode=guess_mode)
        if strengths is not None:
            kwargs["controlnet_conditioning_scale"] = _one_or_list(strengths)
        if ends is not None:
            kwargs["control_guidance_end"] = _one_or_list(ends)
    return kwargs


# Our image-to-image modes → diffusers' ControlNet pipelines (SD1.x/SD2.x).
IMAGE_PIPELINES = {"img2img": "StableDiffusionControlNetImg2ImgPipeline",
                   "inpaint": "StableDiffusionControlNetInpaintPipeline"}


def diffusers_image_pipeline(task: str, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any,
                             scheduler: Any, controlnets: Sequence[nn.Module]) -> Any:
    """diffusers' ControlNet img2img (``task="img2img"``) or inpaint (``"inpaint"``) pipeline over the same modules,
    as :func:`diffusers_pipeline` builds the text-to-image one (ours converted; progress bars off)."""
    import diffusers

    cns = [to_diffusers(cn) if not isinstance(cn, diffusers.ControlNetModel) else cn for cn in controlnets]
    pipe = getattr(diffusers, IMAGE_PIPELINES[task])(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        controlnet=_one_or_list(cns), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image_call_kwargs(init_image: Image.Image, control_images: Sequence[Image.Image], *, denoise: float,
                                steps: int, guidance: float, seeds: Sequence[int],
                                mask: Image.Image | None = None, strengths: Sequence[float] | None = None,
                                starts: Sequence[float] | None = None, ends: Sequence[float] | None = None,
                                output_type: str = "latent") -> dict[str, Any]:
    """Keyword arguments for :func:`diffusers_image_pipeline`'s pipeline doing what ours does with
    ``init_image=``, ``denoise=`` (and ``mask=``): one generator per image seeded ``seed + k`` (ours), the
    output at the init image's size."""
    kwargs: dict[str, Any] = dict(
        image=init_image, control_image=_one_or_list(control_images), strength=denoise, num_inference_steps=steps,
        guidance_scale=guidance, height=init_image.height, width=init_image.width, num_images_per_prompt=len(seeds),
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type=output_type,
        controlnet_conditioning_scale=_one_or_list(strengths or [1.0] * len(control_images)))
    if mask is not None:
        kwargs["mask_image"] = mask
    if starts is not None:
        kwargs["control_guidance_start"] = _one_or_list(starts)
    if ends is not None:
        kwargs["control_guidance_end"] = _one_or_list(ends)
    return kwargs


def _one_or_list(values: Sequence[Any]) -> Any:
    """diffusers' convention: a single ControlNet's value alone, several ControlNets' values as a list."""
    return values[0] if len(values) == 1 else list(values)
