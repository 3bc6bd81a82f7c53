"""Neural annotators of ControlNet 1.1 on our own networks (:mod:`.networks`): ``hed``, ``pidinet``, ``lineart``,
``lineart_coarse`` and ``mlsd`` (large, or ``model=tiny``), each with the pre- and post-processing of the 1.1
annotator and demo (lllyasviel/ControlNet-v1-1-nightly ``annotator/*/__init__.py``, ``gradio_*.py``).

Common to all: the RGB image is resized so that its short side is ``detect_resolution`` and both sides are
multiples of 64 (``annotator/util.py`` ``resize_image``: Lanczos when enlarging, area when shrinking), the network
runs at that size, and its map is resized back to the input's size bilinearly (as the demos resize it to the
generation size). Outputs are ``(H, W, 3)`` uint8, white structure on black, the convention each ControlNet was
trained with. Weights: ``weights=""`` takes the released file from the ``lllyasviel/Annotators`` hub repository
(the huggingface_hub cache, downloaded on first use unless ``HF_HUB_OFFLINE=1``); otherwise a file, a folder
holding the released file name, or a hub id (``org/name`` or ``org/name/file.pth``). Models are loaded once per
process and weights file.

Each detector also has a batch form (``hed_batch(images, ...)`` -> a list), registered as the annotator's
``batch``: images whose network inputs have the same size go through one forward together. Every layer of these
networks works on each image alone (convolutions, pooling, ReLU, instance norm, BatchNorm in eval mode), so a
batch gives each image the outputs it gets alone, up to the float rounding of the convolution kernels a batch
size selects (within 1e-7 here); folder mode (``controlnet annotate NAME IN/ OUT/ --batch-size N``) uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import cv2
import numpy as np

from controlnet.annotators.networks import MLSD_TINY_FILE, NETWORKS, load_network
from controlnet.annotators.registry import Param
from controlnet.annotators.weights import ANNOTATORS_REPO, weights_path, weights_status
from controlnet.errors import UserError

if TYPE_CHECKING:  # torch is imported on first use, so listing annotators stays fast
    import torch

DETECT_RESOLUTION = 512  # gradio_*.py "Preprocessor Resolution" default
RESOLUTION_MULTIPLE = 64  # annotator/util.py resize_image rounds both sides to multiples of 64
SAFE_STEP = 2  # annotator/util.py safe_step(x, step=2): 3 levels, so faint gradients cannot carry hidden detail
# Scribble from soft edges (gradio_scribble.py): nms(map, 127, 3.0), then a 3 px blur, and any pixel above 4 is ink.
SCRIBBLE_THRESHOLD, SCRIBBLE_SIGMA, SCRIBBLE_INK = 127, 3.0, 4
# M-LSD thresholds of gradio_mlsd.py: centre score (value_threshold) and segment length (distance_threshold).
MLSD_SCORE_THRESHOLD, MLSD_DISTANCE_THRESHOLD = 0.1, 0.1
# M-LSD input: RGB and a constant plane of ones, scaled by x / 127.5 - 1 (mlsd utils.py pred_lines).
MLSD_SCALE = 127.5
# Where the networks that lllyasviel/Annotators does not hold are published.
_NOT_ON_HUB = {"mlsd_tiny": "mlsd_tiny_512_fp32.pth, published in github.com/lhwcv/mlsd_pytorch under models/"}


# --- shared pre- and post-processing -------------------------------------------------------------------------


def resize_for_detection(image: np.ndarray, resolution: int) -> np.ndarray:
    """``annotator/util.py`` ``resize_image``: short side to ``resolution``, both sides rounded to multiples of 64,
    Lanczos when enlarging and area averaging when shrinking."""
    h, w = image.shape[:2]
    k = float(resolution) / min(h, w)
    height = max(RESOLUTION_MULTIPLE, int(np.round(h * k / RESOLUTION_MULTIPLE)) * RESOLUTION_MULTIPLE)
    width = max(RESOLUTION_MULTIPLE, int(np.round(w * k / RESOLUTION_MULTIPLE)) * RESOLUTION_MULTIPLE)
    interpolation = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interpolation)


def safe_step(x: np.ndarray, step: int = SAFE_STEP) -> np.ndarray:
    """``annotator/util.py`` ``safe_step``: quantise a 0..1 map to ``step + 1`` levels (float32)."""
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """A 0..1 map to uint8 by truncation, as the annotators do: ``(x * 255).clip(0, 255).astype(uint8)``."""
    return (x * 255.0).clip(0, 255).astype(np.uint8)


def edge_nms(x: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """``annotator/util.py`` ``nms``: blur, keep pixels that are maxima along any of 4 directions, threshold;
    ``(H, W)`` uint8 0/255."""
    x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), sigma)
    directions = (
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8), np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.uint8), np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], np.uint8),
    )
    y = np.zeros_like(x)
    for kernel in directions:
        np.putmask(y, cv2.dilate(x, kernel=kernel) == x, x)
    return np.where(y > threshold, 255, 0).astype(np.uint8)


def scribble_from_edges(edges: np.ndarray) -> np.ndarray:
    """gradio_scribble.py: thin soft edges ``(H, W)`` uint8 to 1-px ridges, blur and re-threshold into strokes."""
    strokes = cv2.GaussianBlur(edge_nms(edges, SCRIBBLE_THRESHOLD, SCRIBBLE_SIGMA), (0, 0), SCRIBBLE_SIGMA)
    return np.where(strokes > SCRIBBLE_INK, 255, 0).astype(np.uint8)


def to_condition(grey: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A detection-size ``(h, w)`` uint8 map → ``(H, W, 3)`` uint8 at ``size`` (bilinear, as the demos)."""
    height, width = size
    if grey.shape[:2] != (height, width):
        grey = cv2.resize(grey, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.repeat(grey[..., None], 3, axis=2)


def run_network(net: torch.nn.Module, image: np.ndarray) -> Any:
    """``net`` on an ``(H, W, C)`` float32 array given as ``(1, C, H, W)`` (a channels-last view, as the annotators'
    einops ``h w c -> 1 c h w`` of ``torch.from_numpy`` makes it), on the network's device, without autograd."""
    return run_network_batch(net, [image])[0]


def _item(output: Any, i: int) -> Any:
    """Image ``i`` of a batched network output (a tensor, or a tuple/list of them), keeping a batch of one."""
    if isinstance(output, (tuple, list)):
        return type(output)(o[i : i + 1] for o in output)
    return output[i : i + 1]


def run_network_batch(net: torch.nn.Module, images: list[np.ndarray]) -> list[Any]:
    """:func:`run_network` for each of ``images``: those of one shape go through ``net`` together as
    ``(B, C, H, W)`` (channels-last, as one image is given); each image's output keeps a batch of one."""
    import torch

    device = next(net.parameters()).device
    outputs: list[Any] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    for indices in groups.values():
        x = torch.from_numpy(np.stack([images[i] for i in indices])).permute(0, 3, 1, 2).to(device)
        with torch.inference_mode():
            batch = net(x)
        for k, i in enumerate(indices):
            outputs[i] = _item(batch, k)
    return outputs


def _device(device: str) -> torch.device:
    """``device`` as a torch device (``auto``: cuda, then mps, then cpu); an unknown or absent one → UserError."""
    from controlnet.devices import resolve_device

    return resolve_device(None if device == "auto" else device)


def weights_file(name: str, weights: str) -> Path:
    """The weights file of network ``name``: ``weights`` (a file, a folder holding the released file name, or a hub
    id ``org/name`` / ``org/name/file``) or, when empty, the released file from ``lllyasviel/Annotators``."""
    from controlnet import hub

    spec = NETWORKS[name]
    if not weights:
        if spec.filename is None:
            raise UserError(f"{spec.title} has no default weights file in {ANNOTATORS_REPO}; pass --weights FILE "
                            f"({_NOT_ON_HUB.get(name, 'the released file')})")
        return weights_path(None, ANNOTATORS_REPO, spec.filename)
    if spec.filename and hub.is_repo_id(weights):
        return hub.hub_file(weights, spec.filename)  # one file, not a whole snapshot of the repository
    path = weights_path(weights, ANNOTATORS_REPO, spec.filename)
    if path.is_dir():
        if spec.filename and (path / spec.filename).is_file():
            return path / spec.filename
        wanted = spec.filename or "the weights file"
        raise UserError(f"{name}: folder {path} has no {wanted}; pass the file itself with --weights FILE")
    return path


def _network(name: str, weights: str, device: str) -> torch.nn.Module:
    return load_network(name, weights_file(name, weights), _device(device))


# --- HED and PiDiNet soft edges -----------------------------------------------------------------------------


def hed_edge_map(projections: tuple[torch.Tensor, ...], safe: bool = False) -> np.ndarray:
    """HEDdetector's post-processing: each side output bilinearly resized to the input size (cv2), their mean
    through a sigmoid (float64), optionally :func:`safe_step`, then uint8 ``(H, W)``."""
    height, width = projections[0].shape[2:]
    maps = [p[0, 0].detach().cpu().numpy().astype(np.float32) for p in projections]
    maps = [cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in maps]
    edge = 1.0 / (1.0 + np.exp(-np.mean(np.stack(maps, axis=2), axis=2).astype(np.float64)))
    return to_uint8(safe_step(edge) if safe else edge)


def pidinet_edge_map(fused: torch.Tensor, safe: bool = False) -> np.ndarray:
    """PidiNetDetector's post-processing of the fused map ``(1, 1, H, W)`` in 0..1: optional :func:`safe_step`,
    then uint8 ``(H, W)``."""
    edge = fused.detach().cpu().numpy()
    return to_uint8(safe_step(edge) if safe else edge)[0, 0]


def _soft_edges(grey: np.ndarray, size: tuple[int, int], scribble: bool) -> np.ndarray:
    condition = to_condition(grey, size)
    if scribble:
        condition = np.repeat(scribble_from_edges(condition[..., 0])[..., None], 3, axis=2)
    return condition


def hed_batch(images: list[np.ndarray], weights: str = "", detect_resolution: int = DETECT_RESOLUTION,
              safe: bool = False, scribble: bool = False, device: str = "cpu") -> list[np.ndarray]:
    """:func:`hed` of each image, several per forward."""
    net = _network("hed", weights, device)
    smalls = [resize_for_detection(image, detect_resolution).astype(np.float32) for image in images]
    outputs = run_network_batch(net, smalls)
    return [_soft_edges(hed_edge_map(out, safe), image.shape[:2], scribble) for out, image in zip(outputs, images)]


def hed(image: np.ndarray, weights: str = "", detect_resolution: int = DETECT_RESOLUTION, safe: bool = False,
        scribble: bool = False, device: str = "cpu") -> np.ndarray:
    """HED soft edges (ControlNet 1.1 ``ControlNetHED.pth``; softedge and scribble ControlNets).

    Input: RGB 0..255 as float, not scaled (the network subtracts its own ``norm``). Output: sigmoid of the mean of
    the five side outputs; ``safe`` quantises to 3 levels; ``scribble`` thins to strokes (gradio_scribble.py).
    """
    return hed_batch([image], weights, detect_resolution, safe, scribble, device)[0]


def pidinet_batch(images: list[np.ndarray], weights: str = "", detect_resolution: int = DETECT_RESOLUTION,
                  safe: bool = False, scribble: bool = False, device: str = "cpu") -> list[np.ndarray]:
    """:func:`pidinet` of each image, several per forward."""
    net = _network("pidinet", weights, device)
    smalls = [resize_for_detection(image, detect_resolution)[:, :, ::-1].astype(np.float32) / 255.0
              for image in images]  # RGB → BGR
    outputs = run_network_batch(net, smalls)
    return [_soft_edges(pidinet_edge_map(out[-1], safe), image.shape[:2], scribble)
            for out, image in zip(outputs, images)]


def pidinet(image: np.ndarray, weights: str = "", detect_resolution: int = DETECT_RESOLUTION, safe: bool = False,
            scribble: bool = False, device: str = "cpu") -> np.ndarray:
    """PiDiNet soft edges (``table5_pidinet.pth``; softedge and scribble ControlNets).

    Input: the image reversed to **BGR**, divided by 255. Output: the fused sigmoid map; ``safe`` quantises to 3
    levels; ``scribble`` thins to strokes (gradio_scribble.py).
    """
    return pidinet_batch([image], weights, detect_resolution, safe, scribble, device)[0]


# --- lineart -------------------------------------------------------------------------------------------------


def lineart_drawing(output: torch.Tensor) -> np.ndarray:
    """LineartDetector's return value from the network output ``(1, 1, H, W)``: a uint8 drawing, dark lines on
    white."""
    return to_uint8(output[0, 0].detach().cpu().numpy())


def _lineart(name: str, images: list[np.ndarray], weights: str, detect_resolution: int,
             device: str) -> list[np.ndarray]:
    net = _network(name, weights, device)
    smalls = [resize_for_detection(image, detect_resolution).astype(np.float32) / 255.0 for image in images]
    outputs = run_network_batch(net, smalls)
    # gradio_lineart.py feeds 1 - drawing / 255 (after resizing) to the ControlNet: white lines on black.
    return [255 - to_condition(lineart_drawing(out), image.shape[:2]) for out, image in zip(outputs, images)]


def lineart_batch(images: list[np.ndarray], weights: str = "", detect_resolution: int = DETECT_RESOLUTION,
                  device: str = "cpu") -> list[np.ndarray]:
    """:func:`lineart` of each image, several per forward."""
    return _lineart("lineart", images, weights, detect_resolution, device)


def lineart(image: np.ndarray, weights: str = "", detect_resolution: int = DETECT_RESOLUTION,
            device: str = "cpu") -> np.ndarray:
    """Realistic line art (``sk_model.pth``; lineart ControlNet): RGB / 255 in, white lines on black out."""
    return _lineart("lineart", [image], weights, detect_resolution, device)[0]


def lineart_coarse_batch(images: list[np.ndarray], weights: str = "", detect_resolution: int = DETECT_RESOLUTION,
                         device: str = "cpu") -> list[np.ndarray]:
    """:func:`lineart_coarse` of each image, several per forward."""
    return _lineart("lineart_coarse", images, weights, detect_resolution, device)


def lineart_coarse(image: np.ndarray, weights: str = "", detect_resolution: int = DETECT_RESOLUTION,
                   device: str = "cpu") -> np.ndarray:
    """Coarse line art (``sk_model2.pth``; lineart ControlNet): RGB / 255 in, white lines on black out."""
    return _lineart("lineart_coarse", [image], weights, detect_resolution, device)[0]


# --- M-LSD -----------------------------------------------------------------------------------------------------


def mlsd_input(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB → ``(H, W, 4)`` float32: R, G, B and ones, scaled by x / 127.5 - 1 (pred_lines)."""
    planes = np.concatenate([image, np.ones(image.shape[:2] + (1,))], axis=-1).astype(np.float32)
    return planes / MLSD_SCALE - 1.0


def draw_segments(lines: np.ndarray, height: int, width: int) -> np.ndarray:
    """MLSDdetector's drawing: each segment a 1-px white line (end points truncated to int) on black ``(H, W)``."""
    canvas = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1 in lines:
        cv2.line(canvas, (int(x0), int(y0)), (int(x1), int(y1)), 255, 1)
    return canvas


def mlsd_batch(images: list[np.ndarray], weights: str = "", model: str = "large",
               detect_resolution: int = DETECT_RESOLUTION, thr_v: float = MLSD_SCORE_THRESHOLD,
               thr_d: float = MLSD_DISTANCE_THRESHOLD, device: str = "cpu") -> list[np.ndarray]:
    """:func:`mlsd` of each image, several per forward."""
    name = "mlsd" if model == "large" else "mlsd_tiny"
    try:
        net = _network(name, weights, device)
    except UserError as err:
        if model == "large" and MLSD_TINY_FILE in str(err):
            raise UserError(f"{err}; for this file use --model tiny") from None
        raise
    from controlnet.annotators.networks.mlsd import decode_lines

    smalls = [resize_for_detection(image, detect_resolution) for image in images]
    outputs = run_network_batch(net, [mlsd_input(small) for small in smalls])
    return [to_condition(draw_segments(decode_lines(out, thr_v, thr_d), *small.shape[:2]), image.shape[:2])
            for out, small, image in zip(outputs, smalls, images)]


def mlsd(image: np.ndarray, weights: str = "", model: str = "large", detect_resolution: int = DETECT_RESOLUTION,
         thr_v: float = MLSD_SCORE_THRESHOLD, thr_d: float = MLSD_DISTANCE_THRESHOLD,
         device: str = "cpu") -> np.ndarray:
    """M-LSD straight lines (``mlsd_large_512_fp32.pth``, or M-LSD tiny with ``model="tiny"``; mlsd ControlNet).

    Input: RGB plus a plane of ones, x / 127.5 - 1. Decoding: the 200 strongest 3x3 local maxima of the centre
    map whose score > ``thr_v`` and whose segment is longer than ``thr_d`` (half-resolution pixels) become
    segments, drawn 1 px wide, white on black.
    """
    return mlsd_batch([image], weights, model, detect_resolution, thr_v, thr_d, device)[0]


# --- registration ------------------------------------------------------------------------------------------------


def _status(name: str) -> Callable[[], str]:
    filename = NETWORKS[name].filename
    if filename is None:
        return lambda: "no default weights: pass --weights FILE"
    return lambda: weights_status(ANNOTATORS_REPO, filename)


def _common(name: str) -> list[Param]:
    spec = NETWORKS[name]
    default = f"{ANNOTATORS_REPO}/{spec.filename}"
    return [
        Param("weights", str, "", f"weights file, folder or hub id (default: {default})"),
        Param("detect_resolution", int, DETECT_RESOLUTION, "short side the network sees (rounded to 64)",
              minimum=64, maximum=4096),
    ]


_DEVICE = Param("device", str, "cpu", "torch device: cpu, cuda, cuda:N, mps or auto")
_SAFE = Param("safe", bool, False, "quantise to 3 levels (ControlNet 1.1 'safe' softedge)")
_SCRIBBLE = Param("scribble", bool, False, "thin to scribble strokes (nms + blur, scribble ControlNets)")


def register_network_detectors(register: Callable[..., object]) -> None:
    """Register ``hed``, ``pidinet``, ``lineart``, ``lineart_coarse`` and ``mlsd`` with ``register`` (the signature
    of :func:`controlnet.annotators.register`), each with its batch form."""
    register("hed", hed, "HED soft edges, ControlNet 1.1 network (softedge, scribble ControlNets)",
             _common("hed") + [_SAFE, _SCRIBBLE, _DEVICE], weights=_status("hed"), batch=hed_batch)
    register("pidinet", pidinet, "PiDiNet soft edges, ControlNet 1.1 network (softedge, scribble ControlNets)",
             _common("pidinet") + [_SAFE, _SCRIBBLE, _DEVICE], weights=_status("pidinet"), batch=pidinet_batch)
    register("lineart", lineart, "realistic line art, white on black (lineart ControlNet)",
             _common("lineart") + [_DEVICE], weights=_status("lineart"), batch=lineart_batch)
    register("lineart_coarse", lineart_coarse, "coarse line art, white on black (lineart ControlNet)",
             _common("lineart_coarse") + [_DEVICE], weights=_status("lineart_coarse"), batch=lineart_coarse_batch)
    register(
        "mlsd", mlsd, "M-LSD straight lines, white on black (mlsd ControlNets)",
        _common("mlsd") + [
            Param("model", str, "large", "large (mlsd_large_512_fp32.pth) or tiny (mlsd_tiny_512_fp32.pth, "
                  "weights required)", choices=("large", "tiny")),
            Param("thr_v", float, MLSD_SCORE_THRESHOLD, "line-centre score threshold", minimum=0, maximum=1),
            Param("thr_d", float, MLSD_DISTANCE_THRESHOLD, "minimum segment length (half-resolution px)",
                  minimum=0),
            _DEVICE,
        ],
        weights=_status("mlsd"),
        batch=mlsd_batch,
    )
