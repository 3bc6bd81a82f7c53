"""Inpainting on Flux and SD3 bases: the final latents against diffusers' FluxControlNetInpaintPipeline and
StableDiffusion3InpaintPipeline (oracles only) on the same tiny seeded components, the paste-back, the identities
of an empty and a full mask, and `controlnet generate --mask` on the embedded tiny-flux base.

The oracles encode the picture, then draw their noise (FluxControlNetInpaintPipeline encodes the condition first):
with a VAE whose posterior std is 1e-7 the encodings do not depend on the generator, and ours is given that noise.
Their masks are downsampled by nearest neighbour, ours by max-pooling: the two agree on masks aligned to the 8 px
grid, as here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetInpaintPipeline, StableDiffusion3InpaintPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from controlnet.errors import UserError
from controlnet.flow_sampling import FlowInpaint
from controlnet.testing import trained_like
from controlnet.testing_flow import diffusers_components, flux_components, sd3_components
from controlnet.transformer_controlnet import FluxControlNet, pack_latents
from controlnet.transformer_pipeline import TransformerPipeline, TransformerUnit

TOL = 1e-4
SIZE = 64  # pixels: 8x8 latents
PROMPT = "a red circle on blue"
SEED = 3
COMMON = dict(seed=SEED, output_type="latent", max_sequence_length=16)


@pytest.fixture(scope="module")
def flux():
    return flux_components(posterior_std=1e-7)


@pytest.fixture(scope="module")
def sd3():
    return sd3_components(posterior_std=1e-7)


def pictures(n: int, seed: int = 9) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, SIZE, SIZE, generator=g) for _ in range(n)]


def block_mask() -> Image.Image:
    """White (repaint) on a 24x32 px block aligned to the 8 px grid."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:40, 8:40] = 255
    return Image.fromarray(mask)


def nth_noise(n: int) -> torch.Tensor:
    """The n-th (1-based) latent-shaped draw of a generator seeded with SEED."""
    g = torch.Generator().manual_seed(SEED)
    return [randn_tensor((1, 16, SIZE // 8, SIZE // 8), generator=g) for _ in range(n)][-1]


def as_diffusers(cn: FluxControlNet):
    from diffusers import FluxControlNetModel

    ref = FluxControlNetModel.from_config(cn.config.to_dict())
    ref.load_state_dict(cn.state_dict(), strict=True)
    return ref.eval()


def test_flux_inpainting_matches_diffusers_controlnet_inpaint_pipeline(flux):
    cn = trained_like(FluxControlNet.from_transformer(flux["transformer"], num_layers=2, num_single_layers=2), 51)
    picture, cond = pictures(2)
    noise = nth_noise(3)  # theirs: the condition's and the picture's posterior samples, then the noise
    ours = TransformerPipeline(**flux)(PROMPT, [TransformerUnit(cn, cond, 0.8, 0.0, 0.5)], init_image=picture,
                                       mask=block_mask(), denoise=0.5, latents=noise, steps=6, **COMMON)
    theirs = FluxControlNetInpaintPipeline(**diffusers_components(flux), controlnet=as_diffusers(cn))(
        PROMPT, image=picture, mask_image=block_mask(), control_image=cond * 2 - 1, strength=0.5,
        controlnet_conditioning_scale=0.8, control_guidance_end=0.5, height=SIZE, width=SIZE,
        num_inference_steps=6, guidance_scale=3.5, generator=torch.Generator().manual_seed(SEED),
        output_type="latent", max_sequence_length=16).images
    assert (ours - theirs).abs().max() < TOL
    plain = TransformerPipeline(**flux)(PROMPT, [TransformerUnit(cn, cond, 0.8, 0.0, 0.5)], init_image=picture,
                                        denoise=0.5, latents=noise, steps=6, **COMMON)
    assert (ours - plain).abs().max() > 1e-2  # the mask acts


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sd3_inpainting_matches_diffusers_inpaint_pipeline(sd3, guidance):
    picture, = pictures(1)
    noise = nth_noise(2)  # theirs: the picture's posterior sample, then the noise
    ours = TransformerPipeline(**sd3)(PROMPT, init_image=picture, mask=block_mask(), denoise=0.75, latents=noise,
                                      steps=4, guidance=guidance, **COMMON)
    theirs = StableDiffusion3InpaintPipeline(**diffusers_components(sd3))(
        PROMPT, image=picture, mask_image=block_mask(), strength=0.75, height=SIZE, width=SIZE,
        num_inference_steps=4, guidance_scale=guidance, generator=torch.Generator().manual_seed(SEED),
        output_type="latent", max_sequence_length=16).images
    assert (ours - theirs).abs().max() < TOL


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_an_empty_mask_keeps_the_picture_and_a_full_one_is_img2img(flux, sd3, family):
    pipe = TransformerPipeline(**(flux if family == "flux" else sd3))
    picture, = pictures(1)
    pack = pack_latents if family == "flux" else (lambda x: x)
    empty = pipe(PROMPT, init_image=picture, mask=torch.zeros(1, 1, SIZE, SIZE), denoise=0.75, steps=4, **COMMON)
    assert (empty - pack(pipe.encode_latents(picture))).abs().max() < TOL  # the posterior mean, to 1e-7
    full = pipe(PROMPT, init_image=picture, mask=torch.ones(1, 1, SIZE, SIZE), denoise=0.75, steps=4, **COMMON)
    img2img = pipe(PROMPT, init_image=picture, denoise=0.75, steps=4, **COMMON)
    assert torch.equal(full, img2img)


def test_blend_is_the_forward_flow_outside_the_mask():
    g = torch.Generator().manual_seed(0)
    x0, noise, latents = (torch.randn(1, 4, 2, 2, generator=g) for _ in range(3))
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]
    out = FlowInpaint(x0, noise, mask).blend(latents, torch.tensor(0.25))
    expected = torch.where(mask.bool(), latents, 0.25 * noise + 0.75 * x0)
    assert torch.allclose(out, expected, atol=1e-7)


def test_pixels_outside_the_mask_are_the_pictures(flux):
    pipe = TransformerPipeline(**flux)
    picture = Image.fromarray((np.random.default_rng(1).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    keep = np.asarray(block_mask()) == 0
    for blur in (0.0, 4.0):
        out = np.asarray(pipe(PROMPT, init_image=picture, mask=block_mask(), mask_blur=blur, denoise=0.75, steps=2,
                              seed=SEED, max_sequence_length=16)[0])
        assert np.array_equal(out[keep], np.asarray(picture)[keep])
        assert not np.array_equal(out[~keep], np.asarray(picture)[~keep])


def test_bad_masks_are_refused_in_one_line(flux):
    pipe = TransformerPipeline(**flux)
    picture, = pictures(1)
    with pytest.raises(UserError, match="mask size 32x32 differs from the image's 64x64"):
        pipe(PROMPT, init_image=picture, mask=torch.ones(1, 1, 32, 32), steps=2, **COMMON)
    with pytest.raises(UserError, match="a mask needs an init image"):
        pipe(PROMPT, mask=block_mask(), steps=2, height=SIZE, width=SIZE, **COMMON)


# --------------------------------------------------------------------------------------------- the CLI


def _main(argv: list[str]) -> int:
    from controlnet.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-inpaint")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(root / "a.png")
    mask = np.zeros((128, 128), np.uint8)
    mask[32:80, 40:100] = 255
    Image.fromarray(mask).save(root / "m.png")
    Image.fromarray(mask[:64]).save(root / "small.png")
    Image.fromarray(mask * 0).save(root / "empty.png")
    return root


def _generate(files, out, *extra: str) -> int:
    return _main(["generate", "--base", "tiny-flux", "--init-image", str(files / "a.png"), "--prompt", PROMPT,
                  "--steps", "4", "--seed", "1", "--device", "cpu", "--dtype", "fp32", "-q", "--out", str(out),
                  *extra])


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


@pytest.mark.parametrize("full_res", [False, True])
def test_generate_inpaints_on_tiny_flux_and_keeps_the_rest(files, tmp_path, full_res):
    out = tmp_path / "out"
    extra = ["--inpaint-full-res", "--inpaint-padding", "8"] if full_res else []
    assert _generate(files, out, "--mask", str(files / "m.png"), "--mask-blur", "4", *extra) == 0
    image, picture = _pixels(out / "00000-1.png"), _pixels(files / "a.png")
    keep = _pixels(files / "m.png")[..., 0] == 0
    assert image.shape == picture.shape
    assert np.array_equal(image[keep], picture[keep])
    assert not np.array_equal(image[~keep], picture[~keep])


@pytest.mark.parametrize("extra,message", [
    (["--mask", "{f}/small.png"], "mask size 128x64 differs from the image's 128x128"),
    (["--mask", "{f}/empty.png"], "the mask has no white pixels: nothing to repaint"),
    (["--inpaint-full-res"], "--inpaint-full-res works around a mask; pass --mask MASK"),
])
def test_generate_refuses_bad_masks_in_one_line(files, tmp_path, capsys, extra, message):
    assert _generate(files, tmp_path / "out", *[e.format(f=files) for e in extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
