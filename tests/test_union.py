"""Union / ProMax ControlNets: agreement with diffusers' ControlNetUnionModel on tiny seeded SDXL-like models
(one and several conditions), xinsir's released key names loading strictly, and the control types."""

from __future__ import annotations

import inspect

import pytest
import torch

from controlnet.testing import build_unet, sdxl_added_cond_kwargs, trained_like
from controlnet.errors import UserError
from controlnet.union import CONTROL_TYPES, UnionControlNet, load_union, union_from_state_dict

diffusers = pytest.importorskip("diffusers")

LATENT = 8
HINT_CHANNELS = (8, 16, 16, 32)  # a tiny hint encoder with the released layout (three stride-2 convs)
# A tiny SDXL-like UNet with SDXL's 32 norm groups, whole 64-channel heads, and time ids embedded with 256
# channels each, so a lone .safetensors file's config can be inferred from its shapes as a released one's.
SDXL64 = dict(block_out_channels=(64, 128), attention_head_dim=(1, 2), norm_num_groups=32,
              addition_time_embed_dim=256, projection_class_embeddings_input_dim=32 + 6 * 256)


def oracle(num_control_type: int, seed: int = 0, heads: int = 4, **overrides):
    """A diffusers ControlNetUnionModel the shape of a tiny SDXL UNet, every weight random (zero layers too)."""
    unet = build_unet("sdxl", **overrides)
    names = set(inspect.signature(diffusers.ControlNetUnionModel.__init__).parameters)
    c0 = unet.config.block_out_channels[0]
    torch.manual_seed(seed)
    model = diffusers.ControlNetUnionModel(
        **{k: v for k, v in unet.config.items() if k in names},
        conditioning_embedding_out_channels=HINT_CHANNELS, num_control_type=num_control_type,
        num_trans_channel=c0, num_proj_channel=c0, num_trans_head=heads)
    return unet, trained_like(model, seed + 1)


def inputs(unet, conditions: int, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    return {
        "sample": torch.randn(2, 4, LATENT, LATENT, generator=g),
        "timestep": torch.tensor([20, 600]),
        "encoder_hidden_states": torch.randn(2, 5, cfg.cross_attention_dim, generator=g),
        "hints": [torch.rand(2, 3, 8 * LATENT, 8 * LATENT, generator=g) for _ in range(conditions)],
        "added_cond_kwargs": sdxl_added_cond_kwargs(dict(cfg), 2, 8 * LATENT, 8 * LATENT, seed=seed),
    }


def run_oracle(model, x: dict, types: list[int], scales: list[float]):
    control_type = torch.zeros(2, model.config.num_control_type)
    control_type[:, types] = 1
    out = model(x["sample"], x["timestep"], x["encoder_hidden_states"], controlnet_cond=x["hints"],
                control_type=control_type, control_type_idx=types, conditioning_scale=scales,
                added_cond_kwargs=x["added_cond_kwargs"], return_dict=False)
    return [*out[0], out[1]]


def run_ours(model: UnionControlNet, x: dict, types, scales):
    out = model(x["sample"], x["timestep"], x["encoder_hidden_states"], x["hints"], control_type=types,
                condition_scale=scales, added_cond_kwargs=x["added_cond_kwargs"]).unet_kwargs()
    return [*out["down_block_additional_residuals"], out["mid_block_additional_residual"]]


def max_error(a, b) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("num_control_type", [6, 8])  # Union, ProMax
@pytest.mark.parametrize("types,scales", [([1], [0.8]), ([0, 3], [0.7, 1.2]), ([4, 1, 5], [1.0, 0.5, 1.5])])
def test_residuals_match_diffusers(num_control_type, types, scales):
    unet, ref = oracle(num_control_type)
    ours = union_from_state_dict(ref.state_dict(), dict(ref.config)).eval()
    assert ours.union_config.num_control_type == num_control_type and ours.union_config.num_trans_head == 4
    x = inputs(unet, len(types))
    with torch.no_grad():
        expected = run_oracle(ref, x, types, scales)
        got = run_ours(ours, x, types, scales)
    assert max_error(got, expected) <= 1e-5
    assert expected[-1].abs().max().item() > 1e-3  # the comparison sees non-zero residuals


def test_a_released_file_loads_strictly_and_config_comes_from_shapes(tmp_path):
    from safetensors.torch import save_file

    unet, ref = oracle(8, seed=5, heads=8, **SDXL64)  # shapes alone: the released head count
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "transformer_layes.0.attn.in_proj_weight" in sd and "task_embedding" in sd  # xinsir's names
    save_file(sd, str(tmp_path / "diffusion_pytorch_model_promax.safetensors"))
    ours = load_union(tmp_path / "diffusion_pytorch_model_promax.safetensors")
    x = inputs(unet, 2)
    with torch.no_grad():
        assert max_error(run_ours(ours, x, ["tile", "repaint"], [1.0, 0.6]), run_oracle(ref, x, [6, 7], [1.0, 0.6])) <= 1e-5
    with pytest.raises(UserError, match="missing keys .*spatial_ch_projs.bias"):
        union_from_state_dict({k: v for k, v in sd.items() if k != "spatial_ch_projs.bias"})


def test_folders_round_trip(tmp_path):
    unet, ref = oracle(6, seed=7)
    ref.save_pretrained(tmp_path / "theirs")
    ours = load_union(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.ControlNetUnionModel.from_pretrained(tmp_path / "ours").eval()
    x = inputs(unet, 2)
    with torch.no_grad():
        assert max_error(run_oracle(back, x, [2, 3], [1.0, 1.0]), run_oracle(ref, x, [2, 3], [1.0, 1.0])) == 0.0
        assert max_error(run_ours(ours, x, [2, 3], [1.0, 1.0]), run_oracle(ref, x, [2, 3], [1.0, 1.0])) <= 1e-5


def test_control_types_and_refusals():
    _, ref = oracle(6)
    ours = union_from_state_dict(ref.state_dict(), dict(ref.config))
    assert ours.control_type_index("canny") == CONTROL_TYPES["mlsd"] == 3
    with pytest.raises(UserError, match="unknown control type 'tile' .*6 types"):
        ours.control_type_index("tile")  # ProMax only
    with pytest.raises(UserError, match="is a ControlNet \\(diffusers layout\\), but a Union/ProMax ControlNet is needed"):
        union_from_state_dict({k: v for k, v in ref.state_dict().items()
                               if not k.startswith(("task_embedding", "transformer_layes", "spatial", "control_add"))})


def test_one_condition_strength_scales_residuals_several_scale_inputs():
    unet, ref = oracle(6, seed=9)
    ours = union_from_state_dict(ref.state_dict(), dict(ref.config)).eval()
    x = inputs(unet, 1)
    with torch.no_grad():
        full = run_ours(ours, x, ["depth"], [1.0])
        half = run_ours(ours, x, ["depth"], [0.5])
        assert max_error(half, [r * 0.5 for r in full]) <= 1e-6
        y = dict(x, hints=x["hints"] * 2)
        one = run_ours(ours, y, ["depth", "depth"], [1.0, 1.0])
        scaled = run_ours(ours, y, ["depth", "depth"], [0.5, 0.5])
    assert max_error(scaled, [r * 0.5 for r in one]) > 1e-4  # the fused input is scaled, not the residuals


def test_hint_embeddings_computed_once_give_the_same_residuals():
    unet, ref = oracle(8, seed=11)
    ours = union_from_state_dict(ref.state_dict(), dict(ref.config)).eval()
    x = inputs(unet, 2)
    with torch.no_grad():
        from_images = run_ours(ours, x, ["depth", "canny"], [0.9, 0.4])
        embeddings = [ours.encode_hint(h) for h in x["hints"]]
        out = ours(x["sample"], x["timestep"], x["encoder_hidden_states"], hint_embedding=embeddings,
                   control_type=["depth", "canny"], condition_scale=[0.9, 0.4],
                   added_cond_kwargs=x["added_cond_kwargs"]).unet_kwargs()
    assert max_error([*out["down_block_additional_residuals"], out["mid_block_additional_residual"]], from_images) == 0.0
    with pytest.raises(UserError, match="2 conditions need as many control types and strengths"):
        ours(x["sample"], x["timestep"], x["encoder_hidden_states"], x["hints"], control_type=["depth"],
             added_cond_kwargs=x["added_cond_kwargs"])
