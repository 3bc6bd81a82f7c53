"""Checkpoint files: diffusers interchange, the original layout (full-size key lists), safe loading (pickles,
truncated files, NaN/Inf weights, absurd configs), families, CLI."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from controlnet.checkpoints import (
    FORMATS,
    check_compatible,
    controlnet_from_state_dict,
    detect_family,
    load_controlnet,
    original_state_dict,
    save_controlnet,
    save_diffusers_folder,
)
from controlnet.testing import FAMILIES, SD15_UNET, SD21_UNET, SDXL_UNET, build_unet, unet_config
from controlnet.errors import EXIT_BAD_INPUT, UserError
from controlnet.model import ControlNet, ControlNetConfig
from test_fixtures import FIXTURES
from test_model import make_inputs

TOLERANCE = 1e-5


def trained_controlnet(family: str, seed: int = 0, **kwargs) -> tuple[torch.nn.Module, ControlNet]:
    """A tiny base and a ControlNet whose zero convs and hint output conv hold random non-zero weights."""
    unet = build_unet(family, seed=seed)
    cn = ControlNet.from_unet(unet, **kwargs)
    randomize(cn, seed)
    return unet, cn


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def residuals(model, inputs: dict) -> list[torch.Tensor]:
    """Residuals of our ControlNet or of diffusers' ControlNetModel, down then mid."""
    with torch.no_grad():
        if isinstance(model, ControlNet):
            out = model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["hint"],
                        added_cond_kwargs=inputs["added_cond_kwargs"])
            return [*out.down, out.mid]
        out = model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], controlnet_cond=inputs["hint"],
                    added_cond_kwargs=inputs["added_cond_kwargs"], return_dict=True)
        return [*out.down_block_res_samples, out.mid_block_res_sample]


def assert_same_outputs(a, b, inputs: dict) -> float:
    ra, rb = residuals(a, inputs), residuals(b, inputs)
    assert len(ra) == len(rb)
    assert all(r.abs().max() > 1e-2 for r in ra)  # non-trivial residuals
    err = max((x - y).abs().max().item() for x, y in zip(ra, rb))
    assert err < TOLERANCE
    return err


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_loads_our_folder(family, tmp_path):
    from diffusers import ControlNetModel

    unet, cn = trained_controlnet(family, seed=1)
    save_diffusers_folder(cn, tmp_path / "cn")
    theirs = ControlNetModel.from_pretrained(tmp_path / "cn").eval()
    assert theirs.state_dict().keys() == cn.state_dict().keys()
    print(f"\n{family}: ours -> diffusers max err {assert_same_outputs(cn, theirs, make_inputs(unet)):.2e}")


@pytest.mark.parametrize("family", FAMILIES)
def test_we_load_diffusers_folders(family, tmp_path):
    from diffusers import ControlNetModel

    unet = build_unet(family, seed=2)
    theirs = ControlNetModel.from_unet(unet).eval()
    randomize(theirs, seed=2)
    # safetensors for SD1.x/SDXL; SD2.x also as a pickled .bin (read with weights_only=True)
    theirs.save_pretrained(tmp_path / "cn", safe_serialization=family != "sd2")
    ours = load_controlnet(tmp_path / "cn")
    assert ours.config.block_out_channels == tuple(theirs.config.block_out_channels)
    print(f"\n{family}: diffusers -> ours max err {assert_same_outputs(ours, theirs, make_inputs(unet)):.2e}")
    # from_unet builds what diffusers' from_unet builds: the same modules, names and shapes.
    assert {k: v.shape for k, v in ControlNet.from_unet(unet).state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


# --------------------------------------------------------------------------------------------- original layout


@pytest.mark.parametrize(("name", "unet_cfg", "params"), [("sd15", SD15_UNET, 361_279_120), ("sd21", SD21_UNET, None)])
def test_full_size_original_layout_loads_strictly_and_saves_back(name, unet_cfg, params):
    """Keys and shapes of the released control_*.pth files (meta tensors: no 1.4 GB of zeros)."""
    shapes = json.loads((FIXTURES / "original_controlnet_keys.json").read_text())[name]
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    cn = controlnet_from_state_dict(sd, name=name)  # config inferred from the shapes
    assert cn.config == ControlNetConfig.from_unet_config(unet_cfg)
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(p.numel() for p in cn.parameters()) == total == (params or total)
    back = original_state_dict(cn)
    assert {k: list(v.shape) for k, v in back.items()} == shapes


def test_full_size_sdxl_config_survives_the_original_layout():
    with torch.device("meta"):
        cn = ControlNet(ControlNetConfig.from_unet_config(SDXL_UNET))
    sd = original_state_dict(cn)
    assert "control_model.label_emb.0.0.weight" in sd and detect_family(sd) == "sdxl"
    assert controlnet_from_state_dict(sd).config == cn.config


def test_full_size_mismatches_are_named():
    shapes = json.loads((FIXTURES / "original_controlnet_keys.json").read_text())["sd15"]
    config = ControlNetConfig.from_unet_config(SD15_UNET)

    def load(edit):
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        edit(sd)
        return controlnet_from_state_dict(sd, config, name="control_sd15_x.pth")

    with pytest.raises(UserError, match=r"control_sd15_x.pth .*1 missing keys \(control_model.zero_convs.3.0.weight\)"):
        load(lambda sd: sd.pop("control_model.zero_convs.3.0.weight"))
    with pytest.raises(UserError, match=r"control_sd15_x.pth: 1 unexpected keys .*zero_convs.3.1.weight"):
        load(lambda sd: sd.update({"control_model.zero_convs.3.1.weight": torch.empty(1, device="meta")}))
    with pytest.raises(UserError, match=r"wrong shape.*input_blocks.1.1.proj_in.weight \[320, 320\] != \[320, 320, 1, 1\]"):
        load(lambda sd: sd.update({"control_model.input_blocks.1.1.proj_in.weight": torch.empty(320, 320, device="meta")}))


@pytest.mark.parametrize("filename", ["cn.safetensors", "cn.pth"])
def test_original_file_round_trip(filename, tmp_path):
    unet, cn = trained_controlnet("sd1", seed=3)
    path = save_controlnet(cn, tmp_path / filename, format="original")
    raw = load_file(path) if filename.endswith(".safetensors") else torch.load(path, weights_only=True)
    assert set(raw) == set(original_state_dict(cn)) and all(k.startswith("control_model.") for k in raw)
    back = load_controlnet(path, config=cn.config)
    assert_same_weights(cn, back)
    assert assert_same_outputs(cn, back, make_inputs(unet)) == 0.0
    # Without a config: shapes give everything but the heads, which come from the family (SD1.x: 8).
    inferred = load_controlnet(path)
    assert_same_weights(cn, inferred)
    assert inferred.config.attention_head_dim == 8 and inferred.config.block_out_channels == cn.config.block_out_channels


def test_original_variants_fp16_bare_keys_and_whole_controlldm(tmp_path):
    _, cn = trained_controlnet("sd1", seed=4)
    path = save_controlnet(cn, tmp_path / "half.safetensors", format="original", dtype="fp16")
    assert {v.dtype for v in load_file(path).values()} == {torch.float16}
    loaded = load_controlnet(path, config=cn.config)
    assert loaded.dtype == torch.float32
    for key, value in cn.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.half().float()), key
    assert load_controlnet(path, config=cn.config, dtype="fp16").dtype == torch.float16

    prefixed = original_state_dict(cn)
    bare = {k.removeprefix("control_model."): v for k, v in prefixed.items()}
    save_file(bare, tmp_path / "bare.safetensors")
    assert_same_weights(cn, load_controlnet(tmp_path / "bare.safetensors", config=cn.config))

    # A whole ControlLDM Lightning checkpoint: state_dict nesting, the locked UNet and VAE beside the control model.
    whole = {**prefixed, "model.diffusion_model.out.2.weight": torch.ones(4, 4), "first_stage_model.x": torch.ones(2)}
    torch.save({"state_dict": whole, "epoch": 3, "global_step": 1200}, tmp_path / "epoch=3.ckpt")
    assert_same_weights(cn, load_controlnet(tmp_path / "epoch=3.ckpt", config=cn.config))
    save_file(whole, tmp_path / "whole.safetensors")
    assert_same_weights(cn, load_controlnet(tmp_path / "whole.safetensors", config=cn.config))

    base_only = {k: v for k, v in whole.items() if not k.startswith("control_model.")}
    torch.save(base_only, tmp_path / "sd15.pth")
    with pytest.raises(UserError, match="sd15.pth is a Stable Diffusion checkpoint without a ControlNet"):
        load_controlnet(tmp_path / "sd15.pth")

    # ControlNet 1.1 shuffle (the only release with global pooling) is known by its name.
    shuffle = save_controlnet(cn, tmp_path / "control_v11e_sd15_shuffle.pth", format="original")
    assert load_controlnet(shuffle).config.global_pool_conditions


def test_single_diffusers_layout_file(tmp_path):
    unet, cn = trained_controlnet("sd2", seed=5)
    save_controlnet(cn, tmp_path / "cn")
    inside = tmp_path / "cn" / "diffusion_pytorch_model.safetensors"
    assert load_controlnet(inside).config == cn.config  # the config.json beside it is used
    alone = tmp_path / "sd2_controlnet.safetensors"
    shutil.copy(inside, alone)
    loaded = load_controlnet(alone, config=tmp_path / "cn" / "config.json")
    assert assert_same_outputs(cn, loaded, make_inputs(unet)) == 0.0
    # Tiny SD2 blocks (32, 64 channels) are no multiples of SD2's 64-channel heads: the heads need a config.
    with pytest.raises(UserError, match="cannot infer the attention heads.*config"):
        load_controlnet(alone)


def test_paper_hint_encoder_round_trip(tmp_path):
    unet, cn = trained_controlnet("sd1", seed=6, hint_encoder="paper", vae_scale_factor=4)
    save_controlnet(cn, tmp_path / "paper")
    back = load_controlnet(tmp_path / "paper")
    assert back.config == cn.config and back.config.vae_scale_factor == 4
    inputs = make_inputs(unet)
    inputs["hint"] = inputs["hint"][:, :, ::2, ::2]  # 4x the latent size
    assert assert_same_outputs(cn, back, inputs) == 0.0
    with pytest.raises(UserError, match="original layout has no place for the 'paper' hint encoder"):
        save_controlnet(cn, tmp_path / "paper.pth", format="original")


def test_save_refuses_to_replace_other_folders(tmp_path):
    _, cn = trained_controlnet("sd1", seed=7)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not a ControlNet folder.*keep.txt"):
        save_controlnet(cn, tmp_path / "models")
    assert (tmp_path / "models" / "keep.txt").read_text() == "mine"
    save_controlnet(cn, tmp_path / "cn")
    save_controlnet(cn, tmp_path / "cn", dtype="bf16")  # replacing a ControlNet folder is fine
    assert {v.dtype for v in load_file(tmp_path / "cn" / "diffusion_pytorch_model.safetensors").values()} == {torch.bfloat16}
    with pytest.raises(UserError, match="folder"):
        save_controlnet(cn, tmp_path / "cn.safetensors", format="diffusers")
    with pytest.raises(UserError, match="suffix"):
        save_controlnet(cn, tmp_path / "cn.json", format="original")


# --------------------------------------------------------------------------------------------- refusals


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): harmless, but it is code a checkpoint must never run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "control_sd15_evil.pth"
    torch.save({"state_dict": {"control_model.zero_convs.0.0.weight": _RunsCode(str(marker))}}, path)
    with pytest.raises(UserError, match=r"control_sd15_evil.pth was refused: unpickling it would run code .*mkdir"):
        load_controlnet(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # proof that the file does run code when loaded unsafely
    assert marker.is_dir()


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    _, cn = trained_controlnet("sd1", seed=8)
    for name in ("cn.safetensors", "cn.pth"):
        data = save_controlnet(cn, tmp_path / name, format="original").read_bytes()
        for cut in (len(data) // 2, 100):
            broken = tmp_path / f"cut{cut}_{name}"
            broken.write_bytes(data[:cut])
            with pytest.raises(UserError, match=rf"{broken.name} .*(truncated|corrupt)"):
                load_controlnet(broken)
    (tmp_path / "noise.ckpt").write_bytes(os.urandom(1000))
    with pytest.raises(UserError, match="noise.ckpt is neither a .safetensors nor a PyTorch"):
        load_controlnet(tmp_path / "noise.ckpt")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(UserError, match="empty.pth is empty"):
        load_controlnet(tmp_path / "empty.pth")
    sd = original_state_dict(cn)
    sd.pop("control_model.middle_block_out.0.bias")
    save_file(sd, tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match=r"missing.safetensors .*missing keys \(control_model.middle_block_out.0.bias\)"):
        load_controlnet(tmp_path / "missing.safetensors", config=cn.config)
    with pytest.raises(UserError, match="no ControlNet named or at"):
        load_controlnet(tmp_path / "does-not-exist")


# --------------------------------------------------------------------------------------------- families


def test_detect_family():
    for family in FAMILIES:
        unet, cn = trained_controlnet(family, seed=9)
        assert detect_family(unet) == detect_family(cn) == detect_family(unet_config(family)) == family
        assert detect_family(cn.state_dict()) == family
        assert detect_family(original_state_dict(cn)) == family
    for config, family in ((SD15_UNET, "sd1"), (SD21_UNET, "sd2"), (SDXL_UNET, "sdxl")):
        assert detect_family(config) == detect_family(ControlNetConfig.from_unet_config(config)) == family


def test_check_compatible_names_both_families():
    sd21_cn = ControlNetConfig.from_unet_config(SD21_UNET)
    check_compatible(sd21_cn, SD21_UNET)
    with pytest.raises(UserError, match=r"for sd2 \(context dim 1024\) but the base model is sd1 \(context dim 768\)"):
        check_compatible(sd21_cn, SD15_UNET)
    with pytest.raises(UserError, match=r"for sdxl \(context dim 2048\) but the base model is sd2"):
        check_compatible(ControlNetConfig.from_unet_config(SDXL_UNET), SD21_UNET)
    _, cn = trained_controlnet("sd1")
    with pytest.raises(UserError, match=r"sd1 \(context dim 32\).*sdxl \(context dim 64\)"):
        check_compatible(cn, build_unet("sdxl"))
    wider = dict(unet_config("sd1"), block_out_channels=(32, 32))
    with pytest.raises(UserError, match=r"block channels \[32, 64\].*block channels \[32, 32\]"):
        check_compatible(cn, wider)


# --------------------------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    """``controlnet ARGV`` through the real dispatcher (errors: one line on stderr, exit code 2)."""
    from controlnet import cli

    return cli.main(argv)


def test_cli_convert_round_trip_and_exit_code(tmp_path, capsys):
    fixture = FIXTURES / "tiny_sd15"
    src = fixture / "controlnet_original.safetensors"
    config = fixture / "diffusers_config.json"
    assert run_cli(["convert", str(src), str(tmp_path / "cn"), "--to", "diffusers", "--config", str(config)]) == 0
    assert json.loads((tmp_path / "cn" / "config.json").read_text())["attention_head_dim"] == 2
    assert run_cli(["convert", str(tmp_path / "cn"), str(tmp_path / "back.safetensors"), "--to", "original"]) == 0
    original, back = load_file(src), load_file(tmp_path / "back.safetensors")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    assert run_cli(["convert", str(tmp_path / "cn"), str(tmp_path / "half.pth"), "--to", "original", "--dtype", "fp16"]) == 0
    half = torch.load(tmp_path / "half.pth", weights_only=True)
    assert all(torch.equal(half[k], original[k].half()) for k in original)
    assert "wrote" in capsys.readouterr().out

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(src.read_bytes()[:5000])
    assert run_cli(["convert", str(corrupt), str(tmp_path / "out"), "--to", "diffusers"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_convert_checks_its_destination_first_and_is_quiet_with_q(tmp_path, capsys):
    from controlnet.commands import convert

    assert convert.LAYOUTS == FORMATS
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    # SRC does not exist either: the destination is refused first, before anything is loaded.
    assert run_cli(["convert", str(tmp_path / "nothing.pth"), str(tmp_path / "mine"), "--to", "diffusers"]) == EXIT_BAD_INPUT
    assert "mine exists and is not a ControlNet folder (notes.txt)" in capsys.readouterr().err
    assert run_cli(["convert", "fill", str(tmp_path / "fill.safetensors"), "--to", "diffusers"]) == EXIT_BAD_INPUT
    assert "the diffusers layout is a folder" in capsys.readouterr().err
    assert run_cli(["convert", "fill", str(tmp_path / "fill"), "--to", "original"]) == EXIT_BAD_INPUT
    assert "suffix" in capsys.readouterr().err
    assert run_cli(["convert", "fill", str(tmp_path / "fill.pth"), "--to", "original", "-q"]) == 0
    assert capsys.readouterr().out == "" and (tmp_path / "fill.pth").is_file()


# --------------------------------------------------------------------------------------------- bad weights


def _poison(sd: dict, key: str, value: float) -> dict:
    sd = {k: v.clone() for k, v in sd.items()}
    sd[key].view(-1)[3] = value
    return sd


def test_non_finite_weights_are_refused_in_every_format(tmp_path):
    """NaN/Inf weights load without a word in torch and generate black images: every loader refuses them, naming
    the first bad tensor as the file spells it."""
    _, cn = trained_controlnet("sd1", seed=10)
    original = original_state_dict(cn)
    bad_key = "control_model.input_blocks.1.0.in_layers.2.weight"  # = down_blocks.0.resnets.0.conv1.weight
    for value, what in ((float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")):
        sd = _poison(original, bad_key, value)
        save_file(sd, tmp_path / "bad.safetensors")
        torch.save({"state_dict": {**sd, "model.diffusion_model.x": torch.ones(2)}}, tmp_path / "bad.ckpt")
        for path in (tmp_path / "bad.safetensors", tmp_path / "bad.ckpt"):
            with pytest.raises(UserError, match=rf"{path.name}: tensor {bad_key} holds {what} \(1 of \d+ values\); the checkpoint is damaged"):
                load_controlnet(path, config=cn.config)
    # The native layout: safetensors, and diffusers' pickled .bin.
    native = _poison(cn.state_dict(), "controlnet_mid_block.bias", float("nan"))
    save_controlnet(cn, tmp_path / "folder")
    save_file(native, tmp_path / "folder" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match=r"diffusion_pytorch_model.safetensors: tensor controlnet_mid_block.bias holds NaN \(1 of"):
        load_controlnet(tmp_path / "folder")
    (tmp_path / "folder" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(native, tmp_path / "folder" / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match=r"diffusion_pytorch_model.bin: tensor controlnet_mid_block.bias holds NaN \(1 of"):
        load_controlnet(tmp_path / "folder")


def test_weights_that_overflow_fp16_are_refused_when_loaded_as_fp16(tmp_path):
    _, cn = trained_controlnet("sd1", seed=11)
    with torch.no_grad():
        cn.controlnet_mid_block.weight.view(-1)[0] = 1e6  # finite in fp32 and bf16, Inf in fp16 (max 65504)
    path = save_controlnet(cn, tmp_path / "big")
    assert load_controlnet(path, dtype="bf16").controlnet_mid_block.weight.isfinite().all()
    with pytest.raises(UserError, match=r"tensor controlnet_mid_block.weight holds Inf \(1 of .*overflows fp16; load it as fp32 or bf16"):
        load_controlnet(path, dtype="fp16")


def test_truncated_weights_are_refused_at_every_cut(tmp_path):
    """A file cut anywhere (a killed download or copy) gives one line naming it, in every layout and format."""
    _, cn = trained_controlnet("sd1", seed=12)
    torch.save(original_state_dict(cn), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    files = {
        "cn.safetensors": save_controlnet(cn, tmp_path / "cn.safetensors", format="original").read_bytes(),
        "cn.pth": save_controlnet(cn, tmp_path / "cn.pth", format="original").read_bytes(),
        "legacy.pth": (tmp_path / "legacy.pth").read_bytes(),
        "diffusion_pytorch_model.safetensors": save_controlnet(cn, tmp_path / "native")
        .joinpath("diffusion_pytorch_model.safetensors").read_bytes(),
    }
    folder = tmp_path / "cut"
    shutil.copytree(tmp_path / "native", folder)
    for name, data in files.items():
        n = len(data)
        for cut in sorted({1, 8, 9, 50, 500, n // 3, n // 2, n - 100, n - 22, n - 1}):
            broken = folder / name
            broken.write_bytes(data[:cut])
            with pytest.raises(UserError) as err:
                load_controlnet(folder if name.startswith("diffusion_") else broken, config=cn.config)
            message = str(err.value)
            assert name in message and re.search("truncated|corrupt|empty", message), (name, cut, message)
            broken.unlink()


# --------------------------------------------------------------------------------------------- bad configs


def test_config_json_with_absurd_values_is_one_line(tmp_path, capsys):
    _, cn = trained_controlnet("sd1", seed=13)
    folder = save_controlnet(cn, tmp_path / "cn")
    good = json.loads((folder / "config.json").read_text())
    cases = {
        "block_out_channels": ([32, 2**40], r"block_out_channels must be .*got \[32, 1099511627776\]"),
        "layers_per_block": (0, r"layers_per_block must be an integer in 1\.\.64, got 0"),
        "down_block_types": (["CrossAttnDownBlock2D", "Warp"], r"down_block_types .*'Warp'\]"),
        "cross_attention_dim": ("768", r"cross_attention_dim must be an integer .*got '768'"),
    }
    for field, (value, message) in cases.items():
        (folder / "config.json").write_text(json.dumps({**good, field: value}))
        with pytest.raises(UserError, match=rf"^{re.escape(str(folder / 'config.json'))}: invalid ControlNet config: {message}$"):
            load_controlnet(folder)
    for text, message in (("[1, 2]", "expected a JSON object, got list"), ("{", "is not a readable JSON config"),
                          ('{"in_channels": 1' + "0" * 5000 + "}", "is not a readable JSON config"),
                          ("[" * 100_000, "is not a readable JSON config")):
        (folder / "config.json").write_text(text)
        with pytest.raises(UserError, match=message):
            load_controlnet(folder)
    (folder / "config.json").write_text(" " * (2 << 20))
    with pytest.raises(UserError, match=r"config file is at most 1048576 bytes"):
        load_controlnet(folder)
    # A config inferred from shapes no SD-family model has (GroupNorm's 32 groups do not divide 48 channels).
    with torch.device("meta"):
        odd = ControlNet(ControlNetConfig.from_unet_config(
            dict(unet_config("sd1"), block_out_channels=(48, 96), norm_num_groups=8)))
    with pytest.raises(UserError, match=r"^odd: invalid ControlNet config: norm_num_groups 32 must divide .*"
                                        r"\(inferred from the tensor shapes\); pass its config"):
        controlnet_from_state_dict(odd.state_dict(), name="odd")
    # Through the command line: exit 2, one line, no traceback, nothing written.
    (tmp_path / "absurd.json").write_text(json.dumps({**good, "norm_num_groups": 7}))
    src = FIXTURES / "tiny_sd15" / "controlnet_original.safetensors"
    code = run_cli(["convert", str(src), str(tmp_path / "out"), "--to", "diffusers", "--config", str(tmp_path / "absurd.json")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and err.count("\n") == 1 and "Traceback" not in err
    assert "absurd.json: invalid ControlNet config: norm_num_groups 7 must divide every block_out_channels" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_fifos_are_refused_without_blocking(tmp_path):
    """Reading a FIFO blocks until a writer comes: a FIFO as a checkpoint or a config is refused before it is opened."""
    _, cn = trained_controlnet("sd1", seed=14)
    os.mkfifo(tmp_path / "cn.safetensors")
    with pytest.raises(UserError, match="cn.safetensors is not a regular file"):
        load_controlnet(tmp_path / "cn.safetensors")
    folder = save_controlnet(cn, tmp_path / "folder")
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(UserError, match="config.json is not a regular file"):
        load_controlnet(folder, config=tmp_path / "config.json")


WRITE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from test_checkpoints import trained_controlnet
from controlnet.checkpoints import save_controlnet
from controlnet.errors import UserError

_, cn = trained_controlnet("sd1", seed=15)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit makes write() fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
for name, layout in (("cn", "diffusers"), ("cn.safetensors", "original"), ("cn.pth", "original")):
    try:
        save_controlnet(cn, {out!r} + "/" + name, format=layout)
        print("written", name)
    except UserError as err:
        print(err)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path):
    """A full disk or a file-size limit while saving: one line naming the path and the cause, nothing partial."""
    out = tmp_path / "out"
    out.mkdir()
    script = WRITE_UNDER_A_FILE_SIZE_LIMIT.format(tests=str(Path(__file__).parent), out=str(out))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 3, result.stdout + result.stderr
    for line, name in zip(lines, ("cn", "cn.safetensors", "cn.pth")):
        assert line.startswith(f"{out / name}: cannot write the ControlNet (") and ("File too large" in line or "file-size limit" in line), line
    assert list(out.iterdir()) == []
