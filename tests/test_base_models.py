"""The base model as practitioners name and extend it, on tiny seeded models with a hand-built hub cache (no
network): hub ids (folders, variants, revisions, single files, ControlNets, offline and missing), another VAE
(diffusers folder, original single file), textual-inversion embeddings against diffusers' loader, schedulers by
our and A1111's names (LCM wired for 4 steps), family defaults, offload / compile / channels-last / VAE tiling,
and the command line's one-line errors.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from controlnet.testing import TINY_VAE, build_diffusers_pipeline, build_text_encoder_2, build_vae, tiny_components
from cli_checks import offline_hub
from controlnet.defaults import SCHEDULERS, scheduler_name
from controlnet.errors import EXIT_BAD_INPUT, UserError
from controlnet.model import ControlNet
from controlnet.pipeline import ControlUnit, Pipeline
from hubcache import add_to_hub_cache

WORDS = ["red", "circle"]
GEN = dict(steps=2, size=(32, 32), seed=3, progress=False, output_type="latent")


def _components(family: str = "sd1", vae_seed: int = 3) -> dict:
    """The tiny seeded components with Stable Diffusion's DDIM schedule."""
    comps = tiny_components(WORDS, family, vae_seed=vae_seed)
    return {**comps, **build_text_encoder_2(WORDS, seed=5)} if family == "sdxl" else comps


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache, offline: HF_HUB_CACHE / HF_HUB_OFFLINE, also for a huggingface_hub imported earlier."""
    cache = tmp_path / "hub"
    cache.mkdir()
    offline_hub(monkeypatch, cache)
    return cache


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny SD1 diffusers folder whose UNet also has fp16-variant weights (rounded: they differ)."""
    folder = tmp_path_factory.mktemp("base") / "tiny-sd"
    pipe = build_diffusers_pipeline(_components())
    pipe.save_pretrained(folder)
    pipe.unet.half().save_pretrained(folder / "unet", variant="fp16")
    return folder


# --------------------------------------------------------------------------- hub ids


def test_base_from_a_hub_id_with_variant_and_revision(hub, base_folder):
    add_to_hub_cache(hub, "org/tiny-sd", {".": base_folder})
    add_to_hub_cache(hub, "org/tiny-sd", {}, revision="v1")
    local = Pipeline.from_pretrained(base_folder, dtype="fp32", device="cpu")
    pipe = Pipeline.from_pretrained("org/tiny-sd", dtype="fp32", device="cpu")
    assert pipe.base == "org/tiny-sd"
    assert torch.equal(pipe.unet.conv_in.weight, local.unet.conv_in.weight)
    fp16 = Pipeline.from_pretrained("org/tiny-sd", dtype="fp32", device="cpu", variant="fp16", revision="v1")
    assert torch.equal(fp16.unet.conv_in.weight, local.unet.conv_in.weight.half().float())
    assert not torch.equal(fp16.unet.conv_in.weight, local.unet.conv_in.weight)
    assert torch.equal(fp16.vae.encoder.conv_in.weight, local.vae.encoder.conv_in.weight)  # no variant: plain files


def test_hub_id_offline_and_missing_is_one_line_with_the_fetch_command(hub):
    for call, message in [
        (lambda: Pipeline.from_pretrained("org/nothing", device="cpu"), "`hf download org/nothing`"),
        (lambda: Pipeline.from_pretrained("org/nothing", device="cpu", revision="v2"), "--revision v2"),
        (lambda: Pipeline.from_pretrained("org/nothing/model.safetensors", device="cpu"),
         "model.safetensors of org/nothing"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)) as err:
            call()
        assert "HF_HUB_OFFLINE" in str(err.value) and "\n" not in str(err.value)


def test_controlnet_and_lora_by_hub_id(hub, tmp_path):
    from controlnet.checkpoints import save_controlnet

    comps = _components()
    cn = ControlNet.from_unet(comps["unet"])
    with torch.no_grad():
        for p in cn.zero_convs():
            p.weight.normal_(0, 0.05)
    save_controlnet(cn, tmp_path / "cn", "diffusers")
    add_to_hub_cache(hub, "someone/control_tiny_canny", {".": tmp_path / "cn"})
    pipe = Pipeline(**comps, dtype="fp32", device="cpu")
    condition = np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8)
    by_id = pipe("red", controls=[ControlUnit("someone/control_tiny_canny", condition)], **GEN)
    by_path = pipe("red", controls=[ControlUnit(str(tmp_path / "cn"), condition)], **GEN)
    assert torch.equal(by_id.latents, by_path.latents)
    assert by_id.settings["controlnets"][0]["controlnet"] == "someone/control_tiny_canny"
    with pytest.raises(UserError, match="hf download someone/other"):
        pipe("red", controls=[ControlUnit("someone/other", condition)], **GEN)


def test_any_hub_id_takes_a_revision_after_an_at_sign(hub, tmp_path, base_folder):
    """``org/name@REV`` picks the revision of that repository (base, ControlNet, VAE, LoRA file, embedding file);
    a repository cached only at another revision is missing (one line naming --revision in the fetch command)."""
    from controlnet.embeddings import find_embedding
    from controlnet.hub import HubRef, hub_ref
    from controlnet.loading import resolve_controlnet_source
    from controlnet.lora import find_lora

    assert hub_ref("org/name@v2") == HubRef("org/name", None, "v2")
    assert hub_ref("org/name/sub/w.safetensors@refs/pr/1") == HubRef("org/name", "sub/w.safetensors", "refs/pr/1")
    assert hub_ref("org/name", revision="v3") == HubRef("org/name", None, "v3")
    assert hub_ref(str(tmp_path)) is None and hub_ref("not an id@v2") is None
    with pytest.raises(UserError, match="names revision 'v2' and --revision says 'v3'"):
        hub_ref("org/name@v2", revision="v3")

    add_to_hub_cache(hub, "org/tiny-sd", {".": base_folder}, revision="v2")
    add_to_hub_cache(hub, "org/tiny-vae", {".": base_folder / "vae"}, revision="v2")
    add_to_hub_cache(hub, "org/files", {"w.safetensors": b"lora", "e.pt": b"embedding"}, revision="v2")
    pipe = Pipeline.from_pretrained("org/tiny-sd@v2", dtype="fp32", device="cpu")
    assert pipe.base == "org/tiny-sd@v2"
    assert resolve_controlnet_source("org/tiny-sd/unet/diffusion_pytorch_model.safetensors@v2").is_file()
    assert find_lora("org/files/w.safetensors@v2").read_bytes() == b"lora"
    assert find_embedding("org/files/e.pt@v2").read_bytes() == b"embedding"
    pipe.load_vae("org/tiny-vae@v2")
    assert pipe.vae_source == "org/tiny-vae@v2"
    for call in (lambda: Pipeline.from_pretrained("org/tiny-sd", device="cpu"),
                 lambda: find_lora("org/files/w.safetensors@v3")):
        with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
            call()
    with pytest.raises(UserError, match=re.escape("--revision v3")):
        find_lora("org/files/w.safetensors@v3")


# --------------------------------------------------------------------------- VAE


def _ldm_vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's weights under the original (LDM / A1111) names, the reverse of diffusers'
    convert_ldm_vae_checkpoint (the table of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py)."""
    blocks = len(vae.config.block_out_channels)
    renames = [(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."), (r"\.conv_shortcut\.", ".nin_shortcut."),
               (r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}."),
               (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
               (r"\.mid_block\.attentions\.0\.to_(q|k|v)\.", r".mid.attn_1.\1."),
               (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
               (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
               (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
               (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                lambda m: f"decoder.up.{blocks - 1 - int(m.group(1))}.block.{m.group(2)}."),
               (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                lambda m: f"decoder.up.{blocks - 1 - int(m.group(1))}.upsample.")]
    out = {}
    for key, tensor in vae.state_dict().items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if ".attn_1." in key and key.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[key] = tensor.clone()
    return out


def test_vae_from_an_original_single_file_and_from_a_hub_folder(hub, tmp_path):
    pipe = Pipeline(**_components(), dtype="fp32", device="cpu")
    other = build_vae(seed=9)
    expected = other.decode(torch.ones(1, 4, 4, 4) * 0.3).sample
    ldm = _ldm_vae_state_dict(other)
    assert "decoder.up.0.block.0.conv1.weight" in ldm and "encoder.mid.attn_1.q.weight" in ldm
    save_file(ldm, str(tmp_path / "vae-ft.safetensors"))
    pipe.load_vae(tmp_path / "vae-ft.safetensors")
    assert torch.equal(pipe.vae.decode(torch.ones(1, 4, 4, 4) * 0.3).sample, expected)
    other.save_pretrained(tmp_path / "vae-folder")
    add_to_hub_cache(hub, "org/tiny-vae", {".": tmp_path / "vae-folder"})
    fresh = Pipeline(**_components(), dtype="fp32", device="cpu")
    fresh.load_vae("org/tiny-vae")
    assert torch.equal(fresh.vae.decode(torch.ones(1, 4, 4, 4) * 0.3).sample, expected)
    assert fresh("red", **{**GEN, "output_type": "np"}).settings["vae"] == "org/tiny-vae"
    build_vae({**TINY_VAE, "latent_channels": 8}, seed=1).save_pretrained(tmp_path / "vae8")
    with pytest.raises(UserError, match="8 latent channels"):
        fresh.load_vae(tmp_path / "vae8")


# --------------------------------------------------------------------------- textual inversion


def _embedding_files(tmp_path, width: int = 32):
    g = torch.Generator().manual_seed(5)
    a1111 = torch.randn(2, width, generator=g)  # two vectors: "mystyle mystyle_1"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": a1111}, "name": "ignored", "step": 500},
               tmp_path / "mystyle.pt")
    single = torch.randn(width, generator=g)
    save_file({"<cat-toy>": single}, str(tmp_path / "learned_embeds.safetensors"))
    return a1111, single


def test_embeddings_equal_diffusers_loader(tmp_path):
    a1111, single = _embedding_files(tmp_path)
    comps = _components()
    oracle = build_diffusers_pipeline(_components())
    oracle.load_textual_inversion(str(tmp_path / "mystyle.pt"), token="mystyle")
    oracle.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    pipe = Pipeline(**comps, dtype="fp32", device="cpu")
    assert pipe.load_embedding(tmp_path / "mystyle.pt") == "mystyle"  # A1111: the file's name
    assert pipe.load_embedding(tmp_path / "learned_embeds.safetensors") == "<cat-toy>"  # diffusers: its key
    rows = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(["mystyle", "mystyle_1", "<cat-toy>"])
    assert torch.equal(rows[ids], torch.cat([a1111, single[None]]))
    assert torch.equal(rows, oracle.text_encoder.get_input_embeddings().weight)
    for prompt in ("a mystyle circle", "<cat-toy> red"):
        ours, _ = pipe.encode_weighted_prompt(prompt)
        expected, _ = oracle.encode_prompt(prompt, "cpu", 1, False)
        assert torch.equal(ours, expected), prompt
    assert pipe.load_embedding(f"{tmp_path / 'mystyle.pt'}", token="other") == "other"


def test_sdxl_embedding_goes_into_both_text_encoders(tmp_path):
    g = torch.Generator().manual_seed(6)
    clip_l, clip_g = torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xlstyle.safetensors"))
    pipe = Pipeline(**_components("sdxl"), dtype="fp32", device="cpu")
    token = pipe.load_embedding(tmp_path / "xlstyle.safetensors")
    for encoder, tokenizer, vectors in ((pipe.text_encoder, pipe.tokenizer, clip_l),
                                        (pipe.text_encoder_2, pipe.tokenizer_2, clip_g)):
        assert torch.equal(encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)], vectors[0])
    sd1 = Pipeline(**_components(), dtype="fp32", device="cpu")
    with pytest.raises(UserError, match="for SDXL"):
        sd1.load_embedding(tmp_path / "xlstyle.safetensors")
    save_file({"emb_params": torch.ones(1, 768)}, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(UserError, match="768-wide vectors.*another family"):
        sd1.load_embedding(tmp_path / "sd15.safetensors")


# --------------------------------------------------------------------------- schedulers and defaults


@pytest.fixture(scope="module")
def sd1_pipeline():
    return Pipeline(**_components(), dtype="fp32", device="cpu")


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs_a_controlled_generation(sd1_pipeline, name):
    cn = ControlNet.from_unet(sd1_pipeline.unet)
    condition = np.zeros((32, 32, 3), dtype=np.uint8)
    try:
        result = sd1_pipeline("red", controls=[ControlUnit(cn, condition)], scheduler=name, **{**GEN, "steps": 4})
    except UserError as err:  # LMS needs scipy, an optional dependency of diffusers
        assert name.startswith("lms") and "scipy" in str(err)
        return
    assert torch.isfinite(result.latents).all() and result.settings["scheduler"] == name


@pytest.mark.parametrize("a1111, ours", [("DPM++ 2M Karras", "dpmpp_2m_karras"), ("DPM++ 2M SDE Karras",
                                         "dpmpp_2m_sde_karras"), ("DPM++ SDE", "dpmpp_sde"), ("Euler a", "euler_a"),
                                         ("Heun", "heun"), ("LMS", "lms"), ("PLMS", "pndm"), ("DEIS", "deis"),
                                         ("LCM", "lcm"), ("TCD", "tcd"), ("UniPC", "unipc"), ("DPM2 a", "dpm2_a")])
def test_a1111_scheduler_names(a1111, ours):
    assert scheduler_name(a1111) == ours


def test_unknown_scheduler_is_a_user_error(sd1_pipeline):
    with pytest.raises(UserError, match=re.escape("unknown scheduler 'DPM+++'")):
        sd1_pipeline("red", scheduler="DPM+++", **GEN)


def test_lcm_runs_four_steps_with_a_controlnet_on_the_embedded_model():
    """The wiring of the few-step sampler: 4 LCM steps, each with the fill ControlNet, no CFG (guidance 1, as an
    LCM-LoRA is used). Good images in 4 steps need an LCM-LoRA or an LCM model, which the embedded base has not."""
    pipe = Pipeline.from_pretrained(dtype="fp32", device="cpu")
    steps, calls = [], []
    cn = pipe.load_controlnet("fill")
    hook = cn.register_forward_hook(lambda *a: calls.append(1))
    condition = np.zeros((64, 64, 3), dtype=np.uint8)
    condition[16:48, 16:48] = 255
    try:
        result = pipe("a white square", controls=[ControlUnit("fill", condition)], scheduler="LCM", steps=4,
                      guidance=1.0, seed=0, progress=False, callback=lambda i, t, z: steps.append(int(t)))
    finally:
        hook.remove()
    assert steps == [999, 759, 499, 259]  # LCMScheduler's 4 of its 50 original steps
    assert len(calls) == 4 and result.settings["scheduler"] == "lcm"
    assert np.asarray(result.images[0]).std() > 0


def test_defaults_follow_the_base_family():
    embedded = Pipeline.from_pretrained(dtype="fp32", device="cpu")
    assert (embedded.family, embedded.defaults.guidance, embedded.defaults.scheduler) == ("embedded", 5.0, "ddim")
    assert embedded("red", **GEN).settings["guidance"] == 5.0
    sdxl = Pipeline(**_components("sdxl"), dtype="fp32", device="cpu")
    assert (sdxl.family, sdxl.defaults.guidance, sdxl.defaults.scheduler) == ("sdxl", 5.0, "euler")
    result = sdxl("red", **GEN)
    assert (result.settings["guidance"], result.settings["scheduler"]) == (5.0, "euler")
    sd1 = Pipeline(**_components(), dtype="fp32", device="cpu")
    assert (sd1.defaults.guidance, sd1.defaults.scheduler) == (9.0, "ddim")


# --------------------------------------------------------------------------- memory and speed


def _generate(pipe, cn, **extra):
    condition = np.random.RandomState(1).randint(0, 256, (32, 32, 3), dtype=np.uint8)
    return pipe("red circle", controls=[ControlUnit(cn, condition)], **{**GEN, **extra})


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_gives_the_same_images_and_survives_loading_a_lora(tmp_path, mode):
    from test_lora import _lora_layers, _write

    comps = _components()
    cn = ControlNet.from_unet(comps["unet"])
    plain = Pipeline(**comps, dtype="fp32", device="cpu")
    expected = _generate(plain, cn)
    pipe = Pipeline(**_components(), dtype="fp32", device="cpu")
    pipe.enable_offload(mode)
    assert all(hasattr(m, "_hf_hook") or any(hasattr(s, "_hf_hook") for s in m.modules())
               for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    assert torch.equal(_generate(pipe, cn).latents, expected.latents)
    lora = _write(_lora_layers(_components(), seed=3), "kohya", tmp_path / "l.safetensors")
    pipe.load_lora(lora, 0.5)
    plain.load_lora(lora, 0.5)
    assert torch.equal(_generate(pipe, cn).latents, _generate(plain, cn).latents)
    pipe.enable_offload(None)
    assert not any(hasattr(m, "_hf_hook") for m in pipe.unet.modules())


def test_compile_and_channels_last_keep_the_images():
    comps = _components()
    cn = ControlNet.from_unet(comps["unet"])
    expected = _generate(Pipeline(**comps, dtype="fp32", device="cpu"), cn)
    pipe = Pipeline(**_components(), dtype="fp32", device="cpu")
    pipe.use_channels_last()
    pipe.compile(backend="eager")  # the wiring; inductor's speed is measured in benchmarks/options.py
    cn2 = ControlNet.from_unet(pipe.unet)
    pipe.load_controlnet(cn2)
    result = _generate(pipe, cn)
    torch.testing.assert_close(result.latents, expected.latents, atol=1e-4, rtol=0)  # channels-last: other conv order
    assert pipe.unet._compiled_call_impl is not None
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_vae_tiling_modes():
    from controlnet.limits import BYTES_PER_PIXEL, device_memory
    from controlnet.runtime import AUTO_TILING_FRACTION, wants_tiling

    memory, _ = device_memory("cpu")
    side = int((AUTO_TILING_FRACTION * memory / BYTES_PER_PIXEL) ** 0.5)
    assert not wants_tiling("auto", side - 8, side - 8, "cpu") and wants_tiling("auto", side + 8, side + 8, "cpu")
    assert wants_tiling("on", 8, 8, "cpu") and not wants_tiling("off", 10**5, 10**5, "cpu")
    pipe = Pipeline(**_components(), dtype="fp32", device="cpu")
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # 256 px: over the tiny tile
    with torch.inference_mode():
        plain = pipe.decode(latents)
        pipe.vae_tiling = "on"
        tiled = pipe.decode(latents)
    assert pipe.vae.use_tiling and tiled.shape == plain.shape and not np.array_equal(tiled, plain)
    assert np.abs(tiled.astype(int) - plain.astype(int)).mean() < 40  # the same picture, tiles blended


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, base_folder):
    from test_lora import _lora_layers, _write

    root = tmp_path_factory.mktemp("cli")
    _write(_lora_layers(_components("sdxl"), seed=1), "kohya", root / "xl_style.safetensors", sdxl=True)
    good = _write(_lora_layers(_components(), seed=2), "kohya", root / "style.safetensors")
    (root / "corrupt.safetensors").write_bytes(good.read_bytes()[:300])
    Image.new("RGB", (32, 32), "white").save(root / "cond.png")
    return root


def _run(argv):
    from controlnet.cli import main

    return main(argv)


@pytest.mark.parametrize("extra, message", [
    (["--lora", "{root}/xl_style.safetensors"], "a LoRA for SDXL"),
    (["--lora", "{root}/corrupt.safetensors:0.5"], "corrupt.safetensors"),
    (["--scheduler", "DPM++ 9M"], "unknown scheduler 'DPM++ 9M'"),
    (["--clip-skip", "0"], "--clip-skip must be >= 1"),
    (["--embedding", "{root}/style.safetensors"], "not a textual-inversion file"),
])
def test_bad_model_options_exit_2_with_one_line(cli_files, base_folder, tmp_path, capsys, extra, message):
    argv = ["generate", "--base", str(base_folder), "--prompt", "red", "--steps", "1", "--size", "32", "--quiet",
            "--out", str(tmp_path / "out"), *[e.format(root=cli_files) for e in extra]]
    assert _run(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_hub_base_offline_exits_2_naming_the_fetch_command(hub, tmp_path, capsys):
    argv = ["generate", "--base", "stable-diffusion-v1-5/stable-diffusion-v1-5", "--prompt", "red", "--quiet",
            "--out", str(tmp_path / "out")]
    assert _run(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in err and err.count("\n") == 1, err


def test_cli_applies_lora_clip_skip_and_a1111_scheduler(cli_files, base_folder, tmp_path, capsys):
    import json

    argv = ["generate", "--base", str(base_folder), "--prompt", "(red:1.2) circle", "--steps", "2", "--size", "32",
            "--quiet", "--out", str(tmp_path / "out"), "--lora", f"{cli_files}/style.safetensors:0.5",
            "--clip-skip", "2", "--scheduler", "DPM++ 2M Karras"]
    assert _run(argv) == 0
    image = sorted((tmp_path / "out").glob("00000-*.png"))[0]
    settings = json.loads(Image.open(image).info["settings"])
    assert settings["loras"] == {"style": [0.5, 0.5]} and settings["clip_skip"] == 2
    assert settings["scheduler"] == "dpmpp_2m_karras" and settings["guidance"] == 9.0  # SD1.x's default


def test_help_shows_the_family_defaults(capsys):
    from controlnet.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 9.0 for SD1.x and SD2.x, 5.0 for SDXL and the embedded model, 3.5 for Flux, 7.0 for SD3, 4.0 for Qwen-Image)" in text
    assert "euler for SDXL" in text and "--lora FILE_OR_ID[:WEIGHT]" in text and "--offload {model,sequential}" in text
