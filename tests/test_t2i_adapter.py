"""T2I-Adapter: agreement with diffusers' T2IAdapter (full, light, XL) on tiny seeded models, the TencentARC and
diffusers layouts, strict loading, and features added inside a UNet's down blocks."""

from __future__ import annotations

import re

import pytest
import torch

from controlnet.testing import SD15_UNET, SDXL_UNET, build_unet, sdxl_added_cond_kwargs
from controlnet.errors import UserError
from controlnet.t2i_adapter import (
    T2IAdapterConfig,
    check_compatible,
    infer_config,
    load_t2i_adapter,
    native_to_original,
    t2i_adapter_from_state_dict,
)

diffusers = pytest.importorskip("diffusers")

# Tiny configs of the three released architectures (diffusers T2IAdapter arguments).
TINY = {
    "full_adapter": dict(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=8,
                         adapter_type="full_adapter"),
    "light_adapter": dict(in_channels=3, channels=[32, 64], num_res_blocks=4, downscale_factor=8,
                          adapter_type="light_adapter"),
    "full_adapter_xl": dict(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=2, downscale_factor=16,
                            adapter_type="full_adapter_xl"),
}
# A 3-block SDXL-like UNet: the XL adapter's four features land in its three down blocks and its mid block.
SDXL3 = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4))
# A 3-block SD1-like UNet for the light adapter, whose last stage repeats the last width at half the resolution
# (SD1.5: widths 320, 640, 1280, 1280).
SD1_3 = dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64, 64))
IMAGE = 64  # condition side: latents are 8x8


def oracle(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.T2IAdapter(**TINY[kind]).eval()


def image(seed: int = 1, channels: int = 3) -> torch.Tensor:
    return torch.rand(2, channels, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def tencentarc_layout(diffusers_sd: dict, kind: str, num_res_blocks: int) -> dict:
    """diffusers keys → the released TencentARC keys, written here independently of the loader: ComfyUI's
    renaming for the full adapters (``adapter.body.i.resnets.j.`` → ``body.{i*n+j}.``), the extractor's names
    (``body.i.body.j.``) for the light one."""
    out = {}
    for key, value in diffusers_sd.items():
        key = key.removeprefix("adapter.")
        if kind == "light_adapter":
            key = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", r"body.\1.body.\2.", key)
        else:
            key = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.",
                         lambda m: f"body.{int(m.group(1)) * num_res_blocks + int(m.group(2))}.", key)
            key = re.sub(r"^body\.(\d+)\.in_conv\.", lambda m: f"body.{int(m.group(1)) * num_res_blocks}.in_conv.", key)
        out[key] = value
    return out


def assert_close_features(ours, theirs, atol: float = 1e-5) -> float:
    assert len(ours) == len(theirs)
    worst = 0.0
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        worst = max(worst, (a - b).abs().max().item())
    assert worst <= atol, worst
    return worst


@pytest.mark.parametrize("kind", list(TINY))
def test_features_match_diffusers_in_both_layouts(kind):
    ref = oracle(kind)
    x = image()
    with torch.no_grad():
        expected = ref(x)
        ours = t2i_adapter_from_state_dict(ref.state_dict(), name="diffusers layout").eval()
        assert ours.config == T2IAdapterConfig(**TINY[kind])  # inferred from the shapes alone
        assert_close_features(ours(x), expected)
        original = tencentarc_layout(ref.state_dict(), kind, TINY[kind]["num_res_blocks"])
        assert not any(k.startswith("adapter.") or ".resnets." in k for k in original)
        from_original = t2i_adapter_from_state_dict(original, name="TencentARC layout").eval()
        assert from_original.config == ours.config
        assert_close_features(from_original(x), expected)
        # scale multiplies every feature map (diffusers' adapter_conditioning_scale)
        assert_close_features(ours(x, scale=0.5), [f * 0.5 for f in expected])
    assert native_to_original(ours.state_dict(), ours.config).keys() == original.keys()


@pytest.mark.parametrize("kind", list(TINY))
def test_diffusers_folders_round_trip(kind, tmp_path):
    ref = oracle(kind, seed=3)
    ref.save_pretrained(tmp_path / "theirs")
    ours = load_t2i_adapter(tmp_path / "theirs")
    x = image(4)
    with torch.no_grad():
        assert_close_features(ours(x), ref(x), atol=0.0)
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.T2IAdapter.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close_features(back(x), ref(x), atol=0.0)


def test_single_files_load(tmp_path):
    from safetensors.torch import save_file

    ref = oracle("full_adapter", seed=5)
    original = tencentarc_layout(ref.state_dict(), "full_adapter", 2)
    torch.save(original, tmp_path / "t2iadapter_tiny_sd14v1.pth")
    save_file(original, str(tmp_path / "t2iadapter_tiny.safetensors"))
    x = image(6)
    with torch.no_grad():
        for name in ("t2iadapter_tiny_sd14v1.pth", "t2iadapter_tiny.safetensors"):
            assert_close_features(load_t2i_adapter(tmp_path / name)(x), ref(x), atol=0.0)


def unet_outputs(unet, features):
    g = torch.Generator().manual_seed(7)
    cfg = unet.config
    sample = torch.randn(2, 4, IMAGE // 8, IMAGE // 8, generator=g)
    context = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)
    added = sdxl_added_cond_kwargs(dict(cfg), 2, IMAGE, IMAGE) if cfg.addition_embed_type else None
    kwargs = {} if features is None else {"down_intrablock_additional_residuals": list(features)}
    return unet(sample, torch.tensor([10, 500]), context, added_cond_kwargs=added, **kwargs).sample


@pytest.mark.parametrize("kind,family,overrides", [
    ("full_adapter", "sd1", {}), ("light_adapter", "sd1", SD1_3), ("full_adapter_xl", "sdxl", SDXL3),
])
def test_unet_with_our_features_equals_oracle(kind, family, overrides):
    unet = build_unet(family, **overrides)
    ref = oracle(kind, seed=8)
    ours = t2i_adapter_from_state_dict(ref.state_dict()).eval()
    x = image(9)
    with torch.no_grad():
        expected = unet_outputs(unet, ref(x))
        got = unet_outputs(unet, ours(x))
        plain = unet_outputs(unet, None)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-3  # the features act inside the UNet
    check_compatible(ours, unet.config)


# The released adapters' configs (diffusers' config.json of TencentARC/t2iadapter_*_sd14v1, *_sd15v2,
# t2iadapter_color_sd14v1, t2i-adapter-*-sdxl-1.0).
RELEASED = {
    "full_adapter": (T2IAdapterConfig(3, (320, 640, 1280, 1280), 2, 8, "full_adapter"), SD15_UNET),
    "light_adapter": (T2IAdapterConfig(3, (320, 640, 1280), 4, 8, "light_adapter"), SD15_UNET),
    "full_adapter_xl": (T2IAdapterConfig(3, (320, 640, 1280, 1280), 2, 16, "full_adapter_xl"), SDXL_UNET),
}


def test_released_adapters_fit_their_base_and_no_other():
    for kind, (config, unet_config) in RELEASED.items():
        check_compatible(config, unet_config)
        other = SDXL_UNET if unet_config is SD15_UNET else SD15_UNET
        with pytest.raises(UserError, match=f"{kind}, feature widths"):
            check_compatible(config, other)


def test_an_adapter_for_another_base_is_refused_in_one_line():
    sd1_adapter = t2i_adapter_from_state_dict(oracle("full_adapter").state_dict())
    xl_adapter = t2i_adapter_from_state_dict(oracle("full_adapter_xl").state_dict())
    with pytest.raises(UserError, match="full_adapter, feature widths \\[32, 64\\]\\) does not fit") as err:
        check_compatible(sd1_adapter, build_unet("sdxl", **SDXL3).config)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="full_adapter_xl"):
        check_compatible(xl_adapter, build_unet("sd1").config)


def test_infer_config_reads_image_channels_and_factor():
    torch.manual_seed(0)
    sketch = diffusers.T2IAdapter(in_channels=1, channels=[32, 64], num_res_blocks=2, adapter_type="full_adapter")
    cfg = infer_config(tencentarc_layout(sketch.state_dict(), "full_adapter", 2), "original")
    assert (cfg.in_channels, cfg.downscale_factor, cfg.adapter_type) == (1, 8, "full_adapter")


def test_strict_loading_refuses_in_one_line():
    sd = oracle("full_adapter").state_dict()
    with pytest.raises(UserError, match="missing keys") as missing:
        t2i_adapter_from_state_dict({k: v for k, v in sd.items() if "block2.bias" not in k},
                                    config=T2IAdapterConfig(**TINY["full_adapter"]))
    with pytest.raises(UserError, match="unexpected keys"):
        t2i_adapter_from_state_dict({**sd, "adapter.body.0.extra.weight": torch.zeros(1)},
                                    config=T2IAdapterConfig(**TINY["full_adapter"]))
    bad = dict(sd)
    bad["adapter.body.1.resnets.0.block1.weight"] = torch.full_like(bad["adapter.body.1.resnets.0.block1.weight"], float("nan"))
    with pytest.raises(UserError, match="NaN"):
        t2i_adapter_from_state_dict(bad)
    with pytest.raises(UserError, match="adapter_type"):
        T2IAdapterConfig(adapter_type="style")
    assert "\n" not in str(missing.value)


def test_a_controlnet_is_refused_where_an_adapter_is_needed(tmp_path):
    from safetensors.torch import save_file

    from controlnet.model import ControlNet

    cn = ControlNet.from_unet(build_unet("sd1"))
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(tmp_path / "cn.safetensors"))
    with pytest.raises(UserError, match="is a ControlNet \\(diffusers layout\\), but a T2I-Adapter is needed") as err:
        load_t2i_adapter(tmp_path / "cn.safetensors")
    assert "\n" not in str(err.value)


def test_image_sides_must_divide_by_the_unshuffle():
    ours = t2i_adapter_from_state_dict(oracle("full_adapter").state_dict())
    with pytest.raises(UserError, match="divisible by 8"):
        ours(torch.rand(1, 3, 60, 64))
