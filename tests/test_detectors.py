"""The ControlNet 1.1 annotator networks (hed, pidinet, lineart, lineart_coarse, mlsd): our networks loaded from
files in the released layouts reproduce the reference outputs stored in tests/fixtures/annotators (see its
README), the annotators' post-processing reproduces the stored uint8 maps, bad weights are refused in one line,
and (when ../shared holds them) real trained weights give known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_checks import offline_hub, refused_in_one_line
from controlnet.annotators import released as detectors
from controlnet.annotators.loader import clear_cache
from controlnet.annotators.networks import NETWORKS, load_network
from controlnet.annotators.networks.mlsd import decode_lines, line_centres
from controlnet.cli import main
from controlnet.errors import UserError
from fixture_weights import (ANNOTATOR_FIXTURES, FIXTURES, fixture_weights, load_io, state_dict_digest,
                             write_released_weights)
from hubcache import add_to_hub_cache

REAL = Path(__file__).parents[2] / "shared" / "fixtures" / "annotators" / "real"
REAL_PIDINET = REAL / "table5_pidinet.pth"
REAL_MLSD_TINY = REAL / "mlsd_tiny_512_fp32.pth"
_NOT_IN_A_CLONE = f"in {REAL}, a folder of reference files that is not part of a clone"
NEEDS_REAL_PIDINET = pytest.mark.skipif(not REAL_PIDINET.is_file(),
                                        reason=f"needs the released PiDiNet weights ({REAL_PIDINET.name}) {_NOT_IN_A_CLONE}")
NEEDS_REAL_MLSD = pytest.mark.skipif(not REAL_MLSD_TINY.is_file(),
                                     reason=f"needs the released M-LSD tiny weights ({REAL_MLSD_TINY.name}) {_NOT_IN_A_CLONE}")
MAX_ABS = 1e-4  # the bound on raw outputs against the reference implementation (README: fp32 re-implementations ~1e-5)
FIXTURE_OF = {name: fixture for name, (fixture, _) in ANNOTATOR_FIXTURES.items()}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    """Stand-in weights saved as the released files would be, named as in lllyasviel/Annotators."""
    folder = tmp_path_factory.mktemp("annotators")
    return {name: write_released_weights(name, folder) for name in FIXTURE_OF}


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    return {f: load_io(FIXTURES / f / "io.safetensors") for f in ("hed", "pidinet", "lineart", "mlsd")}


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(x)
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


# --------------------------------------------------------------------------- the networks against the fixtures


@pytest.mark.parametrize("fixture", ["hed", "pidinet", "lineart", "mlsd"])
def test_stand_in_weights_are_the_fixtures(fixture, reference):
    """Our weight builder rebuilds, bit for bit, the weights the reference outputs were computed with."""
    assert state_dict_digest(fixture_weights(fixture)) == reference[fixture][1]["weights_sha256"]


def test_released_file_names():
    assert {name: NETWORKS[name].filename for name in ANNOTATOR_FIXTURES} == {
        name: filename for name, (_, filename) in ANNOTATOR_FIXTURES.items()}


@pytest.mark.parametrize("name", ["hed", "pidinet", "lineart", "mlsd"])
def test_network_reproduces_reference_outputs(name, weight_files, reference):
    """Loaded from the released layout, each network holds exactly the recipe's tensors and reproduces every raw
    reference output within 1e-4 (max abs)."""
    model = load_network(name, weight_files[name])
    recipe = fixture_weights(FIXTURE_OF[name])
    held = model.state_dict()
    assert held.keys() == recipe.keys() and all(torch.equal(held[k], v) for k, v in recipe.items())
    tensors, meta = reference[FIXTURE_OF[name]]
    names = meta["outputs"].split(",")
    outputs = _outputs(model, tensors["input"])
    assert len(outputs) == len(names)
    errors = {n: (o - tensors[n]).abs().max().item() for n, o in zip(names, outputs)}
    assert max(errors.values()) <= MAX_ABS, errors


def test_mlsd_loads_without_batchnorm_counters(tmp_path, reference):
    """Files saved without BatchNorm ``num_batches_tracked`` load too (and give the same outputs)."""
    state = {k: v for k, v in fixture_weights("mlsd").items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "mlsd.pth")
    model = load_network("mlsd", tmp_path / "mlsd.pth")
    tensors, _ = reference["mlsd"]
    assert (_outputs(model, tensors["input"])[0] - tensors["output"]).abs().max().item() <= MAX_ABS


def test_pidinet_safetensors_and_cache(tmp_path, weight_files):
    """A flat .safetensors conversion of the PiDiNet file loads; one model per file and process."""
    from safetensors.torch import save_file

    save_file({"module." + k: v for k, v in fixture_weights("pidinet").items()}, str(tmp_path / "pidinet.safetensors"))
    a = load_network("pidinet", tmp_path / "pidinet.safetensors")
    assert load_network("pidinet", tmp_path / "pidinet.safetensors") is a
    b = load_network("pidinet", weight_files["pidinet"])
    assert b is not a and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    clear_cache()
    assert load_network("pidinet", tmp_path / "pidinet.safetensors") is not a


# --------------------------------------------------------------------------- post-processing, known answers


def test_post_processing_reproduces_stored_maps(reference):
    """From the stored raw outputs, our post-processing gives the stored uint8 maps exactly."""
    hed, _ = reference["hed"]
    projections = tuple(hed[f"projection{i}"] for i in range(1, 6))
    assert np.array_equal(detectors.hed_edge_map(projections), hed["edge_u8"].numpy())
    assert np.array_equal(detectors.hed_edge_map(projections, safe=True), hed["edge_safe_u8"].numpy())
    pidi, _ = reference["pidinet"]
    assert np.array_equal(detectors.pidinet_edge_map(pidi["fused"]), pidi["edge_u8"].numpy())
    assert np.array_equal(detectors.pidinet_edge_map(pidi["fused"], safe=True), pidi["edge_safe_u8"].numpy())
    line, _ = reference["lineart"]
    assert np.array_equal(detectors.lineart_drawing(line["output"]), line["line_u8"].numpy())
    mlsd, _ = reference["mlsd"]
    assert np.array_equal(detectors.draw_segments(mlsd["lines"].numpy(), 256, 256), mlsd["mlsd_u8"].numpy())


def test_mlsd_decoding_reproduces_stored_segments(reference):
    """Line centres, scores and segments decoded from the stored TP map equal the reference decode exactly, also
    with long displacements (channels 1-4 x 40, thr_d = 6: 103 segments of ~12 px)."""
    t, _ = reference["mlsd"]
    centres, scores = line_centres(t["output"])
    assert np.array_equal(centres, t["decode_pts_yx"].numpy()) and np.array_equal(scores, t["decode_scores"].numpy())
    assert np.array_equal(decode_lines(t["output"], 0.1, 0.1), t["lines"].numpy())
    stretched = t["output"].clone()
    stretched[:, 1:5] *= 40.0
    lines = decode_lines(stretched, 0.1, 6.0)
    assert lines.shape == (103, 4) and np.array_equal(lines, t["decode2_lines"].numpy())
    assert np.array_equal(detectors.draw_segments(lines, 256, 256), t["decode2_mlsd_u8"].numpy())


def test_resize_for_detection_follows_resize_image():
    """Short side to the resolution, both sides rounded to multiples of 64 (annotator/util.py resize_image)."""
    image = np.zeros((300, 500, 3), np.uint8)
    assert detectors.resize_for_detection(image, 512).shape == (512, 832, 3)  # 853.3 -> 832
    assert detectors.resize_for_detection(image, 256).shape == (256, 448, 3)  # 426.7 -> 448
    assert detectors.safe_step(np.array([0.0, 0.3, 0.5, 0.7, 1.0])).tolist() == [0.0, 0.0, 0.5, 1.0, 1.5]


# --------------------------------------------------------------------------- the command line


def _annotate(args: list[str]) -> int:
    return main(["annotate", *args, "-q"])


@pytest.fixture(scope="module")
def fixture_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("input") / "synthetic.png"
    Image.fromarray(load_io(FIXTURES / "hed" / "io.safetensors")[0]["image_rgb_u8"].numpy()).save(path)
    return path


EXPECTED_CLI = {  # annotator, extra arguments → (fixture, stored map, inverted)
    ("hed", ()): ("hed", "edge_u8", False),
    ("hed", ("--safe",)): ("hed", "edge_safe_u8", False),
    ("pidinet", ()): ("pidinet", "edge_u8", False),
    ("pidinet", ("--safe",)): ("pidinet", "edge_safe_u8", False),
    ("lineart", ()): ("lineart", "line_u8", True),  # white lines on black: 255 - the drawing
    ("lineart_coarse", ()): ("lineart", "line_u8", True),
    ("mlsd", ()): ("mlsd", "mlsd_u8", False),
}


@pytest.mark.parametrize("name, extra", list(EXPECTED_CLI))
def test_cli_matches_reference_maps(name, extra, weight_files, fixture_image, reference, tmp_path):
    """``controlnet annotate NAME in.png out.png --weights FILE`` at the fixture's resolution writes the reference
    uint8 map (within 1 on >= 99.9 % of the pixels; lineart inverted, white lines on black)."""
    out = tmp_path / "out.png"
    args = [name, str(fixture_image), str(out), "--weights", str(weight_files[name]), "--detect_resolution", "256"]
    assert _annotate(args + list(extra)) == 0
    got = np.asarray(Image.open(out).convert("RGB"))
    fixture, key, inverted = EXPECTED_CLI[(name, extra)]
    want = reference[fixture][0][key].numpy()
    want = 255 - want if inverted else want
    assert got.shape == (256, 256, 3) and np.array_equal(got[..., 0], got[..., 2])
    diff = np.abs(got[..., 0].astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (diff.max(), (diff > 0).mean())


def test_output_has_the_input_size(weight_files):
    """Any input size: the network runs at multiples of 64 and the map comes back at the input's size."""
    from controlnet import annotators

    image = np.random.default_rng(0).integers(0, 256, (70, 110, 3), dtype=np.uint8)
    for name in ("hed", "pidinet", "lineart", "mlsd"):
        out = annotators.get(name)(image, weights=str(weight_files[name]), detect_resolution=64)
        assert out.shape == (70, 110, 3) and out.dtype == np.uint8
    scribble = annotators.get("hed")(image, weights=str(weight_files["hed"]), detect_resolution=64, scribble=True)
    assert set(np.unique(scribble)) <= {0, 255}


def _bad(args: list[str], capsys, out: Path) -> str:
    return refused_in_one_line(_annotate(args), capsys, out)


def test_wrong_file_is_refused_naming_both(weight_files, fixture_image, tmp_path, capsys):
    out = tmp_path / "out.png"
    err = _bad(["hed", str(fixture_image), str(out), "--weights", str(weight_files["pidinet"])], capsys, out)
    assert "PiDiNet" in err and "table5_pidinet.pth" in err and "HED" in err and "ControlNetHED.pth" in err
    err = _bad(["pidinet", str(fixture_image), str(out), "--weights", str(weight_files["lineart"])], capsys, out)
    assert "lineart" in err and "PiDiNet" in err
    err = _bad(["mlsd", str(fixture_image), str(out), "--weights", str(weight_files["hed"])], capsys, out)
    assert "HED" in err and "M-LSD large" in err


def test_unavailable_device_is_refused(weight_files, fixture_image, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out.png"
    err = _bad(["hed", str(fixture_image), str(out), "--weights", str(weight_files["hed"]), "--device", "cuda"],
               capsys, out)
    assert "cuda" in err and "not available" in err


def test_mlsd_model_choice_and_file(weight_files, fixture_image, tmp_path, capsys):
    out = tmp_path / "out.png"
    err = _bad(["mlsd", str(fixture_image), str(out), "--model", "tiny"], capsys, out)
    assert "--weights" in err and "mlsd_tiny_512_fp32.pth" in err
    err = _bad(["mlsd", str(fixture_image), str(out), "--model", "tiny", "--weights", str(weight_files["mlsd"])],
               capsys, out)
    assert "M-LSD large" in err and "M-LSD tiny" in err


def test_unknown_and_corrupt_files_are_refused(fixture_image, weight_files, tmp_path, capsys):
    out = tmp_path / "out.png"
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    assert str(garbage) in _bad(["hed", str(fixture_image), str(out), "--weights", str(garbage)], capsys, out)
    truncated = tmp_path / "ControlNetHED.pth"
    truncated.write_bytes(weight_files["hed"].read_bytes()[:100_000])
    err = _bad(["hed", str(fixture_image), str(out), "--weights", str(truncated)], capsys, out)
    assert "is not a valid PyTorch file (truncated or corrupt?)" in err
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    err = _bad(["lineart", str(fixture_image), str(out), "--weights", str(tmp_path / "other.pth")], capsys, out)
    assert "missing" in err and "unexpected (e.g. conv.weight)" in err
    state = fixture_weights("lineart")
    state["model4.1.weight"] = torch.zeros(1, 64, 5, 5)
    torch.save(state, tmp_path / "shape.pth")
    err = _bad(["lineart", str(fixture_image), str(out), "--weights", str(tmp_path / "shape.pth")], capsys, out)
    assert "model4.1.weight is (1, 64, 5, 5), expected (1, 64, 7, 7)" in err
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(UserError, match="has no ControlNetHED.pth"):
        detectors.weights_file("hed", str(tmp_path / "empty-folder"))


def test_missing_weights_offline_names_repo_file_and_command(fixture_image, tmp_path, capsys, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "empty-cache")
    out = tmp_path / "out.png"
    err = _bad(["pidinet", str(fixture_image), str(out)], capsys, out)
    assert "lllyasviel/Annotators" in err and "table5_pidinet.pth" in err
    assert "`hf download lllyasviel/Annotators table5_pidinet.pth`" in err


def test_hub_ids_resolve_from_a_prepared_cache(weight_files, fixture_image, reference, tmp_path, capsys,
                                               monkeypatch):
    """Default weights, ``--weights org/name`` and ``--weights org/name/file`` all come from the hub cache, offline;
    ``--list`` reports them cached."""
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "lllyasviel/Annotators", {"table5_pidinet.pth": weight_files["pidinet"]})
    offline_hub(monkeypatch, cache)
    want = reference["pidinet"][0]["edge_u8"].numpy().astype(int)
    hub_ids = ["lllyasviel/Annotators", "lllyasviel/Annotators/table5_pidinet.pth"]
    for weights in ([], ["--weights", hub_ids[0]], ["--weights", hub_ids[1]]):
        out = tmp_path / f"out{len(weights)}.png"
        assert _annotate(["pidinet", str(fixture_image), str(out), "--detect_resolution", "256", *weights]) == 0
        got = np.asarray(Image.open(out))[..., 0].astype(int)
        assert np.abs(got - want).max() <= 1
    capsys.readouterr()
    assert main(["annotate", "--list", "pidinet"]) == 0
    assert "weights cached (lllyasviel/Annotators/table5_pidinet.pth)" in capsys.readouterr().out


# --------------------------------------------------------------------------- real weights (../shared)


@NEEDS_REAL_PIDINET
def test_real_pidinet_reproduces_the_reference():
    model = load_network("pidinet", REAL_PIDINET)
    x = load_io(FIXTURES / "pidinet" / "io.safetensors")[0]["input"]
    ref, meta = load_io(FIXTURES / "pidinet" / "io_real_table5_pidinet.safetensors")
    outputs = _outputs(model, x)
    errors = {n: (o - ref[n]).abs().max().item() for n, o in zip(meta["outputs"].split(","), outputs)}
    assert max(errors.values()) <= MAX_ABS, errors
    assert np.abs(detectors.pidinet_edge_map(outputs[-1]).astype(int) - ref["edge_u8"].numpy()).max() <= 1


def _shapes_image() -> tuple[np.ndarray, np.ndarray]:
    """A 256x256 picture of flat regions: a grey background, a dark rectangle and a bright disc; returns it and
    the boolean map of its boundaries."""
    import cv2

    image = np.full((256, 256, 3), 90, np.uint8)
    cv2.rectangle(image, (40, 50), (150, 190), (20, 30, 160), -1)
    cv2.circle(image, (185, 90), 45, (240, 230, 120), -1)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    boundary = cv2.morphologyEx(grey, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    return image, boundary


@NEEDS_REAL_PIDINET
def test_real_pidinet_is_high_on_boundaries_and_low_on_flat_regions():
    import cv2

    image, boundary = _shapes_image()
    edges = detectors.pidinet(image, weights=str(REAL_PIDINET), detect_resolution=256)[..., 0].astype(float) / 255
    near = cv2.dilate(boundary.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    flat = cv2.dilate(boundary.astype(np.uint8), np.ones((15, 15), np.uint8)) == 0
    on_edge = np.array([edges[max(0, y - 2):y + 3, max(0, x - 2):x + 3].max() for y, x in zip(*np.nonzero(boundary))])
    # The border of the picture is also an edge to the network: judge flat regions away from it.
    flat[:12], flat[-12:], flat[:, :12], flat[:, -12:] = False, False, False, False
    assert np.median(on_edge) > 0.5 and (on_edge > 0.3).mean() > 0.9, (np.median(on_edge), (on_edge > 0.3).mean())
    assert np.percentile(edges[flat], 99) < 0.1 and edges[flat].mean() < 0.02, (np.percentile(edges[flat], 99),
                                                                               edges[flat].mean())
    assert edges[near].mean() > 10 * edges[flat].mean()


# Flat polygons on a shaded, slightly noisy background: their sides are the straight lines (the structural edges
# of the wireframe images M-LSD was trained on), 11 of them.
POLYGONS = (
    ([[70, 60], [300, 60], [300, 250], [70, 250]], (60, 70, 150)),
    ([[330, 120], [460, 90], [480, 330], [350, 380]], (200, 190, 80)),
    ([[90, 300], [260, 450], [60, 470]], (40, 40, 40)),
)


def _polygons_image() -> tuple[np.ndarray, np.ndarray]:
    """The 512x512 picture and its drawn sides ``(11, 4)`` x0, y0, x1, y1."""
    import cv2

    rng = np.random.default_rng(0)
    shade = np.linspace(170, 215, 512)[None, :, None]
    image = np.clip(rng.normal(0, 4, (512, 512, 3)) + shade, 0, 255).astype(np.uint8)
    sides = []
    for corners, colour in POLYGONS:
        cv2.fillPoly(image, [np.array(corners, np.int32)], colour, lineType=cv2.LINE_AA)
        sides += [corners[i] + corners[(i + 1) % len(corners)] for i in range(len(corners))]
    return image, np.array(sides, float)


def _segment_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance of ``a``'s end points to the line through segment ``b``."""
    direction = (b[2:] - b[:2]) / np.linalg.norm(b[2:] - b[:2])
    normal = np.array([-direction[1], direction[0]])
    return float(max(abs((a[:2] - b[:2]) @ normal), abs((a[2:] - b[:2]) @ normal)))


def _matches(found: np.ndarray, drawn: np.ndarray, tolerance: float = 4.0) -> tuple[float, float]:
    """Precision (found segments lying on a drawn one, within ``tolerance`` px and overlapping it) and recall
    (share of each drawn segment's length covered by found ones), both in 0..1."""
    def on(f, d):
        along = (np.stack([f[:2], f[2:]]) - d[:2]) @ ((d[2:] - d[:2]) / np.linalg.norm(d[2:] - d[:2]))
        length = np.linalg.norm(d[2:] - d[:2])
        return _segment_distance(f, d) <= tolerance and along.max() >= -tolerance and along.min() <= length + tolerance

    precise = [any(on(f, d) for d in drawn) for f in found]
    covered = []
    for d in drawn:
        length = np.linalg.norm(d[2:] - d[:2])
        unit = (d[2:] - d[:2]) / length
        hit = np.zeros(int(length) + 1, bool)
        for f in found:
            if on(f, d):
                lo, hi = sorted(((np.stack([f[:2], f[2:]]) - d[:2]) @ unit).tolist())
                hit[max(0, int(lo)):max(0, min(len(hit), int(np.ceil(hi)) + 1))] = True
        covered.append(hit.mean())
    return float(np.mean(precise)) if len(found) else 0.0, float(np.mean(covered))


@NEEDS_REAL_MLSD
def test_real_mlsd_tiny_finds_drawn_lines():
    """M-LSD tiny finds the sides of drawn polygons: its segments lie on drawn ones (precision, within 5 px) and
    cover them (recall); the annotator draws them."""
    image, sides = _polygons_image()
    net = load_network("mlsd_tiny", REAL_MLSD_TINY)
    tp_map = detectors.run_network(net, detectors.mlsd_input(image))
    found = decode_lines(tp_map, detectors.MLSD_SCORE_THRESHOLD, detectors.MLSD_DISTANCE_THRESHOLD)
    precision, recall = _matches(found, sides, tolerance=5.0)
    report = f"M-LSD tiny: {len(found)} segments for {len(sides)} sides, precision {precision:.3f}, recall {recall:.3f}"
    assert precision >= 0.9 and recall >= 0.9 and len(found) <= 2 * len(sides), report
    drawn = detectors.mlsd(image, weights=str(REAL_MLSD_TINY), model="tiny")[..., 0]
    assert np.array_equal(drawn, detectors.draw_segments(found, 512, 512))
