"""The synthetic fill data set (fill50k layout) and its controllability metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from controlnet.data.fill import (
    COLOURS, MAX_RADIUS, MIN_RADIUS, FillSample, circle_colour_correct, condition_disk, fill_iou,
    make_fill_dataset, nearest_colour, parse_prompt, random_condition,
)
from controlnet.errors import UserError

REQUIRED = {"red", "green", "blue", "yellow", "white", "black", "orange", "purple"}


def test_palette_has_the_required_colours():
    assert REQUIRED <= set(COLOURS)
    for name, rgb in COLOURS.items():
        assert nearest_colour(rgb) == name


def test_dataset_layout_prompts_and_determinism(tmp_path):
    out = make_fill_dataset(tmp_path / "a", n=6, size=128, seed=3)
    lines = (out / "prompt.json").read_text().splitlines()
    assert len(lines) == 6
    for i, line in enumerate(lines):
        row = json.loads(line)
        assert row["source"] == f"source/{i}.png" and row["target"] == f"target/{i}.png"
        circle, background = parse_prompt(row["prompt"])
        assert circle != background
        src = np.asarray(Image.open(out / row["source"]).convert("RGB"))
        tgt = np.asarray(Image.open(out / row["target"]).convert("RGB"))
        assert src.shape == tgt.shape == (128, 128, 3)
        # condition: white outline on black; its disk is where the target has the circle colour
        assert src.max() == 255 and (src == 0).mean() > 0.8
        assert fill_iou(tgt, src, row["prompt"]) > 0.95
        assert circle_colour_correct(tgt, row["prompt"])
    again = make_fill_dataset(tmp_path / "b", n=6, size=128, seed=3)
    assert (again / "prompt.json").read_text() == (out / "prompt.json").read_text()
    assert (again / "target" / "5.png").read_bytes() == (out / "target" / "5.png").read_bytes()
    other = make_fill_dataset(tmp_path / "c", n=6, size=128, seed=4)
    assert (other / "prompt.json").read_text() != (out / "prompt.json").read_text()


def test_existing_nonempty_folder_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        make_fill_dataset(tmp_path, n=1)
    assert (tmp_path / "x.txt").read_text() == "keep me"


def test_radii_and_circle_inside_the_image():
    rng = np.random.default_rng(0)
    radii = []
    for _ in range(2000):
        s = random_condition(rng, 128)
        radii.append(s.radius)
        assert s.circle in COLOURS and s.background in COLOURS and s.circle != s.background
        assert s.radius + 1 < s.cx < 127 - s.radius - 1 and s.radius + 1 < s.cy < 127 - s.radius - 1
    assert min(radii) == MIN_RADIUS and max(radii) == MAX_RADIUS


def test_fill_iou_known_answers():
    s = FillSample(cx=40, cy=50, radius=20, circle="red", background="blue")
    assert fill_iou(s.target, s.condition, s.prompt) > 0.97
    assert fill_iou(s.target, s.condition) > 0.97  # without a prompt: segmented against the border colour
    # exact disk vs its own condition: IoU 1 up to the outline's anti-aliasing
    disk_img = np.zeros((128, 128, 3), np.uint8)
    disk_img[condition_disk(s.condition)] = COLOURS["white"]
    assert fill_iou(disk_img, s.condition) == pytest.approx(1.0)
    # disjoint circle → 0; nothing drawn → 0
    far = FillSample(cx=100, cy=100, radius=15, circle="red", background="blue")
    assert fill_iou(far.target, s.condition, s.prompt) == 0.0
    assert fill_iou(np.full((128, 128, 3), 30, np.uint8), s.condition) == 0.0
    # half the radius → IoU a quarter
    small = FillSample(cx=40, cy=50, radius=10, circle="red", background="blue")
    assert fill_iou(small.target, s.condition, s.prompt) == pytest.approx(0.25, abs=0.03)
    # float images in [0, 1] give the same answer
    assert fill_iou(s.target / 255.0, s.condition, s.prompt) == pytest.approx(fill_iou(s.target, s.condition, s.prompt))


def test_circle_colour_correct():
    s = FillSample(cx=64, cy=64, radius=30, circle="orange", background="purple")
    assert circle_colour_correct(s.target, "orange circle with purple background")
    assert not circle_colour_correct(s.target, "yellow circle with purple background")
    assert not circle_colour_correct(np.full((128, 128, 3), 128, np.uint8), s.prompt)  # no circle


def test_bad_prompt_is_a_user_error():
    with pytest.raises(UserError, match="not a fill prompt"):
        parse_prompt("a cat")
    with pytest.raises(UserError, match="not a fill prompt"):
        parse_prompt("teal circle with red background")


def test_cli_data_fill(tmp_path, capsys):
    import argparse

    from controlnet.commands.data import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "fill", str(tmp_path / "d"), "--n", "3", "--size", "64", "--seed", "1"])
    assert args.func(args) == 0
    assert len((tmp_path / "d" / "prompt.json").read_text().splitlines()) == 3
    assert Image.open(tmp_path / "d" / "source" / "2.png").size == (64, 64)
