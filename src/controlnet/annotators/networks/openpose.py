"""The OpenPose body and hand networks as ControlNet 1.1's openpose annotator runs them: CMU's COCO body model
(Cao et al., "Realtime Multi-Person 2D Pose Estimation using Part Affinity Fields", CVPR 2017) and hand model
(Simon et al., "Hand Keypoint Detection in Single Images using Multiview Bootstrapping", CVPR 2017), as ported to
PyTorch by Hzzone/pytorch-openpose and used in ControlNet-v1-1-nightly ``annotator/openpose`` (``model.py``,
``body.py``, ``hand.py``); weights ``body_pose_model.pth`` and ``hand_pose_model.pth``.

Both are plain conv stacks: a VGG-19 front to 128 channels at stride 8, then refinement stages of 7x7 convs that
each see the front's features and the previous stage's maps. The body net has two branches per stage: part
affinity fields (PAFs, 38 = 19 limbs x (x, y)) and heatmaps (19 = 18 COCO parts + background). The hand net has
one: 22 heatmaps (21 keypoints + background). Every conv is followed by a ReLU except the last of each branch, with
one upstream quirk kept: the body's final heatmap conv (``Mconv7_stage6_L2``) *does* get a ReLU, because the
original ``no_relu_layers`` list names ``Mconv7_stage6_L1`` twice instead.

Module names follow the original (``model0.conv1_1``, ``model2_1.Mconv1_stage2_L1``, ``model1_0.conv5_3_CPM``,
...). The released files store the layer names without the first component (``conv1_1.weight``); the original
loader (``util.transfer``) reads model key ``model0.conv1_1.weight`` from file key ``conv1_1.weight``, and so do
:func:`body_state_dict` / :func:`hand_state_dict`, which :func:`controlnet.annotators.networks.load_network`
applies (``load_network("openpose_body", "body_pose_model.pth")``).

This module also turns an image into network input and the network output back into full-size maps
(:func:`body_maps`, :func:`hand_heatmaps`); the keypoint extraction is numpy code in
:mod:`controlnet.annotators.openpose`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torch import nn


# One conv layer: (name, input channels, output channels, kernel size); padding keeps the size (k // 2).
Layer = tuple[str, int, int, int]
POOL = None  # a 2x2 max-pool (stride 2) in a layer table

# model.py bodypose_model block1_0: VGG-19 conv1_1..conv4_2, then two CPM convs down to 128 channels.
BODY_FRONT: tuple[Layer | None, ...] = (
    ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), POOL,
    ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), POOL,
    ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3), POOL,
    ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3),
)  # fmt: skip
# model.py handpose_model block1_0: VGG-19 conv1_1..conv5_2, then conv5_3_CPM down to 128 channels.
HAND_FRONT: tuple[Layer | None, ...] = (
    ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), POOL,
    ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), POOL,
    ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3), POOL,
    ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3", 512, 512, 3), ("conv4_4", 512, 512, 3),
    ("conv5_1", 512, 512, 3), ("conv5_2", 512, 512, 3), ("conv5_3_CPM", 512, 128, 3),
)  # fmt: skip
FEATURES = 128  # channels of the VGG front's output (stride 8)
PAF_CHANNELS = 38  # 19 limbs x (x, y)
BODY_HEATMAPS = 19  # 18 COCO parts + background
HAND_HEATMAPS = 22  # 21 hand keypoints + background
STAGES = 6  # the first stage and five refinement stages
REFINE_WIDTH = 128  # channels inside a refinement stage
STRIDE = 8  # the network's output stride (three max-pools)

# Input preparation shared by body.py and hand.py: images scaled to a box of 368 px, padded to a multiple of the
# stride with grey 128, then BGR float / 256 - 0.5.
BOX_SIZE = 368
PAD_VALUE = 128
BODY_SCALE = 0.5  # body.py scale_search = [0.5] (one scale)
HAND_SCALES = (0.5, 1.0, 1.5, 2.0)  # hand.py scale_search
HAND_BLUR_SIGMA = 0.8  # hand.py: cv2.GaussianBlur(crop, (0, 0), 0.8) before scaling (at the fixture commit)
HAND_MAP_SIZE = 128  # hand.py wsize: heatmaps are averaged at 128 x 128


def _sequence(layers: Sequence[Layer | None], last_relu: bool) -> nn.Sequential:
    """Convs (each with a ReLU, the last one only if ``last_relu``) and 2x2 max-pools, named as in model.py."""
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for i, layer in enumerate(layers):
        if layer is POOL:
            modules[f"pool{i}"] = nn.MaxPool2d(kernel_size=2, stride=2)
            continue
        name, cin, cout, k = layer
        modules[name] = nn.Conv2d(cin, cout, k, padding=k // 2)
        if i < len(layers) - 1 or last_relu:
            modules[f"relu_{name}"] = nn.ReLU(inplace=True)
    return nn.Sequential(modules)


def _refine_stage(stage: int, suffix: str, inputs: int, outputs: int) -> list[Layer]:
    """A refinement stage (model.py ``Mconv1..7_stageN``): five 7x7 convs, a 1x1 conv, a 1x1 conv to ``outputs``."""
    tag = f"stage{stage}{suffix}"
    layers = [(f"Mconv1_{tag}", inputs, REFINE_WIDTH, 7)]
    layers += [(f"Mconv{i}_{tag}", REFINE_WIDTH, REFINE_WIDTH, 7) for i in range(2, 6)]
    layers += [(f"Mconv6_{tag}", REFINE_WIDTH, REFINE_WIDTH, 1), (f"Mconv7_{tag}", REFINE_WIDTH, outputs, 1)]
    return layers


def body_layout() -> dict[str, tuple[list[Layer | None], bool]]:
    """The body network as ``{module name: (layers, ReLU after the last conv)}``, in model.py's order (all PAF
    stages ``modelN_1``, then all heatmap stages ``modelN_2``): the state dict's key order."""
    layout: dict[str, tuple[list[Layer | None], bool]] = {"model0": (list(BODY_FRONT), True)}
    inputs = PAF_CHANNELS + BODY_HEATMAPS + FEATURES  # 185: both branches' maps and the features
    for branch, outputs in ((1, PAF_CHANNELS), (2, BODY_HEATMAPS)):
        s = f"L{branch}"
        layout[f"model1_{branch}"] = ([
            (f"conv5_1_CPM_{s}", FEATURES, FEATURES, 3), (f"conv5_2_CPM_{s}", FEATURES, FEATURES, 3),
            (f"conv5_3_CPM_{s}", FEATURES, FEATURES, 3), (f"conv5_4_CPM_{s}", FEATURES, 512, 1),
            (f"conv5_5_CPM_{s}", 512, outputs, 1),
        ], False)  # fmt: skip
        for stage in range(2, STAGES + 1):
            # The upstream quirk: the last heatmap conv (Mconv7_stage6_L2) keeps its ReLU, so heatmaps are >= 0.
            layout[f"model{stage}_{branch}"] = (_refine_stage(stage, f"_{s}", inputs, outputs),
                                                branch == 2 and stage == STAGES)
    return layout


def hand_layout() -> dict[str, tuple[list[Layer | None], bool]]:
    """The hand network as ``{module name: (layers, ReLU after the last conv)}`` (model.py handpose_model)."""
    layout: dict[str, tuple[list[Layer | None], bool]] = {
        "model1_0": (list(HAND_FRONT), True),
        "model1_1": ([("conv6_1_CPM", FEATURES, 512, 1), ("conv6_2_CPM", 512, HAND_HEATMAPS, 1)], False),
    }
    for stage in range(2, STAGES + 1):  # 150 inputs: the previous heatmaps and the features
        layout[f"model{stage}"] = (_refine_stage(stage, "", HAND_HEATMAPS + FEATURES, HAND_HEATMAPS), False)
    return layout


class BodyPoseNet(nn.Module):
    """``(B, 3, H, W)`` BGR / 256 - 0.5 → PAFs ``(B, 38, H/8, W/8)`` and heatmaps ``(B, 19, H/8, W/8)``."""

    def __init__(self) -> None:
        super().__init__()
        for name, (layers, last_relu) in body_layout().items():
            self.add_module(name, _sequence(layers, last_relu))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model0(x)  # (B, 128, H/8, W/8)
        pafs, heatmaps = self.model1_1(features), self.model1_2(features)
        for stage in range(2, STAGES + 1):
            joint = torch.cat([pafs, heatmaps, features], dim=1)  # (B, 185, H/8, W/8)
            pafs = getattr(self, f"model{stage}_1")(joint)
            heatmaps = getattr(self, f"model{stage}_2")(joint)
        return pafs, heatmaps


class HandPoseNet(nn.Module):
    """``(B, 3, H, W)`` BGR / 256 - 0.5 → heatmaps ``(B, 22, H/8, W/8)`` (21 hand keypoints + background)."""

    def __init__(self) -> None:
        super().__init__()
        for name, (layers, last_relu) in hand_layout().items():
            self.add_module(name, _sequence(layers, last_relu))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model1_0(x)  # (B, 128, H/8, W/8)
        heatmaps = self.model1_1(features)
        for stage in range(2, STAGES + 1):
            heatmaps = getattr(self, f"model{stage}")(torch.cat([heatmaps, features], dim=1))  # (B, 150, ...)
        return heatmaps


def released_key(model_key: str) -> str:
    """The key a released OpenPose file stores ``model_key`` under: without its first component (``util.transfer``)."""
    return model_key.split(".", 1)[1]


def _transfer(obj: dict[str, Any], layout: dict[str, tuple[list[Layer | None], bool]]) -> dict[str, Any]:
    """The model's state dict from a released file (util.transfer): file key ``conv1_1.weight`` becomes model key
    ``model0.conv1_1.weight``. Keys already in the model's form are kept; keys of no layer are dropped, as
    ``util.transfer`` ignores them."""
    owner = {layer[0]: module for module, (layers, _) in layout.items() for layer in layers if layer is not POOL}
    state = {}
    for key, value in obj.items():
        layer = key.split(".", 1)[0]
        if layer in owner:
            state[f"{owner[layer]}.{key}"] = value
        elif layer in layout:
            state[key] = value
    return state


def body_state_dict(obj: dict[str, Any]) -> dict[str, Any]:
    """``body_pose_model.pth``'s flat keys mapped onto :class:`BodyPoseNet` (see :func:`_transfer`)."""
    return _transfer(obj, body_layout())


def hand_state_dict(obj: dict[str, Any]) -> dict[str, Any]:
    """``hand_pose_model.pth``'s flat keys mapped onto :class:`HandPoseNet` (see :func:`_transfer`)."""
    return _transfer(obj, hand_layout())


def smart_resize(x: np.ndarray, height: float, width: float) -> np.ndarray:
    """Resize to ``(int(height), int(width))``: area averaging when shrinking, Lanczos-4 when enlarging (judged by
    the sum of the sides), channel by channel (util.smart_resize)."""
    h, w = x.shape[:2]
    shrink = (height + width) / (h + w) < 1
    size = (int(width), int(height))
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4
    if x.ndim == 2 or x.shape[2] in (1, 3):
        return cv2.resize(x, size, interpolation=interpolation)
    return np.stack([cv2.resize(x[:, :, c], size, interpolation=interpolation) for c in range(x.shape[2])], axis=2)


def network_input(bgr: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(H, W, 3)`` uint8 BGR → ``(1, 3, H', W')`` float input padded right and bottom to a multiple of the stride
    with grey, and the padding ``(bottom, right)`` (util.padRightDownCorner; then ``/ 256 - 0.5``)."""
    h, w = bgr.shape[:2]
    bottom, right = -h % STRIDE, -w % STRIDE
    padded = cv2.copyMakeBorder(bgr, 0, bottom, 0, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1))).float()[None] / 256 - 0.5
    return x, (bottom, right)


def _to_image_maps(maps: torch.Tensor, pad: tuple[int, int], height: float, width: float) -> np.ndarray:
    """``(1, C, h, w)`` network output → ``(height, width, C)`` float32: x8 up, padding cut, resized
    (body.py / hand.py)."""
    m = maps[0].float().cpu().numpy().transpose(1, 2, 0)  # (h, w, C)
    m = smart_resize(m, m.shape[0] * STRIDE, m.shape[1] * STRIDE)
    m = m[: m.shape[0] - pad[0], : m.shape[1] - pad[1]]
    return smart_resize(m, height, width)


@torch.no_grad()
def body_maps(net: BodyPoseNet, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps ``(H, W, 19)`` and PAFs ``(H, W, 38)`` (float64) of a BGR uint8 image, at its own size.

    body.py: the image is scaled so that its height is ``0.5 * 368`` px (area when shrinking, Lanczos when
    enlarging), padded to a multiple of 8, run, and the maps are brought back to the image's size.
    """
    h, w = bgr.shape[:2]
    scale = BODY_SCALE * BOX_SIZE / h
    x, pad = network_input(smart_resize(bgr, h * scale, w * scale))
    device = next(net.parameters()).device
    pafs, heatmaps = net(x.to(device))
    heat = _to_image_maps(heatmaps, pad, h, w).astype(np.float64)
    paf = _to_image_maps(pafs, pad, h, w).astype(np.float64)
    return heat, paf


@torch.no_grad()
def hand_heatmaps(net: HandPoseNet, crop_bgr: np.ndarray) -> np.ndarray:
    """The hand heatmaps ``(128, 128, 22)`` (float64) of a square BGR uint8 crop, averaged over four scales.

    hand.py: Gaussian blur (sigma 0.8), then for each of the scales 0.5, 1, 1.5, 2 x 368 px: resize the crop to that
    square, pad, run, bring the maps back to 128 x 128, and average.
    """
    blurred = cv2.GaussianBlur(crop_bgr, (0, 0), HAND_BLUR_SIGMA)
    device = next(net.parameters()).device
    total = np.zeros((HAND_MAP_SIZE, HAND_MAP_SIZE, HAND_HEATMAPS), dtype=np.float64)
    for s in HAND_SCALES:
        side = s * BOX_SIZE
        x, pad = network_input(smart_resize(blurred, side, side))
        total += _to_image_maps(net(x.to(device)), pad, HAND_MAP_SIZE, HAND_MAP_SIZE) / len(HAND_SCALES)
    return total
