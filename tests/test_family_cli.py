"""The command line's one door for the control families: `controlnet info` on key-exact files of every family,
`--controlnet` recognising them in `generate` (with `--control-type` for union models, recorded in the PNG),
`controlnet convert` where a target layout exists, and the one-line refusals (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from controlnet.errors import EXIT_BAD_INPUT
from controlnet.testing import SD_SCHEDULE, build_text_encoder_2, tiny_components, trained_like
from test_families import files  # noqa: F401  (the fixture: a file or folder of every UNet family)
from test_union import SDXL64
from test_union import oracle as union_oracle

diffusers = pytest.importorskip("diffusers")

WORDS = ["red", "circle"]


def main(argv: list[str]) -> int:
    from controlnet.cli import main as cli_main

    return cli_main(argv)


def info(capsys, path) -> dict[str, str]:
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    return dict(line.split(": ", 1) for line in out.strip().splitlines())


def refused(capsys, code: int) -> str:
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------- controlnet info


def test_info_names_every_unet_family(files, capsys):  # noqa: F811
    for family, paths in files.items():
        for path in paths:
            lines = info(capsys, path)
            assert lines["family"].split(", ")[0] == family, (path, lines)
            assert set(lines) == {"file", "family", "base", "layers", "conditions", "dtype", "parameters"}


def test_info_details_of_each_family(files, capsys):  # noqa: F811
    cn = info(capsys, files["controlnet"][0])
    # The tiny SD1 UNet: 2 blocks of 1 layer → conv_in + (1 + downsampler) + 1 = 4 skips, and the mid.
    assert cn["base"] == "sd1" and cn["layers"] == "5 residuals (4 skips + mid); original layout"
    assert cn["conditions"] == "a 3-channel image" and cn["dtype"] == "float32"
    folder = info(capsys, files["controlnet-diffusers"][0])
    assert folder["layers"] == "5 residuals (4 skips + mid); block widths [32, 64]; diffusers layout"
    assert folder["parameters"] == cn["parameters"]  # the same model in both layouts
    union = info(capsys, files["union"][2])
    assert union["base"] == "sdxl"
    assert union["conditions"].endswith("8 control types (ProMax): openpose, depth, hed, pidi, scribble, ted, canny, "
                                        "lineart, anime_lineart, mlsd, normal, segment, tile, repaint, inpaint")
    lora = info(capsys, files["control-lora"][0])
    assert lora["base"] == "sd1 (context width 32)" and lora["layers"].endswith("rank 4")
    adapter = info(capsys, files["t2i-adapter"][1])
    assert adapter["base"] == "sd1/sd2" and adapter["conditions"] == "a 3-channel image, unshuffled 8x"
    assert adapter["layers"] == ("full_adapter, 2 feature maps (widths [32, 64]), 2 residual blocks each; "
                                 "original layout")
    assert info(capsys, files["t2i-adapter"][0])["layers"].endswith("diffusers layout")


def test_info_counts_parameters_from_the_header(files, capsys):  # noqa: F811
    from safetensors import safe_open

    path = files["controlnet"][0]
    with safe_open(path, framework="pt") as f:
        total = sum(f.get_tensor(k).numel() for k in f.keys())
    assert total >= 1e5 and info(capsys, path)["parameters"] == f"{total / 1e6:.2f}M"


def test_info_on_transformer_controlnets(tmp_path, capsys):
    torch.manual_seed(0)
    flux = diffusers.FluxControlNetModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=[2, 2, 4], num_mode=7)
    flux.save_pretrained(tmp_path / "flux")
    lines = info(capsys, tmp_path / "flux")
    assert lines["family"] == "flux-controlnet, a Flux ControlNet (diffusers layout)" and lines["base"] == "flux"
    assert lines["layers"] == "2 double-stream + 1 single-stream blocks"
    assert lines["conditions"] == "union: 7 modes (canny, tile, depth, blur, pose, gray, lq)"
    assert lines["parameters"] == str(sum(p.numel() for p in flux.parameters()))
    sd3 = diffusers.SD3ControlNetModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                       num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                       pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    save_file({k: v.contiguous() for k, v in sd3.state_dict().items()}, str(tmp_path / "sd3_cn.safetensors"))
    lines = info(capsys, tmp_path / "sd3_cn.safetensors")
    assert lines["family"] == "sd3-controlnet, an SD3 ControlNet (diffusers layout)"
    assert lines["layers"] == "1 joint blocks" and lines["conditions"] == "one condition image"


def test_info_on_a_bundled_name(capsys):
    from controlnet.embedded import bundled_controlnets

    for name, path in bundled_controlnets().items():
        assert info(capsys, name) == {**info(capsys, path), "file": str(path)}


def test_info_refuses_what_is_no_control_model(tmp_path, capsys):
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
    assert "no control model we know" in refused(capsys, main(["info", str(tmp_path / "vae.safetensors")]))
    assert "does not exist" in refused(capsys, main(["info", str(tmp_path / "missing.safetensors")]))


# --------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny SD1 and SDXL base folders, a T2I-Adapter for each, a union model for SDXL, and a condition image."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("family_cli")
    sd1 = tiny_components(WORDS, "sd1", scheduler=DDIMScheduler(**SD_SCHEDULE))
    StableDiffusionPipeline(**sd1, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "sd1")
    sdxl = tiny_components(WORDS, "sdxl", scheduler=DDIMScheduler(**SD_SCHEDULE), **build_text_encoder_2(WORDS, 2))
    StableDiffusionXLPipeline(**sdxl).save_pretrained(root / "sdxl")
    torch.manual_seed(0)
    adapter = trained_like(diffusers.T2IAdapter(channels=[32, 64], num_res_blocks=2), 1)
    adapter.save_pretrained(root / "adapter_sd1")
    _, union = union_oracle(6)  # the tiny SDXL UNet's config, as the base's
    union.save_pretrained(root / "union")
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "cond.png")
    return root


def generate(root, base: str, out, *units: str) -> int:
    return main(["generate", "--base", str(root / base), "--prompt", "red circle", "--steps", "2", "--quiet",
                 "--size", "64x64", "--seed", "1", "--out", str(out), *units])


def test_generate_takes_a_t2i_adapter_and_a_control_lora_together(bases, files, tmp_path, capsys):  # noqa: F811
    out, cond = tmp_path / "out", str(bases / "cond.png")
    assert generate(bases, "sd1", out, "--controlnet", str(bases / "adapter_sd1"), "--control", cond,
                    "--strength", "0.7", "--end", "0.5", "--controlnet", files["control-lora"][0], "--control", cond) == 0
    with Image.open(out / "00000-1.png") as image:
        units = json.loads(image.text["controlnets"])
        both = np.asarray(image)
    assert units[0]["controlnet"] == str(bases / "adapter_sd1") and units[0]["strength"] == 0.7
    assert units[0]["end"] == 0.5 and units[1]["controlnet"] == files["control-lora"][0]
    assert generate(bases, "sd1", tmp_path / "alone", "--controlnet", str(bases / "adapter_sd1"), "--control", cond,
                    "--strength", "0.7", "--end", "0.5") == 0
    with Image.open(tmp_path / "alone" / "00000-1.png") as image:
        assert not np.array_equal(np.asarray(image), both)  # the Control-LoRA acts beside the adapter


def test_generate_union_units_record_their_control_types_and_rerun(bases, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(bases)  # stored settings name files under the current folder or the PNG's
    out = tmp_path / "out"
    union, cond = str(bases / "union"), str(bases / "cond.png")
    assert generate(bases, "sdxl", out, "--controlnet", union, "--control", cond, "--control-type", "depth",
                    "--controlnet", union, "--control", cond, "--control-type", "openpose", "--strength", "0.5",
                    "--residual-scale", "0.8", "--controlnet", union, "--control", cond, "--control-type", "canny") \
        == EXIT_BAD_INPUT  # fused units must share their residual scale
    assert "need the same residual_scale" in capsys.readouterr().err
    assert generate(bases, "sdxl", out, "--controlnet", union, "--control", cond, "--control-type", "depth",
                    "--controlnet", union, "--control", cond, "--control-type", "openpose", "--strength", "0.5") == 0
    first = out / "00000-1.png"
    with Image.open(first) as image:
        units = json.loads(image.text["settings"])["controlnets"]
        pixels = np.asarray(image)
    assert [(u["control_type"], u["strength"]) for u in units] == [("depth", 1.0), ("openpose", 0.5)]
    # The same two conditions as consecutive --control options after one --controlnet.
    assert generate(bases, "sdxl", tmp_path / "consecutive", "--controlnet", union, "--control", cond, "--control-type",
                    "depth", "--control", cond, "--control-type", "openpose", "--strength", "0.5") == 0
    with Image.open(tmp_path / "consecutive" / "00000-1.png") as image:
        assert np.array_equal(np.asarray(image), pixels)
    capsys.readouterr()
    assert main(["generate", "--from-png", str(first), "--quiet", "--out", str(tmp_path / "again")]) == 0
    with Image.open(tmp_path / "again" / "00000-1.png") as image:
        assert np.array_equal(np.asarray(image), pixels)  # the control types came back with the settings


def test_generate_refusals_exit_2_in_one_line(bases, tmp_path, capsys, files):  # noqa: F811
    cond, out = str(bases / "cond.png"), tmp_path / "out"
    union = str(bases / "union")
    err = refused(capsys, generate(bases, "sdxl", out, "--controlnet", union, "--control", cond))
    assert "is a Union/ProMax ControlNet: give the condition's control type (--control-type NAME), one of openpose" in err
    err = refused(capsys, generate(bases, "sdxl", out, "--controlnet", union, "--control", cond, "--control-type", "halo"))
    assert "unknown control type 'halo'" in err and "openpose" in err
    err = refused(capsys, generate(bases, "sdxl", out, "--controlnet", str(bases / "adapter_sd1"), "--control", cond))
    assert "T2I-Adapter for sd1/sd2" in err and "the base model, sdxl" in err
    err = refused(capsys, generate(bases, "sdxl", out, "--controlnet", files["control-lora"][0], "--control", cond))
    assert "Control-LoRA for sd1" in err and "the base model is sdxl" in err
    err = refused(capsys, generate(bases, "sd1", out, "--controlnet", str(bases / "adapter_sd1"), "--control", cond,
                                   "--control-type", "depth"))
    assert "no Union/ProMax ControlNet" in err
    assert not out.exists()


# --------------------------------------------------------------------------- convert


def test_convert_t2i_adapter_between_layouts(files, tmp_path, capsys):  # noqa: F811
    from controlnet.t2i_adapter import load_t2i_adapter

    original = files["t2i-adapter"][1]
    assert main(["convert", original, str(tmp_path / "folder"), "--to", "diffusers", "-q"]) == 0
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "back.safetensors"), "--to", "original", "-q"]) == 0
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference = diffusers.T2IAdapter.from_pretrained(tmp_path / "folder").eval()
    with torch.no_grad():
        for got, want in zip(load_t2i_adapter(tmp_path / "back.safetensors")(x), reference(x)):
            assert torch.equal(got, want)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "back.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(torch.load(original, weights_only=True))  # TencentARC's key names, exactly


def test_convert_union_to_a_diffusers_folder_and_refusals(files, tmp_path, capsys):  # noqa: F811
    """A lone ProMax .safetensors (xinsir's file, no config beside it; shapes a released config can be inferred
    from) becomes a folder diffusers' ControlNetUnionModel loads with the same tensors."""
    _, promax = union_oracle(8, **SDXL64)
    single = str(tmp_path / "diffusion_pytorch_model_promax.safetensors")
    save_file({k: v.contiguous() for k, v in promax.state_dict().items()}, single)
    assert main(["convert", single, str(tmp_path / "union"), "--to", "diffusers", "-q"]) == 0
    converted = diffusers.ControlNetUnionModel.from_pretrained(tmp_path / "union")
    assert converted.config.num_control_type == 8
    theirs = promax.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in converted.state_dict().items())
    err = refused(capsys, main(["convert", single, str(tmp_path / "u.safetensors"), "--to", "original"]))
    assert "Union/ProMax ControlNet" in err and "diffusers" in err
    err = refused(capsys, main(["convert", files["control-lora"][0], str(tmp_path / "cl"), "--to", "diffusers"]))
    assert "Control-LoRA" in err
