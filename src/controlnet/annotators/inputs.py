"""How each kind of annotator input is read: images, depth maps, label maps, masks and OpenPose keypoints.

=============  ====================================================================================
kind           what the annotator function receives
=============  ====================================================================================
``image``      ``(H, W, 3)`` uint8 RGB (:func:`controlnet.images.load_image`)
``depth``      ``(H, W)`` raw values, dtype kept: 16-bit/32-bit/float images and ``.npy`` files keep their
               numbers; an 8-bit image gives 0..255 (an RGB one its red channel when grey, else luma)
``labels``     ``(H, W)`` int64 class indices: a ``P`` image gives its palette indices, ``L``/``I;16``/``I``
               their values, a multi-channel image its red channel
``keypoints``  ``(H, W, 3)`` uint8 black canvas of the image's size (the keypoints are a parameter)
=============  ====================================================================================

A colour photo given as a depth or label map is refused in one line naming the detector to use instead
(:func:`is_colour_photo`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from PIL import Image

from controlnet.errors import UserError
from controlnet.images import load_image, open_image

# Canvas used for keypoints when neither an image nor the JSON gives a size: the original ControlNet's 512 px.
DEFAULT_CANVAS = 512

# A photo is not a depth or label map. An 8-bit image with 3 or 4 channels counts as a colour photo when more than
# 5 % of its pixels have R, G, B spread over more than 16 levels: a grey map stored as RGB has equal channels (and
# nearly equal ones after JPEG's chroma rounding or a dithered palette), a colour photo does not. A grey or nearly
# colourless photo cannot be told apart and is read as before.
PHOTO_SPREAD = 16
PHOTO_FRACTION = 0.05
# kind -> what to use instead, for the refusal
PHOTO_INSTEAD = {
    "depth": "depth_map and normal_map read a depth map (grey, 16-bit or float); estimate depth from a photo with "
             "the `depth` annotator (normals: `normal`)",
    "labels": "segmentation_map reads class indices (a palette or grey/16-bit label image); segment a photo with "
              "the `segmentation` annotator",
}


def _name(src: Any) -> str:
    return str(src) if isinstance(src, (str, os.PathLike)) else type(src).__name__


def _check_hw(arr: np.ndarray, name: str) -> None:
    if arr.ndim < 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"{name}: empty image (shape {arr.shape}); give an image at least 1x1")


def _single_channel(arr: np.ndarray) -> np.ndarray:
    """The red channel of a grey-looking colour array, else its luma (ITU-R BT.601 via OpenCV)."""
    if arr.ndim == 2:
        return arr
    if arr.shape[2] == 1 or (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
        return arr[..., 0]
    rgb = load_image(arr)  # uint8, alpha composited
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def is_colour_photo(arr: np.ndarray) -> bool:
    """Whether ``arr`` is an 8-bit colour picture rather than a map (see :data:`PHOTO_SPREAD`)."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        return False
    rgb = arr[..., :3]
    spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    return bool(np.count_nonzero(spread > PHOTO_SPREAD) > PHOTO_FRACTION * spread.size)


def _refuse_photo(arr: np.ndarray, name: str, kind: str) -> None:
    if is_colour_photo(arr):
        raise UserError(f"{name} looks like a colour photo (its R, G, B channels differ), not a "
                        f"{'depth' if kind == 'depth' else 'label'} map: {PHOTO_INSTEAD[kind]}")


def _raw_array(src: Any) -> tuple[np.ndarray, bool]:
    """Raw numbers of ``src``; the flag says they came from a high-bit-depth source (kept as they are)."""
    name = _name(src)
    if isinstance(src, (str, os.PathLike)) and Path(src).suffix.lower() == ".npy":
        if not Path(src).is_file():
            raise UserError(f"{name}: no such file; check the path")
        try:
            arr = np.load(src, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise UserError(f"{name}: not a readable .npy array ({err})") from None
        _check_hw(arr, name)
        return np.asarray(arr), True
    if isinstance(src, (str, os.PathLike)):
        src = open_image(src)
    if isinstance(src, Image.Image):
        if src.width == 0 or src.height == 0:
            raise UserError(f"{name}: empty image ({src.width}x{src.height} pixels); give an image at least 1x1")
        if src.mode.startswith("I") or src.mode == "F":
            return np.asarray(src), True
        if src.mode == "P":
            return np.asarray(src), False  # palette indices
        return load_image(src), False
    if isinstance(src, np.ndarray):
        _check_hw(src, name)
        if src.ndim not in (2, 3):
            raise UserError(f"{name}: expected an (H, W) or (H, W, C) array, got shape {src.shape}")
        return src, src.dtype != np.uint8
    raise UserError(f"cannot read a {type(src).__name__}; pass a file path, a PIL image or an array")


def load_depth(src: Any) -> np.ndarray:
    """A depth map as ``(H, W)`` raw values, dtype kept (uint8 for 8-bit images; see the module docstring)."""
    arr, _ = _raw_array(src)
    if isinstance(src, Image.Image) and src.mode == "P":
        arr = load_image(src)
    _refuse_photo(arr, _name(src), "depth")
    return _single_channel(arr)


def load_labels(src: Any) -> np.ndarray:
    """A label map as ``(H, W)`` int64 class indices (see the module docstring)."""
    name = _name(src)
    if isinstance(src, (str, os.PathLike)) and Path(src).suffix.lower() != ".npy":
        src = open_image(src)
    if isinstance(src, Image.Image) and src.mode == "1":
        src = src.convert("L").point(lambda v: v // 255)  # binary map: classes 0 and 1
    arr, _ = _raw_array(src)
    _refuse_photo(arr, name, "labels")
    if arr.ndim == 3:
        arr = arr[..., 0]
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not (arr == np.round(arr)).all():
            raise UserError(f"{_name(src)}: a label map must hold whole class indices; got fractional values")
    return arr.astype(np.int64)


def load_mask(src: Any, shape: tuple[int, int], name: str = "mask") -> np.ndarray:
    """A binary ``(H, W)`` bool mask (True = masked): white/bright pixels (> 127, or > 0.5 for floats) are masked."""
    if isinstance(src, np.ndarray) and np.issubdtype(src.dtype, np.floating):
        arr = src if src.ndim == 2 else src[..., 0]
        mask = arr > 0.5
    elif isinstance(src, np.ndarray) and src.dtype == np.bool_:
        mask = src if src.ndim == 2 else src[..., 0]
    else:
        mask = load_image(src).max(axis=2) > 127
    if mask.shape != tuple(shape):
        raise UserError(
            f"{name}: mask size {mask.shape[1]}x{mask.shape[0]} differs from the image's {shape[1]}x{shape[0]}; "
            "give a mask of the same size"
        )
    return mask


def keypoint_canvas(params: dict[str, Any]) -> np.ndarray:
    """A black canvas for drawing keypoints: the JSON's ``canvas_width``/``canvas_height`` if it has them,
    else the ``width``/``height`` parameters (default 512)."""
    doc = params.get("keypoints")
    width, height = params.get("width") or 0, params.get("height") or 0
    if doc is not None and not (width and height):
        data = read_keypoints_json(doc)
        if isinstance(data, dict):
            width = width or int(data.get("canvas_width", 0) or 0)
            height = height or int(data.get("canvas_height", 0) or 0)
    width, height = width or DEFAULT_CANVAS, height or DEFAULT_CANVAS
    return np.zeros((height, width, 3), dtype=np.uint8)


def read_keypoints_json(src: Any) -> Any:
    """The parsed OpenPose JSON from a path, a JSON string, or an already parsed dict/list."""
    if isinstance(src, (dict, list)):
        return src
    if isinstance(src, str) and src.lstrip().startswith(("{", "[")):
        text, name = src, "keypoints"
    else:
        path = Path(src)
        if not path.is_file():
            raise UserError(f"{path}: no such keypoints file; give OpenPose JSON (people[].pose_keypoints_2d)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: unreadable keypoints file ({err})") from None
        name = str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{name}: not valid JSON ({err.msg} at line {err.lineno}); give OpenPose JSON") from None


def _load_keypoints_input(src: Any) -> np.ndarray:
    if isinstance(src, (str, os.PathLike)) and Path(src).suffix.lower() == ".json":
        raise UserError(f"{src}: a keypoints file is passed as keypoints=..., the image only sets the canvas size")
    return np.zeros_like(load_image(src))


# kind -> loader (path / PIL image / array -> what the annotator function receives)
KINDS: dict[str, Callable[[Any], np.ndarray]] = {
    "image": load_image,
    "depth": load_depth,
    "labels": load_labels,
    "keypoints": _load_keypoints_input,
}

# File suffixes the CLI's folder mode picks up, per kind.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SUFFIXES: dict[str, tuple[str, ...]] = {
    "image": IMAGE_SUFFIXES,
    "depth": IMAGE_SUFFIXES + (".npy",),
    "labels": IMAGE_SUFFIXES + (".npy",),
    "keypoints": (".json",),
}


def load(kind: str, src: Any) -> np.ndarray:
    """Load ``src`` as input of ``kind`` (one of :data:`KINDS`)."""
    if kind not in KINDS:
        raise UserError(f"unknown annotator input kind {kind!r}; use one of {', '.join(KINDS)}")
    return KINDS[kind](src)
