"""Prompts in A1111's syntax on tiny seeded text encoders: the emphasis parser against A1111's documented
answers, the chunking rules, long prompts (shapes; the first chunk equals diffusers' 77-token encoding), the
emphasis arithmetic, clip skip against diffusers' ``clip_skip``, CFG rows of different lengths, and the
truncation warning of the plain encoder.

The tiny tokenizers are 16 tokens long, so a chunk holds 14 tokens (CLIP: 77 and 75).
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from controlnet.testing import TINY_SDXL_TEXT_EMBED_DIM, build_diffusers_pipeline, build_text_encoder_2, tiny_components
from controlnet.errors import UserError
from controlnet.pipeline import Pipeline
from controlnet.prompts import BREAK, COMMA_BACKTRACK, make_chunks, parse_emphasis

WORDS = ["red", "circle", "blue", "square", "on", "white"]
LENGTH = 16  # the tiny tokenizers' model_max_length
CHUNK = LENGTH - 2
LONG = " ".join(["red circle blue square"] * 5)  # 20 one-token words: two chunks


def _components(family: str = "sd1", layers: int = 2) -> dict:
    """The tiny seeded components, text encoders of ``layers`` layers, diffusers' default DDIM scheduler."""
    from diffusers import DDIMScheduler

    comps = tiny_components(WORDS, family, scheduler=DDIMScheduler(), text_layers=layers)
    return {**comps, **build_text_encoder_2(WORDS, seed=5, layers=layers)} if family == "sdxl" else comps


@pytest.fixture(scope="module")
def sd1_and_diffusers():
    comps = _components("sd1", layers=3)
    return Pipeline(**comps, dtype="fp32", device="cpu"), build_diffusers_pipeline(comps)


@pytest.fixture(scope="module")
def sdxl_and_diffusers():
    comps = _components("sdxl", layers=3)
    return Pipeline(**comps, dtype="fp32", device="cpu"), build_diffusers_pipeline(comps)


# --------------------------------------------------------------------------- parsing and chunking


@pytest.mark.parametrize("text, expected", [
    # The examples of A1111's parse_prompt_attention docstring (modules/prompt_parser.py), answers included.
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[quiet] ((loud:2))", [("quiet", 1 / 1.1), (" ", 1.0), ("loud", 2.0 * 1.1)]),
    ("([loud:2])", [("loud:2", 1.1 / 1.1)]),  # ":2" only weighs right before ")"
    ("a BREAK b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_emphasis_parser_gives_a1111s_answers(text, expected):
    assert parse_emphasis(text) == expected


def test_a_bad_weight_is_a_one_line_error():
    with pytest.raises(UserError, match=r"'1\.2\.3' is not a weight"):
        parse_emphasis("a (b:1.2.3)")


def test_chunks_fill_up_break_and_back_off_to_a_comma():
    ids = list(range(100, 130))  # 30 tokens, no comma
    assert [len(c[0]) for c in make_chunks([(ids, 1.0)], CHUNK, comma=0)] == [14, 14, 2]
    assert make_chunks([([1, 2], 1.5), (None, 1.0), ([3], 1.0)], CHUNK, comma=0) == [([1, 2], [1.5, 1.5]), ([3], [1.0])]
    assert make_chunks([([], 1.0)], CHUNK, comma=0) == [([], [])]  # the empty prompt: one empty chunk
    # A comma 4 tokens before the end of a full chunk (within COMMA_BACKTRACK): the chunk ends there.
    with_comma = list(range(100, 110)) + [0] + list(range(110, 120))
    chunks = make_chunks([(with_comma, 1.0)], CHUNK, comma=0)
    assert chunks[0][0] == with_comma[:11] and chunks[1][0] == with_comma[11:]
    assert COMMA_BACKTRACK == 20


# --------------------------------------------------------------------------- long prompts


def test_long_prompt_is_chunked_and_its_first_chunk_is_diffusers_encoding(sd1_and_diffusers):
    pipe, oracle = sd1_and_diffusers
    text, pooled = pipe.encode_weighted_prompt(LONG)
    assert text.shape == (1, 2 * LENGTH, 32) and pooled is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, _ = oracle.encode_prompt(LONG, "cpu", 1, False)  # diffusers cuts at 14 tokens
    assert torch.equal(text[:, :LENGTH], expected)
    second, _ = pipe.encode_weighted_prompt(" ".join(LONG.split()[CHUNK:]))  # the rest, alone
    assert torch.equal(text[:, LENGTH:], second)
    short, _ = pipe.encode_weighted_prompt("red circle")
    assert torch.equal(short, oracle.encode_prompt("red circle", "cpu", 1, False)[0])


def test_sdxl_long_prompt_shapes_and_first_chunk(sdxl_and_diffusers):
    pipe, oracle = sdxl_and_diffusers
    text, pooled = pipe.encode_weighted_prompt(LONG)
    assert text.shape == (1, 2 * LENGTH, 64) and pooled.shape == (1, TINY_SDXL_TEXT_EMBED_DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, _, expected_pooled, _ = oracle.encode_prompt(LONG, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(text[:, :LENGTH], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-6, rtol=0)


def test_emphasis_multiplies_each_token_and_keeps_the_mean(sd1_and_diffusers):
    pipe, _ = sd1_and_diffusers
    plain, _ = pipe.encode_weighted_prompt("red circle blue")
    ours, _ = pipe.encode_weighted_prompt("(red:1.5) circle [blue]")
    weights = torch.ones(LENGTH)
    weights[1], weights[3] = 1.5, 1 / 1.1  # BOS, red, circle, blue, EOS, pads
    expected = plain * weights[None, :, None]
    expected = expected * (plain.mean() / expected.mean())
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    escaped, _ = pipe.encode_weighted_prompt("\\(red\\)")
    assert escaped.shape == plain.shape and not torch.equal(escaped, plain)  # literal brackets are tokens


def test_short_negative_prompt_is_padded_with_the_empty_prompts_chunk(sd1_and_diffusers):
    pipe, _ = sd1_and_diffusers
    text, added = pipe.text_conditioning(LONG, "blue", num_images=2, cfg=True, width=32, height=32)
    assert text.shape == (4, 2 * LENGTH, 32) and added is None
    empty, _ = pipe.encode_weighted_prompt("")
    negative, _ = pipe.encode_weighted_prompt("blue")
    assert torch.equal(text[0, :LENGTH], negative[0]) and torch.equal(text[0, LENGTH:], empty[0])
    result = pipe(LONG, negative_prompt="blue", steps=2, size=(32, 32), progress=False, output_type="latent")
    assert torch.isfinite(result.latents).all()


def test_plain_encoder_warns_when_it_cuts(sd1_and_diffusers):
    pipe, _ = sd1_and_diffusers
    with pytest.warns(UserWarning, match="cut 'blue square"):
        pipe.encode_prompt([LONG])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.encode_prompt(["red circle"])  # nothing cut, no warning


# --------------------------------------------------------------------------- clip skip


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_equals_diffusers_clip_skip_minus_one(sd1_and_diffusers, clip_skip):
    """A1111 counts clip skip from 1 (the last layer); diffusers' ``clip_skip`` counts the layers skipped."""
    pipe, oracle = sd1_and_diffusers
    pipe.clip_skip = clip_skip
    try:
        ours, _ = pipe.encode_weighted_prompt("red circle")
    finally:
        pipe.clip_skip = 1
    # diffusers 0.42 reaches the final layer norm as text_encoder.text_model.final_layer_norm, which transformers 5
    # flattened into the model: give its oracle the old attribute path.
    encoder = oracle.text_encoder
    encoder.text_model = types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm)
    try:
        expected, _ = oracle.encode_prompt("red circle", "cpu", 1, False, clip_skip=clip_skip - 1 or None)
    finally:
        del encoder.text_model
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    if clip_skip > 1:
        plain, _ = pipe.encode_weighted_prompt("red circle")
        assert not torch.allclose(ours, plain)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sdxl_clip_skip_equals_diffusers(sdxl_and_diffusers, clip_skip):
    pipe, oracle = sdxl_and_diffusers
    pipe.clip_skip = clip_skip
    try:
        ours, pooled = pipe.encode_weighted_prompt("red circle")
    finally:
        pipe.clip_skip = 1
    expected, _, expected_pooled, _ = oracle.encode_prompt("red circle", device="cpu", do_classifier_free_guidance=False,
                                                           clip_skip=clip_skip - 1 or None)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-6, rtol=0)


def test_clip_skip_out_of_range_is_a_user_error(sd1_and_diffusers):
    pipe, _ = sd1_and_diffusers
    for bad in (0, 4):
        pipe.clip_skip = bad
        try:
            with pytest.raises(UserError, match="clip skip"):
                pipe.encode_weighted_prompt("red")
        finally:
            pipe.clip_skip = 1


def test_a_multi_vector_embedding_is_not_split_across_chunks(tmp_path):
    """A1111 starts a new chunk when an embedding's vectors do not fit in the current one's rest."""
    from safetensors.torch import save_file

    from controlnet.prompts import tokenize_weighted

    ids = list(range(100, 112))  # 12 tokens, then a 3-vector group: 12 + 3 > 14
    chunks = make_chunks([(ids + [7, 8, 9], 1.0)], CHUNK, comma=0, glue=frozenset({8, 9}))
    assert [c[0] for c in chunks] == [ids, [7, 8, 9]]
    assert [c[0] for c in make_chunks([(ids + [7, 8, 9], 1.0)], CHUNK, comma=0)] == [ids + [7, 8], [9]]

    pipe = Pipeline(**_components("sd1"), dtype="fp32", device="cpu")
    save_file({"<style>": torch.randn(3, 32, generator=torch.Generator().manual_seed(0))}, tmp_path / "style.safetensors")
    assert pipe.load_embedding(tmp_path / "style.safetensors") == "<style>"
    words = " ".join(["red circle blue square"] * 3)  # 12 tokens
    chunks = tokenize_weighted(f"{words} <style>", pipe.tokenizer, pipe.maybe_convert_prompt)
    assert [len(c[0]) for c in chunks] == [12, 3]
    text, _ = pipe.encode_weighted_prompt(f"{words} <style>")
    assert text.shape[1] == 2 * LENGTH
    assert torch.equal(text[:, LENGTH:], pipe.encode_weighted_prompt("<style>")[0])


# --------------------------------------------------------------------------- bounds and embedding tokens


def test_a_prompt_repeating_an_embedding_ten_thousand_times_is_cut_to_the_chunk_bound_with_a_warning(tmp_path):
    from safetensors.torch import save_file

    from controlnet.prompts import MAX_PROMPT_CHUNKS, tokenize_weighted

    pipe = Pipeline(**_components("sd1"), dtype="fp32", device="cpu")
    save_file({"<style>": torch.randn(3, 32, generator=torch.Generator().manual_seed(0))}, tmp_path / "style.safetensors")
    pipe.load_embedding(tmp_path / "style.safetensors")
    prompt = "<style> " * 10_000  # 30,000 tokens
    with pytest.warns(UserWarning, match=rf"the prompt is 30,000 tokens \(\d+ chunks of up to {CHUNK}\); only its "
                                         rf"first {MAX_PROMPT_CHUNKS} chunks are used"):
        chunks = tokenize_weighted(prompt, pipe.tokenizer, pipe.maybe_convert_prompt)
    assert len(chunks) == MAX_PROMPT_CHUNKS and all(len(ids) == 12 for ids, _ in chunks)  # 4 whole embeddings each
    with pytest.warns(UserWarning, match="only its first"):
        text, _ = pipe.encode_weighted_prompt(prompt)
    assert text.shape[1] == MAX_PROMPT_CHUNKS * LENGTH
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(tokenize_weighted("<style> " * 80, pipe.tokenizer, pipe.maybe_convert_prompt)) == MAX_PROMPT_CHUNKS


@pytest.mark.parametrize("token, message", [
    ("red", "its token 'red' is a word of the text encoder's vocabulary"),
    ("Circle", "its token 'Circle' is a word of the text encoder's vocabulary"),  # CLIP lower-cases
    ("my style", "its token 'my style' is empty or holds a space"),
    ("tab\there", "holds a space"),
])
def test_an_embedding_token_that_is_a_word_or_two_is_refused(tmp_path, token, message):
    from safetensors.torch import save_file

    pipe = Pipeline(**_components("sd1"), dtype="fp32", device="cpu")
    before = pipe.encode_weighted_prompt("red circle")[0]
    save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "e.safetensors")
    with pytest.raises(UserError, match=message) as err:
        pipe.load_embedding(tmp_path / "e.safetensors", token)
    assert "\n" not in str(err.value) and pipe.embeddings == {}
    assert torch.equal(pipe.encode_weighted_prompt("red circle")[0], before)  # the words mean what they meant


def test_a_second_embedding_with_a_taken_token_is_refused(tmp_path):
    from safetensors.torch import save_file

    pipe = Pipeline(**_components("sd1"), dtype="fp32", device="cpu")
    for name in ("a", "b"):
        save_file({"emb_params": torch.randn(1, 32)}, tmp_path / f"{name}.safetensors")
    assert pipe.load_embedding(tmp_path / "a.safetensors", "<mine>") == "<mine>"
    with pytest.raises(UserError, match="the token '<mine>' is taken by an embedding loaded before"):
        pipe.load_embedding(tmp_path / "b.safetensors", "<mine>")
    assert pipe.embeddings == {"<mine>": str(tmp_path / "a.safetensors")}
