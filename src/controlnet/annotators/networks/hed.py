"""HED soft edges as ControlNet 1.1 computes them: lllyasviel's Apache-2.0 re-training of HED (Xie & Tu, ICCV 2015),
``ControlNetHED_Apache2`` in ControlNet-v1-1-nightly ``annotator/hed/__init__.py``, weights ``ControlNetHED.pth``.

A VGG-16-like trunk of five blocks (2, 2, 3, 3, 3 conv3x3 + ReLU, a 2x2 max-pool before blocks 2-5); each block
ends in a 1x1 ``projection`` to one channel, the side output at strides 1, 2, 4, 8, 16. The input is RGB in
0..255 (not scaled); the network subtracts its learned per-channel ``norm`` first. Parameter names follow the
released file (``norm``, ``block{1..5}.convs.{i}``, ``block{1..5}.projection``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (input channels, output channels, conv layers) of blocks 1..5 (VGG-16's stages).
HED_BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


class HEDBlock(nn.Module):
    """``layers`` conv3x3 + ReLU, then a 1x1 projection to the block's side output (after the ReLUs)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * layers
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:]))
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            x = F.relu(conv(x), inplace=True)
        return x, self.projection(x)  # (B, C, H, W), (B, 1, H, W)


class ControlNetHED(nn.Module):
    """The ControlNet 1.1 HED network: ``(B, 3, H, W)`` RGB 0..255 → five side-output logits."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))  # learned input offset, subtracted first
        self.block1, self.block2, self.block3, self.block4, self.block5 = (HEDBlock(*spec) for spec in HED_BLOCKS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(B, 3, H, W)`` → ``projection1..5``: ``(B, 1, H / 2**k, W / 2**k)`` logits, k = 0..4."""
        h = x - self.norm
        projections = []
        for k, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            if k > 0:
                h = F.max_pool2d(h, kernel_size=2, stride=2)
            h, projection = block(h)
            projections.append(projection)
        return tuple(projections)
