"""M-LSD line segments (Gu et al., "Towards Light-weight and Real-time Line Segment Detection", AAAI 2022), in the
PyTorch port by lhwcv (github.com/lhwcv/mlsd_pytorch) that ControlNet 1.1 uses: ``MobileV2_MLSD_Large``
(``mlsd_large_512_fp32.pth``, ControlNet-v1-1-nightly ``annotator/mlsd/models/mbv2_mlsd_large.py``) and
``MobileV2_MLSD_Tiny`` (``mlsd_tiny_512_fp32.pth``, lhwcv ``models/mbv2_mlsd_tiny.py``).

Both are a MobileNetV2 trunk on a 4-channel input (RGB and a constant plane), with TFLite-style stride-2 convs
(zero pad right/bottom by one, then padding 0) and ReLU6, followed by a U-Net-like decoder of three block types:
A (1x1 convs on a skip and on the coarser map, the coarser one upsampled bilinearly with align_corners=True,
concatenated), B (residual 3x3 then 3x3) and C (dilated 3x3, 3x3, 1x1 to 16 channels). Channels 7..15 of the
result are the "TP map" at half the input resolution: a line-centre logit and four displacements
(x_start, y_start, x_end, y_end) per pixel; :func:`decode_lines` turns it into segments.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# MobileNetV2 inverted-residual settings (expansion t, channels c, repeats n, first stride s), torchvision's table
# truncated as each M-LSD variant uses it.
MBV2_LARGE = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
MBV2_TINY = MBV2_LARGE[:4]
STEM_CHANNELS = 32
INPUT_CHANNELS = 4  # R, G, B and a constant plane
# Feature indices tapped by the decoder (mbv2_mlsd_large.py / mbv2_mlsd_tiny.py fpn_selected).
TAPS_LARGE = (1, 3, 6, 10, 13)
TAPS_TINY = (3, 6, 10)
TP_MAP_FIRST_CHANNEL = 7  # x[:, 7:]: the 9 channels the decoder reads (centre logit, 4 displacements, 4 unused)


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias), BatchNorm, ReLU6; stride 2 pads right/bottom by one and uses no padding (TFLite)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = 0 if stride == 2 else (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (if t > 1), depthwise 3x3, 1x1 project + BN; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, kernel_size=1)] if expand != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Trunk(nn.Module):
    """The truncated MobileNetV2 ``features``; returns the maps at ``taps``."""

    def __init__(self, settings: tuple[tuple[int, int, int, int], ...], taps: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(INPUT_CHANNELS, STEM_CHANNELS, stride=2)]
        cin = STEM_CHANNELS
        for expand, cout, repeats, stride in settings:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.taps = taps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                maps.append(x)
        return maps


def _conv_bn_relu(cin: int, cout: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, padding=padding, dilation=dilation), nn.BatchNorm2d(cout),
                         nn.ReLU())


class BlockTypeA(nn.Module):
    """cat(1x1(skip), upsampled 1x1(coarse)): ``conv2`` acts on the skip ``a``, ``conv1`` on the coarser ``b``."""

    def __init__(self, skip_in: int, coarse_in: int, skip_out: int, coarse_out: int, upscale: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(coarse_in, coarse_out, 1)
        self.conv2 = _conv_bn_relu(skip_in, skip_out, 1)
        self.upscale = upscale

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        b = self.conv1(b)
        if self.upscale:
            b = F.interpolate(b, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat((self.conv2(a), b), dim=1)


class BlockTypeB(nn.Module):
    """x + conv3x3(x), then conv3x3 to ``cout`` (each conv with BN and ReLU)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin, cin, 3)
        self.conv2 = _conv_bn_relu(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class BlockTypeC(nn.Module):
    """Dilated (5) conv3x3, conv3x3 (each with BN and ReLU), then a 1x1 conv to ``cout``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin, cin, 3, dilation=5)
        self.conv2 = _conv_bn_relu(cin, cin, 3)
        self.conv3 = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class MLSDLarge(nn.Module):
    """M-LSD large: ``(B, 4, H, W)`` in -1..1 → TP map ``(B, 9, H/2, W/2)``. H and W must be multiples of 32."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = MobileNetV2Trunk(MBV2_LARGE, TAPS_LARGE)
        self.block15 = BlockTypeA(64, 96, 64, 64, upscale=False)  # c4 (64 ch) and c5 (96 ch) share stride 16
        self.block16 = BlockTypeB(128, 64)
        self.block17 = BlockTypeA(32, 64, 64, 64)
        self.block18 = BlockTypeB(128, 64)
        self.block19 = BlockTypeA(24, 64, 64, 64)
        self.block20 = BlockTypeB(128, 64)
        self.block21 = BlockTypeA(16, 64, 64, 64)
        self.block22 = BlockTypeB(128, 64)
        self.block23 = BlockTypeC(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.backbone(x)  # strides 2, 4, 8, 16, 16
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, TP_MAP_FIRST_CHANNEL:]  # (B, 9, H/2, W/2)


class MLSDTiny(nn.Module):
    """M-LSD tiny: ``(B, 4, H, W)`` in -1..1 → TP map ``(B, 9, H/2, W/2)``. H and W must be multiples of 16."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = MobileNetV2Trunk(MBV2_TINY, TAPS_TINY)
        self.block12 = BlockTypeA(32, 64, 64, 64)
        self.block13 = BlockTypeB(128, 64)
        self.block14 = BlockTypeA(24, 64, 32, 32)
        self.block15 = BlockTypeB(64, 64)
        self.block16 = BlockTypeC(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c2, c3, c4 = self.backbone(x)  # strides 4, 8, 16
        x = self.block13(self.block12(c3, c4))
        x = self.block16(self.block15(self.block14(c2, x)))
        x = x[:, TP_MAP_FIRST_CHANNEL:]  # (B, 9, H/4, W/4)
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)  # (B, 9, H/2, W/2)


# --- decoding (mlsd_pytorch utils.py: deccode_output_score_and_ptss + pred_lines) -------------------------------

TOP_K = 200  # candidate line centres kept (pred_lines: deccode_output_score_and_ptss(outputs, 200, 3))
PEAK_WINDOW = 3  # a centre must be the maximum of its 3x3 neighbourhood
TP_MAP_STRIDE = 2  # the TP map is at half the input resolution


def line_centres(tp_map: torch.Tensor, top_k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` strongest local maxima of sigmoid(centre logit) of a ``(1, 9, h, w)`` TP map:
    ``(K, 2)`` int64 (row, column) and ``(K,)`` float32 scores, strongest first (non-maxima score 0)."""
    heat = torch.sigmoid(tp_map[:, 0])  # (1, h, w)
    peaks = F.max_pool2d(heat, PEAK_WINDOW, stride=1, padding=PEAK_WINDOW // 2)
    heat = (heat * (peaks == heat).float()).reshape(-1)
    scores, indices = torch.topk(heat, min(top_k, heat.numel()))
    width = tp_map.shape[3]
    rows_cols = torch.stack([torch.div(indices, width, rounding_mode="floor"), indices % width], dim=1)
    return rows_cols.cpu().numpy(), scores.cpu().numpy()


def decode_lines(tp_map: torch.Tensor, score_threshold: float, distance_threshold: float,
                 scale_x: float = 1.0, scale_y: float = 1.0) -> np.ndarray:
    """Segments ``(N, 4)`` float64 ``x_start, y_start, x_end, y_end`` in input pixels from a ``(1, 9, h, w)`` TP map.

    A candidate centre (see :func:`line_centres`) is kept when its score > ``score_threshold`` (ControlNet 1.1's
    ``thr_v``) and its start-end distance in TP-map pixels > ``distance_threshold`` (``thr_d``). Coordinates are
    doubled (half-resolution map) and multiplied by ``scale_x``/``scale_y`` (output size / network input size).
    """
    centres, scores = line_centres(tp_map)
    displacement = tp_map[0, 1:5].permute(1, 2, 0).cpu().numpy()  # (h, w, 4): dx0, dy0, dx1, dy1
    lengths = np.sqrt(np.sum((displacement[:, :, :2] - displacement[:, :, 2:]) ** 2, axis=-1))  # (h, w)
    segments = []
    for (y, x), score in zip(centres, scores):
        if score > score_threshold and lengths[y, x] > distance_threshold:
            dx0, dy0, dx1, dy1 = displacement[y, x]
            segments.append([x + dx0, y + dy0, x + dx1, y + dy1])
    lines = TP_MAP_STRIDE * np.asarray(segments, dtype=np.float64).reshape(-1, 4)
    return lines * np.array([scale_x, scale_y, scale_x, scale_y])
