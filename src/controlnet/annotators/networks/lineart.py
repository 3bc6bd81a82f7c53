"""The ControlNet 1.1 lineart network: the generator of "informative drawings" (Chan, Durand, Isola, CVPR 2022),
``Generator(3, 1, 3)`` in ControlNet-v1-1-nightly ``annotator/lineart/__init__.py``; weights ``sk_model.pth``
(realistic line art) and ``sk_model2.pth`` (coarse), both with this layout.

A ResNet-style image-to-image generator: 7x7 stem, two stride-2 convs down, three residual blocks, two transposed
convs up, a 7x7 conv to one channel and a sigmoid. Reflection padding and instance norm without affine parameters
(so no norm entries in the state dict). The output is a drawing: dark lines on white, in 0..1. Module indices
follow the released file (``model0.1``, ``model1.0``/``model1.3``, ``model2.N.conv_block.1``/``.5``, ...).
H and W must be multiples of 4 (two stride-2 levels).
"""

from __future__ import annotations

import torch
from torch import nn

STEM, DOWN, UP = 64, (128, 256), (128, 64)  # channel widths of the released generator
RESIDUAL_BLOCKS = 3  # Generator(3, 1, n_residual_blocks=3)


class ResidualBlock(nn.Module):
    """x + [pad, conv3x3, IN, ReLU, pad, conv3x3, IN](x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


def _down(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.InstanceNorm2d(cout), nn.ReLU()]


def _up(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(cout), nn.ReLU()]


class LineartGenerator(nn.Module):
    """``(B, 3, H, W)`` RGB in 0..1 → ``(B, 1, H, W)`` line drawing in 0..1 (lines dark)."""

    def __init__(self) -> None:
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, STEM, 7), nn.InstanceNorm2d(STEM), nn.ReLU())
        self.model1 = nn.Sequential(*_down(STEM, DOWN[0]), *_down(DOWN[0], DOWN[1]))
        self.model2 = nn.Sequential(*(ResidualBlock(DOWN[1]) for _ in range(RESIDUAL_BLOCKS)))
        self.model3 = nn.Sequential(*_up(DOWN[1], UP[0]), *_up(UP[0], UP[1]))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(UP[1], 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))
