"""LoRA on tiny seeded models: files in the kohya/A1111 and the diffusers/peft layouts, applied by us, against
two oracles — the base with the LoRA merged into its weights by hand (W + weight * alpha / rank * B @ A) and
diffusers' own pipeline loading the same file — plus switching, prompt tags and bad files.

diffusers' pipeline is the oracle for the UNet only: with transformers 5.x its text-encoder path calls
transformers' adapter loader, which requires a newer peft than is released; the merged weights are the oracle
for the text encoders.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from controlnet.testing import (TINY_SDXL_TEXT_EMBED_DIM, build_diffusers_pipeline, build_text_encoder_2, build_tokenizer,
                      tiny_components)
from controlnet.errors import UserError
from controlnet.lora import parse_lora_spec, split_prompt_loras
from controlnet.pipeline import Pipeline

WORDS = ["red", "circle"]
RANK, ALPHA = 4, 2.0  # alpha != rank: the alpha / rank scale is checked too
# The layers kohya's sd-scripts trains (networks/lora.py: the transformers' linear layers of the UNet, every
# linear layer of the text encoder's attention and MLP).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_", "text_encoder_2": "lora_te2_text_model_"}
KOHYA_PREFIX_SDXL = {**KOHYA_PREFIX, "text_encoder": "lora_te1_text_model_"}
TOL = 1e-5


def _components(family: str = "sd1") -> dict:
    """The tiny seeded components with diffusers' default DDIM scheduler."""
    from diffusers import DDIMScheduler

    comps = tiny_components(WORDS, family, scheduler=DDIMScheduler())
    return {**comps, **build_text_encoder_2(WORDS, seed=5)} if family == "sdxl" else comps


def _lora_layers(comps: dict, seed: int, parts=("unet", "text_encoder", "text_encoder_2")) -> dict[str, torch.Tensor]:
    """Random LoRA matrices in diffusers/peft names: ``{part}.{module}.lora_A.weight`` (rank, in) and lora_B."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for part in parts:
        model = comps.get(part)
        if model is None:
            continue
        targets = UNET_TARGETS if part == "unet" else TEXT_TARGETS
        for name, module in model.named_modules():
            if name.endswith(targets) and isinstance(module, torch.nn.Linear):
                layers[f"{part}.{name}.lora_A.weight"] = torch.randn(RANK, module.in_features, generator=g) * 0.2
                layers[f"{part}.{name}.lora_B.weight"] = torch.randn(module.out_features, RANK, generator=g) * 0.2
    return layers


def _kohya(layers: dict[str, torch.Tensor], sdxl: bool = False) -> dict[str, torch.Tensor]:
    """The kohya/A1111 layout: module path with underscores, lora_down/lora_up, and an alpha per module."""
    prefixes = KOHYA_PREFIX_SDXL if sdxl else KOHYA_PREFIX
    out = {}
    for key, tensor in layers.items():
        part, rest = key.split(".", 1)
        path, which = rest.rsplit(".lora_", 1)
        module = prefixes[part] + path.removeprefix("text_model.").replace(".", "_")
        out[f"{module}.{'lora_down' if which.startswith('A') else 'lora_up'}.weight"] = tensor
        out[f"{module}.alpha"] = torch.tensor(ALPHA)
    return out


def _peft_file(layers: dict[str, torch.Tensor], path) -> None:
    """The diffusers/peft layout as diffusers' save_lora_weights writes it, the LoraConfig in the header (target
    modules by their short names, as a training script gives them). The first text encoder's layers are named
    as a CLIPTextModel of transformers 4 names them (``text_model.encoder...``), as in the files in circulation."""
    named = {}
    for key, tensor in layers.items():
        if key.startswith("text_encoder.") and not key.startswith("text_encoder.text_model."):
            key = "text_encoder.text_model." + key[len("text_encoder."):]
        named[key] = tensor
    metadata = {}
    for part, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS)):
        if any(k.startswith(part + ".") for k in named):
            metadata.update({f"{part}.r": RANK, f"{part}.lora_alpha": ALPHA, f"{part}.target_modules": list(targets)})
    save_file(named, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata), "format": "pt"})


def _write(layers, layout: str, path, sdxl: bool = False):
    if layout == "kohya":
        save_file(_kohya(layers, sdxl), str(path))
    else:
        _peft_file(layers, path)
    return path


def _merged(family: str, loras: list[tuple[dict[str, torch.Tensor], float]]) -> dict:
    """Fresh components with each LoRA merged into the weights by hand: W += weight * alpha / rank * B @ A."""
    comps = _components(family)
    with torch.no_grad():
        for layers, weight in loras:
            for key, down in layers.items():
                if ".lora_A." not in key:
                    continue
                part, rest = key.split(".", 1)
                module = comps[part].get_submodule(rest.split(".lora_A.")[0])
                up = layers[key.replace(".lora_A.", ".lora_B.")]
                module.weight += weight * ALPHA / RANK * (up @ down)
    return comps


def _inputs(family: str = "sd1"):
    g = torch.Generator().manual_seed(7)
    tok = build_tokenizer(WORDS)
    ids = tok(["red circle", "circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    width = 64 if family == "sdxl" else 32
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500), ids, torch.randn(2, 16, width, generator=g)


def _outputs(unet, encoders, family: str = "sd1") -> list[torch.Tensor]:
    """The UNet's output on fixed inputs and each text encoder's last hidden state on fixed ids."""
    x, t, ids, text = _inputs(family)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.ones(2, TINY_SDXL_TEXT_EMBED_DIM), "time_ids": torch.ones(2, 6) * 64}
    with torch.no_grad():
        return [unet(x, t, text, added_cond_kwargs=added).sample] + [enc(ids)[0] for enc in encoders]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _encoders(comps_or_pipe) -> list:
    get = comps_or_pipe.get if isinstance(comps_or_pipe, dict) else lambda k: getattr(comps_or_pipe, k)
    return [m for m in (get("text_encoder"), get("text_encoder_2")) if m is not None]


# --------------------------------------------------------------------------- against the merged weights


@pytest.mark.parametrize("layout", ["kohya", "peft"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_equals_the_weights_merged_by_hand(tmp_path, layout, family):
    layers = _lora_layers(_components(family), seed=11)
    path = _write(layers, layout, tmp_path / f"style.{layout}.safetensors", sdxl=family == "sdxl")
    pipe = Pipeline(**_components(family), dtype="fp32", device="cpu")
    name = pipe.load_lora(path, weight=0.7)
    assert pipe.loras == {name: (0.7, 0.7)}
    reference = _merged(family, [(layers, 0.7)])
    ours = _outputs(pipe.unet, _encoders(pipe), family)
    expected = _outputs(reference["unet"], _encoders(reference), family)
    assert len(ours) == (3 if family == "sdxl" else 2)
    assert _max_diff(ours, expected) <= TOL
    base = _components(family)
    assert _max_diff(ours, _outputs(base["unet"], _encoders(base), family)) > 1e-2  # the LoRA does something


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_unet_lora_equals_diffusers_pipeline_with_the_same_file(tmp_path, layout):
    layers = _lora_layers(_components(), seed=12, parts=("unet",))
    path = _write(layers, layout, tmp_path / "unet_only.safetensors")
    oracle = build_diffusers_pipeline(_components())
    oracle.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="x")
    oracle.set_adapters(["x"], [0.6])
    pipe = Pipeline(**_components(), dtype="fp32", device="cpu")
    pipe.load_lora(path, weight=0.6)
    assert _max_diff(_outputs(pipe.unet, []), _outputs(oracle.unet, [])) <= TOL


def test_loras_combine_switch_and_unload_without_reloading_the_base(tmp_path):
    a = _lora_layers(_components(), seed=21)
    b = _lora_layers(_components(), seed=22)
    pa, pb = _write(a, "kohya", tmp_path / "a.safetensors"), _write(b, "peft", tmp_path / "b.safetensors")
    pipe = Pipeline(**_components(), dtype="fp32", device="cpu")
    base = _components()
    plain = _outputs(base["unet"], _encoders(base))
    name_a, name_b = pipe.load_lora(pa, 1.0), pipe.load_lora(pb, 0.5)
    both = _merged("sd1", [(a, 1.0), (b, 0.5)])
    assert _max_diff(_outputs(pipe.unet, _encoders(pipe)), _outputs(both["unet"], _encoders(both))) <= TOL
    pipe.load_lora(pa, 0.0)  # the same file again: only its weight changes (0: off)
    only_b = _merged("sd1", [(b, 0.5)])
    assert len(pipe.text._lora_files) == 2
    assert _max_diff(_outputs(pipe.unet, _encoders(pipe)), _outputs(only_b["unet"], _encoders(only_b))) <= TOL
    pipe.unload_lora(name_b)
    assert _max_diff(_outputs(pipe.unet, _encoders(pipe)), plain) == 0.0  # exactly the base again
    pipe.unload_lora(name_a)
    assert pipe.loras == {} and _max_diff(_outputs(pipe.unet, _encoders(pipe)), plain) == 0.0
    with pytest.raises(UserError, match="no LoRA named"):
        pipe.unload_lora(name_a)


def test_prompt_tag_applies_a_lora_from_the_lora_dir_for_one_generation(tmp_path):
    layers = _lora_layers(_components(), seed=31)
    (tmp_path / "sub").mkdir()
    _write(layers, "kohya", tmp_path / "sub" / "myStyle.safetensors")  # found in a subfolder, as A1111 does
    pipe = Pipeline(**_components(), dtype="fp32", device="cpu")
    pipe.lora_dir = tmp_path
    common = dict(steps=2, size=(32, 32), seed=3, progress=False, output_type="latent")
    plain = pipe("red circle", **common)
    tagged = pipe("red circle <lora:myStyle:0.8>", **common)
    assert tagged.settings["loras"] == {"myStyle": [0.8, 0.8]}
    assert tagged.settings["prompt"] == "red circle <lora:myStyle:0.8>"
    assert pipe("red circle", **common).latents.equal(plain.latents)  # not persistent
    pipe.load_lora("myStyle", 0.8)  # by name, from the LoRA folder
    assert pipe("red circle ", **common).latents.equal(tagged.latents)


def test_spec_and_prompt_tag_syntax():
    assert parse_lora_spec("style.safetensors") == parse_lora_spec("style.safetensors:1")
    assert parse_lora_spec("dir/style.safetensors:0.5").weight == 0.5
    assert parse_lora_spec("org/repo/style.safetensors:-1").source == "org/repo/style.safetensors"
    text, specs = split_prompt_loras("a <lora:one> cat <lora:two:0.5> <lora:three:0.2:0.9>")
    assert text == "a  cat  "
    assert [(s.source, s.weights) for s in specs] == [("one", (1.0, 1.0)), ("two", (0.5, 0.5)),
                                                       ("three", (0.9, 0.2))]  # (UNet, text): A1111 order te:unet
    with pytest.raises(UserError, match="numbers"):
        split_prompt_loras("<lora:x:strong>")


# --------------------------------------------------------------------------- bad files


def test_lora_of_another_family_is_refused_naming_it(tmp_path):
    pipe = Pipeline(**_components(), dtype="fp32", device="cpu")
    sdxl = _lora_layers(_components("sdxl"), seed=41)
    with pytest.raises(UserError, match=r"text_encoder_2.*SDXL") as err:
        pipe.load_lora(_write(sdxl, "kohya", tmp_path / "xl.safetensors", sdxl=True))
    assert "\n" not in str(err.value)
    # A UNet-only LoRA whose cross-attention takes SDXL's 2048-wide text: the width names the family.
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    wide = {f"{key}.lora_A.weight": torch.randn(RANK, 2048), f"{key}.lora_B.weight": torch.randn(32, RANK)}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(UserError, match=r"takes 32 inputs, the LoRA 2048.*SDXL"):
        pipe.load_lora(tmp_path / "wide.safetensors")
    assert pipe.loras == {} and not pipe.text._lora_files  # nothing was injected


def test_corrupt_or_wrong_files_are_one_line_errors(tmp_path):
    pipe = Pipeline(**_components(), dtype="fp32", device="cpu")
    good = _write(_lora_layers(_components(), seed=51), "kohya", tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:200])
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    cases = [("cut.safetensors", "safetensors"), ("model.safetensors", "no LoRA layers"),
             ("missing.safetensors", "not found")]
    for name, message in cases:
        with pytest.raises(UserError, match=message) as err:
            pipe.load_lora(tmp_path / name)
        assert "\n" not in str(err.value)


def _hostile_loras() -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str] | None, str]]:
    """name → (tensors, header metadata, what the one-line refusal says)."""
    layers = _lora_layers(_components(), seed=61, parts=("unet",))
    kohya = _kohya(layers)
    layer = next(k for k in kohya if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    down, up = kohya[layer + ".lora_down.weight"], kohya[layer + ".lora_up.weight"]

    def edit(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = dict(kohya)
        for suffix, tensor in changes.items():
            if tensor is None:
                del out[f"{layer}.{suffix}"]
            else:
                out[f"{layer}.{suffix}"] = tensor
        return out

    def meta(value) -> dict[str, str]:
        return {"lora_adapter_metadata": value if isinstance(value, str) else json.dumps(value)}

    peft_meta = {"unet.r": RANK, "unet.lora_alpha": ALPHA, "unet.target_modules": list(UNET_TARGETS)}
    return {
        "rank-0": ({k: v[:0] if k.endswith("lora_down.weight") else v[:, :0] if k.endswith("lora_up.weight") else v
                    for k, v in kohya.items()}, None, "has rank 0"),
        "ranks-disagree": (edit(**{"lora_up.weight": up[:, :1]}), None, f"its down matrix has rank {RANK} and its up "
                                                                         "matrix 1"),
        "up-missing": (edit(**{"lora_up.weight": None}), None, "has lora_down.weight but no lora_up.weight"),
        "down-3d": (edit(**{"lora_down.weight": down[None]}), None, "a LoRA layer is two matrices"),
        "alpha-negative": (edit(alpha=torch.tensor(-2.0)), None, ".alpha must be one number > 0"),
        "alpha-zero": (edit(alpha=torch.tensor(0.0)), None, ".alpha must be one number > 0"),
        "alpha-vector": (edit(alpha=torch.ones(3)), None, ".alpha must be one number > 0"),
        "alpha-nan": (edit(alpha=torch.tensor(float("nan"))), None, ".alpha holds NaN or infinite values"),
        "weights-inf": (edit(**{"lora_down.weight": torch.full_like(down, float("inf"))}), None, "NaN or infinite"),
        "weights-int": (edit(**{"lora_down.weight": down.to(torch.int32)}), None, "holds int32 values"),
        "metadata-not-json": (layers, meta("{r: 4"), "'lora_adapter_metadata' header is not valid JSON"),
        "metadata-list": (layers, meta([1, 2]), "header is a JSON list, not an object"),
        "metadata-deep": (layers, meta("[" * 100_000 + "]" * 100_000), "header is not valid JSON"),
        "metadata-rank-text": (layers, meta({**peft_meta, "unet.r": "four"}), "unet.r must be a positive number"),
        "metadata-rank-0": (layers, meta({**peft_meta, "unet.r": 0}), "unet.r must be a positive number"),
        "metadata-alpha-list": (layers, meta({**peft_meta, "unet.lora_alpha": [2]}), "unet.lora_alpha must be a "
                                                                                     "positive number"),
        "metadata-targets-number": (layers, meta({**peft_meta, "unet.target_modules": 5}), "unet.target_modules "
                                                                                           "must be a module name"),
        "metadata-pattern": (layers, meta({**peft_meta, "unet.rank_pattern": {"to_q": "x"}}), "unet.rank_pattern "
                                                                                             "must map module names"),
    }


HOSTILE_LORAS = _hostile_loras()


@pytest.mark.parametrize("name", sorted(HOSTILE_LORAS))
def test_malformed_lora_files_are_one_line_naming_the_file_and_the_fault(tmp_path, name):
    tensors, metadata, message = HOSTILE_LORAS[name]
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    pipe = Pipeline(**_components(), dtype="fp32", device="cpu")
    with pytest.raises(UserError) as err:
        pipe.load_lora(path)
    assert str(err.value).startswith(f"LoRA {path}: ") and message in str(err.value) and "\n" not in str(err.value)
    assert pipe.loras == {} and not pipe.text._lora_files  # nothing was injected


def test_kohya_training_metadata_is_not_read_so_bad_values_there_do_not_matter(tmp_path):
    """kohya's ss_* header fields describe the training run; the weights and their alphas are what apply."""
    layers = _lora_layers(_components(), seed=62, parts=("unet",))
    plain, noted = tmp_path / "plain.safetensors", tmp_path / "noted.safetensors"
    save_file(_kohya(layers), str(plain))
    save_file(_kohya(layers), str(noted), metadata={"ss_network_alpha": "abc", "ss_network_dim": "[", "ss_tag_frequency":
                                                    "{not json", "ss_num_epochs": "-1"})
    pipes = [Pipeline(**_components(), dtype="fp32", device="cpu") for _ in range(2)]
    names = [pipe.load_lora(path) for pipe, path in zip(pipes, (plain, noted))]
    merged = [{k.replace(f".{name}.", "."): v for k, v in pipe.unet.state_dict().items() if "lora" in k}
              for pipe, name in zip(pipes, names)]
    assert names == ["plain", "noted"] and merged[0].keys() == merged[1].keys() and merged[0]
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])
