"""Our ControlNet against tensors produced by the original implementation (lllyasviel/ControlNet, cldm.py).

The fixtures (tests/fixtures/original-controlnet, see its README) hold a tiny SD1.5-style and SD2.1-style
ControlNet and locked UNet with random non-zero weights, inputs, and the original's outputs. We load the
ControlNet with our own loader and the locked UNet with diffusers' converter, and must reproduce every residual
and the final eps within 1e-5 (fp32).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from controlnet.checkpoints import check_compatible, detect_family, load_controlnet, save_controlnet
from controlnet.errors import UserError
from controlnet.residuals import original_guess_mode_scales

# Override with CONTROLNET_FIXTURES=/path/to/original-controlnet; default: the copy in this repository.
FIXTURES = Path(os.environ.get("CONTROLNET_FIXTURES", Path(__file__).resolve().parent / "fixtures" / "original-controlnet"))
VARIANTS = ("tiny_sd15", "tiny_sd21")
TOLERANCE = 1e-5  # the bound for fp32; measured errors are ~1e-7


def fixture_dir(variant: str) -> Path:
    path = FIXTURES / variant
    assert path.is_dir(), f"fixtures not found at {path}; set CONTROLNET_FIXTURES to the original-controlnet folder"
    return path


def locked_unet(variant: str):
    """The fixture's locked UNet, converted from the original LDM layout by diffusers' own converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    folder = fixture_dir(variant)
    config = json.loads((folder / "diffusers_config.json").read_text())["unet"]
    state = convert_ldm_unet_checkpoint(load_file(folder / "unet_original.safetensors"), config)
    unet = UNet2DConditionModel(**config).eval().requires_grad_(False)
    unet.load_state_dict(state, strict=True)
    return unet


@pytest.mark.parametrize("variant", VARIANTS)
def test_reproduces_the_original_implementation(variant, record_property):
    folder = fixture_dir(variant)
    cn = load_controlnet(folder / "controlnet_original.safetensors", config=folder / "diffusers_config.json")
    unet = locked_unet(variant)
    io = load_file(folder / "reference_io.safetensors")
    x, t, context, hint = io["x"], io["timesteps"], io["context"], io["hint"]
    n = json.loads((folder / "original_config.json").read_text())["num_control_outputs"]
    assert cn.num_residuals == n

    errors: dict[str, float] = {}
    with torch.no_grad():
        out = cn(x, t, context, hint)
        for i, residual in enumerate([*out.down, out.mid]):
            errors[f"control_{i:02d}"] = (residual - io[f"control_{i:02d}"]).abs().max().item()
        errors["eps_no_control"] = (unet(x, t, context).sample - io["eps_no_control"]).abs().max().item()
        eps = unet(x, t, context, **out.unet_kwargs()).sample
        errors["eps_control"] = (eps - io["eps_control"]).abs().max().item()
        guess = cn(x, t, context, hint, conditioning_scale=original_guess_mode_scales(n))
        eps = unet(x, t, context, **guess.unet_kwargs()).sample
        errors["eps_guess_mode_scales"] = (eps - io["eps_guess_mode_scales"]).abs().max().item()
        # The original's only_mid_control=True: the mid residual alone (down residuals scaled by 0).
        mid_only = cn(x, t, context, hint, conditioning_scale=[0.0] * (n - 1) + [1.0])
        eps = unet(x, t, context, **mid_only.unet_kwargs()).sample
        errors["eps_mid_only"] = (eps - io["eps_mid_only"]).abs().max().item()

    print(f"\n{variant} max abs errors vs the original implementation:")
    for name, err in errors.items():
        print(f"  {name:24s} {err:.3e}")
        record_property(f"{variant}.{name}", err)
    # The control changes the outputs by far more than the tolerance, so the comparison means something.
    assert all(io[f"control_{i:02d}"].abs().max() > 1000 * TOLERANCE for i in range(n))
    for name in ("eps_control", "eps_guess_mode_scales", "eps_mid_only"):
        assert (io[name] - io["eps_no_control"]).abs().max() > 10 * TOLERANCE, name
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, f"{worst}: {errors[worst]:.3e}"


@pytest.mark.parametrize(("variant", "family"), [("tiny_sd15", "sd1"), ("tiny_sd21", "sd2")])
def test_family_detected_from_file_and_saved_back_bit_exact(variant, family, tmp_path):
    folder = fixture_dir(variant)
    original = load_file(folder / "controlnet_original.safetensors")
    assert detect_family(original) == family
    cn = load_controlnet(folder / "controlnet_original.safetensors", config=folder / "diffusers_config.json")
    assert detect_family(cn) == family
    saved = load_file(save_controlnet(cn, tmp_path / "back.safetensors", format="original"))
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)


def test_sd21_controlnet_on_sd15_base_is_refused():
    folder = fixture_dir("tiny_sd21")
    cn = load_controlnet(folder / "controlnet_original.safetensors", config=folder / "diffusers_config.json")
    check_compatible(cn, locked_unet("tiny_sd21"))  # its own base is fine
    with pytest.raises(UserError, match=r"sd2 \(context dim 48\).*sd1 \(context dim 32\)"):
        check_compatible(cn, locked_unet("tiny_sd15"))
