"""``controlnet train --base <Flux or SD3 folder>`` on tiny diffusers folders: the flow-matching objective against a
hand computation with diffusers' own ControlNet models (the reference training scripts' code path), the base
reproduced bit for bit at step 0, the loss falling on a tiny overfit set, exact resume, the trained folder in
``controlnet generate``, and what does not fit refused in one line."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxPipeline, SD3ControlNetModel,
                       StableDiffusion3Pipeline)
from PIL import Image
from safetensors.torch import load_file

from controlnet.errors import EXIT_BAD_INPUT, UserError

R = 32  # training resolution: 4x4 latents, 2x2 Flux tokens / SD3 patches
LAYERS = {"flux": dict(controlnet_layers=2, controlnet_single_layers=1), "sd3": dict(controlnet_layers=2)}
PROMPT = "a red circle on blue"
FAMILIES = ["flux", "sd3"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny Flux and SD3 diffusers folders (VAE posterior std 1e-7: its samples are its mean, as a hand computation
    takes them), a fill data set of 4 examples, a UNet base and its ControlNet."""
    from controlnet.checkpoints import save_controlnet
    from controlnet.data.fill import make_fill_dataset
    from controlnet.model import ControlNet
    from controlnet.testing import build_unet
    from controlnet.testing_flow import diffusers_components, flux_components, sd3_components
    from test_train import make_base  # the tiny SD1 folder of the UNet trainer's tests

    root = tmp_path_factory.mktemp("train-transformer")
    FluxPipeline(**diffusers_components(flux_components(posterior_std=1e-7))).save_pretrained(root / "flux")
    StableDiffusion3Pipeline(**diffusers_components(sd3_components(posterior_std=1e-7))).save_pretrained(root / "sd3")
    make_base(root / "sd1")
    save_controlnet(ControlNet.from_unet(build_unet("sd1", "tiny")), root / "cn-unet", "diffusers")
    make_fill_dataset(root / "data", n=4, size=R, seed=0)
    return root


def _config(assets, family, out, **kw):
    from controlnet.train import TrainConfig

    kw = {"max_steps": 2, "checkpoint_every": 2, "batch_size": 2, "quiet": True, "plot": False, "tensorboard": False,
          "seed": 5, **LAYERS[family], **kw}
    return TrainConfig(data=kw.pop("data", assets / "data"), out=out, base=kw.pop("base", assets / family),
                       resolution=R, **kw)


def _pipe(assets, family):
    from controlnet.transformer_pipeline import TransformerPipeline

    return TransformerPipeline.from_pretrained(assets / family)


def _batch(pipe, timesteps: list[int], positions: list[int]) -> dict[str, torch.Tensor]:
    """A fixed batch as the data stream gives it: the fill images' latents (shifted and scaled), noise, the stream's
    timestep draws, the text of PROMPT, the condition images in [0, 1], the stream positions."""
    g = torch.Generator().manual_seed(0)
    n = len(timesteps)
    images = torch.rand(n, 3, R, R, generator=g)
    conditions = (torch.rand(n, 3, R, R, generator=g) > 0.5).float()
    latents = pipe.encode_latents(images, torch.Generator().manual_seed(1)).clone()  # (n, 16, 4, 4)
    text = pipe.encode_prompt([PROMPT] * n)
    return {"latents": latents, "noise": torch.randn(latents.shape, generator=g),
            "timesteps": torch.tensor(timesteps), "hidden": text.embeds.clone(), "pooled": text.pooled.clone(),
            "condition": conditions, "position": torch.tensor(positions), "empty": torch.zeros(n, dtype=torch.bool)}


def _objective(assets, family, pipe):
    from controlnet.train.flow import flow_objective

    return flow_objective(_config(assets, family, assets / "unused"), pipe, torch.float32)


# --------------------------------------------------------------------------------------------- the objective


def _reference_sigmas(scheduler_config: dict, timesteps: list[int]) -> torch.Tensor:
    """σ as diffusers' train_controlnet_{flux,sd3}.py draw it (logit-normal u = sigmoid(N(0, 1)), index floor(u N)
    into the training scheduler's sigmas), with u the normal quantile of the stream's draw (t + 1/2) / N."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    n = sched.config.num_train_timesteps
    u = [1 / (1 + np.exp(-statistics.NormalDist().inv_cdf((t + 0.5) / n))) for t in timesteps]
    return sched.sigmas[[int(x * n) for x in u]]


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_the_flow_matching_loss_computed_by_hand_with_diffusers_models(assets, tmp_path, family):
    """The objective's loss on a fixed batch (two samples, two σ) equals the reference scripts' computation with
    diffusers' FluxControlNetModel / SD3ControlNetModel loaded from our saved ControlNet (trained-like weights):
    x_σ = (1 − σ) x0 + σ ε, target ε − x0, the condition's latents (z − shift) · scale, Flux packed with ids and
    guidance 3.5."""
    from controlnet.testing import trained_like
    from controlnet.train.flow import make_flow_controlnet
    from controlnet.transformer_controlnet import latent_image_ids, pack_latents
    from controlnet.transformer_formats import save_transformer_controlnet

    pipe = _pipe(assets, family)
    cn = trained_like(make_flow_controlnet(_config(assets, family, tmp_path), pipe.transformer), 7)
    batch = _batch(pipe, timesteps=[100, 870], positions=[3, 9])
    ours = _objective(assets, family, pipe)(cn, pipe.transformer, batch)

    save_transformer_controlnet(cn, tmp_path / "cn")
    vae = pipe.vae
    x0, noise = batch["latents"], batch["noise"]
    sigma = _reference_sigmas(pipe.scheduler_config, [100, 870])[:, None, None, None]
    noisy, target = (1 - sigma) * x0 + sigma * noise, noise - x0
    cond = vae.encode(batch["condition"] * 2 - 1).latent_dist.mean  # posterior std 1e-7: the sample is the mean
    cond = (cond - vae.config.shift_factor) * vae.config.scaling_factor
    with torch.no_grad():
        if family == "flux":
            ref_cn = FluxControlNetModel.from_pretrained(tmp_path / "cn")
            t = sigma.flatten()  # diffusers' examples: timesteps / 1000
            kw = dict(timestep=t, guidance=torch.full((2,), 3.5), pooled_projections=batch["pooled"],
                      encoder_hidden_states=batch["hidden"], txt_ids=torch.zeros(batch["hidden"].shape[1], 3),
                      img_ids=latent_image_ids(2, 2), return_dict=False)
            blocks, singles = ref_cn(hidden_states=pack_latents(noisy), controlnet_cond=pack_latents(cond), **kw)
            pred = pipe.transformer(hidden_states=pack_latents(noisy), controlnet_block_samples=blocks,
                                    controlnet_single_block_samples=singles, **kw)[0]
            target = pack_latents(target)
        else:
            ref_cn = SD3ControlNetModel.from_pretrained(tmp_path / "cn")
            kw = dict(timestep=sigma.flatten() * 1000, encoder_hidden_states=batch["hidden"],
                      pooled_projections=batch["pooled"], return_dict=False)
            blocks = ref_cn(hidden_states=noisy, controlnet_cond=cond, **kw)[0]
            pred = pipe.transformer(hidden_states=noisy, block_controlnet_hidden_states=blocks, **kw)[0]
    reference = torch.nn.functional.mse_loss(pred, target)
    assert abs(ours.item() - reference.item()) <= 1e-5 * reference.item()
    assert ours.requires_grad  # the ControlNet's weights get gradients


@pytest.mark.parametrize("family", FAMILIES)
def test_at_step_0_the_residuals_are_zero_and_the_base_is_reproduced_bit_for_bit(assets, tmp_path, family):
    from controlnet.flow_sampling import FlowText, base_velocity
    from controlnet.residuals import Residuals
    from controlnet.train.flow import make_flow_controlnet
    from controlnet.transformer_controlnet import latent_image_ids, pack_latents

    pipe = _pipe(assets, family)
    cn = make_flow_controlnet(_config(assets, family, tmp_path), pipe.transformer)
    objective = _objective(assets, family, pipe)
    batch = _batch(pipe, timesteps=[400, 600], positions=[0, 1])
    text = FlowText(batch["hidden"], batch["pooled"], torch.zeros(batch["hidden"].shape[1], 3))
    x, ids = batch["latents"], None
    if family == "flux":
        x, ids = pack_latents(x), latent_image_ids(2, 2)
    t = torch.tensor([400.0, 600.0])
    residuals = cn(**objective.controlnet_inputs(cn, x, t, text, objective.condition(batch, cn), ids))
    assert residuals.tensors and all(not r.any() for r in residuals.tensors.values())
    with torch.no_grad():
        controlled = base_velocity(pipe.transformer, x, t, text, residuals, 3.5, ids)
        plain = base_velocity(pipe.transformer, x, t, text, Residuals(), 3.5, ids)
    assert torch.equal(controlled, plain)


@pytest.mark.parametrize("family,single", [("flux", 1), ("flux", 0), ("sd3", None)])
def test_exactly_the_parameters_the_loss_does_not_reach_are_locked(assets, tmp_path, family, single):
    """After a backward pass of the loss, the ControlNet's parameters without a gradient are the locked ones (what
    DistributedDataParallel needs), and there are some only where no block reads the last block's text stream."""
    from controlnet.testing import trained_like
    from controlnet.train.flow import make_flow_controlnet

    pipe = _pipe(assets, family)
    config = _config(assets, family, tmp_path, controlnet_single_layers=single)
    cn = make_flow_controlnet(config, pipe.transformer)
    locked = {n for n, p in cn.named_parameters() if not p.requires_grad}
    trained_like(cn, 3).train()  # nonzero zero linears: gradients reach the copied blocks
    _objective(assets, family, pipe)(cn, pipe.transformer, _batch(pipe, [300, 700], [0, 1])).backward()
    assert {n for n, p in cn.named_parameters() if p.grad is None} == locked
    assert bool(locked) == (single != 1)


def test_sigma_follows_the_logit_normal_law_on_the_training_schedules_levels():
    """The stream's uniform draws give σ whose logits are standard normal (Flux, unshifted levels), and SD3's
    levels are shifted by its scheduler's shift 3."""
    from controlnet.testing_flow import FLUX_SCHEDULER, SD3_SCHEDULER
    from controlnet.train.objective import flow_sigmas

    t = torch.arange(1000)
    flux = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER).sigmas
    sigma = flow_sigmas(t, flux)
    logits = torch.logit(1 - sigma.double() + 0.0005)  # σ = 1 - floor(u N)/N: back to u at the bin's centre
    assert abs(logits.mean().item()) < 0.01 and abs(logits.std().item() - 1) < 0.02
    assert torch.equal(sigma, _reference_sigmas(FLUX_SCHEDULER, t.tolist()))
    sd3 = flow_sigmas(t, FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER).sigmas)
    assert torch.allclose(sd3, 3 * sigma / (1 + 2 * sigma), atol=1e-6)


# --------------------------------------------------------------------------------------------- training runs


def one_example_data(source: Path, data: Path) -> tuple[Path, dict]:
    """A data set at ``data`` holding the first example of the fill data set ``source``, and its manifest row."""
    data.mkdir()
    row = json.loads((source / "prompt.json").read_text().splitlines()[0])
    for key in ("source", "target"):
        (data / key).mkdir()
        Image.open(source / row[key]).save(data / row[key])
    (data / "prompt.json").write_text(json.dumps(row) + "\n")
    return data, row


@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_loss_on_a_tiny_overfit_set_and_generate_loads_the_result(assets, tmp_path, family):
    """Twelve steps on one example lower the loss of a fixed batch of it; OUT/controlnet is diffusers' layout and
    ``controlnet generate --base <the same folder> --controlnet OUT/controlnet`` uses it."""
    from controlnet.cli import main
    from controlnet.train import train
    from controlnet.train.flow import make_flow_controlnet
    from controlnet.transformer_formats import load_transformer_controlnet

    data, row = one_example_data(assets / "data", tmp_path / "one")
    result = train(_config(assets, family, tmp_path / "run", data=data, max_steps=12, checkpoint_every=0, lr=1e-3,
                           empty_prompt_prob=0.0))
    assert result.step == 12 and all(np.isfinite(result.losses))

    pipe = _pipe(assets, family)
    image, cond = (torch.from_numpy(np.array(Image.open(data / row[k]).convert("RGB"))).permute(2, 0, 1) / 255.0
                   for k in ("target", "source"))
    batch = _batch(pipe, timesteps=[150, 350, 500, 650, 850], positions=[0, 1, 2, 3, 4])
    batch["latents"] = pipe.encode_latents(image[None].expand(5, -1, -1, -1), torch.Generator().manual_seed(1)).clone()
    batch["condition"] = cond[None].expand(5, -1, -1, -1)
    text = pipe.encode_prompt([row["prompt"]] * 5)
    batch["hidden"], batch["pooled"] = text.embeds.clone(), text.pooled.clone()
    objective = _objective(assets, family, pipe)
    with torch.no_grad():
        before = objective(make_flow_controlnet(_config(assets, family, tmp_path), pipe.transformer),
                           pipe.transformer, batch)
        trained = load_transformer_controlnet(result.controlnet, base=pipe.transformer)
        after = objective(trained, pipe.transformer, batch)
    assert after < 0.9 * before, (before.item(), after.item())

    out = tmp_path / "images"
    argv = ["generate", "--base", str(assets / family), "--controlnet", str(result.controlnet), "--control",
            str(data / row["source"]), "--prompt", row["prompt"], "--steps", "2", "--size", f"{R}x{R}", "--seed", "1",
            "--dtype", "fp32", "--device", "cpu", "-q", "--out", str(out)]
    assert main(argv) == 0
    with Image.open(out / "00000-1.png") as im:
        assert im.size == (R, R)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_interrupted_run_resumed_ends_bit_identical_to_an_uninterrupted_one(assets, tmp_path, family):
    """Stopped after its step-2 checkpoint and resumed with --resume latest (with gradient accumulation and flips),
    a run ends with the weights and losses of an uninterrupted 4-step run."""
    from controlnet.train import train

    common = dict(grad_accum=2, batch_size=1, hflip=True, lr=1e-3)
    whole = train(_config(assets, family, tmp_path / "whole", max_steps=4, **common))
    train(_config(assets, family, tmp_path / "cut", max_steps=2, **common))
    resumed = train(_config(assets, family, tmp_path / "cut", max_steps=4, resume="latest", **common))
    assert resumed.resumed_from.name == "step-000002" and resumed.losses == whole.losses[2:]
    a = load_file(tmp_path / "whole" / "controlnet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.startswith("controlnet_blocks."))  # it trained


@pytest.mark.parametrize("family", FAMILIES)
def test_validation_samples_with_the_flow_sampler_and_step_0_is_the_bases_own_sample(assets, tmp_path, family):
    """Validation grids and scores at steps 0, 1, 2; at step 0 (zero residuals) the sample is the base's own
    generation without a ControlNet, pixel for pixel."""
    from controlnet.train import train

    result = train(_config(assets, family, tmp_path / "run", validate_every=1, validation_count=2,
                           validation_steps=2, validation_guidance=3.0, score="ssim", lr=1e-3))
    assert [r["step"] for r in result.validations] == [0, 1, 2]
    assert all(0 <= r["score"] <= 1 and len(r["scores"]) == 2 for r in result.validations)
    grid = np.array(Image.open(tmp_path / "run" / result.validations[0]["grid"]).convert("RGB"))  # (2R, 3R, 3)
    row = json.loads((assets / "data" / "prompt.json").read_text().splitlines()[0])
    plain = _pipe(assets, family)(row["prompt"], [], height=R, width=R, steps=2, guidance=3.0, seed=5,
                                  output_type="pt")[0]
    plain = (plain.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(grid[:R, R:2 * R], plain)  # row 0: the manifest's first example, condition | sample | image


def test_the_locked_transformer_is_unchanged_and_half_the_prompts_are_empty(assets, tmp_path):
    """The base's digest at the end is the fresh transformer's; each step's empty prompts are the seeded draws of
    its stream positions (the paper's 50%), as on UNet bases."""
    from diffusers import FluxTransformer2DModel

    from controlnet.data.cache import module_digest
    from controlnet.data.datasets import sample_draws
    from controlnet.train import train

    result = train(_config(assets, "flux", tmp_path / "run", max_steps=6, checkpoint_every=0, lr=1e-3))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    start, end = (next(r for r in log if r["kind"] == kind) for kind in ("start", "end"))
    assert start["locked_base"] == end["locked_base"] == module_digest(
        FluxTransformer2DModel.from_pretrained(assets / "flux" / "transformer"))
    expected = [sum(sample_draws(5, p, 0.5, False, 1000).empty_prompt for p in range(2 * s, 2 * s + 2))
                for s in range(6)]
    assert [r["empty_prompts"] for r in log if r["kind"] == "train"] == expected
    assert result.empty_prompts == sum(expected) and 0 < sum(expected) < 12


def test_text_caches_are_keyed_by_the_family(assets, tmp_path):
    """The same data on a Flux and an SD3 base share no text entry (their encodings differ); a second run on the
    same base finds everything cached."""
    from controlnet.train import train

    cache = tmp_path / "cache"
    flux = train(_config(assets, "flux", tmp_path / "a", max_steps=1, cache_dir=cache))
    sd3 = train(_config(assets, "sd3", tmp_path / "b", max_steps=1, cache_dir=cache))
    again = train(_config(assets, "flux", tmp_path / "c", max_steps=1, cache_dir=cache))
    assert flux.cache.prompts_encoded > 0 and sd3.cache.prompts_encoded == flux.cache.prompts_encoded
    assert (again.cache.prompts_encoded, again.cache.latents_encoded) == (0, 0)


# --------------------------------------------------------------------------------------------- bad input


def _one_line_error(capsys, argv: list[str]) -> str:
    from controlnet.cli import main

    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def _train_argv(assets, base: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--base", str(assets / base), "--data", str(assets / "data"), "--out", str(out), "--resolution",
            str(R), "--max-steps", "1", "--quiet", "--no-plot", "--no-tensorboard", *extra]


def test_a_wrong_family_init_and_unet_only_options_are_refused_in_one_line(assets, tmp_path, capsys):
    from controlnet.train import train

    sd3_cn = train(_config(assets, "sd3", tmp_path / "sd3", max_steps=1)).controlnet
    err = _one_line_error(capsys, _train_argv(assets, "flux", tmp_path / "a", "--init", str(sd3_cn)))
    assert "SD3" in err and "Flux" in err
    err = _one_line_error(capsys, _train_argv(assets, "flux", tmp_path / "b", "--init", str(assets / "cn-unet")))
    assert "--init" in err
    err = _one_line_error(capsys, _train_argv(assets, "sd1", tmp_path / "c", "--init", str(sd3_cn)))
    assert "--init" in err and "SD3" in err and "UNet" in err
    err = _one_line_error(capsys, _train_argv(assets, "flux", tmp_path / "d", "--export-original", "x.safetensors"))
    assert "--export-original" in err
    err = _one_line_error(capsys, _train_argv(assets, "sd1", tmp_path / "e", "--controlnet-layers", "2"))
    assert "--controlnet-layers" in err
    err = _one_line_error(capsys, _train_argv(assets, "flux", tmp_path / "f", "--controlnet-layers", "9"))
    assert "9" in err
    err = _one_line_error(capsys, _train_argv(assets, "sd3", tmp_path / "g", "--resolution", "40"))
    assert "multiple of 16" in err
    err = _one_line_error(capsys, _train_argv(assets, "sd3", tmp_path / "h", "--init", str(sd3_cn),
                                              "--controlnet-layers", "1"))
    assert "--controlnet-layers" in err and "--init" in err
    assert not any((tmp_path / name / "checkpoints").exists() for name in "abcdefgh")


def test_an_init_of_the_right_family_continues_from_its_weights(assets, tmp_path):
    from controlnet.train import train
    from controlnet.train.flow import read_flow_base

    first = train(_config(assets, "flux", tmp_path / "first", max_steps=1, lr=1e-3)).controlnet
    config = _config(assets, "flux", tmp_path / "x", init=str(first), controlnet_layers=None,
                     controlnet_single_layers=None)
    _, _, cn = read_flow_base(config, "flux", torch.device("cpu"))
    saved = load_file(first / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in cn.state_dict().items())
    with pytest.raises(UserError, match="--controlnet-single-layers"):
        read_flow_base(_config(assets, "sd3", tmp_path / "y", controlnet_single_layers=1), "sd3", torch.device("cpu"))


# --------------------------------------------------------------------------------------------- data parallel


@pytest.mark.slow  # two `accelerate launch` processes: tens of seconds
@pytest.mark.parametrize("family", FAMILIES)
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(assets, tmp_path, family):
    """As for UNet bases (tests/test_train_ddp.py, whose tolerance this takes): the same samples, per-step losses
    within 1e-5 relative, the weight updates within 1e-2 relative L2 norm. Every ControlNet parameter the loss does
    not reach (the last copied block's text-stream output) is left out of the gradient reduction."""
    from controlnet.train.flow import make_flow_controlnet

    layers = [f"--controlnet-layers={LAYERS[family]['controlnet_layers']}"]
    if family == "flux":
        layers.append("--controlnet-single-layers=0")  # the last double block's text stream reaches nothing
    common = ["--base", str(assets / family), "--data", str(assets / "data"), "--resolution", str(R), "--max-steps",
              "3", "--lr", "1e-3", "--seed", "1", "--quiet", "--no-plot", "--no-tensorboard", *layers]
    pipe = _pipe(assets, family)
    torch.manual_seed(1)
    config = _config(assets, family, tmp_path, controlnet_single_layers=0 if family == "flux" else None)
    ddp_matches_one_process(tmp_path, common, make_flow_controlnet(config, pipe.transformer).state_dict())


def ddp_matches_one_process(tmp_path: Path, common: list[str], init: dict[str, torch.Tensor]) -> list[dict]:
    """``controlnet train *common`` in two processes of batch 1 (``accelerate launch``) and in one of batch 2: the
    same empty-prompt draws, per-step losses within 1e-5 relative, the updates from ``init`` within 1e-2 relative
    L2 norm. Returns the one process's train records."""
    import os
    import subprocess
    import sys

    from controlnet.cli import main

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "controlnet", "train", "--out", str(tmp_path / "ddp"), "--batch-size", "1", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", "--out", str(tmp_path / "one"), "--batch-size", "2", *common]) == 0

    def records(out):
        return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]

    ddp, one = records(tmp_path / "ddp"), records(tmp_path / "one")
    assert [r["empty_prompts"] for r in ddp] == [r["empty_prompts"] for r in one]
    np.testing.assert_allclose([r["loss"] for r in ddp], [r["loss"] for r in one], rtol=1e-5)
    a = load_file(tmp_path / "ddp" / "controlnet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "one" / "controlnet" / "diffusion_pytorch_model.safetensors")
    update_a = torch.cat([(a[k] - init[k]).flatten() for k in init])
    update_b = torch.cat([(b[k] - init[k]).flatten() for k in init])
    assert update_b.abs().max() > 1e-4
    assert (update_a - update_b).norm() <= 1e-2 * update_b.norm()
    return one


@pytest.mark.slow  # three training runs in subprocesses, one killed
def test_sigkill_then_resume_latest_ends_bit_identical_to_an_uninterrupted_run(assets, tmp_path):
    """tests/test_train_resume.py's test on a Flux base: SIGKILL after the first checkpoint, --resume latest (with
    data-loader workers), the same log and weights as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from controlnet.train.state import CHECKPOINT_RE

    steps = 16

    def cmd(out, *extra):
        return [sys.executable, "-m", "controlnet", "train", "--base", str(assets / "flux"), "--data",
                str(assets / "data"), "--out", str(out), "--resolution", str(R), "--max-steps", str(steps),
                "--checkpoint-every", "4", "--batch-size", "2", "--grad-accum", "2", "--hflip", "--lr", "1e-3",
                "--seed", "3", "--controlnet-layers", "2", "--controlnet-single-layers", "1", "--quiet", "--no-plot",
                "--no-tensorboard", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.Popen(cmd(tmp_path / "whole"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    killed = tmp_path / "killed"
    victim = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while victim.poll() is None and time.monotonic() < deadline:
        if (killed / "checkpoints").is_dir() and any(CHECKPOINT_RE.match(p.name)
                                                     for p in (killed / "checkpoints").iterdir()):
            break
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (killed / "controlnet").exists()  # it died mid-run
    resumed = subprocess.run(cmd(killed, "--resume", "latest", "--num-workers", "2"), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-2000:]

    def losses(out):
        return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]

    assert losses(killed) == losses(tmp_path / "whole") and len(losses(killed)) == steps
    a = load_file(tmp_path / "whole" / "controlnet" / "diffusion_pytorch_model.safetensors")
    b = load_file(killed / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
