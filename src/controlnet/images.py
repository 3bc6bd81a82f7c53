"""Image loading and saving shared by the annotators, the pipeline and the trainer.

:func:`load_image` turns anything a user may hand us (a path, a PIL image of any mode, a numpy array) into one
canonical form: an ``(H, W, 3)`` ``uint8`` RGB array. The conversions it makes, per PIL mode:

========================  ==========================================================================
mode                      conversion
========================  ==========================================================================
``RGB``                   as is
``L``                     grey copied to the three channels
``1``                     black/white → 0/255 on three channels
``P``                     palette expanded; a transparent palette entry is composited like ``RGBA``
``RGBA``, ``LA``, ``PA``  **composited on black**: ``rgb * alpha / 255``. Control images are white strokes
                          on black, so a transparent background becomes the "no condition" colour.
``I;16*``, ``I``, ``F``   16-bit, 32-bit integer and float images (depth maps, label maps) are scaled
                          **by their range**: ``[min, max] → [0, 255]`` linearly. A constant image keeps
                          its value clipped to ``[0, 255]``.
others (CMYK, YCbCr, …)   PIL's own conversion to RGB
========================  ==========================================================================

EXIF orientation is applied (a phone photo comes out upright). numpy arrays may be ``(H, W)``, ``(H, W, 1)``,
``(H, W, 3)`` or ``(H, W, 4)``: ``uint8`` is taken as is, ``bool`` as 0/255, floats as ``[0, 1]`` (clipped;
the convention of the pipeline's tensors), other integer types by range as above.

:func:`save_png` is the one PNG writer: atomic (see :mod:`controlnet.fileio`), with optional text metadata, and
a failed write is a one-line :class:`UserError` naming the file. :func:`make_grid` lays images out in a grid and
:func:`png_metadata` turns a generation's settings into PNG text chunks.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from controlnet.errors import UserError
from controlnet.fileio import atomic_path, destination_of
from controlnet.limits import check_input_pixels

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}


def load_image(src: ImageLike) -> np.ndarray:
    """Return ``src`` as an ``(H, W, 3)`` uint8 RGB array (conversions: see the module docstring).

    Raises :class:`UserError` (one line naming the file) for a missing file, a folder, a file that is not an
    image or is truncated, an empty (0-pixel) image, or an array of an unsupported shape.
    """
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, "array")
    if isinstance(src, Image.Image):
        return _pil_to_rgb_checked(src, "image")
    if isinstance(src, (str, os.PathLike)):
        return _pil_to_rgb_checked(open_image(src), str(src))
    raise UserError(f"cannot load an image from a {type(src).__name__}; pass a file path, a PIL image or an array")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode the image file at ``path`` (any mode kept), or raise a one-line :class:`UserError`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not an image file")
    if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or a device would block the read or never end
        raise UserError(f"{path}: not a regular file (a FIFO, a device, ...); give an image file")
    try:
        with warnings.catch_warnings():  # PIL warns of a "decompression bomb" above the limit checked next
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            check_input_pixels(img.width, img.height, str(path))  # the header's size, before decoding
            img.load()  # decode now so a truncated file fails here, not later
            img = ImageOps.exif_transpose(img) or img
            return img.copy()
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image file (PIL cannot identify it); give a PNG, JPEG, WebP, TIFF or BMP")
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: unreadable image ({err}); the file may be truncated or corrupt") from None
    except Image.DecompressionBombError as err:  # pragma: no cover - needs a huge file
        raise UserError(f"{path}: image too large ({err})") from None


def _check_size(width: int, height: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise UserError(f"{name}: empty image ({width}x{height} pixels); give an image at least 1x1")


def _pil_to_rgb_checked(img: Image.Image, name: str) -> np.ndarray:
    _check_size(img.width, img.height, name)
    try:
        return _pil_to_rgb(img)
    except ValueError as err:  # PIL has no conversion for this mode
        raise UserError(f"{name}: unsupported PIL image mode {img.mode!r} ({err}); save it as RGB or L") from None


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode == "P":
        has_alpha = "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA"
        img, mode = img.convert("RGBA" if has_alpha else "RGB"), ("RGBA" if has_alpha else "RGB")
        if mode == "RGB":
            return np.asarray(img, dtype=np.uint8).copy()
    if mode in _ALPHA_MODES:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)  # (H, W, 4); premultiplied modes un-multiply
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)  # composite on black
        return np.round(rgb).astype(np.uint8)
    if mode in ("L", "1"):
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode.startswith("I") or mode == "F":
        # I;16, I;16B, I;16L, I;16N, I, F: read the raw values, then scale by range.
        values = np.asarray(img).astype(np.float64)
        if values.ndim == 3:  # pragma: no cover - multi-channel high-bit modes are not PIL modes today
            values = values[..., 0]
        return _scale_by_range(values)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _scale_by_range(values: np.ndarray) -> np.ndarray:
    """Map ``[min, max]`` of a 2-D array linearly onto ``[0, 255]``; returns ``(H, W, 3)`` uint8."""
    finite = np.isfinite(values)
    if not finite.any():
        grey = np.zeros(values.shape, dtype=np.uint8)
    else:
        lo, hi = float(values[finite].min()), float(values[finite].max())
        values = np.where(finite, values, lo)
        if hi > lo:
            grey = np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        else:
            grey = np.full(values.shape, np.clip(round(lo), 0, 255), dtype=np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise UserError(f"{name}: an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {arr.shape}")
    _check_size(arr.shape[1], arr.shape[0], name)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.round(np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise UserError(f"{name}: unsupported array dtype {arr.dtype}; use uint8, uint16, bool or float")
        if arr.ndim == 3:
            raise UserError(f"{name}: a {arr.dtype} colour array is ambiguous; convert it to uint8 first")
        return _scale_by_range(arr.astype(np.float64))
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2).copy()
    if arr.shape[2] == 4:
        rgb = arr[..., :3].astype(np.float32) * (arr[..., 3:].astype(np.float32) / 255.0)
        return np.round(rgb).astype(np.uint8)
    return np.ascontiguousarray(arr)


def to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    """A PIL image for ``image``: uint8 ``(H, W)``/``(H, W, 3)``/``(H, W, 4)``, or uint16 ``(H, W)`` (16-bit)."""
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint16 and arr.ndim == 2:
        return Image.fromarray(arr.astype(np.uint16))  # mode I;16
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise UserError(f"cannot save a {arr.dtype} array as PNG; convert it to uint8 (or 2-D uint16) first")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(arr))
    raise UserError(f"cannot save an array of shape {arr.shape} as PNG; use (H, W), (H, W, 3) or (H, W, 4)")


def save_png(
    path: str | os.PathLike,
    image: np.ndarray | Image.Image,
    metadata: Mapping[str, Any] | None = None,
    *,
    atomic: bool = True,
    compress_level: int = 6,
) -> Path:
    """Write ``image`` as a PNG at ``path`` atomically, with ``metadata`` as PNG text chunks; return the path.

    ``image`` is a PIL image or a uint8 array ``(H, W)``, ``(H, W, 3)``, ``(H, W, 4)`` (or 2-D uint16 for 16-bit
    depth). Read the metadata back with ``PIL.Image.open(path).text``. A write that fails (no space, no
    permission, a folder in the way) raises :class:`UserError` naming the path and the cause, and leaves nothing
    at ``path``. ``atomic=False`` writes ``path`` in place, without the temporary file and fsync (for files inside
    a folder that is itself written atomically; a failed write still raises and removes the partial file).
    ``compress_level`` is zlib's 0-9 (PIL's default 6; 1 is faster, OpenCV's default).
    """
    path = Path(path)
    pil = to_pil(image)
    _check_size(pil.width, pil.height, str(path))
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    try:
        with atomic_path(path) if atomic else _in_place(path) as tmp:
            pil.save(tmp, format="PNG", pnginfo=info, compress_level=compress_level)
            if tmp.stat().st_size == 0:  # PIL raises on a failed write; an empty file is the last resort check
                raise OSError(f"{tmp} is empty after writing")
    except OSError as err:
        cause = err.strerror or str(err)
        raise UserError(f"{destination_of(path)}: cannot write the PNG ({cause}); check the folder's permissions and "
                        "free space") from None
    return path


@contextlib.contextmanager
def _in_place(path: Path) -> Iterator[Path]:
    """Yield ``path`` itself; remove what was written there if the body fails."""
    try:
        yield path
    except BaseException:
        if path.is_file():  # never a device or a FIFO that happened to be named
            path.unlink()
        raise


def make_grid(images: Sequence[np.ndarray | Image.Image], columns: int | None = None, pad: int = 0,
              background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """``images`` in rows of ``columns`` (default: all in one row), each top-left aligned in a cell of the
    largest image's size, ``pad`` pixels apart and around, on ``background``; an RGB PIL image."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cells = [to_pil(im).convert("RGB") for im in images]
    columns = len(cells) if columns is None else columns
    if columns < 1:
        raise ValueError(f"make_grid: columns must be >= 1, got {columns}")
    rows = -(-len(cells) // columns)  # ceil
    cell_w, cell_h = max(im.width for im in cells), max(im.height for im in cells)
    grid = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), background)
    for i, im in enumerate(cells):
        row, col = divmod(i, columns)
        grid.paste(im, (pad + col * (cell_w + pad), pad + row * (cell_h + pad)))
    return grid


# Settings not written as a chunk of their own: ComfyUI reads a text chunk named "prompt" as its workflow JSON
# (comfy_extras/nodes_images.py), so the prompt is only in "settings" and "parameters".
_NO_OWN_CHUNK = ("seeds", "prompt")


def png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of the image file at ``path`` (:func:`open_image`'s checks; PIL bounds each chunk at 1 MB,
    decompressed, and all of them at 64 MB). Untrusted: bound and check what you read from them."""
    return {key: value for key, value in open_image(path).info.items() if isinstance(value, str)}


def png_metadata(settings: Mapping[str, Any], index: int = 0) -> dict[str, str]:
    """PNG text chunks for image ``index`` of a generation: one chunk per setting but the prompt (with that image's
    own seed), all of them as JSON under "settings", and A1111's "parameters" text
    (:func:`controlnet.a1111.parameters_text`). Read back with ``PIL.Image.open(path).text``."""
    from controlnet.a1111 import parameters_text

    seeds = settings.get("seeds") or [settings["seed"]]
    per_image = {k: v for k, v in settings.items() if k != "seeds"}
    per_image["seed"] = seeds[index]
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in per_image.items() if k not in _NO_OWN_CHUNK}
    meta["settings"] = json.dumps(per_image, sort_keys=True)
    meta["parameters"] = parameters_text(settings, index)
    return meta
