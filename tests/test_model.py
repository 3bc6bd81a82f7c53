"""The ControlNet model on tiny seeded SD1.x / SD2.x / SDXL UNets: zero-init identity, gradients, training step,
the lite ablation, parameter order, config validation."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import pytest
import torch

from controlnet.testing import FAMILIES, SD15_UNET, SD21_UNET, SDXL_UNET, build_unet, sdxl_added_cond_kwargs
from controlnet.errors import UserError
from controlnet.model import MODEL_CLASSES, ControlNet, ControlNetLite, UNetControlNet, build_controlnet
from controlnet.model_config import ARCHITECTURES, MAX_CHANNELS, ControlNetConfig
from controlnet.residuals import original_guess_mode_scales

LATENT = 8  # latent side; the hint is 8x larger (three stride-2 convs, as SD's VAE)


def make_inputs(unet, seed: int = 0, batch: int = 2) -> dict:
    """Random latents, timesteps, context, hint (and SDXL's added conditions) for a tiny UNet."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, LATENT, LATENT, generator=g),
        "timestep": torch.tensor([10, 700])[:batch],
        "encoder_hidden_states": torch.randn(batch, 5, cfg.cross_attention_dim, generator=g),
        "hint": torch.rand(batch, 3, 8 * LATENT, 8 * LATENT, generator=g),
        "added_cond_kwargs": None,
    }
    if cfg.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = sdxl_added_cond_kwargs(dict(cfg), batch, 8 * LATENT, 8 * LATENT, seed=seed)
    return inputs


def run_unet(unet, inputs: dict, residuals=None) -> torch.Tensor:
    kwargs = residuals.unet_kwargs() if residuals is not None else {}
    return unet(
        inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
        added_cond_kwargs=inputs["added_cond_kwargs"], **kwargs,
    ).sample


def run_controlnet(cn: ControlNet, inputs: dict, **kwargs):
    return cn(
        inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["hint"],
        added_cond_kwargs=inputs["added_cond_kwargs"], **kwargs,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_identity(family):
    """After from_unet the augmented UNet's output is the base's, bit for bit (the paper's Eq. 2 at init)."""
    unet = build_unet(family, seed=1).requires_grad_(False)
    cn = ControlNet.from_unet(unet)
    inputs = make_inputs(unet)
    with torch.no_grad():
        base = run_unet(unet, inputs)
        out = run_controlnet(cn, inputs)
        controlled = run_unet(unet, inputs, out)
    assert torch.equal(base, controlled)
    assert len(out.down) + 1 == len(out) == cn.num_residuals == cn.config.num_residuals
    assert out.locations() == [("down", i) for i in range(len(out.down))] + [("mid", 0)]
    for conv in [*cn.zero_convs(), cn.controlnet_cond_embedding.conv_out]:
        assert not conv.weight.any() and not conv.bias.any()
    # The copy holds the base's weights in tensors of its own.
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        ours, theirs = getattr(cn, name).state_dict(), getattr(unet, name).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}.{key}"
            assert ours[key].data_ptr() != theirs[key].data_ptr(), f"{name}.{key} shares memory with the base"
    if family == "sdxl":
        assert torch.equal(cn.add_embedding.linear_1.weight, unet.add_embedding.linear_1.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_convs_get_gradients_on_first_backward(family):
    """Zero convs start at zero but their inputs are not zero, so the first backward gives them gradients."""
    unet = build_unet(family, seed=2).requires_grad_(False)
    cn = ControlNet.from_unet(unet)
    inputs = make_inputs(unet, seed=3)
    target = torch.randn_like(inputs["sample"])
    loss = torch.nn.functional.mse_loss(run_unet(unet, inputs, run_controlnet(cn, inputs)), target)
    loss.backward()
    for i, conv in enumerate(cn.zero_convs()):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, f"zero conv {i} weight"
        assert conv.bias.grad is not None and conv.bias.grad.abs().sum() > 0, f"zero conv {i} bias"
    assert all(p.grad is None for p in unet.parameters())


def test_optimizer_steps_change_the_copy_and_never_the_locked_unet():
    unet = build_unet("sd1", seed=4).requires_grad_(False)
    locked = {k: v.clone() for k, v in unet.state_dict().items()}
    cn = ControlNet.from_unet(unet).train()
    copy_before = {k: v.clone() for k, v in cn.down_blocks.state_dict().items()}
    opt = torch.optim.AdamW(cn.parameters(), lr=1e-3, weight_decay=0.0)
    inputs = make_inputs(unet, seed=5)
    target = torch.randn_like(inputs["sample"])

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.mse_loss(run_unet(unet, inputs, run_controlnet(cn, inputs)), target).backward()
        opt.step()

    step()  # first step: only the zero convs have gradients (everything behind them is multiplied by 0)
    assert all(conv.weight.any() for conv in cn.zero_convs())
    step()  # second step: gradients now reach the trainable copy through the non-zero zero convs
    changed = [k for k, v in cn.down_blocks.state_dict().items() if not torch.equal(v, copy_before[k])]
    assert len(changed) > 0.9 * len(copy_before), f"only {len(changed)}/{len(copy_before)} copy tensors changed"
    for key, value in unet.state_dict().items():
        assert torch.equal(value, locked[key]), f"locked UNet weight {key} changed"
    assert all(p.grad is None for p in unet.parameters())


def test_guess_mode_scales_match_original():
    """0.825**(N-1-i) (lllyasviel/ControlNet gradio demos); the fixture records the original's 7 values."""
    import json

    from test_fixtures import FIXTURES  # the original implementation's numbers

    expected = json.loads((FIXTURES / "tiny_sd15" / "original_config.json").read_text())["guess_mode_scales"]
    assert original_guess_mode_scales(7) == pytest.approx(expected, abs=1e-15)
    scales = original_guess_mode_scales(13, strength=0.5)
    assert scales[-1] == 0.5 and scales[0] == pytest.approx(0.5 * 0.825**12)


def test_conditioning_scale_per_residual_and_global_pooling():
    unet = build_unet("sd1", seed=6)
    cn = ControlNet.from_unet(unet)
    torch.manual_seed(0)
    for conv in cn.zero_convs():
        torch.nn.init.normal_(conv.weight, std=0.1)
    inputs = make_inputs(unet, seed=7)
    scales = [0.1 * (i + 1) for i in range(cn.num_residuals)]
    with torch.no_grad():
        plain = run_controlnet(cn, inputs)
        scaled = run_controlnet(cn, inputs, conditioning_scale=scales)
        pooled_cn = copy.deepcopy(cn)
        pooled_cn.config = dataclasses.replace(cn.config, global_pool_conditions=True)
        pooled = run_controlnet(pooled_cn, inputs)
        hint_emb = cn.encode_hint(inputs["hint"])
        cached = cn(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], hint_embedding=hint_emb)
    for r, s, p in zip([*plain.down, plain.mid], scales, [*scaled.down, scaled.mid]):
        assert torch.equal(r * s, p)
    for r, p in zip([*plain.down, plain.mid], [*pooled.down, pooled.mid]):
        assert p.shape == (*r.shape[:2], 1, 1)
        assert torch.equal(r.mean(dim=(2, 3), keepdim=True), p)
    for a, b in zip([*plain.down, plain.mid], [*cached.down, cached.mid]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="residuals"):
        run_controlnet(cn, inputs, conditioning_scale=[1.0, 2.0])


@pytest.mark.parametrize(
    ("hint_encoder", "vae_scale_factor", "channels"),
    [("released", 8, (16, 32, 96, 256)), ("released", 4, (16, 32, 96)), ("paper", 8, (16, 32, 64, 128)), ("paper", 4, (16, 32, 64, 128))],
)
def test_hint_encoder_downsamples_like_the_vae(hint_encoder, vae_scale_factor, channels):
    unet = build_unet("sd1", seed=8)
    cn = ControlNet.from_unet(unet, hint_encoder=hint_encoder, vae_scale_factor=vae_scale_factor)
    assert cn.config.conditioning_embedding_out_channels == channels
    assert cn.config.vae_scale_factor == vae_scale_factor
    hint = torch.rand(1, 3, 64, 64)
    emb = cn.encode_hint(hint)
    assert emb.shape == (1, unet.config.block_out_channels[0], 64 // vae_scale_factor, 64 // vae_scale_factor)
    assert not emb.any()  # its last conv is a zero conv: the model starts as the base
    if hint_encoder == "paper":
        convs = cn.controlnet_cond_embedding.convs
        assert [c.kernel_size for c in convs] == [(4, 4)] * 4
        assert sum(c.stride == (2, 2) for c in convs) == vae_scale_factor.bit_length() - 1
        assert all(c.weight.std() > 0 for c in convs)  # Gaussian-initialised, trained jointly


def test_full_sd15_parameter_count():
    """from_unet on the full SD1.5 config has the releases' 361.28M parameters (built on the meta device)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        cn = ControlNet.from_unet(unet)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(cn) == 361_279_120  # original_controlnet_keys.json "sd15": 361.28M
    # The released control_sd15_*.pth (original_controlnet_keys.json): input_hint_block.* 1.09M parameters,
    # zero_convs.* + middle_block_out.* 11.5M.
    assert round(count(cn.controlnet_cond_embedding) / 1e6, 2) == 1.09
    assert round(sum(count(c) for c in cn.zero_convs()) / 1e6, 1) == 11.5
    assert cn.num_residuals == 13


@pytest.mark.parametrize("family", FAMILIES)
def test_lite_starts_as_the_base_and_ignores_time_and_prompt(family):
    """ControlNet-lite (the paper's Fig. 8c ablation): residuals of the shapes the base expects, zero at init
    (bit-identical output), one conv per skip instead of the copy, and no dependence on the timestep or prompt."""
    unet = build_unet(family, seed=1).requires_grad_(False)
    lite, full = ControlNet.from_unet(unet, architecture="lite"), ControlNet.from_unet(unet)
    assert type(lite) is ControlNetLite and type(full) is ControlNet
    assert isinstance(lite, UNetControlNet) and isinstance(full, UNetControlNet)
    inputs = make_inputs(unet)
    with torch.no_grad():
        out = run_controlnet(lite, inputs)
        assert torch.equal(run_unet(unet, inputs, out), run_unet(unet, inputs))
        ref = run_controlnet(full, inputs)
    assert out.locations() == ref.locations()
    assert [r.shape for r in out] == [r.shape for r in ref]
    assert len(lite.lite_blocks) == lite.num_residuals - 1  # one conv per skip after conv_in, one for the mid
    assert not hasattr(lite, "down_blocks") and not hasattr(lite, "time_embedding")
    assert torch.equal(lite.conv_in.weight, unet.conv_in.weight)
    assert sum(p.numel() for p in lite.parameters()) < sum(p.numel() for p in full.parameters())

    torch.manual_seed(0)
    for conv in lite.zero_convs():  # move the zero convs so the residuals are not all zero
        torch.nn.init.normal_(conv.weight, std=0.1)
    other = {**inputs, "timestep": inputs["timestep"] * 0 + 999,
             "encoder_hidden_states": torch.randn_like(inputs["encoder_hidden_states"])}
    with torch.no_grad():
        a, b = run_controlnet(lite, inputs), run_controlnet(lite, other)
    assert a.mid.abs().sum() > 0
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_lite_round_trips_in_the_native_layout_and_refuses_the_original(tmp_path):
    from safetensors.torch import load_file

    from controlnet.checkpoints import load_controlnet, original_state_dict, save_diffusers_folder
    from controlnet.errors import UserError

    unet = build_unet("sd1", seed=1)
    lite = ControlNet.from_unet(unet, architecture="lite")
    for p in lite.parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_diffusers_folder(lite, tmp_path / "lite")
    back = load_controlnet(tmp_path / "lite")
    assert back.config.architecture == "lite" and back.state_dict().keys() == lite.state_dict().keys()
    assert lite.config.to_dict()["_class_name"] == "ControlNetLiteModel"
    assert "architecture" not in ControlNet.from_unet(unet).config.to_dict()  # the paper's files stay as they were
    assert all(torch.equal(back.state_dict()[k], v) for k, v in lite.state_dict().items())
    with pytest.raises(UserError, match="original layout has no place for a 'lite'"):
        original_state_dict(lite)
    weights = load_file(tmp_path / "lite" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match="ControlNet-lite.*config.json"):
        from controlnet.checkpoints import controlnet_from_state_dict

        controlnet_from_state_dict(weights)
    with pytest.raises(UserError, match="architecture must be one of"):
        dataclasses.replace(lite.config, architecture="tiny")


def test_architecture_names_build_their_classes():
    """build_controlnet / from_unet pick the class from the config's architecture; each class refuses the other's."""
    unet = build_unet("sd1", seed=1)
    assert tuple(MODEL_CLASSES) == ARCHITECTURES
    for name, cls in MODEL_CLASSES.items():
        config = ControlNet.from_unet(unet, architecture=name).config
        assert config.architecture == name and type(build_controlnet(config)) is cls
        assert type(cls.from_unet(unet)) is cls  # the class's own architecture by default
    # Both run the shared forward (x + E(c) in, zero convs out); only their encoders differ.
    assert ControlNet.forward is ControlNetLite.forward is UNetControlNet.forward
    copy_config = ControlNet.from_unet(unet).config
    with pytest.raises(ValueError, match="ControlNetLite builds architecture 'lite'.*build_controlnet"):
        ControlNetLite(copy_config)
    with pytest.raises(ValueError, match="ControlNet builds architecture 'copy'"):
        ControlNet(dataclasses.replace(copy_config, architecture="lite"))


PARAMETER_ORDER = Path(__file__).resolve().parent / "fixtures" / "parameter_order.json"


def test_parameter_names_and_order_are_those_of_the_saved_checkpoints():
    """Checkpoints and training state of every earlier version name and order the parameters like this (recorded
    in tests/fixtures/parameter_order.json from the first releases): the tiny models name by name, the full-size
    configs by the sha256 of their names in order."""
    recorded = json.loads(PARAMETER_ORDER.read_text())
    for family in FAMILIES:
        unet = build_unet(family, seed=0)
        for architecture in ARCHITECTURES:
            names = [n for n, _ in ControlNet.from_unet(unet, architecture=architecture).named_parameters()]
            assert names == recorded["names"][f"{family}/{architecture}"], f"{family}/{architecture}"
    for family, config in (("sd1", SD15_UNET), ("sd2", SD21_UNET), ("sdxl", SDXL_UNET)):
        with torch.device("meta"):
            names = [n for n, _ in ControlNet(ControlNetConfig.from_unet_config(config)).named_parameters()]
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
        assert digest == recorded["sha256_of_names"][f"{family}-full/copy"], family


# --------------------------------------------------------------------------------------------- config validation

# (field, bad value, what the one-line message must say): every kind of mistake a config.json can make.
BAD_CONFIG_VALUES = [
    ("block_out_channels", [32, 0], r"block_out_channels must be a list of 2 entries .*1\.\.16384, got \[32, 0\]"),
    ("block_out_channels", [32, 10**9], r"block_out_channels .*got \[32, 1000000000\]"),
    ("block_out_channels", [32, 64, 64], r"block_out_channels must be a list of 2 entries"),
    ("block_out_channels", "32,64", r"block_out_channels .*got '32,64'"),
    ("block_out_channels", [32, "64"], r"block_out_channels .*got \[32, '64'\]"),
    ("block_out_channels", [32.0, 64.0], r"block_out_channels .*got \[32.0, 64.0\]"),
    ("in_channels", 0, r"in_channels must be an integer in 1\.\.16384, got 0"),
    ("in_channels", "4", r"in_channels must be an integer .*got '4'"),
    ("in_channels", True, r"in_channels must be an integer .*got True"),
    ("conditioning_channels", -3, r"conditioning_channels .*got -3"),
    ("layers_per_block", 10**6, r"layers_per_block must be an integer in 1\.\.64, got 1000000"),
    ("cross_attention_dim", None, r"cross_attention_dim .*got None"),
    ("cross_attention_dim", [32, 32], r"cross_attention_dim .*got \[32, 32\]"),
    ("down_block_types", ["CrossAttnDownBlock2D", "SpaceBlock"], r"down_block_types .*CrossAttnDownBlock2D, DownBlock2D.*SpaceBlock"),
    ("down_block_types", [], r"down_block_types must be a list of 1\.\.8 entries"),
    ("down_block_types", "DownBlock2D", r"down_block_types .*got 'DownBlock2D'"),
    ("mid_block_type", "UNetMidBlockFancy", r"mid_block_type must be one of UNetMidBlock2DCrossAttn, UNetMidBlock2D"),
    ("act_fn", "tanh", r"act_fn must be one of silu, swish, mish, gelu, relu, got 'tanh'"),
    ("norm_num_groups", 0, r"norm_num_groups .*got 0"),
    ("norm_num_groups", 7, r"norm_num_groups 7 must divide every block_out_channels entry \[32, 64\]"),
    ("norm_eps", -1e-5, r"norm_eps must be a finite number > 0, got -1e-05"),
    ("norm_eps", float("nan"), r"norm_eps .*got nan"),
    ("mid_block_scale_factor", "1", r"mid_block_scale_factor .*got '1'"),
    ("freq_shift", 5, r"freq_shift must be a number in 0\.\.1, got 5"),
    ("freq_shift", 10**400, r"freq_shift must be a number in 0\.\.1, got 1000000"),
    ("mid_block_scale_factor", float("inf"), r"mid_block_scale_factor must be a finite number > 0, got inf"),
    ("flip_sin_to_cos", "yes", r"flip_sin_to_cos must be true or false, got 'yes'"),
    ("downsample_padding", 7, r"downsample_padding must be an integer in 0\.\.1"),
    ("attention_head_dim", [2, 4, 8], r"attention_head_dim must be .*a list of 2 of them"),
    ("attention_head_dim", 0, r"attention_head_dim .*got 0"),
    ("attention_head_dim", 48, r"block 0 has 48 attention heads but only 32 channels"),
    ("num_attention_heads", [1, 0], r"num_attention_heads must be null or .*got \[1, 0\]"),
    ("transformer_layers_per_block", [1, 1000], r"transformer_layers_per_block .*got \[1, 1000\]"),
    ("only_cross_attention", [True], r"only_cross_attention .*got \[True\]"),
    ("use_linear_projection", 1, r"use_linear_projection must be true or false, got 1"),
    ("upcast_attention", None, r"upcast_attention .*got None"),
    ("class_embed_type", "simple_projection", r"class_embed_type must be one of null, timestep, projection"),
    ("class_embed_type", "projection", r"class_embed_type 'projection' needs projection_class_embeddings_input_dim"),
    ("addition_embed_type", "text", r"addition_embed_type must be one of null, text_time, got 'text'"),
    ("addition_embed_type", "text_time", r"addition_embed_type 'text_time' needs addition_time_embed_dim"),
    ("addition_time_embed_dim", 0, r"addition_time_embed_dim must be null or an integer"),
    ("num_class_embeds", 10**12, r"num_class_embeds must be null or an integer in 1\.\.100000"),
    ("projection_class_embeddings_input_dim", MAX_CHANNELS + 1, r"projection_class_embeddings_input_dim .*16385"),
    ("resnet_time_scale_shift", "spatial", r"resnet_time_scale_shift must be one of default, scale_shift"),
    ("controlnet_conditioning_channel_order", "RGB", r"controlnet_conditioning_channel_order must be one of rgb, bgr"),
    ("conditioning_embedding_out_channels", [16, 0], r"conditioning_embedding_out_channels .*got \[16, 0\]"),
    ("conditioning_embedding_out_channels", [16] * 20, r"conditioning_embedding_out_channels must be a list of 1\.\.8"),
    ("global_pool_conditions", "false", r"global_pool_conditions must be true or false, got 'false'"),
    ("hint_encoder", "learned", r"hint_encoder must be one of released, paper, got 'learned'"),
    ("vae_scale_factor", 12, r"vae_scale_factor must be a power of two in 1\.\.64, got 12"),
    ("vae_scale_factor", 2**40, r"vae_scale_factor .*got 1099511627776"),
    ("architecture", "tiny", r"architecture must be one of copy, lite, got 'tiny'"),
]


@functools.cache
def _tiny_config() -> ControlNetConfig:
    return ControlNet.from_unet(build_unet("sd1")).config


def tiny_config() -> dict:
    """A good config.json of a tiny SD1.x ControlNet (block_out_channels [32, 64]), as a fresh dict."""
    return _tiny_config().to_dict()


@pytest.mark.parametrize(("field", "value", "message"), BAD_CONFIG_VALUES, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_CONFIG_VALUES])
def test_bad_config_values_are_refused_in_one_line(field, value, message):
    with pytest.raises(UserError, match=r"^invalid ControlNet config: " + message) as err:
        ControlNetConfig.from_dict({**tiny_config(), field: value})
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_every_config_field_is_checked():
    """Each field has a bad value in the table above (so each is checked); the good configs of every family pass."""
    fields = {f.name for f in dataclasses.fields(ControlNetConfig)}
    assert {f for f, _, _ in BAD_CONFIG_VALUES} == fields
    for config in (SD15_UNET, SD21_UNET, SDXL_UNET):
        ControlNetConfig.from_unet_config(config).check()
    for family in FAMILIES:
        cfg = ControlNet.from_unet(build_unet(family)).config
        assert ControlNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_paper_hint_encoder_needs_enough_convs_for_the_vae():
    with pytest.raises(UserError, match=r"the paper's hint encoder has 4 convs .*cannot downsample 32x"):
        ControlNet.from_unet(build_unet("sd1"), hint_encoder="paper", vae_scale_factor=32)
    with pytest.raises(UserError, match="vae_scale_factor must be a power of two"):
        ControlNet.from_unet(build_unet("sd1"), vae_scale_factor=6)


def test_config_checks_run_without_torch():
    """The config module imports no torch, so a config can be checked before any model library loads."""
    import subprocess
    import sys

    code = ("import sys, controlnet.model_config as m; m.ControlNetConfig(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
