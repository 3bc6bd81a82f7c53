"""Flow-matching generation with transformer ControlNets (Flux, SD3): whole generations against diffusers'
FluxControlNetPipeline / StableDiffusion3ControlNetPipeline (oracles only) on the same tiny seeded components,
the unit semantics (strength 0 and steps outside the range run nothing), units sharing one ControlNet batched into
one forward (equal to one forward each), the schedule, loading and refusals.

Both sides get the same seed: ours draws the starting noise from it, then the condition latents; diffusers' is
given that noise as ``latents`` and the generator after it, so that its condition latents are drawn from the same
state. diffusers' SD3 pipeline samples the condition's VAE posterior from the global generator (two rows under CFG):
its comparisons use a VAE whose posterior std is 1e-7, so both sides' samples are the posterior mean to 1e-7.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import (FluxControlNetModel, FluxControlNetPipeline, FluxPipeline, SD3ControlNetModel,
                       StableDiffusion3ControlNetPipeline, StableDiffusion3Pipeline)
from diffusers.utils.torch_utils import randn_tensor

from controlnet.testing import trained_like
from controlnet.errors import UserError
from controlnet.flow_sampling import FlowControl, FlowText, calculate_shift, flow_schedule, unit_residuals
from controlnet.transformer_controlnet import (FLUX_UNION_MODES, FluxControlNet, SD3ControlNet, latent_image_ids,
                                               pack_latents)
from controlnet.transformer_pipeline import TransformerPipeline, TransformerUnit, unpack_latents
from controlnet.testing_flow import FLUX_SCHEDULER, diffusers_components, flux_components, sd3_components

TOL = 1e-4
BATCH_TOL = 1e-5  # units of one ControlNet batched into one forward vs one forward each
SIZE = 64  # pixels: 8x8 latents, 4x4 Flux tokens / SD3 patches
STEPS = 4
PROMPT = "a red circle on blue"
SEED = 3
COMMON = dict(steps=STEPS, seed=SEED, output_type="latent", max_sequence_length=16)


@pytest.fixture(scope="module")
def flux():
    return flux_components()


@pytest.fixture(scope="module")
def sd3():
    return sd3_components(posterior_std=1e-7)


def conditions(n: int, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, SIZE, SIZE, generator=g) for _ in range(n)]


def after_noise(batch: int = 1, seed: int = SEED) -> tuple[torch.Tensor, torch.Generator]:
    """The starting noise ours draws from ``seed``, and the generator in the state ours leaves it in."""
    g = torch.Generator().manual_seed(seed)
    return randn_tensor((batch, 16, SIZE // 8, SIZE // 8), generator=g), g


def as_diffusers(cn):
    """diffusers' model of our ControlNet: its config (our extra keys ignored) and its weights."""
    cls = FluxControlNetModel if isinstance(cn, FluxControlNet) else SD3ControlNetModel
    ref = cls.from_config(cn.config.to_dict())
    ref.load_state_dict(cn.state_dict(), strict=True)
    return ref.eval()


def flux_controlnet(base, seed: int, **kwargs) -> FluxControlNet:
    return trained_like(FluxControlNet.from_transformer(base, **{"num_layers": 2, "num_single_layers": 2, **kwargs}), seed)


# --------------------------------------------------------------------------------------------- Flux


# (strength, start, end) of each unit; "union": one union ControlNet, one unit per (condition, mode).
FLUX_CASES = {
    "one": [(0.8, 0.0, 0.75)],
    "two": [(0.6, 0.0, 1.0), (1.0, 0.5, 1.0)],
    "union": [(0.7, 0.0, 0.75), (0.5, 0.25, 1.0)],
    "union3": [(0.7, 0.0, 0.75), (0.5, 0.25, 1.0), (0.9, 0.0, 1.0)],
    "xlabs": [(0.9, 0.25, 1.0)],
}


@pytest.mark.parametrize("case", sorted(FLUX_CASES))
def test_flux_generation_matches_diffusers(flux, case):
    settings = FLUX_CASES[case]
    components = flux
    if case == "xlabs":  # XLabs' hint encoder: pixels in, 16 channels packed 2x2 into the 64 token features
        nets = [flux_controlnet(flux["transformer"], 11, num_single_layers=0, conditioning_embedding_channels=16)]
    elif case.startswith("union"):
        nets = [flux_controlnet(flux["transformer"], 12, num_mode=10)] * len(settings)
    else:
        nets = [flux_controlnet(flux["transformer"], 13 + k) for k in range(len(settings))]
    union = case.startswith("union")
    modes = ["canny", "depth", "pose"][:len(settings)] if union else [None] * len(settings)
    conds = conditions(len(settings))
    units = [TransformerUnit(cn, c, s, a, b, mode) for cn, c, (s, a, b), mode in zip(nets, conds, settings, modes)]
    ours = TransformerPipeline(**components)(PROMPT, units, **COMMON)

    noise, g = after_noise()
    refs = [as_diffusers(cn) for cn in dict.fromkeys(nets)]
    multi = len(settings) > 1
    theirs = FluxControlNetPipeline(**diffusers_components(components), controlnet=refs if multi else refs[0])(
        PROMPT, control_image=[c * 2 - 1 for c in conds] if multi else conds[0] * 2 - 1,
        control_mode=[FLUX_UNION_MODES.index(m) for m in modes] if union else None,
        controlnet_conditioning_scale=[s for s, _, _ in settings] if multi else settings[0][0],
        control_guidance_start=[a for _, a, _ in settings] if multi else settings[0][1],
        control_guidance_end=[b for _, _, b in settings] if multi else settings[0][2],
        height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=3.5, generator=g,
        latents=pack_latents(noise), output_type="latent", max_sequence_length=16).images
    assert (ours - theirs).abs().max() < TOL
    plain = FluxPipeline(**diffusers_components(components))(
        PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=3.5, latents=pack_latents(noise),
        output_type="latent", max_sequence_length=16).images
    assert (ours - plain).abs().max() > 1e-2  # the ControlNets do act


# --------------------------------------------------------------------------------------------- SD3


SD3_CASES = {
    "one": [(0.7, 0.0, 0.75)],  # an InstantX-like ControlNet: zero pooled projections, latents without the shift
    "two": [(0.6, 0.25, 1.0), (1.0, 0.0, 0.5)],
    "two prompts": [(0.9, 0.0, 1.0)],  # CFG rows [uncond x2, cond x2], the condition repeated to all four
}


@pytest.mark.parametrize("case", sorted(SD3_CASES))
def test_sd3_generation_with_cfg_matches_diffusers(sd3, case):
    settings = SD3_CASES[case]
    nets = [trained_like(SD3ControlNet.from_transformer(sd3["transformer"], 2), 21 + k) for k in range(len(settings))]
    if case == "one":
        nets[0].config = dataclasses.replace(nets[0].config, force_zeros_for_pooled_projection=True)
    conds = conditions(len(settings))
    units = [TransformerUnit(cn, c, s, a, b) for cn, c, (s, a, b) in zip(nets, conds, settings)]
    prompts = [PROMPT, "a green circle"] if case == "two prompts" else [PROMPT]
    ours = TransformerPipeline(**sd3)(prompts, units, guidance=5.0, negative_prompt="green square", **COMMON)

    noise, g = after_noise(len(prompts))
    multi = len(settings) > 1
    refs = [as_diffusers(cn) for cn in nets]
    theirs = StableDiffusion3ControlNetPipeline(**diffusers_components(sd3), controlnet=refs if multi else refs[0])(
        prompts, negative_prompt="green square", control_image=[c * 2 - 1 for c in conds] if multi else conds[0] * 2 - 1,
        controlnet_conditioning_scale=[s for s, _, _ in settings] if multi else settings[0][0],
        control_guidance_start=[a for _, a, _ in settings] if multi else settings[0][1],
        control_guidance_end=[b for _, _, b in settings] if multi else settings[0][2],
        height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0, generator=g, latents=noise,
        output_type="latent", max_sequence_length=16).images
    assert (ours - theirs).abs().max() < TOL
    plain = StableDiffusion3Pipeline(**diffusers_components(sd3))(
        prompts, negative_prompt="green square", height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0,
        latents=noise, output_type="latent", max_sequence_length=16).images
    assert (ours - plain).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- image to image


def test_flux_image_to_image_matches_diffusers():
    """diffusers' FluxControlNetImg2ImgPipeline draws its noise after encoding the condition and the picture: with a
    VAE whose posterior std is 1e-7 those encodings do not depend on the generator, and ours is given its noise."""
    from diffusers import FluxControlNetImg2ImgPipeline

    components = flux_components(posterior_std=1e-7)
    cn = flux_controlnet(components["transformer"], 51)
    picture, cond = conditions(2, seed=9)
    g = torch.Generator().manual_seed(SEED)
    noise = [randn_tensor((1, 16, SIZE // 8, SIZE // 8), generator=g) for _ in range(3)][-1]  # their third draw
    ours = TransformerPipeline(**components)(
        PROMPT, [TransformerUnit(cn, cond, 0.8, 0.0, 0.5)], init_image=picture, denoise=0.5, latents=noise,
        **{**COMMON, "steps": 6})
    theirs = FluxControlNetImg2ImgPipeline(**diffusers_components(components), controlnet=as_diffusers(cn))(
        PROMPT, image=picture, control_image=cond * 2 - 1, strength=0.5, controlnet_conditioning_scale=0.8,
        control_guidance_end=0.5, height=SIZE, width=SIZE, num_inference_steps=6, guidance_scale=3.5,
        generator=torch.Generator().manual_seed(SEED), output_type="latent", max_sequence_length=16).images
    assert (ours - theirs).abs().max() < TOL
    # 3 of the 6 steps run; the unit acts in the first half of those: step 0 only (1/3 <= 0.5 < 2/3).
    calls = count_calls(cn)
    TransformerPipeline(**components)(PROMPT, [TransformerUnit(cn, cond, end=0.5)], init_image=picture,
                                      denoise=0.5, **{**COMMON, "steps": 6})
    assert calls[0] == 1
    with pytest.raises(UserError, match="runs no step"):
        TransformerPipeline(**components)(PROMPT, init_image=picture, denoise=0.05, **COMMON)


# --------------------------------------------------------------------------------------------- unit semantics


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_units_at_strength_zero_or_outside_their_range_are_not_run(flux):
    base = flux["transformer"]
    off, late, early = (flux_controlnet(base, s) for s in (31, 32, 33))
    counts = [count_calls(cn) for cn in (off, late, early)]
    cond = conditions(1)[0]
    pipe = TransformerPipeline(**flux)
    units = [TransformerUnit(off, cond, strength=0.0), TransformerUnit(late, cond, start=0.5),
             TransformerUnit(early, cond, end=0.25)]
    with_off = pipe(PROMPT, units, **COMMON)
    # Step i of 4 is in [start, end] iff start <= i/4 and (i+1)/4 <= end: "late" runs steps 2, 3; "early" step 0.
    assert [c[0] for c in counts] == [0, 2, 1]
    without = pipe(PROMPT, units[1:], **COMMON)
    assert torch.equal(with_off, without)  # a unit that is not run leaves no trace, not even zeros


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def max_difference(a, b) -> float:
    assert a.locations() == b.locations()
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("k", [2, 3])
def test_flux_union_units_batched_equal_one_forward_each(flux, k):
    base = flux["transformer"]
    cn, other = flux_controlnet(base, 12, num_mode=10), flux_controlnet(base, 14)
    x = randn(2, 16, 64, seed=1)  # two prompts, 4x4 packed tokens
    text = FlowText(randn(2, 6, 32, seed=2), randn(2, 32, seed=3), torch.zeros(6, 3))
    modes = ["canny", 2, "pose"][:k]  # a name and an index: both resolve to the embedding's row
    units = [FlowControl(cn, randn(1, 16, 64, seed=10 + j), strength=0.4 + 0.3 * j, mode=m) for j, m in enumerate(modes)]
    units.insert(1, FlowControl(other, randn(1, 16, 64, seed=9), strength=0.8))  # between the union's units
    args = (x, torch.full((2,), 700.0), text, 3.5, latent_image_ids(4, 4), dict(device=torch.device("cpu"),
                                                                                dtype=torch.float32))
    calls = count_calls(cn)
    batched = unit_residuals(units, *args, batch_units=True)
    assert calls[0] == 1
    looped = unit_residuals(units, *args, batch_units=False)
    assert calls[0] == 1 + k
    assert max_difference(batched, looped) <= BATCH_TOL
    assert max_difference(batched, unit_residuals(units[1:2], *args)) > 1e-2  # the union's part acts


def test_sd3_units_of_one_controlnet_batched_under_cfg_equal_one_forward_each(sd3):
    cn = trained_like(SD3ControlNet.from_transformer(sd3["transformer"], 2), 21)
    x = randn(2, 16, 8, 8, seed=1)  # CFG rows [uncond, cond]
    text = FlowText(randn(2, 6, 64, seed=2), randn(2, 64, seed=3))
    units = [FlowControl(cn, randn(1, 16, 8, 8, seed=10 + j), strength=s) for j, s in enumerate((0.6, 1.0, 0.3))]
    args = (x, torch.full((2,), 500.0), text, 5.0, None, dict(device=torch.device("cpu"), dtype=torch.float32))
    assert max_difference(unit_residuals(units, *args), unit_residuals(units, *args, batch_units=False)) <= BATCH_TOL


def test_per_row_strength_and_mode_equal_one_row_each(flux):
    cn = flux_controlnet(flux["transformer"], 12, num_mode=10)
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


@pytest.mark.parametrize("case", ["union", "union3"])
def test_union_generation_runs_one_forward_per_step_and_equals_the_loop(flux, case):
    cn = flux_controlnet(flux["transformer"], 12, num_mode=10)
    units = [TransformerUnit(cn, c, s, a, b, m) for c, (s, a, b), m in
             zip(conditions(len(FLUX_CASES[case])), FLUX_CASES[case], ("canny", "depth", "pose"))]
    pipe = TransformerPipeline(**flux)
    calls = count_calls(cn)
    batched = pipe(PROMPT, units, **COMMON)
    assert calls[0] == STEPS  # every step has an active unit: one forward each
    pipe.batch_units = False
    assert (batched - pipe(PROMPT, units, **COMMON)).abs().max() <= BATCH_TOL
    assert calls[0] > 2 * STEPS


def test_schedule_is_diffusers_with_the_resolution_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # mu is linear in the token count: 0.5 at 256 tokens, 1.15 at 4096 (FLUX.1's scheduler config).
    assert calculate_shift(256, FLUX_SCHEDULER) == pytest.approx(0.5)
    assert calculate_shift(4096, FLUX_SCHEDULER) == pytest.approx(1.15)
    sigmas, timesteps = flow_schedule(FLUX_SCHEDULER, 5, 1024, [1.0, 0.8, 0.6, 0.4, 0.2])
    ref = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER)
    ref.set_timesteps(sigmas=[1.0, 0.8, 0.6, 0.4, 0.2], mu=calculate_shift(1024, FLUX_SCHEDULER))
    assert torch.equal(sigmas, ref.sigmas) and torch.equal(timesteps, ref.timesteps)
    assert sigmas[-1] == 0 and len(sigmas) == 6
    # Exponential time shift: sigma' = e^mu / (e^mu + 1/sigma - 1).
    mu = torch.tensor(calculate_shift(1024, FLUX_SCHEDULER))
    assert sigmas[2] == pytest.approx((mu.exp() / (mu.exp() + 1 / 0.6 - 1)).item(), rel=1e-6)
    with pytest.raises(UserError, match="stochastic_sampling"):
        flow_schedule({**FLUX_SCHEDULER, "stochastic_sampling": True}, 4, 16)


# --------------------------------------------------------------------------------------------- loading, round trips


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("limit", [8, 512, int(1e30)])  # short; a real T5's; transformers' "no limit" sentinel
def test_prompts_are_encoded_to_the_family_length_or_the_t5_tokenizers_shorter_one(flux, sd3, family, limit):
    """T5 runs to min(diffusers' default: Flux 512, SD3 256; the T5 tokenizer's model_max_length): the text equals
    diffusers' encode_prompt given that length; an explicit max_sequence_length still wins."""
    components = dict(flux if family == "flux" else sd3)
    key = "tokenizer_2" if family == "flux" else "tokenizer_3"
    components[key] = copy.deepcopy(components[key])
    components[key].model_max_length = limit
    expected = min(limit, {"flux": 512, "sd3": 256}[family])
    ours = TransformerPipeline(**components)
    assert ours.max_sequence_length == expected
    text = ours.encode_prompt([PROMPT])
    if family == "flux":
        embeds, pooled, _ = FluxPipeline(**diffusers_components(components)).encode_prompt(
            PROMPT, None, max_sequence_length=expected)
        assert text.embeds.shape[1] == text.ids.shape[0] == expected
    else:
        embeds, _, pooled, _ = StableDiffusion3Pipeline(**diffusers_components(components)).encode_prompt(
            PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=expected)
    assert text.embeds.shape == embeds.shape and (text.embeds - embeds).abs().max() < TOL
    assert (text.pooled - pooled).abs().max() < TOL
    explicit = ours.encode_prompt([PROMPT], max_sequence_length=4)
    assert explicit.embeds.shape[1] == text.embeds.shape[1] - expected + 4


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_pipeline_loads_a_diffusers_folder(tmp_path, flux, sd3, family):
    components = flux if family == "flux" else sd3
    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    cls(**diffusers_components(components)).save_pretrained(tmp_path / "base")
    loaded = TransformerPipeline.from_pretrained(tmp_path / "base")
    assert loaded.family == family
    assert loaded.scheduler_config["shift"] == components["scheduler_config"]["shift"]
    direct = TransformerPipeline(**components)
    a = loaded(PROMPT, guidance=4.0, **COMMON)
    b = direct(PROMPT, guidance=4.0, **COMMON)
    assert torch.equal(a, b)
    with pytest.raises(UserError, match="no model_index.json"):
        TransformerPipeline.from_pretrained(tmp_path)


def test_flux_unpack_inverts_pack_and_decoding_gives_images(flux):
    latents = torch.randn(2, 16, 6, 4)
    assert torch.equal(unpack_latents(pack_latents(latents), 6, 4), latents)
    assert torch.equal(unpack_latents(pack_latents(latents), 6, 4),
                       FluxPipeline._unpack_latents(pack_latents(latents), 6 * 8, 4 * 8, 8))
    images = TransformerPipeline(**flux)(PROMPT, steps=2, seed=0, height=SIZE, width=SIZE, output_type="pt",
                                         max_sequence_length=16)
    assert images.shape == (1, 3, SIZE, SIZE) and 0 <= images.min() and images.max() <= 1


def test_model_offload_gives_the_same_generation_and_vae_tiling_switches(flux):
    from controlnet import runtime

    cn = flux_controlnet(flux["transformer"], 61)
    unit = [TransformerUnit(cn, conditions(1)[0], 0.8)]
    pipe = TransformerPipeline(**flux)
    plain = pipe(PROMPT, unit, **COMMON)
    pipe.enable_offload("model", "cpu")  # accelerate's hooks, executing on the CPU: the same arithmetic
    try:
        offloaded = pipe(PROMPT, unit, **COMMON)
        assert all(runtime.is_offloaded(m) for m in [*pipe.models(), cn])
    finally:
        pipe.enable_offload(None, "cpu")
    assert not any(runtime.is_offloaded(m) for m in [*pipe.models(), cn])
    assert torch.equal(plain, offloaded)
    latents = torch.randn(1, 16 * 4, 8 * 8, generator=torch.Generator().manual_seed(0))  # 128 px: 2x2 VAE tiles
    decoded = {}
    for mode in ("off", "on", "auto"):
        pipe.vae_tiling = mode
        decoded[mode] = pipe.decode(latents, 2 * SIZE, 2 * SIZE)
    assert torch.equal(decoded["auto"], decoded["off"])  # 128 px is far below the CPU's memory
    assert not torch.equal(decoded["on"], decoded["off"]) and decoded["on"].shape == decoded["off"].shape


# --------------------------------------------------------------------------------------------- refusals


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_input_is_refused_in_one_line(flux, sd3):
    pipe = TransformerPipeline(**flux)
    with pytest.raises(UserError) as err:
        pipe(PROMPT, height=72, width=SIZE, **COMMON)
    assert "divisible by 16" in one_line(err)
    union = flux_controlnet(flux["transformer"], 41, num_mode=10)
    with pytest.raises(UserError) as err:
        pipe(PROMPT, [TransformerUnit(union, conditions(1)[0])], **COMMON)
    assert "union ControlNet; give a control mode" in one_line(err)
    with pytest.raises(UserError) as err:
        pipe(PROMPT, [TransformerUnit(union, conditions(1)[0], mode="sketch")], **COMMON)
    assert "unknown control mode 'sketch'" in one_line(err)
    with pytest.raises(UserError) as err:
        pipe(PROMPT, [TransformerUnit(union, conditions(1)[0], mode=0)], height=2 * SIZE, width=SIZE, **COMMON)
    assert "give a condition of the image's size" in one_line(err)
    with pytest.raises(UserError) as err:
        pipe(PROMPT, [TransformerUnit(flux_controlnet(flux["transformer"], 42), conditions(1)[0], mode="depth")],
             **COMMON)
    assert "not a union ControlNet" in one_line(err)
    with pytest.raises(UserError) as err:
        pipe(PROMPT, **{**COMMON, "output_type": "png"})
    assert "unknown output type" in one_line(err)
    sd3_cn = SD3ControlNet.from_transformer(sd3["transformer"], 2)
    with pytest.raises(UserError) as err:  # a ControlNet for another base family
        pipe(PROMPT, [TransformerUnit(sd3_cn, conditions(1)[0])], **COMMON)
    assert "SD3/SD3.5 ControlNet" in one_line(err) and "FluxTransformer2DModel" in one_line(err)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_real_width_components_fit_their_transformer(family):
    """The released widths at the least depth: text encoders of the widths the transformer takes, a step runs."""
    from controlnet.testing_flow import REAL_FLUX, REAL_SD3

    components = flux_components(shape="real", depth=(0, 0)) if family == "flux" else sd3_components(shape="real", depth=1)
    pipe = TransformerPipeline(**components)
    text = pipe.encode_prompt([PROMPT], None, max_sequence_length=16)
    widths = REAL_FLUX if family == "flux" else REAL_SD3
    assert text.embeds.shape[-1] == widths["joint_attention_dim"] == 4096
    assert text.pooled.shape == (1, widths["pooled_projection_dim"])
    out = pipe(PROMPT, steps=1, height=SIZE, width=SIZE, guidance=1.0, seed=SEED, output_type="latent",
               max_sequence_length=16)
    assert out.shape == ((1, 16, 64) if family == "flux" else (1, 16, SIZE // 8, SIZE // 8))


def test_benchmark_times_the_same_work():
    from benchmarks.flow import FlowBench, timed_calls

    calls, outputs = timed_calls(FlowBench("flux", resolution=SIZE), 2)
    assert set(calls) == {"ours", "ours_1", "diffusers", "diffusers_1"}
    calls["ours"](), calls["diffusers"]()
    assert torch.equal(outputs["ours"], outputs["diffusers"])  # ours and diffusers' final latents, bit for bit
    calls, outputs = timed_calls(FlowBench("flux", resolution=SIZE, union=2), 2)
    assert set(calls) == {"ours", "ours_1", "ours_looped", "ours_looped_1", "diffusers", "diffusers_1"}
    for name in ("ours", "ours_looped", "diffusers"):
        calls[name]()
    assert (outputs["ours"] - outputs["diffusers"]).abs().max() < TOL
    assert torch.equal(outputs["ours_looped"], outputs["diffusers"])  # one forward per pair, as diffusers
