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
from controlnet.annotators import released as detectors
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
    """Network outputs within 1e-5 and the uint8 conditions equal, batched or not (four pictures share a network
    input size, the square one is a batch of one): the truncation to uint8 may fall on the other side of a level
    where the kernels' float rounding differs, so at most 1 level on at most 0.1 % of the values."""
    from controlnet.annotators.networks import load_network

    annotator = annotators.get(name)
    images = [picture(h, w, i) for i, (h, w) in enumerate(SIZES)] + [picture(96, 128, 9)]
    params = {"weights": str(weights[name]), "detect_resolution": DETECT}
    assert annotator.batch is not None
    batched = annotator.call_batch(images, **params)
    alone = [annotator(image, **params) for image in images]
    for a, b in zip(batched, alone):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert a.dtype == np.uint8 and diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size

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
    # The check before the first file is the batch form on no image; then the four 3:4 pictures in chunks of 2 and
    # the square alone.
    assert sorted(len(f) for f in forwards) == [0, 1, 2, 2]
    assert all(len(set(f)) == 1 for f in forwards if f)
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
    assert sorted(len(f) for f in forwards) == [0, 1, 1, 1, 1, 1]
    for path in dest.rglob("*.png"):
        assert np.array_equal(load_image(path), load_image(redo / path.relative_to(dest)))


def test_batch_size_default_is_one_on_the_cpu():
    from controlnet.annotators.folder import batch_size_for

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


# ---------------------------------------------------------------------------------------------------------------
# checked once, before the first file


@pytest.mark.parametrize(
    "case, message",
    [
        ("device", "device cuda:99 is not available"),
        ("missing_weights", "not found"),
        ("folder_without_weights", "has no ControlNetHED.pth"),
        ("weights_of_another_network", "this is a PiDiNet file (table5_pidinet.pth), not the HED weights"),
        ("default_weights_offline", "HF_HUB_OFFLINE is set"),
        ("openpose_missing_weights", "not found"),
        ("transformers_missing_folder", "not found"),
        ("required_parameter", "parameter 'mask' is required"),
    ],
)
def test_folder_mode_checks_device_weights_and_parameters_before_the_first_file(tmp_path, weights, capsys,
                                                                               monkeypatch, case, message):
    """One line naming the problem, exit 2, nothing written, and no image annotated (not "N of N files failed")."""
    from cli_checks import offline_hub

    from controlnet.annotators import folder

    src, dest = tmp_path / "in", tmp_path / "out"
    photo_folder(src)
    (tmp_path / "empty").mkdir()
    offline_hub(monkeypatch, tmp_path / "empty-cache")
    annotated: list[Path] = []
    real_work = folder._work
    monkeypatch.setattr(folder, "_work", lambda job: annotated.extend(job[1]) or real_work(job))
    hed = ["hed", str(src), str(dest), "--workers", "1"]
    argv = {
        "device": [*hed, "--weights", str(weights["hed"]), "--device", "cuda:99"],
        "missing_weights": [*hed, "--weights", str(tmp_path / "no-such.pth")],
        "folder_without_weights": [*hed, "--weights", str(tmp_path / "empty")],
        "weights_of_another_network": [*hed, "--weights", str(weights["pidinet"])],
        "default_weights_offline": hed,
        "openpose_missing_weights": ["openpose", str(src), str(dest), "--weights", str(tmp_path / "no-such.pth")],
        "transformers_missing_folder": ["depth", str(src), str(dest), "--weights", str(tmp_path / "no-such")],
        "required_parameter": ["inpaint", str(src), str(dest)],
    }[case]
    err = refused_in_one_line(cli(["annotate", *argv]), capsys, dest)
    assert message in err and "files failed" not in err
    assert annotated == []


# ---------------------------------------------------------------------------------------------------------------
# batch size bounded by memory


def test_memory_per_image_and_batch_cap_known_numbers():
    from controlnet.annotators.folder import (DETECT_BYTES_PER_PIXEL, IMAGE_BYTES_PER_PIXEL, bytes_per_image,
                                              cap_batch_size, max_batch_size)

    # 64 x 48 at detect resolution 128: network input 128 x 170 (21,845 px; the long side is not rounded here).
    assert bytes_per_image(64, 48, 128) == 21_845 * DETECT_BYTES_PER_PIXEL + 64 * 48 * IMAGE_BYTES_PER_PIXEL
    assert bytes_per_image(48, 64, 128) == bytes_per_image(64, 48, 128)
    assert bytes_per_image(100, 100, 512) == 512 * 512 * 2048 + 100 * 100 * 16
    # Half of 1e9 bytes over 2 workers of 1e6-byte images: 250; never below 1.
    assert max_batch_size(10**6, 10**9, workers=2) == 250
    assert max_batch_size(10**9, 10**6, workers=4) == 1
    # 100000 small images per batch over 1 GiB with 2 workers: 44,787,712 bytes each, 2**29 // (2 * that) = 5.
    size, note = cap_batch_size(100_000, {"detect_resolution": 128}, [(64, 48), (32, 32)], 2, memory=2**30)
    assert size == 5 and note.startswith("--batch-size 100000 lowered to 5: 2 worker(s) x 5 images")
    assert cap_batch_size(5, {"detect_resolution": 128}, [(64, 48)], 2, memory=2**30) == (5, None)
    assert cap_batch_size(1, {}, [(10**4, 10**4)], 16, memory=1) == (1, None)


def test_folder_mode_lowers_a_batch_size_over_memory_with_a_note(tmp_path, weights, monkeypatch, capsys):
    """--batch-size 100000 with 100 MiB for batches: 2 images of about 45 MB per forward, and a note saying so."""
    from controlnet import limits

    src, dest = tmp_path / "in", tmp_path / "out"
    photo_folder(src)
    Image.fromarray(picture(24, 32, 7)).save(src / "4.png")
    monkeypatch.setattr(limits, "device_memory", lambda device=None: (200 * 2**20, "test"))
    forwards: list[int] = []
    run_batch = detectors.run_network_batch
    monkeypatch.setattr(detectors, "run_network_batch", lambda net, images: forwards.append(len(images))
                        or run_batch(net, images))
    hed = ["--weights", str(weights["hed"]), "--detect_resolution", str(DETECT)]
    assert cli(["annotate", "hed", str(src), str(dest), *hed, "--workers", "1", "--batch-size", "100000", "-q"]) == 0
    assert sorted(forwards) == [0, 1, 2, 2]  # the check, then the four 3:4 pictures in twos and the square alone
    err = capsys.readouterr().err
    assert "note: --batch-size 100000 lowered to 2: 1 worker(s) x 2 images of up to 43 MiB each" in err
    assert "of the test memory (0.2 GiB)" in err
