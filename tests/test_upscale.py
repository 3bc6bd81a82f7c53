"""Tiled upscaling: the tiling and blending arithmetic, the command, and the embedded model's memory and
sharpness claims (the tile ControlNet's peak memory against a one-shot generation, measured in subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from controlnet.errors import EXIT_BAD_INPUT, UserError
from controlnet.upscale import tile_boxes, tile_weights, upscale


def test_tile_boxes_cover_the_picture_edge_to_edge():
    assert tile_boxes(512, 512, 512, 64) == [(0, 0, 512, 512)]
    assert tile_boxes(100, 40, 512, 64) == [(0, 0, 100, 40)]  # smaller than a tile: one, the picture's size
    boxes = tile_boxes(1000, 600, 512, 64)
    # 1000 px: 2 tiles would overlap by 24 < 64 px, so 3, spread evenly; 600 px: 2.
    assert [b[0] for b in boxes[:3]] == [0, 244, 488] and boxes[-1] == (488, 88, 1000, 600)
    assert len(boxes) == 6 and all(r - l == 512 and b - t == 512 for l, t, r, b in boxes)
    covered = np.zeros((600, 1000), bool)
    for l, t, r, b in boxes:
        covered[t:b, l:r] = True
    assert covered.all()
    with pytest.raises(Exception, match="overlap"):
        tile_boxes(100, 100, 64, 64)


def test_tile_weights_ramp_only_towards_neighbours_and_sum_to_one_in_regular_overlaps():
    w = tile_weights((0, 0, 16, 16), 28, 16, 4)  # a neighbour on the right only (the next tile starts at 12)
    assert (w[:, :12] == 1).all() and np.allclose(w[0, 12:], [0.875, 0.625, 0.375, 0.125])
    right = tile_weights((12, 0, 28, 16), 28, 16, 4)
    assert np.allclose(w[:, 12:] + right[:, :4], 1.0) and (right[:, 4:] == 1).all()


class _Identity:
    """A stand-in pipeline whose img2img returns its init image unchanged (to test the blending alone)."""

    native_size, vae_scale_factor = 32, 8

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, controls=(), init_image=None, seed=0, **kwargs):
        self.calls.append((init_image.shape, seed, controls))
        return SimpleNamespace(images=[init_image], settings={"prompt": prompt, "seed": seed})


def test_blending_identity_tiles_gives_the_lanczos_upscale_exactly():
    picture = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    pipe = _Identity()
    result = upscale(pipe, picture, 2.0, tile=32, overlap=8, controlnet="tile", seed=7)
    expected = np.asarray(Image.fromarray(picture).resize((80, 48), Image.LANCZOS))
    assert np.array_equal(result.image, expected)
    assert len(pipe.calls) == len(tile_boxes(80, 48, 32, 8)) == 6
    assert [seed for _, seed, _ in pipe.calls] == list(range(7, 13))  # tile k: seed + k
    unit = pipe.calls[0][2][0]
    assert (unit.annotator, unit.annotator_params, unit.controlnet) == ("tile", {"factor": 2.0}, "tile")
    assert result.settings["upscale"] == {"scale": 2.0, "tile": 32, "overlap": 8, "tiles": 6, "tile_factor": 2.0}


def _main(argv):
    from controlnet.cli import main

    return main(argv)


def test_upscale_command_writes_the_png_and_refuses_bad_input(tmp_path, capsys):
    from controlnet.demo import held_out_samples

    source = tmp_path / "circle.png"
    Image.fromarray(held_out_samples(1)[0].target[:64, :64]).save(source)
    out = tmp_path / "big.png"
    assert _main(["upscale", str(source), "--scale", "2", "--steps", "2", "--controlnet", "fill", "-q",
                  "--scheduler", "DPM++ 2M Karras", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (128, 128)
        settings = json.loads(im.text["settings"])
        assert "prompt" not in im.text and "Denoising strength: 0.5" in im.text["parameters"]
    assert settings["upscale"]["tiles"] == 1 and settings["upscale"]["source"] == str(source)
    assert settings["scheduler"] == "dpmpp_2m_karras"
    capsys.readouterr()
    for argv, message in [(["--scale", "0.5"], "--scale must be a finite number >= 1, got 0.5"),
                          (["--scale", "inf"], "--scale must be a finite number >= 1, got inf"),
                          (["--scale", "nan"], "--scale must be a finite number >= 1, got nan"),
                          (["--scale", "1000"], "--scale 1000: 64000x64000 is 4,096,000,000 pixels, over the limit of"),
                          (["--scale", "3", "--max-pixels", "36863"], "--scale 3: 192x192 is 36,864 pixels, over the "
                                                                      "limit of 36,863 (--max-pixels 36,863)"),
                          (["--scheduler", "nope"], "unknown scheduler 'nope'"), (["--denoise", "2"], "--denoise"),
                          (["--controlnet", "nope"], "no ControlNet named")]:
        assert _main(["upscale", str(source), *argv, "-q"]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert _main(["upscale", str(tmp_path / "missing.png")]) == EXIT_BAD_INPUT


def test_scale_is_checked_against_the_pixel_limit_before_any_allocation():
    from controlnet.limits import check_scale

    check_scale(64, 100, 100, max_pixels=6400 * 6400)  # exactly at the limit
    with pytest.raises(UserError, match=r"--scale 64: 6400x6400 is 40,960,000 pixels, over the limit of 40,959,999"):
        check_scale(64, 100, 100, max_pixels=6400 * 6400 - 1)
    with pytest.raises(UserError, match="over the limit"):
        check_scale(1e300, 100, 100, max_pixels=10**9)  # no float overflow in the size
    pipe = SimpleNamespace(device="cpu", native_size=64, vae_scale_factor=8)  # never called: refused first
    with pytest.raises(UserError, match="--scale 150"):
        upscale(pipe, np.zeros((64, 64, 3), np.uint8), 150, max_pixels=10**6)


def test_upscale_help_imports_nothing_heavy():
    script = ("import sys; from controlnet.cli import Parser; import controlnet.commands.upscale as m; "
              "m.register(Parser(prog='controlnet').add_subparsers()); "
              "print(sorted(n for n in ('torch', 'diffusers', 'transformers', 'cv2', 'numpy') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


_PEAK = """
import sys
from controlnet.demo import held_out_samples, load_pipeline
pipe = load_pipeline()
sample = held_out_samples(1)[0]
if sys.argv[1] == "tiles":
    from controlnet.upscale import upscale
# Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS, so the peak below is the
# generation's own, not the loading's (proc(5), /proc/[pid]/clear_refs).
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    print("unsupported")
    sys.exit(0)
if sys.argv[1] == "tiles":
    out = upscale(pipe, sample.target, 4.0, controlnet=sys.argv[2], steps=2).image
else:
    out = pipe(sample.prompt, size=(512, 512), steps=2, progress=False, output_type="np").images[0]
assert out.shape == (512, 512, 3)
with open("/proc/self/status") as f:
    print(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
"""


@pytest.mark.slow
def test_tiled_4x_upscale_peaks_below_a_one_shot_generation_of_the_output_size():
    """128 → 512 with 128 px tiles against one 512 x 512 generation, each in a fresh process (peak RSS of the
    generation alone, after loading)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    from controlnet.embedded import bundled_controlnets

    controlnet = "tile" if "tile" in bundled_controlnets() else "fill"
    peaks = {}
    for mode in ("tiles", "one-shot"):
        proc = subprocess.run([sys.executable, "-c", _PEAK, mode, controlnet], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        if proc.stdout.split()[-1] == "unsupported":
            pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
        peaks[mode] = int(proc.stdout.split()[-1])
    assert peaks["tiles"] < peaks["one-shot"], peaks


@pytest.mark.slow
def test_shipped_tile_controlnet_follows_its_blurred_condition():
    """The bundled tile ControlNet, from pure noise with an empty prompt, puts the circle where its condition (the
    tile annotator of a fill picture, factor 4) has it: IoU with the circle's disk 0.67 against 0.16 without it
    on 6 held-out circles at 20 steps (scripts/evaluate_tile.py has the upscaling measures)."""
    from controlnet.data.fill import fill_iou
    from controlnet.demo import EVAL_SEED, held_out_samples, load_pipeline
    from controlnet.embedded import bundled_controlnets
    from controlnet.pipeline import ControlUnit

    assert "tile" in bundled_controlnets()
    pipe = load_pipeline()
    gains = []
    for s in held_out_samples(4, EVAL_SEED + 5):
        unit = ControlUnit("tile", s.target, annotator="tile", annotator_params={"factor": 4.0})
        runs = [pipe("", controls=controls, steps=10, guidance=5.0, seed=0, progress=False, output_type="np")
                for controls in ([unit], [])]
        gains.append(fill_iou(runs[0].images[0], s.condition) - fill_iou(runs[1].images[0], s.condition))
    assert np.mean(gains) >= 0.2, gains
