"""Condition images: from whatever the caller gives to the float ``(H, W, 3)`` a ControlNet's hint encoder reads.

::

    image (path, PIL, array, tensor) → float32 (H, W, 3) in [0, 1]      to_condition_array
    → W x H: scale to cover, centre-crop                                 resize_cover
    → annotator (optional)                                               prepare_condition

Decisions:

* Resize by "cover, then centre-crop": scale (keeping the aspect ratio) until the image covers W x H, then cut the
  centre W x H. INTER_AREA when shrinking, INTER_LANCZOS4 when enlarging, as ``resize_image`` in
  lllyasviel/ControlNet's annotator/util.py.
* An annotator of pictures (canny, lines, invert) runs on the resized image, at the output resolution, as the
  original's gradio apps do. One of depth, labels or keypoints, or one with a same-size file parameter (inpaint's
  mask), runs on the image as given, and its output is resized the same way.
* Sizes are multiples of the VAE factor (8): :func:`round_size` rounds to the nearest multiple.
* Masked pixels (the ControlNet 1.1 inpaint convention, lllyasviel/ControlNet-v1-1-nightly gradio_inpaint.py:
  the image in [0, 1] with masked pixels at -1): a float condition is in [0, 1] except pixels whose channels are
  all negative, which reach the ControlNet as exactly -1 (:data:`MASKED_VALUE`), through resizing too. The
  ``inpaint`` annotator's uint8 picture (masked pixels black) is turned into that float condition
  (:data:`FLOAT_CONDITIONS`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
import torch
from PIL import Image

from controlnet.errors import UserError
from controlnet.limits import check_cover

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

# The value a masked pixel of a condition has when it reaches the ControlNet (control_v11p_sd15_inpaint).
MASKED_VALUE = -1.0


def _inpaint_condition(annotated: np.ndarray) -> np.ndarray:
    from controlnet.annotators.transforms import inpaint_condition_from_uint8

    return inpaint_condition_from_uint8(annotated)


# Annotators whose uint8 picture encodes a float condition with masked pixels: name → decoder to float (H, W, 3).
FLOAT_CONDITIONS = {"inpaint": _inpaint_condition}


def round_size(width: float, height: float, multiple: int = 8) -> tuple[int, int]:
    """``(width, height)`` rounded to the nearest multiples of ``multiple`` (halves up; at least ``multiple``)."""
    return tuple(max(multiple, int(math.floor(v / multiple + 0.5)) * multiple) for v in (width, height))  # type: ignore[return-value]


def to_condition_array(image: ImageInput) -> np.ndarray:
    """A condition image as float32 ``(H, W, 3)`` in [0, 1], masked pixels at -1.

    Float arrays and tensors are taken as [0, 1] without quantising; a pixel whose channels are all negative is
    masked and becomes exactly -1 (module docstring). Everything else goes through
    :func:`controlnet.images.load_image` (paths, any PIL mode, integer arrays; one-line errors on bad files).
    """
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)  # (C, H, W) → (H, W, C)
        image = t.numpy()
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        arr = image.astype(np.float32)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise UserError(f"a float condition must be (H, W), (H, W, 3) or (3, H, W) in [0, 1]; got {image.shape}")
        return _with_masked(np.nan_to_num(arr), (arr < 0).all(axis=2))
    from controlnet.images import load_image

    return load_image(image).astype(np.float32) / 255.0


def _with_masked(image: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """``image`` clipped to [0, 1] with the pixels of ``masked`` (H, W) set to :data:`MASKED_VALUE`."""
    out = np.clip(image, 0.0, 1.0).astype(np.float32)
    out[masked] = MASKED_VALUE
    return out


def resize_cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize ``image`` (H, W, C) to exactly ``height`` x ``width``: scale to cover, then centre-crop.

    The aspect ratio is kept: scale by ``max(width / W, height / H)``, then cut the centre. INTER_AREA when
    shrinking and INTER_LANCZOS4 when enlarging, as the original ``resize_image``; floats are clipped to [0, 1].
    A float image with masked pixels (all channels negative) keeps them: the mask is resized on its own
    (a pixel is masked where more than half of it was) and its pixels are set to -1 again. Aspect ratios more
    than :data:`controlnet.limits.MAX_ASPECT` apart are refused (:class:`UserError`) before anything is resized.
    """
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    check_cover(w, h, width, height)  # bounds the resized intermediate before it is allocated
    if np.issubdtype(image.dtype, np.floating) and image.ndim == 3 and (image < 0).any():
        masked = (image < 0).all(axis=2)
        shown = _resize_cover(np.clip(image, 0.0, 1.0), width, height)
        return _with_masked(shown, _resize_cover(masked.astype(np.float32), width, height)[..., 0] > 0.5)
    return _resize_cover(image, width, height)


def _resize_cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    new_w, new_h = max(width, math.ceil(w * scale - 1e-6)), max(height, math.ceil(h * scale - 1e-6))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LANCZOS4
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    if resized.ndim == 2:
        resized = resized[..., None]
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = resized[top : top + height, left : left + width]
    if np.issubdtype(out.dtype, np.floating):
        out = np.clip(out, 0.0, 1.0)
    return np.ascontiguousarray(out)


def annotates_pixels(annotator: Any) -> bool:
    """Whether an annotator reads a picture and nothing tied to its original size, so it may run on the condition
    already resized to the output size. Annotators of other input kinds (depth, labels, keypoints) or with a file
    parameter (inpaint's same-size mask) run on the image as given; their output is resized afterwards."""
    params = getattr(annotator, "params", ())
    return getattr(annotator, "input_kind", "image") == "image" and not any(p.type is Path for p in params)


def prepare_condition(image: ImageInput, width: int, height: int, annotator: str | None = None,
                      annotator_params: Mapping[str, Any] | None = None) -> np.ndarray:
    """The condition a ControlNet sees for ``image`` at the output size: float32 ``(height, width, 3)`` in [0, 1]
    (masked pixels -1), resized by "cover, then centre-crop" and, with ``annotator``, annotated (the order in the
    module docstring)."""
    condition = resize_cover(to_condition_array(image), width, height)  # (H, W, 3) float
    if not annotator:
        return condition
    from controlnet import annotators

    annotate = annotators.get(annotator)
    params = dict(annotator_params or {})
    if annotates_pixels(annotate):  # e.g. canny: detect at the output resolution, as the original does
        annotated = annotate(np.round(condition * 255.0).astype(np.uint8), **params)
    else:  # raw depth / labels / keypoints, or a same-size file parameter (mask): the input as given
        source = image if isinstance(image, (str, os.PathLike, Image.Image, np.ndarray)) else \
            np.round(to_condition_array(image) * 255.0).astype(np.uint8)
        annotated = annotate(source, **params)
    decode = FLOAT_CONDITIONS.get(annotator)
    condition = decode(annotated) if decode else np.asarray(annotated, dtype=np.float32) / 255.0
    return resize_cover(condition, width, height)


def condition_to_pil(condition: np.ndarray) -> Image.Image:
    """A float (H, W, 3) [0, 1] condition as an 8-bit RGB PIL image."""
    return Image.fromarray(np.round(np.clip(condition, 0.0, 1.0) * 255.0).astype(np.uint8))
