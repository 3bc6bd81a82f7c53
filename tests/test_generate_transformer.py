"""``controlnet generate --base <Flux or SD3 folder>`` end to end on tiny diffusers folders: the command line gives
the images of a direct :class:`TransformerPipeline` call, whose latents are diffusers' ControlNet pipelines' on the
same folders; the family's defaults are used, not the UNet ones; what a transformer base cannot do is refused in
one line (exit 2, nothing written); a PNG re-runs to the same pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (FluxControlNetModel, FluxControlNetPipeline, FluxPipeline, SD3ControlNetModel,
                       StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from controlnet.errors import EXIT_BAD_INPUT
from controlnet.generation_config import GenerationConfig
from controlnet.pipeline import ControlUnit
from controlnet.testing import build_unet, trained_like
from controlnet.testing_flow import T5_TOKENS, diffusers_components, flux_components, sd3_components
from controlnet.transformer_controlnet import FLUX_UNION_MODES, FluxControlNet, SD3ControlNet, pack_latents
from controlnet.transformer_formats import save_transformer_controlnet
from controlnet.transformer_pipeline import TransformerPipeline, TransformerUnit

PROMPT = "a red circle on blue"
SIZE = 32  # pixels: 4x4 latents, 2x2 Flux tokens / SD3 patches
TOL = 1e-4


def _main(argv: list[str]) -> int:
    from controlnet.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny Flux and SD3 diffusers folders (the SD3 VAE's posterior std 1e-7: diffusers' SD3 ControlNet pipeline
    samples it from the global generator), a ControlNet folder for each, a Flux union one, a UNet one, images."""
    from controlnet.checkpoints import save_controlnet
    from controlnet.model import ControlNet

    root = tmp_path_factory.mktemp("transformer-generate")
    flux, sd3 = flux_components(), sd3_components(posterior_std=1e-7)
    FluxPipeline(**diffusers_components(flux)).save_pretrained(root / "flux")
    StableDiffusion3Pipeline(**diffusers_components(sd3)).save_pretrained(root / "sd3")
    small = dict(num_layers=2, num_single_layers=2)
    save_transformer_controlnet(trained_like(FluxControlNet.from_transformer(flux["transformer"], **small), 11),
                                root / "cn-flux")
    save_transformer_controlnet(trained_like(FluxControlNet.from_transformer(flux["transformer"], **small,
                                                                             num_mode=10), 12), root / "cn-union")
    save_transformer_controlnet(trained_like(SD3ControlNet.from_transformer(sd3["transformer"], 2), 13),
                                root / "cn-sd3")
    save_controlnet(ControlNet.from_unet(build_unet("sd1")), root / "cn-unet", "diffusers")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(root / "cond.png")
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(root / "init.png")
    return root


def _args(assets, family: str, out, *extra: str) -> list[str]:
    return ["generate", "--base", str(assets / family), "--prompt", PROMPT, "--steps", "2", "--size", f"{SIZE}x{SIZE}",
            "--seed", "3", "--dtype", "fp32", "--device", "cpu", "-q", "--out", str(out), *extra]


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def _condition(assets) -> torch.Tensor:
    return torch.from_numpy(_pixels(assets / "cond.png")).permute(2, 0, 1)[None].float() / 255.0


# --------------------------------------------------------------------------------------------- generations


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_generate_writes_the_direct_calls_images_with_the_family_defaults(assets, tmp_path, family):
    """The command's PNGs are a direct TransformerPipeline call's images (bit for bit), with the settings recorded
    and the family's guidance (Flux 3.5 distilled, SD3 7.0 CFG), not a UNet base's."""
    out = tmp_path / "out"
    unit = ["--controlnet", str(assets / f"cn-{family}"), "--control", str(assets / "cond.png"), "--strength", "0.8",
            "--end", "0.75"]
    assert _main(_args(assets, family, out, *unit)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000-3.png", "00000-control0.png", "00000-grid.png"]
    with Image.open(out / "00000-3.png") as im:
        meta = dict(im.text)
    settings = json.loads(meta["settings"])
    guidance = {"flux": 3.5, "sd3": 7.0}[family]
    assert settings["guidance"] == guidance and settings["steps"] == 2 and settings["size"] == f"{SIZE}x{SIZE}"
    assert settings["scheduler"] is None and settings["base"] == str(assets / family) and settings["seed"] == 3
    assert settings["controlnets"][0]["controlnet"] == str(assets / f"cn-{family}")
    assert (settings["controlnets"][0]["strength"], settings["controlnets"][0]["end"]) == (0.8, 0.75)

    pipe = TransformerPipeline.from_pretrained(assets / family)
    cn = pipe.load_controlnet(assets / f"cn-{family}")
    direct = pipe(PROMPT, [TransformerUnit(cn, _condition(assets), 0.8, 0.0, 0.75)], height=SIZE, width=SIZE,
                  steps=2, seed=3, guidance=guidance)
    assert np.array_equal(_pixels(out / "00000-3.png"), np.asarray(direct[0]))
    assert np.array_equal(_pixels(out / "00000-control0.png"), _pixels(assets / "cond.png"))


def _diffusers_latents(assets, family: str, guidance: float) -> torch.Tensor:
    """diffusers' ControlNet pipeline on the same folders: the noise ours draws from seed 3, then its generator; T5
    to the tiny tokenizer's length (ours encodes to it by default, diffusers' pipelines to 512 / 256 tokens)."""
    g = torch.Generator().manual_seed(3)
    noise = randn_tensor((1, 16, SIZE // 8, SIZE // 8), generator=g)
    control = _condition(assets) * 2 - 1
    common = dict(control_image=control, controlnet_conditioning_scale=0.8, control_guidance_end=0.75, height=SIZE,
                  width=SIZE, num_inference_steps=2, guidance_scale=guidance, generator=g, output_type="latent",
                  max_sequence_length=T5_TOKENS)
    if family == "flux":
        cn = FluxControlNetModel.from_pretrained(assets / "cn-flux")
        pipe = FluxControlNetPipeline.from_pretrained(assets / "flux", controlnet=cn)
        return pipe(PROMPT, latents=pack_latents(noise), **common).images
    cn = SD3ControlNetModel.from_pretrained(assets / "cn-sd3")
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(assets / "sd3", controlnet=cn)
    return pipe(PROMPT, latents=noise, **common).images


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_generate_latents_match_diffusers_pipeline_on_the_same_folder(assets, family):
    """What the command runs (TransformerPipeline.generate with a GenerationConfig left at its defaults but steps
    and size) gives diffusers' FluxControlNetPipeline / StableDiffusion3ControlNetPipeline's final latents at the
    family's default guidance, within 1e-4."""
    pipe = TransformerPipeline.from_pretrained(assets / family)
    unit = ControlUnit(str(assets / f"cn-{family}"), str(assets / "cond.png"), strength=0.8, end=0.75)
    result = pipe.generate(PROMPT, [unit], GenerationConfig(steps=2, size=(SIZE, SIZE), seed=3), progress=False)
    assert result.settings["guidance"] == {"flux": 3.5, "sd3": 7.0}[family]
    theirs = _diffusers_latents(assets, family, result.settings["guidance"])
    ours = pack_latents(result.latents) if family == "flux" else result.latents
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < TOL


def test_union_mode_img2img_and_two_images(assets, tmp_path):
    """--control-type names the union mode; --init-image/--denoise run img2img; image k of --num-images is seed + k:
    each equals the direct call with those settings."""
    out = tmp_path / "out"
    extra = ["--controlnet", str(assets / "cn-union"), "--control", str(assets / "cond.png"), "--control-type", "depth",
             "--init-image", str(assets / "init.png"), "--denoise", "0.5", "--num-images", "2"]
    assert _main(_args(assets, "flux", out, *extra)) == 0
    pipe = TransformerPipeline.from_pretrained(assets / "flux")
    unit = TransformerUnit(pipe.load_controlnet(assets / "cn-union"), _condition(assets), mode="depth")
    init = torch.from_numpy(_pixels(assets / "init.png")).permute(2, 0, 1)[None] / 255.0
    for k in range(2):
        direct = pipe(PROMPT, [unit], height=SIZE, width=SIZE, steps=2, seed=3 + k, init_image=init, denoise=0.5)
        assert np.array_equal(_pixels(out / f"00000-{3 + k}.png"), np.asarray(direct[0])), k
    other = pipe(PROMPT, [TransformerUnit(unit.controlnet, unit.image, mode="canny")], height=SIZE, width=SIZE,
                 steps=2, seed=3, init_image=init, denoise=0.5)
    assert not np.array_equal(_pixels(out / "00000-3.png"), np.asarray(other[0]))  # the mode acts
    settings = json.loads(Image.open(out / "00000-4.png").text["settings"])
    assert settings["denoise"] == 0.5 and settings["controlnets"][0]["control_type"] == "depth"


def test_hub_ids_for_the_base_and_the_controlnet(assets, tmp_path, monkeypatch):
    """A Flux base and its ControlNet named by hub ids (a hand-built cache, offline) give the folders' image."""
    from cli_checks import offline_hub
    from hubcache import add_to_hub_cache

    offline_hub(monkeypatch, tmp_path / "hub")
    add_to_hub_cache(tmp_path / "hub", "org/tiny-flux", {".": assets / "flux"})
    add_to_hub_cache(tmp_path / "hub", "org/tiny-flux-controlnet", {".": assets / "cn-flux"})
    unit = ["--control", str(assets / "cond.png"), "--strength", "0.8"]
    by_id = _args(assets, "flux", tmp_path / "id", "--controlnet", "org/tiny-flux-controlnet", *unit)
    by_id[by_id.index("--base") + 1] = "org/tiny-flux"
    assert _main(by_id) == 0
    assert _main(_args(assets, "flux", tmp_path / "path", "--controlnet", str(assets / "cn-flux"), *unit)) == 0
    assert np.array_equal(_pixels(tmp_path / "id" / "00000-3.png"), _pixels(tmp_path / "path" / "00000-3.png"))
    settings = json.loads(Image.open(tmp_path / "id" / "00000-3.png").text["settings"])
    assert settings["base"] == "org/tiny-flux" and settings["controlnets"][0]["controlnet"] == "org/tiny-flux-controlnet"


def test_a_single_file_controlnet_without_config(assets, tmp_path):
    """The ControlNet's weights alone (a single .safetensors, its config inferred from the shapes and the base)
    give the folder's image."""
    import shutil

    single = tmp_path / "flux-controlnet.safetensors"
    shutil.copyfile(assets / "cn-flux" / "diffusion_pytorch_model.safetensors", single)
    unit = ["--control", str(assets / "cond.png"), "--strength", "0.8"]
    assert _main(_args(assets, "flux", tmp_path / "file", "--controlnet", str(single), *unit)) == 0
    assert _main(_args(assets, "flux", tmp_path / "folder", "--controlnet", str(assets / "cn-flux"), *unit)) == 0
    assert np.array_equal(_pixels(tmp_path / "file" / "00000-3.png"), _pixels(tmp_path / "folder" / "00000-3.png"))


def test_offload_and_vae_tiling_are_mapped(assets, tmp_path):
    """--offload model (accelerate's hooks, here executing on the CPU: the same arithmetic) and --vae-tiling on
    give the direct call's image with tiling on; --vae-tiling off another (128 px: 2x2 tiles of the tiny VAE)."""
    size = ["--size", "128x128"]
    assert _main(_args(assets, "flux", tmp_path / "on", *size, "--offload", "model", "--vae-tiling", "on")) == 0
    assert _main(_args(assets, "flux", tmp_path / "off", *size, "--vae-tiling", "off")) == 0
    pipe = TransformerPipeline.from_pretrained(assets / "flux")
    pipe.vae_tiling = "on"
    direct = pipe(PROMPT, height=128, width=128, steps=2, seed=3)
    tiled = _pixels(tmp_path / "on" / "00000-3.png")
    assert np.array_equal(tiled, np.asarray(direct[0]))
    assert not np.array_equal(tiled, _pixels(tmp_path / "off" / "00000-3.png"))


def test_compile_keeps_the_picture_and_reaches_the_controlnets(assets, tmp_path, monkeypatch):
    """--compile: the transformer and the ControlNets a generation uses are compiled (here with torch.compile's
    eager backend: the wiring; inductor's speed is the machine's) and the picture is the uncompiled one's."""
    from controlnet import runtime

    compiled = []

    def eager(model, mode=None, backend="inductor"):
        compiled.append(type(model).__name__)
        return model.compile(backend="eager")

    monkeypatch.setattr(runtime, "compile_model", eager)
    unit = ["--controlnet", str(assets / "cn-flux"), "--control", str(assets / "cond.png")]
    assert _main(_args(assets, "flux", tmp_path / "plain", *unit)) == 0
    assert compiled == []
    assert _main(_args(assets, "flux", tmp_path / "compiled", *unit, "--compile")) == 0
    assert compiled == ["FluxTransformer2DModel", "FluxControlNet"]
    assert np.array_equal(_pixels(tmp_path / "plain" / "00000-3.png"), _pixels(tmp_path / "compiled" / "00000-3.png"))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_from_png_reproduces_the_picture(assets, tmp_path, monkeypatch, family):
    monkeypatch.chdir(assets)  # stored paths must lie under the current folder or the PNG's
    unit = ["--controlnet", str(assets / f"cn-{family}"), "--control", str(assets / "cond.png")]
    if family == "sd3":
        unit += ["--negative-prompt", "green square", "--guidance", "5"]
    assert _main(_args(assets, family, tmp_path / "first", *unit, "--num-images", "2")) == 0
    made = tmp_path / "first" / "00000-4.png"
    assert _main(["generate", "--from-png", str(made), "-q", "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(_pixels(made), _pixels(tmp_path / "again" / "00000-4.png"))


# --------------------------------------------------------------------------------------------- defaults, refusals


def test_family_defaults_replace_only_what_is_left_to_the_base():
    from controlnet.cli import build_parser
    from controlnet.commands.generate import config_from_args

    parser = build_parser()
    plain = config_from_args(parser.parse_args(["generate"]))
    assert (plain.steps, plain.guidance) == (20, None)  # a UNet base: 20 steps, its family's guidance
    for family, (steps, guidance) in {"flux": (28, 3.5), "sd3": (28, 7.0)}.items():
        config = config_from_args(parser.parse_args(["generate"])).check(family)
        assert (config.steps, config.guidance) == (steps, guidance)
        given = config_from_args(parser.parse_args(["generate", "--steps", "20", "--guidance", "9"])).check(family)
        assert (given.steps, given.guidance) == (20, 9.0)


@pytest.mark.parametrize("family,extra,message", [
    ("flux", ["--controlnet", "{a}/cn-unet", "--control", "{a}/cond.png"], "a UNet ControlNet"),
    ("sd3", ["--controlnet", "{a}/cn-flux", "--control", "{a}/cond.png"], "is a Flux ControlNet (diffusers layout) but the base is SD3"),
    ("flux", ["--controlnet", "{a}/cn-union", "--control", "{a}/cond.png"],
     f"union ControlNet: give --control-type, one of {', '.join(FLUX_UNION_MODES)}"),
    ("flux", ["--controlnet", "{a}/cn-union", "--control", "{a}/cond.png", "--control-type", "sketch"],
     "unknown control mode 'sketch'"),
    ("flux", ["--controlnet", "{a}/cn-flux", "--control", "{a}/cond.png", "--control-mode", "prompt"],
     "--control-mode prompt is for UNet bases"),
    ("sd3", ["--controlnet", "{a}/cn-sd3", "--control", "{a}/cond.png", "--residual-scale", "0.5"],
     "residual scales are for UNet ControlNets; on this SD3 base give --strength"),
    ("flux", ["--size", "40x40"], "does not fit Flux bases: give a width and height divisible by 16, e.g. 48x48"),
    ("sd3", ["--size", "32x24"], "does not fit SD3 bases: give a width and height divisible by 16"),
    ("flux", ["--scheduler", "euler"], "--scheduler is for UNet bases"),
    ("sd3", ["--eta", "0.5"], "--eta is for UNet bases"),
    ("flux", ["--guess-mode"], "--guess-mode is for UNet bases"),
    ("sd3", ["--reuse-residuals", "2"], "--reuse-residuals is for UNet bases"),
    ("flux", ["--negative-prompt", "blur"], "Flux is guidance-distilled"),
    ("flux", ["--mask", "{a}/init.png"], "--mask needs --init-image IMG"),
    ("sd3", ["--hires-scale", "2", "--hires-denoise", "0.2"], "--hires-denoise 0.2 runs no step of 2 on SD3 bases"),
    ("flux", ["--embedding", "{a}/style.safetensors"], "--embedding is not supported on Flux bases"),
    ("sd3", ["--clip-skip", "2"], "--clip-skip is not supported on SD3 bases"),
])
def test_what_a_transformer_base_cannot_do_exits_2_in_one_line(assets, tmp_path, capsys, family, extra, message):
    out = tmp_path / "out"
    out.mkdir()
    argv = _args(assets, family, out, *[e.format(a=assets) for e in extra])
    assert _main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("controlnet generate: error: "), err
    assert list(out.iterdir()) == []
