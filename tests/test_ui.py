"""The web UI (``controlnet ui``): the page's callbacks without a browser, and one end-to-end run in headless Chromium.

The fast tests drive :class:`controlnet.ui.UiBackend` directly, with a recording stand-in pipeline (exact
checks of what the page passes on) and with the real pipeline on a tiny seeded SD-layout model built here.
The browser test serves the page on a free local port, uploads a condition image to unit 1 with Playwright,
presses Generate and waits for the gallery image.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from controlnet import ui
from controlnet.errors import UserError

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (.ci/run installs it); never a downloaded browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
TINY_SIZE = 64  # tiny UNet sample_size 8 x VAE factor 8
# Set CONTROLNET_UI_SCREENSHOT=docs/ui.png to also copy the screenshot there (the README's picture).
SCREENSHOT_COPY_ENV = "CONTROLNET_UI_SCREENSHOT"


# --------------------------------------------------------------------------- helpers


class RecordingPipeline:
    """Stands in for controlnet.pipeline.Pipeline: records the call, returns solid images of the asked size."""

    native_size = TINY_SIZE

    def __init__(self, error: Exception | None = None):
        self.calls: list[dict] = []
        self.error = error

    def __call__(self, *, controls, callback=None, progress=True, **kwargs):
        self.calls.append(dict(kwargs, controls=controls, progress=progress))
        if self.error is not None:
            raise self.error
        for step in range(kwargs["steps"]):
            if callback is not None:
                callback(step, 999 - step, None)  # (i, t, latents), as the pipeline calls it
        (w, h), n, seed = kwargs["size"], kwargs["num_images"], kwargs["seed"]
        images = [Image.new("RGB", (w, h), (10 * k, 20, 30)) for k in range(n)]
        conditions = [Image.new("RGB", (w, h), (255, 255, 255)) for _ in controls]
        settings = {"prompt": kwargs["prompt"], "seed": seed, "seeds": [seed + k for k in range(n)],
                    "steps": kwargs["steps"], "size": f"{w}x{h}"}
        return SimpleNamespace(images=images, conditions=conditions, seed=seed, settings=settings)


def request(**overrides) -> ui.GenerateRequest:
    units = overrides.pop("units", [ui.UnitInput() for _ in range(ui.MAX_UNITS)])
    fields = dict(prompt="a red circle", negative_prompt="", steps=3, guidance=9.0, scheduler="ddim", seed=7,
                  width=TINY_SIZE, height=TINY_SIZE, num_images=1, guess_mode=False)
    fields.update(overrides)
    return ui.GenerateRequest(**fields, units=units)


def circle_image(size: int = TINY_SIZE) -> Image.Image:
    """A white disk on black: the fill dataset's kind of condition."""
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    return Image.fromarray(np.repeat((disk * 255).astype(np.uint8)[..., None], 3, axis=2))


def build_tiny_base(root: Path) -> tuple[Path, Path]:
    """A tiny seeded SD1-layout diffusers folder and a ControlNet for it (zero convs: a no-op control)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from controlnet.checkpoints import save_diffusers_folder
    from controlnet.testing import TINY_SD1_UNET, build_text_encoder, build_tokenizer, build_unet, build_vae
    from controlnet.model import ControlNet

    unet = build_unet("sd1", "tiny", seed=0)
    tokenizer = build_tokenizer(["red", "circle", "blue", "square"])
    text_encoder = build_text_encoder(len(tokenizer), hidden_size=TINY_SD1_UNET["cross_attention_dim"])
    # SD1.x's scheduler config (runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=build_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    base = root / "tiny-base"
    pipe.save_pretrained(base)
    controlnet = root / "tiny-controlnet"
    save_diffusers_folder(ControlNet.from_unet(unet), controlnet)
    return base, controlnet


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_base(tmp_path_factory.mktemp("ui-models"))


@pytest.fixture(scope="module")
def tiny_backend(tiny_models, tmp_path_factory) -> ui.UiBackend:
    base, controlnet = tiny_models
    return ui.create_backend(ui.UiConfig(base=str(base), output_dir=str(tmp_path_factory.mktemp("ui-out")),
                                         models_dirs=(str(controlnet.parent),)))


# --------------------------------------------------------------------------- page values


def test_request_from_values_follows_widget_order():
    glob = ["p", "n", 5, 7.5, "ddim", 3, 64, 128, 2, True]
    unit = [True, "fill", "/x.safetensors", "IMG", "canny", "low=1", 0.5, 0.1, 0.9, "prompt", "depth"]
    values = glob + unit + [False] + [None] * 10 + [False] + [None] * 10
    req = ui.request_from_values(values, num_units=3)
    assert (req.prompt, req.negative_prompt, req.steps, req.guidance, req.scheduler, req.seed) == ("p", "n", 5, 7.5, "ddim", 3)
    assert (req.width, req.height, req.num_images, req.guess_mode) == (64, 128, 2, True)
    assert req.units[0] == ui.UnitInput(*unit)
    assert [u.enabled for u in req.units] == [True, False, False]
    with pytest.raises(ValueError):
        ui.request_from_values(values[:-1], num_units=3)


def test_annotator_params_known_answers():
    """The parameters box: key=value pairs split on commas/semicolons, typed by the annotator's declared params."""
    assert ui.split_params(" low=100, high=200.5; safe=true,, ") == ["low=100", "high=200.5", "safe=true"]
    assert ui.annotator_params("canny", "") == {} and ui.annotator_params(None, "  ") == {}
    assert ui.annotator_params("softedge", "scales=2, sigma=1.5; safe=true") == {"scales": 2, "sigma": 1.5, "safe": True}
    assert ui.annotator_params("segmentation_map", "palette=cocostuff") == {"palette": "cocostuff"}
    with pytest.raises(UserError, match="mask= names a file on the server"):  # never a server path from a browser
        ui.annotator_params("inpaint", "mask=/tmp/m.png")
    with pytest.raises(UserError, match="key=value"):
        ui.annotator_params("canny", "low_threshold 100")
    with pytest.raises(UserError, match="expects an integer"):
        ui.annotator_params("canny", "low_threshold=1.5")
    with pytest.raises(UserError, match="no annotator is chosen"):
        ui.annotator_params(None, "low_threshold=1")


# --------------------------------------------------------------------------- generate callback (stand-in pipeline)


def test_generate_replaces_random_seed_and_shows_it(tmp_path):
    pipe = RecordingPipeline()
    backend = ui.UiBackend(pipe, tmp_path)
    steps_seen = []
    outcome = backend.generate(request(seed=-1, num_images=2), progress=lambda frac, desc: steps_seen.append(frac))
    assert outcome.ok, outcome.status
    used = pipe.calls[0]["seed"]
    assert isinstance(used, int) and 0 <= used <= ui.SEED_MAX
    assert outcome.seed == used and f"seed {used}" in outcome.status
    assert pipe.calls[0]["size"] == (TINY_SIZE, TINY_SIZE) and pipe.calls[0]["controls"] == []
    assert steps_seen[0] == 0.0 and steps_seen[-1] == 1.0 and len(steps_seen) == 1 + 3
    assert pipe.calls[0]["progress"] is False  # no tqdm bar on the server's stderr: the page shows progress
    assert len(outcome.files) == 2 and [p for p, _ in outcome.images] == outcome.files
    assert [caption for _, caption in outcome.images] == [f"seed {used}", f"seed {used + 1}"]
    for k, path in enumerate(outcome.files):
        with Image.open(path) as img:
            assert img.size == (TINY_SIZE, TINY_SIZE)
            assert img.text["seed"] == str(used + k)  # image k is made with seed + k
            assert json.loads(img.text["settings"])["prompt"] == "a red circle" and img.text["steps"] == "3"
            assert json.loads(img.text["settings"])["seed"] == used + k
    # A fixed seed is passed through unchanged.
    assert backend.generate(request(seed=1234)).seed == 1234 and pipe.calls[-1]["seed"] == 1234


@pytest.mark.parametrize("error, expected", [
    (UserError("control_sd21_canny.pth is an SD2 ControlNet but the base is SD1; pick a matching pair"),
     "Error: control_sd21_canny.pth is an SD2 ControlNet"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied\n(1x2 and 3x4)"),
     "Error: RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x2 and 3x4) (details in the server log)"),
])
def test_generate_errors_become_one_line_messages(tmp_path, error, expected):
    outcome = ui.UiBackend(RecordingPipeline(error=error), tmp_path).generate(request())
    assert not outcome.ok and outcome.images == [] and outcome.files == []
    assert outcome.status.startswith(expected) and "\n" not in outcome.status and "Traceback" not in outcome.status
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, message", [
    (dict(seed=-5), "seed must be -1 (random)"),
    (dict(seed="abc"), "seed must be a whole number"),
    (dict(width=100), "multiples of 8"),
    (dict(units=[ui.UnitInput(enabled=True, model="fill", image=None)]), "ControlNet unit 1: no input image"),
    (dict(units=[ui.UnitInput(), ui.UnitInput(enabled=True, model=None, image=circle_image())]),
     "ControlNet unit 2: choose a ControlNet model"),
    (dict(units=[ui.UnitInput(enabled=True, model="fill", image=circle_image(), start=0.8, end=0.2)]),
     "ControlNet unit 1: ControlNet start 0.8 is after end 0.2"),
    (dict(units=[ui.UnitInput(enabled=True, model="fill", image=circle_image(), annotator="canny",
                              annotator_params="x")]),
     "ControlNet unit 1: canny: cannot read the parameter 'x'"),
    (dict(units=[ui.UnitInput(enabled=True, model="fill", image=circle_image(), annotator_params="low_threshold=5")]),
     "ControlNet unit 1: annotator parameters are given but no annotator is chosen"),
    (dict(num_images=ui.MAX_NUM_IMAGES + 1), f"number of images must be in 1..{ui.MAX_NUM_IMAGES}"),
])
def test_bad_page_values_are_messages_and_nothing_runs(tmp_path, overrides, message):
    pipe = RecordingPipeline()
    outcome = ui.UiBackend(pipe, tmp_path).generate(request(**overrides))
    assert not outcome.ok and message in outcome.status and pipe.calls == []


def test_enabled_units_become_control_units(tmp_path):
    from controlnet.pipeline import ControlUnit

    pipe = RecordingPipeline()
    img = circle_image()
    units = [ui.UnitInput(True, "fill", "", img, "none", "", 0.5, 0.1, 0.9),
             ui.UnitInput(False, "fill", "", img),
             ui.UnitInput(True, "fill", " /models/cn.safetensors ", img, "canny", "low_threshold=10, high_threshold=20",
                          1.5, 0.0, 1.0)]
    outcome = ui.UiBackend(pipe, tmp_path).generate(request(units=units, guess_mode=True))
    assert outcome.ok and sorted(outcome.conditions) == [0, 2]  # conditions map back to their units
    first, third = pipe.calls[0]["controls"]
    assert isinstance(first, ControlUnit) and pipe.calls[0]["guess_mode"] is True
    assert (first.controlnet, first.annotator, first.strength, first.start, first.end) == ("fill", None, 0.5, 0.1, 0.9)
    assert first.image is img
    assert (third.controlnet, third.annotator, third.annotator_params, third.strength) == (
        "/models/cn.safetensors", "canny", {"low_threshold": 10, "high_threshold": 20}, 1.5)


def test_preview_without_annotator_is_the_image_and_errors_are_messages(tmp_path):
    backend = ui.UiBackend(RecordingPipeline(), tmp_path)
    img = circle_image()
    cond, status = backend.preview(ui.UnitInput(image=img), TINY_SIZE, TINY_SIZE)
    np.testing.assert_array_equal(cond, np.asarray(img))
    assert "No annotator" in status
    # Resized as the pipeline resizes: cover, then centre-crop (a 64x64 disk → the middle 64x32 band of 64x64).
    cond, _ = backend.preview(ui.UnitInput(image=img), TINY_SIZE, TINY_SIZE // 2)
    np.testing.assert_array_equal(cond, np.asarray(img)[TINY_SIZE // 4 : 3 * TINY_SIZE // 4])
    cond, status = backend.preview(ui.UnitInput(image=None), TINY_SIZE, TINY_SIZE)
    assert cond is None and status.startswith("Error: no input image")


def test_preview_runs_the_annotator_on_the_resized_image(tmp_path):
    from controlnet import annotators

    backend = ui.UiBackend(RecordingPipeline(), tmp_path)
    img = circle_image(96)  # resized to 64x64 first, as the pipeline does before annotating
    cond, status = backend.preview(ui.UnitInput(image=img, annotator="canny", annotator_params="low_threshold=50"), 64, 64)
    from controlnet.conditions import resize_cover

    expected = annotators.get("canny")(resize_cover(np.asarray(img), 64, 64), low_threshold=50)
    np.testing.assert_array_equal(cond, expected)
    assert cond.max() == 255 and "canny" in status
    _, status = backend.preview(ui.UnitInput(image=img, annotator="canny", annotator_params="bogus=1"), 64, 64)
    assert status.startswith("Error: canny: unknown parameter 'bogus'")


def test_annotator_choices_and_help():
    choices = ui.UiBackend.annotator_choices()
    assert choices[0] == ui.NO_ANNOTATOR and "canny" in choices and len(set(choices)) == len(choices)
    placeholder, info = ui.UiBackend.annotator_help("canny")
    assert placeholder.startswith("low_threshold=") and "high_threshold=" in placeholder and "Canny" in info
    assert ui.UiBackend.annotator_help(ui.NO_ANNOTATOR)[0] == ""


def test_embedded_examples_are_the_demo_fill_conditions(tmp_path):
    from controlnet import demo
    from controlnet.embedded import bundled_controlnets

    examples = ui.embedded_examples(tmp_path)
    if demo.FILL_CONTROLNET not in bundled_controlnets():
        assert examples == []
        return
    assert [ex.prompt for ex in examples] == [s.prompt for s in demo.DEMO_SAMPLES[:3]]
    for ex, sample in zip(examples, demo.DEMO_SAMPLES):
        assert (ex.controlnet, ex.guidance) == ("fill", demo.DEMO_GUIDANCE)
        np.testing.assert_array_equal(np.asarray(Image.open(ex.image).convert("RGB")), sample.condition)


# --------------------------------------------------------------------------- CLI plumbing


def test_cli_defaults_bind_localhost():
    from controlnet.commands.ui import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ui"])
    assert (args.base, args.host, args.port) == (None, "127.0.0.1", 7860)
    args = parser.parse_args(["ui", "--base", "/m", "--host", "0.0.0.0", "--port", "9000"])
    assert (args.base, args.host, args.port) == ("/m", "0.0.0.0", 9000)


def test_missing_gradio_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    with pytest.raises(UserError, match=re.escape(ui.INSTALL_HINT)):
        ui.import_gradio()
    assert ui.INSTALL_HINT == "pip install 'controlnet-kit[ui]'"


# --------------------------------------------------------------------------- the real pipeline, tiny model


def test_generate_with_real_pipeline_on_tiny_model(tiny_backend, tiny_models):
    _, controlnet = tiny_models
    unit = ui.UnitInput(True, None, str(controlnet), circle_image(), ui.NO_ANNOTATOR, "", 1.0, 0.0, 1.0)
    fractions = []
    outcome = tiny_backend.generate(request(seed=-1, steps=2, num_images=2, units=[unit]),
                                    progress=lambda frac, desc: fractions.append(frac))
    assert outcome.ok, outcome.status
    assert fractions == [0.0, 0.5, 1.0]  # the pipeline's per-step callback drives the page's progress bar
    assert len(outcome.files) == 2 and outcome.seed is not None and f"seed {outcome.seed}" in outcome.status
    for k, path in enumerate(outcome.files):
        with Image.open(path) as img:
            assert img.size == (TINY_SIZE, TINY_SIZE) and img.text["seed"] == str(outcome.seed + k)
    assert [c.size for c in outcome.conditions.values()] == [(TINY_SIZE, TINY_SIZE)]


def test_wrong_controlnet_file_is_a_message(tiny_backend, tmp_path):
    bogus = tmp_path / "not-a-controlnet.safetensors"
    bogus.write_bytes(b"this is not a checkpoint")
    unit = ui.UnitInput(True, None, str(bogus), circle_image(), ui.NO_ANNOTATOR, "", 1.0, 0.0, 1.0)
    outcome = tiny_backend.generate(request(steps=1, units=[unit]))
    assert not outcome.ok and outcome.status.startswith("Error: ") and "not-a-controlnet" in outcome.status
    assert "Traceback" not in outcome.status and "details in the server log" not in outcome.status  # a UserError


def test_page_wiring_sends_each_widget_to_its_field(tmp_path):
    """The Generate handler of the built page (no browser): each widget's value reaches its request field."""
    gr = pytest.importorskip("gradio", reason="the web UI's extra is not installed")
    pipe = RecordingPipeline()
    app = ui.build_app(ui.UiBackend(pipe, tmp_path))
    handler = next(f for f in app.fns.values() if any(isinstance(o, gr.Gallery) for o in f.outputs))
    values = {"prompt": "a red circle", "negative": "blurry", "steps": 3, "guidance": 4.5, "scheduler": "euler",
              "seed": 11, "width": 64, "height": 72, "num-images": 2, "guess-mode": True,
              "unit2-enable": True, "unit2-model": "fill", "unit2-image": circle_image(), "unit2-annotator": "canny",
              "unit2-params": "low_threshold=10", "unit2-strength": 0.5}
    data = {c: values.get(c.elem_id, c.value) for c in handler.inputs}
    images, files, seed, status, *conditions = handler.fn(data, progress=lambda *args, **kwargs: None)
    assert status.startswith("Done: 2 images at 64x72, seed 11") and seed == 11 and len(files) == 2
    call = pipe.calls[0]
    assert {k: call[k] for k in ("prompt", "negative_prompt", "steps", "guidance", "scheduler", "seed", "size",
                                 "num_images", "guess_mode")} == {
        "prompt": "a red circle", "negative_prompt": "blurry", "steps": 3, "guidance": 4.5, "scheduler": "euler",
        "seed": 11, "size": (64, 72), "num_images": 2, "guess_mode": True}
    (unit,) = call["controls"]
    assert (unit.controlnet, unit.annotator, unit.annotator_params, unit.strength) == (
        "fill", "canny", {"low_threshold": 10}, 0.5)
    assert conditions[1] is not None and isinstance(conditions[0], type(gr.skip()))  # only unit 2 ran


# --------------------------------------------------------------------------- the browser


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_page(config: ui.UiConfig, sync_api):
    """The UI served on ``config`` (a free port is picked) and a headless Chromium page open on it."""
    config = dataclasses.replace(config, port=_free_port())
    app = ui.launch(config, block=False, quiet=True)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"http://127.0.0.1:{config.port}/")
                yield page
            finally:
                browser.close()
    finally:
        app.close()


@pytest.mark.browser
@pytest.mark.slow
def test_page_generates_in_headless_chromium(tiny_models, tmp_path, monkeypatch):
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")
    base, controlnet = tiny_models
    condition = tmp_path / "condition.png"
    circle_image().save(condition)
    bogus = tmp_path / "not-a-controlnet.safetensors"
    bogus.write_bytes(b"this is not a checkpoint")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # uploads and cached files stay in tmp_path
    config = ui.UiConfig(base=str(base), output_dir=str(tmp_path / "outputs"),
                         models_dirs=(str(controlnet.parent), str(tmp_path)))
    with served_page(config, sync_api) as page:
        page.fill("#prompt textarea", "a red circle")
        page.set_input_files("#unit1-image input[type=file]", str(condition))
        page.wait_for_selector("#unit1-image img", timeout=20_000)
        sync_api.expect(page.locator("#unit1-enable input")).to_be_checked()  # the upload enabled unit 1
        page.fill("#steps input[type=number]", "2")
        # A file that is not a ControlNet: one line in the status box, no image.
        page.fill("#unit1-model-path textarea, #unit1-model-path input", str(bogus))
        page.click("#generate")
        status = page.locator("#status textarea")
        sync_api.expect(status).to_have_value(re.compile("^Error: "), timeout=40_000)
        assert bogus.name in status.input_value() and "Traceback" not in page.content()
        assert page.locator("#gallery img").count() == 0
        # The right file: an image of the model's size in the gallery, the seed used shown.
        page.fill("#unit1-model-path textarea, #unit1-model-path input", str(controlnet))
        page.click("#generate")
        page.wait_for_selector("#gallery img", timeout=40_000)
        sync_api.expect(status).to_have_value(re.compile("^Done: 1 image"), timeout=10_000)
        status = status.input_value()
        size = page.eval_on_selector("#gallery img", "img => [img.naturalWidth, img.naturalHeight]")
        assert size == [TINY_SIZE, TINY_SIZE]
        seed_used = int(page.input_value("#seed-used input"))
        assert f"seed {seed_used}" in status and seed_used >= 0
        shot = tmp_path / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
    saved = sorted((tmp_path / "outputs").rglob("*.png"))  # in the folder the UI made for its run
    assert len(saved) == 1
    with Image.open(saved[0]) as img:
        assert img.size == (TINY_SIZE, TINY_SIZE) and img.text["seed"] == str(seed_used)
        assert (json.loads(img.text["settings"])["prompt"], img.text["steps"]) == ("a red circle", "2")  # the page's values
        assert json.loads(img.text["controlnets"])[0]["controlnet"] == str(controlnet)
    assert shot.stat().st_size > 0
    if os.environ.get(SCREENSHOT_COPY_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_COPY_ENV])


def save_docs_screenshot(path: Path) -> None:
    """The README's picture: the page on the embedded model, example 1 (a fill condition) generated.

    ``python tests/test_ui.py docs/ui.png`` (needs the embedded model, Chromium and playwright).
    """
    from playwright import sync_api

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["GRADIO_TEMP_DIR"] = str(Path(tmp) / "gradio")
        with served_page(ui.UiConfig(base=None, output_dir=tmp), sync_api) as page:
            page.locator("#examples tbody tr").first.click()
            sync_api.expect(page.locator("#unit1-enable input")).to_be_checked()
            page.fill("#seed input", "0")
            page.click("#generate")
            page.wait_for_selector("#gallery img", timeout=120_000)
            sync_api.expect(page.locator("#status textarea")).to_have_value(re.compile("^Done"), timeout=10_000)
            shot = Path(tmp) / "ui.png"
            page.screenshot(path=str(shot), full_page=True)
        with Image.open(shot) as img:  # 256 colours: a third of the bytes, no visible change for a UI
            img.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    save_docs_screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/ui.png"))


# --------------------------------------------------------------------------- a Flux base (the embedded tiny-flux)


FLUX_SIZE = 128  # tiny-flux's native size


@pytest.fixture(scope="module")
def flux_backend(tmp_path_factory) -> ui.UiBackend:
    return ui.create_backend(ui.UiConfig(base="tiny-flux", output_dir=str(tmp_path_factory.mktemp("ui-flux"))))


def test_flux_base_gets_its_own_controlnets_sampler_and_no_negative_prompt(flux_backend):
    from controlnet.embedded import embedded_base

    assert flux_backend.is_flow and flux_backend.pipeline.family == "flux"
    assert flux_backend.controlnet_choices() == ["fill"]  # tiny-flux's own, not the SD-layout bundled ones
    assert flux_backend.controlnets["fill"] == embedded_base("tiny-flux") / "controlnets" / "fill"
    assert flux_backend.scheduler_choices() == [ui.FLOW_SCHEDULER]
    assert flux_backend.default_sampler() == (3.5, ui.FLOW_SCHEDULER) and flux_backend.default_size() == FLUX_SIZE
    assert flux_backend.negative_prompt == ""
    from controlnet import demo

    assert [(ex.prompt, ex.controlnet, ex.guidance) for ex in flux_backend.examples] == [
        (sample.prompt, "fill", 3.5) for sample in demo.DEMO_SAMPLES[:3]]  # the demo's circles, Flux's guidance


def test_flux_page_generation_equals_the_pipeline_and_drives_progress(flux_backend):
    from controlnet.generation_config import GenerationConfig
    from controlnet.pipeline import ControlUnit

    condition = circle_image(FLUX_SIZE)
    unit = ui.UnitInput(True, "fill", "", condition, ui.NO_ANNOTATOR, "", 1.0, 0.0, 1.0)
    fractions = []
    outcome = flux_backend.generate(request(prompt="a red circle", steps=2, guidance=3.5, scheduler=ui.FLOW_SCHEDULER,
                                            seed=5, width=FLUX_SIZE, height=FLUX_SIZE, units=[unit]),
                                    progress=lambda frac, desc: fractions.append(frac))
    assert outcome.ok, outcome.status
    assert fractions == [0.0, 0.5, 1.0]
    fill = str(flux_backend.controlnets["fill"])
    direct = flux_backend.pipeline.generate("a red circle", [ControlUnit(fill, condition)],
                                            GenerationConfig(steps=2, seed=5, size=(FLUX_SIZE, FLUX_SIZE)),
                                            progress=False)
    with Image.open(outcome.files[0]) as img:
        assert img.size == (FLUX_SIZE, FLUX_SIZE)
        assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(direct.images[0]))
        assert json.loads(img.text["controlnets"])[0]["controlnet"] == fill


@pytest.mark.parametrize("overrides, message", [
    (dict(guess_mode=True), "--guess-mode is for UNet bases"),
    (dict(negative_prompt="blurry"), "Flux is guidance-distilled"),
])
def test_flux_page_refuses_unet_settings_in_one_line(flux_backend, overrides, message):
    outcome = flux_backend.generate(request(**{**dict(steps=1, width=FLUX_SIZE, height=FLUX_SIZE), **overrides}))
    assert not outcome.ok and message in outcome.status and "\n" not in outcome.status


def test_flux_page_progress_counts_every_image_and_hires_step(flux_backend):
    unit = ui.UnitInput(True, "fill", "", circle_image(FLUX_SIZE), ui.NO_ANNOTATOR, "", 1.0, 0.0, 1.0)
    fractions = []
    page = request(steps=2, guidance=3.5, scheduler=ui.FLOW_SCHEDULER, seed=1, width=64, height=64, num_images=2,
                   units=[unit])
    page.hires = ui.HiresInput(enabled=True, scale=1.5, denoise=0.5, steps=4, upscaler="latent")
    outcome = flux_backend.generate(page, progress=lambda frac, desc: fractions.append(frac))
    assert outcome.ok, outcome.status
    # Each image: 2 steps, then its hires pass runs the last 0.5 x 4 = 2 of 4 steps.
    assert fractions == [0.0, *[k / 8 for k in range(1, 9)]]
    with Image.open(outcome.files[0]) as img:
        assert img.size == (96, 96)


def test_flux_page_prompt_tag_loras_load_from_the_models_folder_and_stay_bounded(tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    from controlnet.lora import adapters_in
    from test_flow_lora import ATTENTION, make_lora, save_lora

    models = tmp_path / "models"
    models.mkdir()
    backend = ui.create_backend(ui.UiConfig(base="tiny-flux", output_dir=str(tmp_path / "out"),
                                            models_dirs=(str(models),)))
    for k, name in enumerate(("first", "second")):
        (tmp_path / name).mkdir()
        made = save_lora(FluxPipeline, tmp_path / name, *make_lora(backend.pipeline.transformer, ATTENTION, 10 + k))
        Path(made).rename(models / f"{name}.safetensors")
    monkeypatch.setattr(ui, "MAX_PROMPT_LORAS", 1)
    page = dict(steps=1, guidance=3.5, scheduler=ui.FLOW_SCHEDULER, seed=2, width=64, height=64)
    plain = backend.generate(request(prompt="a red circle", **page))
    tagged = backend.generate(request(prompt="a red circle <lora:first:0.8>", **page))
    assert plain.ok and tagged.ok, (plain.status, tagged.status)
    with Image.open(plain.files[0]) as a, Image.open(tagged.files[0]) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
        settings = json.loads(b.text["settings"])
        assert settings["loras"] == {"first": [0.8, 0.8]} and settings["prompt"] == "a red circle <lora:first:0.8>"
    assert adapters_in(backend.pipeline.transformer) == ["first"]
    assert backend.generate(request(prompt="a red circle <lora:second:0.8>", **page)).ok
    assert adapters_in(backend.pipeline.transformer) == ["second"]  # the least recently used one unloaded
    again = backend.generate(request(prompt="a red circle", **page))
    with Image.open(plain.files[0]) as a, Image.open(again.files[0]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))  # a tag acts for its own generation only


def test_flux_page_builds_with_its_choices_and_generates_through_the_handler(flux_backend):
    gr = pytest.importorskip("gradio", reason="the web UI's extra is not installed")
    app = ui.build_app(flux_backend)
    handler = next(f for f in app.fns.values() if any(isinstance(o, gr.Gallery) for o in f.outputs))
    widgets = {c.elem_id: c for c in handler.inputs}
    assert widgets["scheduler"].value == ui.FLOW_SCHEDULER and widgets["guidance"].value == 3.5
    assert widgets["negative"].value == "" and widgets["width"].value == FLUX_SIZE
    assert [choice[0] for choice in widgets["unit1-model"].choices] == ["fill"]
    values = {"prompt": "a red circle", "steps": 2, "seed": 3, "unit1-enable": True, "unit1-model": "fill",
              "unit1-image": circle_image(FLUX_SIZE)}
    data = {c: values.get(c.elem_id, c.value) for c in handler.inputs}
    images, files, seed, status, *conditions = handler.fn(data, progress=lambda *args, **kwargs: None)
    assert status.startswith(f"Done: 1 image at {FLUX_SIZE}x{FLUX_SIZE}, seed 3"), status
    assert len(files) == 1 and conditions[0] is not None
