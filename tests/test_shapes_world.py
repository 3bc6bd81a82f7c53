"""The shapes world: captions, the seeded data set, the detector with known answers, and its wiring into the
product (``controlnet data shapes``, the ``shapes`` annotator, mIoU in ``evaluate`` and in training validation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet.annotators.palettes import ADE20K
from controlnet.cli import main
from controlnet.data.shapes import (KINDS, LABEL_COLOURS, Shape, ShapesSample, detect_shapes, make_caption,
                                    make_shapes_dataset, parse_caption, random_sample)
from controlnet.errors import EXIT_BAD_INPUT, UserError
from controlnet.evaluate import EvalConfig, evaluate, palette_labels, score_kind
from controlnet.metrics import mean_iou

SIZE = 128


def _classes(condition: np.ndarray) -> np.ndarray:
    """(H, W) class indices 0..3 of a shapes label map."""
    return palette_labels(condition, LABEL_COLOURS)


# --------------------------------------------------------------------------- captions and the data set


def test_captions_round_trip_and_bad_captions_are_one_line_errors():
    rng = np.random.default_rng(7)
    for _ in range(20):
        s = random_sample(rng, SIZE)
        pairs, background = parse_caption(s.prompt)
        assert pairs == [(shape.colour, shape.kind) for shape in s.shapes] and background == s.background
        assert make_caption(pairs, background) == s.prompt
    assert parse_caption("Red circle, blue triangle on white background") == (
        [("red", "circle"), ("blue", "triangle")], "white")
    for bad in ("a cat", "red circle", "teal circle on red background", "red hexagon on blue background",
                "red circle, on blue background", "red big circle on blue background"):
        with pytest.raises(UserError, match="is not a shapes caption") as err:
            parse_caption(bad)
        assert "\n" not in str(err.value)


def test_dataset_is_seeded_and_holds_the_samples_of_its_seed(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", 5, size=64, seed=4)
    b = make_shapes_dataset(tmp_path / "b", 5, size=64, seed=4)
    c = make_shapes_dataset(tmp_path / "c", 5, size=64, seed=5)
    rows = [json.loads(line) for line in (a / "prompt.json").read_text().splitlines()]
    assert (a / "prompt.json").read_bytes() == (b / "prompt.json").read_bytes() != (c / "prompt.json").read_bytes()
    rng = np.random.default_rng(4)
    for i, row in enumerate(rows):
        expected = random_sample(rng, 64)
        image = np.asarray(Image.open(a / row["target"]).convert("RGB"))
        assert row == {"target": f"target/{i}.png", "prompt": expected.prompt}
        assert np.array_equal(image, expected.target)
        assert np.array_equal(image, np.asarray(Image.open(b / row["target"]).convert("RGB")))
    assert sorted(p.name for p in a.iterdir()) == ["prompt.json", "target"]


def test_a_shape_is_drawn_where_its_labels_say():
    """The anti-aliased image and the label map agree: a pixel is labelled when the shape covers half of it or
    more, and the labelled pixels are centred where the drawn shape's coverage is (to a tenth of a pixel)."""
    for kind in KINDS:
        s = ShapesSample((Shape(kind, "white", 60.3, 64.7, 30.0, 10.0),), "black", SIZE)
        coverage = s.target[:, :, 0].astype(np.float64) / 255.0
        labelled = s.labels == KINDS.index(kind) + 1
        assert np.array_equal(coverage >= 0.5, labelled), kind
        ys, xs = np.nonzero(labelled)
        centre = (coverage * np.indices(coverage.shape)).sum(axis=(1, 2)) / coverage.sum()
        assert np.allclose(centre, (ys.mean(), xs.mean()), atol=0.1), kind


# --------------------------------------------------------------------------- the detector


@pytest.mark.parametrize("kind", KINDS)
def test_detector_finds_a_single_unoccluded_shape(kind):
    for radius, angle, (cx, cy) in ((20, 0, (40, 50)), (20, 37, (90, 80)), (31, 100, (64, 64)), (40, 250, (70, 60))):
        s = ShapesSample((Shape(kind, "orange", cx, cy, radius, angle),), "purple", SIZE)
        detected = detect_shapes(s.target)
        assert detected.shape == (SIZE, SIZE, 3) and detected.dtype == np.uint8
        agreement = float(np.mean(_classes(detected) == s.labels))
        assert agreement >= 0.97, (kind, radius, angle, agreement)


def test_detector_reads_random_scenes():
    """Mean mIoU of the detected classes against the drawn ones over 50 scenes of overlapping shapes (seed 0
    measures 0.90; occluded shapes are the misread ones)."""
    rng = np.random.default_rng(0)
    scores = []
    for _ in range(50):
        s = random_sample(rng, SIZE)
        detected = detect_shapes(s.target)
        assert set(map(tuple, detected.reshape(-1, 3))) <= set(map(tuple, LABEL_COLOURS))
        scores.append(mean_iou(_classes(detected), s.labels, len(LABEL_COLOURS)))
    assert np.mean(scores) >= 0.8


def test_label_colours_read_back_as_distinct_ade20k_classes():
    from controlnet.data.shapes import ADE20K_CLASSES

    assert palette_labels(LABEL_COLOURS[None], ADE20K)[0].tolist() == list(ADE20K_CLASSES)
    assert len(set(ADE20K_CLASSES)) == len(LABEL_COLOURS)


# --------------------------------------------------------------------------- scores


def test_training_scores_shapes_by_miou_and_edges_as_before():
    from controlnet.train.scores import choose_scorer

    assert choose_scorer("auto", "canny", {}, ["red circle on blue background"])[0] == "edge_f1"
    assert choose_scorer("auto", "softedge", {}, ["red circle on blue background"])[0] == "ssim"
    assert choose_scorer("auto", "segmentation", {}, ["a room"])[0] == "miou"
    metric, score = choose_scorer("auto", "shapes", {}, ["red circle on blue background"])
    assert metric == "miou"
    s = random_sample(np.random.default_rng(3), SIZE)
    condition = detect_shapes(s.target)
    assert score(s.target, condition, s.prompt, s.target) == 1.0
    # A blank sample is all background: IoU of the background is its share of the condition, every shape class 0.
    classes = _classes(condition)
    expected = np.mean(classes == 0) / len(np.unique(classes))
    assert score(np.zeros_like(s.target), condition, s.prompt, s.target) == pytest.approx(expected, abs=1e-12)
    assert expected < 0.5
    with pytest.raises(UserError, match="needs a segmentation annotator"):
        choose_scorer("segmentation", "canny", {}, [])


def test_evaluate_scores_the_shapes_annotator_by_miou(tmp_path):
    data = make_shapes_dataset(tmp_path / "data", 3, size=64, seed=2)
    assert score_kind("shapes", None, []) == "miou"
    assert score_kind("shapes", "someone/controlnet-shapes-seg", []) == "miou"

    def run(name, generate):
        config = EvalConfig(data, tmp_path / name, controlnet=None, annotator="shapes", clip_weights="none",
                            per_example=1)
        return evaluate(config, generate=generate, progress=False)

    own = run("own", lambda example, seeds: [example.image.copy() for _ in seeds])
    blank = run("blank", lambda example, seeds: [np.zeros_like(example.image) for _ in seeds])
    assert own["score"] == "miou" and own["scores"]["miou"]["mean"] == 1.0
    assert blank["scores"]["miou"]["mean"] < 0.5


# --------------------------------------------------------------------------- the command line


def test_cli_data_shapes_writes_n_rows_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "shapes", str(out), "--n", "3", "--size", "64", "--seed", "1", "-q"]) == 0
    assert capsys.readouterr().out == ""
    rows = [json.loads(line) for line in (out / "prompt.json").read_text().splitlines()]
    assert [r["target"] for r in rows] == [f"target/{i}.png" for i in range(3)]
    assert all(Image.open(out / r["target"]).size == (64, 64) for r in rows)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for argv, target, message in ((["--n", "0"], tmp_path / "new", "--n must be at least 1"),
                                  (["--n", "2"], out, "already exists and is not empty"),
                                  (["--size", "60"], tmp_path / "new", "--size must be a multiple of 8")):
        assert main(["data", "shapes", str(target), *argv]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("controlnet data: error: ") and message in err, err
    assert not (tmp_path / "new").exists()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_cli_annotate_shapes(tmp_path: Path):
    s = random_sample(np.random.default_rng(11), SIZE)
    Image.fromarray(s.target).save(tmp_path / "in.png")
    assert main(["annotate", "shapes", str(tmp_path / "in.png"), str(tmp_path / "out.png")]) == 0
    written = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    assert np.array_equal(written, detect_shapes(s.target))
    assert mean_iou(_classes(written), s.labels, len(LABEL_COLOURS)) > 0.5
