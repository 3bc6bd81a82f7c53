"""Training a Control-LoRA (``--architecture control-lora``): at initialisation it is the full copy (and adds
nothing to the base); exactly what Stability's layout stores trains; the saved file has the released keys and
shapes and loads back (``load_control_lora``, the pipeline) to the same residuals; training runs and resumes
exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from controlnet.control_lora import load_control_lora
from controlnet.control_lora_train import LowRankDelta, add_low_rank, control_lora_state_dict, save_control_lora
from controlnet.errors import UserError
from controlnet.model import ControlNet
from controlnet.testing import build_unet
from test_control_lora import control_lora_file, make_inputs, residuals
from test_train import _config, _run, tiny  # noqa: F401  (tiny: the module-scoped fixture)

RANK = 4


def _pair(family: str = "sd1", rank: int = RANK, seed: int = 0):
    """A base UNet, the full copy of its encoder and a Control-LoRA made from the same copy (same hint encoder)."""
    unet = build_unet(family)
    torch.manual_seed(seed)
    full = ControlNet.from_unet(unet).eval()
    torch.manual_seed(seed)
    return unet, full, add_low_rank(ControlNet.from_unet(unet), rank).eval()


def _perturb(cn: ControlNet, seed: int) -> None:
    """Every trainable tensor moved away from its initial value (deltas, zero convs, hint encoder, norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cn.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_at_initialisation_the_control_lora_is_the_full_copy_and_adds_nothing(family):
    unet, full, lora = _pair(family)
    full_sd = full.state_dict()
    merged = {name + ".weight": m.merged_weight() for name, m in lora.named_modules() if isinstance(m, LowRankDelta)}
    assert merged and all(not m.up.any() for m in lora.modules() if isinstance(m, LowRankDelta))
    for key, value in lora.state_dict().items():
        if key in full_sd:
            assert torch.equal(merged.get(key, value), full_sd[key]), key
    inputs = make_inputs(unet)
    with torch.no_grad():
        assert all(not r.any() for r in residuals(lora, inputs))  # zero convs at zero: the base exactly
        # with the same (non-zero) zero convs, the residuals are the full copy's bit for bit
        for a, b in zip(full.zero_convs(), lora.zero_convs()):
            torch.nn.init.normal_(a.weight)
            b.weight.copy_(a.weight)
        for x, y in zip(residuals(full, inputs), residuals(lora, inputs)):
            assert x.any() and torch.equal(x, y)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_exactly_what_the_released_layout_stores_trains(family):
    unet, full, lora = _pair(family, rank=8)
    released = control_lora_file(unet, rank=8)  # the released key names and shapes
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    frozen = {n for n, p in lora.named_parameters() if not p.requires_grad}
    low_rank = {name for name, m in lora.named_modules() if isinstance(m, LowRankDelta)}
    assert frozen == {name + ".weight" for name in low_rank}
    assert sum(p.numel() for p in trainable.values()) == sum(v.numel() for v in released.values())
    assert all(n.endswith((".up", ".down")) or p.ndim == 1 or n.startswith(
        ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block."))
        for n, p in trainable.items())
    ours = control_lora_state_dict(lora)
    assert ours.keys() == released.keys()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in released.items()}
    assert sum(p.numel() for p in trainable.values()) < sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_saved_control_lora_loads_back_to_the_same_residuals(family, tmp_path):
    unet, _, lora = _pair(family)
    _perturb(lora, seed=1)
    path = save_control_lora(lora, tmp_path / "controlnet")
    assert path.name == f"control-lora-rank{RANK}.safetensors"
    assert "lora_controlnet" in load_file(str(path))
    loaded = load_control_lora(path, unet)
    inputs = make_inputs(unet, seed=3)
    with torch.no_grad():
        a, b = residuals(lora, inputs), residuals(loaded, inputs)
    assert all(x.abs().max() > 0 for x in a)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) <= 1e-6


def test_a_layer_without_a_low_rank_place_and_a_lite_controlnet_are_refused():
    unet = build_unet("sd1")
    with pytest.raises(UserError, match="architecture 'lite'"):
        add_low_rank(ControlNet.from_unet(unet, architecture="lite"), RANK)
    cn = ControlNet.from_unet(unet)
    cn.time_embedding.extra = torch.nn.Embedding(3, 4)  # a 2-D weight that is neither linear nor conv
    with pytest.raises(UserError, match="no low-rank place for time_embedding.extra.weight"):
        add_low_rank(cn, RANK)


def test_rank_and_control_lora_options_are_checked(tiny, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match="--rank is for --architecture control-lora"):
        _config(tiny, tmp_path / "a", rank=4).check()
    with pytest.raises(UserError, match="--rank must be >= 1"):
        _config(tiny, tmp_path / "a", architecture="control-lora", rank=0).check()
    with pytest.raises(UserError, match="--export-original.*Control-LoRA"):
        _config(tiny, tmp_path / "a", architecture="control-lora", export_original="x.pth").check()


def test_training_saves_a_control_lora_the_pipeline_loads_and_resumes_exactly(tiny, tmp_path):  # noqa: F811
    """Four steps in one run, and two plus a resumed two, end with the same file bit for bit; the base weights
    under the deltas never move; the file the run saves is what the pipeline loads for ``--controlnet``."""
    from controlnet.pipeline import Pipeline

    settings = dict(architecture="control-lora", rank=RANK, checkpoint_every=2, max_steps=4)
    whole = _run(tiny, tmp_path / "whole", **settings)
    _run(tiny, tmp_path / "resumed", **{**settings, "max_steps": 2})
    resumed = _run(tiny, tmp_path / "resumed", **settings, resume="latest")
    assert len(whole.losses) == 4 and resumed.step == 4 and resumed.losses == whole.losses[2:]
    name = f"control-lora-rank{RANK}.safetensors"
    a, b = load_file(str(whole.controlnet / name)), load_file(str(resumed.controlnet / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.any() for k, v in a.items() if k.endswith(".up"))  # the deltas trained
    in_checkpoint = load_file(str(whole.checkpoints[-1] / name))  # the last checkpoint's file: the same
    assert in_checkpoint.keys() == a.keys() and all(torch.equal(a[k], in_checkpoint[k]) for k in a)

    pipe = Pipeline.from_pretrained(tiny[0], dtype=torch.float32)
    checkpoint = load_file(str(whole.checkpoints[-1] / "controlnet" / "diffusion_pytorch_model.safetensors"))
    base = ControlNet.from_unet(pipe.unet).state_dict()
    frozen = [k.removesuffix(".up") + ".weight" for k in checkpoint if k.endswith(".up")]
    assert frozen and all(torch.equal(checkpoint[k], base[k]) for k in frozen)

    loaded = pipe.load_controlnet(whole.controlnet / name)
    trained = add_low_rank(ControlNet.from_unet(pipe.unet), RANK)
    trained.load_state_dict(checkpoint)
    inputs = make_inputs(pipe.unet)
    with torch.no_grad():
        x, y = residuals(trained.eval(), inputs), residuals(loaded, inputs)
    assert max((p - q).abs().max().item() for p, q in zip(x, y)) <= 1e-6
