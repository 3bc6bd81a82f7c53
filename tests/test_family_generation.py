"""Whole generations with every UNet control family through one door (``Pipeline.load_controlnet`` /
``ControlUnit``): T2I-Adapters against diffusers' StableDiffusion(XL)AdapterPipeline, a Union ControlNet against
StableDiffusionXLControlNetUnionPipeline, a Control-LoRA against the ControlNet it describes, and the refusals."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from controlnet.checkpoints import save_controlnet
from controlnet.errors import UserError
from controlnet.model import ControlNet
from controlnet.pipeline import ControlUnit, Pipeline
from controlnet.testing import SD_SCHEDULE, build_text_encoder_2, build_unet, tiny_components, trained_like
from test_control_lora import control_lora_file
from test_t2i_adapter import SDXL3, tencentarc_layout

diffusers = pytest.importorskip("diffusers")

WORDS = ["red", "circle", "blue", "square", "ugly"]
PROMPT, NEGATIVE = "red circle", "ugly"
SIZE = 64  # square: the adapters' pooled features must land on the UNet's (latents 8x8)
STEPS = 4
HINT_CHANNELS = (8, 16, 16, 32)  # a tiny hint encoder with the released layout (three stride-2 convs)
# Tiny adapters of the tiny UNets' widths: full_adapter for SD1 (32, 64), full_adapter_xl for a 3-block SDXL.
ADAPTERS = {"sd1": dict(channels=[32, 64], num_res_blocks=2, downscale_factor=8, adapter_type="full_adapter"),
            "sdxl": dict(channels=[32, 64, 64, 64], num_res_blocks=2, downscale_factor=16,
                         adapter_type="full_adapter_xl")}


def components(family: str, **unet_overrides) -> dict:
    from diffusers import DDIMScheduler

    second = build_text_encoder_2(WORDS, seed=2) if family == "sdxl" else {}
    unet = build_unet(family, seed=1, **unet_overrides) if unet_overrides else None
    return tiny_components(WORDS, family, scheduler=DDIMScheduler(**SD_SCHEDULE), unet=unet, **second)


def condition(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(seed))


def ours(pipe: Pipeline, units: list[ControlUnit], latents: torch.Tensor, **kw) -> torch.Tensor:
    kw = {"negative_prompt": NEGATIVE, **kw}
    return pipe(PROMPT, units, steps=STEPS, size=(SIZE, SIZE), guidance=7.5, latents=latents.clone(),
                scheduler="ddim", progress=False, output_type="latent", **kw).latents


def adapter_oracle(family: str, seed: int = 0, in_channels: int = 3):
    torch.manual_seed(seed)
    return trained_like(diffusers.T2IAdapter(**ADAPTERS[family], in_channels=in_channels), seed + 1)


@pytest.fixture(scope="module")
def sd1():
    comps = components("sd1")
    return Pipeline(**comps, dtype="fp32", device="cpu"), comps


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- T2I-Adapter


# adapter_conditioning_factor: SDXL's adapter pipeline has it; SD's acts at every step (factor 1). "sd1-gray":
# a one-channel (sketch) adapter given a gray image.
@pytest.mark.parametrize("family,scale,factor", [("sd1", 1.0, 1.0), ("sd1", 0.7, 1.0), ("sd1-gray", 1.0, 1.0),
                                                 ("sdxl", 1.0, 1.0), ("sdxl", 0.7, 0.5)])
def test_t2i_adapter_matches_diffusers_adapter_pipeline(family, scale, factor, tmp_path):
    gray = family == "sd1-gray"
    family = "sd1" if gray else family
    comps = components(family, **(SDXL3 if family == "sdxl" else {}))
    adapter = adapter_oracle(family, in_channels=1 if gray else 3)
    pipeline = diffusers.StableDiffusionXLAdapterPipeline if family == "sdxl" else diffusers.StableDiffusionAdapterPipeline
    extra = {} if family == "sdxl" else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    oracle = pipeline(**comps, adapter=adapter, **extra)
    oracle.set_progress_bar_config(disable=True)
    image, start = condition(1), noise(2)
    image = image.convert("L") if gray else image
    negative = {} if family == "sdxl" else {"negative_prompt": NEGATIVE}  # SDXL: an empty negative → zeros
    factor_kw = {"adapter_conditioning_factor": factor} if family == "sdxl" else {}
    expected = oracle(PROMPT, image=image, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                      latents=start.clone(), adapter_conditioning_scale=scale, output_type="latent", **factor_kw,
                      **negative).images
    # The released TencentARC layout, recognised from the file by the one door.
    path = tmp_path / "t2iadapter_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tencentarc_layout(adapter.state_dict(), ADAPTERS[family]["adapter_type"], 2).items()},
              str(path))
    pipe = Pipeline(**comps, dtype="fp32", device="cpu")
    ours_negative = negative.get("negative_prompt", "")
    got = ours(pipe, [ControlUnit(str(path), image, strength=scale, end=factor)], start, negative_prompt=ours_negative)
    error = max_error(got, expected)
    assert error <= 1e-4, error
    plain = ours(pipe, [], start, negative_prompt=ours_negative)
    assert max_error(got, plain) > 1e-2  # the adapter acts


def test_t2i_adapter_composes_with_a_controlnet(sd1):
    """An adapter and a ControlNet in one generation: the adapter's features inside the down blocks, the
    ControlNet's residuals on the skips, each as when alone (checked against the UNet given both by hand)."""
    pipe, comps = sd1
    adapter = adapter_oracle("sd1")
    ours_adapter = pipe.load_controlnet(_saved_adapter(adapter))
    cn = trained_like(ControlNet.from_unet(comps["unet"]), 10)
    a, b = condition(3), condition(4)
    calls: list[dict] = []
    handle = comps["unet"].register_forward_pre_hook(lambda m, args, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        ours(pipe, [ControlUnit(ours_adapter, a, strength=0.8), ControlUnit(cn, b, strength=1.2)], noise(5))
    finally:
        handle.remove()
    assert len(calls) == STEPS
    with torch.no_grad():
        features = adapter(torch.from_numpy(np.asarray(a, dtype=np.float32) / 255).permute(2, 0, 1)[None])
    first = calls[0]
    assert len(first["down_block_additional_residuals"]) == cn.num_residuals - 1
    for got, want in zip(first["down_intrablock_additional_residuals"], features):
        assert got.shape[0] == 2  # repeated over the CFG halves
        torch.testing.assert_close(got, torch.cat([want * 0.8] * 2), atol=1e-5, rtol=0)


def _saved_adapter(adapter, tmp=None) -> str:
    import tempfile

    folder = tempfile.mkdtemp(prefix="adapter") if tmp is None else str(tmp)
    adapter.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- Union


def union_models(unet, num_control_type: int = 6, seed: int = 0):
    names = set(inspect.signature(diffusers.ControlNetUnionModel.__init__).parameters)
    c0 = unet.config.block_out_channels[0]
    torch.manual_seed(seed)
    theirs = diffusers.ControlNetUnionModel(
        **{k: v for k, v in unet.config.items() if k in names}, conditioning_embedding_out_channels=HINT_CHANNELS,
        num_control_type=num_control_type, num_trans_channel=c0, num_proj_channel=c0, num_trans_head=4)
    theirs = trained_like(theirs, seed + 1)
    return theirs


@pytest.fixture(scope="module")
def sdxl_union(tmp_path_factory):
    comps = components("sdxl")
    theirs = union_models(comps["unet"])
    folder = tmp_path_factory.mktemp("union") / "union"
    theirs.save_pretrained(folder)
    return Pipeline(**comps, dtype="fp32", device="cpu"), comps, theirs, str(folder)


@pytest.mark.parametrize("types,scale", [(["depth"], 0.8), (["depth", "openpose"], 0.9)])
def test_union_matches_diffusers_union_pipeline(sdxl_union, types, scale):
    """One condition, and two conditions of one union model fused into one pass (their units name the same
    folder): diffusers' pipeline scales every condition's fused input by its conditioning scale, and so does our
    ``strength``."""
    from controlnet.union import CONTROL_TYPES

    pipe, comps, theirs, folder = sdxl_union
    images = [condition(10 + k) for k in range(len(types))]
    oracle = diffusers.StableDiffusionXLControlNetUnionPipeline(**comps, controlnet=theirs, add_watermarker=False)
    oracle.set_progress_bar_config(disable=True)
    start = noise(7)
    expected = oracle(PROMPT, control_image=images, control_mode=[CONTROL_TYPES[t] for t in types],
                      controlnet_conditioning_scale=scale, num_inference_steps=STEPS, guidance_scale=7.5,
                      height=SIZE, width=SIZE, latents=start.clone(), output_type="latent").images
    units = [ControlUnit(folder, image, strength=scale, control_type=t) for image, t in zip(images, types)]
    got = ours(pipe, units, start, negative_prompt="")
    error = max_error(got, expected)
    assert error <= 1e-4, error


def test_union_residual_scale_scales_the_fused_pass(sdxl_union):
    """Several conditions: ``residual_scale`` multiplies the pass's residuals (a forward with conditioning_scale),
    while ``strength`` acts on the fused inputs. Checked against the residuals of the fused forward by hand."""
    pipe, comps, theirs, folder = sdxl_union
    model = pipe.load_controlnet(folder)
    images = [condition(20), condition(21)]
    calls: list[tuple] = []
    handle = comps["unet"].register_forward_pre_hook(lambda m, args, kw: calls.append((args, dict(kw))),
                                                     with_kwargs=True)
    try:
        units = [ControlUnit(folder, images[0], strength=0.6, control_type="canny", residual_scale=0.5),
                 ControlUnit(folder, images[1], strength=1.1, control_type="segment", residual_scale=0.5)]
        ours(pipe, units, noise(8), negative_prompt="")
    finally:
        handle.remove()
    (x, t), kwargs = calls[0]
    hints = [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None].expand(2, -1, -1, -1)
             for im in images]
    with torch.no_grad():
        res = model(x, t, kwargs["encoder_hidden_states"], hints, control_type=["canny", "segment"],
                    condition_scale=[0.6, 1.1], conditioning_scale=0.5, added_cond_kwargs=kwargs["added_cond_kwargs"])
        unscaled = model(x, t, kwargs["encoder_hidden_states"], hints, control_type=["canny", "segment"],
                         condition_scale=[0.6, 1.1], added_cond_kwargs=kwargs["added_cond_kwargs"])
    for got, want, full in zip(kwargs["down_block_additional_residuals"], res.down, unscaled.down):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got, full * 0.5, atol=1e-5, rtol=0)
    torch.testing.assert_close(kwargs["mid_block_additional_residual"], res.mid, atol=1e-5, rtol=0)


def test_union_control_type_refusals(sdxl_union):
    pipe, _, _, folder = sdxl_union
    with pytest.raises(UserError, match="give the condition's control type .* one of openpose, depth") as err:
        ours(pipe, [ControlUnit(folder, condition(1))], noise(1))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown control type 'halo'"):
        ours(pipe, [ControlUnit(folder, condition(1), control_type="halo")], noise(1))
    with pytest.raises(UserError, match="need the same start"):
        ours(pipe, [ControlUnit(folder, condition(1), control_type="depth"),
                    ControlUnit(folder, condition(2), control_type="canny", start=0.5)], noise(1))


def test_control_type_on_another_family_is_refused(sd1):
    pipe, comps = sd1
    cn = trained_like(ControlNet.from_unet(comps["unet"]), 10)
    with pytest.raises(UserError, match="no Union/ProMax ControlNet"):
        ours(pipe, [ControlUnit(cn, condition(1), control_type="depth")], noise(1))


# --------------------------------------------------------------------------- Control-LoRA


def test_control_lora_generation_equals_its_merged_controlnet(sd1, tmp_path):
    """A Control-LoRA file through the door gives the generation of the ControlNet merged by hand from the base
    (base weights, the file's whole tensors, W + up @ down)."""
    from controlnet.checkpoints import original_to_diffusers

    pipe, comps = sd1
    sd = control_lora_file(comps["unet"], rank=4, seed=3)
    path = tmp_path / "control-lora-canny-rank4.safetensors"
    save_file(sd, str(path))
    merged = ControlNet.from_unet(comps["unet"])
    native = original_to_diffusers({k: v for k, v in sd.items() if k != "lora_controlnet"})
    params = merged.state_dict()
    with torch.no_grad():
        for key, value in native.items():
            if key.endswith(".up"):
                weight = key.removesuffix(".up") + ".weight"
                up, down = value, native[key.removesuffix(".up") + ".down"]
                params[weight] += (up.flatten(1) @ down.flatten(1)).reshape(params[weight].shape)
            elif not key.endswith(".down"):
                params[key].copy_(value)
    image, start = condition(30), noise(9)
    got = ours(pipe, [ControlUnit(str(path), image, strength=0.9)], start)
    want = ours(pipe, [ControlUnit(merged.eval(), image, strength=0.9)], start)
    error = max_error(got, want)
    assert error <= 1e-5, error


# --------------------------------------------------------------------------- refusals


def test_a_model_for_another_base_is_refused_naming_both(sd1, tmp_path):
    pipe, _ = sd1
    xl_adapter = _saved_adapter(adapter_oracle("sdxl"), tmp_path / "xl_adapter")  # made for SDXL3
    with pytest.raises(UserError, match="T2I-Adapter for sdxl .* does not fit the base model, sd1") as err:
        pipe.load_controlnet(xl_adapter)
    assert "\n" not in str(err.value)
    xl_lora = tmp_path / "control-lora-xl.safetensors"
    save_file(control_lora_file(build_unet("sdxl"), rank=2), str(xl_lora))
    with pytest.raises(UserError, match="is a Control-LoRA for sdxl .* but the base model is sd1"):
        pipe.load_controlnet(str(xl_lora))
    xl_cn = save_controlnet(ControlNet.from_unet(build_unet("sdxl")), tmp_path / "controlnet_xl")
    with pytest.raises(UserError, match="for sdxl .* but the base model is sd1"):
        pipe.load_controlnet(xl_cn)


def test_a_transformer_controlnet_on_a_unet_base_is_refused(sd1, tmp_path):
    pipe, _ = sd1
    torch.manual_seed(0)
    flux = diffusers.FluxControlNetModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
    flux.save_pretrained(tmp_path / "flux_cn")
    with pytest.raises(UserError, match="transformer base \\(Flux, SD3 or Qwen-Image\\), but the base model is sd1") as err:
        pipe.load_controlnet(tmp_path / "flux_cn")
    assert "\n" not in str(err.value)
