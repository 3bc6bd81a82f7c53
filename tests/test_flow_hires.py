"""The hires fix on transformer bases (Flux, SD3, Qwen-Image): the generation is its two passes run by hand through
:class:`TransformerPipeline` (text-to-image, the upscale, image-to-image from the upscaled picture with the same
generator), bit for bit; denoise 1 forgets the first pass and a small denoise keeps it; the output and its
settings on the command line, and --from-png re-running them on the embedded tiny-flux; refusals in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.conditions import prepare_condition
from controlnet.embedded import base_controlnets
from controlnet.errors import EXIT_BAD_INPUT
from controlnet.generation_config import GenerationConfig, HiresFix
from controlnet.pipeline import ControlUnit
from controlnet.testing import trained_like
from controlnet.testing_flow import flux_components, qwen_components, sd3_components
from controlnet.transformer_controlnet import FluxControlNet, QwenImageControlNet, SD3ControlNet
from controlnet.transformer_formats import save_transformer_controlnet
from controlnet.transformer_pipeline import TransformerPipeline, TransformerUnit, unpack_latents

PROMPT = "a red circle on blue"
SIZE = 32  # pixels: 4x4 latents (Qwen-Image's tiny VAE: 8x8), 2x2 Flux tokens / SD3 patches


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Each family's pipeline and the folder of a ControlNet for it, and a condition image."""
    root = tmp_path_factory.mktemp("flow-hires")
    flux, sd3, qwen = flux_components(), sd3_components(), qwen_components()
    save_transformer_controlnet(trained_like(FluxControlNet.from_transformer(flux["transformer"], num_layers=1,
                                                                             num_single_layers=1), 11), root / "flux")
    save_transformer_controlnet(trained_like(SD3ControlNet.from_transformer(sd3["transformer"], 1), 13), root / "sd3")
    save_transformer_controlnet(trained_like(QwenImageControlNet.from_transformer(qwen["transformer"], num_layers=1),
                                             14), root / "qwenimage")
    rng = np.random.default_rng(0)
    condition = root / "cond.png"
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(condition)
    return {"flux": TransformerPipeline(**flux), "sd3": TransformerPipeline(**sd3),
            "qwenimage": TransformerPipeline(**qwen), "root": root, "condition": condition}


def _unit(pipe, bases, family: str, size: int) -> TransformerUnit:
    condition = prepare_condition(str(bases["condition"]), size, size, None, {})
    return TransformerUnit(pipe.load_controlnet(bases["root"] / family),
                           torch.from_numpy(condition).permute(2, 0, 1)[None], strength=0.8)


def _grid(pipe, latents: torch.Tensor, size: int) -> torch.Tensor:
    side = size // pipe.vae_scale_factor
    return latents if pipe.family == "sd3" else unpack_latents(latents, side, side)  # Flux, Qwen-Image: tokens


def _uint8(images: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] → (H, W, 3) uint8, as the pipelines round their pictures."""
    return (images[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
@pytest.mark.parametrize("family", ["flux", "sd3", "qwenimage"])
def test_hires_is_its_two_passes_by_hand(bases, family, upscaler):
    """Known answer: generate with the hires fix = text-to-image at the size, the latents interpolated
    bilinearly (or the decoded picture resized by Lanczos), then image-to-image at the larger size over the hires
    steps from them, the noise drawn from the same generator as it stands after the first pass."""
    pipe, seed, steps, hires_steps, denoise, big = bases[family], 5, 2, 4, 0.5, 2 * SIZE
    unit = ControlUnit(str(bases["root"] / family), str(bases["condition"]), strength=0.8)
    config = GenerationConfig(steps=steps, size=(SIZE, SIZE), seed=seed,
                              hires=HiresFix(scale=2, denoise=denoise, steps=hires_steps, upscaler=upscaler))
    result = pipe.generate(PROMPT, [unit], config, progress=False)

    generator = torch.Generator().manual_seed(seed)
    first = pipe(PROMPT, [_unit(pipe, bases, family, SIZE)], height=SIZE, width=SIZE, steps=steps,
                 generator=generator, output_type="latent")
    if upscaler == "latent":
        side = big // pipe.vae_scale_factor
        start = {"image_latents": torch.nn.functional.interpolate(_grid(pipe, first, SIZE), size=(side, side),
                                                                  mode="bilinear", align_corners=False)}
    else:
        picture = Image.fromarray(_uint8(pipe.decode(first, SIZE, SIZE))).resize((big, big), Image.LANCZOS)
        start = {"init_image": torch.tensor(np.asarray(picture)).permute(2, 0, 1)[None].contiguous() / 255.0}
    second = pipe(PROMPT, [_unit(pipe, bases, family, big)], height=big, width=big, steps=hires_steps,
                  generator=generator, denoise=denoise, output_type="latent", **start)

    assert torch.equal(result.latents, _grid(pipe, second, big))
    assert np.array_equal(np.asarray(result.images[0]), _uint8(pipe.decode(second, big, big)))
    assert result.images[0].size == (big, big) and result.conditions[0].size == (big, big)
    assert result.settings["size"] == f"{SIZE}x{SIZE}"
    assert result.settings["hires"] == {"scale": 2.0, "denoise": denoise, "steps": hires_steps,
                                        "upscaler": upscaler, "size": f"{big}x{big}"}


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.double().ravel().numpy(), b.double().ravel().numpy())[0, 1])


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_denoise_one_forgets_the_first_pass_and_a_small_one_keeps_it(bases, family):
    """Denoise 1 starts from pure noise (the flow's first sigma is 1): the text-to-image at the larger size from
    the generator as the first pass leaves it. Below it the second pass keeps the first pass's layout, the more the
    smaller the denoise: its latents pooled back to the first size correlate with the first pass's (latents: the
    tiny VAE is untrained, its decoder no picture of the latents' layout)."""
    pipe, seed, steps, big = bases[family], 2, 10, 2 * SIZE

    def hires(denoise: float) -> torch.Tensor:
        config = GenerationConfig(steps=4, size=(SIZE, SIZE), seed=seed,
                                  hires=HiresFix(scale=2, denoise=denoise, steps=steps))
        return pipe.generate(PROMPT, config=config, progress=False).latents

    generator = torch.Generator().manual_seed(seed)
    first = pipe(PROMPT, height=SIZE, width=SIZE, steps=4, generator=generator, output_type="latent")
    fresh = pipe(PROMPT, height=big, width=big, steps=steps, generator=generator, output_type="latent")
    assert torch.equal(hires(1.0), _grid(pipe, fresh, big))

    kept = [_correlation(torch.nn.functional.avg_pool2d(hires(d), 2), _grid(pipe, first, SIZE))
            for d in (0.1, 0.5, 1.0)]
    assert kept[0] > 0.9 and kept[0] > kept[1] > kept[2] and kept[2] < 0.5, kept


# --------------------------------------------------------------------------------------------- command line


def _main(argv: list[str]) -> int:
    from controlnet.cli import main

    return main(argv)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # stored paths must lie under the current folder or the PNG's
    shutil.copytree(base_controlnets("tiny-flux")["fill"], "cn")
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save("cond.png")
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save("init.png")
    return tmp_path


def _generate(out: str, *extra: str) -> int:
    return _main(["generate", "--base", "tiny-flux", "--controlnet", "cn", "--control", "cond.png", "--prompt",
                  PROMPT, "--size", "48x48", "--steps", "2", "--seed", "3", "--device", "cpu", "--dtype", "fp32",
                  "-q", "--out", out, *extra])


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_cli_hires_on_tiny_flux_rounds_records_and_reruns_from_png(folder, upscaler):
    """48 x 1.5 = 72 rounds (halves up) to 80, a multiple of 16, as the UNet path rounds to its multiple; the PNG
    holds the first pass's size and the hires block, and --from-png makes the same pixels."""
    hires = ["--hires-scale", "1.5", "--hires-denoise", "0.6", "--hires-steps", "3", "--hires-upscaler", upscaler]
    assert _generate("first", *hires) == 0
    made = folder / "first" / "00000-3.png"
    assert _main(["generate", "--from-png", str(made), "-q", "--out", "again"]) == 0
    with Image.open(made) as a, Image.open(folder / "again" / "00000-3.png") as b:
        first, again = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
        settings, parameters = json.loads(a.text["settings"]), a.text["parameters"]
    assert first.shape == (80, 80, 3) and np.array_equal(first, again)
    assert settings["size"] == "48x48"
    assert settings["hires"] == {"scale": 1.5, "denoise": 0.6, "steps": 3, "upscaler": upscaler, "size": "80x80"}
    assert "Size: 48x48" in parameters and "Hires upscale: 1.5" in parameters


@pytest.mark.parametrize("extra,message", [
    (["--hires-scale", "2", "--init-image", "init.png"], "hires fix is for text-to-image"),
    (["--hires-scale", "2", "--hires-denoise", "0.2"], "--hires-denoise 0.2 runs no step of 2 on Flux bases"),
])
def test_cli_hires_refusals_in_one_line(folder, capsys, extra, message):
    assert _generate("out", *extra) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (folder / "out").exists() or list((folder / "out").iterdir()) == []
