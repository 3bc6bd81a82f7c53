"""The hint encoder E(c) of a ControlNet: the condition image, at image resolution, to the latent grid.

Zhang et al. 2023, Sec. 3.2: "a tiny network E(·) of four convolution layers" encodes the image-space condition
c_i into a feature map c_f the size of the latents, which enters the trainable copy through a zero layer. Two
layouts exist: the one every released checkpoint has (:class:`HintEncoder`) and the one the paper's text
describes (:class:`PaperHintEncoder`). Both end in a zero-initialised conv, so a new ControlNet starts as the
locked base.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from controlnet.model_config import PAPER_HINT_CHANNELS, RELEASED_HINT_CHANNELS, ControlNetConfig


class HintEncoder(nn.Module):
    """The released hint encoder E(c): image-space condition (B, 3, H, W) → (B, C0, H/s, W/s).

    Layout of every released checkpoint (cldm.py ``input_hint_block``, diffusers
    ``ControlNetConditioningEmbedding``): conv 3→c0, then for each consecutive pair (a, b) of ``channels`` a
    3x3 conv a→a and a stride-2 3x3 conv a→b, SiLU after each; then a zero-initialised 3x3 conv to C0. So
    ``len(channels) - 1`` stride-2 convs: 3 for (16, 32, 96, 256), matching the VAE's 8x downsampling.
    """

    def __init__(self, out_channels: int, conditioning_channels: int = 3, channels: Sequence[int] = RELEASED_HINT_CHANNELS):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(hint))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class PaperHintEncoder(nn.Module):
    """The hint encoder as the paper's text describes it (Sec. 3.2), an option for new training runs.

    "Four convolution layers with 4x4 kernels and 2x2 strides (activated by ReLU, channels are 16, 32, 64,
    128, initialised with Gaussian weights, trained jointly with the full model)". Four stride-2 convs would
    downsample 16x, not the VAE's 8x (512 → 64), so only the last log2(vae_scale_factor) convs use stride 2
    and the first ones stride 1 (4x4 kernels with asymmetric padding keep the size). The encoder's output
    enters through a zero 1x1 conv, the paper's Z(c; Θz1), so the model still starts as the locked base.
    """

    GAUSSIAN_STD = 0.02  # the paper says "Gaussian weights" without a value; 0.02 is the usual choice.

    def __init__(self, out_channels: int, conditioning_channels: int = 3, channels: Sequence[int] = PAPER_HINT_CHANNELS, vae_scale_factor: int = 8):
        super().__init__()
        num_down = vae_scale_factor.bit_length() - 1
        if 2**num_down != vae_scale_factor or num_down > len(channels):
            raise ValueError(f"the paper's hint encoder has {len(channels)} convs; cannot downsample {vae_scale_factor}x")
        self.stride2 = [i >= len(channels) - num_down for i in range(len(channels))]
        layers = []
        c_in = conditioning_channels
        for c_out, s2 in zip(channels, self.stride2):
            conv = nn.Conv2d(c_in, c_out, kernel_size=4, stride=2 if s2 else 1, padding=1 if s2 else 0)
            nn.init.normal_(conv.weight, std=self.GAUSSIAN_STD)
            nn.init.zeros_(conv.bias)
            layers.append(conv)
            c_in = c_out
        self.convs = nn.ModuleList(layers)
        self.conv_out = nn.Conv2d(c_in, out_channels, kernel_size=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = hint
        for conv, s2 in zip(self.convs, self.stride2):
            if not s2:
                h = F.pad(h, (1, 2, 1, 2))  # a 4x4 kernel at stride 1 needs 3 pixels of padding in total
            h = F.relu(conv(h))
        return self.conv_out(h)


def make_hint_encoder(config: ControlNetConfig) -> nn.Module:
    """The config's hint encoder E(c), its output ``block_out_channels[0]`` wide and exactly zero at init."""
    c = config
    if c.hint_encoder == "released":
        return HintEncoder(c.block_out_channels[0], c.conditioning_channels, c.conditioning_embedding_out_channels)
    return PaperHintEncoder(c.block_out_channels[0], c.conditioning_channels, c.conditioning_embedding_out_channels,
                            c.vae_scale_factor)
