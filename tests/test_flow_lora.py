"""LoRAs on transformer bases (controlnet.flow_lora): a Flux, SD3 or Qwen-Image generation with a LoRA gives
diffusers' FluxControlNetPipeline / StableDiffusion3ControlNetPipeline / QwenImagePipeline (oracles) after their
load_lora_weights + set_adapters, on the same tiny seeded components and noise (the setup of test_flow_sampling);
weight 0 is no LoRA; a kohya-layout Flux LoRA is the diffusers one it was made from; prompt tags act for their
generation; a LoRA of another family is refused in one line; the command line records the LoRA in the PNG and
``--from-png`` repeats it."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (FluxControlNetPipeline, FluxPipeline, StableDiffusion3ControlNetPipeline,
                       StableDiffusion3Pipeline)
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from controlnet.errors import EXIT_BAD_INPUT, UserError
from controlnet.flow_lora import lora_family
from controlnet.lora import adapters_in
from controlnet.testing import trained_like
from controlnet.testing_flow import diffusers_components, flux_components, sd3_components
from controlnet.transformer_controlnet import FluxControlNet, SD3ControlNet, pack_latents
from controlnet.transformer_pipeline import TransformerPipeline, TransformerUnit
from test_flow_sampling import COMMON, PROMPT, SEED, SIZE, STEPS, TOL, after_noise, as_diffusers

# The attention projections of Flux's double blocks (image and text streams) and single blocks, and of SD3's blocks.
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# Only the image stream of Flux's double blocks: what a kohya file's img_attn_qkv / img_attn_proj hold.
DOUBLE_IMAGE_ATTENTION = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
RANK, ALPHA = 4, 8


def make_lora(transformer: torch.nn.Module, target_modules, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A peft LoRA on ``transformer`` with random A and B (not the identity), its state dict and peft config."""
    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=target_modules, init_lora_weights=False)
    transformer.add_adapter(config)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer).items()}
    transformer.delete_adapters("default")
    return state, config.to_dict()


def make_text_lora(encoder: torch.nn.Module, seed: int) -> dict[str, Any]:
    """save_lora_weights' arguments of a peft LoRA on a CLIP text encoder's attention query and value projections
    (random A and B)."""
    from peft import inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=2 * ALPHA, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    inject_adapter_in_model(config, encoder)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(encoder).items()}
    return dict(text_encoder_lora_layers=state, text_encoder_lora_adapter_metadata=config.to_dict())


def save_lora(loader, folder, state: dict[str, torch.Tensor], config: dict, **text_layers) -> str:
    """The LoRA saved with diffusers' save_lora_weights (the peft config as the adapter metadata)."""
    loader.save_lora_weights(folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=config,
                             **text_layers)
    return str(folder / "pytorch_lora_weights.safetensors")


def condition(seed: int = 5) -> torch.Tensor:
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def flux_lora(tmp_path_factory):
    """A Flux LoRA on every attention projection and on CLIP's (diffusers' file), and a ControlNet of the tiny base."""
    folder = tmp_path_factory.mktemp("flux-lora")
    components = flux_components()
    base = components["transformer"]
    cn = trained_like(FluxControlNet.from_transformer(base, num_layers=2, num_single_layers=2), 13)
    text = make_text_lora(components["text_encoder"], 6)
    return save_lora(FluxPipeline, folder, *make_lora(base, ATTENTION, 7), **text), cn


def flux_ours(lora: str | None, weight: float, cn) -> torch.Tensor:
    pipe = TransformerPipeline(**flux_components())
    if lora is not None:
        pipe.load_lora(lora, weight)
    return pipe(PROMPT, [TransformerUnit(cn, condition(), 0.8, 0.0, 0.75)], **COMMON)


# --------------------------------------------------------------------------------------------- Flux


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_flux_generation_with_a_lora_matches_diffusers(flux_lora, weight):
    path, cn = flux_lora
    ours = flux_ours(path, weight, cn)

    noise, g = after_noise()
    pipe = FluxControlNetPipeline(**diffusers_components(flux_components()), controlnet=as_diffusers(cn))
    pipe.load_lora_weights(path, adapter_name="style")
    pipe.set_adapters(["style"], [weight])
    theirs = pipe(PROMPT, control_image=condition() * 2 - 1, controlnet_conditioning_scale=0.8,
                  control_guidance_end=0.75, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=3.5,
                  generator=g, latents=pack_latents(noise), output_type="latent", max_sequence_length=16).images
    assert (ours - theirs).abs().max() < TOL
    assert (ours - flux_ours(None, 1.0, cn)).abs().max() > 1e-2  # the LoRA does act


def test_weight_zero_is_no_lora_and_the_settings_name_the_lora(flux_lora):
    from controlnet.generation_config import GenerationConfig

    path, cn = flux_lora
    assert torch.equal(flux_ours(path, 0.0, cn), flux_ours(None, 1.0, cn))
    pipe = TransformerPipeline(**flux_components())
    name = pipe.load_lora(path, 0.5)
    assert pipe.load_lora(path, 0.7) == name  # the same file again: only its weight changes
    assert adapters_in(pipe.transformer) == adapters_in(pipe.text_encoder) == [name]  # CLIP's part in CLIP
    result = pipe.generate(PROMPT, [], GenerationConfig(steps=2, size=(SIZE, SIZE), seed=SEED), progress=False)
    assert result.settings["loras"] == {name: [0.7, 0.7]}
    assert result.settings["lora_files"] == {name: [path, 0.7, 0.7]}


def test_prompt_tags_load_from_the_lora_folder_for_one_generation(flux_lora, tmp_path):
    from controlnet.generation_config import GenerationConfig

    path, _ = flux_lora
    (tmp_path / "style.safetensors").write_bytes(open(path, "rb").read())
    config = GenerationConfig(steps=2, size=(SIZE, SIZE), seed=SEED)
    tagged = TransformerPipeline(**flux_components())
    tagged.loras.lora_dir = tmp_path
    by_tag = tagged.generate("<lora:style:0.6>" + PROMPT, [], config, progress=False)
    assert by_tag.settings["loras"] == {"style": [0.6, 0.6]} and "lora_files" not in by_tag.settings
    after = tagged.generate(PROMPT, [], config, progress=False)  # the tag's LoRA acts for its generation only
    loaded = TransformerPipeline(**flux_components())
    loaded.load_lora(tmp_path / "style.safetensors", 0.6)
    assert np.array_equal(np.asarray(by_tag.images[0]), np.asarray(loaded.generate(PROMPT, [], config,
                                                                                    progress=False).images[0]))
    plain = TransformerPipeline(**flux_components()).generate(PROMPT, [], config, progress=False)
    assert np.array_equal(np.asarray(after.images[0]), np.asarray(plain.images[0]))
    assert not np.array_equal(np.asarray(by_tag.images[0]), np.asarray(plain.images[0]))


def test_a_lora_loads_into_an_offloaded_base(flux_lora):
    path, cn = flux_lora
    pipe = TransformerPipeline(**flux_components())
    pipe.enable_offload("sequential", "cpu")
    pipe.load_lora(path, 0.6)
    ours = pipe(PROMPT, [TransformerUnit(cn, condition(), 0.8, 0.0, 0.75)], **COMMON)
    assert (ours - flux_ours(path, 0.6, cn)).abs().max() < TOL


def test_text_encoder_parts_a_base_does_not_take_are_ignored_with_a_warning(flux_lora, tmp_path):
    from safetensors import safe_open

    path, cn = flux_lora
    with safe_open(path, framework="pt") as f:  # the layers and the adapter metadata (the alphas)
        state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    t5 = {"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.randn(RANK, 32),
          "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.randn(32, RANK)}
    save_file({**state, **t5}, str(tmp_path / "with-t5.safetensors"), metadata=metadata)
    pipe = TransformerPipeline(**flux_components())
    with pytest.warns(UserWarning, match="layers for text_encoder_2 are ignored"):
        pipe.load_lora(tmp_path / "with-t5.safetensors", 0.6)
    assert not adapters_in(pipe.text_encoder_2)
    ours = pipe(PROMPT, [TransformerUnit(cn, condition(), 0.8, 0.0, 0.75)], **COMMON)
    assert (ours - flux_ours(path, 0.6, cn)).abs().max() < TOL


def to_kohya(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers Flux LoRA on the double blocks' image attention in kohya's (sd-scripts') layout: q, k and v as one
    img_attn_qkv layer of rank 3r (their down matrices stacked, their up matrices block-diagonal), alpha 3 * alpha."""
    kohya = {}
    for i in range(blocks):
        layer = f"transformer_blocks.{i}.attn."
        downs = [state[layer + f"{p}.lora_A.weight"] for p in ("to_q", "to_k", "to_v")]
        ups = [state[layer + f"{p}.lora_B.weight"] for p in ("to_q", "to_k", "to_v")]
        kohya[f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.weight"] = torch.cat(downs)
        kohya[f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_up.weight"] = torch.block_diag(*ups)
        kohya[f"lora_unet_double_blocks_{i}_img_attn_qkv.alpha"] = torch.tensor(3.0 * ALPHA)
        kohya[f"lora_unet_double_blocks_{i}_img_attn_proj.lora_down.weight"] = state[layer + "to_out.0.lora_A.weight"]
        kohya[f"lora_unet_double_blocks_{i}_img_attn_proj.lora_up.weight"] = state[layer + "to_out.0.lora_B.weight"]
        kohya[f"lora_unet_double_blocks_{i}_img_attn_proj.alpha"] = torch.tensor(float(ALPHA))
    return kohya


def test_a_kohya_flux_lora_is_the_diffusers_one_it_was_made_from(flux_lora, tmp_path):
    _, cn = flux_lora
    base = flux_components()["transformer"]
    state, config = make_lora(base, DOUBLE_IMAGE_ATTENTION, 9)
    diffusers_file = save_lora(FluxPipeline, tmp_path, state, config)
    kohya_file = tmp_path / "kohya.safetensors"
    save_file(to_kohya(state, base.config.num_layers), str(kohya_file))
    assert lora_family(to_kohya(state, 1)) == "Flux"
    ours = flux_ours(str(kohya_file), 0.8, cn)
    assert (ours - flux_ours(diffusers_file, 0.8, cn)).abs().max() < TOL
    assert (ours - flux_ours(None, 1.0, cn)).abs().max() > 1e-2


def test_a_lora_of_another_family_is_refused_in_one_line(flux_lora, tmp_path):
    path, _ = flux_lora
    sd15 = tmp_path / "sd15.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 768), f"{key}.lora_up.weight": torch.randn(320, 4)}, str(sd15))
    flux = TransformerPipeline(**flux_components())
    with pytest.raises(UserError, match="made for SD1.x, not Flux: use a LoRA made for Flux") as err:
        flux.load_lora(sd15)
    assert len(str(err.value).splitlines()) == 1
    sd3 = TransformerPipeline(**sd3_components())
    with pytest.raises(UserError, match="is made for Flux, not SD3") as err:
        sd3.load_lora(path)  # single_transformer_blocks: a Flux LoRA
    assert len(str(err.value).splitlines()) == 1
    wide = tmp_path / "wide.safetensors"  # a Flux LoRA of a wider model: names that fit, shapes that do not
    layer = "transformer.transformer_blocks.0.attn.to_q"
    save_file({f"{layer}.lora_A.weight": torch.randn(4, 3072), f"{layer}.lora_B.weight": torch.randn(3072, 4)}, str(wide))
    with pytest.raises(UserError, match="does not fit this Flux base .*takes 32 inputs, the LoRA 3072"):
        flux.load_lora(wide)
    assert not flux.loras.specs and not adapters_in(flux.transformer)  # nothing was loaded
    control = tmp_path / "control.safetensors"  # BFL's control-LoRA layout: norm scales beside the LoRA layers
    layer = "double_blocks.0.img_attn"
    save_file({f"{layer}.qkv.lora_A.weight": torch.randn(4, 32), f"{layer}.qkv.lora_B.weight": torch.randn(96, 4),
               f"{layer}.norm.query_norm.scale": torch.ones(16)}, str(control))
    with pytest.raises(UserError, match="is a control LoRA for diffusers' FluxControlPipeline, not a style LoRA"):
        flux.load_lora(control)


# --------------------------------------------------------------------------------------------- SD3


def test_sd3_generation_with_a_lora_matches_diffusers(tmp_path):
    components = sd3_components(posterior_std=1e-7)
    base = components["transformer"]
    cn = trained_like(SD3ControlNet.from_transformer(base, 2), 21)
    path = save_lora(StableDiffusion3Pipeline, tmp_path, *make_lora(sd3_components()["transformer"], ATTENTION, 8))
    pipe = TransformerPipeline(**components)
    pipe.load_lora(path, 0.7)
    ours = pipe(PROMPT, [TransformerUnit(cn, condition(), 0.7, 0.0, 0.75)], guidance=5.0,
                negative_prompt="green square", **COMMON)

    noise, g = after_noise()
    ref = StableDiffusion3ControlNetPipeline(**diffusers_components(sd3_components(posterior_std=1e-7)),
                                             controlnet=as_diffusers(cn))
    ref.load_lora_weights(path, adapter_name="style")
    ref.set_adapters(["style"], [0.7])
    theirs = ref(PROMPT, negative_prompt="green square", control_image=condition() * 2 - 1,
                 controlnet_conditioning_scale=0.7, control_guidance_end=0.75, height=SIZE, width=SIZE,
                 num_inference_steps=STEPS, guidance_scale=5.0, generator=g, latents=noise, output_type="latent",
                 max_sequence_length=16).images
    assert (ours - theirs).abs().max() < TOL
    pipe.load_lora(path, 0.0)
    plain = pipe(PROMPT, [TransformerUnit(cn, condition(), 0.7, 0.0, 0.75)], guidance=5.0,
                 negative_prompt="green square", **COMMON)
    assert (ours - plain).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- Qwen-Image


def test_qwen_image_generation_with_a_lora_matches_diffusers(tmp_path):
    from diffusers import QwenImagePipeline

    from controlnet.testing_flow import QWEN_LATENT_CHANNELS, qwen_components

    path = save_lora(QwenImagePipeline, tmp_path, *make_lora(qwen_components()["transformer"], ATTENTION, 12))
    pipe = TransformerPipeline(**qwen_components())
    pipe.load_lora(path, 0.7)
    common = dict(steps=STEPS, seed=SEED, height=SIZE, width=SIZE, output_type="latent")
    ours = pipe(PROMPT, guidance=1.0, **common)

    g = torch.Generator().manual_seed(SEED)
    noise = pack_latents(randn_tensor((1, QWEN_LATENT_CHANNELS, SIZE // 4, SIZE // 4), generator=g))
    ref = QwenImagePipeline(**diffusers_components(qwen_components()))
    ref.load_lora_weights(path, adapter_name="style")
    ref.set_adapters(["style"], [0.7])
    theirs = ref(PROMPT, true_cfg_scale=1.0, latents=noise, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                 output_type="latent").images
    assert (ours - theirs).abs().max() < TOL
    pipe.load_lora(path, 0.0)
    assert (ours - pipe(PROMPT, guidance=1.0, **common)).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------- command line


def _main(argv: list[str]) -> int:
    from controlnet.cli import main

    return main(argv)


def test_generate_on_tiny_flux_with_a_lora_records_it_and_refuses_another_familys(tmp_path, capsys, monkeypatch):
    from controlnet.embedded import embedded_base

    base = TransformerPipeline.from_pretrained(embedded_base("tiny-flux")).transformer
    (tmp_path / "lora").mkdir()
    path = save_lora(FluxPipeline, tmp_path / "lora", *make_lora(base, ATTENTION, 10))
    args = ["generate", "--base", "tiny-flux", "--prompt", "a red circle", "--steps", "2", "--size", "32x32",
            "--seed", "3", "--dtype", "fp32", "--device", "cpu", "-q"]
    monkeypatch.chdir(tmp_path)  # stored paths must lie under the current folder or the PNG's
    assert _main([*args, "--out", str(tmp_path / "with"), "--lora", f"{path}:0.8"]) == 0
    made = tmp_path / "with" / "00000-3.png"
    with Image.open(made) as im:
        settings = json.loads(im.text["settings"])
    assert settings["lora_files"] == {"lora": [path, 0.8, 0.8]} and settings["loras"] == {"lora": [0.8, 0.8]}
    assert _main([*args, "--out", str(tmp_path / "without")]) == 0
    with Image.open(made) as a, Image.open(tmp_path / "without" / "00000-3.png") as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert _main(["generate", "--from-png", str(made), "-q", "--out", str(tmp_path / "again")]) == 0
    with Image.open(made) as a, Image.open(tmp_path / "again" / "00000-3.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))

    sd15 = tmp_path / "sd15.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 768), f"{key}.lora_up.weight": torch.randn(320, 4)}, str(sd15))
    capsys.readouterr()
    assert _main([*args, "--out", str(tmp_path / "refused"), "--lora", str(sd15)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is made for SD1.x, not Flux" in err, err
