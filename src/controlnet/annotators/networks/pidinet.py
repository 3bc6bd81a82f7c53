"""PiDiNet soft edges (Su et al., "Pixel Difference Networks for Efficient Edge Detection", ICCV 2021), the
``table5_pidinet.pth`` model ControlNet 1.1 uses (ControlNet-v1-1-nightly ``annotator/pidinet/model.py``:
``PiDiNet(60, config_model('carv4'), dil=24, sa=True)``, not converted).

Sixteen pixel-difference convolutions (PDC) are evaluated at run time from the stored 3x3 kernels, in the
paper's ``carv4`` pattern ``[cd, ad, rd, cv] x 4``:

* ``cd`` (central difference): sum over taps of w_i (x_i - x_centre) = conv(x, w) - conv(x, sum(w)).
* ``ad`` (angular difference): differences between clockwise neighbours, w - w[clockwise permutation].
* ``rd`` (radial difference): a 5x5 kernel, outer ring minus inner ring (padding 2).
* ``cv``: a plain convolution.

Layer 0 is the full 3→60 ``init_block``; layers 1-15 are the depthwise ``conv1`` of the residual blocks
``block1_1 .. block4_4`` (three stages that halve the resolution by max-pooling). Each stage output goes through
CDCM (dilated convs), CSAM (spatial attention) and MapReduce (1x1 to one channel), is upsampled to the input size,
and a 1x1 ``classifier`` fuses the four pre-sigmoid maps. Parameter names follow the released file, minus its
DataParallel ``module.`` prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The carv4 configuration (pidinet config.py): PDC type of layers 0..15.
CARV4 = ("cd", "ad", "rd", "cv") * 4
PDC_TYPES = ("cv", "cd", "ad", "rd")
INPLANE = 60  # pidinet(): PiDiNet(60, ...)
DILATION_CHANNELS = 24  # pidinet(): dil=24, the CDCM width
CDCM_DILATIONS = (5, 7, 9, 11)  # model.py CDCM conv2_1..conv2_4
CSAM_CHANNELS = 4  # model.py CSAM mid_channels
# ad: each 3x3 tap minus its clockwise neighbour; index i of the flattened kernel takes this tap (model.py).
AD_CLOCKWISE = (3, 0, 1, 6, 4, 2, 7, 8, 5)
# rd: a 3x3 kernel's 8 outer taps go to the 5x5 kernel's outer ring (+w) and inner ring (-w) (model.py).
RD_OUTER = (0, 2, 4, 10, 14, 20, 22, 24)
RD_INNER = (6, 7, 8, 11, 13, 16, 17, 18)
# Residual blocks per stage: (name, input channels, output channels, stride) → layers 1..15 in order.
STAGES = (
    (("block1_1", 60, 60, 1), ("block1_2", 60, 60, 1), ("block1_3", 60, 60, 1)),
    (("block2_1", 60, 120, 2), ("block2_2", 120, 120, 1), ("block2_3", 120, 120, 1), ("block2_4", 120, 120, 1)),
    (("block3_1", 120, 240, 2), ("block3_2", 240, 240, 1), ("block3_3", 240, 240, 1), ("block3_4", 240, 240, 1)),
    (("block4_1", 240, 240, 2), ("block4_2", 240, 240, 1), ("block4_3", 240, 240, 1), ("block4_4", 240, 240, 1)),
)


def pixel_difference_conv(x: torch.Tensor, weight: torch.Tensor, pdc: str, groups: int = 1) -> torch.Tensor:
    """Convolve ``x`` with the 3x3 ``weight`` (out, in/groups, 3, 3) as pixel-difference type ``pdc``, stride 1,
    size kept."""
    if pdc == "cv":
        return F.conv2d(x, weight, padding=1, groups=groups)
    if pdc == "cd":
        centre = weight.sum(dim=(2, 3), keepdim=True)  # (out, in, 1, 1)
        return F.conv2d(x, weight, padding=1, groups=groups) - F.conv2d(x, centre, groups=groups)
    out_c, in_c = weight.shape[:2]
    flat = weight.reshape(out_c, in_c, 9)
    if pdc == "ad":
        kernel = (flat - flat[:, :, list(AD_CLOCKWISE)]).reshape(weight.shape)
        return F.conv2d(x, kernel, padding=1, groups=groups)
    if pdc == "rd":
        kernel = weight.new_zeros(out_c, in_c, 25)
        kernel[:, :, list(RD_OUTER)] = flat[:, :, 1:]
        kernel[:, :, list(RD_INNER)] = -flat[:, :, 1:]
        return F.conv2d(x, kernel.reshape(out_c, in_c, 5, 5), padding=2, groups=groups)
    raise ValueError(f"unknown pixel-difference convolution {pdc!r}; expected one of {', '.join(PDC_TYPES)}")


class PixelDifferenceConv(nn.Module):
    """A bias-free 3x3 convolution whose kernel is read as pixel differences of type ``pdc`` at run time."""

    def __init__(self, pdc: str, in_channels: int, out_channels: int, groups: int = 1) -> None:
        super().__init__()
        if pdc not in PDC_TYPES:
            raise ValueError(f"unknown pixel-difference convolution {pdc!r}; expected one of {', '.join(PDC_TYPES)}")
        self.pdc, self.groups = pdc, groups
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels // groups, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_difference_conv(x, self.weight, self.pdc, self.groups)


class PDCBlock(nn.Module):
    """x → (max-pool 2 if strided) → depthwise PDC → ReLU → 1x1 conv, plus x (1x1 ``shortcut`` if strided)."""

    def __init__(self, pdc: str, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.conv1 = PixelDifferenceConv(pdc, in_channels, in_channels, groups=in_channels)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class CDCM(nn.Module):
    """Compact dilation convolution module: ReLU, 1x1 to 24 channels, sum of four dilated 3x3 convs."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        for i, d in enumerate(CDCM_DILATIONS, start=1):
            self.add_module(f"conv2_{i}", nn.Conv2d(out_channels, out_channels, 3, dilation=d, padding=d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class CSAM(nn.Module):
    """Compact spatial attention module: x times sigmoid(conv3x3(conv1x1(ReLU(x))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, CSAM_CHANNELS, 1)
        self.conv2 = nn.Conv2d(CSAM_CHANNELS, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class MapReduce(nn.Module):
    """1x1 convolution to a single edge-logit map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """``(B, 3, H, W)`` **BGR** in 0..1 → ``[side1, side2, side3, side4, fused]``, each ``(B, 1, H, W)`` in 0..1."""

    def __init__(self, pdcs: tuple[str, ...] = CARV4) -> None:
        super().__init__()
        if len(pdcs) != 16:
            raise ValueError(f"PiDiNet needs 16 pixel-difference types (layers 0..15), got {len(pdcs)}")
        self.init_block = PixelDifferenceConv(pdcs[0], 3, INPLANE)
        layer = 1
        self.stage_names: list[list[str]] = []
        for stage in STAGES:
            names = []
            for name, cin, cout, stride in stage:
                self.add_module(name, PDCBlock(pdcs[layer], cin, cout, stride))
                names.append(name)
                layer += 1
            self.stage_names.append(names)
        widths = [stage[-1][2] for stage in STAGES]  # 60, 120, 240, 240
        self.conv_reduces = nn.ModuleList(MapReduce(DILATION_CHANNELS) for _ in widths)
        self.attentions = nn.ModuleList(CSAM(DILATION_CHANNELS) for _ in widths)
        self.dilations = nn.ModuleList(CDCM(w, DILATION_CHANNELS) for w in widths)
        self.classifier = nn.Conv2d(len(widths), 1, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = x.shape[2:]
        h = self.init_block(x)  # (B, 60, H, W)
        logits = []
        for i, names in enumerate(self.stage_names):
            for name in names:
                h = getattr(self, name)(h)  # (B, C_i, H / 2**i, W / 2**i)
            side = self.conv_reduces[i](self.attentions[i](self.dilations[i](h)))  # (B, 1, ...)
            logits.append(F.interpolate(side, size, mode="bilinear", align_corners=False))
        logits.append(self.classifier(torch.cat(logits, dim=1)))  # fused, from the pre-sigmoid side maps
        return [torch.sigmoid(t) for t in logits]
