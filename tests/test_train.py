"""``controlnet train`` on a tiny seeded base: outputs, caches, the locked base, empty prompts, the decoder unlock,
bad input, checkpoint failures, validation and the sudden-convergence rule, the objective."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from controlnet.errors import UserError

R = 32  # training resolution: tiny UNet (2 blocks) x VAE 8x → multiples of 16
FILL_WORDS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple", "circle", "with", "background"]


def make_base(path: Path) -> Path:
    """A diffusers SD1.x folder with the tiny seeded models of controlnet.configs (no download)."""
    from diffusers import DDIMScheduler

    from controlnet.testing import build_text_encoder, build_tokenizer, build_unet, build_vae

    tok = build_tokenizer(FILL_WORDS, max_length=16)
    parts = {
        "unet": build_unet("sd1", "tiny"), "vae": build_vae(), "tokenizer": tok,
        "text_encoder": build_text_encoder(len(tok), hidden_size=32, max_positions=16),
        # SD1.5's scheduler config (scaled_linear 0.00085..0.012, 1000 steps, epsilon)
        "scheduler": DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    }
    for name, part in parts.items():
        part.save_pretrained(path / name)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from controlnet.data.fill import make_fill_dataset

    root = tmp_path_factory.mktemp("tiny")
    return make_base(root / "base"), make_fill_dataset(root / "data", n=8, size=R, seed=0)


def _config(tiny, out, **kw):
    from controlnet.train import TrainConfig

    base, data = tiny
    kw = {"max_steps": 2, "checkpoint_every": 2, "quiet": True, "plot": False, "tensorboard": False, **kw}
    return TrainConfig(data=kw.pop("data", data), out=out, base=kw.pop("base", base), resolution=R, **kw)


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _run(tiny, out, **kw):
    from controlnet.train import train

    return train(_config(tiny, out, **kw))


# --------------------------------------------------------------------------- outputs


def test_cli_trains_and_writes_a_loadable_controlnet_checkpoints_and_an_original_export(tiny, tmp_path, capsys):
    from controlnet.checkpoints import load_controlnet
    from controlnet.cli import main
    from controlnet.pipeline import ControlUnit, Pipeline

    base, data = tiny
    out = tmp_path / "run"
    argv = ["train", "--base", str(base), "--data", str(data), "--out", str(out), "--resolution", str(R),
            "--max-steps", "3", "--checkpoint-every", "1", "--keep", "2", "--export-original",
            str(tmp_path / "cn.safetensors"), "--no-plot", "--no-tensorboard"]
    assert main(argv) == 0
    assert "trained 3 steps" in capsys.readouterr().err
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000002", "step-000003"]
    cn = load_controlnet(out / "controlnet")
    same = load_controlnet(out / "checkpoints" / "step-000003" / "controlnet")
    original = load_controlnet(tmp_path / "cn.safetensors")
    for k, v in cn.state_dict().items():
        assert torch.equal(v, same.state_dict()[k]) and torch.equal(v, original.state_dict()[k])
    assert any(z.weight.abs().sum() > 0 for z in cn.zero_convs())  # it trained
    train_recs = _records(out, "train")
    assert [r["step"] for r in train_recs] == [1, 2, 3]
    assert all(r["samples"] == 4 and r["samples_per_s"] > 0 and np.isfinite(r["loss"]) for r in train_recs)
    # What `controlnet generate --controlnet OUT/controlnet` does: the pipeline loads and uses it.
    pipe = Pipeline.from_pretrained(base, dtype="fp32", device="cpu")
    cond = np.asarray(Image.open(data / "source" / "0.png").convert("RGB"))
    result = pipe("red circle with blue background", controls=[ControlUnit(str(out / "controlnet"), cond)],
                  steps=2, size=(R, R), output_type="np", progress=False)
    assert result.images[0].shape == (R, R, 3)
    # A second fresh run into the same folder is refused (it would mix two runs); bad values fail in one line.
    assert main(argv) == 2
    assert "--resume latest" in capsys.readouterr().err
    assert main(argv[:5] + ["--out", str(tmp_path / "r2"), "--resolution", "40"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


def test_caches_hit_on_the_second_run_and_are_rebuilt_when_data_or_model_change(tiny, tmp_path):
    base, data = tiny
    data = Path(shutil.copytree(data, tmp_path / "data"))
    cache = tmp_path / "cache"
    first = _run(tiny, tmp_path / "a", data=data, cache_dir=cache, max_steps=1)
    assert (first.cache.latents_encoded, first.cache.prompts_encoded) == (8, len({*_prompts(data), ""}))
    second = _run(tiny, tmp_path / "b", data=data, cache_dir=cache, max_steps=1)
    assert (second.cache.latents_encoded, second.cache.prompts_encoded, second.cache.conditions_made) == (0, 0, 0)
    assert second.cache.latents_cached == 8

    Image.new("RGB", (R, R), (10, 200, 30)).save(data / "target" / "5.png")  # one image changes
    third = _run(tiny, tmp_path / "c", data=data, cache_dir=cache, max_steps=1)
    assert (third.cache.latents_encoded, third.cache.prompts_encoded) == (1, 0)

    other = Path(shutil.copytree(base, tmp_path / "base2"))  # the same base but one VAE weight changed
    vae_file = other / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(vae_file)
    weights["encoder.conv_in.weight"][0, 0, 0, 0] += 0.5
    save_file(weights, vae_file)
    fourth = _run(tiny, tmp_path / "d", data=data, base=other, cache_dir=cache, max_steps=1)
    assert (fourth.cache.latents_encoded, fourth.cache.prompts_encoded) == (8, 0)


def _prompts(data: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in (data / "prompt.json").read_text().splitlines()]


def test_locked_base_is_unchanged_and_empty_prompts_are_the_seeded_draws(tiny, tmp_path):
    from controlnet.data.cache import module_digest
    from controlnet.data.datasets import sample_draws
    from diffusers import UNet2DConditionModel

    out = tmp_path / "run"
    result = _run(tiny, out, max_steps=6, checkpoint_every=0, seed=5)
    start, end = _records(out, "start")[0], _records(out, "end")[0]
    fresh = UNet2DConditionModel.from_pretrained(tiny[0] / "unet")
    assert start["locked_base"] == end["locked_base"] == module_digest(fresh)
    # Every sample's empty-prompt draw, as logged, is the seeded draw of its stream position.
    per_step = [r["empty_prompts"] for r in _records(out, "train")]
    expected = [sum(sample_draws(5, p, 0.5, False, 1000).empty_prompt for p in range(4 * s, 4 * s + 4))
                for s in range(6)]
    assert per_step == expected and result.empty_prompts == sum(expected) and result.samples == 24
    assert 0 < result.empty_prompts < 24
    assert _run(tiny, tmp_path / "none", max_steps=3, empty_prompt_prob=0.0).empty_prompts == 0


def test_unlock_decoder_trains_exactly_the_decoder_from_step_n(tiny, tmp_path):
    from controlnet.train.setup import DECODER_PREFIXES
    from controlnet.train.state import DECODER_FILE

    out = tmp_path / "run"
    result = _run(tiny, out, max_steps=4, checkpoint_every=2, keep=0, unlock_decoder_after=2, decoder_lr=1e-4)
    assert not (out / "checkpoints" / "step-000002" / DECODER_FILE).exists()  # nothing trained it yet
    assert (out / "checkpoints" / "step-000004" / DECODER_FILE).exists()
    before = load_file(tiny[0] / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(result.unet / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    decoder = {k for k in before if k.startswith(DECODER_PREFIXES)}
    assert changed == decoder


def test_bad_rows_are_skipped_listed_or_fail_with_strict_and_other_sizes_are_resized(tiny, tmp_path):
    base, data = tiny
    data = Path(shutil.copytree(data, tmp_path / "data"))
    (data / "target" / "3.png").write_bytes(b"\x89PNG garbage")  # unreadable
    Image.new("RGB", (2 * R, R)).save(data / "source" / "4.png")  # another size than its image
    with open(data / "prompt.json", "a") as f:
        f.write(json.dumps({"source": "source/0.png", "target": "target/nope.png", "prompt": "x"}) + "\n")
    with pytest.warns(UserWarning) as caught:
        result = _run(tiny, tmp_path / "run", data=data, max_steps=1)
    messages = " | ".join(str(w.message) for w in caught)
    assert "2 row(s)" in messages and "resized" in messages and f"{2 * R}x{R}" in messages
    assert sorted(s.line for s in result.skipped) == [4, 9]
    listed = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in listed) == [4, 9]
    assert _records(tmp_path / "run", "start")[0]["examples"] == 7
    with pytest.raises(UserError, match="line 9"):
        _run(tiny, tmp_path / "strict", data=data, max_steps=1, strict=True)


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(tiny, out, max_steps=2, checkpoint_every=2)
    good = out / "checkpoints" / "step-000002"
    before = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="earlier checkpoints are intact"):
        _run(tiny, out, max_steps=4, checkpoint_every=2, resume="latest")
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no half-written one
    assert {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()} == before
    assert _run(tiny, out, max_steps=4, checkpoint_every=2, resume="latest").step == 4


def test_a_checkpoint_whose_optimizer_state_does_not_fit_is_refused_in_one_line(tiny, tmp_path):
    """Optimizer moments are stored by parameter name: if they no longer fit their parameters (another
    architecture, another version), resuming says so instead of crashing inside torch's fused AdamW."""
    from controlnet.train.state import STATE_FILE

    out = tmp_path / "run"
    _run(tiny, out, max_steps=2, checkpoint_every=2)
    path = out / "checkpoints" / "step-000002" / STATE_FILE
    state = torch.load(path, weights_only=True)
    moments = state["optimizer"]["state"]
    shapes = {i: tuple(m["exp_avg"].shape) for i, m in moments.items()}
    a, b = next((i, j) for i in shapes for j in shapes if shapes[i] != shapes[j])
    moments[a], moments[b] = moments[b], moments[a]  # as if the parameters had been registered in another order
    torch.save(state, path)
    with pytest.raises(UserError, match="optimizer state does not fit"):
        _run(tiny, out, max_steps=4, checkpoint_every=2, resume="latest")


def test_validation_writes_grids_scores_and_a_plot(tiny, tmp_path):
    out = tmp_path / "run"
    result = _run(tiny, out, max_steps=3, validate_every=2, validation_count=2, validation_steps=2, plot=True)
    assert [v["step"] for v in result.validations] == [0, 2, 3]
    assert all(v["metric"] == "fill_iou" and 0.0 <= v["score"] <= 1.0 for v in result.validations)
    grid = Image.open(out / result.validations[0]["grid"])
    assert grid.size == (3 * R, 2 * R)  # rows: condition | sample | image
    assert grid.text["metric"] == "fill_iou"
    assert result.plot is not None and Image.open(result.plot).format == "PNG"


def test_sudden_convergence_rule():
    from controlnet.train.validation import sudden_convergence_step

    steps = [0, 100, 200, 300, 400, 500, 600]
    assert sudden_convergence_step(steps, [0.1, 0.1, 0.12, 0.8, 0.85, 0.84, 0.86]) == 300
    # a lucky spike before the real jump does not count: the score must stay above the midpoint
    assert sudden_convergence_step(steps, [0.1, 0.6, 0.1, 0.1, 0.8, 0.85, 0.86]) == 400
    assert sudden_convergence_step(steps, [0.1, 0.12, 0.11, 0.13, 0.12, 0.14, 0.13]) is None  # no jump
    assert sudden_convergence_step([0], [0.5]) is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_objective_with_a_new_controlnet_is_the_bases_own_loss(prediction_type):
    """Zero convs → no residual → the loss is exactly MSE(UNet(z_t, t, c), target) for the scheduler's target."""
    from diffusers import DDPMScheduler

    from controlnet.testing import build_unet
    from controlnet.model import ControlNet
    from controlnet.train.objective import denoising_loss

    unet = build_unet("sd1", "tiny")
    cn = ControlNet.from_unet(unet)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 4, 4, 4, generator=g), "noise": torch.randn(2, 4, 4, 4, generator=g),
             "timesteps": torch.tensor([10, 900]), "hidden": torch.randn(2, 5, 32, generator=g),
             "condition": torch.rand(2, 3, 32, 32, generator=g)}
    loss = denoising_loss(cn, unet, sched, batch, prediction_type, torch.float32, 32)
    noisy = sched.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
    pred = unet(noisy, batch["timesteps"], batch["hidden"]).sample
    target = {"epsilon": batch["noise"], "sample": batch["latents"],
              "v_prediction": sched.get_velocity(batch["latents"], batch["noise"], batch["timesteps"])}[prediction_type]
    assert torch.allclose(loss, torch.nn.functional.mse_loss(pred, target), rtol=1e-6, atol=0)
    loss.backward()  # gradients reach the zero convs (their input is non-zero), never the locked UNet
    assert all(z.weight.grad is not None and z.weight.grad.abs().sum() > 0 for z in cn.zero_convs())


def test_the_locked_encoder_builds_no_autograd_graph():
    """Only the decoder side records a graph: the locked encoder and mid block run as under torch.no_grad."""
    from diffusers import DDPMScheduler

    from controlnet.testing import build_unet
    from controlnet.model import ControlNet
    from controlnet.train.objective import denoising_loss

    unet = build_unet("sd1", "tiny").requires_grad_(False)
    cn = ControlNet.from_unet(unet)
    seen = {}

    def record(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[name] = out.requires_grad
        return hook

    for i, block in enumerate(unet.down_blocks):
        block.register_forward_hook(record(f"down{i}"))
    unet.mid_block.register_forward_hook(record("mid"))
    for i, block in enumerate(unet.up_blocks):
        block.register_forward_hook(record(f"up{i}"))
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(1, 4, 4, 4, generator=g), "noise": torch.randn(1, 4, 4, 4, generator=g),
             "timesteps": torch.tensor([500]), "hidden": torch.randn(1, 5, 32, generator=g),
             "condition": torch.rand(1, 3, 32, 32, generator=g)}
    denoising_loss(cn, unet, DDPMScheduler(), batch, "epsilon", torch.float32, 32).backward()
    assert seen == {"down0": False, "down1": False, "mid": False, "up0": True, "up1": True}
    assert all(p.grad is None for p in unet.parameters())


@pytest.mark.slow  # about a minute: bf16 autocast is emulated on most CPUs
def test_bf16_gradient_checkpointing_and_an_unlocked_decoder_run_from_the_command_line(tiny, tmp_path):
    base, data = tiny
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "controlnet", "train", "--base", str(base), "--data", str(data), "--out", str(out),
           "--resolution", str(R), "--max-steps", "2", "--mixed-precision", "bf16", "--gradient-checkpointing",
           "--unlock-decoder-after", "0", "--hflip", "--quiet", "--no-plot", "--no-tensorboard"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(np.isfinite(r["loss"]) for r in _records(out, "train"))
    assert (out / "controlnet" / "config.json").is_file() and (out / "unet" / "config.json").is_file()


def test_annotator_conditions_and_the_canny_score(tiny, tmp_path):
    base, data = tiny
    hf = tmp_path / "photos"  # diffusers layout without a conditioning_image column: canny makes the conditions
    shutil.copytree(data / "target", hf / "images")
    rows = [{"image": f"images/{i}.png", "text": p} for i, p in enumerate(_prompts(data))]
    (hf / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    result = _run(tiny, out, data=hf, annotator="canny", annotator_params={"low_threshold": 50}, max_steps=1,
                  validate_every=1, validation_count=1, validation_steps=1)
    assert result.cache.conditions_made == 8
    assert [v["metric"] for v in result.validations] == ["edge_f1", "edge_f1"]
    from controlnet import annotators

    grid = np.asarray(Image.open(out / result.validations[0]["grid"]).convert("RGB"))
    image = np.asarray(Image.open(hf / "images" / "0.png").convert("RGB"))
    assert np.array_equal(grid[:, :R], annotators.get("canny")(image, low_threshold=50))  # the cached condition


def test_an_sdxl_base_trains_with_pooled_embeddings_and_time_ids(tiny, tmp_path):
    from diffusers import EulerDiscreteScheduler

    from controlnet.testing import TINY_SDXL_TEXT_EMBED_DIM, build_text_encoder, build_tokenizer, build_unet, build_vae

    tok = build_tokenizer(FILL_WORDS, max_length=16)
    parts = {"unet": build_unet("sdxl", "tiny"), "vae": build_vae(), "tokenizer": tok, "tokenizer_2": tok,
             "text_encoder": build_text_encoder(len(tok), hidden_size=32, max_positions=16),
             "text_encoder_2": build_text_encoder(len(tok), hidden_size=32, max_positions=16, seed=1,
                                                  projection_dim=TINY_SDXL_TEXT_EMBED_DIM),
             "scheduler": EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")}
    base = tmp_path / "sdxl"
    for name, part in parts.items():
        part.save_pretrained(base / name)
    classes = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "scheduler": "EulerDiscreteScheduler",
               "text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection",
               "tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer"}
    index = {k: ["diffusers" if k in ("unet", "vae", "scheduler") else "transformers", v] for k, v in classes.items()}
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", **index}))
    result = _run(tiny, tmp_path / "run", base=base, max_steps=2)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    from controlnet.checkpoints import detect_family, load_controlnet

    assert detect_family(load_controlnet(result.controlnet)) == "sdxl"


def test_gaussian_zero_conv_ablation_starts_away_from_the_base(tiny):
    """--zero-conv-init gaussian (the paper's Fig. 8 ablation): the zero convs and the hint encoder's last conv
    start Gaussian, so the controlled UNet no longer equals the base at step 0; "zero" keeps them exactly zero."""
    from controlnet.testing import build_unet
    from controlnet.train.setup import ABLATION_GAUSSIAN_STD, make_controlnet

    unet = build_unet("sd1", "tiny")
    zero = make_controlnet(_config(tiny, "unused"), unet, 8)
    gauss = make_controlnet(_config(tiny, "unused", zero_conv_init="gaussian"), unet, 8)
    for z, g in zip(zero.zero_convs() + [zero.controlnet_cond_embedding.conv_out],
                    gauss.zero_convs() + [gauss.controlnet_cond_embedding.conv_out]):
        assert not z.weight.any() and not z.bias.any()
        assert 0.5 * ABLATION_GAUSSIAN_STD < g.weight.std() < 2 * ABLATION_GAUSSIAN_STD
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 4, 4, generator=g), torch.tensor([500])
    text, hint = torch.randn(1, 5, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    plain = unet(x, t, text).sample
    assert torch.equal(unet(x, t, text, **zero(x, t, text, hint).unet_kwargs()).sample, plain)
    assert not torch.allclose(unet(x, t, text, **gauss(x, t, text, hint).unet_kwargs()).sample, plain)
    with pytest.raises(UserError, match="--zero-conv-init"):
        _config(tiny, "unused", zero_conv_init="uniform").check()


def test_lite_architecture_trains_from_the_command_line(tiny, tmp_path):
    """--architecture lite: the trainer builds ControlNet-lite, trains and validates it (the pipeline samples with
    it), and the saved folder loads as lite."""
    from controlnet.checkpoints import load_controlnet

    result = _run(tiny, tmp_path / "run", architecture="lite", max_steps=2, validate_every=2, validation_count=1,
                  validation_steps=1)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert [v["step"] for v in result.validations] == [0, 2]
    cn = load_controlnet(result.controlnet)
    assert cn.config.architecture == "lite" and any(c.weight.any() for c in cn.zero_convs())
    with pytest.raises(UserError, match="--architecture"):
        _config(tiny, "unused", architecture="small").check()
    with pytest.raises(UserError, match="--export-original.*lite"):
        _config(tiny, "unused", architecture="lite", export_original="x.pth").check()


# --------------------------------------------------------------------------- the command line, the run folder


def _train_parser():
    from controlnet.cli import Parser
    from controlnet.commands import train as command

    parser = Parser(prog="controlnet")
    command.register(parser.add_subparsers())
    return parser


def test_the_options_are_the_config_fields_with_the_config_defaults():
    """`controlnet train`'s options are generated from TrainConfig: one per field, defaults written once."""
    import dataclasses

    from controlnet.commands.train import config_from_args
    from controlnet.train import TrainConfig

    parser = _train_parser()
    assert config_from_args(parser.parse_args(["train", "--data", "d", "--out", "o"])) == TrainConfig(data="d", out="o")
    argv = ["train", "--data", "d", "--out", "o", "--grad-accum", "3", "--lr", "2e-4", "--unlock-decoder-after", "5",
            "--mixed-precision", "bf16", "--hflip", "--no-plot", "-q", "--resume", "latest", "--annotator", "canny",
            "--annotator-param", "low_threshold=50"]
    assert config_from_args(parser.parse_args(argv)) == TrainConfig(
        data="d", out="o", grad_accum=3, lr=2e-4, unlock_decoder_after=5, mixed_precision="bf16", hflip=True,
        plot=False, quiet=True, resume="latest", annotator="canny", annotator_params={"low_threshold": 50})
    options = {s for a in parser._subparsers._group_actions[0].choices["train"]._actions for s in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + ("no-" if f.default is True else "") + f.name.replace("_", "-")
        assert flag in options or f.name == "annotator_params"
    assert "--annotator-param" in options and "--no-progress" not in options
    with pytest.raises(UserError, match="--annotator-param needs --annotator"):
        config_from_args(parser.parse_args(["train", "--data", "d", "--out", "o", "--annotator-param", "x=1"]))


def test_the_train_command_module_imports_no_torch():
    code = ("import sys, argparse; from controlnet.commands import train; p = argparse.ArgumentParser(); "
            "train.register(p.add_subparsers()); print(sorted({'torch', 'numpy', 'diffusers', 'cv2'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_a_second_run_on_the_same_out_is_refused_and_a_dead_runs_lock_is_taken_over(tiny, tmp_path, capsys):
    from controlnet.cli import main

    base, data = tiny
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from controlnet.train.folder import locked\n"
         "with locked(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["train", "--base", str(base), "--data", str(data), "--out", str(out), "--resolution", str(R),
                "--max-steps", "1", "-q", "--no-plot", "--no-tensorboard"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"in use by another training run (pid {holder.pid})" in err
        assert [p.name for p in out.iterdir()] == [".lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").read_text().strip() == str(holder.pid)  # left by a killed process: stale
    assert _run(tiny, out, max_steps=1).step == 1
    assert (out / ".lock").read_text() == ""  # released


def test_temporaries_left_by_a_killed_run_are_removed_at_the_next_start(tiny, tmp_path):
    out = tmp_path / "run"
    _run(tiny, out, max_steps=2, checkpoint_every=2)
    folders = [out / "checkpoints" / ".step-000004.k2j4ab_c.tmp", out / "checkpoints" / ".step-000000.deleting",
               out / ".controlnet.old-4242"]
    files = [out / ".log.jsonl.x81kq0zz.tmp", out / "validation" / ".step-000002.png.8fj2abcd.tmp"]
    for folder in folders:
        (folder / "controlnet").mkdir(parents=True)
        (folder / "controlnet" / "partial.safetensors").write_bytes(b"\0" * 10)
    for file in files:
        file.parent.mkdir(exist_ok=True)
        file.write_bytes(b"partial")
    assert _run(tiny, out, max_steps=4, checkpoint_every=2, resume="latest").step == 4
    assert not any(p.exists() for p in folders + files)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_out_that_is_a_folder_of_other_files_is_refused_and_left_as_it_was(tiny, tmp_path, capsys):
    from controlnet.cli import main

    base, data = tiny
    out = tmp_path / "home"
    (out / ".photos.deleting").mkdir(parents=True)
    (out / ".photos.deleting" / "a.jpg").write_bytes(b"photo")
    (out / ".thesis.tmp").write_text("draft")
    (out / ".bashrc.old-1").write_text("alias")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    argv = ["train", "--base", str(base), "--data", str(data), "--out", str(out), "--resolution", str(R),
            "--max-steps", "1", "-q", "--no-plot", "--no-tensorboard"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a training run folder" in err and str(out) in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_only_the_trainers_own_temporaries_are_removed_from_a_run_folder(tmp_path):
    from controlnet.train.folder import RUN_MARKER, remove_temporaries

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    ours = [out / ".log.jsonl.abcd_123.tmp", out / ".controlnet.old-77", out / "checkpoints" / ".step-000010.deleting"]
    theirs = [out / ".thesis.tmp", out / ".bashrc.old-1", out / ".photos.deleting", out / "checkpoints" / ".notes.tmp",
              out / "checkpoints" / ".step-10.deleting"]
    for path in ours + theirs:
        path.write_text("x")
    assert remove_temporaries(out) == []  # no marker: not provably a run folder, nothing removed
    (out / RUN_MARKER).write_text("")
    assert sorted(remove_temporaries(out)) == sorted(ours)
    assert all(p.exists() for p in theirs)


def test_export_original_and_init_are_checked_before_anything_is_written(tiny, tmp_path):
    from controlnet.testing import build_unet
    from controlnet.checkpoints import save_controlnet
    from controlnet.model import ControlNet

    out = tmp_path / "run"
    for bad in (tmp_path / "cn.txt", tmp_path):  # a suffix the original layout has no writer for; a folder
        with pytest.raises(UserError, match="--export-original"):
            _run(tiny, out, export_original=bad)
    sdxl = save_controlnet(ControlNet.from_unet(build_unet("sdxl", "tiny")), tmp_path / "sdxl-controlnet")
    with pytest.raises(UserError, match="sdxl"):  # another family than the base's
        _run(tiny, out, init=sdxl)
    assert not out.exists()  # nothing written: no lock, no cache, no log
    (tmp_path / "a-file").write_text("")
    for setting in ({"out": tmp_path / "a-file"}, {"cache_dir": tmp_path / "a-file"}):
        with pytest.raises(UserError, match="is a file; give a folder"):
            _config(tiny, setting.pop("out", out), **setting).check()


def test_the_scorer_table_holds_the_fill_score(tiny):
    from controlnet.data.fill import FillSample, fill_scorer
    from controlnet.train.scores import choose_scorer, scorers

    assert scorers()["fill"].make is fill_scorer and {"canny", "ssim"} <= set(scorers())
    assert choose_scorer("auto", None, {}, ["red circle with blue background"])[0] == "fill_iou"
    assert choose_scorer("auto", "canny", {}, ["a photo"])[0] == "edge_f1"
    assert choose_scorer("auto", None, {}, ["a photo"])[0] == "ssim"
    metric, score = choose_scorer("fill", None, {}, [])
    sample = FillSample(cx=16, cy=16, radius=8, circle="red", background="blue", size=R)
    assert metric == "fill_iou" and score(sample.target, sample.condition, sample.prompt, sample.target) > 0.9
    with pytest.raises(UserError, match="--score must be one of auto, canny, fill, segmentation, ssim"):
        _config(tiny, "unused", score="nope").check()


def test_optimizer_state_is_matched_to_parameters_by_name_not_by_order():
    import copy

    from controlnet.train.objective import make_adamw
    from controlnet.train.state import load_optimizer_state, optimizer_state_by_name

    g = torch.Generator().manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3, generator=g)), torch.nn.Parameter(torch.randn(2, 2, generator=g))
    first = make_adamw([{"params": [a, b], "lr": 0.1}])
    for _ in range(2):
        a.grad, b.grad = torch.randn(3, generator=g), torch.randn(2, 2, generator=g)
        first.step()
    saved = copy.deepcopy(optimizer_state_by_name(first, {"a": a, "b": b}))  # as if written and read back
    assert set(saved["state"]) == {"a", "b"} and saved["param_groups"][0]["params"] == ["a", "b"]
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    second = make_adamw([{"params": [b2, a2], "lr": 0.1}])  # the parameters registered in the other order
    load_optimizer_state(second, saved, {"a": a2, "b": b2}, Path("step-000002"))
    for p, q in ((a, a2), (b, b2)):
        assert all(torch.equal(first.state[p][k], second.state[q][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    a.grad, b.grad = torch.ones(3), torch.ones(2, 2)
    a2.grad, b2.grad = torch.ones(3), torch.ones(2, 2)
    first.step()
    second.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)
    with pytest.raises(UserError, match="does not fit"):
        load_optimizer_state(make_adamw([{"params": [a2], "lr": 0.1}]), saved, {"a": a2}, Path("step-000002"))
