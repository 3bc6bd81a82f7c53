"""Image to image and inpainting: the starting picture, its mask, and the pixels around them.

Functions of the VAE, the UNet and the sampler that :class:`controlnet.pipeline.Pipeline` calls for an init image
(VAE encoding, the starting latents and timesteps, "only masked", the hires upscale, the paste-back); the settings
are :class:`controlnet.generation_config.ImageToImage` and :class:`~controlnet.generation_config.HiresFix`. The
pieces, top to bottom::

    image (any size) + mask (its size, white = repaint)        load_source     (checks, --mask-invert)
    → the output size, "cover, then centre-crop", both        Source.fit
    → the VAE's input (1, 3, H, W) in [-1, 1]                   to_vae_input
    → the latent mask: a latent pixel is repainted when any    latent_mask
      pixel of its 8 x 8 block is
    → after decoding: the unmasked pixels pasted back          paste_back      (with the feathered mask)

and for A1111's "inpaint area: only masked" (``--inpaint-full-res``)::

    box = the mask's bounding box + padding, grown to the     full_res_box
          generation's aspect ratio, inside the image
    crop → generate at the full output size → resize back     crop / uncrop
    → pasted into the original with the mask

Decisions:

* Mask: white (> 127; > 0.5 for floats) is repainted. It must have the image's size: a mask of another size is
  refused (one line naming both sizes), not resized, since a mask drawn for another picture is more likely a
  mistake than an intent. A mask with nothing to repaint is refused too.
* The mask blur feathers *inward*: the paste-back weight rises linearly from the mask's edge to 1 at
  ``mask_blur`` px inside it (``min(1, d / mask_blur)``, ``d`` the distance to the nearest unmasked pixel, 1 on
  the edge), and is 0 outside, so every unmasked pixel is the input's, bit for bit, whatever the blur. (A1111
  blurs both ways, changing pixels outside the mask too.) Strokes thinner than twice the blur are only partly
  repainted: use a blur of 0 for them.
* Latent mask: max-pooled over the VAE factor (the sd-webui-controlnet extension's inpaint hijack,
  ``max_pool2d(mask, (8, 8))``): no masked pixel is left to a kept latent. diffusers' inpaint pipelines
  downsample by nearest neighbour (the top-left pixel of each block); the two agree on masks aligned to the 8 px
  grid.
* Paste-back (after decoding): ``output = original * (1 - w) + generated * w`` with ``w`` the feathered mask,
  and exactly the original where ``w`` is 0. A VAE does not reproduce its input, so without it the kept region
  would come back changed (diffusers returns the decoded image as it is; A1111 pastes back as here).
* Full resolution ("only masked", AUTOMATIC1111 modules/masking.py ``get_crop_region``/``expand_crop_region``,
  diffusers' ``padding_mask_crop``): the box is stretched to the generation size and back (its aspect ratio is
  the generation's, up to rounding and the image's border), and the paste-back uses the mask at the original
  resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from controlnet.conditions import prepare_condition, resize_cover, to_condition_array
from controlnet.errors import UserError
from controlnet.generation_config import HiresFix
from controlnet.images import load_image
from controlnet.devices import placement
from controlnet.sampling import Inpainting

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right/bottom exclusive


@dataclass
class Source:
    """The starting picture of img2img, and for inpainting its mask."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None = None  # (H, W) bool, True = repaint

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.image.shape[1], self.image.shape[0]

    def fit(self, width: int, height: int) -> "Source":
        """The picture and mask at ``width`` x ``height`` ("cover, then centre-crop"; unchanged at their size)."""
        if self.size == (width, height):
            return self
        image = resize_cover(self.image, width, height)
        mask = None
        if self.mask is not None:
            mask = resize_cover(self.mask.astype(np.float32)[..., None], width, height)[..., 0] > 0.5
            if not mask.any():
                raise UserError(f"the mask vanishes when resized to {width}x{height}; paint a larger area white")
        return Source(image, mask)

    def crop(self, box: Box) -> "Source":
        """The picture and mask cut to ``box``."""
        left, top, right, bottom = box
        mask = None if self.mask is None else self.mask[top:bottom, left:right]
        return Source(self.image[top:bottom, left:right], mask)


def load_source(image: Any, mask: Any = None, invert: bool = False) -> Source:
    """The picture (path, PIL image or array: :func:`controlnet.images.load_image`) and its mask, checked."""
    from controlnet.annotators.inputs import load_mask

    rgb = load_image(image)
    if mask is None:
        if invert:
            raise UserError("mask_invert needs a mask; pass --mask MASK")
        return Source(rgb)
    masked = load_mask(mask, rgb.shape[:2], name="mask")
    if invert:
        masked = ~masked
    if not masked.any():
        raise UserError("the mask has no white pixels: nothing to repaint; paint the area to repaint white"
                        + (" (or drop --mask-invert)" if invert else ""))
    return Source(rgb, masked)


def feather(mask: np.ndarray, blur: float) -> np.ndarray:
    """The paste-back weight ``(H, W)`` float32 in [0, 1]: ``mask`` feathered inward over ``blur`` px (module
    docstring); the mask itself when ``blur`` is 0."""
    if blur <= 0 or mask.all():  # a mask covering the whole picture has no edge to feather
        return mask.astype(np.float32)
    # Distance of each masked pixel to the nearest unmasked one (1 on the edge; the picture's border is no edge).
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.minimum(inside / float(blur), 1.0).astype(np.float32)


def latent_mask(mask: np.ndarray, factor: int) -> torch.Tensor:
    """``(1, 1, H / factor, W / factor)`` float32: 1 where any pixel of the block is masked (module docstring)."""
    pixels = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
    return torch.nn.functional.max_pool2d(pixels, factor)


def to_vae_input(image: np.ndarray) -> torch.Tensor:
    """A uint8 ``(H, W, 3)`` picture as the VAE reads it: ``(1, 3, H, W)`` float32 in [-1, 1] (diffusers'
    ``VaeImageProcessor``: ``x / 255``, then ``2x - 1``)."""
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0


def paste_back(generated: np.ndarray, original: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``generated`` where ``weight`` is 1, ``original`` where it is 0 (bit for bit), blended in between;
    all ``(H, W, 3)`` uint8 but ``weight`` ``(H, W)`` float."""
    w = weight[..., None]
    blended = np.rint(original.astype(np.float32) * (1.0 - w) + generated.astype(np.float32) * w)
    return np.where(w > 0, np.clip(blended, 0, 255).astype(np.uint8), original)


def _grow(low: int, high: int, length: int, limit: int) -> tuple[int, int]:
    """The span [low, high) grown (or kept) to ``length`` around its centre, shifted inside [0, limit)."""
    length = min(max(length, high - low), limit)
    start = low - (length - (high - low)) // 2
    start = min(max(start, 0), limit - length)
    return start, start + length


def mask_box(mask: np.ndarray, padding: int) -> Box:
    """The bounding box of the mask's pixels, ``padding`` px larger on every side, inside the image."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0),
            min(int(cols[-1]) + 1 + padding, w), min(int(rows[-1]) + 1 + padding, h))


def full_res_box(mask: np.ndarray, width: int, height: int, padding: int) -> Box:
    """The region "only masked" inpainting works on: :func:`mask_box` grown to the aspect ratio
    ``width : height`` (the shorter side grows, around the centre), kept inside the image."""
    left, top, right, bottom = mask_box(mask, padding)
    h, w = mask.shape
    box_w, box_h = right - left, bottom - top
    if box_w * height < box_h * width:  # too narrow: widen
        left, right = _grow(left, right, math.ceil(box_h * width / height), w)
    else:
        top, bottom = _grow(top, bottom, math.ceil(box_w * height / width), h)
    return left, top, right, bottom


def resize_exact(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` stretched to exactly ``width`` x ``height`` (INTER_AREA down, INTER_LANCZOS4 up)."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    interpolation = cv2.INTER_AREA if width * height < w * h else cv2.INTER_LANCZOS4
    return cv2.resize(image, (width, height), interpolation=interpolation)


def uncrop(generated: np.ndarray, source: Source, box: Box, blur: float) -> np.ndarray:
    """A full-resolution result: ``generated`` (the box's generation, any size) resized to the box and pasted into
    ``source``'s picture through its feathered mask."""
    left, top, right, bottom = box
    canvas = source.image.copy()
    canvas[top:bottom, left:right] = resize_exact(generated, right - left, bottom - top)
    return paste_back(canvas, source.image, feather(source.mask, blur))


def crop_condition(condition: np.ndarray, box: Box) -> np.ndarray:
    """A float condition ``(H, W, 3)`` cut to ``box`` (masked pixels stay -1)."""
    left, top, right, bottom = box
    return np.ascontiguousarray(condition[top:bottom, left:right])


def is_inpainting_unet(unet: Any, vae: Any) -> bool:
    """Whether ``unet`` is an inpainting one: latents + mask + masked-image latents in (9 channels for SD)."""
    return unet.config.in_channels == 2 * vae.config.latent_channels + 1


def check_unet(unet: Any, vae: Any, mask: Any) -> None:
    """One-line :class:`UserError` when the UNet cannot run these settings (a 9-channel inpainting UNet needs a
    mask; other channel counts are not supported)."""
    channels, latent = unet.config.in_channels, vae.config.latent_channels
    if channels != latent and not is_inpainting_unet(unet, vae):
        raise UserError(f"a UNet with {channels} input channels is not supported (ordinary: {latent}; "
                        f"inpainting: {2 * latent + 1})")
    if is_inpainting_unet(unet, vae) and mask is None:
        raise UserError(f"this base is an inpainting model ({channels}-channel UNet): it needs init_image and mask "
                        "(--init-image IMG --mask MASK); use an ordinary base for text-to-image and img2img")


@torch.inference_mode()
def encode(vae: Any, image: np.ndarray | torch.Tensor, generators: list[torch.Generator],
           device: torch.device) -> torch.Tensor:
    """A picture (uint8 ``(H, W, 3)``, or the VAE's input ``(1, 3, H, W)`` in [-1, 1]) → latents ``(B, C, h, w)``
    float32 on ``device``, one posterior sample per generator (diffusers' ``retrieve_latents``)."""
    x = image if isinstance(image, torch.Tensor) else to_vae_input(image)
    posterior = vae.encode(x.to(**placement(vae))).latent_dist
    z = torch.cat([posterior.sample(generator=g) for g in generators]).float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).to(device)


def only_masked(source: Source, padding: int, units: list[Any],
                size_for: Callable[[np.ndarray], tuple[int, int]]) -> tuple[Source, tuple[int, int], Box, list[Any]]:
    """"Only masked" inpainting (module docstring): the box's picture and mask stretched to the size it is
    generated at (``size_for(empty array of the box's shape)``), that size, the box, and the control units with
    their conditions of the picture's size prepared there (annotated) and cut to the box (others are used whole)."""
    left, top, right, bottom = mask_box(source.mask, int(padding))
    width, height = size_for(np.empty((bottom - top, right - left, 0)))
    box = full_res_box(source.mask, width, height, int(padding))
    cropped = []
    for unit in units:
        h, w = to_condition_array(unit.image).shape[:2]
        if (w, h) == source.size:
            whole = prepare_condition(unit.image, w, h, unit.annotator, unit.annotator_params)
            unit = replace(unit, image=crop_condition(whole, box), annotator=None, annotator_params={})
        cropped.append(unit)
    crop = source.crop(box)
    stretched = Source(resize_exact(crop.image, width, height),
                       resize_exact(crop.mask.astype(np.uint8), width, height) > 0)
    return stretched, (width, height), box, cropped


def image_start(vae: Any, unet: Any, sampler: Any, steps: int, denoise: float, generators: list[torch.Generator],
                draw_noise: Callable[[], torch.Tensor], source: Source | None, image_latents: torch.Tensor | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Inpainting | None]:
    """The starting latents ``(B, C, h, w)`` of a pass from a picture (``source``, or the hires pass's
    ``image_latents``), the timesteps to run and the known region (inpainting), drawing from the generators in
    the order of the pipeline's docstring (``draw_noise``: the pass's noise). ``sampler`` has its timesteps set."""
    timesteps = img2img_timesteps(sampler, steps, denoise)
    masked = source is not None and source.mask is not None
    inpainting_unet = is_inpainting_unet(unet, vae)
    from_noise = masked and denoise >= 1.0  # diffusers' inpaint pipelines: pure noise at strength 1
    if image_latents is None and not (from_noise and inpainting_unet):
        image_latents = encode(vae, source.image, generators, device)
    noise = draw_noise()
    if from_noise:
        start = noise * sampler.init_noise_sigma
    elif len(timesteps) == 0:  # denoise 0: the VAE round trip
        start = image_latents
    else:
        start = sampler.add_noise(image_latents, noise, timesteps[:1].repeat(len(generators)))
    if not masked:
        return start, timesteps, None
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    mask = latent_mask(source.mask, factor).to(device).expand(len(generators), -1, -1, -1)
    if inpainting_unet:  # the image with the masked pixels at 0 (grey), as diffusers
        keep = torch.from_numpy(~source.mask)[None, None].float()  # (1, 1, H, W)
        masked_latents = encode(vae, to_vae_input(source.image) * keep, generators, device)
        return start, timesteps, Inpainting(mask, masked_image_latents=masked_latents)
    return start, timesteps, Inpainting(mask, image_latents=image_latents, noise=noise)


def upscale_latents(vae: Any, latents: torch.Tensor, hires: HiresFix, width: int, height: int,
                    generators: list[torch.Generator], decode: Callable[[torch.Tensor], np.ndarray],
                    device: torch.device) -> torch.Tensor:
    """The hires pass's picture: ``latents`` upscaled to ``width`` x ``height`` by the hires upscaler (``decode``:
    latents → uint8 pictures, for the "lanczos" upscaler)."""
    if hires.upscaler == "latent":
        return interpolate_latents(latents, width, height, 2 ** (len(vae.config.block_out_channels) - 1))
    pictures = resize_pictures(decode(latents), width, height)
    return torch.cat([encode(vae, p, [g], device) for p, g in zip(pictures, generators)])


def interpolate_latents(latents: torch.Tensor, width: int, height: int, factor: int) -> torch.Tensor:
    """Latents ``(B, C, h, w)`` resized to those of a ``width`` x ``height`` picture (``factor``: the VAE's):
    A1111's "Latent" hires upscaler, bilinear without antialiasing."""
    size = (height // factor, width // factor)
    return torch.nn.functional.interpolate(latents, size=size, mode="bilinear", align_corners=False)


def resize_pictures(arrays: Sequence[np.ndarray], width: int, height: int) -> list[np.ndarray]:
    """Decoded pictures (uint8 ``(H, W, 3)``) resized to ``width`` x ``height``: the "lanczos" hires upscaler
    (PIL's Lanczos)."""
    return [np.asarray(Image.fromarray(a).resize((width, height), Image.LANCZOS)) for a in arrays]


def paste_back_all(arrays: list[np.ndarray], source: Source, blur: float, whole: Source | None = None,
                   box: Box | None = None) -> list[np.ndarray]:
    """The decoded images with the unmasked pixels of ``source`` pasted back (for "only masked": the box's
    result pasted into ``whole``)."""
    if box is not None:
        return [uncrop(a, whole, box, blur) for a in arrays]
    weight = feather(source.mask, blur)
    return [paste_back(a, source.image, weight) for a in arrays]


def img2img_timesteps(sampler: Any, steps: int, denoise: float) -> torch.Tensor:
    """The last ``round(denoise * steps)`` timesteps of the schedule (rounded half up), and the scheduler told
    where they begin (diffusers' img2img ``get_timesteps``)."""
    run = min(int(math.floor(denoise * steps + 0.5)), steps)
    begin = (steps - run) * sampler.order
    if hasattr(sampler, "set_begin_index"):
        sampler.set_begin_index(begin)
    return sampler.timesteps[begin:]


__all__ = ["Box", "HiresFix", "Source", "check_unet", "crop_condition", "encode", "feather", "full_res_box",
           "image_start", "img2img_timesteps", "interpolate_latents", "is_inpainting_unet", "latent_mask",
           "load_source", "mask_box", "only_masked", "paste_back", "paste_back_all", "resize_exact", "resize_pictures",
           "to_vae_input", "uncrop", "upscale_latents"]
