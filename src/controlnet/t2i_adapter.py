"""T2I-Adapter: a small convolutional network whose multi-scale features are added inside a locked UNet's encoder.

Mou et al., "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for Text-to-Image Diffusion
Models" (2023). The condition image is pixel-unshuffled to latent resolution, and each stage of the adapter
gives one feature map at the width and resolution of one of the UNet's down blocks. Unlike a ControlNet's
residuals (added to the skip connections), the features are added to the hidden states *inside* the down blocks
(diffusers' ``UNet2DConditionModel`` takes them as ``down_intrablock_additional_residuals``), and the adapter
sees neither the latent, the timestep nor the prompt: it runs once per image, not once per step.

Three released architectures (TencentARC, ``adapter_type`` as in diffusers' config.json):

* ``full_adapter`` (SD1.x ``t2iadapter_*_sd14v1`` / ``sd15v2``): conv_in, then one stage per UNet down block,
  each a 2x average pool (not the first), a 1x1 conv when the width changes, and residual blocks (3x3, ReLU, 1x1);
* ``full_adapter_xl`` (SDXL ``t2i-adapter-*-sdxl-1.0``): the same blocks, 16x unshuffle and one pooling stage,
  since SDXL's UNet has one downsampler less in its first blocks;
* ``light_adapter`` (SD1.x color / ``*_light``): no conv_in; each stage squeezes to a quarter of its width
  (1x1), runs residual blocks (3x3, ReLU, 3x3) and widens back (1x1).

Two file layouts hold the same tensors, converted by renaming only: TencentARC's original (``conv_in.*``,
``body.{stage * num_res_blocks + block}.block1.*`` for the full adapters, ``body.{stage}.body.{block}.*`` for the
light one) and diffusers' folder (config.json + ``adapter.body.{stage}.resnets.{block}.*``). Our module names are
diffusers' without the ``adapter.`` prefix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from controlnet.errors import UserError
from controlnet.fileio import atomic_path
from controlnet.residuals import DOWN_INTRABLOCK, Residuals

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")
# The class name diffusers writes in an adapter's config.json (diffusers.models.adapter.T2IAdapter).
CLASS_NAME = "T2IAdapter"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHT_NAMES = (WEIGHTS_NAME, "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_PREFIX = "adapter."

# Pixel-unshuffle factors of the releases: SD1.x adapters work at the VAE's 8x (TencentARC adapter.py
# `nn.PixelUnshuffle(8)`); SDXL adapters unshuffle 16x and pool once (diffusers FullAdapterXL, downscale_factor 16).
SD_DOWNSCALE = 8
SDXL_DOWNSCALE = 16
# Residual blocks per stage of the releases: 2 in the full adapters, 4 in the light one (TencentARC
# `Adapter(nums_rb=2)`, `Adapter_light(nums_rb=4)`).
FULL_RES_BLOCKS = 2
LIGHT_RES_BLOCKS = 4
# A light stage's inner width is a quarter of its output (TencentARC `extractor(inter_c=channels[i] // 4)`).
LIGHT_SQUEEZE = 4
# The SD-family VAEs downsample 8x: the latent is the image / 8.
LATENT_DOWNSCALE = 8
# Condition images have 1 (sketch) or 3 (RGB) channels; the unshuffled width tells the factor only with that.
IMAGE_CHANNELS = (1, 3)
MAX_CHANNELS = 16_384
MAX_STAGES = 8
MAX_RES_BLOCKS = 64

StateDict = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class T2IAdapterConfig:
    """An adapter's architecture; field names and meanings are those of diffusers' T2IAdapter config.json.

    ``channels``: the output width of each stage (the UNet's down-block widths). The light adapter has one stage
    more than ``channels`` entries (its last stage repeats the last width at half the resolution).
    """

    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = FULL_RES_BLOCKS
    downscale_factor: int = SD_DOWNSCALE
    adapter_type: str = "full_adapter"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        self.check()

    def check(self) -> None:
        """Raise a one-line :class:`UserError` naming the first field that no adapter can be built with."""

        def refuse(problem: str) -> None:
            raise UserError(f"invalid T2I-Adapter config: {problem}")

        def integer(value: Any, low: int, high: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

        if self.adapter_type not in ADAPTER_TYPES:
            refuse(f"adapter_type must be one of {', '.join(ADAPTER_TYPES)}, got {self.adapter_type!r}")
        if not integer(self.in_channels, 1, MAX_CHANNELS):
            refuse(f"in_channels must be an integer in 1..{MAX_CHANNELS}, got {self.in_channels!r}")
        if not (1 <= len(self.channels) <= MAX_STAGES and all(integer(c, 1, MAX_CHANNELS) for c in self.channels)):
            refuse(f"channels must be 1..{MAX_STAGES} integers in 1..{MAX_CHANNELS}, got {list(self.channels)}")
        if not integer(self.num_res_blocks, 1, MAX_RES_BLOCKS):
            refuse(f"num_res_blocks must be an integer in 1..{MAX_RES_BLOCKS}, got {self.num_res_blocks!r}")
        if not integer(self.downscale_factor, 1, 64):
            refuse(f"downscale_factor must be an integer in 1..64, got {self.downscale_factor!r}")
        if self.adapter_type == "full_adapter_xl" and (
                len(self.channels) < 3 or any(a != b for a, b in zip(self.channels[2:], self.channels[3:]))):
            refuse(f"full_adapter_xl needs 3 or more channels, equal from the third on; got {list(self.channels)}")
        if self.adapter_type == "light_adapter" and any(c < LIGHT_SQUEEZE for c in self.channels):
            refuse(f"light_adapter channels must be >= {LIGHT_SQUEEZE} (stages squeeze 4x); got {list(self.channels)}")

    def stages(self) -> list[tuple[int, int, bool]]:
        """(input width, output width, pools 2x first) of each stage, in order."""
        c = self.channels
        if self.adapter_type == "full_adapter":
            return [(c[0], c[0], False)] + [(c[i - 1], c[i], True) for i in range(1, len(c))]
        if self.adapter_type == "full_adapter_xl":  # SDXL: stage 2 pools, the others keep the resolution
            return [(c[0], c[0], False)] + [(c[i - 1], c[i], i == 2) for i in range(1, len(c))]
        unshuffled = self.in_channels * self.downscale_factor**2
        return ([(unshuffled, c[0], False)] + [(c[i - 1], c[i], True) for i in range(1, len(c))]
                + [(c[-1], c[-1], True)])

    @property
    def total_downscale_factor(self) -> int:
        """How much smaller than the image the last feature map is (the image side must divide by this)."""
        pools = sum(down for _, _, down in self.stages())
        return self.downscale_factor * 2**pools

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "config") -> "T2IAdapterConfig":
        """From a config.json dict (ours or diffusers'); keys that are not fields are ignored."""
        class_name = config.get("_class_name")
        if class_name not in (None, CLASS_NAME):
            raise UserError(f"{source} describes a {class_name}, not a {CLASS_NAME}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in config.items() if k in names})
        except UserError as err:
            raise UserError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config.json diffusers' ``T2IAdapter.from_pretrained`` reads."""
        return {"_class_name": CLASS_NAME, **{k: list(v) if isinstance(v, tuple) else v
                                               for k, v in dataclasses.asdict(self).items()}}


# --------------------------------------------------------------------------------------------- modules


class _ResBlock(nn.Module):
    """x + conv(ReLU(conv3x3(x))); the second conv is 1x1 in the full adapters, 3x3 in the light one."""

    def __init__(self, channels: int, second_kernel: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.block2 = nn.Conv2d(channels, channels, kernel_size=second_kernel, padding=second_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(F.relu(self.block1(x)))


class _Stage(nn.Module):
    """One stage: optional 2x average pooling, then (full) a 1x1 conv if the width changes and residual blocks,
    or (light) 1x1 squeeze, residual blocks, 1x1 widen."""

    def __init__(self, c_in: int, c_out: int, pool: bool, num_res_blocks: int, light: bool):
        super().__init__()
        self.pool = pool
        inner = c_out // LIGHT_SQUEEZE if light else c_out
        self.in_conv = nn.Conv2d(c_in, inner, kernel_size=1) if light or c_in != c_out else None
        self.resnets = nn.Sequential(*[_ResBlock(inner, 3 if light else 1) for _ in range(num_res_blocks)])
        self.out_conv = nn.Conv2d(inner, c_out, kernel_size=1) if light else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:  # ceil_mode: an odd side keeps its last row (diffusers AdapterBlock)
            x = F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
        if self.in_conv is not None:
            x = self.in_conv(x)
        x = self.resnets(x)
        return self.out_conv(x) if self.out_conv is not None else x


class T2IAdapter(nn.Module):
    """A T2I-Adapter: condition image (B, C, H, W) in [0, 1] → one feature map per UNet down block.

    Call it once per image; its :class:`~controlnet.residuals.Residuals` go to every UNet step through
    ``unet_kwargs()`` (``down_intrablock_additional_residuals``, a fresh list each time: the UNet consumes it).
    ``scale`` multiplies every feature map (diffusers' ``adapter_conditioning_scale``).
    """

    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        self.config = config
        c = config
        light = c.adapter_type == "light_adapter"
        self.conv_in = None if light else nn.Conv2d(c.in_channels * c.downscale_factor**2, c.channels[0], 3, padding=1)
        self.body = nn.ModuleList([_Stage(a, b, pool, c.num_res_blocks, light) for a, b, pool in c.stages()])

    @property
    def dtype(self) -> torch.dtype:
        return self.body[0].resnets[0].block1.weight.dtype

    def forward(self, image: torch.Tensor, scale: float = 1.0) -> Residuals:
        """The feature maps of ``image`` (B, C, H, W) in [0, 1], times ``scale``, as ``("down_intrablock", i)``
        residuals (one per stage, in the order the UNet's down blocks add them)."""
        side = self.config.downscale_factor
        if image.ndim != 4 or image.shape[1] != self.config.in_channels:
            raise UserError(f"the T2I-Adapter takes (B, {self.config.in_channels}, H, W) images, got "
                            f"{tuple(image.shape)}")
        if image.shape[2] % side or image.shape[3] % side:
            raise UserError(f"the T2I-Adapter needs image sides divisible by {side}, got "
                            f"{image.shape[3]}x{image.shape[2]}; resize the condition")
        x = F.pixel_unshuffle(image.to(self.dtype), side)  # (B, C*s*s, H/s, W/s)
        if self.conv_in is not None:
            x = self.conv_in(x)
        features = []
        for stage in self.body:
            x = stage(x)
            features.append(x if scale == 1.0 else x * scale)
        return Residuals({(DOWN_INTRABLOCK, i): f for i, f in enumerate(features)})

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write diffusers' folder layout atomically (``T2IAdapter.from_pretrained`` reads it)."""
        from safetensors.torch import save_file

        path = Path(directory).expanduser()
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} exists and is a file; choose a folder name for the T2I-Adapter")
        tensors = {DIFFUSERS_PREFIX + k: v.detach().to("cpu", dtype or v.dtype).contiguous()
                   for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            tmp.mkdir()
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        return path


def save_original(adapter: T2IAdapter, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``adapter`` in TencentARC's layout (``conv_in.*``, ``body.*``), one ``.safetensors`` or ``.pth`` file
    by the suffix of ``path``, atomically (:func:`native_to_original`)."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    if path.suffix.lower() not in (".safetensors", ".pth", ".pt", ".ckpt"):
        raise UserError(f"{path}: the original T2I-Adapter layout is one .safetensors or .pth file")
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
               for k, v in native_to_original(adapter.state_dict(), adapter.config).items()}
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
    return path


# --------------------------------------------------------------------------------------------- layouts


def _original_module_map(config: T2IAdapterConfig) -> dict[str, str]:
    """TencentARC module path → ours, for every module of ``config``'s adapter."""
    n = config.num_res_blocks
    m = {"conv_in": "conv_in"}
    for i, _ in enumerate(config.stages()):
        for j in range(n):
            if config.adapter_type == "light_adapter":  # extractor: in_conv, body (Sequential), out_conv
                m[f"body.{i}.body.{j}"] = f"body.{i}.resnets.{j}"
            else:  # one flat list of ResnetBlocks, the first of a stage holding its in_conv
                m[f"body.{i * n + j}.block1"] = f"body.{i}.resnets.{j}.block1"
                m[f"body.{i * n + j}.block2"] = f"body.{i}.resnets.{j}.block2"
        if config.adapter_type == "light_adapter":
            m[f"body.{i}.in_conv"] = f"body.{i}.in_conv"
            m[f"body.{i}.out_conv"] = f"body.{i}.out_conv"
        else:
            m[f"body.{i * n}.in_conv"] = f"body.{i}.in_conv"
    return m


def _rename(state_dict: Mapping[str, torch.Tensor], mapping: Mapping[str, str], name: str) -> StateDict:
    """Every key renamed by its longest module prefix in ``mapping``; keys without one are refused."""
    from controlnet.checkpoints import _rename_all

    return _rename_all(state_dict, mapping, f"{name}: {{n}} keys are not a T2I-Adapter's, e.g. {{examples}}")


def original_to_native(state_dict: Mapping[str, torch.Tensor], config: T2IAdapterConfig, name: str = "state dict") -> StateDict:
    """Rename a TencentARC-layout adapter state dict to our (diffusers without ``adapter.``) layout."""
    return _rename(state_dict, _original_module_map(config), name)


def native_to_original(state_dict: Mapping[str, torch.Tensor], config: T2IAdapterConfig) -> StateDict:
    """Our adapter state dict in TencentARC's layout (as the released ``t2iadapter_*.pth`` files)."""
    return _rename(state_dict, {v: k for k, v in _original_module_map(config).items()}, "T2I-Adapter")


def _layout(sd: Mapping[str, torch.Tensor]) -> str:
    """"diffusers", "native" or "original" from the keys."""
    if any(k.startswith(DIFFUSERS_PREFIX) for k in sd):
        return "diffusers"
    if any(".resnets." in k for k in sd):
        return "native"
    return "original"


def infer_config(sd: Mapping[str, torch.Tensor], layout: str, name: str = "state dict") -> T2IAdapterConfig:
    """The config of an adapter state dict (``layout`` "native" or "original") from its shapes.

    What shapes cannot tell is read as the releases have it: the full adapters' unshuffle factor from the input
    width (1 or 3 image channels: 64 or 192 is SD's 8x, 256 or 768 SDXL's 16x, which also says full_adapter_xl).
    """
    light = "body.0.in_conv.weight" in sd and "conv_in.weight" not in sd
    if light:
        stages = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"body\.(\d+)\.out_conv\.weight", k))})
        blocks = {m.group(1) for k in sd if (m := re.match(r"body\.0\.(?:resnets|body)\.(\d+)\.", k))}
        channels = tuple(sd[f"body.{i}.out_conv.weight"].shape[0] for i in stages)[:-1]
        unshuffled = sd["body.0.in_conv.weight"].shape[1]
        kind, factor = "light_adapter", SD_DOWNSCALE
        in_channels = unshuffled // factor**2
    else:
        if "conv_in.weight" not in sd:
            raise UserError(f"{name}: no conv_in.weight or body.0.in_conv.weight; not a T2I-Adapter")
        unshuffled = sd["conv_in.weight"].shape[1]
        if layout == "native":
            stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"body\.(\d+)\.resnets\.0\.block1\.weight$", k))})
            blocks = {m.group(1) for k in sd if (m := re.match(r"body\.0\.resnets\.(\d+)\.block1\.weight$", k))}
            widths = [sd[f"body.{i}.resnets.0.block1.weight"].shape[0] for i in stages]
        else:  # one flat list of blocks: the first with an in_conv (the width changes) starts stage 1
            flat = sorted({int(m.group(1)) for k in sd if (m := re.match(r"body\.(\d+)\.block1\.weight$", k))})
            blocks = {str(j) for j in range(next((i for i in flat[1:] if f"body.{i}.in_conv.weight" in sd), len(flat)))}
            n = len(blocks)
            stages = list(range(len(flat) // n)) if n and len(flat) % n == 0 else []
            widths = [sd[f"body.{i * n}.block1.weight"].shape[0] for i in stages]
        kind, factor = _full_kind(unshuffled, name)
        channels, in_channels = tuple(widths), unshuffled // factor**2
    if not stages or not blocks:
        raise UserError(f"{name}: cannot find the adapter's stages from its keys; pass its config.json")
    try:
        return T2IAdapterConfig(in_channels, channels, len(blocks), factor, kind)
    except UserError as err:
        raise UserError(f"{name}: {err} (inferred from the tensor shapes); pass its config.json") from None


def _full_kind(unshuffled: int, name: str) -> tuple[str, int]:
    for kind, factor in (("full_adapter", SD_DOWNSCALE), ("full_adapter_xl", SDXL_DOWNSCALE)):
        if unshuffled % factor**2 == 0 and unshuffled // factor**2 in IMAGE_CHANNELS:
            return kind, factor
    raise UserError(f"{name}: conv_in takes {unshuffled} channels, which is no released T2I-Adapter's "
                    "(64/192 for SD, 256/768 for SDXL); pass its config.json")


# --------------------------------------------------------------------------------------------- fitting a base


def feature_layout(config: T2IAdapterConfig) -> list[tuple[int, int]]:
    """(channels, downsampling relative to the latent) of each feature map, for an 8x VAE."""
    layout, factor = [], config.downscale_factor // LATENT_DOWNSCALE
    for _, c_out, pool in config.stages():
        factor *= 2 if pool else 1
        layout.append((c_out, factor))
    return layout


def unet_intrablock_layout(unet_config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(channels, downsampling relative to the latent) a diffusers UNet2DConditionModel adds each feature at.

    A cross-attention down block adds its feature before its downsampler, a plain one after it (the last block
    has none); a feature left over after the down blocks goes to the mid block if its shape fits
    (``UNet2DConditionModel.forward``, ``down_intrablock_additional_residuals``).
    """
    types, widths = unet_config["down_block_types"], unet_config["block_out_channels"]
    last = len(widths) - 1
    places = [(w, 2 ** i if "CrossAttn" in t or i == last else 2 ** (i + 1))
              for i, (t, w) in enumerate(zip(types, widths))]
    return places + [(widths[-1], 2**last)]


def check_compatible(adapter: T2IAdapter | T2IAdapterConfig, unet_config: Mapping[str, Any]) -> None:
    """Refuse, in one line, an adapter whose feature maps do not land where ``unet_config``'s UNet adds them
    (an SDXL adapter on an SD1.x base, or the reverse). The mid block's place is optional."""
    config = adapter.config if isinstance(adapter, T2IAdapter) else adapter
    features, places = feature_layout(config), unet_intrablock_layout(unet_config)
    num_blocks = len(places) - 1
    fits = len(features) in (num_blocks, num_blocks + 1) and features == places[: len(features)]
    if not fits:
        from controlnet.checkpoints import detect_family

        try:
            base = detect_family(dict(unet_config))
        except (UserError, KeyError, TypeError):
            base = "unknown family"
        raise UserError(
            f"this T2I-Adapter for {adapter_family(config)} ({config.adapter_type}, feature widths "
            f"{[c for c, _ in features]}) does not fit the base model, {base} (block widths "
            f"{list(unet_config['block_out_channels'])}); use an adapter made for this base "
            "(full_adapter/light_adapter for SD1.x, full_adapter_xl for SDXL)")


def adapter_family(config: T2IAdapterConfig) -> str:
    """The base family a released adapter type is made for: "sdxl" (full_adapter_xl) or "sd1/sd2"."""
    return "sdxl" if config.adapter_type == "full_adapter_xl" else "sd1/sd2"


# --------------------------------------------------------------------------------------------- loading


def t2i_adapter_from_state_dict(state_dict: Mapping[str, Any], config: T2IAdapterConfig | Mapping[str, Any] | None = None,
                                name: str = "state dict") -> T2IAdapter:
    """An adapter holding ``state_dict``'s tensors (TencentARC's or diffusers' layout), loaded strictly.

    Without ``config`` it is inferred from the shapes (:func:`infer_config`). Missing, extra, mis-shaped or
    non-finite tensors are a one-line :class:`UserError` naming ``name``.
    """
    from controlnet.checkpoints import check_tensors

    sd = dict(state_dict)
    if isinstance(sd.get("adapter"), Mapping):  # some releases nest the weights under "adapter"
        sd = dict(sd["adapter"])
    layout = _layout(sd)
    if layout == "diffusers":
        sd, layout = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in sd.items()}, "native"
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{name}: entries that are not tensors: {', '.join(sorted(bad)[:3])}")
    if isinstance(config, Mapping):
        config = T2IAdapterConfig.from_dict(config, name)
    config = config or infer_config(sd, layout, name)
    if layout == "original":
        sd = original_to_native(sd, config, name)
    with torch.device("meta"):
        adapter = T2IAdapter(config)
    expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    check_tensors(sd, expected, name, f"{config.adapter_type} T2I-Adapter")
    adapter.load_state_dict(sd, strict=True, assign=True)
    return adapter


def load_t2i_adapter(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> T2IAdapter:
    """Load a T2I-Adapter, in eval mode, from a diffusers folder (config.json + weights) or a single TencentARC
    ``.pth``/``.safetensors`` file (config inferred from its shapes). A file of another family is refused in one
    line naming both."""
    from controlnet.checkpoints import _read_file, read_safetensors
    from controlnet.families import require_family

    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist; give a T2I-Adapter file or diffusers folder")
    config = None
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise UserError(f"{path} has no {CONFIG_NAME}; give a diffusers T2I-Adapter folder or a .pth/.safetensors file")
        try:
            config = T2IAdapterConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()), str(path / CONFIG_NAME))
        except (OSError, ValueError) as err:
            raise UserError(f"{path / CONFIG_NAME} is not a readable JSON config: {err}") from None
        weights = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise UserError(f"{path} has no {' / '.join(WEIGHT_NAMES)}")
        path = weights
    raw = read_safetensors(path) if path.suffix == ".safetensors" else _read_file(path)
    require_family(raw, "t2i-adapter", str(path))
    return t2i_adapter_from_state_dict(raw, config, str(path)).to(device=device, dtype=dtype).eval()
