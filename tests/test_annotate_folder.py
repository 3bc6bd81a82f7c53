"""``controlnet annotate`` folder mode: --json DIR for the keypoint detectors, resuming, batched network forwards
equal to one image at a time, and the images/s report."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from controlnet import annotators
from controlnet.annotators import detectors
from controlnet.images import load_image
from cli_checks import refused_in_one_line
from fixture_weights import write_released_weights
from test_annotators import cli

BATCHED = ("hed", "pidinet", "lineart", "lineart_coarse", "mlsd")
DETECT = 128  # detect resolution of the tests: 3:4 pictures become 128 x 192 network inputs, square ones 128 x 128
# (height, width) of the test pictures: three of aspect ratio 3:4, one square.
SIZES = ((48, 64), (96, 128), (64, 64), (60, 80))


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """Noise shading with a rectangle and a disc, different per seed."""
    rng = np.random.default_rng(seed)
    image = rng.integers(40, 90, (height, width, 3), dtype=np.uint8)
    cv2.rectangle(image, (width // 8, height // 6), (width // 2, height // 2), (230, 60, 40), -1)
    cv2.circle(image, (3 * width // 4, 2 * height // 3), height // 5, (40, 200, 90), -1)
    return image


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Stand-in weights in the released layouts for the batched detectors and OpenPose."""
    from test_openpose import write_released_openpose

    folder = tmp_path_factory.mktemp("weights")
    files = {name: write_released_weights(name, folder) for name in BATCHED}
    files["openpose"] = write_released_openpose("openpose", folder)
    return files


def photo_folder(folder: Path) -> list[Path]:
    """SIZES as PNGs under ``folder`` (one in a subfolder)."""
    paths = []
    for i, (h, w) in enumerate(SIZES):
        path = folder / ("sub" if i == 3 else "") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture(h, w, i)).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# batching


@pytest.mark.parametrize("name", BATCHED)
def test_batch_form_equals_one_image_at_a_time(name, weights):
    """Network outputs within 1e-5 and the uint8 conditions identical, batched or not (four pictures share a
    network input size, the square one is a batch of one)."""
    from controlnet.annotators.networks import load_network

    annotator = annotators.get(name)
    images = [picture(h, w, i) for i, (h, w) in enumerate(SIZES)] + [picture(96, 128, 9)]
    params = {"weights": str(weights[name]), "detect_resolution": DETECT}
    assert annotator.batch is not None
    batched = annotator.call_batch(images, **params)
    alone = [annotator(image, **params) for image in images]
    for a, b in zip(batched, alone):
        assert a.dtype == np.uint8 and np.array_equal(a, b)

    net = load_network(name, weights[name])
    channels = 4 if name == "mlsd" else 3
    inputs = [np.random.default_rng(k).random((64, 64, channels), np.float32) for k in range(3)]
    together = detectors.run_network_batch(net, inputs)
    for x, out in zip(inputs, together):
        one = detectors.run_network(net, x)
        pairs = zip(out, one) if isinstance(one, (tuple, list)) else [(out, one)]
        for a, b in pairs:
            assert a.shape == b.shape and a.shape[0] == 1
            assert float((a - b).abs().max()) <= 1e-5


def test_folder_mode_batches_by_input_size_and_matches_single_images(tmp_path, weights, monkeypatch, capsys):
    src, dest = tmp_path / "in", tmp_path / "out"
    paths = photo_folder(src)
    Image.fromarray(picture(24, 32, 7)).save(src / "4.png")  # the aspect ratio of 0.png and 1.png
    forwards: list[list[tuple[int, ...]]] = []
    run_batch = detectors.run_network_batch

    def spy(net, images):
        forwards.append([image.shape for image in images])
        return run_batch(net, images)

    monkeypatch.setattr(detectors, "run_network_batch", spy)
    hed = ["--weights", str(weights["hed"]), "--detect_resolution", str(DETECT)]
    assert cli(["annotate", "hed", str(src), str(dest), *hed, "--workers", "1", "--batch-size", "2", "-q"]) == 0
    assert sorted(len(f) for f in forwards) == [1, 2, 2]  # the four 3:4 pictures in chunks of 2, the square alone
    assert all(len(set(f)) == 1 for f in forwards)
    out = capsys.readouterr().out
    assert "wrote 5 hed images" in out and "images/s" in out
    for path in [*paths, src / "4.png"]:
        rel = path.relative_to(src)
        single = tmp_path / "single.png"
        assert cli(["annotate", "hed", str(path), str(single), *hed]) == 0
        assert np.array_equal(load_image(dest / rel), load_image(single))

    forwards.clear()  # the default on the CPU: one image per forward
    redo = tmp_path / "redo"
    assert cli(["annotate", "hed", str(src), str(redo), *hed, "--workers", "1", "-q"]) == 0
    assert all(len(f) == 1 for f in forwards) and len(forwards) == 5
    for path in dest.rglob("*.png"):
        assert np.array_equal(load_image(path), load_image(redo / path.relative_to(dest)))


def test_batch_size_default_is_one_on_the_cpu():
    from controlnet.commands.annotate import batch_size_for

    hed, canny = annotators.get("hed"), annotators.get("canny")
    assert batch_size_for(hed, {}) == 1 and batch_size_for(hed, {"device": "cpu"}) == 1
    assert batch_size_for(hed, {}, 6) == 6
    assert batch_size_for(canny, {}, 6) == 1  # no batch form


def test_folder_mode_resumes_only_what_is_missing_or_made_otherwise(tmp_path, capsys):
    src, dest = tmp_path / "in", tmp_path / "out"
    photo_folder(src)
    assert cli(["annotate", "canny", str(src), str(dest), "--workers", "1", "-q"]) == 0
    stamps = {p: p.stat().st_mtime_ns for p in dest.rglob("*.png")}
    (dest / "1.png").unlink()
    capsys.readouterr()
    assert cli(["annotate", "canny", str(src), str(dest), "--workers", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 canny images" in out and "3 done already" in out
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items() if path.name != "1.png")
    assert (dest / "1.png").exists()
    assert cli(["annotate", "canny", str(src), str(dest), "--workers", "1", "-q"]) == 0
    assert "all 4 canny images in" in capsys.readouterr().out
    # Other parameters: every file is made again.
    assert cli(["annotate", "canny", str(src), str(dest), "--low_threshold", "50", "--workers", "1", "-q"]) == 0
    assert "wrote 4 canny images" in capsys.readouterr().out
    with Image.open(dest / "sub" / "3.png") as png:
        assert json.loads(png.info["controlnet:params"]) == {"low_threshold": 50}


# ---------------------------------------------------------------------------------------------------------------
# --json


def test_openpose_folder_mode_writes_one_json_per_image_and_resumes(tmp_path, weights, capsys):
    src, dest, keypoints = tmp_path / "in", tmp_path / "out", tmp_path / "keypoints"
    paths = photo_folder(src)
    pose = ["--weights", str(weights["openpose"]), "--detect_resolution", str(DETECT)]
    assert cli(["annotate", "openpose", str(src), str(dest), *pose, "--json", str(keypoints), "--workers", "1",
                "-q"]) == 0
    written = sorted(p.relative_to(keypoints).as_posix() for p in keypoints.rglob("*") if p.is_file())
    assert written == ["0.json", "1.json", "2.json", "sub/3.json"]
    for path in (paths[0], paths[3]):  # one at the top, one in the subfolder
        rel = path.relative_to(src)
        single_png, single_json = tmp_path / "single.png", tmp_path / "single.json"
        assert cli(["annotate", "openpose", str(path), str(single_png), *pose, "--json", str(single_json)]) == 0
        assert json.loads((keypoints / rel.with_suffix(".json")).read_text()) == json.loads(single_json.read_text())
        assert np.array_equal(load_image(dest / rel), load_image(single_png))
    # A missing JSON makes its image run again; the others are skipped.
    (keypoints / "2.json").unlink()
    stamp = (dest / "0.png").stat().st_mtime_ns
    capsys.readouterr()
    assert cli(["annotate", "openpose", str(src), str(dest), *pose, "--json", str(keypoints), "--workers", "1",
                "-q"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 openpose images" in out and "3 done already" in out
    assert (keypoints / "2.json").is_file() and (dest / "0.png").stat().st_mtime_ns == stamp


def test_single_image_json_into_a_folder(tmp_path, weights):
    image = tmp_path / "photo.png"
    Image.fromarray(picture(64, 96, 1)).save(image)
    (tmp_path / "kp").mkdir()
    pose = ["--weights", str(weights["openpose"]), "--detect_resolution", str(DETECT)]
    assert cli(["annotate", "openpose", str(image), str(tmp_path / "o.png"), *pose, "--json",
                str(tmp_path / "kp")]) == 0
    doc = json.loads((tmp_path / "kp" / "photo.json").read_text())
    assert doc["canvas_width"] == 96 and doc["canvas_height"] == 64


@pytest.mark.parametrize(
    "case, message",
    [
        ("json_without_keypoints", "--json writes OpenPose keypoints, which only openpose, openpose_hand, pose"),
        ("json_dir_is_a_file", "is a file; with a folder IN, --json names a folder"),
        ("json_under_a_file", "is a file, not a folder"),
        ("batch_size_zero", "--batch-size must be >= 1"),
        ("batch_size_text", "--batch-size expects an integer"),
    ],
)
def test_bad_combinations_are_one_line_exit_2_and_write_nothing(tmp_path, weights, capsys, case, message):
    src, dest = tmp_path / "in", tmp_path / "out"
    photo_folder(src)
    (tmp_path / "taken.json").write_text("{}")
    pose = ["openpose", str(src), str(dest), "--weights", str(weights["openpose"])]
    argv = {
        "json_without_keypoints": ["canny", str(src), str(dest), "--json", str(tmp_path / "kp")],
        "json_dir_is_a_file": [*pose, "--json", str(tmp_path / "taken.json")],
        "json_under_a_file": [*pose, "--json", str(tmp_path / "taken.json" / "kp")],
        "batch_size_zero": ["canny", str(src), str(dest), "--batch-size", "0"],
        "batch_size_text": ["canny", str(src), str(dest), "--batch-size", "four"],
    }[case]
    before = sorted(tmp_path.rglob("*"))
    assert message in refused_in_one_line(cli(["annotate", *argv]), capsys, dest)
    assert sorted(tmp_path.rglob("*")) == before
    if case == "json_without_keypoints":  # single-image mode too
        argv = ["annotate", "canny", str(src / "0.png"), str(tmp_path / "o.png"), "--json", "k.json"]
        assert message in refused_in_one_line(cli(argv), capsys, tmp_path / "o.png")
