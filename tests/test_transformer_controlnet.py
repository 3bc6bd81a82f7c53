"""Transformer ControlNets (Flux, SD3/SD3.5): initialisation, agreement with diffusers, released layouts, refusals.

diffusers' FluxControlNetModel / SD3ControlNetModel / their Multi wrappers are the oracles: same weights, same
inputs, residuals within 1e-5, and the locked base's output with the residuals added through diffusers' own
arguments equal to the output with ours. Tiny seeded configs as diffusers' own ControlNet pipeline tests use.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel, FluxTransformer2DModel,
                       SD3ControlNetModel, SD3MultiControlNetModel, SD3Transformer2DModel)
from safetensors.torch import save_file

from controlnet.testing import build_unet, trained_like
from controlnet.errors import UserError
from controlnet.residuals import Residuals
from controlnet.transformer_controlnet import (FLUX_UNION_MODES, FluxControlNet, SD3ControlNet, latent_image_ids,
                                               pack_latents, residual_index, transformer_kwargs)
from controlnet.transformer_formats import (check_fits, control_type_name, load_transformer_controlnet,
                                            save_transformer_controlnet, transformer_controlnet_from_state_dict)

TOL = 1e-5
# diffusers tests/pipelines/controlnet_flux: a 2-head, 16-wide-head Flux; more blocks here, so placement matters.
FLUX_BASE = dict(patch_size=1, in_channels=16, num_layers=3, num_single_layers=5, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
# diffusers tests/pipelines/controlnet_sd3: a 4-head, 8-wide-head SD3 with 4 joint blocks.
SD3_BASE = dict(sample_size=32, patch_size=1, in_channels=8, num_layers=4, attention_head_dim=8, num_attention_heads=4,
                joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=8)
# XLabs packs its 16-channel hint features 2x2 into the 64 features of packed latents.
FLUX_XLABS_BASE = {**FLUX_BASE, "in_channels": 64, "guidance_embeds": True}
H = W = 4  # packed token grid (Flux) / latent grid (SD3)
TEXT = 5


def flux_base(seed: int = 0, **overrides) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**FLUX_BASE, **overrides}).eval()


def sd3_base(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**SD3_BASE).eval()


def flux_inputs(base: FluxTransformer2DModel, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = base.config
    return dict(hidden_states=torch.randn(2, H * W, c.in_channels, generator=g), timestep=torch.tensor([0.7, 0.3]),
                encoder_hidden_states=torch.randn(2, TEXT, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
                img_ids=latent_image_ids(H, W), txt_ids=torch.zeros(TEXT, 3),
                guidance=torch.tensor([3.5, 3.5]) if c.guidance_embeds else None)


def sd3_inputs(base: SD3Transformer2DModel, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = base.config
    return dict(hidden_states=torch.randn(2, c.in_channels, H, W, generator=g), timestep=torch.tensor([700.0, 300.0]),
                encoder_hidden_states=torch.randn(2, TEXT, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g))


def flux_base_output(base, inputs, **extra) -> torch.Tensor:
    i = inputs
    return base(i["hidden_states"], i["encoder_hidden_states"], i["pooled_projections"], i["timestep"],
                i["img_ids"], i["txt_ids"], guidance=i["guidance"], **extra).sample


def diffusers_flux(cn: FluxControlNet) -> FluxControlNetModel:
    """diffusers' model with our ControlNet's config and weights."""
    c = cn.config
    ref = FluxControlNetModel(
        patch_size=c.patch_size, in_channels=c.in_channels, num_layers=c.num_layers,
        num_single_layers=c.num_single_layers, attention_head_dim=c.attention_head_dim,
        num_attention_heads=c.num_attention_heads, joint_attention_dim=c.joint_attention_dim,
        pooled_projection_dim=c.pooled_projection_dim, guidance_embeds=c.guidance_embeds,
        axes_dims_rope=list(c.axes_dims_rope), num_mode=c.num_mode,
        conditioning_embedding_channels=c.conditioning_embedding_channels)
    ref.load_state_dict(cn.state_dict(), strict=True)
    return ref.eval()


def diffusers_flux_call(ref, inputs, cond, mode=None, scale=1.0):
    i = inputs
    return ref(i["hidden_states"], cond, mode, scale, i["encoder_hidden_states"], i["pooled_projections"],
               i["timestep"], i["img_ids"], i["txt_ids"], i["guidance"], return_dict=False)


def max_error(ours: Residuals, kind: str, theirs, placement: str) -> float:
    """Largest difference between our residual of every base block of ``kind`` and diffusers' residual that
    diffusers' own placement sends to that block."""
    blocks = sorted(i for k, i in ours.tensors if k == kind)
    errors = [(ours.tensors[(kind, b)] - theirs[residual_index(placement, b, len(blocks) + (placement == "sd3"),
                                                              len(theirs))]).abs().max().item() for b in blocks]
    return max(errors)


# --------------------------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("variant", ["latent", "union", "xlabs"])
def test_flux_from_transformer_reproduces_the_base_bit_for_bit(variant):
    base = flux_base(**({"in_channels": 64, "guidance_embeds": True} if variant == "xlabs" else {}))
    cn = FluxControlNet.from_transformer(
        base, num_layers=2, num_single_layers=3, num_mode=10 if variant == "union" else None,
        conditioning_embedding_channels=16 if variant == "xlabs" else None).eval()
    assert all(torch.equal(p, torch.zeros_like(p)) for z in cn.zero_linears() for p in z.parameters())
    # The copy is the base's: embedders and first blocks with identical weights.
    for i in range(2):
        for (k, a), (_, b) in zip(cn.transformer_blocks[i].state_dict().items(), base.transformer_blocks[i].state_dict().items()):
            assert torch.equal(a, b), k
    assert torch.equal(cn.x_embedder.weight, base.x_embedder.weight)
    inputs = flux_inputs(base)
    cond = torch.rand(2, 3, 8 * H * 2, 8 * W * 2) if variant == "xlabs" else torch.randn(2, H * W, 16)
    with torch.no_grad():
        res = cn(**inputs, condition=cond, mode="depth" if variant == "union" else None)
        assert set(res.tensors) == {("block", i) for i in range(3)} | {("single", i) for i in range(5)}
        plain = flux_base_output(base, inputs)
        controlled = flux_base_output(base, inputs, **transformer_kwargs(res, base))
    assert torch.equal(plain, controlled)
    assert all(p.requires_grad for p in cn.parameters())


def test_sd3_from_transformer_reproduces_the_base_bit_for_bit():
    base = sd3_base()
    cn = SD3ControlNet.from_transformer(base, num_layers=2).eval()
    inputs = sd3_inputs(base)
    with torch.no_grad():
        res = cn(**inputs, condition=torch.randn(2, 8, H, W))
        # 4 base blocks, 2 residuals: blocks 0, 1 get residual 0, block 2 residual 1, the last block (context-pre-only) none.
        assert set(res.tensors) == {("block", 0), ("block", 1), ("block", 2)}
        assert res.tensors[("block", 0)] is res.tensors[("block", 1)]
        plain = base(**inputs).sample
        controlled = base(**inputs, **transformer_kwargs(res, base)).sample
    assert torch.equal(plain, controlled)
    with pytest.raises(UserError, match="give a condition of the image's size"):
        cn(**inputs, condition=torch.randn(2, 8, 2 * H, 2 * W))
    with pytest.raises(UserError, match="copy 1..3"):
        SD3ControlNet.from_transformer(base, num_layers=4)


def test_placement_rules_known_answers():
    # FLUX.1: 19 double blocks, a 4-block ControlNet: ceil(19/4) = 5 blocks per residual.
    assert [residual_index("interval", b, 19, 4) for b in (0, 4, 5, 18)] == [0, 0, 1, 3]
    # XLabs: 2 blocks repeated over the 19: even blocks get residual 0, odd ones residual 1.
    assert [residual_index("repeat", b, 19, 2) for b in (0, 1, 2, 18)] == [0, 1, 0, 0]
    # SD3 medium: 24 joint blocks, 6 residuals: 4 each; SD3.5 large 38 / 19: 2 each; the last block none.
    assert [residual_index("sd3", b, 24, 6) for b in (0, 3, 4, 22, 23)] == [0, 0, 1, 5, None]
    assert [residual_index("sd3", b, 38, 19) for b in (0, 1, 2, 36, 37)] == [0, 0, 1, 18, None]


# --------------------------------------------------------------------------------------------- agreement with diffusers


@pytest.mark.parametrize("variant", ["latent", "union", "xlabs"])
def test_flux_matches_diffusers(variant):
    xlabs = variant == "xlabs"
    base = flux_base(**({"in_channels": 64, "guidance_embeds": True} if xlabs else {}))
    cn = trained_like(FluxControlNet.from_transformer(
        base, num_layers=2, num_single_layers=0 if xlabs else 2, num_mode=10 if variant == "union" else None,
        conditioning_embedding_channels=16 if xlabs else None), seed=3)
    ref = diffusers_flux(cn)
    inputs = flux_inputs(base)
    g = torch.Generator().manual_seed(5)
    if xlabs:
        hint = torch.rand(2, 3, 16 * H, 16 * W, generator=g)
        ours_cond, their_cond = hint, hint * 2 - 1  # diffusers' pipeline hands the hint over in [-1, 1]
    else:
        ours_cond = their_cond = torch.randn(2, H * W, 16, generator=g)
    mode = torch.tensor([[2], [2]]) if variant == "union" else None
    with torch.no_grad():
        res = cn(**inputs, condition=ours_cond, mode="depth" if mode is not None else None, conditioning_scale=0.7)
        double, single = diffusers_flux_call(ref, inputs, their_cond, mode, 0.7)
        placement = "repeat" if xlabs else "interval"
        assert max_error(res, "block", double, placement) < TOL
        if single is not None:
            assert max_error(res, "single", single, "interval") < TOL
        theirs = flux_base_output(base, inputs, controlnet_block_samples=double, controlnet_single_block_samples=single,
                                  controlnet_blocks_repeat=xlabs)
        ours = flux_base_output(base, inputs, **transformer_kwargs(res, base))
    assert (theirs - ours).abs().max() < TOL
    assert (theirs - flux_base_output(base, inputs)).abs().max() > 1e-3  # the residuals do change the output


def test_two_flux_controlnets_and_union_passes_sum_as_in_diffusers():
    base = flux_base()
    a = trained_like(FluxControlNet.from_transformer(base, 2, 2), seed=1)
    b = trained_like(FluxControlNet.from_transformer(base, 2, 2), seed=2)
    deep = trained_like(FluxControlNet.from_transformer(base, 3, 1), seed=3)
    union = trained_like(FluxControlNet.from_transformer(base, 2, 2, num_mode=10), seed=4)
    inputs = flux_inputs(base)
    i = inputs
    g = torch.Generator().manual_seed(6)
    c1, c2 = torch.randn(2, H * W, 16, generator=g), torch.randn(2, H * W, 16, generator=g)
    rest = (i["encoder_hidden_states"], i["pooled_projections"], i["timestep"], i["img_ids"], i["txt_ids"], None,
            None, False)
    no_mode = [torch.zeros(2, dtype=torch.long)] * 2
    with torch.no_grad():
        # Two ControlNets of the same depth: FluxMultiControlNetModel sums their lists.
        ours = a(**inputs, condition=c1, conditioning_scale=0.5) + b(**inputs, condition=c2, conditioning_scale=0.8)
        double, single = FluxMultiControlNetModel([diffusers_flux(a), diffusers_flux(b)])(
            i["hidden_states"], [c1, c2], no_mode, [0.5, 0.8], *rest)
        assert max_error(ours, "block", double, "interval") < TOL
        assert max_error(ours, "single", single, "interval") < TOL
        theirs = flux_base_output(base, inputs, controlnet_block_samples=double, controlnet_single_block_samples=single)
        assert (theirs - flux_base_output(base, inputs, **transformer_kwargs(ours, base))).abs().max() < TOL
        # Different depths (diffusers' wrapper cannot mix them): each base block gets the sum of what diffusers
        # places there for each ControlNet alone.
        mixed = a(**inputs, condition=c1) + deep(**inputs, condition=c2)
        da, sa = diffusers_flux_call(diffusers_flux(a), inputs, c1)
        dd, sd = diffusers_flux_call(diffusers_flux(deep), inputs, c2)
        for blk in range(3):
            want = da[residual_index("interval", blk, 3, 2)] + dd[residual_index("interval", blk, 3, 3)]
            assert (mixed.tensors[("block", blk)] - want).abs().max() < TOL
        for blk in range(5):
            want = sa[residual_index("interval", blk, 5, 2)] + sd[residual_index("interval", blk, 5, 1)]
            assert (mixed.tensors[("single", blk)] - want).abs().max() < TOL
        # Union: one ControlNet, one pass per (condition, mode), summed.
        ours_u = union(**inputs, condition=c1, mode="canny") + union(**inputs, condition=c2, mode="pose")
        modes = [torch.full((2,), FLUX_UNION_MODES.index("canny")), torch.full((2,), FLUX_UNION_MODES.index("pose"))]
        du, su = FluxMultiControlNetModel([diffusers_flux(union)])(i["hidden_states"], [c1, c2], modes, [1.0, 1.0], *rest)
        assert max_error(ours_u, "block", du, "interval") < TOL
        assert max_error(ours_u, "single", su, "interval") < TOL
        theirs = flux_base_output(base, inputs, controlnet_block_samples=du, controlnet_single_block_samples=su)
        assert (theirs - flux_base_output(base, inputs, **transformer_kwargs(ours_u, base))).abs().max() < TOL


def sd35_pair(base: SD3Transformer2DModel, seed: int) -> tuple[SD3ControlNet, SD3ControlNetModel]:
    """A Stability SD3.5-layout ControlNet (no text stream, the base's patch embedding) and diffusers' model of it."""
    c = base.config
    torch.manual_seed(seed)
    ref = SD3ControlNetModel(patch_size=c.patch_size, in_channels=c.in_channels, num_layers=2,
                             attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
                             joint_attention_dim=None, caption_projection_dim=32, pooled_projection_dim=c.pooled_projection_dim,
                             out_channels=c.out_channels, pos_embed_max_size=None, pos_embed_type=None,
                             use_pos_embed=False, force_zeros_for_pooled_projection=False)
    ref = trained_like(ref, seed)
    ours = transformer_controlnet_from_state_dict(ref.state_dict(), dict(ref.config), base)
    ref.pos_embed = ref._get_pos_embed_from_transformer(base)  # as diffusers' pipeline does
    return ours, ref.eval()


def test_sd3_matches_diffusers_one_two_and_sd35_layout():
    base = sd3_base()
    a = trained_like(SD3ControlNet.from_transformer(base, 2), seed=1)
    b = trained_like(SD3ControlNet.from_transformer(base, 3), seed=2)
    s35, ref35 = sd35_pair(base, seed=3)
    inputs = sd3_inputs(base)
    g = torch.Generator().manual_seed(7)
    c1, c2 = torch.randn(2, 8, H, W, generator=g), torch.randn(2, 8, H, W, generator=g)
    refs = []
    for cn in (a, b):
        ref = SD3ControlNetModel(**{**SD3_BASE, "num_layers": cn.config.num_layers})
        ref.load_state_dict(cn.state_dict(), strict=True)
        refs.append(ref.eval())
    i = inputs
    with torch.no_grad():
        for cn, ref, cond in ((a, refs[0], c1), (b, refs[1], c2), (s35, ref35, c1)):
            ours = cn(**inputs, condition=cond, conditioning_scale=0.6)
            enc = None if cn.context_embedder is None else i["encoder_hidden_states"]
            (theirs,) = ref(i["hidden_states"], cond, 0.6, enc, i["pooled_projections"], i["timestep"], return_dict=False)
            assert max_error(ours, "block", theirs, "sd3") < TOL
            out_theirs = base(**inputs, block_controlnet_hidden_states=theirs).sample
            out_ours = base(**inputs, **transformer_kwargs(ours, base)).sample
            assert (out_theirs - out_ours).abs().max() < TOL
        # Two ControlNets of the same depth, summed, against SD3MultiControlNetModel.
        a2 = trained_like(SD3ControlNet.from_transformer(base, 2), seed=9)
        ref2 = SD3ControlNetModel(**{**SD3_BASE, "num_layers": 2})
        ref2.load_state_dict(a2.state_dict())
        ours = a(**inputs, condition=c1, conditioning_scale=0.5) + a2(**inputs, condition=c2, conditioning_scale=0.9)
        (theirs,) = SD3MultiControlNetModel([refs[0], ref2.eval()])(
            i["hidden_states"], [c1, c2], [0.5, 0.9], i["pooled_projections"], i["encoder_hidden_states"], i["timestep"])
        assert max_error(ours, "block", theirs, "sd3") < TOL


# --------------------------------------------------------------------------------------------- released layouts


def to_xlabs(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """diffusers' names → the keys of an XLabs file (x-flux src/flux/controlnet.py, modules/layers.py:
    DoubleStreamBlock's img_mod/img_attn/img_mlp/txt_*, MLPEmbedder in_layer/out_layer, QKNorm scales)."""
    top = {"img_in": "x_embedder", "txt_in": "context_embedder", "pos_embed_input": "controlnet_x_embedder",
           "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
           "input_hint_block.0": "input_hint_block.conv_in", "input_hint_block.14": "input_hint_block.conv_out",
           **{f"input_hint_block.{2 * k + 2}": f"input_hint_block.blocks.{k}" for k in range(6)}}
    out = {}
    for theirs, ours in top.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = sd[f"{ours}.{p}"]
    block = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", "img_attn.proj": "attn.to_out.0",
             "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
             "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
    norms = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
             "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
    for i in range(num_layers):
        d, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            for theirs, ours in block.items():
                out[d + f"{theirs}.{p}"] = sd[t + f"{ours}.{p}"]
            out[d + f"img_attn.qkv.{p}"] = torch.cat([sd[t + f"attn.to_{x}.{p}"] for x in "qkv"])
            out[d + f"txt_attn.qkv.{p}"] = torch.cat([sd[t + f"attn.add_{x}_proj.{p}"] for x in "qkv"])
            out[f"controlnet_blocks.{i}.{p}"] = sd[f"controlnet_blocks.{i}.{p}"]
        for theirs, ours in norms.items():
            out[d + f"{theirs}.scale"] = sd[t + f"{ours}.weight"]
    return out


def to_stability(sd: dict[str, torch.Tensor], num_layers: int, control_type: int) -> dict[str, torch.Tensor]:
    """diffusers' names → the keys of Stability's sd3.5_large_controlnet_*.safetensors (diffusers
    scripts/convert_sd3_controlnet_to_diffusers.py read backwards; ComfyUI reads `control_type`)."""
    keep = [k for k in sd if k.startswith(("time_text_embed.", "pos_embed_input.", "controlnet_blocks."))]
    out = {k: sd[k] for k in keep}
    block = {"attn.proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
             "adaLN_modulation.1": "norm1.linear"}
    for i in range(num_layers):
        t = f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            out[t + f"attn.qkv.{p}"] = torch.cat([sd[t + f"attn.to_{x}.{p}"] for x in "qkv"])
            for theirs, ours in block.items():
                out[t + f"{theirs}.{p}"] = sd[t + f"{ours}.{p}"]
    out["control_type"] = torch.tensor([float(control_type)])
    return out


def test_xlabs_file_loads_and_matches_diffusers(tmp_path):
    base = flux_base(in_channels=64, guidance_embeds=True)
    src = trained_like(FluxControlNet.from_transformer(base, 2, 0, conditioning_embedding_channels=16), seed=8)
    ref = diffusers_flux(src)
    path = tmp_path / "flux-canny-controlnet-v3.safetensors"
    xlabs = to_xlabs(ref.state_dict(), 2)
    assert not any(k.startswith(("transformer_blocks.", "x_embedder")) for k in xlabs)
    save_file({k: v.contiguous() for k, v in xlabs.items()}, str(path))
    cn = load_transformer_controlnet(path, base=base)
    assert cn.config.conditioning_embedding_channels == 16 and cn.config.patch_size == 2
    assert cn.config.guidance_embeds and cn.config.num_single_layers == 0
    inputs = flux_inputs(base)
    hint = torch.rand(2, 3, 16 * H, 16 * W, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        res = cn(**inputs, condition=hint)
        double, _ = diffusers_flux_call(ref, inputs, hint * 2 - 1)
    assert max_error(res, "block", double, "repeat") < TOL


def test_stability_sd35_file_loads_with_control_type(tmp_path):
    base = sd3_base()
    ours, ref = sd35_pair(base, seed=4)
    path = tmp_path / "sd3.5_large_controlnet_depth.safetensors"
    save_file({k: v.contiguous() for k, v in to_stability(ours.persistent_state_dict(), 2, control_type=2).items()}, str(path))
    cn = load_transformer_controlnet(path, base=base)
    assert control_type_name(cn.config) == "depth"
    assert not cn.config.use_pos_embed and cn.config.joint_attention_dim is None
    assert not cn.config.force_zeros_for_pooled_projection
    inputs = sd3_inputs(base)
    cond = torch.randn(2, 8, H, W)
    i = inputs
    with torch.no_grad():
        res = cn(**inputs, condition=cond)
        (theirs,) = ref(i["hidden_states"], cond, 1.0, None, i["pooled_projections"], i["timestep"], return_dict=False)
    assert max_error(res, "block", theirs, "sd3") < TOL
    # Converted to our diffusers folder, diffusers reads it.
    folder = save_transformer_controlnet(cn, tmp_path / "converted")
    again = SD3ControlNetModel.from_pretrained(folder).eval()
    again.pos_embed = again._get_pos_embed_from_transformer(base)
    with torch.no_grad():
        (back,) = again(i["hidden_states"], cond, 1.0, None, i["pooled_projections"], i["timestep"], return_dict=False)
    assert max_error(res, "block", back, "sd3") < TOL
    assert json.loads((folder / "config.json").read_text())["control_type"] == 2


@pytest.mark.parametrize("family", ["flux", "flux-union", "sd3"])
def test_diffusers_single_files_and_folders_load_both_ways(tmp_path, family):
    base = sd3_base() if family == "sd3" else flux_base()
    if family == "sd3":
        src = trained_like(SD3ControlNet.from_transformer(base, 2), seed=5)
        ref = SD3ControlNetModel(**{**SD3_BASE, "num_layers": 2})
        ref.load_state_dict(src.state_dict())
    else:
        src = trained_like(FluxControlNet.from_transformer(base, 2, 1, num_mode=10 if family == "flux-union" else None), seed=5)
        ref = diffusers_flux(src)
    # diffusers' folder (written by diffusers) and a bare .safetensors of its keys (no config).
    ref.save_pretrained(tmp_path / "theirs")
    if family == "sd3":  # as InstantX/SD3-Controlnet-Canny's first config.json names the class
        config_json = tmp_path / "theirs" / "config.json"
        config_json.write_text(json.dumps({**json.loads(config_json.read_text()), "_class_name": "ControlNetSD3Model"}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    for path in (tmp_path / "theirs", tmp_path / "bare.safetensors"):
        cn = load_transformer_controlnet(path, base=base)
        assert type(cn) is type(src)
        for k, v in src.state_dict().items():
            assert torch.equal(cn.state_dict()[k], v), (path.name, k)
    # Our folder, read by diffusers, gives the same residuals.
    ours_folder = save_transformer_controlnet(src, tmp_path / "ours")
    again = type(ref).from_pretrained(ours_folder).eval()
    for k, v in src.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert load_transformer_controlnet(ours_folder).config == src.config  # base depth kept in config.json
    # A base given by its config (a dict) is enough for the placement.
    bare = load_transformer_controlnet(tmp_path / "bare.safetensors", base=dict(base.config))
    assert bare.config.base_num_layers == base.config.num_layers


def test_cli_converts_an_xlabs_file_to_a_diffusers_folder(tmp_path, capsys):
    from controlnet.cli import main
    from controlnet.errors import EXIT_BAD_INPUT

    base = flux_base(in_channels=64, guidance_embeds=True)
    ref = diffusers_flux(trained_like(FluxControlNet.from_transformer(base, 2, 0, conditioning_embedding_channels=16), 8))
    ref.save_pretrained(tmp_path / "ref")
    xlabs = tmp_path / "flux-depth-controlnet.safetensors"
    save_file({k: v.contiguous() for k, v in to_xlabs(ref.state_dict(), 2).items()}, str(xlabs))
    # Tiny heads: the rotary axes come from a config.json, as for any file whose shapes do not tell everything.
    config = str(tmp_path / "ref" / "config.json")
    assert main(["convert", str(xlabs), str(tmp_path / "out"), "--to", "diffusers", "--config", config]) == 0
    again = FluxControlNetModel.from_pretrained(tmp_path / "out")
    for k, v in ref.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    capsys.readouterr()
    assert main(["convert", str(xlabs), str(tmp_path / "x.safetensors"), "--to", "original"]) == EXIT_BAD_INPUT
    assert "diffusers layout only" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- refusals


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_wrong_family_files_are_refused_in_one_line(tmp_path):
    flux, sd3 = flux_base(), sd3_base()
    flux_file, sd3_file = tmp_path / "flux.safetensors", tmp_path / "sd3.safetensors"
    save_file({k: v.contiguous() for k, v in FluxControlNet.from_transformer(flux, 1, 1).state_dict().items()},
              str(flux_file))
    save_file({k: v.contiguous() for k, v in SD3ControlNet.from_transformer(sd3, 2).state_dict().items()}, str(sd3_file))
    with pytest.raises(UserError) as err:
        load_transformer_controlnet(flux_file, base=sd3)
    assert "Flux ControlNet" in one_line(err) and "SD3Transformer2DModel" in one_line(err)
    with pytest.raises(UserError) as err:
        load_transformer_controlnet(sd3_file, base=flux)
    assert "SD3/SD3.5 ControlNet" in one_line(err) and "FluxTransformer2DModel" in one_line(err)
    from controlnet.model import ControlNet

    unet_file = tmp_path / "controlnet-sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in ControlNet.from_unet(build_unet("sdxl")).state_dict().items()}, str(unet_file))
    with pytest.raises(UserError) as err:
        load_transformer_controlnet(unet_file, base=flux)
    assert "for SDXL (a UNet ControlNet)" in one_line(err) and "FluxTransformer2DModel" in one_line(err)
    # Same family, other widths: a Flux ControlNet for a wider Flux.
    with pytest.raises(UserError) as err:
        check_fits(FluxControlNet.from_transformer(flux_base(attention_head_dim=32, axes_dims_rope=[8, 8, 16]), 1, 1), flux)
    assert "width 64 vs 32" in one_line(err)


def test_union_modes_and_packing_are_checked():
    base = flux_base()
    union = FluxControlNet.from_transformer(base, 1, 1, num_mode=10)
    inputs = flux_inputs(base)
    cond = torch.randn(2, H * W, 16)
    with pytest.raises(UserError, match="union ControlNet; give a control mode"):
        union(**inputs, condition=cond)
    with pytest.raises(UserError, match="unknown control mode 'sketch'"):
        union(**inputs, condition=cond, mode="sketch")
    with pytest.raises(UserError, match="the condition gives 4 tokens .* but the image has 16"):
        union(**inputs, condition=torch.randn(2, 16, 4, 4), mode=0)  # latents of a quarter of the image
    with pytest.raises(UserError, match="cannot be packed"):
        pack_latents(torch.zeros(1, 16, 5, 4))
    # Packing is diffusers' FluxControlNetPipeline._pack_latents.
    latents = torch.randn(1, 16, 6, 4)
    assert torch.equal(pack_latents(latents), FluxControlNetPipeline._pack_latents(latents, 1, 16, 6, 4))


def test_configs_round_trip_through_json_and_refuse_bad_values():
    from controlnet.transformer_controlnet import FluxControlNetConfig, SD3ControlNetConfig

    flux = FluxControlNetConfig(**{**FLUX_BASE, "num_layers": 2, "num_mode": 10, "base_num_layers": 19})
    assert FluxControlNetConfig.from_dict(json.loads(json.dumps(flux.to_dict()))) == flux
    sd3 = SD3ControlNetConfig(**{**SD3_BASE, "dual_attention_layers": [0, 1], "control_type": 1})
    assert SD3ControlNetConfig.from_dict(json.loads(json.dumps(sd3.to_dict()))) == sd3
    with pytest.raises(UserError, match="num_layers must be a non-negative integer, got -1"):
        FluxControlNetConfig.from_dict({**FLUX_BASE, "num_layers": -1})
    with pytest.raises(UserError, match="axes_dims_rope .* must add up to attention_head_dim 16"):
        FluxControlNetConfig.from_dict({**FLUX_BASE, "axes_dims_rope": [4, 4, 4]})
    with pytest.raises(UserError, match="qk_norm"):
        SD3ControlNetConfig.from_dict({**SD3_BASE, "qk_norm": "l2"})


# The published configs (config.json on the Hub; Stability's as diffusers' conversion script writes it), whose
# key lists at full size, built on the meta device, must give these configs back without a config file.
RELEASED = {
    "InstantX/FLUX.1-dev-Controlnet-Union": dict(family="flux", num_layers=5, num_single_layers=10, num_mode=10),
    "InstantX/FLUX.1-dev-Controlnet-Canny": dict(family="flux", num_layers=5, num_single_layers=10),
    "Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro-2.0": dict(family="flux", num_layers=6, num_single_layers=0),
    "XLabs-AI/flux-controlnet-canny-v3": dict(family="xlabs", num_layers=2, num_single_layers=0),
    "InstantX/SD3-Controlnet-Canny": dict(family="sd3", num_layers=6),
    "stabilityai/stable-diffusion-3.5-controlnets (canny)": dict(family="stability", num_layers=19),
}
FLUX1 = dict(in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
             pooled_projection_dim=768, guidance_embeds=True)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, num_attention_heads=24,
                  joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                  pos_embed_max_size=192)
# caption_projection_dim is unused without a text stream (diffusers' conversion script writes 2048; shapes say nothing).
SD35_LARGE_CONTROLNET = dict(patch_size=2, in_channels=16, attention_head_dim=64, num_attention_heads=38,
                             joint_attention_dim=None, caption_projection_dim=2432, pooled_projection_dim=2048,
                             out_channels=16, pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
                             force_zeros_for_pooled_projection=False, control_type=1)


@pytest.mark.parametrize("repo", sorted(RELEASED))
def test_released_key_lists_at_full_size_infer_the_published_configs(repo):
    from controlnet.transformer_controlnet import FluxControlNetConfig, SD3ControlNetConfig

    spec = dict(RELEASED[repo])
    family = spec.pop("family")
    if family in ("flux", "xlabs"):
        hint = {"conditioning_embedding_channels": 16, "patch_size": 2} if family == "xlabs" else {}
        config = FluxControlNetConfig(**FLUX1, **spec, **hint)
        with torch.device("meta"):
            sd = FluxControlNet(config).state_dict()
        if family == "xlabs":
            sd = to_xlabs(sd, spec["num_layers"])
    else:
        config = SD3ControlNetConfig(**(SD3_MEDIUM if family == "sd3" else SD35_LARGE_CONTROLNET), **spec)
        with torch.device("meta"):
            sd = SD3ControlNet(config).state_dict()
        if family == "stability":
            sd = to_stability(sd, spec["num_layers"], control_type=1)
    cn = transformer_controlnet_from_state_dict(sd, name=repo)
    assert cn.config == config


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_gradient_checkpointing_reruns_the_copied_blocks_and_keeps_the_gradients(family):
    """Training's --gradient-checkpointing: each copied block runs again in the backward pass, and the gradients
    are those of the plain pass, bit for bit."""
    from controlnet.train.objective import enable_gradient_checkpointing

    flux = family == "flux"
    base = flux_base() if flux else sd3_base()
    cn = trained_like(FluxControlNet.from_transformer(base, num_layers=2, num_single_layers=1) if flux
                      else SD3ControlNet.from_transformer(base, num_layers=2), seed=3)
    inputs = flux_inputs(base) if flux else sd3_inputs(base)
    g = torch.Generator().manual_seed(5)
    cond = (torch.randn(2, H * W, 16, generator=g) if flux
            else torch.randn(2, base.config.in_channels, H, W, generator=g))
    blocks = [*cn.transformer_blocks, *getattr(cn, "single_transformer_blocks", [])]
    calls = []
    for block in blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # (a recomputation may stop early)

    def gradients() -> tuple[dict[str, torch.Tensor], int]:
        cn.zero_grad(set_to_none=True)
        calls.clear()
        res = cn(**inputs, condition=cond, conditioning_scale=0.7)
        sum(t.square().sum() for t in res.tensors.values()).backward()
        return {n: p.grad.clone() for n, p in cn.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = gradients()
    enable_gradient_checkpointing(cn)
    assert cn.gradient_checkpointing
    checkpointed, checkpointed_calls = gradients()
    assert plain_calls == len(blocks) and checkpointed_calls == 2 * len(blocks)  # recomputed in the backward pass
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)
    with torch.no_grad():  # not training: no checkpointing
        calls.clear()
        cn(**inputs, condition=cond)
        assert len(calls) == len(blocks)
