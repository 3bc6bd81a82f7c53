"""Inpainting ControlNets on SD3 and Qwen-Image bases: the final latents against diffusers'
StableDiffusion3ControlNetInpaintingPipeline and QwenImageControlNetInpaintPipeline (oracles only) on the same tiny
seeded components; the ``inpaint`` annotator's condition through ``generate`` against the direct call;
``controlnet generate --annotator inpaint`` on a tiny SD3 folder; refusals in one line (an inpainting ControlNet
without a mask, a Flux file with extra condition channels).

Ours draws the noise from the seed; diffusers' is given it as ``latents``. Diffusers samples the masked image's VAE
posterior from the global generator: the VAEs' posterior std is 1e-7, so both encodings are its mean to 1e-6.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (QwenImageControlNetInpaintPipeline, QwenImageControlNetModel, SD3ControlNetModel,
                       StableDiffusion3ControlNetInpaintingPipeline, StableDiffusion3Pipeline)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors.torch import save_file

from controlnet.errors import EXIT_BAD_INPUT, UserError
from controlnet.generation_config import GenerationConfig
from controlnet.pipeline import ControlUnit
from controlnet.testing import trained_like
from controlnet.testing_flow import (QWEN_LATENT_CHANNELS, diffusers_components, flux_components, qwen_components,
                                     sd3_components)
from controlnet.transformer_controlnet import FluxControlNet, QwenImageControlNet, SD3ControlNet, pack_latents
from controlnet.transformer_formats import save_transformer_controlnet
from controlnet.transformer_pipeline import TransformerPipeline, TransformerUnit

TOL = 1e-4
SIZE = 64  # pixels: SD3's 8x8 latents, Qwen-Image's 16x16 (its tiny VAE downsamples 4x)
STEPS = 4
PROMPT = "a red circle on blue"
NEGATIVE = "green background"
SEED = 3


@pytest.fixture(scope="module")
def sd3():
    return sd3_components(posterior_std=1e-7)


@pytest.fixture(scope="module")
def qwen():
    return qwen_components(posterior_std=1e-7)


def photo(seed: int = 9) -> np.ndarray:
    """A (SIZE, SIZE, 3) uint8 picture."""
    return (np.random.default_rng(seed).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)


def mask(top: int = 13, left: int = 5, bottom: int = 41, right: int = 37) -> np.ndarray:
    """(SIZE, SIZE) bool, True = repaint, off the latent grid."""
    m = np.zeros((SIZE, SIZE), bool)
    m[top:bottom, left:right] = True
    return m


def condition(picture: np.ndarray, repaint: np.ndarray, masked: float = -1.0) -> torch.Tensor:
    """The inpaint annotator's condition as a (1, 3, H, W) tensor: the picture in [0, 1], masked pixels -1; a view
    of the (H, W, 3) array, as generate passes it (the convolutions' float sums depend on the memory layout)."""
    cond = picture.astype(np.float32) / 255
    cond[repaint] = masked
    return torch.from_numpy(cond).permute(2, 0, 1)[None]


def theirs_inputs(picture: np.ndarray, repaint: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' control_image ([-1, 1]) and control_mask ((1, 1, H, W), 1 = repaint)."""
    image = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    return image, torch.from_numpy(repaint)[None, None].float()


def as_diffusers(cn, cls):
    """diffusers' model of our ControlNet: its config (our extra keys ignored) and its weights."""
    ref = cls.from_config(cn.config.to_dict())
    ref.load_state_dict(cn.state_dict(), strict=True)
    return ref.eval()


def sd3_inpainting(base, seed: int = 21) -> SD3ControlNet:
    """alimama's layout: one extra condition channel; the pooled projections zeroed (SD3ControlNetModel's default,
    as diffusers' inpainting pipeline passes them)."""
    cn = trained_like(SD3ControlNet.from_transformer(base, 2, extra_conditioning_channels=1), seed).eval()
    cn.config.force_zeros_for_pooled_projection = True
    return cn


def qwen_inpainting(base, seed: int = 11) -> QwenImageControlNet:
    """InstantX's layout: one mask channel packed 2x2, four extra condition features."""
    cn = QwenImageControlNet.from_transformer(base, num_layers=2, extra_condition_channels=4)
    return trained_like(cn, seed).eval()


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


# --------------------------------------------------------------------------------------------- the oracles


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sd3_inpainting_controlnet_matches_diffusers(sd3, guidance):
    cn = sd3_inpainting(sd3["transformer"])
    pipe = TransformerPipeline(**sd3)
    common = dict(guidance=guidance, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, output_type="latent",
                  max_sequence_length=16)
    ours = pipe(PROMPT, [TransformerUnit(cn, condition(photo(), mask()), 0.8, 0.0, 0.75)], **common)

    noise = randn_tensor((1, 16, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(SEED))
    image, control_mask = theirs_inputs(photo(), mask())
    theirs = StableDiffusion3ControlNetInpaintingPipeline(
        **diffusers_components(sd3), controlnet=as_diffusers(cn, SD3ControlNetModel))(
        PROMPT, negative_prompt=NEGATIVE, control_image=image, control_mask=control_mask,
        controlnet_conditioning_scale=0.8, control_guidance_end=0.75, height=SIZE, width=SIZE,
        num_inference_steps=STEPS, guidance_scale=guidance, latents=noise, output_type="latent",
        max_sequence_length=16).images
    assert (ours - theirs).abs().max() < TOL
    other = pipe(PROMPT, [TransformerUnit(cn, condition(photo(), mask(30, 30, 60, 60)), 0.8, 0.0, 0.75)], **common)
    assert (ours - other).abs().max() > 1e-3  # the mask acts


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_qwen_inpainting_controlnet_matches_diffusers(qwen, cfg):
    cn = qwen_inpainting(qwen["transformer"])
    pipe = TransformerPipeline(**qwen)
    common = dict(guidance=cfg, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, output_type="latent")
    ours = pipe(PROMPT, [TransformerUnit(cn, condition(photo(), mask()), 0.8, 0.0, 0.75)], **common)

    g = torch.Generator().manual_seed(SEED)
    noise = pack_latents(randn_tensor((1, QWEN_LATENT_CHANNELS, SIZE // 4, SIZE // 4), generator=g))
    image, control_mask = theirs_inputs(photo(), mask())
    theirs = QwenImageControlNetInpaintPipeline(
        **diffusers_components(qwen), controlnet=as_diffusers(cn, QwenImageControlNetModel))(
        PROMPT, negative_prompt=NEGATIVE if cfg > 1 else None, true_cfg_scale=cfg, control_image=image,
        control_mask=control_mask, controlnet_conditioning_scale=0.8, control_guidance_end=0.75, height=SIZE,
        width=SIZE, num_inference_steps=STEPS, generator=g, latents=noise, output_type="latent").images
    assert (ours - theirs).abs().max() < TOL
    other = pipe(PROMPT, [TransformerUnit(cn, condition(photo(), mask(30, 30, 60, 60)), 0.8, 0.0, 0.75)], **common)
    assert (ours - other).abs().max() > 1e-3  # the mask acts


def test_the_condition_is_diffusers_prepare_image_with_mask(sd3, qwen):
    """The encoded condition itself, for both families: masked image latents, then 1 - mask (Qwen-Image packed)."""
    image, control_mask = theirs_inputs(photo(), mask())
    for components, cn, cls, model in [
            (sd3, sd3_inpainting(sd3["transformer"]), StableDiffusion3ControlNetInpaintingPipeline, SD3ControlNetModel),
            (qwen, qwen_inpainting(qwen["transformer"]), QwenImageControlNetInpaintPipeline, QwenImageControlNetModel)]:
        ours = TransformerPipeline(**components).encode_condition(condition(photo(), mask()), cn)
        ref = cls(**diffusers_components(components), controlnet=as_diffusers(cn, model))
        theirs = ref.prepare_image_with_mask(image, control_mask, SIZE, SIZE, 1, 1, "cpu", torch.float32)
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() < TOL
        keep = ours[:, -1] if ours.ndim == 4 else ours[..., -4:]  # SD3's mask channel, Qwen-Image's 2x2 features
        assert torch.equal(keep, theirs[:, -1] if ours.ndim == 4 else theirs[..., -4:])


# --------------------------------------------------------------------------------------------- generate, the CLI


@pytest.fixture(scope="module")
def assets(tmp_path_factory, sd3, qwen):
    """A tiny SD3 folder, an SD3 and a Qwen-Image inpainting ControlNet, a plain SD3 one, a photo and its mask."""
    root = tmp_path_factory.mktemp("inpaint-controlnet")
    StableDiffusion3Pipeline(**diffusers_components(sd3)).save_pretrained(root / "sd3")
    save_transformer_controlnet(sd3_inpainting(sd3["transformer"]), root / "cn-sd3")
    save_transformer_controlnet(qwen_inpainting(qwen["transformer"]), root / "cn-qwen")
    save_transformer_controlnet(trained_like(SD3ControlNet.from_transformer(sd3["transformer"], 2), 13),
                                root / "cn-sd3-plain")
    Image.fromarray(photo()).save(root / "photo.png")
    Image.fromarray(mask().astype(np.uint8) * 255).save(root / "mask.png")
    return root


@pytest.mark.parametrize("family", ["sd3", "qwen"])
def test_generate_with_the_inpaint_annotator_is_the_direct_call(assets, sd3, qwen, family):
    pipe = TransformerPipeline(**(sd3 if family == "sd3" else qwen))
    unit = ControlUnit(str(assets / f"cn-{family}"), Image.fromarray(photo()), strength=0.8, annotator="inpaint",
                       annotator_params={"mask": Image.open(assets / "mask.png")})
    config = GenerationConfig(steps=2, size=(SIZE, SIZE), seed=SEED, guidance=1.0)
    result = pipe.generate(PROMPT, [unit], config, progress=False)
    cn = pipe.load_controlnet(assets / f"cn-{family}")
    marked = np.maximum(photo(), 1)  # the annotator's uint8 image keeps black for the mask
    direct = pipe(PROMPT, [TransformerUnit(cn, condition(marked, mask()), 0.8)], steps=2, guidance=1.0, seed=SEED,
                  height=SIZE, width=SIZE, output_type="latent")
    if family == "qwen":
        from controlnet.transformer_pipeline import unpack_latents

        direct = unpack_latents(direct, SIZE // 4, SIZE // 4)
    assert torch.equal(result.latents, direct)


def test_an_inpainting_controlnet_without_a_mask_and_a_bad_layout_are_refused_in_one_line(sd3, qwen):
    pipe = TransformerPipeline(**qwen)
    with pytest.raises(UserError) as err:
        pipe(PROMPT, [TransformerUnit(qwen_inpainting(qwen["transformer"]), condition(photo(), mask() & False))],
             steps=2, height=SIZE, width=SIZE, output_type="latent")
    assert "--annotator inpaint --annotator-param mask=" in one_line(err)
    odd = SD3ControlNet.from_transformer(sd3["transformer"], 1, extra_conditioning_channels=2).eval()
    with pytest.raises(UserError) as err:
        TransformerPipeline(**sd3)(PROMPT, [TransformerUnit(odd, condition(photo(), mask()))], steps=2,
                                   output_type="latent", max_sequence_length=16)
    assert "2 extra condition channels" in one_line(err)


def test_a_plain_controlnet_takes_the_inpaint_annotators_condition_as_before(assets, sd3):
    """A ControlNet without extra channels: the masked pixels clamped to black, as any [0, 1] condition."""
    pipe = TransformerPipeline(**sd3)
    unit = ControlUnit(str(assets / "cn-sd3-plain"), Image.fromarray(photo()), annotator="inpaint",
                       annotator_params={"mask": Image.fromarray(mask())})
    result = pipe.generate(PROMPT, [unit], GenerationConfig(steps=2, size=(SIZE, SIZE), seed=SEED), progress=False)
    black = condition(np.maximum(photo(), 1), mask(), masked=0.0)
    cn = pipe.load_controlnet(assets / "cn-sd3-plain")
    direct = pipe(PROMPT, [TransformerUnit(cn, black)], steps=2, seed=SEED, output_type="latent")
    assert torch.equal(result.latents, direct)


def test_an_sd3_inpainting_folder_whose_config_omits_the_extra_channel_loads(assets, tmp_path, sd3):
    """alimama's config.json has no extra_conditioning_channels (diffusers' docs pass it to from_pretrained): the
    weights' shape gives it."""
    import shutil

    folder = tmp_path / "alimama-like"
    shutil.copytree(assets / "cn-sd3", folder)
    config = json.loads((folder / "config.json").read_text())
    del config["extra_conditioning_channels"]
    (folder / "config.json").write_text(json.dumps(config))
    pipe = TransformerPipeline(**sd3)
    loaded = pipe.load_controlnet(folder)
    assert loaded.config.extra_conditioning_channels == 1
    reference = pipe.load_controlnet(assets / "cn-sd3").state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())


def _main(argv: list[str]) -> int:
    from controlnet.cli import main

    return main(argv)


def _args(assets, out, *extra: str) -> list[str]:
    return ["generate", "--base", str(assets / "sd3"), "--controlnet", str(assets / "cn-sd3"), "--control",
            str(assets / "photo.png"), "--prompt", PROMPT, "--steps", "2", "--size", f"{SIZE}x{SIZE}", "--seed",
            str(SEED), "--dtype", "fp32", "--device", "cpu", "-q", "--out", str(out), *extra]


def test_cli_inpainting_controlnet_on_sd3_writes_an_image_and_refuses_no_mask(assets, tmp_path, capsys):
    inpaint = ["--annotator", "inpaint", "--annotator-param", f"mask={assets / 'mask.png'}"]
    assert _main(_args(assets, tmp_path / "out", *inpaint)) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) >= 1
    # composes with img2img inpainting of the same picture
    assert _main(_args(assets, tmp_path / "both", *inpaint, "--init-image", str(assets / "photo.png"), "--mask",
                       str(assets / "mask.png"))) == 0
    capsys.readouterr()
    assert _main(_args(assets, tmp_path / "none")) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--annotator inpaint" in err


# --------------------------------------------------------------------------------------------- Flux


def test_a_flux_controlnet_with_extra_condition_channels_is_refused_in_one_line(tmp_path):
    """alimama's FLUX.1-dev inpainting layout (controlnet_x_embedder over 64 + 4 features) is not diffusers'
    FluxControlNetModel's: refused on loading, in one line."""
    flux = flux_components()
    cn = FluxControlNet.from_transformer(flux["transformer"], num_layers=1, num_single_layers=0)
    state = {k: v.contiguous() for k, v in cn.persistent_state_dict().items()}
    weight = state["controlnet_x_embedder.weight"]
    state["controlnet_x_embedder.weight"] = torch.zeros(weight.shape[0], weight.shape[1] + 4)
    folder = tmp_path / "flux-inpainting"
    folder.mkdir()
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps({**cn.config.to_dict(), "extra_condition_channels": 4}))
    pipe = TransformerPipeline(**flux)
    with pytest.raises(UserError) as err:
        pipe.load_controlnet(folder)
    assert "controlnet_x_embedder" in one_line(err)
    (folder / "config.json").unlink()  # one file, its config inferred from the shapes
    with pytest.raises(UserError) as err:
        pipe.load_controlnet(folder / "diffusion_pytorch_model.safetensors")
    assert "controlnet_x_embedder" in one_line(err)
