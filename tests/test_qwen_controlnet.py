"""Qwen-Image ControlNets: initialisation, agreement with diffusers, the released layout, refusals.

diffusers' QwenImageControlNetModel is the oracle: same weights, same inputs, residuals within 1e-5, and the locked
QwenImageTransformer2DModel's output with our residuals equal to its output with diffusers'. The tiny base is
diffusers' own tests/pipelines/qwenimage/test_qwenimage_controlnet.py one (2-3 heads of 16, 16-wide text, rotary
axes (8, 4, 4)), with 5 blocks so that the placement of 2 residuals matters.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel, QwenImageControlNetModel, QwenImageTransformer2DModel
from safetensors.torch import save_file

from controlnet.errors import UserError
from controlnet.residuals import Residuals
from controlnet.testing import trained_like
from controlnet.transformer_controlnet import (FluxControlNet, QwenImageControlNet, QwenImageControlNetConfig,
                                               pack_latents, residual_index, transformer_kwargs)
from controlnet.transformer_formats import (check_fits, load_transformer_controlnet, save_transformer_controlnet,
                                            transformer_controlnet_from_state_dict)

TOL = 1e-5
QWEN_BASE = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=5, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
FLUX_BASE = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8])
H, W = 4, 6  # packed token grid
TEXT = 7
# InstantX's inpainting ControlNet: masked-image latents and the mask (16 + 1 channels), packed 2x2: 4 more features.
INPAINT_EXTRA = 4


def qwen_base(seed: int = 0, **overrides) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**{**QWEN_BASE, **overrides}).eval()


def flux_base(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**FLUX_BASE).eval()


def qwen_inputs(base: QwenImageTransformer2DModel, seed: int = 1) -> dict:
    """Two samples; the second one's text is padded after 4 tokens (masked)."""
    g = torch.Generator().manual_seed(seed)
    c = base.config
    mask = torch.ones(2, TEXT, dtype=torch.long)
    mask[1, 4:] = 0
    return dict(hidden_states=torch.randn(2, H * W, c.in_channels, generator=g), timestep=torch.tensor([0.7, 0.3]),
                encoder_hidden_states=torch.randn(2, TEXT, c.joint_attention_dim, generator=g),
                encoder_hidden_states_mask=mask, img_shapes=[(1, H, W)] * 2)


def base_output(base: QwenImageTransformer2DModel, inputs: dict, **extra) -> torch.Tensor:
    i = inputs
    return base(i["hidden_states"], i["encoder_hidden_states"], i["encoder_hidden_states_mask"], i["timestep"],
                i["img_shapes"], **extra).sample


def diffusers_qwen(cn: QwenImageControlNet) -> QwenImageControlNetModel:
    """diffusers' model with our ControlNet's config and weights."""
    c = cn.config
    ref = QwenImageControlNetModel(
        patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.num_layers,
        attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
        joint_attention_dim=c.joint_attention_dim, axes_dims_rope=tuple(c.axes_dims_rope),
        extra_condition_channels=c.extra_condition_channels)
    ref.load_state_dict(cn.state_dict(), strict=True)
    return ref.eval()


def diffusers_call(ref: QwenImageControlNetModel, inputs: dict, cond: torch.Tensor, scale: float = 1.0):
    i = inputs
    return ref(i["hidden_states"], cond, scale, i["encoder_hidden_states"], i["encoder_hidden_states_mask"],
               i["timestep"], i["img_shapes"], return_dict=False)


def max_error(ours: Residuals, theirs, num_base: int) -> float:
    """Largest difference between our residual of every base block and the one diffusers' placement sends there."""
    assert set(ours.tensors) == {("block", b) for b in range(num_base)}
    return max((ours.tensors[("block", b)] - theirs[residual_index("interval", b, num_base, len(theirs))]).abs().max().item()
               for b in range(num_base))


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("extra", [0, INPAINT_EXTRA])
def test_from_transformer_reproduces_the_base_bit_for_bit(extra):
    base = qwen_base()
    cn = QwenImageControlNet.from_transformer(base, num_layers=2, extra_condition_channels=extra).eval()
    assert all(torch.equal(p, torch.zeros_like(p)) for z in [*cn.zero_linears(), cn.controlnet_x_embedder]
               for p in z.parameters())
    assert cn.controlnet_x_embedder.in_features == 16 + extra
    # The copy is the base's: embedders (txt_norm included) and first blocks with identical weights.
    for name in ("time_text_embed", "txt_norm", "img_in", "txt_in"):
        for (k, a), (_, b) in zip(getattr(cn, name).state_dict().items(), getattr(base, name).state_dict().items()):
            assert torch.equal(a, b), (name, k)
    for i in range(2):
        for (k, a), (_, b) in zip(cn.transformer_blocks[i].state_dict().items(), base.transformer_blocks[i].state_dict().items()):
            assert torch.equal(a, b), k
    inputs = qwen_inputs(base)
    cond = torch.randn(2, H * W, 16 + extra)
    with torch.no_grad():
        res = cn(**inputs, condition=cond)
        plain = base_output(base, inputs)
        controlled = base_output(base, inputs, **transformer_kwargs(res, base))
    assert set(res.tensors) == {("block", i) for i in range(5)}
    assert torch.equal(plain, controlled)
    assert all(p.requires_grad for p in cn.parameters())


# --------------------------------------------------------------------------------------------- diffusers as oracle


@pytest.mark.parametrize("extra", [0, INPAINT_EXTRA])
def test_residuals_and_controlled_output_match_diffusers(extra):
    base = qwen_base()
    cn = trained_like(QwenImageControlNet.from_transformer(base, num_layers=2, extra_condition_channels=extra), seed=3)
    ref = diffusers_qwen(cn)
    inputs = qwen_inputs(base)
    latents = torch.randn(2, 4 + extra // 4, 2 * H, 2 * W, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = cn(**inputs, condition=latents, conditioning_scale=0.8)  # unpacked latents, packed 2x2 here
        theirs = diffusers_call(ref, inputs, pack_latents(latents), 0.8)
        assert max_error(ours, theirs, 5) < TOL
        controlled = base_output(base, inputs, **transformer_kwargs(ours, base))
        reference = base_output(base, inputs, controlnet_block_samples=theirs)
        plain = base_output(base, inputs)
    assert (controlled - reference).abs().max().item() < TOL
    assert (controlled - plain).abs().max().item() > 100 * TOL  # the residuals do change the output


def test_one_block_per_base_block_and_the_copy_matches_diffusers_from_transformer():
    base = qwen_base(seed=2)
    ours = QwenImageControlNet.from_transformer(base, num_layers=5)
    theirs = QwenImageControlNetModel.from_transformer(base, num_layers=5, attention_head_dim=16, num_attention_heads=2)
    mine = ours.state_dict()
    # diffusers copies every module but txt_norm, which it leaves at its initial ones; ours copies it too.
    assert torch.equal(mine["txt_norm.weight"], base.txt_norm.weight)
    for k, v in theirs.state_dict().items():
        if k != "txt_norm.weight":
            assert torch.equal(mine[k], v), k
    with torch.no_grad():
        trained_like(ours, seed=6)
        inputs = qwen_inputs(base)
        cond = torch.randn(2, H * W, 16)
        res = ours(**inputs, condition=cond)
        assert max_error(res, diffusers_call(diffusers_qwen(ours), inputs, cond), 5) < TOL


# --------------------------------------------------------------------------------------------- the released layout


@pytest.mark.parametrize("extra", [0, INPAINT_EXTRA])
def test_key_exact_files_and_folders_load_and_round_trip(tmp_path, extra):
    base = qwen_base()
    src = trained_like(QwenImageControlNet.from_transformer(base, 2, extra_condition_channels=extra), seed=5)
    ref = diffusers_qwen(src)  # the released files' layout: diffusers' QwenImageControlNetModel state dict
    ref.save_pretrained(tmp_path / "theirs")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    for path in (tmp_path / "theirs", tmp_path / "bare.safetensors"):
        cn = load_transformer_controlnet(path, base=base)
        assert type(cn) is QwenImageControlNet and cn.config == src.config
        for k, v in src.state_dict().items():
            assert torch.equal(cn.state_dict()[k], v), (path.name, k)
    # Our folder, read by diffusers, holds the same tensors and gives the same residuals.
    folder = save_transformer_controlnet(src, tmp_path / "ours")
    again = QwenImageControlNetModel.from_pretrained(folder).eval()
    assert set(again.state_dict()) == set(ref.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    inputs = qwen_inputs(base)
    cond = torch.randn(2, H * W, 16 + extra)
    with torch.no_grad():
        assert max_error(src(**inputs, condition=cond), diffusers_call(again, inputs, cond), 5) < TOL
    assert load_transformer_controlnet(folder).config == src.config  # base depth kept in config.json
    bare = load_transformer_controlnet(tmp_path / "bare.safetensors", base=dict(base.config))
    assert bare.config.base_num_layers == 5


# The published configs (config.json on the Hub): key lists at full size, built on the meta device by diffusers'
# class, must give these configs back without a config file.
RELEASED = {
    "InstantX/Qwen-Image-ControlNet-Union": dict(num_layers=5, extra_condition_channels=0),
    "InstantX/Qwen-Image-ControlNet-Inpainting": dict(num_layers=6, extra_condition_channels=INPAINT_EXTRA),
}


# InstantX/Qwen-Image-ControlNet-Inpainting config.json as published (with keys the model does not use).
INPAINTING_CONFIG_JSON = {
    "_class_name": "QwenImageControlNetModel", "_diffusers_version": "0.35.0.dev0", "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56], "extra_condition_channels": 4, "guidance_embeds": False, "in_channels": 64,
    "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 6, "out_channels": 16, "patch_size": 2,
    "pooled_projection_dim": 768}


@pytest.mark.parametrize("repo", sorted(RELEASED))
def test_released_key_lists_at_full_size_infer_the_published_configs(repo):
    from controlnet.transformer_formats import config_from_dict

    with torch.device("meta"):
        sd = QwenImageControlNetModel(**RELEASED[repo]).state_dict()
    cn = transformer_controlnet_from_state_dict(sd, name=repo)
    assert cn.config == QwenImageControlNetConfig(**RELEASED[repo])
    if repo.endswith("Inpainting"):
        assert config_from_dict(INPAINTING_CONFIG_JSON) == cn.config
    assert cn.pos_embed.pos_freqs.device.type == "cpu"  # rotary tables are built, not read from the file


def test_cli_converts_a_single_file_to_a_diffusers_folder(tmp_path):
    from controlnet.cli import main

    ref = diffusers_qwen(trained_like(QwenImageControlNet.from_transformer(qwen_base(), 2), 8))
    ref.save_pretrained(tmp_path / "ref")
    bare = tmp_path / "qwen-image-controlnet-union.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(bare))
    # Tiny heads: the rotary axes come from a config.json, as for any file whose shapes do not tell everything.
    config = str(tmp_path / "ref" / "config.json")
    assert main(["convert", str(bare), str(tmp_path / "out"), "--to", "diffusers", "--config", config, "-q"]) == 0
    again = QwenImageControlNetModel.from_pretrained(tmp_path / "out")
    for k, v in ref.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_info_describes_a_qwen_image_controlnet(tmp_path, capsys):
    from controlnet.cli import main

    ref = diffusers_qwen(QwenImageControlNet.from_transformer(qwen_base(), 2))
    ref.save_pretrained(tmp_path / "folder")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    for path in (tmp_path / "folder", tmp_path / "bare.safetensors"):
        capsys.readouterr()
        assert main(["info", str(path)]) == 0
        lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
        assert lines["family"] == "qwenimage-controlnet, a Qwen-Image ControlNet (diffusers layout)"
        assert lines["base"] == "qwenimage" and lines["layers"] == "2 double-stream blocks"
        assert lines["parameters"] == str(sum(p.numel() for p in ref.parameters()))


# --------------------------------------------------------------------------------------------- refusals


def test_wrong_family_files_and_models_are_refused_in_one_line(tmp_path):
    qwen, flux = qwen_base(), flux_base()
    qwen_cn = QwenImageControlNet.from_transformer(qwen, 2)
    flux_cn = FluxControlNet.from_transformer(flux, 1, 1)
    qwen_file, flux_file = tmp_path / "qwen.safetensors", tmp_path / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in qwen_cn.state_dict().items()}, str(qwen_file))
    save_file({k: v.contiguous() for k, v in flux_cn.state_dict().items()}, str(flux_file))
    with pytest.raises(UserError) as err:
        load_transformer_controlnet(qwen_file, base=flux)
    assert "Qwen-Image ControlNet" in one_line(err) and "FluxTransformer2DModel" in one_line(err)
    with pytest.raises(UserError) as err:
        load_transformer_controlnet(flux_file, base=qwen)
    assert "Flux ControlNet" in one_line(err) and "QwenImageTransformer2DModel" in one_line(err)
    with pytest.raises(UserError) as err:
        check_fits(qwen_cn, flux)
    assert "is a Qwen-Image ControlNet but the base is Flux" in one_line(err)
    with pytest.raises(UserError) as err:
        check_fits(flux_cn, dict(qwen.config))  # a base given by its config
    assert "is a Flux ControlNet but the base is Qwen-Image" in one_line(err)
    with pytest.raises(UserError) as err:
        QwenImageControlNet.from_transformer(flux, 1)
    assert "needs a QwenImageTransformer2DModel, got FluxTransformer2DModel" in one_line(err)
    # Same family, other widths and text width.
    with pytest.raises(UserError) as err:
        check_fits(qwen_cn, qwen_base(attention_head_dim=32, axes_dims_rope=(16, 8, 8), joint_attention_dim=8))
    assert "width 32 vs 64" in one_line(err) and "text width 16 vs 8" in one_line(err)


def test_bad_inputs_variants_and_configs_are_refused():
    base = qwen_base()
    cn = QwenImageControlNet.from_transformer(base, 2)
    inputs = qwen_inputs(base)
    with pytest.raises(UserError) as err:
        cn(**inputs, condition=torch.randn(2, H * W, 16 + INPAINT_EXTRA))  # an inpainting condition
    assert "give a condition of the image's size and channels" in one_line(err)
    with pytest.raises(UserError, match="copy 1..5 of them, not 6"):
        QwenImageControlNet.from_transformer(base, 6)
    with pytest.raises(UserError, match="zero_cond_t .* Qwen-Image edit or layered variant"):
        QwenImageControlNet.from_transformer(qwen_base(zero_cond_t=True), 2)
    config = QwenImageControlNetConfig(**{**QWEN_BASE, "num_layers": 2, "extra_condition_channels": 4, "base_num_layers": 5})
    assert QwenImageControlNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(UserError, match="axes_dims_rope .* must add up to attention_head_dim 16"):
        QwenImageControlNetConfig.from_dict({**QWEN_BASE, "axes_dims_rope": [4, 4, 4]})
    detached = QwenImageControlNet(QwenImageControlNetConfig(**{**QWEN_BASE, "num_layers": 2}))
    with pytest.raises(UserError, match="does not know its base's depth"):
        detached(**inputs, condition=torch.randn(2, H * W, 16))
