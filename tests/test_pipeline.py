"""The inference pipeline on tiny seeded models: our sampling loop against diffusers' pipelines (the oracle),
composition, step ranges, guess mode, determinism, and the helpers (resize rule, sizes, dtypes, metadata)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.testing import (
    SD_SCHEDULE,
    build_diffusers_pipeline,
    build_text_encoder_2,
    build_unet,
    tiny_components,
    trained_like,
)
from controlnet.conditions import condition_to_pil, resize_cover, round_size, to_condition_array
from controlnet.diffusers_compat import diffusers_call_kwargs, diffusers_guess_mode_scales, diffusers_pipeline
from controlnet.errors import UserError
from controlnet.images import png_metadata
from controlnet.devices import DTYPES, default_dtype, resolve_dtype
from controlnet.model import ControlNet
from controlnet.pipeline import ControlUnit, Pipeline
from controlnet.sampling import SCHEDULERS, make_scheduler

WORDS = ["red", "circle", "blue", "square", "ugly"]
PROMPT, NEGATIVE = "red circle", "ugly"
WIDTH, HEIGHT = 64, 48  # non-square catches (H, W) mix-ups; latents (B, 4, 6, 8)
STEPS = 4


def _components(family: str = "sd1", prediction_type: str = "epsilon") -> dict:
    """The tiny seeded components of ``family``, DDIM with Stable Diffusion's schedule and ``prediction_type``."""
    from diffusers import DDIMScheduler

    second = build_text_encoder_2(WORDS, seed=2) if family == "sdxl" else {}
    scheduler = DDIMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    return tiny_components(WORDS, family, scheduler=scheduler, **second)


def _condition(seed: int, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def _noise(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn((batch, 4, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(seed))


def _ours(pipe, cns, images, scales=None, **kw):
    units = [ControlUnit(cn, im, strength=s, residual_scales=rs)
             for cn, im, s, rs in zip(cns, images, kw.pop("strengths", [1.0] * len(cns)), scales or [None] * len(cns))]
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, controls=units, steps=STEPS, size=(WIDTH, HEIGHT),
                progress=False, output_type="latent", **kw)


# --------------------------------------------------------------------------- oracle: diffusers' pipelines


@pytest.mark.parametrize("n_controlnets,guess_mode,scheduler", [
    (1, False, "ddim"), (1, True, "ddim"), (2, False, "ddim"), (2, True, "ddim"), (1, False, "dpmpp_2m_karras"),
])
def test_matches_diffusers_controlnet_pipeline(sd1_with_controlnets, n_controlnets, guess_mode, scheduler):
    pipe, comps, cns = sd1_with_controlnets
    cns = cns[:n_controlnets]
    images = [_condition(20 + k) for k in range(n_controlnets)]
    strengths = [0.8, 1.3][:n_controlnets]
    oracle = diffusers_pipeline(**{**comps, "scheduler": make_scheduler(scheduler, comps["scheduler"].config)},
                                controlnets=cns)
    noise = _noise(5)
    expected = oracle(PROMPT, negative_prompt=NEGATIVE, **diffusers_call_kwargs(
        images, steps=STEPS, guidance=7.5, size=(WIDTH, HEIGHT), latents=noise.clone(), strengths=strengths,
        guess_mode=guess_mode)).images
    # diffusers' guess mode scales residual j of N by logspace(-1, 0, N)[j]; pass those scales to ours.
    scales = [diffusers_guess_mode_scales(cn.num_residuals) for cn in cns] if guess_mode else None
    ours = _ours(pipe, cns, images, scales=scales, strengths=strengths, guidance=7.5, latents=noise.clone(),
                 scheduler=scheduler, guess_mode=guess_mode)
    torch.testing.assert_close(ours.latents, expected, atol=1e-4, rtol=0)
    plain = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, size=(WIDTH, HEIGHT), guidance=7.5,
                 latents=noise.clone(), progress=False, output_type="latent", scheduler=scheduler)
    assert (ours.latents - plain.latents).abs().max() > 1e-2  # the ControlNets do change the result


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_matches_diffusers_sd2_vpred_and_sdxl(family):
    """SD2 with v-prediction (the scheduler's prediction_type) and SDXL (two text encoders, added_cond_kwargs)."""
    comps = _components(family, prediction_type="v_prediction" if family == "sd2" else "epsilon")
    cn = trained_like(ControlNet.from_unet(comps["unet"]), 12)
    pipe = Pipeline(**comps, dtype="fp32", device="cpu")
    image, noise = _condition(30), _noise(6, batch=2)
    oracle = diffusers_pipeline(**comps, controlnets=[cn])
    # SDXL: our empty negative prompt = diffusers' None → zeros (force_zeros_for_empty_prompt)
    kwargs = {} if family == "sdxl" else {"negative_prompt": NEGATIVE}
    expected = oracle(PROMPT, **kwargs, **diffusers_call_kwargs(
        [image], steps=STEPS, guidance=5.0, size=(WIDTH, HEIGHT), latents=noise.clone(), num_images=2)).images
    ours = pipe(prompt=PROMPT, controls=[ControlUnit(cn, image)], steps=STEPS, guidance=5.0, latents=noise.clone(),
                size=(WIDTH, HEIGHT), num_images=2, progress=False, output_type="latent", scheduler="ddim", **kwargs)
    torch.testing.assert_close(ours.latents, expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- the loop's rules


def _hooks(module, calls: list, outputs: list | None = None):
    def hook(mod, args, kwargs, out):
        calls.append(kwargs.get("sample", args[0] if args else None))
        if outputs is not None:
            outputs.append(out)
    return module.register_forward_hook(hook, with_kwargs=True)


def test_two_controlnets_add_their_residuals(sd1_with_controlnets):
    pipe, _, cns = sd1_with_controlnets
    calls, outs = [[], []], [[], []]
    received = []
    handles = [_hooks(cn, c, o) for cn, c, o in zip(cns, calls, outs)]
    handles.append(pipe.unet.register_forward_pre_hook(lambda m, a, kw: received.append(kw), with_kwargs=True))
    try:
        _ours(pipe, cns, [_condition(1), _condition(2)], strengths=[0.7, 1.2])
    finally:
        for h in handles:
            h.remove()
    assert len(outs[0]) == len(outs[1]) == len(received) == STEPS
    for a, b, kw in zip(outs[0], outs[1], received):
        for ra, rb, got in zip(a.down, b.down, kw["down_block_additional_residuals"]):
            assert torch.equal(got, ra + rb)
        assert torch.equal(kw["mid_block_additional_residual"], a.mid + b.mid)
    # Exact identity: two copies at strength 0.5 each are one at strength 1.0 (x/2 + x/2 == x in floating point).
    cn, image = cns[0], _condition(3)
    half = _ours(pipe, [cn, cn], [image, image], strengths=[0.5, 0.5])
    full = _ours(pipe, [cn], [image], strengths=[1.0])
    assert torch.equal(half.latents, full.latents)


@pytest.mark.parametrize("unit_kwargs", [dict(end=0.0), dict(strength=0.0), dict(start=1.0)])
def test_inactive_unit_gives_exactly_the_uncontrolled_image(sd1_with_controlnets, unit_kwargs):
    pipe, _, cns = sd1_with_controlnets
    calls: list = []
    handles = [_hooks(cns[0], calls), _hooks(cns[0].controlnet_cond_embedding, calls)]
    try:
        controlled = pipe(PROMPT, controls=[ControlUnit(cns[0], _condition(1), **unit_kwargs)], steps=STEPS,
                          size=(WIDTH, HEIGHT), progress=False, output_type="np")
    finally:
        for h in handles:
            h.remove()
    plain = pipe(PROMPT, steps=STEPS, size=(WIDTH, HEIGHT), progress=False, output_type="np")
    assert calls == []  # neither the ControlNet nor its hint encoder ran
    assert torch.equal(controlled.latents, plain.latents)
    assert np.array_equal(controlled.images[0], plain.images[0])


def test_unit_runs_only_inside_its_step_range_and_hint_is_encoded_once(sd1_with_controlnets):
    pipe, _, cns = sd1_with_controlnets
    calls, hint_calls = [], []
    handles = [_hooks(cns[0], calls), _hooks(cns[0].controlnet_cond_embedding, hint_calls)]
    try:
        # 10 steps, [0.3, 0.6]: steps i with 0.3 <= i/10 and (i+1)/10 <= 0.6 → i = 3, 4, 5.
        pipe(PROMPT, controls=[ControlUnit(cns[0], _condition(1), start=0.3, end=0.6)], steps=10,
             size=(WIDTH, HEIGHT), progress=False, output_type="latent")
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 3
    assert len(hint_calls) == 1
    unit = ControlUnit(cns[0], _condition(1), start=0.3, end=0.6)
    assert [i for i in range(10) if unit.active(i, 10)] == [3, 4, 5]


def test_reuse_residuals_computes_every_nth_active_step_and_reuses_the_rest(sd1_with_controlnets):
    """reuse_residuals=3 over 10 steps, range [0.3, 1.0] (active i = 3..9): computed at 3, 6, 9; the UNet gets the
    residuals of the last computation at every active step; reuse 1 is exactly the default loop."""
    pipe, _, cns = sd1_with_controlnets
    calls, outs, received = [], [], []
    handles = [_hooks(cns[0], calls, outs),
               pipe.unet.register_forward_pre_hook(lambda m, a, kw: received.append(kw), with_kwargs=True)]
    unit = ControlUnit(cns[0], _condition(1), start=0.3)
    try:
        reused = pipe(PROMPT, controls=[unit], steps=10, size=(WIDTH, HEIGHT), progress=False,
                      output_type="latent", reuse_residuals=3)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 3 and len(received) == 10
    assert all("down_block_additional_residuals" not in kw for kw in received[:3])
    for i, kw in enumerate(received[3:], start=3):
        source = outs[(i - 3) // 3]
        assert all(got is r for got, r in zip(kw["down_block_additional_residuals"], source.down))
    every = pipe(PROMPT, controls=[unit], steps=10, size=(WIDTH, HEIGHT), progress=False, output_type="latent")
    once = pipe(PROMPT, controls=[unit], steps=10, size=(WIDTH, HEIGHT), progress=False, output_type="latent",
                reuse_residuals=1)
    assert torch.equal(every.latents, once.latents) and not torch.equal(every.latents, reused.latents)
    with pytest.raises(UserError, match="reuse_residuals"):
        pipe(PROMPT, controls=[unit], steps=2, size=(WIDTH, HEIGHT), progress=False, reuse_residuals=0)


def test_guess_mode_controls_the_conditional_branch_only(sd1_with_controlnets):
    pipe, _, cns = sd1_with_controlnets
    calls, received = [], []
    handles = [_hooks(cns[0], calls),
               pipe.unet.register_forward_pre_hook(lambda m, a, kw: received.append(kw), with_kwargs=True)]
    try:
        _ours(pipe, cns[:1], [_condition(1)], guess_mode=True, num_images=2)
    finally:
        for h in handles:
            h.remove()
    assert [x.shape[0] for x in calls] == [2] * STEPS  # the ControlNet saw the 2 conditional rows only
    for kw in received:
        residuals = [*kw["down_block_additional_residuals"], kw["mid_block_additional_residual"]]
        assert all(r.shape[0] == 4 and not r[:2].any() and r[2:].abs().sum() > 0 for r in residuals)


def test_guess_mode_default_scales_are_the_originals(sd1_with_controlnets):
    """Without explicit scales, guess mode is exactly ControlNet residual_scales 0.825**(N-1-j)."""
    pipe, _, cns = sd1_with_controlnets
    n = cns[0].num_residuals
    default = _ours(pipe, cns[:1], [_condition(1)], guess_mode=True, strengths=[0.9])
    explicit = _ours(pipe, cns[:1], [_condition(1)], guess_mode=True, strengths=[0.9],
                     scales=[[0.825 ** float(n - 1 - j) for j in range(n)]])
    torch.testing.assert_close(default.latents, explicit.latents, atol=1e-6, rtol=0)


def test_same_seed_same_pixels_and_seed_k_is_image_k(sd1_with_controlnets):
    pipe, _, cns = sd1_with_controlnets
    kw = dict(controls=[ControlUnit(cns[0], _condition(1))], steps=STEPS, size=(WIDTH, HEIGHT), progress=False,
              output_type="np", scheduler="euler_a", eta=0.0)
    a = pipe(PROMPT, seed=7, num_images=2, **kw)
    b = pipe(PROMPT, seed=7, num_images=2, **kw)
    c = pipe(PROMPT, seed=8, num_images=1, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert not np.array_equal(a.images[0], a.images[1])
    # image 1 of seed 7 used seed 8: same noise as image 0 of seed 8 (pixels equal up to batch-size arithmetic)
    assert np.abs(a.images[1].astype(int) - c.images[0].astype(int)).max() <= 1
    assert a.settings["seeds"] == [7, 8] and a.seed == 7


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs(sd1_with_controlnets, name):
    pipe, _, cns = sd1_with_controlnets
    out = pipe(PROMPT, controls=[ControlUnit(cns[0], _condition(1))], steps=3, size=(WIDTH, HEIGHT),
               scheduler=name, progress=False, output_type="pil", eta=0.3)
    assert out.images[0].size == (WIDTH, HEIGHT) and torch.isfinite(out.latents).all()


def test_result_settings_conditions_and_callback(sd1_with_controlnets):
    pipe, _, cns = sd1_with_controlnets
    seen = []
    out = pipe(PROMPT, controls=[ControlUnit(cns[0], _condition(1, 128, 64), strength=0.5, start=0.25)],
               steps=STEPS, size=None, progress=False, callback=lambda i, t, x: seen.append(i))
    # size None: the condition's aspect ratio (2:1) with the short side at the native size (8 * 8 = 64)
    assert out.images[0].size == (128, 64) and out.conditions[0].size == (128, 64)
    assert seen == list(range(STEPS))
    s = out.settings
    assert (s["prompt"], s["steps"], s["scheduler"], s["size"], s["guidance"]) == (PROMPT, STEPS, "ddim", "128x64", 9.0)
    assert s["controlnets"][0]["strength"] == 0.5 and s["controlnets"][0]["start"] == 0.25


def test_conditions_are_resized_by_cover_then_centre_crop(sd1_with_controlnets):
    pipe, _, cns = sd1_with_controlnets
    # A 32x32 image with a white left half; output 64x48: scale 2 → 64x64, crop rows 8..56; left half stays white.
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = 255
    out = pipe(PROMPT, controls=[ControlUnit(cns[0], img)], steps=1, size=(WIDTH, HEIGHT), progress=False)
    cond = np.asarray(out.conditions[0])
    assert cond.shape == (HEIGHT, WIDTH, 3)
    assert (cond[:, :24] > 235).all() and (cond[:, 40:] < 20).all()  # Lanczos rings a little at the edge


def test_annotator_runs_first(sd1_with_controlnets, tmp_path):
    """A picture annotator runs on the resized image; a depth annotator on the raw file, then it is resized."""
    from controlnet import annotators

    pipe, _, cns = sd1_with_controlnets
    img = np.asarray(_condition(1, 32, 24))  # half the output size: resized first, then inverted
    out = pipe(PROMPT, controls=[ControlUnit(cns[0], img, annotator="invert")], steps=1, size=(WIDTH, HEIGHT),
               progress=False, output_type="latent")
    resized = np.asarray(condition_to_pil(resize_cover(img.astype(np.float32) / 255, WIDTH, HEIGHT)))
    assert np.array_equal(np.asarray(out.conditions[0]), 255 - resized)
    assert out.settings["controlnets"][0]["annotator"] == "invert"

    depth = np.linspace(0, 60000, WIDTH * HEIGHT, dtype=np.uint16).reshape(HEIGHT, WIDTH)  # 16-bit, raw values
    Image.fromarray(depth).save(tmp_path / "depth.png")
    out = pipe(PROMPT, controls=[ControlUnit(cns[0], tmp_path / "depth.png", annotator="depth_map",
                                             annotator_params={"near": "small"})],
               steps=1, size=(WIDTH, HEIGHT), progress=False, output_type="latent")
    expected = annotators.get("depth_map")(tmp_path / "depth.png", near="small")
    assert np.array_equal(np.asarray(out.conditions[0]), expected)


# --------------------------------------------------------------------------- validation and helpers


@pytest.mark.parametrize("kwargs,match", [
    (dict(strength=-0.1), "strength"), (dict(start=-0.5), "start"), (dict(end=1.5), "end"),
    (dict(start=0.6, end=0.4), "after end"), (dict(strength=float("nan")), "strength"),
])
def test_bad_units_raise_user_error(kwargs, match):
    with pytest.raises(UserError, match=match):
        ControlUnit("fill", "x.png", **kwargs)


def test_bad_generation_settings_raise_user_error(sd1_with_controlnets):
    pipe, _, cns = sd1_with_controlnets
    with pytest.raises(UserError, match="scheduler"):
        pipe(PROMPT, scheduler="no_such_sampler", progress=False)
    with pytest.raises(UserError, match="no such file"):
        pipe(PROMPT, controls=[ControlUnit(cns[0], "/nonexistent/cond.png")], progress=False)
    with pytest.raises(UserError, match="residual"):
        _ours(pipe, cns[:1], [_condition(1)], scales=[[1.0, 1.0]])
    sd2_cn = ControlNet.from_unet(build_unet("sd2"))
    with pytest.raises(UserError, match="sd2"):
        pipe(PROMPT, controls=[ControlUnit(sd2_cn, _condition(1))], progress=False)


def test_size_rounding_warns_and_rounds(sd1_with_controlnets):
    pipe = sd1_with_controlnets[0]
    assert round_size(100, 63) == (104, 64) and round_size(3, 3) == (8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe(PROMPT, steps=1, size=(61, 45), progress=False, output_type="latent")
    assert out.settings["size"] == "64x48" and "rounded to 64x48" in str(caught[0].message)


def test_condition_inputs_and_resize_rule():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 128))
    assert to_condition_array(rgba).shape == (2, 4, 3)
    i16 = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    assert np.round(to_condition_array(i16)[..., 0] * 255).tolist() == [[0, 64], [128, 255]]  # by range
    t = torch.rand(3, 5, 7)
    assert np.array_equal(to_condition_array(t), t.permute(1, 2, 0).numpy())
    img = np.arange(6 * 10 * 3, dtype=np.float32).reshape(6, 10, 3) / 180
    assert resize_cover(img, 10, 6) is img  # same size: untouched
    assert resize_cover(img, 4, 4).shape == (4, 4, 3)
    assert resize_cover(img, 20, 20).shape == (20, 20, 3)


def test_dtypes_per_device():
    assert default_dtype("cuda") == torch.float16 and default_dtype("mps") == torch.float32
    assert default_dtype("cpu") in (torch.float32, torch.bfloat16)
    # The embedded tiny base stays fp32 on the CPU unless a dtype is asked for.
    assert default_dtype("cpu", tiny=True) == torch.float32 and default_dtype("cuda", tiny=True) == torch.float16
    assert Pipeline.from_pretrained(device="cpu").dtype == torch.float32
    assert Pipeline.from_pretrained(dtype="bf16", device="cpu").dtype == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype(None, "cuda") == torch.float16
    with pytest.raises(UserError, match="dtype"):
        resolve_dtype("int8", "cpu")
    # One table for every spelling, accelerate's mixed-precision names included ("no": full precision).
    assert [resolve_dtype(name, "cuda") for name in ("no", "fp16", "bf16")] == [torch.float32, torch.float16, torch.bfloat16]
    assert DTYPES["float32"] is DTYPES["fp32"] and DTYPES["half"] is DTYPES["fp16"]
    # From components without dtype/device: run as given, whatever the device default is (nothing is cast).
    comps = _components("sd1")
    pipe = Pipeline(**comps)
    assert pipe.dtype == torch.float32 and comps["text_encoder"].dtype == torch.float32


def test_png_metadata_per_image():
    settings = {"prompt": "p", "seed": 3, "seeds": [3, 4], "steps": 2, "controlnets": [{"controlnet": "fill"}]}
    meta = png_metadata(settings, index=1)
    assert meta["seed"] == "4" and json.loads(meta["controlnets"])[0]["controlnet"] == "fill"
    assert json.loads(meta["settings"])["prompt"] == "p" and "prompt" not in meta  # ComfyUI reads "prompt" as JSON
    assert json.loads(meta["settings"])["seed"] == 4 and "seeds" not in meta


def test_from_pretrained_folder_with_fp16_variant_files(sd1_with_controlnets, tmp_path):
    """A diffusers folder whose weights exist only as *.fp16.safetensors loads, and generates what the same
    components do in memory."""
    pipe, comps, _ = sd1_with_controlnets
    build_diffusers_pipeline(comps).save_pretrained(tmp_path / "base", variant="fp16")
    assert list((tmp_path / "base" / "unet").glob("*.fp16.safetensors"))
    loaded = Pipeline.from_pretrained(tmp_path / "base", dtype="fp32", device="cpu")
    kw = dict(steps=2, size=(WIDTH, HEIGHT), progress=False, output_type="latent")
    assert torch.equal(loaded(PROMPT, **kw).latents, pipe(PROMPT, **kw).latents)
    assert loaded.base == str(tmp_path / "base")
