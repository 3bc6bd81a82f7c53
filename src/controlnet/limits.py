"""Size limits: every size a user or a file controls is checked here before anything of that size is allocated.

=====================  ===========================================================================================
limit                  rule
=====================  ===========================================================================================
output pixels          ``width * height`` of a generated image (also ``data fill --size`` squared, ``train
                       --resolution`` squared) at most :func:`default_max_pixels`: the device's memory divided by
                       :data:`BYTES_PER_PIXEL`. Overridden by ``--max-pixels N``.
condition aspect       a condition is resized to the output size by "cover, then centre-crop"; its aspect ratio may
                       differ from the output's by at most :data:`MAX_ASPECT` (the crop keeps at least 1/8 of it),
                       which bounds the resized intermediate at ``MAX_ASPECT`` times the output's pixels.
input pixels           an image file is refused before decoding when it has more pixels than PIL's decompression-bomb
                       threshold (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 by default; PIL reads the size from the
                       header, so nothing is decoded).
seeds                  ``0 .. 2**63 - 1`` (-1 on the command line and in the UI: a random one).
=====================  ===========================================================================================

Every refusal is a one-line :class:`~controlnet.errors.UserError` naming the value, the limit and the flag that
changes it. This module imports nothing heavy (torch only inside :func:`device_memory`, for a GPU), so the command
modules may use it while parsing.
"""

from __future__ import annotations

import math

import os
import sys

from controlnet.errors import UserError

# Peak memory of generating one image, per output pixel: the VAE decoder at full resolution dominates (the UNet and
# the ControlNet run on latents, 64x fewer pixels). Measured for diffusers' AutoencoderKL with SD1.5's VAE config
# (block_out_channels 128/256/512/512, the same at full resolution for SD2.x and SDXL), fp32 on CPU: about 4.1 KB
# per pixel over the weights at 512x512 (5.8 KB at 256x256, where fixed costs weigh more). fp16 needs about half.
BYTES_PER_PIXEL = 4096

# How far a condition's aspect ratio may be from the output's: "cover, then centre-crop" keeps at least 1/MAX_ASPECT
# of the condition, and its resized intermediate has at most MAX_ASPECT times the output's pixels.
MAX_ASPECT = 8

# Seeds: torch.Generator.manual_seed takes 64-bit values; we accept the non-negative signed range.
MAX_SEED = 2**63 - 1

MAX_PIXELS_FLAG = "--max-pixels"
_GIB = 2**30


def device_memory(device: str | None = None) -> tuple[int, str]:
    """(bytes of memory, a short description) of ``device`` ("cpu", "cuda", "cuda:N", "mps"; None: the best
    available, as :func:`controlnet.devices.resolve_device` picks it).

    For the CPU: physical memory, lowered by a cgroup memory limit (containers) and by ``RLIMIT_AS`` when set.
    For a GPU: its total memory, as torch reports it.
    """
    kind = str(device).split(":")[0] if device is not None else None
    if kind in (None, "cuda", "mps"):
        import torch

        if kind in (None, "cuda") and torch.cuda.is_available():
            index = torch.device(device).index if device is not None and ":" in str(device) else None
            index = torch.cuda.current_device() if index is None else index
            if index < torch.cuda.device_count():
                return int(torch.cuda.get_device_properties(index).total_memory), f"cuda:{index}"
        mps = getattr(torch.backends, "mps", None)
        if kind in (None, "mps") and mps is not None and mps.is_available():
            return int(torch.mps.recommended_max_memory()), "mps"
    return _cpu_memory(), "cpu"


def _cpu_memory() -> int:
    """Physical memory in bytes, or less where a cgroup limit or ``RLIMIT_AS`` says so."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest machine
        total = 8 * _GIB
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:  # cgroup v2: a number or "max"
            text = f.read().strip()
        if text.isdigit():
            total = min(total, int(text))
    except OSError:
        pass
    if sys.platform != "win32":
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY and soft > 0:
            total = min(total, soft)
    return total


def default_max_pixels(device: str | None = None) -> int:
    """The largest output (pixels per image) for ``device``: its memory over :data:`BYTES_PER_PIXEL`."""
    memory, _ = device_memory(device)
    return max(1, memory // BYTES_PER_PIXEL)


def check_max_pixels(value: int | None) -> int | None:
    """``--max-pixels`` as given: None (derive it from the device) or a positive number."""
    if value is not None and int(value) < 1:
        raise UserError(f"{MAX_PIXELS_FLAG} must be a positive number of pixels, got {value}")
    return value


def check_output_size(width: int, height: int, max_pixels: int | None = None, device: str | None = None,
                      what: str = "size") -> None:
    """Refuse an output of ``width`` x ``height`` pixels over ``max_pixels`` (None: :func:`default_max_pixels`
    of ``device``); ``what`` names the setting in the message (e.g. "--size 99999x99999")."""
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise UserError(f"{what}: {width}x{height}: width and height must be at least 1 pixel")
    pixels = width * height
    if max_pixels is not None:
        limit, source = int(max_pixels), f"{MAX_PIXELS_FLAG} {int(max_pixels):,}"
    else:
        memory, name = device_memory(device)
        limit = max(1, memory // BYTES_PER_PIXEL)
        source = f"{name} memory {memory / _GIB:.1f} GiB / {BYTES_PER_PIXEL} bytes per pixel"
    if pixels > limit:
        raise UserError(f"{what}: {width}x{height} is {pixels:,} pixels, over the limit of {limit:,} ({source}); "
                        f"give a smaller size, or raise the limit with {MAX_PIXELS_FLAG} N")


def check_scale(scale: float, width: int, height: int, max_pixels: int | None = None, device: str | None = None,
                flag: str = "--scale") -> None:
    """Refuse an enlargement factor that is not a finite number >= 1, or that makes a ``width`` x ``height``
    picture larger than :func:`check_output_size` allows, before anything of that size is allocated."""
    scale = float(scale)
    if not (math.isfinite(scale) and scale >= 1):
        raise UserError(f"{flag} must be a finite number >= 1, got {scale:g}")
    check_output_size(round(width * scale), round(height * scale), max_pixels, device, what=f"{flag} {scale:g}")


def check_cover(src_width: int, src_height: int, width: int, height: int, name: str = "condition") -> None:
    """Refuse fitting a ``src_width`` x ``src_height`` condition to ``width`` x ``height`` by "cover, then
    centre-crop" when their aspect ratios differ by more than :data:`MAX_ASPECT`."""
    if min(src_width, src_height, width, height) < 1:
        raise UserError(f"{name}: empty size {src_width}x{src_height} or output {width}x{height}")
    mismatch = (src_width * height) / (src_height * width)  # condition aspect / output aspect
    if max(mismatch, 1 / mismatch) > MAX_ASPECT:
        raise UserError(f"{name} is {src_width}x{src_height}, whose aspect ratio is more than {MAX_ASPECT}x away "
                        f"from the output's {width}x{height} (the centre-crop would keep under 1/{MAX_ASPECT} of it); "
                        "crop the image to about the output's shape, or choose a --size of its shape")


def max_input_pixels() -> int:
    """The pixel count above which an image file is refused unread: PIL's ``Image.MAX_IMAGE_PIXELS``."""
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or sys.maxsize)


def check_input_pixels(width: int, height: int, name: str) -> None:
    """Refuse an image file of ``width`` x ``height`` over :func:`max_input_pixels` (before decoding it)."""
    limit = max_input_pixels()
    if width * height > limit:
        raise UserError(f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of {limit:,} for "
                        "input images (PIL's decompression-bomb threshold); downscale it first")


def check_seed(seed: int, what: str = "--seed", allow_random: bool = False) -> None:
    """Refuse a seed outside ``0 .. 2**63 - 1`` (``allow_random``: -1 too, meaning "pick one")."""
    if allow_random and seed == -1:
        return
    if not 0 <= int(seed) <= MAX_SEED:
        random = "-1 (random) or " if allow_random else ""
        raise UserError(f"{what} must be {random}a whole number in 0..{MAX_SEED} (2**63 - 1), got {seed}")
