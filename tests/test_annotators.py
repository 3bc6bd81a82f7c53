"""Annotators on synthetic inputs with known answers, the registry, and the ``controlnet annotate`` CLI."""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tempfile
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from controlnet import annotators
from controlnet.annotators import Param, pose, transforms
from controlnet.annotators.edges import detect_segments
from controlnet.annotators.palettes import ADE20K, COCO_STUFF
from controlnet.errors import UserError
from controlnet.images import load_image
from fixture_weights import ANNOTATOR_FIXTURES, write_released_weights

# ---------------------------------------------------------------------------------------------------------------
# helpers


def shapes_image(h: int = 96, w: int = 128) -> np.ndarray:
    """A dark background with a filled rectangle and a disk (the grid figure uses a larger version)."""
    img = np.full((h, w, 3), 20, np.uint8)
    cv2.rectangle(img, (w // 8, h // 6), (w // 2, h // 2), (230, 60, 40), -1)
    cv2.circle(img, (3 * w // 4, 2 * h // 3), h // 5, (40, 200, 90), -1)
    return img


def required_params(name: str, h: int, w: int) -> dict:
    if name == "inpaint":
        mask = np.zeros((h, w), bool)
        mask[: h // 2] = True
        return {"mask": mask}
    if name == "pose_json":
        return {"keypoints": {"people": [{"pose_keypoints_2d": [w / 2, h / 2, 1.0] * 18}]}}
    if name in ANNOTATOR_FIXTURES:  # network detectors: stand-in weights in the released layout, small input
        return {"weights": str(_stand_in_weights(name)), "detect_resolution": 64}
    if name == "openpose":  # stand-in weights in the released flat-key layout
        return {"weights": str(_openpose_weights("openpose"))}
    if name == "openpose_hand":
        return {"weights": str(_openpose_weights("openpose")), "hand_weights": str(_openpose_weights("openpose_hand"))}
    if name in ("depth", "normal"):  # tiny randomly initialised transformers models of the real architectures
        return {"weights": str(_tiny_model("dpt_hybrid"))}
    if name == "segmentation":
        return {"weights": str(_tiny_model("oneformer"))}
    if name == "pose":
        return {"weights": str(_tiny_model("vitpose")), "detector_weights": str(_tiny_model("rtdetr"))}
    return {}


@functools.lru_cache(maxsize=None)
def _openpose_weights(name: str) -> Path:
    from test_openpose import write_released_openpose

    return write_released_openpose(name, Path(_weights_folder().name))


@functools.lru_cache(maxsize=None)
def _tiny_model(architecture: str) -> Path:
    from test_hf_detectors import build_tiny

    return build_tiny(architecture, Path(_weights_folder().name) / architecture)


@functools.lru_cache(maxsize=None)
def _stand_in_weights(name: str) -> Path:
    return write_released_weights(name, _weights_folder().name)


@functools.lru_cache(maxsize=None)
def _weights_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="annotator-weights-")  # removed when the test process exits


def dist_to_mask(mask: np.ndarray) -> np.ndarray:
    """Distance (px) of every pixel to the nearest set pixel of ``mask``."""
    return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)


def cli(argv: list[str]) -> int:
    """Run ``controlnet ARGV`` for the annotate command, by the dispatcher's rule (UserError -> one line on
    stderr, exit code 2), without importing the other commands (``test_full_dispatcher`` covers that path)."""
    from controlnet.commands.annotate import register

    parser = argparse.ArgumentParser(prog="controlnet")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"controlnet {args.command}: error: {err}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------------------------
# model-free annotators


def test_canny_marks_rectangle_border_and_nothing_far():
    img = np.zeros((64, 80, 3), np.uint8)
    cv2.rectangle(img, (20, 15), (59, 44), (255, 255, 255), -1)
    out = annotators.annotate("canny", img)
    edges = out[..., 0] > 0
    assert (out[..., 0] == out[..., 1]).all() and set(np.unique(out)) <= {0, 255}
    border = np.zeros((64, 80), bool)
    cv2.rectangle(border.view(np.uint8), (20, 15), (59, 44), 1, 1)
    assert dist_to_mask(border)[edges].max() <= 1.5  # nothing far from the border
    assert (dist_to_mask(edges)[border] <= 1.5).mean() > 0.95  # the border is marked all round
    # thresholds above every gradient (a step of 51 grey levels: 3x3 Sobel L1 gradient 4 * 51): no edges
    assert annotators.annotate("canny", img // 5, low_threshold=300, high_threshold=400).max() == 0
    assert annotators.annotate("canny", img // 5, low_threshold=100, high_threshold=200).max() == 255


@pytest.mark.parametrize("detector", ["lsd", "hough"])
def test_lines_recovers_drawn_segments(detector):
    img = np.zeros((128, 160, 3), np.uint8)
    drawn = [((10, 20), (140, 20)), ((30, 40), (30, 120)), ((50, 110), (150, 52))]
    for a, b in drawn:
        cv2.line(img, a, b, (255, 255, 255), 2)
    found = detect_segments(img, min_length=20, detector=detector)

    def angle(x1, y1, x2, y2):
        return math.degrees(math.atan2(y2 - y1, x2 - x1)) % 180

    def distance(point, a, b):  # perpendicular distance of point to the infinite line a-b
        (px, py), (ax, ay), (bx, by) = point, a, b
        return abs((bx - ax) * (ay - py) - (ax - px) * (by - ay)) / math.hypot(bx - ax, by - ay)

    def matches(seg, a, b):
        d_angle = abs(angle(*seg) - angle(*a, *b))
        d_angle = min(d_angle, 180 - d_angle)
        return d_angle <= 2 and max(distance(seg[:2], a, b), distance(seg[2:], a, b)) <= 2

    assert len(found) == len(drawn)  # the two sides of each stroke were merged into one centre line
    for a, b in drawn:  # every drawn segment is found, along most of its length
        hits = [s for s in found if matches(s, a, b)]
        assert hits, f"segment {a}-{b} not found by {detector}"
        longest = max(math.hypot(s[2] - s[0], s[3] - s[1]) for s in hits)
        assert longest >= 0.85 * math.hypot(b[0] - a[0], b[1] - a[1])
    for s in found:  # and nothing else
        assert any(matches(s, a, b) for a, b in drawn)
    out = annotators.annotate("lines", img, detector=detector)
    assert out.shape == img.shape and set(np.unique(out)) == {0, 255}


def test_softedge_step_edge_and_safe_levels():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 255
    out = annotators.annotate("softedge", img)[..., 0]
    assert out[:, 29:31].min() == 255  # a full-contrast step scores 1 (then gain, clipped)
    assert out[:, :5].max() == 0 and out[:, -5:].max() == 0  # flat areas score 0
    safe = annotators.annotate("softedge", shapes_image(), safe=True)
    assert len(np.unique(safe)) <= 3


def test_scribble_reproducible_differs_across_seeds_and_follows_edges():
    img = shapes_image(128, 160)
    a = annotators.annotate("scribble", img, seed=1)
    assert np.array_equal(a, annotators.annotate("scribble", img, seed=1))
    b = annotators.annotate("scribble", img, seed=2)
    assert not np.array_equal(a, b)
    strokes = a[..., 0] > 0
    assert strokes.any()
    edges = annotators.annotate("canny", img)[..., 0] > 0
    assert dist_to_mask(edges)[strokes].max() <= 3 + 6 + 2  # width/2 + jitter + smoothing shift
    assert annotators.annotate("scribble", img, drop=1.0).max() == 0  # every piece dropped


def test_shuffle_keeps_colour_histogram_and_changes_with_seed():
    rng = np.random.default_rng(0)
    img = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((16, 16, 1))).astype(np.uint8)  # 128 x 128 blocks
    a = annotators.annotate("shuffle", img, seed=0, cell=16)

    def hist(x):
        return np.concatenate([np.bincount(x[..., c].ravel() // 16, minlength=16) for c in range(3)]) / x[..., 0].size

    other = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    assert np.abs(hist(a) - hist(img)).sum() < 0.5 * np.abs(hist(other) - hist(img)).sum()
    assert not np.array_equal(a, img)
    assert np.array_equal(a, annotators.annotate("shuffle", img, seed=0, cell=16))
    assert not np.array_equal(a, annotators.annotate("shuffle", img, seed=1, cell=16))
    original = annotators.annotate("shuffle", img, seed=0, uniform=False)  # the original min-max flow
    assert original.shape == img.shape and not np.array_equal(original, img)


def test_tile_blurs_fine_detail_and_keeps_flat_colour():
    flat = np.full((33, 47, 3), (10, 120, 240), np.uint8)
    assert np.array_equal(annotators.annotate("tile", flat), flat)
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = annotators.annotate("tile", checker)
    assert abs(float(out.mean()) - 127.5) < 2 and out.std() < 3


def test_inpaint_marks_masked_pixels_and_round_trips_to_float():
    img = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img[0, 0] = 0  # a black pixel outside the mask must not read as masked
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20] = 255
    out = annotators.annotate("inpaint", img, mask=mask)
    assert (out[5:15, 10:20] == 0).all()
    keep = mask == 0
    assert np.array_equal(out[keep], np.maximum(img, 1)[keep])
    cond = annotators.inpaint_condition_from_uint8(out)
    exact = annotators.inpaint_condition(img, mask)
    assert (exact[mask > 0] == -1.0).all() and (cond[mask > 0] == -1.0).all()
    assert np.abs(cond - exact).max() <= 1 / 255 + 1e-7
    with pytest.raises(UserError, match="mask size"):
        annotators.annotate("inpaint", img, mask=np.zeros((5, 5), np.uint8))
    with pytest.raises(UserError, match="required"):
        annotators.annotate("inpaint", img)


def test_invert_is_exact():
    img = np.random.default_rng(4).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert np.array_equal(annotators.annotate("invert", img), 255 - img)


# ---------------------------------------------------------------------------------------------------------------
# structured inputs


def test_pose_colours_are_the_openpose_hue_wheel():
    assert pose.COLOURS[:4] == ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0))
    assert pose.COLOURS[12] == (0, 0, 255) and pose.COLOURS[17] == (255, 0, 85)
    assert len(pose.LIMBS) == 17 and len(set(pose.COLOURS)) == 18


# A standing figure on a 256 x 256 canvas (COCO-18 order), joints well apart.
FIGURE = [
    (128, 40), (128, 70), (100, 70), (80, 105), (70, 140), (156, 70), (176, 105), (186, 140),
    (110, 140), (108, 185), (106, 230), (146, 140), (148, 185), (150, 230), (120, 32), (136, 32), (110, 36), (146, 36),
]  # fmt: skip


def _figure_json(confidence: list[float] | None = None, body25: bool = False) -> dict:
    conf = confidence or [0.9] * 18
    flat = [v for (x, y), c in zip(FIGURE, conf) for v in (x, y, c)]
    if body25:  # insert mid-hip at 8 and six foot points at 19..24
        pts = [flat[i : i + 3] for i in range(0, len(flat), 3)]
        pts = pts[:8] + [[128, 140, 0.9]] + pts[8:] + [[0, 0, 0]] * 6
        flat = [v for p in pts for v in p]
    return {"canvas_width": 256, "canvas_height": 256, "people": [{"pose_keypoints_2d": flat}]}


def test_pose_draws_each_joint_in_its_colour_at_its_place():
    canvas = np.zeros((256, 256, 3), np.uint8)
    out = annotators.annotate("pose_json", canvas, keypoints=_figure_json())
    for k, (x, y) in enumerate(FIGURE):
        assert tuple(out[y, x]) == pose.COLOURS[k], f"joint {k} ({pose.COCO18[k]})"
    # limb 7 (right hip -> right knee) at its middle: colour 7 at 60 %
    (xa, ya), (xb, yb) = FIGURE[8], FIGURE[9]
    mid = out[(ya + yb) // 2, (xa + xb) // 2]
    assert tuple(mid) == tuple(int(c * 0.6) for c in pose.COLOURS[7])
    assert out[5, 5].tolist() == [0, 0, 0]  # background stays black
    # BODY_25 input renders the same; a joint below the threshold is not drawn
    assert np.array_equal(out, annotators.annotate("pose_json", canvas, keypoints=_figure_json(body25=True)))
    conf = [0.9] * 18
    conf[4] = 0.01
    missing = annotators.annotate("pose_json", canvas, keypoints=_figure_json(conf))
    assert tuple(missing[FIGURE[4][1], FIGURE[4][0]]) == (0, 0, 0)


def test_pose_from_json_file_uses_its_canvas(tmp_path):
    path = tmp_path / "people.json"
    path.write_text(json.dumps(_figure_json()))
    out = annotators.get("pose_json")(None, keypoints=path)
    assert out.shape == (256, 256, 3)
    assert cli(["annotate", "pose_json", str(path), str(tmp_path / "pose.png"), "--quiet"]) == 0
    assert np.array_equal(load_image(tmp_path / "pose.png"), out)
    (tmp_path / "bad.json").write_text('{"people": [{"pose_keypoints_2d": [1, 2]}]}')
    with pytest.raises(UserError, match="multiple of 3"):
        annotators.get("pose_json")(None, keypoints=tmp_path / "bad.json")


def test_segmentation_maps_class_k_to_palette_colour_k(tmp_path):
    labels = np.arange(171).reshape(9, 19)
    ade = annotators.annotate("segmentation_map", labels)
    inside = labels < 150
    assert np.array_equal(ade[inside], ADE20K[labels[inside]])
    assert (ade[~inside] == 0).all()  # outside the palette: black
    coco = annotators.annotate("segmentation_map", labels, palette="cocostuff")
    assert np.array_equal(coco.reshape(-1, 3), COCO_STUFF)
    assert ADE20K[0].tolist() == [120, 120, 120] and ADE20K[149].tolist() == [92, 0, 255]
    # a P-mode label PNG gives its palette indices; a raw ADEChallenge file needs offset=1
    raw = labels[:, :10] % 150 + 1  # ADEChallenge numbering: 0 = other, 1..150 = classes
    png = Image.fromarray(raw.astype(np.uint8), "P")
    png.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    png.save(tmp_path / "labels.png")
    out = annotators.annotate("segmentation_map", tmp_path / "labels.png", offset=1)
    assert np.array_equal(out, ADE20K[raw - 1])


def test_normal_of_a_tilted_plane_is_constant_and_points_the_right_way():
    x = np.arange(64, dtype=np.float64)
    plane = np.tile(100.0 + 2.0 * x, (48, 1))  # nearness grows to the right (near = large values)
    out = annotators.annotate("normal_map", plane, near="large")
    inner = out[2:-2, 10:-2].reshape(-1, 3)  # away from the image border and from the background strip
    assert (inner == inner[0]).all()
    r, g, b = (int(v) for v in inner[0])
    assert r > 140 and g == 127 and b > 140  # right side nearer: x component positive, no y component
    mirrored = annotators.annotate("normal_map", plane[:, ::-1], near="large")[2:-2, 2:-10].reshape(-1, 3)
    assert (mirrored[:, 0] < 115).all()
    down = annotators.annotate("normal_map", plane.T.copy(), near="large")[10:-2, 2:-2].reshape(-1, 3)
    assert (down[:, 1] > 140).all() and (down[:, 0] == 127).all()
    assert (out[:, :5] == (127, 127, 255)).all()  # nearness < 0.1: background, facing the camera
    zyx = annotators.annotate("normal_map", plane, near="large", layout="zyx")
    assert np.array_equal(zyx, out[..., ::-1])
    # metric depth (far = large) of the same plane gives the same normals
    metric = annotators.annotate("normal_map", 1000.0 - plane, near="small")
    assert np.array_equal(metric[2:-2, 10:-2], out[2:-2, 10:-2])


def test_depth_16bit_metric_to_8bit_near_bright(tmp_path):
    metric = np.full((20, 30), 4000, np.uint16)  # 4 m background
    metric[5:10, 5:10] = 1000  # 1 m object: nearest
    metric[0, 0] = 0  # no reading
    Image.fromarray(metric).save(tmp_path / "d.png")
    out = annotators.annotate("depth_map", tmp_path / "d.png")
    assert out[7, 7].tolist() == [255, 255, 255] and out[15, 20].tolist() == [0, 0, 0]
    assert out[0, 0].tolist() == [0, 0, 0]
    # 8-bit input already near = bright: kept in order, stretched to the full range
    grey = np.array([[50, 100, 150]], np.uint8)
    assert annotators.annotate("depth_map", grey)[..., 0].tolist() == [[0, 128, 255]]
    np.save(tmp_path / "d.npy", np.array([[1.0, 2.0, 3.0]], np.float32))
    assert annotators.annotate("depth_map", tmp_path / "d.npy")[..., 0].tolist() == [[255, 128, 0]]


# ---------------------------------------------------------------------------------------------------------------
# every annotator, every input form


MODES = ["L", "LA", "RGB", "RGBA", "P", "I;16"]


# Neural detectors read their input through the same loader (inputs.load) as the others, so every mode is covered
# by the model-free annotators; each network runs once per size here (a forward takes seconds on a CPU), and its
# numerics are tested against the reference fixtures in test_detectors.py, test_openpose.py, test_hf_detectors.py.
NEURAL = {"hed", "pidinet", "lineart", "lineart_coarse", "mlsd", "openpose", "openpose_hand", "depth", "normal",
          "segmentation", "pose"}


# OpenPose with hands runs its hand network on every hand box it finds: minutes on a CPU.
SLOW_ANNOTATORS = {"openpose_hand"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ANNOTATORS else n
                                  for n in annotators.list_annotators()])
def test_every_annotator_accepts_every_mode_and_odd_size(name):
    h, w = 21, 33
    grey = (np.indices((h, w)).sum(axis=0) * 5 % 200 + 20).astype(np.uint8)
    rgb = np.stack([grey, grey, grey], axis=2)
    cv2.circle(rgb, (16, 10), 6, (250, 250, 250), -1)
    for mode in (["RGBA"] if name in NEURAL else MODES):
        if mode == "I;16":
            img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        else:
            img = Image.fromarray(rgb).convert(mode)
        out = annotators.annotate(name, img, **required_params(name, h, w))
        assert out.shape == (h, w, 3) and out.dtype == np.uint8, mode
    for th, tw in ([(7, 1)] if name in NEURAL else [(1, 1), (2, 3), (7, 1)]):
        out = annotators.annotate(name, np.full((th, tw, 3), 99, np.uint8), **required_params(name, th, tw))
        assert out.shape == (th, tw, 3)


@pytest.mark.parametrize("name", annotators.list_annotators())
def test_every_annotator_refuses_empty_and_non_image_input(name, tmp_path):
    (tmp_path / "notes.png").write_text("this is not a png")
    for bad in (Image.new("RGB", (0, 0)), tmp_path / "notes.png", np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(UserError) as err:
            annotators.annotate(name, bad, **required_params(name, 1, 1))
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# registry and parameters


def test_params_are_declared_checked_and_defaulted():
    canny = annotators.get("canny")
    assert {p.name: p.default for p in canny.params} == {"low_threshold": 100, "high_threshold": 200}
    for name in annotators.list_annotators():
        a = annotators.get(name)
        assert a.description and all(p.help for p in a.params)
    with pytest.raises(UserError, match="unknown parameter 'low'"):
        annotators.annotate("canny", np.zeros((4, 4, 3), np.uint8), low=5)
    with pytest.raises(UserError, match="expects an integer"):
        annotators.annotate("canny", np.zeros((4, 4, 3), np.uint8), low_threshold="5")
    with pytest.raises(UserError, match="one of"):
        annotators.annotate("segmentation_map", np.zeros((4, 4), np.int64), palette="voc")
    with pytest.raises(UserError, match="unknown annotator"):
        annotators.get("no_such_annotator")


def test_register_a_model_based_annotator_with_a_weights_file(tmp_path):
    """The docs' example: a user's torch module, weights from a local safetensors file, plugged in by name."""
    plugin = tmp_path / "my_edges.py"
    plugin.write_text(textwrap.dedent('''
        from functools import lru_cache
        from pathlib import Path

        import numpy as np
        import torch
        from safetensors.torch import load_file

        from controlnet.annotators import Param, register


        class TinyEdgeNet(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

            def forward(self, x):  # (B, 3, H, W) in [0, 1] -> (B, 1, H, W) in [0, 1]
                return torch.sigmoid(self.conv(x))


        @lru_cache(maxsize=2)
        def load_model(weights: str) -> TinyEdgeNet:
            model = TinyEdgeNet()
            model.load_state_dict(load_file(weights))
            return model.eval()


        def my_edges(image: np.ndarray, weights: Path, threshold: float = 0.5) -> np.ndarray:
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
            with torch.no_grad():
                prob = load_model(str(weights))(x)[0, 0].numpy()  # (H, W)
            grey = np.where(prob > threshold, 255, 0).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)


        register(
            "my_edges", my_edges, "edges from my own network",
            [Param("weights", Path, None, "safetensors file of TinyEdgeNet", required=True),
             Param("threshold", float, 0.5, "probability threshold", minimum=0, maximum=1)],
            replace=True,
        )
    '''))
    import torch
    from safetensors.torch import save_file

    weights = {"conv.weight": torch.zeros(1, 3, 3, 3), "conv.bias": torch.tensor([1.0])}  # sigmoid(1) > 0.5
    save_file(weights, tmp_path / "w.safetensors")
    img = np.zeros((9, 11, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "in.png")
    argv = ["annotate", "--plugin", str(plugin), "my_edges", str(tmp_path / "in.png"), str(tmp_path / "out.png"),
            "--weights", str(tmp_path / "w.safetensors"), "--quiet"]
    try:
        assert cli(argv) == 0
        assert load_image(tmp_path / "out.png").min() == 255
        out = annotators.annotate("my_edges", img, weights=tmp_path / "w.safetensors", threshold=0.9)
        assert out.max() == 0  # sigmoid(1) = 0.73 < 0.9
        with pytest.raises(UserError, match="required"):
            annotators.annotate("my_edges", img)
    finally:
        annotators.REGISTRY.pop("my_edges", None)


def test_parse_params_is_the_one_parser_typed_by_the_declared_params():
    """key=value strings (annotate, generate --annotator-param, train --annotator-param, the UI) → typed values."""
    assert annotators.parse_params("canny", ["low_threshold=50", " high-threshold = 150 "]) == {
        "low_threshold": 50, "high_threshold": 150}
    assert annotators.parse_params("softedge", ["safe=yes", "gain=2", "scales=4"]) == {
        "safe": True, "gain": 2.0, "scales": 4}
    assert annotators.parse_params("inpaint", ["mask=m.png"]) == {"mask": Path("m.png")}
    assert annotators.parse_params("segmentation_map", []) == {}
    for pairs, message in [
        (["low_threshold"], "canny: cannot read the parameter 'low_threshold'; write key=value"),
        (["=5"], "write key=value"),
        (["low=5"], "canny: unknown parameter 'low' (parameters: low_threshold, high_threshold)"),
        (["low_threshold=5", "low_threshold=6"], "canny: parameter 'low_threshold' given twice"),
        (["low_threshold=5.5"], "canny: low_threshold expects an integer, got '5.5'"),
        (["low_threshold=-1"], "must be >= 0"),
    ]:
        with pytest.raises(UserError) as err:
            annotators.parse_params("canny", pairs)
        assert message in str(err.value), str(err.value)
    with pytest.raises(UserError, match="one of ade20k, cocostuff"):
        annotators.parse_params("segmentation_map", ["palette=voc"])
    with pytest.raises(UserError, match="expects true or false"):
        annotators.parse_params("softedge", ["safe=maybe"])


def test_weights_status_is_listed(capsys):
    annotators.register("status_probe", transforms.invert, "a probe", weights=lambda: "weights cached (a/b.pth)")
    try:
        assert annotators.get("status_probe").weights() == "weights cached (a/b.pth)"
        assert cli(["annotate", "--list"]) == 0
        lines = capsys.readouterr().out.splitlines()
        at = lines.index("status_probe: a probe")
        assert lines[at + 1] == "    weights cached (a/b.pth)"
        assert annotators.get("canny").weights is None  # no network, nothing to report
    finally:
        annotators.REGISTRY.pop("status_probe", None)


def test_register_rejects_bad_declarations():
    with pytest.raises(ValueError, match="already registered"):
        annotators.register("canny", lambda im: im, "x")
    with pytest.raises(ValueError, match="input_kind"):
        annotators.register("x_kind", lambda im: im, "x", input_kind="video")
    with pytest.raises(ValueError, match="type"):
        Param("p", list, [], "x")


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_file_mode_params_and_metadata(tmp_path, capsys):
    Image.fromarray(shapes_image()).save(tmp_path / "in.png")
    assert cli(["annotate", "canny", str(tmp_path / "in.png"), str(tmp_path / "e.png"),
                "--low_threshold", "50", "--high-threshold=150"]) == 0
    expected = annotators.annotate("canny", shapes_image(), low_threshold=50, high_threshold=150)
    assert np.array_equal(load_image(tmp_path / "e.png"), expected)
    with Image.open(tmp_path / "e.png") as img:
        assert img.text["controlnet:annotator"] == "canny"
        assert json.loads(img.text["controlnet:params"]) == {"low_threshold": 50, "high_threshold": 150}
    assert cli(["annotate", "softedge", str(tmp_path / "in.png"), str(tmp_path / "s.png"), "--safe"]) == 0
    assert len(np.unique(load_image(tmp_path / "s.png"))) <= 3
    # The key=value syntax of generate/train/the UI works here too, mixed with flags and -q anywhere.
    assert cli(["annotate", "canny", str(tmp_path / "in.png"), str(tmp_path / "e2.png"), "low_threshold=50", "-q",
                "--high_threshold", "150"]) == 0
    assert np.array_equal(load_image(tmp_path / "e2.png"), expected)
    capsys.readouterr()
    assert cli(["annotate", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in annotators.list_annotators()) and "low_threshold" in listing


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--low", "5"], "unknown parameter"),
        (["--low_threshold", "five"], "expects an integer"),
        (["--low_threshold"], "needs a value"),
        (["--low_threshold", "-3"], ">= 0"),
        (["stray"], "unexpected argument"),
        (["low_threshold=5", "--low_threshold", "6"], "given twice"),
        (["--low_threshold", "-q"], "needs a value"),
    ],
)
def test_cli_bad_params_exit_2_with_one_line(tmp_path, capsys, extra, message):
    Image.fromarray(shapes_image()).save(tmp_path / "in.png")
    assert cli(["annotate", "canny", str(tmp_path / "in.png"), str(tmp_path / "o.png"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_cli_refuses_non_image_and_zero_size_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    # a PNG whose header says 0 x 0 pixels
    header = Image.new("RGB", (1, 1))
    header.save(tmp_path / "one.png")
    data = bytearray((tmp_path / "one.png").read_bytes())
    data[16:24] = bytes(8)  # IHDR width and height = 0
    (tmp_path / "zero.png").write_bytes(bytes(data))
    for name in ("notes.txt", "zero.png", "missing.png"):
        assert cli(["annotate", "canny", str(tmp_path / name), str(tmp_path / "o.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert name in err and "\n" not in err
    assert cli(["annotate", "canny", str(tmp_path / "one.png"), str(tmp_path / "o.jpg")]) == 2


def test_cli_folder_mode_uses_a_pool_and_reports_bad_files(tmp_path, capsys):
    src, dest = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(shapes_image(40 + i, 50)).save(src / f"{i}.png")
    Image.fromarray(shapes_image(41, 51)).convert("L").save(src / "sub" / "g.jpg")
    (src / "readme.md").write_text("ignored: not an image suffix")
    assert cli(["annotate", "scribble", str(src), str(dest), "--seed", "5", "--workers", "2", "--quiet"]) == 0
    written = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.png"))
    assert written == ["0.png", "1.png", "2.png", "sub/g.png"]
    expected = annotators.annotate("scribble", src / "1.png", seed=5)
    assert np.array_equal(load_image(dest / "1.png"), expected)
    (src / "broken.png").write_text("not really a png")
    capsys.readouterr()
    assert cli(["annotate", "invert", str(src), str(dest), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "1 of 5 files failed" in err and "broken.png" in err
    assert (dest / "sub" / "g.png").exists()


def test_cli_folder_mode_with_a_mask_folder(tmp_path):
    src, masks, dest = tmp_path / "in", tmp_path / "masks", tmp_path / "out"
    src.mkdir()
    masks.mkdir()
    for i in range(2):
        Image.fromarray(shapes_image()).save(src / f"{i}.jpg")
        m = np.zeros((96, 128), np.uint8)
        m[: 10 * (i + 1)] = 255
        Image.fromarray(m).save(masks / f"{i}.png")
    assert cli(["annotate", "inpaint", str(src), str(dest), "--mask", str(masks), "--workers", "1", "--quiet"]) == 0
    for i in range(2):
        out = load_image(dest / f"{i}.png")
        assert (out[: 10 * (i + 1)] == 0).all() and (out[10 * (i + 1) :] > 0).all()


def test_full_dispatcher(tmp_path, capsys):
    """``controlnet.cli.main`` itself: exit code 2 and one line for a non-image file, 0 for a good run."""
    try:
        from controlnet.cli import build_parser, main

        build_parser()
    except ImportError as err:  # another command module is not written yet
        pytest.skip(f"full CLI not importable yet: {err}")
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["annotate", "canny", str(tmp_path / "notes.txt"), str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("controlnet annotate: error:") and "notes.txt" in err and "\n" not in err
    Image.fromarray(shapes_image()).save(tmp_path / "in.png")
    assert main(["annotate", "invert", str(tmp_path / "in.png"), str(tmp_path / "o.png")]) == 0


def test_path_params_name_every_parameter_that_is_a_file_or_folder():
    """Known answers for the built-in annotators; every ``Path`` parameter and every ``*weights`` one is a path
    parameter, and nothing else is (a web client or a settings file may set all the others)."""
    from controlnet.annotators import path_params

    assert path_params("canny") == set() and path_params("depth_map") == set()
    assert path_params("inpaint") == {"mask"}
    assert path_params("pose_json") == {"keypoints"}
    assert path_params("hed") == path_params("mlsd") == path_params("depth") == {"weights"}
    assert path_params("openpose") == {"weights", "json"}
    assert path_params("openpose_hand") == {"weights", "hand_weights", "json"}
    assert path_params("pose") == {"weights", "detector_weights", "json"}
    for name in annotators.list_annotators():
        annotator = annotators.get(name)
        expected = {p.name for p in annotator.params if p.type is Path or p.name.endswith("weights")}
        assert path_params(name) == expected, name
    plugin = annotators.register("path_param_probe", lambda image, model_file=None, flag=False: image,
                                 "probe", [Param("model_file", Path, None, "a file"), Param("flag", bool, False, "x")])
    try:
        assert path_params("path_param_probe") == {"model_file"} == plugin.path_params()
    finally:
        del annotators.REGISTRY["path_param_probe"]
