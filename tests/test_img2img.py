"""Image to image, inpainting, hires fix, control modes and A1111 metadata.

Oracles: diffusers' StableDiffusionControlNetImg2ImgPipeline and StableDiffusionControlNetInpaintPipeline on tiny
seeded models (final latents within 1e-4), and the paste-back checked against them pixel by pixel. Then the
embedded model (tiny-sd + the fill ControlNet, 128 px) on held-out fill circles.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import img2img
from controlnet.testing import build_diffusers_pipeline, build_unet, tiny_components, trained_like
from controlnet.a1111 import parameters_text, parse_parameters
from controlnet.diffusers_compat import diffusers_image_call_kwargs, diffusers_image_pipeline
from controlnet.errors import UserError
from controlnet.img2img import feather, full_res_box, latent_mask, paste_back
from controlnet.images import png_metadata
from controlnet.model import ControlNet
from controlnet.residuals import original_guess_mode_scales
from controlnet.pipeline import ControlUnit, HiresFix, Pipeline

WORDS = ["red", "circle", "blue", "square", "ugly"]
PROMPT, NEGATIVE = "red circle", "ugly"
WIDTH, HEIGHT = 64, 48
STEPS = 4


def _components(in_channels: int = 4) -> dict:
    """The tiny seeded SD1 components; ``in_channels`` 9: an inpainting UNet (latents, mask, masked-image latents)."""
    inpainting = build_unet("sd1", seed=7, in_channels=in_channels) if in_channels != 4 else None
    return tiny_components(WORDS, unet=inpainting)


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def _mask(aligned: bool = True) -> np.ndarray:
    """(H, W) uint8, white = repaint; ``aligned``: on the 8 px grid (every latent-mask rule agrees there)."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    if aligned:
        mask[8:32, 16:48] = 255
    else:
        mask[10:29, 19:45] = 255
    return mask


INIT = _picture(0)
CONDITIONS = [_picture(20), _picture(21)]


def _ours(pipe, cns, strengths=(0.8, 1.3), ends=(1.0, 0.5), **kwargs):
    units = [ControlUnit(cn, c, strength=s, end=e) for cn, c, s, e in zip(cns, CONDITIONS, strengths, ends)]
    return pipe(PROMPT, negative_prompt=NEGATIVE, controls=units, steps=STEPS, guidance=7.5, seed=5,
                init_image=INIT, progress=False, **kwargs)


def _theirs(task, comps, cns, denoise, mask=None, num_images=1, strengths=(0.8, 1.3), ends=(1.0, 0.5)):
    oracle = diffusers_image_pipeline(task, **comps, controlnets=cns)
    n = len(cns)
    kwargs = diffusers_image_call_kwargs(INIT, CONDITIONS[:n], denoise=denoise, steps=STEPS, guidance=7.5,
                                         seeds=[5 + k for k in range(num_images)], strengths=strengths[:n],
                                         ends=ends[:n], mask=None if mask is None else Image.fromarray(mask))
    return oracle(PROMPT, negative_prompt=NEGATIVE, **kwargs).images


# --------------------------------------------------------------------------- oracles: diffusers' pipelines


@pytest.mark.parametrize("n_controlnets,denoise,num_images", [(1, 0.5, 1), (2, 0.75, 2), (1, 1.0, 1), (2, 1.0, 1)])
def test_img2img_matches_diffusers(sd1_with_controlnets, n_controlnets, denoise, num_images):
    """Same weights, seeds (generator k = seed + k: the image's posterior sample, then the noise) and DDIM; the
    second ControlNet ends at 0.5 of the steps that run (2 or 3 of 4), as diffusers measures it."""
    pipe, comps, cns = sd1_with_controlnets
    expected = _theirs("img2img", comps, cns[:n_controlnets], denoise, num_images=num_images)
    ours = _ours(pipe, cns[:n_controlnets], denoise=denoise, num_images=num_images, output_type="latent")
    torch.testing.assert_close(ours.latents, expected, atol=1e-4, rtol=0)
    text_only = pipe(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance=7.5, seed=5, init_image=INIT,
                     denoise=denoise, num_images=num_images, progress=False, output_type="latent")
    assert (ours.latents - text_only.latents).abs().max() > 1e-2  # the ControlNets act


@pytest.mark.parametrize("n_controlnets,denoise", [(1, 1.0), (2, 0.75), (2, 0.5)])
def test_inpaint_matches_diffusers_and_pastes_back_only_the_kept_pixels(sd1_with_controlnets, n_controlnets, denoise):
    """Latent blending as diffusers (final latents within 1e-4); after decoding, ours differs from diffusers'
    image only where the README says: the unmasked pixels are the input's, bit for bit."""
    pipe, comps, cns = sd1_with_controlnets
    mask = _mask()
    expected = _theirs("inpaint", comps, cns[:n_controlnets], denoise, mask=mask)
    ours = _ours(pipe, cns[:n_controlnets], denoise=denoise, mask=mask, mask_blur=0, output_type="np")
    torch.testing.assert_close(ours.latents, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        decoded = pipe.decode(expected)[0].astype(int)  # diffusers' image, decoded by the same VAE
    image, original, masked = ours.images[0].astype(int), np.asarray(INIT).astype(int), mask > 0
    assert np.array_equal(image[~masked], original[~masked])  # the paste-back: kept pixels unchanged
    assert np.abs(image[masked] - decoded[masked]).max() <= 1  # repainted pixels: diffusers' (rounding apart)
    assert np.abs(decoded[~masked] - original[~masked]).max() > 10  # without it they would have changed


@pytest.mark.parametrize("n_controlnets,denoise", [(1, 1.0), (2, 0.75)])
def test_inpainting_unet_matches_diffusers(n_controlnets, denoise):
    """A 9-channel inpainting UNet gets [latents, mask, masked-image latents]; its ControlNets get the latents."""
    comps = _components(in_channels=9)
    cns = [trained_like(ControlNet.from_unet(build_unet("sd1", seed=1)), seed) for seed in (10, 11)][:n_controlnets]
    pipe = Pipeline(**comps, dtype="fp32", device="cpu")
    mask = _mask()
    expected = _theirs("inpaint", comps, cns, denoise, mask=mask)
    ours = _ours(pipe, cns, denoise=denoise, mask=mask, mask_blur=0, output_type="np")
    torch.testing.assert_close(ours.latents, expected, atol=1e-4, rtol=0)
    assert np.array_equal(ours.images[0][mask == 0], np.asarray(INIT)[mask == 0])
    with pytest.raises(UserError, match="inpainting model"):  # a 4-channel call of a 9-channel UNet
        pipe(PROMPT, steps=1, progress=False)
    with pytest.raises(UserError, match="inpainting model"):
        pipe(PROMPT, init_image=INIT, steps=1, progress=False)


# --------------------------------------------------------------------------- img2img rules


def test_denoise_zero_is_the_vae_round_trip(sd1_with_controlnets):
    pipe = sd1_with_controlnets[0]
    out = pipe(PROMPT, init_image=INIT, denoise=0.0, steps=STEPS, seed=3, progress=False, output_type="np")
    with torch.no_grad():
        latents = img2img.encode(pipe.vae, np.asarray(INIT), [torch.Generator().manual_seed(3)], pipe.device)
        assert torch.equal(out.latents, latents)
        assert np.array_equal(out.images[0], pipe.decode(latents)[0])


def test_steps_that_run_and_the_unit_range_measured_on_them(sd1_with_controlnets):
    """round(denoise * steps) steps run (half up); a unit's end is a fraction of them."""
    pipe, _, cns = sd1_with_controlnets
    for denoise, steps, expected in [(0.5, 4, 2), (0.3, 5, 2), (0.7, 10, 7), (0.125, 4, 1), (0.1, 4, 0), (1.0, 3, 3)]:
        seen = []
        pipe(PROMPT, init_image=INIT, denoise=denoise, steps=steps, progress=False, output_type="latent",
             callback=lambda i, t, x: seen.append(int(t)))
        assert len(seen) == expected, (denoise, steps)
    calls = []
    hook = cns[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe(PROMPT, controls=[ControlUnit(cns[0], CONDITIONS[0], end=0.5)], init_image=INIT, denoise=0.5, steps=8,
             guidance=1.0, progress=False, output_type="latent")
    finally:
        hook.remove()
    assert len(calls) == 2  # 4 steps run; the unit acts on the first half of them


def test_img2img_output_size_and_resizing(sd1_with_controlnets):
    pipe = sd1_with_controlnets[0]
    odd = Image.fromarray(np.asarray(INIT)[:45, :61])  # 61 x 45: rounded to 64 x 48
    assert pipe(PROMPT, init_image=odd, steps=1, progress=False).images[0].size == (64, 48)
    out = pipe(PROMPT, init_image=INIT, size=(32, 32), steps=1, progress=False, mask=_mask(), mask_blur=0)
    assert out.images[0].size == (32, 32) and out.settings["size"] == "32x32"


def test_bad_image_inputs_are_one_line_user_errors(sd1_with_controlnets):
    pipe = sd1_with_controlnets[0]
    cases = [
        (dict(init_image=INIT, denoise=1.5), "denoise must be in"),
        (dict(init_image=INIT, denoise=-0.1), "denoise must be in"),
        (dict(denoise=0.5), "needs an init image"),
        (dict(mask=_mask()), "needs an init image"),
        (dict(init_image=INIT, mask=np.zeros((HEIGHT, WIDTH), np.uint8)), "nothing to repaint"),
        (dict(init_image=INIT, mask=np.full((HEIGHT, WIDTH), 255, np.uint8), mask_invert=True), "nothing to repaint"),
        (dict(init_image=INIT, mask=np.zeros((10, 10), np.uint8)), "differs from the image"),
        (dict(init_image=INIT, inpaint_full_res=True), "works around a mask"),
        (dict(init_image=INIT, hires=HiresFix()), "text-to-image"),
        (dict(init_image=INIT, mask=_mask(), mask_blur=-1), "must be >= 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message) as err:
            pipe(PROMPT, steps=1, progress=False, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="control mode"):
        ControlUnit("fill", INIT, control_mode="strong")
    with pytest.raises(UserError, match="hires denoise"):
        HiresFix(denoise=2)


# --------------------------------------------------------------------------- masks, paste-back, full resolution


def test_mask_pieces_known_answers():
    mask = np.zeros((16, 24), bool)
    mask[0:3, 9:10] = True  # touches one pixel of latent block (0, 1) only
    assert latent_mask(mask, 8)[0, 0].tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]  # max-pooled
    ramp = np.zeros((12, 12), bool)
    ramp[2:10, 2:10] = True
    np.testing.assert_allclose(feather(ramp, 3)[5], [0, 0, 1 / 3, 2 / 3, 1, 1, 1, 1, 2 / 3, 1 / 3, 0, 0], atol=1e-6)
    assert np.array_equal(feather(ramp, 0), ramp.astype(np.float32))
    original = np.full((2, 2, 3), 100, np.uint8)
    generated = np.full((2, 2, 3), 200, np.uint8)
    weight = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    assert paste_back(generated, original, weight)[..., 0].tolist() == [[100, 125], [150, 200]]
    # "only masked": the box of the mask + padding, grown to the generation's aspect ratio, inside the image.
    big = np.zeros((100, 200), bool)
    big[40:50, 90:130] = True  # 40 x 10
    assert full_res_box(big, 64, 64, 5) == (85, 20, 135, 70)  # 50 x 20 grown to 50 x 50 around its centre
    assert full_res_box(big, 64, 64, 100) == (0, 0, 200, 100)  # no room to grow: the whole image
    edge = np.zeros((100, 200), bool)
    edge[0:4, 190:200] = True
    left, top, right, bottom = full_res_box(edge, 32, 32, 0)
    assert (right, top) == (200, 0) and right - left == bottom - top == 10


def test_inpaint_full_res_generates_the_box_at_full_size_and_pastes_it_back(sd1_with_controlnets):
    pipe, _, cns = sd1_with_controlnets
    picture = np.random.RandomState(3).randint(0, 256, (96, 160, 3), dtype=np.uint8)
    mask = np.zeros((96, 160), np.uint8)
    mask[40:52, 100:116] = 255  # 16 x 12; padding 4 → 24 x 20, grown to the 64 x 48 aspect: 27 x 20
    condition = np.random.RandomState(4).randint(0, 256, (96, 160, 3), dtype=np.uint8)  # the image's size: cut
    hints = []
    hook = cns[0].controlnet_cond_embedding.register_forward_pre_hook(lambda m, a: hints.append(a[0].clone()))
    try:
        out = pipe(PROMPT, controls=[ControlUnit(cns[0], condition)], init_image=picture, mask=mask, size=(64, 48),
                   inpaint_full_res=True, inpaint_padding=4, mask_blur=2, steps=2, progress=False, output_type="np")
    finally:
        hook.remove()
    image = out.images[0]
    assert image.shape == picture.shape and out.settings["size"] == "64x48" and out.settings["inpaint_full_res"]
    assert np.array_equal(image[mask == 0], picture[mask == 0])
    assert np.abs(image[mask > 0].astype(int) - picture[mask > 0]).mean() > 5  # repainted
    left, top, right, bottom = full_res_box(mask > 0, 64, 48, 4)
    from controlnet.conditions import resize_cover

    expected = resize_cover(condition[top:bottom, left:right].astype(np.float32) / 255, 64, 48)
    assert hints[0].shape == (1, 3, 48, 64)
    np.testing.assert_allclose(hints[0][0].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_mask_blur_changes_only_masked_pixels_and_unaligned_masks(sd1_with_controlnets):
    pipe = sd1_with_controlnets[0]
    mask = _mask(aligned=False)
    out = pipe(PROMPT, init_image=INIT, mask=mask, mask_blur=4, steps=2, progress=False, output_type="np")
    assert np.array_equal(out.images[0][mask == 0], np.asarray(INIT)[mask == 0])
    inverted = pipe(PROMPT, init_image=INIT, mask=mask, mask_invert=True, mask_blur=0, steps=2, progress=False,
                    output_type="np")
    assert np.array_equal(inverted.images[0][mask > 0], np.asarray(INIT)[mask > 0])


# --------------------------------------------------------------------------- the inpaint condition's -1


def _captured_hints(pipe, cn, unit):
    hints = []
    hook = cn.controlnet_cond_embedding.register_forward_pre_hook(lambda m, a: hints.append(a[0].clone()))
    try:
        pipe(PROMPT, controls=[unit], steps=1, size=(WIDTH, HEIGHT), progress=False, output_type="latent")
    finally:
        hook.remove()
    return hints[0][0].permute(1, 2, 0).numpy()  # (H, W, 3)


@pytest.mark.parametrize("scale", [1, 2])
def test_masked_pixels_reach_the_controlnet_as_minus_one(sd1_with_controlnets, scale):
    """Both ways a user gives the 1.1 inpaint condition: the inpaint annotator (picture + mask) and a float array
    with -1; also through resizing (the condition given at twice the output size)."""
    pipe, _, cns = sd1_with_controlnets
    picture = np.kron(np.asarray(INIT), np.ones((scale, scale, 1), np.uint8))
    mask = np.kron(_mask(aligned=False), np.ones((scale, scale), np.uint8))
    masked = _mask(aligned=False) > 0
    via_annotator = _captured_hints(pipe, cns[0], ControlUnit(cns[0], picture, annotator="inpaint",
                                                                annotator_params={"mask": mask}))
    as_float = picture.astype(np.float32) / 255
    as_float[mask > 0] = -1.0
    via_float = _captured_hints(pipe, cns[0], ControlUnit(cns[0], as_float))
    for hint in (via_annotator, via_float):
        assert (hint[masked] == -1.0).all()
        assert hint[~masked].min() >= 0.0 and hint[~masked].max() <= 1.0
    if scale == 1:  # unmasked pixels: the picture, exactly (the annotator lifts 0 to 1/255 only)
        np.testing.assert_allclose(via_float[~masked], np.asarray(INIT)[~masked] / 255, atol=1e-7)
        np.testing.assert_allclose(via_annotator[~masked], np.asarray(INIT)[~masked] / 255, atol=1 / 255 + 1e-7)


# --------------------------------------------------------------------------- control modes


def test_control_modes_are_their_formulas(sd1_with_controlnets):
    """balanced = strength on both branches; prompt = strength * 0.825**(N-1-j) on both; controlnet = the same
    scales on the conditional branch only (= guess mode)."""
    pipe, _, cns = sd1_with_controlnets
    cn, image = cns[0], CONDITIONS[0]
    n = cn.num_residuals
    soft = original_guess_mode_scales(n, 0.7)
    assert soft == pytest.approx([0.7 * 0.825 ** (n - 1 - j) for j in range(n)])

    def run(guess_mode=False, **unit):
        return pipe(PROMPT, negative_prompt=NEGATIVE, controls=[ControlUnit(cn, image, strength=0.7, **unit)],
                    steps=3, guidance=5.0, size=(WIDTH, HEIGHT), guess_mode=guess_mode, progress=False,
                    output_type="latent").latents

    prompt_mode = run(control_mode="prompt")
    assert torch.equal(prompt_mode, run(residual_scales=[s / 0.7 for s in soft]))
    controlnet_mode = run(control_mode="controlnet")
    assert torch.equal(controlnet_mode, run(guess_mode=True))
    balanced = run()
    assert (balanced - prompt_mode).abs().max() > 1e-3 and (prompt_mode - controlnet_mode).abs().max() > 1e-3


# --------------------------------------------------------------------------- hires fix


def test_hires_fix_latent_upscale_known_answer(sd1_with_controlnets):
    """hires denoise 0: the first pass's latents upscaled bilinearly (A1111's "Latent"), nothing else."""
    pipe, _, cns = sd1_with_controlnets
    unit = [ControlUnit(cns[0], CONDITIONS[0])]
    first = pipe(PROMPT, controls=unit, steps=2, size=(WIDTH, HEIGHT), progress=False, output_type="latent")
    out = pipe(PROMPT, controls=unit, steps=2, size=(WIDTH, HEIGHT), progress=False, output_type="np",
               hires=HiresFix(scale=2, denoise=0.0))
    expected = torch.nn.functional.interpolate(first.latents, size=(12, 16), mode="bilinear", align_corners=False)
    assert torch.equal(out.latents, expected) and out.images[0].shape == (96, 128, 3)
    refined = pipe(PROMPT, controls=unit, steps=2, size=(WIDTH, HEIGHT), progress=False, output_type="np",
                   hires=HiresFix(scale=1.5, denoise=0.5, steps=4, upscaler="lanczos"))
    assert refined.images[0].shape == (72, 96, 3) and refined.conditions[0].size == (96, 72)
    assert refined.settings["hires"] == {"scale": 1.5, "denoise": 0.5, "steps": 4, "upscaler": "lanczos", "size": "96x72"}
    assert refined.settings["size"] == f"{WIDTH}x{HEIGHT}"  # the first pass's: --from-png runs it again


# --------------------------------------------------------------------------- A1111 metadata


def test_a1111_parameters_round_trip_and_no_prompt_chunk():
    settings = {"prompt": "a red circle, sharp\nsecond line", "negative_prompt": "ugly, blurry", "seed": 5,
                "seeds": [5, 6], "steps": 20, "scheduler": "dpmpp_2m_karras", "guidance": 7.5, "size": "512x768",
                "base": "/models/v1-5-pruned.safetensors", "denoise": 0.75, "mask": "m.png", "mask_blur": 4.0,
                "inpaint_full_res": True, "inpaint_padding": 32,
                "controlnets": [{"controlnet": "/cn/control_v11p_sd15_canny.pth", "annotator": "canny",
                                 "strength": 0.8, "start": 0.0, "end": 0.5, "control_mode": "prompt"}]}
    text = parameters_text(settings, index=1)
    assert text.splitlines()[0] == "a red circle, sharp" and text.splitlines()[2] == "Negative prompt: ugly, blurry"
    parsed = parse_parameters(text)
    assert parsed["Prompt"] == "a red circle, sharp\nsecond line" and parsed["Negative prompt"] == "ugly, blurry"
    assert {k: parsed[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Denoising strength",
                                   "Mask blur", "Inpaint area", "Masked area padding")} == {
        "Steps": "20", "Sampler": "DPM++ 2M Karras", "CFG scale": "7.5", "Seed": "6", "Size": "512x768",
        "Model": "v1-5-pruned", "Denoising strength": "0.75", "Mask blur": "4.0", "Inpaint area": "Only masked",
        "Masked area padding": "32"}
    assert parsed["ControlNet 0"] == ("Module: canny, Model: control_v11p_sd15_canny, Weight: 0.8, Guidance Start: "
                                      "0.0, Guidance End: 0.5, Control Mode: My prompt is more important")
    meta = png_metadata(settings, 1)
    assert "prompt" not in meta and meta["parameters"] == text
    assert json.loads(meta["settings"])["prompt"] == settings["prompt"]
    hires = parse_parameters(parameters_text({**settings, "hires": {"scale": 2.0, "denoise": 0.7, "steps": 20,
                                                                    "upscaler": "latent"}}))
    assert (hires["Hires upscale"], hires["Hires upscaler"], hires["Denoising strength"]) == ("2.0", "Latent", "0.7")


def test_generation_settings_carry_the_image_settings(sd1_with_controlnets):
    pipe = sd1_with_controlnets[0]
    out = pipe(PROMPT, init_image=INIT, mask=_mask(), denoise=0.6, mask_blur=2, steps=2, progress=False)
    s = out.settings
    assert (s["denoise"], s["mask_blur"], s["mask_invert"], s["inpaint_full_res"]) == (0.6, 2.0, False, False)
    parsed = parse_parameters(png_metadata(s)["parameters"])
    assert parsed["Denoising strength"] == "0.6" and parsed["Mask blur"] == "2.0" and parsed["Sampler"] == "DDIM"
    plain = pipe(PROMPT, steps=1, progress=False).settings
    assert "denoise" not in plain and "mask" not in plain


# --------------------------------------------------------------------------- the embedded model (128 px)


@pytest.fixture(scope="module")
def embedded():
    from controlnet.demo import EVAL_SEED, held_out_samples, load_pipeline

    return load_pipeline(), held_out_samples(16, EVAL_SEED + 1)


def _disk_mask(sample) -> np.ndarray:
    """The masked disk region: a disk 1.5 times the circle's radius (+ 4 px) around its centre, white."""
    import cv2

    mask = np.zeros((sample.size, sample.size), np.uint8)
    cv2.circle(mask, (sample.cx, sample.cy), int(sample.radius * 1.5) + 4, 255, -1)
    return mask


@pytest.mark.slow
def test_embedded_inpainting_draws_the_conditions_circle_and_keeps_the_rest(embedded):
    """16 held-out circles, each repainted inside a disk mask with the fill ControlNet: IoU inside the mask
    between the circle drawn and the condition's disk (mean >= 0.7; 0.86 measured, 0.26 without the
    ControlNet), and every unmasked pixel equal to the input."""
    from controlnet.data.fill import circle_mask
    from controlnet.defaults import DEMO_GUIDANCE
    from controlnet.metrics import mask_iou

    pipe, samples = embedded
    ious = []
    for s in samples:
        mask = _disk_mask(s)
        out = pipe(s.prompt, controls=[ControlUnit("fill", s.condition)], init_image=s.target, mask=mask, steps=20,
                   guidance=DEMO_GUIDANCE, seed=0, progress=False, output_type="np")
        inside = mask > 0
        assert np.array_equal(out.images[0][~inside], s.target[~inside])
        ious.append(mask_iou(circle_mask(out.images[0], s.prompt)[inside], s.disk[inside]))
    assert np.mean(ious) >= 0.7, ious


@pytest.mark.slow
def test_embedded_img2img_keeps_the_background_colour(embedded):
    from controlnet.data.fill import _border_colour, nearest_colour
    from controlnet.defaults import DEMO_GUIDANCE

    pipe, samples = embedded
    kept = 0
    for s in samples:
        out = pipe(s.prompt, controls=[ControlUnit("fill", s.condition)], init_image=s.target, denoise=0.5,
                   steps=20, guidance=DEMO_GUIDANCE, seed=0, progress=False, output_type="np")
        kept += nearest_colour(_border_colour(out.images[0])) == s.background
    assert kept == len(samples)


@pytest.mark.slow
def test_embedded_hires_fix_keeps_the_circle(embedded):
    """128 → 256 (latent upscaler, denoise 0.5) on 8 held-out circles: the IoU with the condition's disk stays
    within 0.05 of the 128 px result (0.856 → 0.886 on 16 measured)."""
    from controlnet.data.fill import fill_iou
    from controlnet.defaults import DEMO_GUIDANCE

    pipe, samples = embedded
    low, high = [], []
    for s in samples[:8]:
        kwargs = dict(controls=[ControlUnit("fill", s.condition)], steps=20, guidance=DEMO_GUIDANCE, seed=0,
                      progress=False, output_type="np")
        first = pipe(s.prompt, **kwargs)
        second = pipe(s.prompt, hires=HiresFix(scale=2, denoise=0.5), **kwargs)
        assert second.images[0].shape == (256, 256, 3)
        low.append(fill_iou(first.images[0], first.conditions[0], s.prompt))
        high.append(fill_iou(second.images[0], second.conditions[0], s.prompt))
    assert np.mean(high) >= np.mean(low) - 0.05, (low, high)


# --------------------------------------------------------------------------- the command line


def _main(argv):
    from controlnet.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def fill_files(tmp_path_factory):
    """Two held-out fill samples as files: targets, conditions, and a disk mask for the first."""
    from controlnet.demo import EVAL_SEED, held_out_samples

    folder = tmp_path_factory.mktemp("fill")
    samples = held_out_samples(2, EVAL_SEED + 2)
    (folder / "conditions").mkdir()
    for k, s in enumerate(samples):
        Image.fromarray(s.target).save(folder / f"target{k}.png")
        Image.fromarray(s.condition).save(folder / "conditions" / f"c{k}.png")
    Image.fromarray(_disk_mask(samples[0])).save(folder / "mask.png")
    return folder, samples


def test_cli_inpaint_then_from_png_reproduces_it(tmp_path, fill_files, capsys, monkeypatch):
    folder, samples = fill_files
    monkeypatch.chdir(folder.parent)  # stored settings may name files under the current folder
    out = tmp_path / "out"
    argv = ["generate", "--prompt", samples[0].prompt, "--init-image", str(folder / "target0.png"), "--mask",
            str(folder / "mask.png"), "--controlnet", "fill", "--control", str(folder / "conditions" / "c0.png"),
            "--control-mode", "prompt", "--steps", "3", "--seed", "4", "-q", "--out", str(out)]
    assert _main(argv) == 0
    with Image.open(out / "00000-4.png") as im:
        first, text = np.asarray(im.convert("RGB")), dict(im.text)
    outside = np.asarray(Image.open(folder / "mask.png").convert("L")) == 0
    assert np.array_equal(first[outside], samples[0].target[outside])
    assert "prompt" not in text and json.loads(text["settings"])["controlnets"][0]["control_mode"] == "prompt"
    parsed = parse_parameters(text["parameters"])
    assert parsed["Prompt"] == samples[0].prompt and parsed["Denoising strength"] == "1.0"
    assert "My prompt is more important" in parsed["ControlNet 0"]
    assert _main(["generate", "--from-png", str(out / "00000-4.png"), "-q", "--out", str(out)]) == 0
    with Image.open(out / "00001-4.png") as again:
        assert np.array_equal(np.asarray(again.convert("RGB")), first)
    # Options after --from-png override its settings.
    assert _main(["generate", "--from-png", str(out / "00000-4.png"), "--seed", "9", "-q", "--out", str(out)]) == 0
    assert (out / "00002-9.png").is_file()


def test_cli_bad_image_inputs_exit_2_with_one_line(tmp_path, fill_files, capsys):
    folder, _ = fill_files
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(tmp_path / "black.png")
    init = ["--init-image", str(folder / "target0.png")]
    cases = [
        (init + ["--mask", str(tmp_path / "small.png")], "mask size 64x64 differs from the image's 128x128"),
        (init + ["--denoise", "1.5"], "denoise must be in [0, 1]"),
        (init + ["--mask", str(tmp_path / "black.png")], "nothing to repaint"),
        (["--mask", str(folder / "mask.png")], "--mask needs --init-image"),
        (init + ["--hires-scale", "2"], "hires fix is for text-to-image"),
        ([], "give --prompt"),
    ]
    for extra, message in cases:
        argv = ["generate", *(["--prompt", "red circle with blue background"] if extra else []), *extra,
                "--steps", "1", "-q", "--out", str(tmp_path / "o")]
        assert _main(argv) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_batch_control_dir_and_prompts_is_resumable(tmp_path, fill_files, capsys):
    folder, samples = fill_files
    (tmp_path / "prompts.txt").write_text(f"{samples[0].prompt}\n\n{samples[1].prompt}\n")
    out = tmp_path / "batch"
    argv = ["generate", "--prompts", str(tmp_path / "prompts.txt"), "--controlnet", "fill", "--control-dir",
            str(folder / "conditions"), "--steps", "1", "-q", "--out", str(out)]
    assert _main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["c0-prompt00000.png", "c0-prompt00001.png", "c1-prompt00000.png", "c1-prompt00001.png"]
    with Image.open(out / "c1-prompt00001.png") as im:
        settings = json.loads(im.text["settings"])
    assert settings["prompt"] == samples[1].prompt and settings["controlnets"][0]["control"].endswith("c1.png")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "c0-prompt00001.png").unlink()
    capsys.readouterr()
    assert _main(argv[:-2] + ["--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / "c0-prompt00001.png")]  # only the missing one is redone
    assert all(stamps[n] == (out / n).stat().st_mtime_ns for n in stamps if n != "c0-prompt00001.png")


def test_cli_hires_fix_doubles_the_size(tmp_path, fill_files):
    folder, samples = fill_files
    out = tmp_path / "hires"
    assert _main(["generate", "--prompt", samples[0].prompt, "--controlnet", "fill", "--control",
                  str(folder / "conditions" / "c0.png"), "--hires-scale", "2", "--hires-steps", "2", "--steps", "2",
                  "-q", "--out", str(out)]) == 0
    with Image.open(out / "00000-0.png") as im:
        assert im.size == (256, 256) and "Hires upscale: 2.0" in im.text["parameters"]


# --------------------------------------------------------------------------- the web UI's img2img tab


def test_ui_img2img_tab_paints_a_mask_and_reaches_the_pipeline(sd1_with_controlnets, tmp_path):
    """The editor's value (a background and a layer painted over it) becomes init_image + mask; the hires options
    become a HiresFix."""
    from controlnet import ui

    pipe = sd1_with_controlnets[0]
    layer = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    layer[8:32, 16:48] = (255, 255, 255, 200)  # the brush strokes: any alpha
    editor = {"background": INIT, "layers": [Image.fromarray(layer)], "composite": INIT}
    picture, mask = ui.editor_picture_and_mask(editor)
    assert picture is INIT and np.array_equal(mask, _mask())
    assert ui.editor_picture_and_mask({"background": INIT, "layers": [], "composite": INIT})[1] is None
    request = ui.GenerateRequest(prompt=PROMPT, steps=2, seed=3, width=64, height=64,
                                 units=[ui.UnitInput() for _ in range(ui.MAX_UNITS)],
                                 img2img=ui.ImageToImageInput(enabled=True, picture=editor, denoise=0.8, mask_blur=0))
    outcome = ui.UiBackend(pipe, tmp_path).generate(request)
    assert outcome.ok, outcome.status
    with Image.open(outcome.files[0]) as im:
        image, settings = np.asarray(im.convert("RGB")), json.loads(im.text["settings"])
    assert image.shape == (HEIGHT, WIDTH, 3) and settings["denoise"] == 0.8  # the picture's size, not 64 x 64
    assert np.array_equal(image[_mask() == 0], np.asarray(INIT)[_mask() == 0])
    hires = ui.GenerateRequest(prompt=PROMPT, steps=2, seed=3, width=64, height=64,
                               units=[ui.UnitInput() for _ in range(ui.MAX_UNITS)],
                               hires=ui.HiresInput(enabled=True, scale=2, denoise=0.5, steps=0))
    outcome = ui.UiBackend(pipe, tmp_path).generate(hires)
    assert outcome.ok and "at 128x128" in outcome.status
    missing = ui.GenerateRequest(prompt=PROMPT, units=[ui.UnitInput() for _ in range(ui.MAX_UNITS)],
                                 img2img=ui.ImageToImageInput(enabled=True))
    assert "no picture" in ui.UiBackend(pipe, tmp_path).generate(missing).status


def test_cli_inpainting_base_without_a_mask_exits_2(tmp_path, capsys):
    """An inpainting base (9-channel UNet) called for text-to-image: one line, exit 2."""
    build_diffusers_pipeline(_components(in_channels=9)).save_pretrained(tmp_path / "inpainting-base")
    capsys.readouterr()  # the saving's progress bar
    argv = ["generate", "--base", str(tmp_path / "inpainting-base"), "--prompt", PROMPT, "--steps", "1", "-q",
            "--dtype", "fp32", "--out", str(tmp_path / "o")]
    assert _main(argv) == 2
    err = capsys.readouterr().err
    assert "inpainting model (9-channel UNet)" in err and len(err.strip().splitlines()) == 1, err
