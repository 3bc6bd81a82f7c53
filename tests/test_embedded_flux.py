"""The embedded tiny Flux-layout base (assets/tiny-flux), its fill ControlNet and `controlnet demo --backbone flux`."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from controlnet.demo import DEMO_SAMPLES, FLUX_FILL_SUBFOLDER, flux_base_dir, run_demo
from controlnet.transformer_controlnet import FluxControlNet, latent_image_ids, pack_latents, transformer_kwargs
from controlnet.transformer_pipeline import TransformerPipeline

SIZE = 128  # the shipped size: the fill data's
MAX_FLUX_BYTES = 10 * 1024 * 1024
PROMPT = "red circle with blue background"
TOL = 1e-4  # final latents, ours vs diffusers' FluxPipeline (the transformer tests' tolerance)


@pytest.fixture(scope="module")
def pipe():
    return TransformerPipeline.from_pretrained(flux_base_dir())


def test_shipped_flux_folder_is_small_and_loads_offline(pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = flux_base_dir()
    weights = list(root.rglob("*.safetensors"))
    assert sum(p.stat().st_size for p in weights) <= MAX_FLUX_BYTES
    assert pipe.family == "flux" and pipe.vae.config.latent_channels * 4 == pipe.transformer.config.in_channels
    assert (root / FLUX_FILL_SUBFOLDER / "config.json").is_file()


def test_generates_at_the_shipped_size_as_diffusers_flux_pipeline(pipe):
    """Our sampler's final latents at 128 px equal diffusers' FluxPipeline's on the same folder and noise."""
    from diffusers import FluxPipeline
    from diffusers.utils.torch_utils import randn_tensor

    length = pipe.tokenizer_2.model_max_length  # ours encodes to it by default; diffusers to 512 unless told
    noise = randn_tensor((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(3))
    ours = pipe(PROMPT, height=SIZE, width=SIZE, steps=4, latents=noise, output_type="latent")
    theirs = FluxPipeline.from_pretrained(flux_base_dir(), torch_dtype=torch.float32, local_files_only=True)(
        PROMPT, latents=pack_latents(noise), height=SIZE, width=SIZE, num_inference_steps=4,
        max_sequence_length=length, output_type="latent").images
    assert ours.shape == theirs.shape == (1, (SIZE // 16) ** 2, 16)
    assert (ours - theirs).abs().max() < TOL
    image = pipe(PROMPT, height=SIZE, width=SIZE, steps=4, seed=0, output_type="pt")
    assert image.shape == (1, 3, SIZE, SIZE)


def test_prompts_are_encoded_to_the_t5_tokenizers_length_for_generation_and_training(pipe, tmp_path):
    """The shipped T5 was trained on 16-token prompts: generation and training's cached text embeddings use its
    tokenizer's model_max_length, not Flux's 512."""
    from controlnet.train import TrainConfig
    from controlnet.train.flow import flow_encoders

    length = pipe.tokenizer_2.model_max_length
    assert length == 16 and pipe.max_sequence_length == length
    explicit = pipe.encode_prompt([PROMPT], max_sequence_length=length)
    text = pipe.encode_prompt([PROMPT])
    assert text.embeds.shape == (1, length, pipe.transformer.config.joint_attention_dim)
    assert torch.equal(text.embeds, explicit.embeds) and text.ids.shape == (length, 3)
    config = TrainConfig(data=tmp_path / "data", out=tmp_path / "out", base=flux_base_dir())
    encoders = flow_encoders(pipe, config)
    hidden, pooled = encoders.encode_prompts([PROMPT])
    assert torch.equal(hidden, explicit.embeds) and torch.equal(pooled, explicit.pooled)
    longer = TransformerPipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2,
                                 _with_length(pipe.tokenizer_2, 512), pipe.scheduler_config)
    assert flow_encoders(longer, config).text_id != encoders.text_id  # the cache key names the length


def _with_length(tokenizer, length: int):
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = length
    return tokenizer


@pytest.mark.parametrize("resolution, expected", [(None, SIZE), (64, 64)])
def test_training_defaults_to_the_bases_native_size_and_resolution_wins(resolution, expected, tmp_path):
    """`controlnet train --base tiny-flux` without --resolution trains at the base's 128 px (its VAE config's
    sample size; Flux transformers name none), not Flux's 1024 generation default; --resolution still wins."""
    from controlnet.commands.train import config_from_args, register
    from controlnet.train.flow import read_flow_base

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    argv = ["train", "--base", str(flux_base_dir()), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
            "--controlnet-layers", "1", "--controlnet-single-layers", "0"]
    config = config_from_args(parser.parse_args(argv + (["--resolution", str(resolution)] if resolution else [])))
    assert config.resolution == resolution
    pipe, used, _ = read_flow_base(config, "flux", torch.device("cpu"))
    assert used == expected and pipe.native_size == SIZE == pipe.vae.config.sample_size


def test_a_new_controlnet_leaves_the_shipped_base_bit_identical(pipe):
    base = pipe.transformer
    cn = FluxControlNet.from_transformer(base, num_layers=2, num_single_layers=0).eval()
    g = torch.Generator().manual_seed(0)
    tokens = (SIZE // 16) ** 2
    x = torch.randn(2, tokens, 16, generator=g)
    cond = torch.randn(2, tokens, 16, generator=g)
    text = pipe.encode_prompt([PROMPT, "green circle with white background"], max_sequence_length=16)
    kw = dict(hidden_states=x, timestep=torch.tensor([0.3, 0.8]), encoder_hidden_states=text.embeds,
              pooled_projections=text.pooled, txt_ids=text.ids, img_ids=latent_image_ids(SIZE // 16, SIZE // 16))
    with torch.no_grad():
        alone = base(**kw, return_dict=False)[0]
        residuals = cn(**kw, condition=cond)
        controlled = base(**kw, **transformer_kwargs(residuals, base), return_dict=False)[0]
    assert residuals.tensors and torch.equal(alone, controlled)


def test_demo_with_the_flux_backbone(pipe, tmp_path, capsys):
    """The command with --backbone flux and few steps: the grid, and metrics that are the scores of its images."""
    from controlnet.commands.demo import register
    from controlnet.data.fill import fill_iou

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--backbone", "flux", "--out", str(tmp_path), "--steps", "4", "-q"])
    assert args.func(args) == 0
    assert "IoU" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["backbone"] == "flux" and metrics["n"] == len(DEMO_SAMPLES) and metrics["steps"] == 4
    result, grid = run_demo(tmp_path / "again", steps=4, samples=DEMO_SAMPLES[:2], pipe=pipe, progress=False,
                            backbone="flux")
    assert grid.is_file()
    for s, base, ctrl, iou in zip(result.samples, result.base_images, result.control_images, result.iou_control):
        assert base.shape == ctrl.shape == (SIZE, SIZE, 3) and not np.array_equal(base, ctrl)
        assert iou == fill_iou(ctrl, s.condition, s.prompt)
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["iou_with_controlnet"] == pytest.approx(float(np.mean(result.iou_control)))


def test_training_script_writes_the_shipped_folder_only_with_ship(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_embedded_flux.py"
    spec = importlib.util.spec_from_file_location("train_embedded_flux", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.parse_args([]).out == Path("outputs/tiny-flux")
    assert script.parse_args(["--ship"]).out == Path("src/controlnet/assets/tiny-flux")
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--ship", "--out", "elsewhere"])
    assert exit_.value.code == 2 and "--ship writes" in capsys.readouterr().err
