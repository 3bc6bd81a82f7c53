"""``controlnet train --base <Qwen-Image folder>`` on a tiny diffusers folder: the flow-matching loss against a
computation with diffusers' QwenImageTransformer2DModel + QwenImageControlNetModel (our weights loaded into it), the
text cache's unpadded entries padded per batch, the loss falling on a tiny overfit set, exact resume, validation on
the flow sampler, the trained folder in ``controlnet generate``, and what does not fit refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageControlNetModel, QwenImagePipeline
from PIL import Image
from safetensors.torch import load_file

from controlnet.errors import EXIT_BAD_INPUT

R = 32  # training resolution: the tiny VAE's 8x8 latents, 4x4 tokens
PROMPTS = ("a red circle on blue", "a")  # of different token lengths: a padded, masked batch
LAYERS = 1  # of the tiny base's 2 blocks


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Qwen-Image diffusers folder (VAE posterior std 1e-7: its samples are its mean, as a hand computation
    takes them), a fill data set of 4 examples, a Flux ControlNet and a Qwen-Image inpainting one."""
    from controlnet.data.fill import make_fill_dataset
    from controlnet.testing_flow import diffusers_components, flux_components, qwen_components
    from controlnet.transformer_controlnet import FluxControlNet, QwenImageControlNet
    from controlnet.transformer_formats import save_transformer_controlnet

    root = tmp_path_factory.mktemp("train-qwen")
    qwen = qwen_components(posterior_std=1e-7)
    QwenImagePipeline(**diffusers_components(qwen)).save_pretrained(root / "qwen")
    inpaint = QwenImageControlNet.from_transformer(qwen["transformer"], num_layers=1, extra_condition_channels=4)
    save_transformer_controlnet(inpaint, root / "cn-inpaint")
    flux = flux_components()["transformer"]
    save_transformer_controlnet(FluxControlNet.from_transformer(flux, num_layers=1, num_single_layers=0),
                                root / "cn-flux")
    make_fill_dataset(root / "data", n=4, size=R, seed=0)
    return root


def _config(assets, out, **kw):
    from controlnet.train import TrainConfig

    kw = {"max_steps": 2, "checkpoint_every": 2, "batch_size": 2, "quiet": True, "plot": False, "tensorboard": False,
          "seed": 5, "controlnet_layers": LAYERS, **kw}
    return TrainConfig(data=kw.pop("data", assets / "data"), out=out, base=assets / "qwen", resolution=R, **kw)


def _pipe(assets):
    from controlnet.transformer_pipeline import TransformerPipeline

    return TransformerPipeline.from_pretrained(assets / "qwen")


def _objective(assets, pipe):
    from controlnet.train.flow import flow_objective

    return flow_objective(_config(assets, assets / "unused"), pipe, torch.float32)


def _batch(pipe, timesteps: list[int], prompts: list[str]) -> dict[str, torch.Tensor]:
    """A fixed batch as the data stream gives it: latents normalised per channel, noise, the stream's timestep
    draws, the prompts' text (padded, with its mask where their lengths differ), condition images in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    n = len(timesteps)
    images = torch.rand(n, 3, R, R, generator=g)
    conditions = (torch.rand(n, 3, R, R, generator=g) > 0.5).float()
    latents = pipe.encode_latents(images, torch.Generator().manual_seed(1)).clone()  # (n, 4, 8, 8)
    text = pipe.encode_prompt(prompts)
    batch = {"latents": latents, "noise": torch.randn(latents.shape, generator=g), "timesteps": torch.tensor(timesteps),
             "hidden": text.embeds.clone(), "condition": conditions, "position": torch.arange(n),
             "empty": torch.zeros(n, dtype=torch.bool)}
    if text.mask is not None:
        batch["hidden_mask"] = text.mask.clone()
    return batch


def _reference_sigmas(scheduler_config: dict, timesteps: list[int]) -> torch.Tensor:
    from test_train_transformer import _reference_sigmas as reference  # diffusers' examples' logit-normal draw

    return reference(scheduler_config, timesteps)


# --------------------------------------------------------------------------------------------- the objective


def test_loss_equals_the_flow_matching_loss_computed_with_diffusers_qwen_image_models(assets, tmp_path):
    """On a fixed batch (two samples, two σ, text of two lengths masked): x_σ = (1 − σ) x0 + σ ε, target
    ε − x0, t = σ, the condition's latents (z − mean) / std packed 2x2, diffusers' QwenImageControlNetModel (our saved
    weights) feeding QwenImageTransformer2DModel's controlnet_block_samples; the MSE within 1e-5."""
    from controlnet.testing import trained_like
    from controlnet.train.flow import make_flow_controlnet
    from controlnet.transformer_controlnet import pack_latents
    from controlnet.transformer_formats import save_transformer_controlnet

    pipe = _pipe(assets)
    cn = trained_like(make_flow_controlnet(_config(assets, tmp_path), pipe.transformer), 7)
    batch = _batch(pipe, timesteps=[100, 870], prompts=list(PROMPTS))
    assert batch["hidden_mask"].sum(1).tolist()[0] > batch["hidden_mask"].sum(1).tolist()[1]
    ours = _objective(assets, pipe)(cn, pipe.transformer, batch)

    save_transformer_controlnet(cn, tmp_path / "cn")
    ref_cn = QwenImageControlNetModel.from_pretrained(tmp_path / "cn").eval()
    vae = pipe.vae
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (vae.config.latents_mean, vae.config.latents_std))
    x0, noise = batch["latents"], batch["noise"]
    sigma = _reference_sigmas(pipe.scheduler_config, [100, 870])[:, None, None, None]
    noisy, target = pack_latents((1 - sigma) * x0 + sigma * noise), pack_latents(noise - x0)  # (2, 16, 16)
    cond = vae.encode((batch["condition"] * 2 - 1)[:, :, None]).latent_dist.mean[:, :, 0]  # std 1e-7: the mean
    cond = pack_latents((cond - mean) / std)
    kw = dict(encoder_hidden_states=batch["hidden"], encoder_hidden_states_mask=batch["hidden_mask"],
              timestep=sigma.flatten(), img_shapes=[(1, R // 8, R // 8)] * 2, return_dict=False)
    with torch.no_grad():
        blocks = ref_cn(noisy, cond, 1.0, **kw)  # return_dict=False: the list of block samples itself
        pred = pipe.transformer(hidden_states=noisy, controlnet_block_samples=blocks, **kw)[0]
    reference = torch.nn.functional.mse_loss(pred, target)
    assert abs(ours.item() - reference.item()) <= 1e-5 * reference.item()
    assert ours.requires_grad


def test_exactly_the_parameters_the_loss_does_not_reach_are_locked(assets, tmp_path):
    """After a backward pass, the ControlNet's parameters without a gradient are the locked ones: the last block's
    text-stream output (what DistributedDataParallel needs)."""
    from controlnet.testing import trained_like
    from controlnet.train.flow import make_flow_controlnet

    pipe = _pipe(assets)
    cn = make_flow_controlnet(_config(assets, tmp_path, controlnet_layers=2), pipe.transformer)
    locked = {n for n, p in cn.named_parameters() if not p.requires_grad}
    assert locked and all(n.startswith(("transformer_blocks.1.attn.to_add_out.", "transformer_blocks.1.txt_mlp."))
                          for n in locked)
    trained_like(cn, 3).train()
    _objective(assets, pipe)(cn, pipe.transformer, _batch(pipe, [300, 700], list(PROMPTS))).backward()
    assert {n for n, p in cn.named_parameters() if p.grad is None} == locked


def test_the_training_sigmas_are_the_unshifted_levels_as_for_flux():
    """Qwen-Image's scheduler (dynamic shifting; its shift_terminal acts in set_timesteps) trains on the unshifted
    levels 1 → 1/1000, as Flux's: the same logit-normal σ for the same draws."""
    from controlnet.testing_flow import FLUX_SCHEDULER, QWEN_SCHEDULER
    from controlnet.train.objective import flow_sigmas

    qwen = FlowMatchEulerDiscreteScheduler.from_config(QWEN_SCHEDULER).sigmas
    assert torch.equal(qwen, FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER).sigmas)
    assert torch.allclose(qwen, torch.linspace(1, 1e-3, 1000), atol=1e-6)
    t = torch.arange(0, 1000, 37)
    assert torch.equal(flow_sigmas(t, qwen), _reference_sigmas(QWEN_SCHEDULER, t.tolist()))


# --------------------------------------------------------------------------------------------- the caches


def test_text_is_cached_unpadded_and_padded_per_batch_with_its_mask(assets, tmp_path):
    """Each prompt's entry holds its own tokens, as the sampler encodes it alone; a batch of two lengths is padded
    at the end with zeros and masked; the dataset's latents are normalised as the sampler's encode_latents."""
    from controlnet.data.datasets import TrainDataset, collate_samples, prepare_examples, read_manifest, text_key
    from controlnet.data.cache import CacheStore
    from controlnet.train.flow import flow_encoders, latent_normalisation

    pipe = _pipe(assets)
    store = CacheStore(tmp_path / "cache")
    encoders = flow_encoders(pipe, _config(assets, tmp_path))
    prep = prepare_examples(read_manifest(assets / "data"), store, encoders, R)
    for prompt in {*(ex.prompt for ex in prep.examples), ""}:
        alone = pipe.encode_prompt([prompt])
        assert alone.mask is None
        cached = store.load_tensors("text", text_key(encoders.text_id, prompt))["hidden"]
        assert cached.shape == alone.embeds[0].shape
        torch.testing.assert_close(cached, alone.embeds[0], rtol=0, atol=1e-6)

    ds = TrainDataset(prep.examples, store, 3, 0.5, False, 1000, empty_text_key=prep.empty_text_key,
                      **latent_normalisation(pipe))
    items = [ds[p] for p in range(8)]
    lengths = {item["hidden"].shape[0] for item in items}
    assert len(lengths) == 2  # the empty prompt's tokens and a caption's
    batch = collate_samples(items)
    assert batch["hidden"].shape[:2] == (8, max(lengths))
    for item, row, mask in zip(items, batch["hidden"], batch["hidden_mask"]):
        n = item["hidden"].shape[0]
        assert mask.tolist() == [1] * n + [0] * (max(lengths) - n)
        assert torch.equal(row[:n], item["hidden"]) and not row[n:].any()
    same = [i for i in items if i["hidden"].shape[0] == items[0]["hidden"].shape[0]]
    assert "hidden_mask" not in collate_samples(same)

    ex = ds.example_at(0)
    image = torch.from_numpy(np.array(Image.open(ex.image).convert("RGB"))).permute(2, 0, 1)[None] / 255.0
    expected = pipe.encode_latents(image)[0]  # posterior std 1e-7: any sample is the mean
    torch.testing.assert_close(items[0]["latents"], expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- training runs


def test_training_lowers_the_loss_and_generate_loads_the_result(assets, tmp_path):
    """Twelve steps on one example lower the loss of a fixed batch of it and move the zero linears from zero;
    OUT/controlnet loads with load_transformer_controlnet and ``controlnet generate --base <the same folder>`` uses
    it."""
    from test_train_transformer import one_example_data

    from controlnet.cli import main
    from controlnet.train import train
    from controlnet.train.flow import make_flow_controlnet
    from controlnet.transformer_formats import load_transformer_controlnet

    data, row = one_example_data(assets / "data", tmp_path / "one")
    result = train(_config(assets, tmp_path / "run", data=data, max_steps=12, checkpoint_every=0, lr=1e-3,
                           empty_prompt_prob=0.0))
    assert result.step == 12 and all(np.isfinite(result.losses))
    saved = load_file(result.controlnet / "diffusion_pytorch_model.safetensors")
    zero = [k for k in saved if k.startswith(("controlnet_blocks.", "controlnet_x_embedder."))]
    assert zero and all(saved[k].abs().sum() > 0 for k in zero)

    pipe = _pipe(assets)
    image, cond = (torch.from_numpy(np.array(Image.open(data / row[k]).convert("RGB"))).permute(2, 0, 1) / 255.0
                   for k in ("target", "source"))
    batch = _batch(pipe, timesteps=[150, 350, 500, 650, 850], prompts=[row["prompt"]] * 5)
    batch["latents"] = pipe.encode_latents(image[None].expand(5, -1, -1, -1)).clone()
    batch["condition"] = cond[None].expand(5, -1, -1, -1)
    objective = _objective(assets, pipe)
    with torch.no_grad():
        before = objective(make_flow_controlnet(_config(assets, tmp_path), pipe.transformer), pipe.transformer, batch)
        trained = load_transformer_controlnet(result.controlnet, base=pipe.transformer)
        after = objective(trained, pipe.transformer, batch)
    assert after < 0.9 * before, (before.item(), after.item())

    out = tmp_path / "images"
    argv = ["generate", "--base", str(assets / "qwen"), "--controlnet", str(result.controlnet), "--control",
            str(data / row["source"]), "--prompt", row["prompt"], "--steps", "2", "--size", f"{R}x{R}", "--seed", "1",
            "--dtype", "fp32", "--device", "cpu", "-q", "--out", str(out)]
    assert main(argv) == 0
    with Image.open(out / "00000-1.png") as im:
        assert im.size == (R, R)


def test_an_interrupted_run_resumed_ends_bit_identical_to_an_uninterrupted_one(assets, tmp_path):
    """Stopped after its step-2 checkpoint and resumed with --resume latest (gradient accumulation, flips, empty
    prompts in half the samples: padded batches; data-loader workers after the resume), a run ends with the weights
    and losses of an uninterrupted one."""
    from controlnet.train import train

    common = dict(grad_accum=2, batch_size=2, hflip=True, lr=1e-3)
    whole = train(_config(assets, tmp_path / "whole", max_steps=4, **common))
    train(_config(assets, tmp_path / "cut", max_steps=2, **common))
    resumed = train(_config(assets, tmp_path / "cut", max_steps=4, resume="latest", num_workers=2, **common))
    assert resumed.resumed_from.name == "step-000002" and resumed.losses == whole.losses[2:]
    a = load_file(tmp_path / "whole" / "controlnet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("controlnet_blocks."))  # it trained


def test_validation_samples_with_the_flow_sampler_and_step_0_is_the_bases_own_sample(assets, tmp_path):
    """At step 0 (zero residuals) the validation sample is the base's own generation (true CFG against the empty
    negative prompt), pixel for pixel."""
    from controlnet.train import train

    result = train(_config(assets, tmp_path / "run", max_steps=1, validate_every=1, validation_count=2,
                           validation_steps=2, validation_guidance=3.0, score="ssim", lr=1e-3))
    assert [r["step"] for r in result.validations] == [0, 1]
    grid = np.array(Image.open(tmp_path / "run" / result.validations[0]["grid"]).convert("RGB"))  # (2R, 3R, 3)
    row = json.loads((assets / "data" / "prompt.json").read_text().splitlines()[0])
    plain = _pipe(assets)(row["prompt"], [], height=R, width=R, steps=2, guidance=3.0, seed=5, output_type="pt")[0]
    plain = (plain.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(grid[:R, R:2 * R], plain)


# --------------------------------------------------------------------------------------------- bad input


def _one_line_error(capsys, argv: list[str]) -> str:
    from controlnet.cli import main

    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def _train_argv(assets, out: Path, *extra: str) -> list[str]:
    return ["train", "--base", str(assets / "qwen"), "--data", str(assets / "data"), "--out", str(out),
            "--resolution", str(R), "--max-steps", "1", "--quiet", "--no-plot", "--no-tensorboard", *extra]


def test_single_layers_a_flux_or_inpainting_init_and_too_many_blocks_are_refused_in_one_line(assets, tmp_path,
                                                                                            capsys):
    err = _one_line_error(capsys, _train_argv(assets, tmp_path / "a", "--controlnet-single-layers", "2"))
    assert "--controlnet-single-layers" in err and "Qwen-Image" in err
    err = _one_line_error(capsys, _train_argv(assets, tmp_path / "b", "--init", str(assets / "cn-flux")))
    assert "--init" in err and "Flux" in err
    err = _one_line_error(capsys, _train_argv(assets, tmp_path / "c", "--controlnet-layers", "9"))
    assert "9" in err
    err = _one_line_error(capsys, _train_argv(assets, tmp_path / "d", "--resolution", "36"))
    assert "multiple of 8" in err
    err = _one_line_error(capsys, _train_argv(assets, tmp_path / "e", "--init", str(assets / "cn-inpaint")))
    assert "--init" in err and "inpainting" in err
    assert not any((tmp_path / name / "checkpoints").exists() for name in "abcde")


def test_an_init_qwen_image_controlnet_continues_from_its_weights(assets, tmp_path):
    from controlnet.train import train
    from controlnet.train.flow import read_flow_base

    first = train(_config(assets, tmp_path / "first", max_steps=1, lr=1e-3)).controlnet
    _, _, cn = read_flow_base(_config(assets, tmp_path / "x", init=str(first), controlnet_layers=None), "qwenimage",
                              torch.device("cpu"))
    saved = load_file(first / "diffusion_pytorch_model.safetensors")
    assert cn.state_dict().keys() == saved.keys() and all(torch.equal(v, saved[k]) for k, v in cn.state_dict().items())
    assert any(saved[k].abs().sum() > 0 for k in saved if k.startswith("controlnet_blocks."))


# --------------------------------------------------------------------------------------------- data parallel


@pytest.mark.slow  # two `accelerate launch` processes: tens of seconds
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(assets, tmp_path):
    """As on Flux and SD3 bases (tests/test_train_transformer.py): per-step losses within 1e-5 relative, the weight
    updates within 1e-2 relative L2 norm; the one process's batches of two mix prompt lengths (padded, masked)
    where each DDP process's batch of one is unpadded."""
    from test_train_transformer import ddp_matches_one_process

    from controlnet.train.flow import make_flow_controlnet

    common = ["--base", str(assets / "qwen"), "--data", str(assets / "data"), "--resolution", str(R), "--max-steps",
              "3", "--lr", "1e-3", "--seed", "2", "--quiet", "--no-plot", "--no-tensorboard", "--controlnet-layers",
              "2"]
    pipe = _pipe(assets)
    init = make_flow_controlnet(_config(assets, tmp_path, controlnet_layers=2), pipe.transformer).state_dict()
    one = ddp_matches_one_process(tmp_path, common, init)
    assert any(r["empty_prompts"] == 1 for r in one)  # a batch of two lengths
