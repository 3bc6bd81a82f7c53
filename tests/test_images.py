"""controlnet.images: load_image (every PIL mode -> (H, W, 3) uint8 RGB), save_png (atomic, with metadata, a
failed write is a one-line error), make_grid and png_metadata."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from controlnet.errors import UserError
from controlnet.images import load_image, make_grid, png_metadata, save_png


def _grey(h: int = 5, w: int = 7) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * 7 % 256).astype(np.uint8)


def _check(rgb: np.ndarray, h: int, w: int) -> None:
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8


def test_rgb_and_l_are_exact():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(load_image(Image.fromarray(rgb)), rgb)
    grey = _grey()
    out = load_image(Image.fromarray(grey, "L"))
    assert np.array_equal(out, np.repeat(grey[..., None], 3, axis=2))


def test_alpha_is_composited_on_black():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[0, :, 3] = 255  # opaque row
    rgba[1, :, 3] = 51  # 20 % opaque row
    out = load_image(Image.fromarray(rgba, "RGBA"))
    assert out[0].tolist() == [[200, 100, 50]] * 3
    assert out[1].tolist() == [[40, 20, 10]] * 3  # 200 * 0.2, 100 * 0.2, 50 * 0.2
    la = Image.fromarray(np.stack([np.full((2, 2), 100, np.uint8), np.full((2, 2), 0, np.uint8)], 2), "LA")
    assert load_image(la).max() == 0  # fully transparent -> black
    assert np.array_equal(load_image(rgba), out)  # the same rule for arrays


def test_palette_with_transparency_and_binary():
    p = Image.fromarray(_grey(), "L").convert("P")
    assert np.array_equal(load_image(p), load_image(p.convert("RGB")))
    p.info["transparency"] = int(np.asarray(p)[0, 0])
    out = load_image(p)
    assert out[0, 0].tolist() == [0, 0, 0]
    bw = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    assert load_image(bw)[..., 0].tolist() == [[0, 255], [255, 0]]


def test_high_bit_depth_is_scaled_by_range():
    values = np.array([[1000, 2000], [3000, 1000 + 2000 * 2]], np.uint16)  # range 1000..5000
    out = load_image(Image.fromarray(values))  # mode I;16
    assert Image.fromarray(values).mode == "I;16"
    assert out[..., 0].tolist() == [[0, 64], [128, 255]]  # (v - 1000) / 4000 * 255, rounded
    f = Image.fromarray(np.array([[-1.0, 0.0], [1.0, 3.0]], np.float32), "F")
    assert load_image(f)[..., 0].tolist() == [[0, 64], [128, 255]]
    assert load_image(Image.fromarray(np.full((2, 2), 7, np.uint16)))[..., 0].tolist() == [[7, 7], [7, 7]]
    assert load_image(np.array([[0, 10]], np.uint16))[..., 0].tolist() == [[0, 255]]


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I", "I;16", "F", "1", "CMYK", "YCbCr", "PA"])
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (17, 4)])
def test_every_mode_and_odd_size(mode, size):
    w, h = size
    rgb = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    img = Image.fromarray((rgb[..., 0].astype(np.uint16) * 250)) if mode == "I;16" else base.convert(mode)
    _check(load_image(img), h, w)


def test_arrays():
    _check(load_image(np.zeros((3, 4), bool)), 3, 4)
    assert load_image(np.array([[True, False]]))[..., 0].tolist() == [[255, 0]]
    assert load_image(np.array([[0.0, 0.5, 1.0, 2.0]]))[..., 1].tolist() == [[0, 128, 255, 255]]
    _check(load_image(np.zeros((3, 4, 1), np.uint8)), 3, 4)
    with pytest.raises(UserError, match="must be"):
        load_image(np.zeros((3, 4, 2), np.uint8))


def test_files_and_exif_orientation(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), rgb)
    assert np.array_equal(load_image(str(tmp_path / "a.png")), rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (9, 6, 3)


@pytest.mark.parametrize("case", ["missing", "text", "folder", "truncated", "empty_pil", "empty_array", "bad_type"])
def test_refusals_are_one_line_user_errors(tmp_path, case):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 90).save(tmp_path / "ok.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    src = {
        "missing": tmp_path / "nope.png",
        "text": tmp_path / "notes.txt",
        "folder": tmp_path,
        "truncated": tmp_path / "cut.png",
        "empty_pil": Image.new("RGB", (0, 0)),
        "empty_array": np.zeros((0, 5, 3), np.uint8),
        "bad_type": 3.5,
    }[case]
    with pytest.raises(UserError) as err:
        load_image(src)
    message = str(err.value)
    assert "\n" not in message
    if isinstance(src, type(tmp_path)):
        assert src.name in message


def test_save_png_round_trip_metadata_and_atomicity(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (5, 3, 3), dtype=np.uint8)
    out = tmp_path / "sub" / "x.png"
    save_png(out, rgb, {"annotator": "canny", "params": '{"low": 1}'})
    with Image.open(out) as img:
        assert img.text == {"annotator": "canny", "params": '{"low": 1}'}
    assert np.array_equal(load_image(out), rgb)
    save_png(out, Image.fromarray(rgb[..., 0]))  # overwrite with a PIL image, grey
    assert np.array_equal(load_image(out)[..., 2], rgb[..., 0])
    depth16 = np.array([[0, 65535]], np.uint16)
    save_png(tmp_path / "d.png", depth16)
    assert np.asarray(Image.open(tmp_path / "d.png")).tolist() == [[0, 65535]]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.png"]  # no temporary files left
    with pytest.raises(UserError):
        save_png(tmp_path / "bad.png", np.zeros((2, 2, 2), np.uint8))
    assert not (tmp_path / "bad.png").exists()


def test_save_png_failed_write_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(UserError, match="a-file") as err:
        save_png(tmp_path / "a-file" / "x.png", np.zeros((4, 4, 3), np.uint8))  # its folder is a file
    assert "\n" not in str(err.value)
    # A full disk, as the file-size limit makes it (EFBIG, like ENOSPC, from write()): refused, nothing left.
    script = textwrap.dedent(f"""
        import resource, signal
        import numpy as np
        from controlnet.errors import UserError
        from controlnet.images import save_png
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # ~200 kB as PNG
        try:
            save_png({str(tmp_path / "big" / "x.png")!r}, noise)
        except UserError as err:
            print(err)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "x.png: cannot write the PNG" in out.stdout and len(out.stdout.strip().splitlines()) == 1, out.stdout
    assert list((tmp_path / "big").iterdir()) == []  # neither the PNG nor a temporary file


def test_make_grid_layout_known_answer():
    red = np.zeros((2, 3, 3), np.uint8)
    red[..., 0] = 255
    grey = Image.fromarray(np.full((4, 2), 9, np.uint8))  # another size and mode: converted to RGB
    row = np.asarray(make_grid([red, grey]))  # one row; cells of the largest size (4 x 3), top-left aligned
    assert row.shape == (4, 6, 3)
    assert (row[:2, :3] == [255, 0, 0]).all() and (row[2:, :3] == 0).all()
    assert (row[:, 3:5] == 9).all() and (row[:, 5] == 0).all()
    grid = np.asarray(make_grid([red, red, red], columns=2, pad=1, background=(0, 0, 255)))
    assert grid.shape == (2 * 2 + 3, 2 * 3 + 3, 3)  # 2 rows x 2 columns of 2 x 3 cells, 1 px apart and around
    assert (grid[1:3, 1:4] == [255, 0, 0]).all() and (grid[4:6, 5:8] == [0, 0, 255]).all()  # the empty cell
    assert (grid[0] == [0, 0, 255]).all()
    with pytest.raises(ValueError):
        make_grid([])


def test_png_metadata_per_image_seed_and_settings_json():
    settings = {"prompt": "red circle", "seed": 5, "seeds": [5, 6], "steps": 2, "controlnets": [{"strength": 0.5}]}
    meta = png_metadata(settings, index=1)
    assert json.loads(meta["settings"])["prompt"] == "red circle" and meta["seed"] == "6" and meta["steps"] == "2"
    assert "prompt" not in meta  # ComfyUI reads a "prompt" chunk as its workflow JSON
    assert json.loads(meta["controlnets"]) == [{"strength": 0.5}] and "seeds" not in meta
    assert json.loads(meta["settings"]) == {"prompt": "red circle", "seed": 6, "steps": 2,
                                            "controlnets": [{"strength": 0.5}]}
