"""Detectors from transformers checkpoints: depth, normals, ADE20K segmentation and human pose from a photo.

* ``depth``: ``model=dpt_hybrid`` (default; DPT-Hybrid, MiDaS v3.0, Intel/dpt-hybrid-midas: the model of the
  1.0/1.1 depth annotator), ``depth_anything_v2`` (Depth Anything V2 Small) or ``zoedepth`` (ZoeDepth NYU + KITTI,
  metric); the prediction becomes the depth ControlNets' 8-bit image, near = bright.
* ``normal``: the same depth models, then ControlNet 1.0's normals from depth (:func:`structured.normal`, the
  ``normal_map`` annotator).
* ``segmentation``: ``model=oneformer`` (default; OneFormer Swin-T ADE20K, the 1.1 seg annotator's model) or
  ``upernet`` (UperNet ConvNeXt-S ADE20K); class indices coloured in the ADE20K palette.
* ``pose``: RT-DETR R50 person boxes, then ViTPose-B keypoints per person, COCO-17 → OpenPose COCO-18 (neck =
  shoulder midpoint), drawn by our skeleton renderer; ``json=PATH`` also writes OpenPose JSON.

Weights: ``weights=""`` takes the model's hub repository through huggingface_hub's cache (downloaded on first use
unless ``HF_HUB_OFFLINE=1``; offline and missing is one line naming the repository and ``hf download``). Only
config, processor and tokenizer files and one weights format are fetched: ``*.safetensors`` when the repository
has them, else ``pytorch_model*.bin`` (read by transformers with ``weights_only=True``). ``weights`` may also be
a local folder in ``save_pretrained`` layout or another hub id. A folder of another architecture, an incomplete or
corrupt checkpoint is refused in one line. Models are loaded once per process, folder and device.

Pre- and post-processing: transformers' image processors with their PIL backend (no torchvision), except ViTPose,
whose processor needs scipy: its person crops (UDP affine warp, as mmpose with OpenCV) and heatmap decoding (argmax,
DARK refinement, UDP back-projection) are done here with OpenCV and numpy. OneFormer is run through
``OneFormerModel`` (its segmentation head class builds a training loss that needs scipy) and its semantic map is
computed here as ``OneFormerImageProcessor.post_process_semantic_segmentation`` does; ZoeDepth's padding removal
is done here too (its PIL post-processing calls torchvision).

Differences from ControlNet 1.1's annotators: each model sees the input size its processor sets (DPT-Hybrid
384 x 384, as the hub checkpoint's processor; 1.1 fed MiDaS the detect-resolution image directly), predictions are
resized to the photo bicubically, and the 8-bit mapping rounds where 1.1 truncated.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import cv2
import numpy as np

from controlnet.annotators import openpose, pose as render, structured
from controlnet.annotators.loader import DEVICE, WeightsSource, cache_key, cached, locate, torch_device
from controlnet.annotators.registry import Param
from controlnet.errors import UserError

if TYPE_CHECKING:  # torch and transformers are imported on first use, so listing annotators stays fast
    import torch


@dataclass(frozen=True)
class HubModel:
    """A transformers checkpoint a detector runs: its ``model=`` name, title, default hub repository, the
    ``model_type`` its config.json must have, and the transformers class that loads it. Depth models also say
    whether large values are near (relative inverse depth) or far (metric depth) and which percentiles of the
    prediction map to the 8-bit range."""

    name: str
    title: str
    repo_id: str
    model_type: str
    model_class: str
    near: str = "large"
    low: float = 0.0
    high: float = 100.0


DEPTH_MODELS: dict[str, HubModel] = {
    m.name: m
    for m in (
        HubModel("dpt_hybrid", "DPT-Hybrid (MiDaS v3.0)", "Intel/dpt-hybrid-midas", "dpt", "DPTForDepthEstimation"),
        HubModel("depth_anything_v2", "Depth Anything V2 Small", "depth-anything/Depth-Anything-V2-Small-hf",
                 "depth_anything", "DepthAnythingForDepthEstimation"),
        # Metric depth (near = small). ControlNet 1.1's zoe annotator maps percentiles 2 and 85 to near and far.
        HubModel("zoedepth", "ZoeDepth (NYU + KITTI)", "Intel/zoedepth-nyu-kitti", "zoedepth",
                 "ZoeDepthForDepthEstimation", near="small", low=2.0, high=85.0),
    )
}
SEGMENTATION_MODELS: dict[str, HubModel] = {
    m.name: m
    for m in (
        HubModel("oneformer", "OneFormer Swin-T (ADE20K)", "shi-labs/oneformer_ade20k_swin_tiny", "oneformer",
                 "OneFormerModel"),
        HubModel("upernet", "UperNet ConvNeXt-S (ADE20K)", "openmmlab/upernet-convnext-small", "upernet",
                 "UperNetForSemanticSegmentation"),
    )
}
PERSON_DETECTOR = HubModel("rtdetr", "RT-DETR R50 (COCO + Objects365)", "PekingU/rtdetr_r50vd_coco_o365", "rt_detr",
                           "RTDetrForObjectDetection")
POSE_MODEL = HubModel("vitpose", "ViTPose-B (COCO)", "usyd-community/vitpose-base-simple", "vitpose",
                      "VitPoseForPoseEstimation")

ADE20K_CLASSES = 150
ZOE_PADDING_FACTOR = 3  # ZoeDepth pads int(sqrt(side / 2) * 3) px per side before the network
# Thresholds of the transformers ViTPose example (docs/model_doc/vitpose): person boxes and keypoints below 0.3
# confidence are dropped.
PERSON_THRESHOLD = 0.3
KEYPOINT_THRESHOLD = 0.3
# ViTPose's top-down crop (mmpose TopDownAffine / transformers box_to_center_and_scale): the box grows to the
# model's aspect ratio, then by 1.25.
BOX_PADDING = 1.25
DARK_KERNEL = 11  # post_process_pose_estimation kernel_size: DARK's Gaussian is sigma 0.8, radius (11 - 1) // 2
DARK_SIGMA = 0.8
# OpenPose COCO-18 joint k is COCO-17 keypoint COCO17_OF[k]; the neck (None) is the midpoint of the shoulders.
# COCO-17: nose, l/r eye, l/r ear, l/r shoulder, l/r elbow, l/r wrist, l/r hip, l/r knee, l/r ankle.
COCO17_OF = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
SHOULDERS = (5, 6)  # COCO-17 left and right shoulder
# What is fetched from a hub repository: configs, processor and tokenizer files, then one weights format.
HUB_FILES = ["*.json", "*.txt"]
HUB_WEIGHTS = (["*.safetensors"], ["pytorch_model*.bin"])


# --- weights ---------------------------------------------------------------------------------------------------


def _snapshot(repo_id: str) -> Path:
    """The repository's snapshot folder with :data:`HUB_FILES` and safetensors weights, else the .bin ones."""
    from controlnet import hub

    folder = hub.hub_folder(repo_id, allow_patterns=HUB_FILES + HUB_WEIGHTS[0])
    if not any(folder.glob("*.safetensors")):
        folder = hub.hub_folder(repo_id, allow_patterns=HUB_FILES + HUB_WEIGHTS[1])
    return folder


def model_folder(spec: HubModel, weights: str) -> Path:
    """The local folder of ``spec``'s checkpoint: ``weights`` (a folder or a hub id) or the default repository."""
    return locate(WeightsSource(spec.title, spec.repo_id, fetch_folder=_snapshot), weights)


def _check_folder(folder: Path, spec: HubModel, family: dict[str, HubModel]) -> None:
    """Refuse a folder that is not a transformers checkpoint of ``spec``'s architecture, naming what it holds."""
    config = folder / "config.json"
    try:
        model_type = jsonlib.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{folder} is not a transformers model folder (no readable config.json); give a "
                        f"{spec.title} folder or a hub id like {spec.repo_id}") from None
    if model_type != spec.model_type:
        other = next((m.name for m in family.values() if m.model_type == model_type), None)
        hint = f"use model={other}" if other else f"give a {spec.title} checkpoint"
        raise UserError(f"{folder} holds a {model_type!r} model, not {spec.title} ({spec.model_type!r}); {hint}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' loading bars and warnings hidden while loading (restored afterwards)."""
    from transformers.utils import logging as transformers_logging

    from controlnet.hub import quiet_loading

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with quiet_loading():
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _from_folder(spec: HubModel, folder: Path) -> tuple[Any, Any]:
    """Model and processor of ``folder``; a missing, incomplete or corrupt checkpoint is one line."""
    import transformers

    cls = getattr(transformers, spec.model_class)
    try:
        with _quiet():
            model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
            if spec.model_type == "oneformer":  # image processor + CLIP tokenizer for the task token
                processor = transformers.OneFormerProcessor.from_pretrained(
                    folder, backend="pil", class_info_file=None, local_files_only=True)  # no metadata download
            else:
                processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil",
                                                                            local_files_only=True)
    except Exception as err:  # noqa: BLE001 - safetensors, torch and transformers raise many types; one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{folder}: cannot load the {spec.title} checkpoint ({type(err).__name__}: {first})") from None
    missing = list(info.get("missing_keys", ())) + [k[0] if isinstance(k, tuple) else k
                                                    for k in info.get("mismatched_keys", ())]
    if missing:
        raise UserError(f"{folder}: not a complete {spec.title} checkpoint: {len(missing)} weights missing or of "
                        f"the wrong shape (e.g. {missing[0]})")
    return model, processor


def load(spec: HubModel, weights: str, device: str, family: dict[str, HubModel] | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` of ``spec`` from ``weights`` (see :func:`model_folder`) on ``device``, in eval mode;
    loaded once per process, folder and device (:func:`controlnet.annotators.loader.cached`)."""
    folder = check(spec, weights, device, family)
    target = torch_device(device)

    def build() -> tuple[Any, Any]:
        model, processor = _from_folder(spec, folder)
        return model.to(target).eval(), processor

    return cached(("transformers", spec.name, *cache_key(folder), str(target)), build)


def check(spec: HubModel, weights: str, device: str, family: dict[str, HubModel] | None = None) -> Path:
    """The checkpoint folder of ``spec``, checked without loading it: it is found, its config.json names
    ``spec``'s architecture, and ``device`` exists."""
    folder = model_folder(spec, weights)
    _check_folder(folder, spec, family or {spec.name: spec})
    torch_device(device)
    return folder


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _choice(models: dict[str, HubModel], name: str) -> HubModel:
    if name not in models:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(models)}")
    return models[name]


# --- depth and normals ---------------------------------------------------------------------------------------------


def resize_depth(predicted: torch.Tensor, size: tuple[int, int], pad: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A prediction ``(1, h, w)`` brought to ``size`` ``(H, W)``: bicubic (align_corners=False) to the size plus
    ``pad`` on each side, which is then cut off (``post_process_depth_estimation`` of the DPT and ZoeDepth
    processors; ZoeDepth's PIL one needs torchvision, so it is done here)."""
    import torch.nn.functional as F

    h, w = size
    depth = F.interpolate(predicted[None].float(), size=(h + 2 * pad[0], w + 2 * pad[1]), mode="bicubic",
                          align_corners=False)  # (1, 1, H', W')
    return depth[0, 0, pad[0] : pad[0] + h, pad[1] : pad[1] + w].cpu().numpy()


def zoe_padding(size: tuple[int, int]) -> tuple[int, int]:
    """The reflection padding ZoeDepth's processor adds around an ``(H, W)`` image: ``int(sqrt(side / 2) * 3)``
    (isl-org/ZoeDepth depth_model.py, against border artefacts)."""
    return tuple(int(np.sqrt(side / 2) * ZOE_PADDING_FACTOR) for side in size)  # type: ignore[return-value]


def predict_depth(image: np.ndarray, model: str = "dpt_hybrid", weights: str = "", device: str = "cpu") -> np.ndarray:
    """The depth model's prediction for an RGB uint8 photo, ``(H, W)`` float32 at the photo's size: relative
    inverse depth for DPT and Depth Anything (large = near), metres for ZoeDepth (small = near)."""
    import torch
    from PIL import Image

    spec = _choice(DEPTH_MODELS, model)
    net, processor = load(spec, weights, device, DEPTH_MODELS)
    size = image.shape[:2]
    inputs = processor(images=Image.fromarray(image), return_tensors="pt").to(_device_of(net))
    with torch.inference_mode():
        predicted = net(**inputs).predicted_depth  # (1, h, w)
    padded = spec.model_type == "zoedepth" and getattr(processor, "do_pad", False)
    return resize_depth(predicted, size, zoe_padding(size) if padded else (0, 0))


def depth_condition(values: np.ndarray, model: str = "dpt_hybrid", low: float | None = None,
                    high: float | None = None) -> np.ndarray:
    """A prediction of depth model ``model`` as the depth ControlNets' 8-bit image (near = bright): percentile
    ``low`` → 0, ``high`` → 255 (defaults: the model's), rounded (:func:`structured.depth`)."""
    spec = _choice(DEPTH_MODELS, model)
    return structured.depth(values, near=spec.near, low=spec.low if low is None else low,
                            high=spec.high if high is None else high)


def depth(image: np.ndarray, model: str = "dpt_hybrid", weights: str = "", low: float | None = None,
          high: float | None = None, device: str = "cpu") -> np.ndarray:
    """Depth from a photo, as the depth ControlNets' 8-bit image (near = bright)."""
    return depth_condition(predict_depth(image, model, weights, device), model, low, high)


def normal(image: np.ndarray, model: str = "dpt_hybrid", weights: str = "", a: float = structured.NORMAL_Z,
           bg_threshold: float = structured.NORMAL_BG_THRESHOLD, depth_scale: float = structured.NORMAL_DEPTH_SCALE,
           layout: str = "xyz", device: str = "cpu") -> np.ndarray:
    """Normals from a photo in one step: the depth model's prediction, then ControlNet 1.0's normals from depth
    (:func:`structured.normal`, the ``normal_map`` annotator)."""
    values = predict_depth(image, model, weights, device)
    return structured.normal(values, a=a, bg_threshold=bg_threshold, depth_scale=depth_scale,
                             near=DEPTH_MODELS[model].near, layout=layout)


# --- segmentation ----------------------------------------------------------------------------------------------


def labels_from_logits(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Per-pixel class scores ``(1, C, h, w)`` → ``(H, W)`` int64 labels: bilinear resize (align_corners=False),
    then argmax (``post_process_semantic_segmentation`` of the UperNet/Segformer processors)."""
    import torch.nn.functional as F

    resized = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return resized[0].argmax(dim=0).cpu().numpy().astype(np.int64)


def oneformer_labels(class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """OneFormer's semantic map: per query, class probabilities without the "no object" class ``(1, Q, C)`` times
    its sigmoid mask ``(1, Q, h, w)``, summed over queries into ``(1, C, h, w)``, then :func:`labels_from_logits`."""
    import torch

    classes = class_logits.float().softmax(dim=-1)[..., :-1]  # (1, Q, C)
    masks = mask_logits.float().sigmoid()  # (1, Q, h, w)
    return labels_from_logits(torch.einsum("bqc,bqhw->bchw", classes, masks), size)


def segment(image: np.ndarray, model: str = "oneformer", weights: str = "", device: str = "cpu") -> np.ndarray:
    """ADE20K class indices ``(H, W)`` int64 (0..149) of an RGB uint8 photo."""
    import torch
    from PIL import Image

    spec = _choice(SEGMENTATION_MODELS, model)
    net, processor = load(spec, weights, device, SEGMENTATION_MODELS)
    if net.config.num_labels != ADE20K_CLASSES:
        raise UserError(f"{spec.title}: this checkpoint has {net.config.num_labels} classes, not ADE20K's "
                        f"{ADE20K_CLASSES}; give an ADE20K checkpoint")
    size = image.shape[:2]
    extra = {"task_inputs": ["semantic"]} if spec.model_type == "oneformer" else {}
    inputs = processor(images=Image.fromarray(image), return_tensors="pt", **extra).to(_device_of(net))
    with torch.inference_mode():
        outputs = net(**inputs)
    if spec.model_type == "oneformer":
        return oneformer_labels(outputs.transformer_decoder_class_predictions,
                                outputs.transformer_decoder_mask_predictions, size)
    return labels_from_logits(outputs.logits, size)


def segmentation(image: np.ndarray, model: str = "oneformer", weights: str = "", device: str = "cpu") -> np.ndarray:
    """ADE20K segmentation of a photo in the ADE20K palette (seg ControlNets)."""
    return structured.segmentation(segment(image, model, weights, device), palette="ade20k")


# --- pose ------------------------------------------------------------------------------------------------------


def person_boxes(image: np.ndarray, weights: str = "", threshold: float = PERSON_THRESHOLD,
                 device: str = "cpu") -> np.ndarray:
    """Boxes ``(N, 4)`` ``x0, y0, x1, y1`` (pixels) of the people the detector finds with score > ``threshold``."""
    import torch
    from PIL import Image

    net, processor = load(PERSON_DETECTOR, weights, device)
    people = [i for i, label in net.config.id2label.items() if str(label).lower() == "person"]
    if not people:
        raise UserError(f"{PERSON_DETECTOR.title}: this detector has no 'person' class; give a COCO detector")
    inputs = processor(images=Image.fromarray(image), return_tensors="pt").to(_device_of(net))
    with torch.inference_mode():
        outputs = net(**inputs)
    found = processor.post_process_object_detection(outputs, target_sizes=[image.shape[:2]], threshold=threshold)[0]
    keep = found["labels"] == int(people[0])
    return found["boxes"][keep].float().cpu().numpy().reshape(-1, 4)


def box_center_size(box: np.ndarray, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre and size (pixels) of the crop around box ``x0, y0, x1, y1``: the box grown to ``aspect`` (width /
    height of the model input), then by 1.25 (transformers ``box_to_center_and_scale``, mmpose)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    center = np.array([x0 + 0.5 * w, y0 + 0.5 * h])
    if w > aspect * h:
        h = w / aspect
    elif w < aspect * h:
        w = h * aspect
    return center, np.array([w, h]) * BOX_PADDING


def crop_person(image: np.ndarray, center: np.ndarray, size: np.ndarray, width: int, height: int) -> np.ndarray:
    """The ``width`` x ``height`` crop whose corner pixels sit on the region's edges (UDP: the region's ``size``
    spans ``width - 1`` pixel steps), bilinear, black outside the image (mmpose TopDownAffine with cv2)."""
    sx, sy = (width - 1) / size[0], (height - 1) / size[1]
    matrix = np.array([[sx, 0.0, sx * (0.5 * size[0] - center[0])], [0.0, sy, sy * (0.5 * size[1] - center[1])]])
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR)


def dark_refine(coords: np.ndarray, heatmaps: np.ndarray) -> np.ndarray:
    """DARK sub-pixel refinement (Zhang et al., CVPR 2020) of integer peaks ``(N, K, 2)`` ``x, y`` of heatmaps
    ``(N, K, h, w)``: one Newton step on the log of the Gaussian-smoothed heatmap (transformers
    ``post_dark_unbiased_data_processing``)."""
    n, k, h, w = heatmaps.shape
    out = coords.astype(np.float64).copy()
    for i in range(n):
        for j in range(k):
            smooth = openpose.gaussian_smooth(heatmaps[i, j], DARK_SIGMA, radius=(DARK_KERNEL - 1) // 2)
            p = np.pad(np.log(np.clip(smooth, 0.001, 50)), 1, mode="edge")
            x, y = int(coords[i, j, 0]) + 1, int(coords[i, j, 1]) + 1
            dx, dy = 0.5 * (p[y, x + 1] - p[y, x - 1]), 0.5 * (p[y + 1, x] - p[y - 1, x])
            dxx = p[y, x + 1] - 2 * p[y, x] + p[y, x - 1]
            dyy = p[y + 1, x] - 2 * p[y, x] + p[y - 1, x]
            dxy = 0.5 * (p[y + 1, x + 1] - p[y, x + 1] - p[y + 1, x] + 2 * p[y, x] - p[y, x - 1] - p[y - 1, x]
                         + p[y - 1, x - 1])
            hessian = np.array([[dxx, dxy], [dxy, dyy]]) + np.finfo(np.float32).eps * np.eye(2)
            out[i, j] -= np.linalg.inv(hessian) @ np.array([dx, dy])
    return out


def decode_heatmaps(heatmaps: np.ndarray, centers: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Keypoints ``(N, K, 3)`` ``x, y, score`` in image pixels from ViTPose heatmaps ``(N, K, h, w)`` of crops with
    ``centers``/``sizes`` ``(N, 2)``: argmax (score = its value), DARK refinement, then UDP back-projection
    ``x = u * size_x / (w - 1) + centre_x - size_x / 2``."""
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, -1)
    index = flat.argmax(axis=2)
    scores = flat.max(axis=2)
    coords = dark_refine(np.stack([index % w, index // w], axis=-1), heatmaps)
    step = sizes / np.array([w - 1, h - 1])  # (N, 2) image pixels per heatmap pixel
    xy = coords * step[:, None, :] + (centers - 0.5 * sizes)[:, None, :]
    return np.concatenate([xy, scores[..., None]], axis=-1)


def coco17_to_openpose18(keypoints: np.ndarray, threshold: float = KEYPOINT_THRESHOLD) -> np.ndarray:
    """COCO-17 keypoints ``(17, 3)`` → OpenPose COCO-18 ``(18, 3)``; the neck is the shoulders' midpoint with the
    lower of their scores; keypoints with a score below ``threshold`` (and a neck without both shoulders) are
    ``0, 0, 0``."""
    kept = np.where(keypoints[:, 2:3] >= threshold, keypoints, 0.0)
    out = np.zeros((len(COCO17_OF), 3))
    for k, source in enumerate(COCO17_OF):
        if source is not None:
            out[k] = kept[source]
    left, right = kept[list(SHOULDERS)]
    if left[2] > 0 and right[2] > 0:
        out[1] = (0.5 * (left[0] + right[0]), 0.5 * (left[1] + right[1]), min(left[2], right[2]))
    return out


def pose_keypoints(image: np.ndarray, boxes: np.ndarray, weights: str = "", device: str = "cpu") -> np.ndarray:
    """ViTPose keypoints ``(N, 17, 3)`` (image pixels, score) of the people in ``boxes`` ``(N, 4)`` xyxy."""
    import torch

    net, processor = load(POSE_MODEL, weights, device)
    if net.config.num_labels != len(COCO17_OF) - 1:
        raise UserError(f"{POSE_MODEL.title}: this checkpoint predicts {net.config.num_labels} keypoints, not COCO's "
                        f"{len(COCO17_OF) - 1}; give a COCO keypoint checkpoint")
    if len(boxes) == 0:
        return np.zeros((0, 17, 3))
    width, height = processor.size["width"], processor.size["height"]
    centers, sizes = zip(*(box_center_size(b, width / height) for b in boxes))
    x = np.stack([crop_person(image, c, s, width, height) for c, s in zip(centers, sizes)]).astype(np.float32)
    if processor.do_rescale:  # (N, H, W, 3), then the processor's rescale and normalisation
        x = x * processor.rescale_factor
    if processor.do_normalize:
        x = (x - np.asarray(processor.image_mean)) / np.asarray(processor.image_std)
    pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).float().to(_device_of(net))
    extra = {}
    if getattr(net.config.backbone_config, "num_experts", 1) > 1:  # ViTPose+: the COCO expert
        extra["dataset_index"] = torch.zeros(len(boxes), dtype=torch.long, device=pixels.device)
    with torch.inference_mode():
        heatmaps = net(pixel_values=pixels, **extra).heatmaps
    return decode_heatmaps(heatmaps.float().cpu().numpy(), np.stack(centers), np.stack(sizes))


def pose(image: np.ndarray, weights: str = "", detector_weights: str = "",
         person_threshold: float = PERSON_THRESHOLD, keypoint_threshold: float = KEYPOINT_THRESHOLD,
         json: Any = None, stick_width: int = render.STICK_WIDTH, joint_radius: int = render.JOINT_RADIUS,
         device: str = "cpu") -> np.ndarray:
    """Every person's COCO-18 skeleton from a photo (person detector + ViTPose), drawn by our renderer;
    ``json`` (a path) also receives the keypoints as OpenPose JSON."""
    boxes = person_boxes(image, detector_weights, person_threshold, device)
    keypoints = pose_keypoints(image, boxes, weights, device)
    people = [{"body": coco17_to_openpose18(k, keypoint_threshold)} for k in keypoints]
    doc = openpose.people_json(people, image.shape[1], image.shape[0])
    return openpose.render_people(image, doc, json, False, stick_width, joint_radius)


# --- registration ----------------------------------------------------------------------------------------------


def _status(*specs: HubModel) -> Callable[[], str]:
    """``--list`` line: whether the default repositories are in the hub cache (config.json and weights)."""

    def status() -> str:
        from controlnet import hub

        missing = [s.repo_id for s in specs if not (hub.is_cached(s.repo_id, "config.json") and any(
            hub.is_cached(s.repo_id, f) for f in ("model.safetensors", "pytorch_model.bin")))]
        if not missing:
            return "weights cached (" + ", ".join(s.repo_id for s in specs) + ")"
        return "weights not cached: " + "; ".join(f"`{hub.fetch_command(r)}`" for r in missing) + " or --weights FOLDER"

    return status


def _weights(spec: HubModel, what: str = "weights") -> Param:
    return Param(what, str, "", f"model folder (save_pretrained layout) or hub id (default: {spec.repo_id})", path=True)


def _depth_model(help_extra: str = "") -> Param:
    return Param("model", str, "dpt_hybrid", "depth model: dpt_hybrid (MiDaS v3.0), depth_anything_v2 or zoedepth"
                 + help_extra, choices=tuple(DEPTH_MODELS))


def _check_depth(params: dict[str, Any]) -> None:
    check(_choice(DEPTH_MODELS, params["model"]), params["weights"], params["device"], DEPTH_MODELS)


def _check_segmentation(params: dict[str, Any]) -> None:
    check(_choice(SEGMENTATION_MODELS, params["model"]), params["weights"], params["device"], SEGMENTATION_MODELS)


def _check_pose(params: dict[str, Any]) -> None:
    check(POSE_MODEL, params["weights"], params["device"])
    check(PERSON_DETECTOR, params["detector_weights"], params["device"])


def register_photo_detectors(register: Callable[..., Any]) -> None:
    """Register ``depth``, ``normal``, ``segmentation`` and ``pose`` with ``register``
    (:func:`controlnet.annotators.register`)."""
    default_depth = DEPTH_MODELS["dpt_hybrid"]
    register("depth", depth, "depth from a photo (DPT-Hybrid/MiDaS, Depth Anything V2, ZoeDepth), near = bright "
             "(depth ControlNets)", [
                 _depth_model(), _weights(default_depth),
                 Param("low", float, None, "percentile mapped to far (default 0; zoedepth 2)", minimum=0, maximum=100),
                 Param("high", float, None, "percentile mapped to near (default 100; zoedepth 85)", minimum=0,
                       maximum=100),
                 DEVICE], weights=_status(default_depth), check=_check_depth)
    register("normal", normal, "normals from a photo: predicted depth, then ControlNet 1.0's normals from depth "
             "(normal ControlNet)", [
                 _depth_model(), _weights(default_depth),
                 Param("a", float, structured.NORMAL_Z, "z component before normalising (original: 2 pi)",
                       minimum=1e-6),
                 Param("bg_threshold", float, structured.NORMAL_BG_THRESHOLD, "nearness below this is flat background",
                       minimum=0, maximum=1),
                 Param("depth_scale", float, structured.NORMAL_DEPTH_SCALE, "depth range (0..1 nearness times this)",
                       minimum=1e-6),
                 Param("layout", str, "xyz", "xyz: R=x, G=y, B=z; zyx: reversed, as control_sd15_normal was fed",
                       choices=("xyz", "zyx")),
                 DEVICE], weights=_status(default_depth), check=_check_depth)
    register("segmentation", segmentation, "ADE20K segmentation from a photo (OneFormer or UperNet), ADE20K palette "
             "(seg ControlNets)", [
                 Param("model", str, "oneformer", "oneformer (Swin-T, ControlNet 1.1's) or upernet (ConvNeXt-S)",
                       choices=tuple(SEGMENTATION_MODELS)),
                 _weights(SEGMENTATION_MODELS["oneformer"]), DEVICE],
             weights=_status(SEGMENTATION_MODELS["oneformer"]),
             check=_check_segmentation)
    register("pose", pose, "human pose from a photo: RT-DETR person boxes + ViTPose, COCO-18 skeletons (openpose "
             "ControlNets)", [
                 _weights(POSE_MODEL), _weights(PERSON_DETECTOR, "detector_weights"),
                 Param("person_threshold", float, PERSON_THRESHOLD, "person box score threshold", minimum=0, maximum=1),
                 Param("keypoint_threshold", float, KEYPOINT_THRESHOLD, "keypoints below this score are left out",
                       minimum=0, maximum=1),
                 Param("json", Path, None, "also write the keypoints to this file as OpenPose JSON (pose_json "
                       "reads it)"),
                 Param("stick_width", int, render.STICK_WIDTH, "limb half-width (px)", minimum=1, maximum=64),
                 Param("joint_radius", int, render.JOINT_RADIUS, "joint circle radius (px)", minimum=1, maximum=64),
                 DEVICE], weights=_status(POSE_MODEL, PERSON_DETECTOR), check=_check_pose)
