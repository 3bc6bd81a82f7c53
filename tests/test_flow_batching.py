"""Units sharing one transformer ControlNet run as one batched forward (controlnet.flow_sampling.unit_residuals):
the batched residuals equal the one-forward-per-unit ones (diffusers' FluxMultiControlNetModel's loop), per-row
modes and strengths reach the right rows, and a whole union generation matches diffusers' FluxControlNetPipeline
with one forward of the union ControlNet per step.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline
from diffusers.utils.torch_utils import randn_tensor

from controlnet.flow_sampling import FlowControl, FlowText, unit_residuals
from controlnet.testing import trained_like
from controlnet.testing_flow import diffusers_components, flux_components, sd3_components
from controlnet.transformer_controlnet import (FLUX_UNION_MODES, FluxControlNet, SD3ControlNet, latent_image_ids,
                                               pack_latents)
from controlnet.transformer_pipeline import TransformerPipeline, TransformerUnit

BATCH_TOL = 1e-5
TOL = 1e-4
SIZE = 64  # pixels: 8x8 latents, 4x4 Flux tokens / SD3 patches
STEPS = 4
PROMPT = "a red circle on blue"
SEED = 3
CPU = dict(device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def flux():
    return flux_components()


@pytest.fixture(scope="module")
def sd3():
    return sd3_components(posterior_std=1e-7)


def union_controlnet(base, seed: int = 12) -> FluxControlNet:
    return trained_like(FluxControlNet.from_transformer(base, 2, 2, num_mode=10), seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def max_difference(a, b) -> float:
    assert a.locations() == b.locations()
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("k", [2, 3])
def test_flux_union_units_batched_equal_one_forward_each(flux, k):
    base = flux["transformer"]
    cn, other = union_controlnet(base), trained_like(FluxControlNet.from_transformer(base, 2, 2), 14)
    tokens = 16  # 4x4 packed tokens of 64 features
    x = randn(2, tokens, 64, seed=1)  # two prompts
    text = FlowText(randn(2, 6, 32, seed=2), randn(2, 32, seed=3), torch.zeros(6, 3))
    modes = ["canny", 2, "pose"][:k]  # a name and an index: both resolve to the embedding's row
    units = [FlowControl(cn, randn(1, tokens, 64, seed=10 + j), strength=0.4 + 0.3 * j, mode=m)
             for j, m in enumerate(modes)]
    units.insert(1, FlowControl(other, randn(1, tokens, 64, seed=9), strength=0.8))  # between the union's units
    t = torch.full((2,), 700.0)
    args = (x, t, text, 3.5, latent_image_ids(4, 4), CPU)
    calls = count_calls(cn)
    batched = unit_residuals(units, *args, batch_units=True)
    assert calls[0] == 1
    looped = unit_residuals(units, *args, batch_units=False)
    assert calls[0] == 1 + k
    assert max_difference(batched, looped) <= BATCH_TOL
    alone = unit_residuals(units[1:2], *args)  # the union's part is not zero: the batch does act
    assert max_difference(batched, alone) > 1e-2


def test_sd3_units_of_one_controlnet_batched_under_cfg_equal_one_forward_each(sd3):
    cn = trained_like(SD3ControlNet.from_transformer(sd3["transformer"], 2), 21)
    x = randn(2, 16, 8, 8, seed=1)  # CFG rows [uncond, cond]
    text = FlowText(randn(2, 6, 64, seed=2), randn(2, 64, seed=3))
    units = [FlowControl(cn, randn(1, 16, 8, 8, seed=10 + j), strength=s) for j, s in enumerate((0.6, 1.0, 0.3))]
    args = (x, torch.full((2,), 500.0), text, 5.0, None, CPU)
    assert max_difference(unit_residuals(units, *args), unit_residuals(units, *args, batch_units=False)) <= BATCH_TOL


def test_per_row_strength_and_mode_equal_one_row_each(flux):
    cn = union_controlnet(flux["transformer"])
    x, cond = randn(2, 16, 64, seed=1), randn(2, 16, 64, seed=4)
    per_row = dict(timestep=torch.full((2,), 0.6), encoder_hidden_states=randn(2, 6, 32, seed=2),
                   pooled_projections=randn(2, 32, seed=3), guidance=torch.full((2,), 3.5))
    shared = dict(img_ids=latent_image_ids(4, 4), txt_ids=torch.zeros(6, 3))
    with torch.inference_mode():
        both = cn(x, **per_row, **shared, condition=cond, mode=torch.tensor([0, 4]),
                  conditioning_scale=torch.tensor([0.5, 2.0]))
        rows = [cn(x[r:r + 1], **{k: v[r:r + 1] for k, v in per_row.items()}, **shared, condition=cond[r:r + 1],
                   mode=m, conditioning_scale=s) for r, (m, s) in enumerate((("canny", 0.5), ("pose", 2.0)))]
    for loc, r in both.tensors.items():
        assert (r - torch.cat([rows[0].tensors[loc], rows[1].tensors[loc]])).abs().max() <= BATCH_TOL


# (strength, start, end, mode) of each unit of one union ControlNet; step i of 4 acts iff start <= i/4, (i+1)/4 <= end.
UNION_CASES = {
    "two": [(0.7, 0.0, 0.75, "canny"), (0.5, 0.25, 1.0, "depth")],
    "three": [(0.7, 0.0, 0.75, "canny"), (0.5, 0.25, 1.0, "depth"), (0.9, 0.0, 1.0, "pose")],
}


@pytest.mark.parametrize("case", sorted(UNION_CASES))
def test_union_generation_batched_matches_diffusers_with_one_forward_per_step(flux, case):
    settings = UNION_CASES[case]
    cn = union_controlnet(flux["transformer"])
    g = torch.Generator().manual_seed(5)
    conds = [torch.rand(1, 3, SIZE, SIZE, generator=g) for _ in settings]
    units = [TransformerUnit(cn, c, s, a, b, m) for c, (s, a, b, m) in zip(conds, settings)]
    common = dict(steps=STEPS, seed=SEED, output_type="latent", max_sequence_length=16)
    pipe = TransformerPipeline(**flux)
    calls = count_calls(cn)
    ours = pipe(PROMPT, units, **common)
    assert calls[0] == STEPS  # every step has an active unit; one forward each
    pipe.batch_units = False
    looped = pipe(PROMPT, units, **common)
    assert (ours - looped).abs().max() <= BATCH_TOL

    g = torch.Generator().manual_seed(SEED)
    noise = randn_tensor((1, 16, SIZE // 8, SIZE // 8), generator=g)
    ref = FluxControlNetModel.from_config(cn.config.to_dict())
    ref.load_state_dict(cn.state_dict(), strict=True)
    theirs = FluxControlNetPipeline(**diffusers_components(flux), controlnet=[ref.eval()])(
        PROMPT, control_image=[c * 2 - 1 for c in conds], control_mode=[FLUX_UNION_MODES.index(m) for *_, m in settings],
        controlnet_conditioning_scale=[s[0] for s in settings], control_guidance_start=[s[1] for s in settings],
        control_guidance_end=[s[2] for s in settings], height=SIZE, width=SIZE, num_inference_steps=STEPS,
        guidance_scale=3.5, generator=g, latents=pack_latents(noise), output_type="latent",
        max_sequence_length=16).images
    assert (ours - theirs).abs().max() < TOL
