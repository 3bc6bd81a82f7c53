"""detect_family tells the five control-model families apart from keys and config.json, files and folders;
require_family refuses a file of one family where another is needed, in one line naming both."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from controlnet.testing import build_unet
from controlnet.checkpoints import original_state_dict, save_controlnet
from controlnet.errors import UserError
from controlnet.families import FAMILIES, detect_family, require_family
from controlnet.model import ControlNet
from test_control_lora import control_lora_file
from test_t2i_adapter import tencentarc_layout
from test_union import oracle as union_oracle

diffusers = pytest.importorskip("diffusers")


def write(sd: dict, path) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, list[str]]:
    """At least one file or folder of each family, as the releases ship them."""
    root = tmp_path_factory.mktemp("families")
    unet = build_unet("sd1")
    cn = ControlNet.from_unet(unet)
    save_controlnet(cn, root / "controlnet_folder")
    torch.manual_seed(0)
    adapter = diffusers.T2IAdapter(channels=[32, 64], num_res_blocks=2)
    adapter.save_pretrained(root / "adapter_folder")
    torch.save(tencentarc_layout(adapter.state_dict(), "full_adapter", 2), root / "t2iadapter_tiny_sd14v1.pth")
    _, union = union_oracle(8)
    union.save_pretrained(root / "union_folder")
    # xinsir's folder: a config.json naming ControlNetModel beside the Union weights
    (root / "xinsir").mkdir()
    write(union.state_dict(), root / "xinsir" / "diffusion_pytorch_model.safetensors")
    (root / "xinsir" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    return {
        "controlnet": [write(original_state_dict(cn), root / "control_tiny.safetensors")],
        "controlnet-diffusers": [str(root / "controlnet_folder"), write(cn.state_dict(), root / "cn.safetensors")],
        "union": [str(root / "union_folder"), str(root / "xinsir"),
                  str(root / "xinsir" / "diffusion_pytorch_model.safetensors")],
        "control-lora": [write(control_lora_file(unet, rank=4), root / "control-lora-canny-rank128.safetensors")],
        "t2i-adapter": [str(root / "adapter_folder"), str(root / "t2iadapter_tiny_sd14v1.pth")],
    }


def test_every_family_is_recognised(files):
    assert set(files) == set(FAMILIES)
    for family, paths in files.items():
        for path in paths:
            assert detect_family(path) == family, path


def test_a_file_of_another_family_is_refused_naming_both(files):
    for family, paths in files.items():
        for wanted in FAMILIES:
            if wanted == family:
                assert require_family(paths[0], wanted) == family
                continue
            with pytest.raises(UserError) as err:
                require_family(paths[0], wanted)
            message = str(err.value)
            assert FAMILIES[family] in message and FAMILIES[wanted] in message and "\n" not in message


def test_unknown_keys_are_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="no control model we know"):
        detect_family(write({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.safetensors"))
    style_adapter = {"style_embedding": torch.zeros(1, 8, 16), "ln_pre.weight": torch.zeros(16),
                     "transformer_layes.0.attn.in_proj_weight": torch.zeros(48, 16), "proj": torch.zeros(16, 32)}
    with pytest.raises(UserError, match="no control model we know"):  # TencentARC's style adapter: not a Union
        detect_family(style_adapter)
    with pytest.raises(UserError, match="does not exist"):
        detect_family(tmp_path / "missing.safetensors")
