"""Generation on a Qwen-Image base with Qwen-Image ControlNets: our loop's final latents against diffusers'
QwenImagePipeline / QwenImageControlNetPipeline (oracles only) on the same tiny seeded components (diffusers' own
test components, built in code), with and without true CFG; the prompt encoding; ``controlnet generate`` on a tiny
Qwen-Image folder; a ControlNet of another family refused in one line.

Both sides get the same noise: ours draws it from the seed, diffusers' is given it as ``latents`` with the
generator after it, from which its ControlNet pipeline samples the condition's VAE posterior as ours does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import QwenImageControlNetModel, QwenImageControlNetPipeline, QwenImagePipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from controlnet.errors import EXIT_BAD_INPUT, UserError
from controlnet.testing import trained_like
from controlnet.testing_flow import (QWEN_LATENT_CHANNELS, diffusers_components, flux_components,
                                     qwen_components)
from controlnet.transformer_controlnet import FluxControlNet, QwenImageControlNet, pack_latents
from controlnet.transformer_formats import save_transformer_controlnet
from controlnet.transformer_pipeline import TransformerPipeline, TransformerUnit, unpack_latents

TOL = 1e-4
SIZE = 64  # pixels: 16x16 latents (the tiny VAE downsamples 4x), 8x8 tokens
STEPS = 4
PROMPT = "a red circle on blue"
PROMPTS = [PROMPT, "a green square"]  # of different lengths: the text mask pads the second
SEED = 3
NEGATIVE = "green background"
COMMON = dict(steps=STEPS, seed=SEED, height=SIZE, width=SIZE, output_type="latent")
THEIRS = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent")


@pytest.fixture(scope="module")
def qwen():
    return qwen_components()


@pytest.fixture(scope="module")
def qwen_mean_posterior():
    """The VAE's posterior std 1e-7 (clamped to exp(-15)): diffusers encodes a condition once per prompt, each
    row sampling the posterior anew, ours once for all; both are the posterior mean to 1e-6."""
    return qwen_components(posterior_std=1e-7)


def after_noise(batch: int = 1, size: int = SIZE) -> tuple[torch.Tensor, torch.Generator]:
    """The starting noise ours draws from SEED, packed as diffusers takes it, and the generator after it."""
    g = torch.Generator().manual_seed(SEED)
    noise = randn_tensor((batch, QWEN_LATENT_CHANNELS, size // 4, size // 4), generator=g)
    return pack_latents(noise), g


def condition(seed: int = 5, size: int = SIZE) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def qwen_controlnet(base, seed: int = 11) -> QwenImageControlNet:
    return trained_like(QwenImageControlNet.from_transformer(base, num_layers=2), seed).eval()


def as_diffusers(cn: QwenImageControlNet) -> QwenImageControlNetModel:
    """diffusers' model of our ControlNet: its config (our extra keys ignored) and its weights."""
    ref = QwenImageControlNetModel.from_config(cn.config.to_dict())
    ref.load_state_dict(cn.state_dict(), strict=True)
    return ref.eval()


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


# --------------------------------------------------------------------------------------------- text


def test_prompt_encoding_matches_diffusers(qwen):
    """Template, the 34 system tokens dropped, each prompt's own tokens padded to the longest with a mask; one
    prompt (no padding): no mask, as diffusers."""
    ours = TransformerPipeline(**qwen)
    theirs = QwenImagePipeline(**diffusers_components(qwen))
    text = ours.encode_prompt(PROMPTS, [NEGATIVE] * 2)
    embeds, mask = theirs.encode_prompt(PROMPTS, max_sequence_length=512)
    assert text.pooled is None and text.embeds.shape == embeds.shape and torch.equal(text.mask, mask)
    assert (text.embeds - embeds).abs().max() < TOL
    assert text.mask[1].sum() < text.mask[0].sum() == text.embeds.shape[1]
    negative, negative_mask = theirs.encode_prompt([NEGATIVE] * 2, max_sequence_length=512)
    assert text.negative.mask is negative_mask is None and (text.negative.embeds - negative).abs().max() < TOL
    short = ours.encode_prompt([PROMPT], max_sequence_length=8)
    assert short.mask is None and torch.equal(short.embeds, ours.encode_prompt([PROMPT]).embeds[:, :8])


# --------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_plain_base_matches_diffusers(qwen, cfg):
    """No ControlNet: our latents and images are QwenImagePipeline's (true CFG with the negative prompt's pass,
    rescaled), and CFG changes the result."""
    pipe = TransformerPipeline(**qwen)
    ours = pipe(PROMPTS, guidance=cfg, negative_prompt=NEGATIVE, **COMMON)
    noise, _ = after_noise(2)
    ref = QwenImagePipeline(**diffusers_components(qwen))
    negative = [NEGATIVE] * 2 if cfg > 1 else None
    theirs = ref(PROMPTS, negative_prompt=negative, true_cfg_scale=cfg, latents=noise, **THEIRS).images
    assert (ours - theirs).abs().max() < TOL
    images = pipe(PROMPTS, guidance=cfg, negative_prompt=NEGATIVE, **{**COMMON, "output_type": "pt"})
    their_images = ref(PROMPTS, negative_prompt=negative, true_cfg_scale=cfg, latents=noise,
                       **{**THEIRS, "output_type": "pt"}).images
    assert images.shape == (2, 3, SIZE, SIZE) and (images - their_images).abs().max() < TOL
    other = pipe(PROMPTS, guidance=5.0 - cfg, negative_prompt=NEGATIVE, **COMMON)
    assert (ours - other).abs().max() > 1e-3


# (prompts, true CFG scale, (strength, start, end) per unit): CFG's negative pass takes the residuals of the
# ControlNets run on the prompt's text; two units share one union ControlNet (diffusers' QwenImageMultiControlNetModel:
# one model, several conditions, their residuals summed).
CONTROL_CASES = {"no cfg": ([PROMPT], 1.0, [(0.8, 0.0, 0.75)]), "cfg": ([PROMPT], 4.0, [(0.8, 0.0, 0.75)]),
                 "cfg, two prompts": (PROMPTS, 3.0, [(0.8, 0.0, 0.75)]),
                 "cfg, two conditions": ([PROMPT], 4.0, [(0.8, 0.0, 0.75), (0.5, 0.25, 1.0)])}


@pytest.mark.parametrize("case", sorted(CONTROL_CASES))
def test_controlnet_generation_matches_diffusers(qwen, qwen_mean_posterior, case):
    from diffusers import QwenImageMultiControlNetModel

    prompts, cfg, settings = CONTROL_CASES[case]
    qwen = qwen if len(prompts) == 1 else qwen_mean_posterior
    cn = qwen_controlnet(qwen["transformer"])
    conds = [condition(seed=5 + k) for k in range(len(settings))]
    pipe = TransformerPipeline(**qwen)
    units = [TransformerUnit(cn, c, s, a, b) for c, (s, a, b) in zip(conds, settings)]
    ours = pipe(prompts, units, guidance=cfg, negative_prompt=NEGATIVE, **COMMON)

    noise, g = after_noise(len(prompts))
    multi = len(settings) > 1
    ref = QwenImageMultiControlNetModel([as_diffusers(cn)]) if multi else as_diffusers(cn)
    theirs = QwenImageControlNetPipeline(**diffusers_components(qwen), controlnet=ref)(
        prompts, negative_prompt=[NEGATIVE] * len(prompts) if cfg > 1 else None, true_cfg_scale=cfg,
        control_image=[c * 2 - 1 for c in conds] if multi else conds[0] * 2 - 1,
        controlnet_conditioning_scale=[s for s, _, _ in settings] if multi else settings[0][0],
        control_guidance_start=[a for _, a, _ in settings] if multi else settings[0][1],
        control_guidance_end=[b for _, _, b in settings] if multi else settings[0][2],
        generator=g, latents=noise, **THEIRS).images
    assert (ours - theirs).abs().max() < TOL
    plain = pipe(prompts, guidance=cfg, negative_prompt=NEGATIVE, **COMMON)
    assert (ours - plain).abs().max() > 1e-3  # the ControlNets do act


def test_latents_unpack_and_normalisation_invert_diffusers(qwen):
    """Unpacking is diffusers' (B, C, 1, h, w) unpacking without the frame axis; encoding normalises per channel by
    the VAE config's mean and std, which decoding undoes."""
    pipe = TransformerPipeline(**qwen)
    tokens = torch.randn(2, 8 * 8, 4 * QWEN_LATENT_CHANNELS)
    theirs = QwenImagePipeline._unpack_latents(tokens, SIZE, SIZE, 4)[:, :, 0]  # (B, C, 1, h, w) without the frame
    assert torch.equal(unpack_latents(tokens, 16, 16), theirs)
    image = condition()
    latents = pipe.encode_latents(image, torch.Generator().manual_seed(0))
    raw = qwen["vae"].encode(image[:, :, None] * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(0))[:, :, 0]
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (qwen["vae"].config.latents_mean,
                                                                qwen["vae"].config.latents_std))
    assert latents.shape == (1, QWEN_LATENT_CHANNELS, 16, 16) and (latents * std + mean - raw).abs().max() < 1e-5


def test_bad_input_is_refused_in_one_line(qwen):
    """A Flux ControlNet, an inpainting Qwen-Image ControlNet with a condition without a mask, no scheduler."""
    pipe = TransformerPipeline(**qwen)
    flux = FluxControlNet.from_transformer(flux_components()["transformer"], num_layers=1, num_single_layers=0)
    with pytest.raises(UserError) as err:
        pipe(PROMPT, [TransformerUnit(flux, condition())], **COMMON)
    assert "Flux" in one_line(err) and "Qwen-Image" in one_line(err)
    inpainting = QwenImageControlNet.from_transformer(qwen["transformer"], num_layers=1, extra_condition_channels=4)
    with pytest.raises(UserError) as err:
        pipe(PROMPT, [TransformerUnit(inpainting, condition())], **COMMON)
    assert "inpainting" in one_line(err) and "--annotator inpaint --annotator-param mask=" in one_line(err)
    with pytest.raises(UserError) as err:
        pipe(PROMPT, **{**COMMON, "height": SIZE + 4})
    assert "divisible by 8" in one_line(err) and "Qwen-Image" in one_line(err)
    with pytest.raises(UserError) as err:
        TransformerPipeline(**{**qwen, "scheduler_config": None})
    assert "scheduler config" in one_line(err)


# --------------------------------------------------------------------------------------------- the command line


def _main(argv: list[str]) -> int:
    from controlnet.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, qwen):
    """A tiny Qwen-Image diffusers folder, a Qwen-Image ControlNet and a Flux one, a condition image."""
    root = tmp_path_factory.mktemp("qwen-generate")
    QwenImagePipeline(**diffusers_components(qwen)).save_pretrained(root / "qwen")
    save_transformer_controlnet(qwen_controlnet(qwen["transformer"]), root / "cn-qwen")
    flux = flux_components()["transformer"]
    save_transformer_controlnet(FluxControlNet.from_transformer(flux, num_layers=1, num_single_layers=0),
                                root / "cn-flux")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(root / "cond.png")
    return root


def _args(assets, out, controlnet: str, *extra: str) -> list[str]:
    return ["generate", "--base", str(assets / "qwen"), "--controlnet", str(assets / controlnet), "--control",
            str(assets / "cond.png"), "--prompt", PROMPT, "--steps", "2", "--size", f"{SIZE}x{SIZE}", "--seed",
            str(SEED), "--dtype", "fp32", "--device", "cpu", "-q", "--out", str(out), *extra]


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def test_generate_on_a_qwen_folder_writes_the_direct_calls_image(assets, tmp_path):
    """The command's PNG is a direct call's image (bit for bit) on the loaded folder, with Qwen-Image's default
    true CFG (4.0) and the negative prompt recorded."""
    out = tmp_path / "out"
    assert _main(_args(assets, out, "cn-qwen", "--strength", "0.8", "--negative-prompt", NEGATIVE)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000-3.png", "00000-control0.png", "00000-grid.png"]
    with Image.open(out / "00000-3.png") as im:
        settings = json.loads(im.text["settings"])
    assert settings["guidance"] == 4.0 and settings["steps"] == 2 and settings["negative_prompt"] == NEGATIVE

    pipe = TransformerPipeline.from_pretrained(assets / "qwen")
    assert pipe.family == "qwenimage" and pipe.scheduler_config["shift_terminal"] == 0.02
    cn = pipe.load_controlnet(assets / "cn-qwen")
    hint = torch.from_numpy(_pixels(assets / "cond.png")).permute(2, 0, 1)[None].float() / 255.0
    direct = pipe(PROMPT, [TransformerUnit(cn, hint, 0.8)], height=SIZE, width=SIZE, steps=2, seed=SEED,
                  guidance=4.0, negative_prompt=NEGATIVE)
    assert np.array_equal(_pixels(out / "00000-3.png"), np.asarray(direct[0]))


def test_generate_with_a_flux_controlnet_on_a_qwen_base_exits_2(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert _main(_args(assets, out, "cn-flux")) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Flux" in err and "Qwen-Image" in err
    assert not out.exists() or not any(out.iterdir())



def test_image_to_image_matches_diffusers():
    """diffusers' QwenImageImg2ImgPipeline encodes the picture before drawing its noise: with a VAE whose posterior
    std is exp(-15) the encoding does not depend on the generator, and ours is given its noise (the second draw)."""
    from diffusers import QwenImageImg2ImgPipeline

    components = qwen_components(posterior_std=1e-7)
    picture = condition(seed=9)
    g = torch.Generator().manual_seed(SEED)
    shape = (1, QWEN_LATENT_CHANNELS, SIZE // 4, SIZE // 4)
    noise = [randn_tensor(shape, generator=g) for _ in range(2)][-1]
    ours = TransformerPipeline(**components)(PROMPT, init_image=picture, denoise=0.5, latents=noise, guidance=3.0,
                                             negative_prompt=NEGATIVE, **{**COMMON, "steps": 6, "seed": None})
    theirs = QwenImageImg2ImgPipeline(**diffusers_components(components))(
        PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=3.0, image=picture, strength=0.5,
        generator=torch.Generator().manual_seed(SEED), **{**THEIRS, "num_inference_steps": 6}).images
    assert (ours - theirs).abs().max() < TOL


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_inpainting_matches_diffusers(cfg):
    """QwenImageInpaintPipeline: the known region reset to the picture's latents noised to each next sigma; the
    mask is aligned to the 4 px latent grid, where its nearest-neighbour downsampling and our max-pooling agree."""
    from diffusers import QwenImageInpaintPipeline

    components = qwen_components(posterior_std=1e-7)
    picture = condition(seed=9)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:40, 8:40] = 255
    g = torch.Generator().manual_seed(SEED)
    shape = (1, QWEN_LATENT_CHANNELS, SIZE // 4, SIZE // 4)
    noise = [randn_tensor(shape, generator=g) for _ in range(2)][-1]  # theirs: the picture's posterior, then noise
    ours = TransformerPipeline(**components)(PROMPT, init_image=picture, mask=Image.fromarray(mask), denoise=0.75,
                                             latents=noise, guidance=cfg, negative_prompt=NEGATIVE, **COMMON)
    theirs = QwenImageInpaintPipeline(**diffusers_components(components))(
        PROMPT, negative_prompt=NEGATIVE if cfg > 1 else None, true_cfg_scale=cfg, image=picture,
        mask_image=Image.fromarray(mask), strength=0.75, generator=torch.Generator().manual_seed(SEED), **THEIRS).images
    assert (ours - theirs).abs().max() < TOL
    plain = TransformerPipeline(**components)(PROMPT, init_image=picture, denoise=0.75, latents=noise, guidance=cfg,
                                              negative_prompt=NEGATIVE, **COMMON)
    assert (ours - plain).abs().max() > 1e-2  # the mask acts
