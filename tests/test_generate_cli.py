"""``controlnet generate`` end to end on a tiny base folder (and on the embedded model once it ships): outputs,
PNG metadata, determinism, and every bad-input case → one line on stderr, exit code 2, nothing in --out."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.testing import build_text_encoder, build_tokenizer, build_unet, build_vae
from controlnet.errors import EXIT_BAD_INPUT
from controlnet.model import ControlNet

PROMPT = "red circle"


def _main(argv: list[str]) -> int:
    from controlnet.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny SD1-layout diffusers base folder, a ControlNet for it, one for SD2, and condition images."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from controlnet.checkpoints import save_controlnet

    root = tmp_path_factory.mktemp("generate")
    tok = build_tokenizer(["red", "circle"])
    unet = build_unet("sd1", seed=1)
    base = StableDiffusionPipeline(
        vae=build_vae(seed=2), text_encoder=build_text_encoder(len(tok.get_vocab()), seed=3), tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    base.save_pretrained(root / "base")
    cn = ControlNet.from_unet(unet)
    with torch.no_grad():
        for p in cn.zero_convs():
            p.weight.normal_(0, 0.05)
    save_controlnet(cn, root / "cn-sd1", "diffusers")
    save_controlnet(ControlNet.from_unet(build_unet("sd2")), root / "cn-sd2", "diffusers")
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "cond.png")
    Image.new("RGBA", (40, 40), (255, 255, 255, 128)).save(root / "cond-rgba.png")
    (root / "broken.png").write_bytes(b"not a png at all")
    return root


def _args(assets, out, *extra: str) -> list[str]:
    return ["generate", "--base", str(assets / "base"), "--prompt", PROMPT, "--steps", "2", "--quiet",
            "--out", str(out), *extra]


def test_generate_writes_images_conditions_grid_with_metadata(assets, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _args(assets, out, "--size", "61x45", "--num-images", "2", "--seed", "5", "--guidance", "4",
                 "--controlnet", str(assets / "cn-sd1"), "--control", str(assets / "cond.png"), "--strength", "0.8",
                 "--controlnet", str(assets / "cn-sd1"), "--control", str(assets / "cond-rgba.png"),
                 "--annotator", "canny", "--annotator-param", "low_threshold=50", "--start", "0.5", "--end", "1")
    assert _main(argv) == 0
    captured = capsys.readouterr()
    assert "rounded to 64x48" in captured.err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-5.png", "00000-6.png", "00000-control0.png", "00000-control1.png", "00000-grid.png"]
    with Image.open(out / "00000-6.png") as im:
        assert im.size == (64, 48)
        meta = dict(im.text)
        first = np.asarray(im.convert("RGB"))
    assert json.loads(meta["settings"])["prompt"] == PROMPT and meta["seed"] == "6" and meta["steps"] == "2" and meta["size"] == "64x48"
    assert meta["scheduler"] == "ddim" and float(meta["guidance"]) == 4.0 and meta["negative_prompt"] == ""
    units = json.loads(meta["controlnets"])
    assert [(u["strength"], u["start"], u["end"]) for u in units] == [(0.8, 0.0, 1.0), (1.0, 0.5, 1.0)]
    assert units[1]["annotator"] == "canny" and units[1]["annotator_params"] == {"low_threshold": 50}
    with Image.open(out / "00000-control1.png") as edges:  # the canny map actually used: white on black only
        assert set(np.unique(np.asarray(edges))) <= {0, 255}
    with Image.open(out / "00000-grid.png") as grid:
        assert grid.size == (4 * 64, 48)  # conditions | outputs
    # Same seed and settings → identical pixels; the next run gets the next number.
    assert _main(argv) == 0
    with Image.open(out / "00001-6.png") as again:
        assert np.array_equal(np.asarray(again.convert("RGB")), first)


@pytest.mark.parametrize("extra,message", [
    (["--controlnet", "{a}/cn-sd1", "--control", "{a}/missing.png"], "missing.png: no such file"),
    (["--controlnet", "{a}/cn-sd1", "--control", "{a}/broken.png"], "not an image file"),
    (["--controlnet", "{a}/cn-sd2", "--control", "{a}/cond.png"], "sd2"),
    (["--controlnet", "{a}/cn-sd1", "--controlnet", "{a}/cn-sd1", "--control", "{a}/cond.png"], "2 --controlnet and 1 --control"),
    (["--controlnet", "{a}/cn-sd1", "--control", "{a}/cond.png", "--strength", "-1"], "strength"),
    (["--controlnet", "{a}/cn-sd1", "--control", "{a}/cond.png", "--start", "0.8", "--end", "0.2"], "start"),
    (["--controlnet", "{a}/cn-sd1", "--control", "{a}/cond.png", "--end", "1.5"], "end must be in"),
    (["--strength", "0.5", "--controlnet", "{a}/cn-sd1", "--control", "{a}/cond.png"], "must come after"),
    (["--controlnet", "{a}/cn-sd1", "--control", "{a}/cond.png", "--strength", "1", "--strength", "2"], "given twice"),
    (["--controlnet", "{a}/nothing-here", "--control", "{a}/cond.png"], "no ControlNet named or at"),
    (["--controlnet", "{a}/cn-sd1", "--control", "{a}/cond.png", "--annotator", "nope"], "unknown annotator 'nope'"),
    (["--controlnet", "{a}/cn-sd1", "--control", "{a}/cond.png", "--annotator", "canny",
      "--annotator-param", "low_threshold=abc"], "expects an integer"),
    (["--controlnet", "{a}/cn-sd1", "--control", "{a}/cond.png", "--annotator", "inpaint"], "'mask' is required"),
    (["--size", "big"], "size 'big'"),
    (["--base", "{a}/no-such-base"], "not found"),
    (["--num-images", "13"], "number of images must be in 1..12"),
    (["--num-images", "0"], "number of images must be in 1..12"),
    (["--controlnet", "{a}/cn-sd1", "--control", "{a}/cond.png", "--annotator", "canny",
      "--annotator-param", "low_threshold"], "write key=value"),
    (["--controlnet", "{a}/cn-sd1", "--control", "{a}/cond.png", "--annotator-param", "low_threshold=5"],
     "has no --annotator"),
])
def test_bad_input_exits_2_with_one_line_and_no_files(assets, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    out.mkdir()
    argv = _args(assets, out, *[e.format(a=assets) for e in extra])
    assert _main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("controlnet generate: error: "), err
    assert list(out.iterdir()) == []


def test_single_file_base_without_config_says_how_to_fix(tmp_path, capsys, monkeypatch):
    """Offline, a single-file base needs its diffusers config: a one-line error naming --base-config."""
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # nothing cached, whatever this machine has
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)}, str(ckpt))
    out = tmp_path / "out"
    assert _main(["generate", "--base", str(ckpt), "--prompt", PROMPT, "--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "--base-config" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_generate_on_the_embedded_model(tmp_path, capsys):
    from controlnet.embedded import assets_dir, bundled_controlnets

    if not (assets_dir() / "tiny-sd" / "model_index.json").is_file() or "fill" not in bundled_controlnets():
        pytest.skip("needs the embedded tiny-sd base and the bundled 'fill' ControlNet in "
                    "src/controlnet/assets (scripts/train_embedded.py --ship makes them)")
    cond = np.zeros((128, 128, 3), np.uint8)
    cond[32:96, 32:96] = 255
    Image.fromarray(cond).save(tmp_path / "cond.png")
    out = tmp_path / "out"
    argv = ["generate", "--prompt", "red circle with white background", "--controlnet", "fill",
            "--control", str(tmp_path / "cond.png"), "--steps", "3", "-q", "--out", str(out)]
    assert _main(argv) == 0
    with Image.open(out / "00000-0.png") as im:
        assert im.text["base"] == "embedded" and json.loads(im.text["controlnets"])[0]["controlnet"] == "fill"
        assert im.size[0] % 8 == 0 and im.size[1] % 8 == 0
    assert (out / "00000-grid.png").is_file() and (out / "00000-control0.png").is_file()


# --------------------------------------------------------------------------- the command line's plumbing

COMMANDS = ["generate", "annotate", "train", "data", "demo", "convert", "ui"]
HEAVY = ("torch", "diffusers", "transformers", "cv2", "numpy", "gradio", "accelerate")


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--steps", "two"], "controlnet generate: error: argument --steps: invalid int "
                                                      "value: 'two'; see `controlnet generate --help`"),
    (["data", "fill"], "controlnet data fill: error: the following arguments are required: out; "
                       "see `controlnet data fill --help`"),
    (["--bogus"], "controlnet: error: the following arguments are required: COMMAND; see `controlnet --help`"),
])
def test_argparse_errors_are_one_line_with_a_pointer_to_help(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        _main(argv)
    assert exit_.value.code == EXIT_BAD_INPUT
    assert capsys.readouterr().err == message + "\n"


def test_generate_without_a_prompt_is_one_line(capsys):
    """--prompt is not an argparse requirement (--prompts FILE or --from-png IMG may give it): checked in run."""
    assert _main(["generate"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == ("controlnet generate: error: give --prompt TEXT (or --prompts FILE, or "
                                       "--from-png IMG); see `controlnet generate --help`\n")


def test_help_states_each_default_once(capsys):
    from controlnet.cli import build_parser
    from controlnet.defaults import DEFAULT_STEPS, MAX_NUM_IMAGES

    for command in ["generate", "annotate", "data fill", "demo", "ui"]:
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command.split(), "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for option in text.split(" --")[1:]:
            assert option.count("default") <= 1, (command, option)
        assert "-q, --quiet" in text, command
        if command == "generate":
            assert f"denoising steps (default: {DEFAULT_STEPS})" in text and f"1..{MAX_NUM_IMAGES}" in text
            assert "(default: )" not in text and "(default: None)" not in text


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_nothing_heavy(command):
    """`controlnet --help` builds every command's parser: none may import torch, diffusers, OpenCV, numpy..."""
    script = (f"import sys; from controlnet.cli import Parser; import controlnet.commands.{command} as m; "
              "m.register(Parser(prog='controlnet').add_subparsers()); "
              f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"controlnet.commands.{command} imports {out.stdout.strip()} for --help"


def test_from_png_loads_the_loras_and_embeddings_again(tmp_path, monkeypatch):
    """A generation with --lora and --embedding on the embedded model, re-run from its PNG, gives the same image;
    without the LoRA the image differs (so the re-run did load it)."""
    from safetensors.torch import save_file

    from controlnet.commands.generate import png_options

    monkeypatch.chdir(tmp_path)  # the LoRA and embedding files lie in the current folder: stored settings may name them
    from controlnet.pipeline import Pipeline

    pipe = Pipeline.from_pretrained()
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_v")) and isinstance(module, torch.nn.Linear):
            key = "lora_unet_" + name.replace(".", "_")  # kohya/A1111 layout
            lora[f"{key}.lora_down.weight"] = torch.randn(2, module.in_features, generator=g)
            lora[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=g)
            lora[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(lora, tmp_path / "style.safetensors")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"emb_params": torch.randn(2, width, generator=g)}, tmp_path / "thing.safetensors")

    common = ["--steps", "2", "--seed", "3", "--size", "64x64", "-q"]
    given = ["--lora", f"{tmp_path / 'style.safetensors'}:0.9", "--embedding", f"{tmp_path / 'thing.safetensors'}:mytok"]
    assert _main(["generate", "--prompt", "a mytok circle", *given, *common, "--out", str(tmp_path / "a")]) == 0
    first = tmp_path / "a" / "00000-3.png"
    options = png_options(str(first))
    assert options["lora"] == [f"{tmp_path / 'style.safetensors'}:0.9"]
    assert options["embedding"] == [f"{tmp_path / 'thing.safetensors'}:mytok"]
    assert _main(["generate", "--from-png", str(first), "-q", "--out", str(tmp_path / "b")]) == 0
    again = np.asarray(Image.open(tmp_path / "b" / "00000-3.png"))
    assert np.array_equal(np.asarray(Image.open(first)), again)
    plain = ["--embedding", f"{tmp_path / 'thing.safetensors'}:mytok"]
    assert _main(["generate", "--prompt", "a mytok circle", *plain, *common, "--out", str(tmp_path / "c")]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "c" / "00000-3.png")), again)


# --------------------------------------------------------------------------- --from-png reproduces the picture


@pytest.mark.parametrize("mode", ["hires", "only-masked", "img2img-other-size"])
def test_from_png_reproduces_hires_only_masked_and_img2img_of_another_size(mode, tmp_path, monkeypatch):
    """A picture made on the command line comes back bit for bit from --from-png: the hires fix from its first
    pass's size (the recorded "size"), "only masked" from its box's generation size, img2img from an init image
    whose size is not a multiple of 8."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((71, 57, 3)) * 255).astype(np.uint8)).save("init.png")
    mask = np.zeros((71, 57), np.uint8)
    mask[20:40, 10:30] = 255
    Image.fromarray(mask).save("mask.png")
    condition = np.zeros((64, 64, 3), np.uint8)
    condition[16:48, 16:48] = 255
    Image.fromarray(condition).save("cond.png")
    extra = {"hires": ["--size", "64x48", "--hires-scale", "1.5", "--hires-denoise", "0.5"],
             "only-masked": ["--init-image", "init.png", "--mask", "mask.png", "--inpaint-full-res",
                             "--inpaint-padding", "4", "--size", "64x64"],
             "img2img-other-size": ["--init-image", "init.png", "--denoise", "0.6"]}[mode]
    common = ["--controlnet", "fill", "--control", "cond.png", "--steps", "2", "--seed", "3", "-q", "--dtype", "fp32"]
    assert _main(["generate", "--prompt", "red square", *common, *extra, "--out", "first"]) == 0
    made = tmp_path / "first" / "00000-3.png"
    assert _main(["generate", "--from-png", str(made), "-q", "--out", "again"]) == 0
    with Image.open(made) as a, Image.open(tmp_path / "again" / "00000-3.png") as b:
        first, again = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
        settings = json.loads(a.text["settings"])
    assert first.shape == again.shape and np.array_equal(first, again)
    expected_shape = {"hires": (72, 96, 3), "only-masked": (71, 57, 3), "img2img-other-size": (72, 56, 3)}[mode]
    assert first.shape == expected_shape
    if mode == "hires":
        assert settings["size"] == "64x48" and settings["hires"]["size"] == "96x72"
        assert "Size: 64x48" in a.text["parameters"] and "Hires upscale: 1.5" in a.text["parameters"]


def test_finished_batch_is_skipped_before_loading_and_a_folder_output_is_refused(tmp_path, monkeypatch, capsys):
    """Re-running a finished --prompts batch loads no model; an output path taken by a folder is refused."""
    import controlnet.pipeline as pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("red\nblue\n")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("prompt00000.png", "prompt00001.png"):
        Image.new("RGB", (8, 8)).save(out / name)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", no_loading)
    argv = ["generate", "--prompts", "prompts.txt", "--steps", "2", "--out", str(out)]
    assert _main(argv) == 0
    assert "nothing to do" in capsys.readouterr().err
    (out / "prompt00001.png").unlink()
    (out / "prompt00001.png").mkdir()
    assert _main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "is not a file" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- the generation config


def test_generation_config_is_the_options_and_the_stored_settings():
    """One config: the generate options give it (one option per field, the defaults the fields'), and its stored
    settings read back give it again (img2img and hires parts included)."""
    from controlnet.cli import build_parser
    from controlnet.commands.generate import config_from_args, config_options
    from controlnet.generation_config import GenerationConfig, HiresFix, ImageToImage

    parser = build_parser()
    assert config_from_args(parser.parse_args(["generate"])) == GenerationConfig()
    image = ImageToImage(init_image="a.png", denoise=0.3, mask="m.png", mask_blur=2.0, mask_invert=True,
                         inpaint_full_res=True, inpaint_padding=5)
    img2img = GenerationConfig(negative_prompt="blur", steps=7, guidance=3.5, scheduler="DPM++ 2M Karras", seed=11,
                               size=(64, 48), num_images=2, eta=0.5, guess_mode=True, reuse_residuals=2,
                               image=image).check()
    hires = GenerationConfig(size=(64, 48), seed=None, hires=HiresFix(1.5, 0.4, 3, "lanczos")).check()
    for config in (img2img, hires):
        assert GenerationConfig.from_settings(json.loads(json.dumps(config.to_settings()))) == config
        argv = []  # --field-name VALUE per field (a switch when True); None and False are the options' defaults
        for dest, value in config_options(config).items():
            if value is not None and value is not False:
                argv += ["--" + dest.replace("_", "-")] + ([] if value is True else [str(value)])
        assert config_from_args(parser.parse_args(["generate", *argv])) == config
    assert img2img.scheduler == "dpmpp_2m_karras"  # A1111's name, ours after the check
