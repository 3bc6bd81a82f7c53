"""Control-LoRA: files in Stability's layout (rank 128 and 256, tiny base) load strictly onto a base UNet; the
ControlNet equals one merged by hand (W + up @ down) and diffusers' ``ControlNetModel.load_lora_adapter``."""

from __future__ import annotations

import pytest
import torch

from controlnet.testing import build_unet, sdxl_added_cond_kwargs
from controlnet.checkpoints import diffusers_to_original
from controlnet.control_lora import control_lora_from_state_dict, is_control_lora, load_control_lora
from controlnet.errors import UserError
from controlnet.families import detect_family
from controlnet.model import ControlNet

# diffusers' Control-LoRA converter reads SD's layout: 2 layers per block, the released hint encoder.
SD1_TWO_LAYERS = dict(layers_per_block=2)
# What a Control-LoRA stores whole: the modules the base does not have, and every bias and norm.
WHOLE_MODULES = ("input_hint_block.", "zero_convs.", "middle_block_out.")


def control_lora_file(unet, rank: int, seed: int = 0, low_rank_biases_trained: bool = True) -> dict[str, torch.Tensor]:
    """A Control-LoRA state dict with the released key names and shapes for ``unet``: low-rank ``.up``
    (out, r[, 1, 1]) / ``.down`` (r, in[, kh, kw]) for every copied linear and conv weight, whole tensors for
    biases, norms, hint encoder and zero convs, and the marker key. Without ``low_rank_biases_trained`` the
    biases of the low-rank layers are the base's."""
    g = torch.Generator().manual_seed(seed)
    template = diffusers_to_original(ControlNet.from_unet(unet).state_dict())
    out: dict[str, torch.Tensor] = {"lora_controlnet": torch.tensor([])}
    low_rank = {k.rsplit(".", 1)[0] for k, v in template.items()
                if k.endswith(".weight") and v.ndim >= 2 and not k.startswith(WHOLE_MODULES)}
    for key, value in template.items():
        module, leaf = key.rsplit(".", 1)
        if leaf == "bias" and module in low_rank and not low_rank_biases_trained:
            out[key] = value.clone()
        elif module in low_rank and leaf == "weight":
            rows, cols = value.shape[0], value[0].numel()
            up_shape = (rows, rank, 1, 1) if value.ndim == 4 else (rows, rank)
            down_shape = (rank, *value.shape[1:]) if value.ndim == 4 else (rank, cols)
            out[module + ".up"] = torch.randn(up_shape, generator=g) * 0.01
            out[module + ".down"] = torch.randn(down_shape, generator=g) * 0.01
        else:
            out[key] = value + torch.randn(value.shape, generator=g) * 0.05
    return out


def make_inputs(unet, seed: int = 0) -> dict:
    """Latents, timesteps, context, a hint image (and SDXL's added conditions) for a batch of 2."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    added = sdxl_added_cond_kwargs(dict(cfg), 2, 64, 64, seed=seed) if cfg.addition_embed_type else None
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 700]),
            "encoder_hidden_states": torch.randn(2, 5, cfg.cross_attention_dim, generator=g),
            "hint": torch.rand(2, 3, 64, 64, generator=g), "added_cond_kwargs": added}


def residuals(cn: ControlNet, x: dict) -> list[torch.Tensor]:
    """The ControlNet's residuals, down then mid."""
    kwargs = cn(x["sample"], x["timestep"], x["encoder_hidden_states"], x["hint"],
                added_cond_kwargs=x["added_cond_kwargs"]).unet_kwargs()
    return [*kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"]]


def merged_by_hand(unet, file_sd: dict[str, torch.Tensor]) -> ControlNet:
    """The ControlNet the file describes, merged here: W_base + up @ down, whole tensors copied."""
    cn = ControlNet.from_unet(unet)
    native = cn.state_dict()
    original = diffusers_to_original(native)
    name_of = {orig: nat for nat, orig in zip(native, original)}
    with torch.no_grad():
        for key, value in file_sd.items():
            if key == "lora_controlnet" or key.endswith(".down"):
                continue
            if key.endswith(".up"):
                module = key[: -len(".up")]
                weight = native[name_of[module + ".weight"]]
                delta = value.flatten(1) @ file_sd[module + ".down"].flatten(1)
                weight += delta.reshape(weight.shape)
            else:
                native[name_of[key]].copy_(value)
    return cn.eval()


@pytest.mark.parametrize("rank", [128, 256])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_control_lora_equals_a_hand_merged_controlnet(family, rank, tmp_path):
    from safetensors.torch import save_file

    unet = build_unet(family, **(SD1_TWO_LAYERS if family == "sd1" else {}))
    file_sd = control_lora_file(unet, rank)
    assert is_control_lora(file_sd) and detect_family(file_sd) == "control-lora"
    save_file(file_sd, str(tmp_path / f"control-lora-canny-rank{rank}.safetensors"))
    ours = load_control_lora(tmp_path / f"control-lora-canny-rank{rank}.safetensors", unet)
    ref = merged_by_hand(unet, file_sd)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    assert max((ours_sd[k] - ref_sd[k]).abs().max().item() for k in ref_sd) <= 1e-6
    inputs = make_inputs(unet)
    with torch.no_grad():
        a, b = residuals(ours, inputs), residuals(ref, inputs)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) <= 1e-6
    assert a[-1].abs().max().item() > 0  # the zero convs came from the file, not zero


def test_control_lora_equals_diffusers_load_lora_adapter():
    """diffusers 0.42 keeps the base's biases in the low-rank layers where ComfyUI (and we) take the file's, so
    the file compared here carries the base's biases there."""
    pytest.importorskip("peft")
    from diffusers import ControlNetModel

    unet = build_unet("sd1", **SD1_TWO_LAYERS)
    file_sd = control_lora_file(unet, rank=128, seed=1, low_rank_biases_trained=False)
    ours = control_lora_from_state_dict(file_sd, unet).eval()
    theirs = ControlNetModel.from_unet(unet)
    theirs.load_lora_adapter(dict(file_sd), prefix=None)
    theirs.eval()
    inputs = make_inputs(unet, seed=2)
    with torch.no_grad():
        a = residuals(ours, inputs)
        b = theirs(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["hint"],
                   return_dict=False)
    worst = max((x - y).abs().max().item() for x, y in zip(a, (*b[0], b[1])))
    assert worst <= 1e-5


def test_control_lora_for_another_family_is_refused_in_one_line():
    file_sd = control_lora_file(build_unet("sdxl"), rank=8)
    with pytest.raises(UserError, match="Control-LoRA for sdxl .* but the base model is sd1") as err:
        control_lora_from_state_dict(file_sd, build_unet("sd1"))
    assert "\n" not in str(err.value)


def test_strict_loading():
    unet = build_unet("sd1")
    file_sd = control_lora_file(unet, rank=8)
    no_zero_conv = {k: v for k, v in file_sd.items() if not k.startswith("middle_block_out.")}
    with pytest.raises(UserError, match="missing keys .*middle_block_out.0"):
        control_lora_from_state_dict(no_zero_conv, unet)
    unpaired = {k: v for k, v in file_sd.items() if k != "input_blocks.1.0.in_layers.2.down"}
    with pytest.raises(UserError, match="no down factor"):
        control_lora_from_state_dict(unpaired, unet)
    wrong_rank = dict(file_sd, **{"input_blocks.1.0.in_layers.2.down": torch.zeros(4, 32, 3, 3)})
    with pytest.raises(UserError, match="does not make its weight"):
        control_lora_from_state_dict(wrong_rank, unet)
    nan = dict(file_sd, **{"zero_convs.0.0.bias": torch.full_like(file_sd["zero_convs.0.0.bias"], float("nan"))})
    with pytest.raises(UserError, match="zero_convs.0.0.bias holds NaN"):
        control_lora_from_state_dict(nan, unet)
    inf = dict(file_sd, **{"input_blocks.1.0.in_layers.2.up": file_sd["input_blocks.1.0.in_layers.2.up"] / 0})
    with pytest.raises(UserError, match="input_blocks.1.0.in_layers.2.up holds"):
        control_lora_from_state_dict(inf, unet)


def test_a_t2i_adapter_is_refused_where_a_control_lora_is_needed(tmp_path):
    from diffusers import T2IAdapter
    from safetensors.torch import save_file

    adapter = T2IAdapter(channels=[32, 64], num_res_blocks=2)
    save_file(adapter.state_dict(), str(tmp_path / "adapter.safetensors"))
    with pytest.raises(UserError, match="is a T2I-Adapter, but a Control-LoRA is needed"):
        load_control_lora(tmp_path / "adapter.safetensors", build_unet("sd1"))
