"""The size limits (controlnet.limits) and where they are enforced: known answers at the boundaries, checks that
happen before any allocation, the memory-derived default under a real ``RLIMIT_AS``, and the writes that must fail
loudly (the fill data set, the cache, the one PNG writer)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from controlnet import limits
from controlnet.errors import UserError


# --------------------------------------------------------------------------- the rules


def test_output_limit_boundary_and_message():
    limits.check_output_size(64, 64, max_pixels=64 * 64)  # exactly at the limit: allowed
    with pytest.raises(UserError) as err:
        limits.check_output_size(64, 65, max_pixels=64 * 64, what="--size")
    message = str(err.value)
    assert message.startswith("--size: 64x65 is 4,160 pixels, over the limit of 4,096 (--max-pixels 4,096)")
    assert "--max-pixels N" in message and "\n" not in message
    with pytest.raises(UserError, match="at least 1 pixel"):
        limits.check_output_size(0, 64, max_pixels=10**9)


def test_default_limit_is_memory_over_bytes_per_pixel():
    memory, name = limits.device_memory("cpu")
    assert name == "cpu" and memory > 0
    assert limits.default_max_pixels("cpu") == memory // limits.BYTES_PER_PIXEL
    side = int((memory // limits.BYTES_PER_PIXEL) ** 0.5)
    limits.check_output_size(side, side, device="cpu")
    with pytest.raises(UserError, match=r"cpu memory .* GiB / 4096 bytes per pixel"):
        limits.check_output_size(side + 1, side + 1, device="cpu")


def test_default_limit_follows_rlimit_as():
    """Under a 2 GiB address-space limit, the CPU's memory is 2 GiB: 524,288 pixels at 4096 bytes each."""
    code = ("import resource; L = 2 * 2**30; resource.setrlimit(resource.RLIMIT_AS, (L, L)); "
            "from controlnet import limits; print(limits.default_max_pixels('cpu'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == min(2 * 2**30, limits._cpu_memory()) // limits.BYTES_PER_PIXEL
    if limits._cpu_memory() >= 2 * 2**30:
        assert int(out) == 524288


def test_max_pixels_flag_values():
    assert limits.check_max_pixels(None) is None and limits.check_max_pixels(5) == 5
    for bad in (0, -1):
        with pytest.raises(UserError, match="--max-pixels must be a positive number"):
            limits.check_max_pixels(bad)


@pytest.mark.parametrize("src, out, ok", [
    ((800, 100), (100, 100), True),  # 8:1 onto 1:1: exactly the limit
    ((801, 100), (100, 100), False),
    ((100, 801), (100, 100), False),  # either orientation
    ((100, 100), (64, 512), True),  # 1:1 onto 1:8
    ((100, 100), (64, 520), False),
    ((400, 100), (100, 400), False),  # 4:1 onto 1:4 is 16x apart
    ((100000, 1), (64, 64), False),  # a 178-byte PNG can declare this shape
    ((100000, 1), (12800000, 128), True),  # its own shape is fine (the output limit refuses that size)
])
def test_condition_aspect_limit(src, out, ok):
    if ok:
        limits.check_cover(*src, *out)
    else:
        with pytest.raises(UserError, match=f"more than {limits.MAX_ASPECT}x away"):
            limits.check_cover(*src, *out, name="c.png")


def test_resize_cover_refuses_before_resizing(monkeypatch):
    """The 100000x1 condition onto 64x64 would be scaled x64 (6.4M x 64 float pixels) before the crop."""
    import cv2

    from controlnet import conditions

    def no_resize(*args, **kwargs):
        raise AssertionError("cv2.resize must not run")

    monkeypatch.setattr(cv2, "resize", no_resize)
    with pytest.raises(UserError, match="aspect ratio"):
        conditions.resize_cover(np.zeros((1, 100000, 3), np.float32), 64, 64)


def test_seed_range():
    for seed in (0, 1, limits.MAX_SEED):
        limits.check_seed(seed)
    limits.check_seed(-1, allow_random=True)
    for seed in (-1, -2, limits.MAX_SEED + 1):
        with pytest.raises(UserError, match=r"0\.\.9223372036854775807"):
            limits.check_seed(seed)
    assert limits.MAX_SEED == 2**63 - 1


def test_limits_module_imports_nothing_heavy():
    code = "import sys, controlnet.limits; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- input images


def test_input_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from controlnet.images import load_image

    Image.new("RGB", (40, 25), (1, 2, 3)).save(tmp_path / "a.png")  # 1000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(tmp_path / "a.png").shape == (25, 40, 3)  # at the limit: read
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 999)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or real_load(self))
    with pytest.raises(UserError, match="40x25 is 1,000 pixels, over the limit of 999 for input images"):
        load_image(tmp_path / "a.png")
    assert decoded == []


def test_fifo_image_is_refused_without_blocking(tmp_path):
    from controlnet.images import load_image

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    result = []

    def read():
        try:
            load_image(fifo)
        except UserError as err:
            result.append(str(err))

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock the reader so the test run can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("load_image blocked on a FIFO")
    assert result and "not a regular file" in result[0]


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def pipe():
    from controlnet.pipeline import Pipeline

    return Pipeline.from_pretrained(dtype="fp32", device="cpu")


def test_pipeline_output_limit(pipe):
    pipe.max_pixels = 64 * 64 - 1
    try:
        with pytest.raises(UserError, match="output size: 64x64 is 4,096 pixels, over the limit of 4,095"):
            pipe(prompt="red circle", steps=1, size=(64, 64), progress=False)
    finally:
        pipe.max_pixels = None


def test_pipeline_refuses_more_steps_than_timesteps(pipe):
    calls = []
    # GenerationConfig.check's bound (1..1000, the SD schedules' timesteps) answers before the scheduler's own.
    with pytest.raises(UserError, match="steps must be in 1..1000, got 1001"):
        pipe(prompt="red circle", steps=1001, size=(64, 64), progress=False, callback=lambda *a: calls.append(a))
    assert calls == []


@pytest.mark.parametrize("seed", [-5, 2**63])
def test_pipeline_seed_range(pipe, seed):
    with pytest.raises(UserError, match="seed must be"):
        pipe(prompt="red circle", steps=1, size=(64, 64), seed=seed, progress=False)


def test_generation_stops_at_the_first_non_finite_latents(pipe):
    import torch

    weight = pipe.unet.conv_out.weight
    saved = weight.detach().clone()
    calls = []
    try:
        with torch.no_grad():
            weight.fill_(float("nan"))
        with pytest.raises(UserError, match="generation stopped at step 1 of 5: the latents became NaN or Inf"):
            pipe(prompt="red circle", steps=5, size=(64, 64), progress=False, callback=lambda *a: calls.append(a))
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert calls == []  # stopped before the caller's callback saw bad latents, and no later step ran
    result = pipe(prompt="red circle", steps=2, size=(64, 64), progress=False, output_type="latent")
    assert torch.isfinite(result.latents).all()


def test_absent_device_is_refused():
    from controlnet.devices import resolve_device

    with pytest.raises(UserError, match="cuda:99 is not available"):
        resolve_device("cuda:99")
    assert str(resolve_device("cpu")) == "cpu"


# --------------------------------------------------------------------------- writes that must fail loudly


def test_fill_data_size_limit_and_streamed_prompts(tmp_path):
    from controlnet.data.fill import make_fill_dataset

    with pytest.raises(UserError, match="--size 64: 64x64 is 4,096 pixels, over the limit of 4,095"):
        make_fill_dataset(tmp_path / "a", n=1, size=64, max_pixels=4095)
    assert not (tmp_path / "a").exists()
    out = make_fill_dataset(tmp_path / "b", n=3, size=64, max_pixels=4096)
    lines = (out / "prompt.json").read_text().splitlines()
    assert [line.split('"')[3] for line in lines] == ["source/0.png", "source/1.png", "source/2.png"]
    assert all((out / "target" / f"{i}.png").stat().st_size > 0 for i in range(3))


def test_fill_data_write_failure_is_one_line_and_leaves_nothing(tmp_path):
    """Under a file-size limit cv2.imwrite returns False instead of raising: the write must fail loudly."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200)); "
            "from controlnet.cli import main; sys.exit(main(['data', 'fill', sys.argv[1], '--n', '3', '--size', '64']))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert f"{tmp_path / 'd' / 'source' / '0.png'}: cannot write the PNG (File too large)" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_save_png_in_place_writes_the_same_image_and_cleans_up_on_failure(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    from controlnet.images import save_png

    image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    save_png(tmp_path / "atomic.png", image, {"k": "v"})
    save_png(tmp_path / "in-place.png", image, {"k": "v"}, atomic=False)
    assert (tmp_path / "atomic.png").read_bytes() == (tmp_path / "in-place.png").read_bytes()

    real = PngImagePlugin._save

    def half_then_fail(im, fp, filename, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    Image.register_save("PNG", half_then_fail)
    try:
        for atomic in (True, False):
            with pytest.raises(UserError, match=r"broken-.*\.png: cannot write the PNG \(No space left on device\)"):
                save_png(tmp_path / f"broken-{atomic}.png", image, atomic=atomic)
    finally:
        Image.register_save("PNG", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.png", "in-place.png"]


def test_cache_write_failures_name_the_entry(tmp_path, monkeypatch):
    import torch

    from controlnet.data import cache

    store = cache.CacheStore(tmp_path / "cache")

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache, "atomic_write_bytes", no_space)
    with pytest.raises(UserError, match=r"latents/ab/ab12\.safetensors: cannot write the cache entry \(No space"):
        store.save_tensors("latents", "ab12", {"params": torch.zeros(2)})
    (tmp_path / "cache" / "conditions" / "cd").mkdir(parents=True)
    (tmp_path / "cache" / "conditions" / "cd" / "cd34.png").mkdir()  # a folder in the way
    with pytest.raises(UserError, match=r"cd34\.png: cannot write the PNG"):
        store.save_condition("cd34", np.zeros((8, 8, 3), np.uint8))
