"""Annotators: turn images (or depth maps, label maps, keypoints) into ControlNet condition images.

Every annotator is a callable ``annotator(image, **params) -> (H, W, 3) uint8`` found by name::

    from controlnet import annotators

    edges = annotators.get("canny")("photo.jpg", low_threshold=100, high_threshold=200)
    annotators.list_annotators()          # ['canny', 'depth', 'depth_map', ...]
    annotators.REGISTRY["canny"].params   # declared parameters with their defaults

The model-free ones (canny, lines, scribble, shuffle, tile, inpaint, invert, shapes and the ``*_map`` / ``pose_json``
renderers of data you already have) need no weights. The neural detectors of the ControlNet 1.1 releases (hed,
pidinet, lineart, lineart_coarse, mlsd, openpose, openpose_hand) and the transformers-based ones (depth, normal,
segmentation, pose) take ``weights`` (a file, a folder or a hub id; default: their hub repository through the
huggingface_hub cache). Your own detector is added with :func:`register` (see the README).

Parameters given as text use one syntax everywhere (``controlnet annotate``, ``generate --annotator-param``,
``train --annotator-param``, the web UI): ``key=value`` pairs read by :func:`parse_params`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from controlnet.annotators import edges, pose as _pose, structured, transforms
from controlnet.annotators.inputs import KINDS
from controlnet.annotators.registry import Annotator, Param
from controlnet.annotators.transforms import inpaint_condition, inpaint_condition_from_uint8
from controlnet.data import shapes as _shapes
from controlnet.errors import UserError

__all__ = [
    "Annotator",
    "Param",
    "REGISTRY",
    "annotate",
    "get",
    "inpaint_condition",
    "inpaint_condition_from_uint8",
    "list_annotators",
    "parse_params",
    "path_params",
    "register",
]

REGISTRY: dict[str, Annotator] = {}


def register(
    name: str,
    fn: Callable[..., np.ndarray],
    description: str,
    params: Iterable[Param] = (),
    input_kind: str = "image",
    replace: bool = False,
    weights: Callable[[], str] | None = None,
    batch: Callable[..., list[np.ndarray]] | None = None,
    check: Callable[[dict[str, Any]], object] | None = None,
) -> Annotator:
    """Add an annotator ``fn(image, **params) -> (H, W, 3) uint8`` under ``name``; return its :class:`Annotator`.

    ``params`` declares every keyword ``fn`` takes (name, type, default, help); ``input_kind`` is one of
    ``image``, ``depth``, ``labels``, ``keypoints`` (what ``image`` is); ``weights`` (detectors with a network)
    returns a one-line status of the default weights, shown by ``controlnet annotate --list``; ``batch`` is ``fn``
    over a list of images (``batch(images, **params) -> list``, outputs equal to ``fn``'s), which folder mode uses
    to run several images per network forward; ``check(params)`` raises for what would make every image fail
    (see :meth:`Annotator.check_ready`). A name already taken raises unless ``replace=True``.
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"annotator name must be letters, digits, '-' or '_'; got {name!r}")
    if name in REGISTRY and not replace:
        raise ValueError(f"annotator {name!r} is already registered; pass replace=True to replace it")
    if input_kind not in KINDS:
        raise ValueError(f"annotator {name!r}: input_kind must be one of {', '.join(KINDS)}; got {input_kind!r}")
    params = tuple(params)
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ValueError(f"annotator {name!r}: duplicate parameter names in {names}")
    annotator = Annotator(name=name, fn=fn, description=description, params=params, input_kind=input_kind,
                          weights=weights, batch=batch, check=check)
    REGISTRY[name] = annotator
    return annotator


def get(name: str) -> Annotator:
    """The annotator called ``name``; an unknown name raises :class:`UserError` listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown annotator {name!r}; choose one of: {', '.join(list_annotators())}") from None


def list_annotators() -> list[str]:
    """Names of all registered annotators, sorted."""
    return sorted(REGISTRY)


def path_params(name: str) -> set[str]:
    """The parameters of annotator ``name`` whose values are paths on this machine (``Path``-typed ones such as
    ``mask``, ``keypoints`` and ``json``, and those declared with ``path=True`` such as ``weights``): what a web
    client or a settings file from elsewhere must not set."""
    return get(name).path_params()


def parse_params(name: str, pairs: Iterable[str]) -> dict[str, Any]:
    """The typed parameters of annotator ``name`` from ``key=value`` strings (see :meth:`Annotator.parse_params`),
    e.g. ``parse_params("canny", ["low_threshold=50"]) == {"low_threshold": 50}``."""
    return get(name).parse_params(pairs)


def annotate(name: str, image: Any = None, **params: Any) -> np.ndarray:
    """``get(name)(image, **params)``: the condition image ``(H, W, 3)`` uint8."""
    return get(name)(image, **params)


def _register_builtins() -> None:
    seed = Param("seed", int, 0, "random seed (same seed, same output)", minimum=0)
    register(
        "canny", edges.canny, "Canny edges, white on black (canny ControlNets)",
        [
            Param("low_threshold", int, edges.CANNY_LOW, "hysteresis low threshold", minimum=0, maximum=1000),
            Param("high_threshold", int, edges.CANNY_HIGH, "hysteresis high threshold", minimum=0, maximum=1000),
        ],
    )
    register(
        "lines", edges.lines, "straight line segments, white on black (M-LSD ControlNets)",
        [
            Param("min_length", float, 20.0, "drop segments shorter than this (px)", minimum=0),
            Param("merge_distance", float, 4.0, "parallel segments this close become one centre line (px)",
                  minimum=0),
            Param("detector", str, "lsd", "OpenCV line segment detector or probabilistic Hough",
                  choices=("lsd", "hough")),
            Param("max_gap", float, 5.0, "hough: join collinear pieces this close (px)", minimum=0),
            Param("thickness", int, 1, "drawn line width (px)", minimum=1, maximum=64),
        ],
    )
    register(
        "softedge", edges.softedge, "multi-scale gradient soft edges (HED/PiDiNet stand-in; softedge, hed ControlNets)",
        [
            Param("scales", int, 3, "number of octaves (blur sigma doubles each)", minimum=1, maximum=8),
            Param("sigma", float, 1.0, "blur sigma of the finest octave (px)", minimum=0.3, maximum=32),
            Param("gain", float, 2.0, "edge strength multiplier before clipping", minimum=0.1, maximum=100),
            Param("safe", bool, False, "quantise to few levels (ControlNet 1.1 'safe' softedge)"),
        ],
    )
    register(
        "scribble", edges.scribble, "synthetic scribble from edges: thick, wobbly, partly dropped strokes (scribble ControlNets)",
        [
            seed,
            Param("width", int, 5, "stroke width (px, varied by +-1 at random)", minimum=1, maximum=64),
            Param("drop", float, 0.2, "fraction of stroke pieces removed", minimum=0, maximum=1),
            Param("jitter", float, 2.0, "largest stroke wobble (px)", minimum=0, maximum=64),
        ],
    )
    register(
        "shuffle", transforms.shuffle, "ControlNet 1.1 content shuffle (random smooth flow remap)",
        [
            seed,
            Param("cell", int, transforms.SHUFFLE_CELL, "px per random flow control point", minimum=1),
            Param("uniform", bool, True, "rank-equalise the flow (keeps the colour histogram); false: original"),
        ],
    )
    register(
        "tile", transforms.tile, "down/up-sampled blurry image (ControlNet 1.1 tile)",
        [Param("factor", float, transforms.TILE_FACTOR, "downsampling factor", minimum=1, maximum=512)],
    )
    register(
        "inpaint", transforms.inpaint, "image with masked pixels black (0, 0, 0), others >= 1 (ControlNet 1.1 inpaint)",
        [Param("mask", Path, None, "mask image, white = area to repaint (same size)", required=True)],
    )
    register(
        "shapes", _shapes.detect_shapes,
        "shapes-world segmentation: background/circle/square/triangle in the ADE20K palette (the embedded shapes "
        "ControlNets)",
    )
    register("invert", transforms.invert, "255 - image: black-on-white line art to white-on-black (lineart, scribble)")
    register(
        "pose_json", _pose.pose, "OpenPose JSON keypoints as the colour-coded COCO-18 skeleton (openpose ControlNets)",
        [
            Param("keypoints", Path, None, "OpenPose JSON: people[].pose_keypoints_2d (COCO-18 or BODY_25); "
                  "for people in a photo use the openpose or pose annotator instead", required=True),
            Param("threshold", float, _pose.RENDER_THRESHOLD, "skip keypoints below this confidence", minimum=0),
            Param("stick_width", int, _pose.STICK_WIDTH, "limb half-width (px)", minimum=1, maximum=64),
            Param("joint_radius", int, _pose.JOINT_RADIUS, "joint circle radius (px)", minimum=1, maximum=64),
            Param("hands", bool, False, "draw hand_*_keypoints_2d (openpose_full)"),
            Param("face", bool, False, "draw face_keypoints_2d (openpose_full)"),
            Param("normalized", bool, False, "coordinates are in [0, 1], not pixels"),
            Param("width", int, 0, "canvas width when no image is given (0: from JSON canvas_width, else 512)",
                  minimum=0, maximum=16384),
            Param("height", int, 0, "canvas height when no image is given (0: from JSON canvas_height, else 512)",
                  minimum=0, maximum=16384),
        ],
        input_kind="keypoints",
    )
    register(
        "segmentation_map", structured.segmentation, "label map (class indices) in the ADE20K or COCO-Stuff palette (seg ControlNets)",
        [
            Param("palette", str, "ade20k", "ade20k (150 classes) or cocostuff (171)", choices=("ade20k", "cocostuff")),
            Param("offset", int, 0, "subtract from labels first (1 for raw ADEChallenge PNGs)", minimum=-65536,
                  maximum=65536),
        ],
        input_kind="labels",
    )
    near = Param("near", str, "auto", "small: values are distances; large: disparity; auto: uint8 = large",
                 choices=("auto", "small", "large"))
    register(
        "depth_map", structured.depth, "16-bit/float depth to 8-bit, near = bright (depth ControlNets)",
        [
            near,
            Param("low", float, 0.0, "percentile mapped to the far end", minimum=0, maximum=100),
            Param("high", float, 100.0, "percentile mapped to the near end", minimum=0, maximum=100),
        ],
        input_kind="depth",
    )
    register(
        "normal_map", structured.normal, "normal map from depth: Sobel gradients, background threshold (normal ControlNet)",
        [
            Param("a", float, structured.NORMAL_Z, "z component before normalising (original: 2 pi)", minimum=1e-6),
            Param("bg_threshold", float, structured.NORMAL_BG_THRESHOLD, "nearness below this is flat background",
                  minimum=0, maximum=1),
            Param("depth_scale", float, structured.NORMAL_DEPTH_SCALE, "depth range (0..1 nearness times this)",
                  minimum=1e-6),
            near,
            Param("layout", str, "xyz", "xyz: R=x, G=y, B=z; zyx: reversed, as control_sd15_normal was fed",
                  choices=("xyz", "zyx")),
        ],
        input_kind="depth",
    )
    from controlnet.annotators import openpose, released, transformers_detectors

    released.register_network_detectors(register)  # hed, pidinet, lineart, lineart_coarse, mlsd
    openpose.register_photo_detectors(register)  # openpose, openpose_hand
    transformers_detectors.register_photo_detectors(register)  # depth, normal, segmentation, pose


_register_builtins()
