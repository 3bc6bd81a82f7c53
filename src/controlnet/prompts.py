"""Prompts as AUTOMATIC1111's stable-diffusion-webui reads them: emphasis, BREAK, 75-token chunks, clip skip.

Syntax (A1111 modules/prompt_parser.py, ``parse_prompt_attention``)::

    (word)          attention x 1.1           ((word)) x 1.21, and so on
    [word]          attention / 1.1
    (word:1.5)      attention x 1.5           any number
    \\( \\) \\[ \\]     the bracket itself
    BREAK           end the current chunk here

A bracket left open applies to the end of the prompt. Prompt editing ``[a:b:step]`` and alternation ``[a|b]``
(A1111's per-step schedules) are not supported: their text is read as it is.

Encoding, for each text encoder (A1111 modules/sd_hijack_clip.py)::

    tokens  = each piece tokenized alone (no BOS/EOS), every token carrying its piece's weight
    chunks  = runs of C = L - 2 tokens (L = the tokenizer's length: 77 for CLIP, so C = 75); a chunk that fills
              up within COMMA_BACKTRACK tokens after a comma ends at that comma, the rest moving to the next one;
              a multi-vector embedding that does not fit in the chunk's rest starts the next one (A1111 keeps an
              embedding's vectors in one chunk)
    ids     = [BOS] + chunk + [EOS] + [PAD] * (C - len(chunk))                                (L,)
    z       = the encoder's hidden state at layer -clip_skip, final layer norm applied        (1, L, D)
              (SDXL: layer -(clip_skip + 1), no norm, as diffusers and A1111 take SDXL's penultimate layer)
    z       = z * weights, then rescaled so that its mean is the unweighted mean ("original" emphasis)
    text    = the chunks' z concatenated along the sequence                                   (1, n * L, D)
    pooled  = SDXL's second encoder's pooled output of the first chunk                        (1, D2)

A prompt of at most C tokens without brackets is therefore encoded exactly as diffusers' pipelines encode it.
Clip skip counts as A1111 does: 1 is the last layer (no skip), 2 the penultimate; diffusers' ``clip_skip``
argument is this number minus one.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from controlnet.errors import UserError

# A1111 modules/prompt_parser.py: "(...)" multiplies attention by 1.1, "[...]" divides by it.
ROUND_BRACKET_WEIGHT = 1.1
SQUARE_BRACKET_WEIGHT = 1 / 1.1
# A1111's "comma_padding_backtrack" option, default 20 (modules/shared_options.py).
COMMA_BACKTRACK = 20
# Most chunks of a prompt that are encoded; the rest is dropped with a warning. A1111 sets no limit, but each chunk
# is one text-encoder pass and 75 more tokens of cross-attention context in every UNet step: 20 chunks (1,500
# tokens with CLIP's 77) is far above the prompts in circulation (a few chunks), while a prompt repeating an
# embedding 10,000 times would otherwise take minutes.
MAX_PROMPT_CHUNKS = 20
# The marker parse_emphasis puts where the prompt says BREAK (A1111 writes ["BREAK", -1]).
BREAK = "BREAK"

_TOKENS = re.compile(r"""
    \\[\\()\[\]]           # an escaped bracket or backslash
  | \\                     # a lone backslash (dropped, as in A1111)
  | \(                     # open round
  | \[                     # open square
  | :\s*([+-]?[.\d]+)\s*\) # ":1.5)" closes a round bracket with an explicit weight
  | \)                     # close round
  | \]                     # close square
  | [^\\()\[\]:]+          # plain text
  | :                      # a colon that is not a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """``text`` → its pieces with their attention weights, as A1111's ``parse_prompt_attention``
    (``(BREAK, -1.0)`` where the prompt says BREAK; neighbours of equal weight merged)::

        parse_emphasis("a (red:1.5) [circle]") == [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("circle", 1 / 1.1)]
    """
    pieces: list[list[Any]] = []
    round_open: list[int] = []  # index in pieces where each open "(" starts
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKENS.finditer(text):
        token, number = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif number is not None and round_open:
            scale_from(round_open.pop(), _weight(number, text))
        elif token == ")" and round_open:
            scale_from(round_open.pop(), ROUND_BRACKET_WEIGHT)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_BRACKET_WEIGHT)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    pieces.append([BREAK, -1.0])
                pieces.append([part, 1.0])
    for start in round_open:
        scale_from(start, ROUND_BRACKET_WEIGHT)
    for start in square_open:
        scale_from(start, SQUARE_BRACKET_WEIGHT)
    merged: list[list[Any]] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(str(t), float(w)) for t, w in merged]


def _weight(number: str, prompt: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise UserError(f"prompt {prompt!r}: {number!r} is not a weight; write (word:1.2)") from None


def make_chunks(pieces: Sequence[tuple[list[int] | None, float]], size: int, comma: int | None,
                glue: frozenset[int] = frozenset()) -> list[tuple[list[int], list[float]]]:
    """Token ids with weights (``None`` ids for a BREAK) → chunks of at most ``size`` tokens, each as
    (ids, weights) without BOS/EOS; the comma rule of the module docstring (``comma``: the comma's token id).
    ``glue``: ids that stay in the chunk of the token before them (an embedding's second, third... vectors)."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for piece_ids, weight in pieces:
        if piece_ids is None:  # BREAK
            close()
            continue
        for k, token in enumerate(piece_ids):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == size and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved
            if len(ids) == size:
                close()
            group = _group_length(piece_ids, k, glue)
            if group > 1 and ids and len(ids) + group > size:  # an embedding that does not fit: next chunk
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def _group_length(ids: Sequence[int], k: int, glue: frozenset[int]) -> int:
    """How many tokens from ``ids[k]`` on form one group: the token and the ``glue`` tokens right after it."""
    n = 1
    while k + n < len(ids) and ids[k + n] in glue:
        n += 1
    return n


def embedding_continuations(tokenizer: Any) -> frozenset[int]:
    """Ids of the second, third... vectors of the multi-vector embeddings in ``tokenizer`` (diffusers' textual
    inversion adds them as ``token_1``, ``token_2``... after ``token``)."""
    added = tokenizer.get_added_vocab()
    return frozenset(i for name, i in added.items()
                     if (m := re.fullmatch(r"(.+)_\d+", name)) is not None and m.group(1) in added)


def tokenize_weighted(prompt: str, tokenizer: Any,
                      convert: Callable[[str, Any], str] | None = None) -> list[tuple[list[int], list[float]]]:
    """``prompt`` → its chunks (ids without BOS/EOS, weights) for ``tokenizer``. ``convert(text, tokenizer)``
    rewrites each piece first (diffusers' textual inversion expands a multi-vector token there)."""
    parsed = parse_emphasis(prompt)
    texts = [text for text, weight in parsed if not (text == BREAK and weight == -1.0)]
    if convert is not None:
        texts = [convert(text, tokenizer) for text in texts]
    token_ids = iter(tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
                     if texts else [])
    pieces = [(None, 1.0) if (text == BREAK and weight == -1.0) else (list(next(token_ids)), weight)
              for text, weight in parsed]
    comma = tokenizer.get_vocab().get(",</w>")
    chunks = make_chunks(pieces, tokenizer.model_max_length - 2, comma, embedding_continuations(tokenizer))
    if len(chunks) > MAX_PROMPT_CHUNKS:
        tokens = sum(len(ids) for ids, _ in chunks)
        warnings.warn(f"the prompt is {tokens:,} tokens ({len(chunks)} chunks of up to "
                      f"{tokenizer.model_max_length - 2}); only its first {MAX_PROMPT_CHUNKS} chunks are used",
                      stacklevel=2)
        chunks = chunks[:MAX_PROMPT_CHUNKS]
    return chunks


def chunk_ids(ids: list[int], weights: list[float], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk as the encoder's input ``(1, L)`` and its weights ``(L,)``: [BOS] ids [EOS] [PAD]..."""
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    full = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [pad] * (length - 2 - len(ids))
    full_weights = [1.0, *weights, 1.0] + [1.0] * (length - 2 - len(ids))
    return torch.tensor([full]), torch.tensor(full_weights)


def final_layer_norm(encoder: nn.Module) -> nn.Module:
    """The CLIP text encoder's final layer norm (transformers >= 5 flattened ``text_model`` into the model)."""
    return getattr(encoder, "text_model", encoder).final_layer_norm


def encode_chunk(encoder: nn.Module, ids: torch.Tensor, clip_skip: int,
                 sdxl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states ``(1, L, D)`` at the layer clip skip selects, the encoder's first output: pooled/projected
    embedding ``(1, D2)`` for a CLIPTextModelWithProjection)."""
    from controlnet.devices import placement

    ids = ids.to(placement(encoder)["device"])
    if not sdxl and clip_skip == 1:
        out = encoder(ids)
        return out[0], out[0]  # the last hidden state, after the final layer norm (diffusers' default)
    out = encoder(ids, output_hidden_states=True)
    if sdxl:  # SDXL: the penultimate layer, no final norm (diffusers' StableDiffusionXLPipeline)
        return out.hidden_states[-(clip_skip + 1)], out[0]
    return final_layer_norm(encoder)(out.hidden_states[-clip_skip]), out[0]


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "original" emphasis: ``z (1, L, D)`` times the token weights ``(L,)``, rescaled to its old mean."""
    if bool((weights == 1.0).all()):
        return z
    z32 = z.float()
    before = z32.mean()
    weighted = z32 * weights.to(z32.device)[None, :, None]
    return (weighted * (before / weighted.mean())).to(z.dtype)


def encode_weighted(prompt: str, encoders: Sequence[tuple[Any, nn.Module]], clip_skip: int = 1, sdxl: bool = False,
                    convert: Callable[[str, Any], str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``prompt`` (A1111 syntax) → text embeddings ``(1, n * L, D)`` — the encoders' outputs concatenated along
    the features, as SDXL does — and, for SDXL, the pooled embedding ``(1, D2)`` (the second encoder's, on the
    first chunk; None otherwise). ``encoders``: (tokenizer, text encoder) pairs; the rest as in the module
    docstring."""
    if int(clip_skip) < 1:
        raise UserError(f"clip skip must be >= 1 (1: the last layer, 2: the penultimate), got {clip_skip}")
    per_encoder: list[list[torch.Tensor]] = []
    pooled = None
    for tokenizer, encoder in encoders:
        layers = _num_layers(encoder)
        if clip_skip + int(sdxl) > layers:
            raise UserError(f"clip skip {clip_skip} is more than this text encoder's {layers} layers allow")
        zs = []
        for k, (ids, weights) in enumerate(tokenize_weighted(prompt, tokenizer, convert)):
            input_ids, token_weights = chunk_ids(ids, weights, tokenizer)
            z, first = encode_chunk(encoder, input_ids, clip_skip, sdxl)
            zs.append(emphasize(z, token_weights))
            if k == 0:
                pooled = first
        per_encoder.append(zs)
    chunks = max(len(zs) for zs in per_encoder)
    for (tokenizer, encoder), zs in zip(encoders, per_encoder):  # same BPE in practice; pad if they differ
        while len(zs) < chunks:
            zs.append(encode_chunk(encoder, chunk_ids([], [], tokenizer)[0], clip_skip, sdxl)[0])
    text = torch.cat([torch.cat(zs, dim=1) for zs in per_encoder], dim=-1)
    return text, pooled if sdxl else None


def _num_layers(encoder: nn.Module) -> int:
    return int(getattr(encoder.config, "num_hidden_layers", 1))


def pad_to_same_length(texts: Sequence[torch.Tensor], empty: torch.Tensor) -> list[torch.Tensor]:
    """Text embeddings ``(1, n_i * L, D)`` padded to the longest with copies of ``empty`` ``(1, L, D)`` (the empty
    prompt's chunk), so that a long prompt and a short negative prompt share one CFG batch (A1111's ``pad_cond``)."""
    longest = max(t.shape[1] for t in texts)
    padded = []
    for t in texts:
        missing = (longest - t.shape[1]) // empty.shape[1]
        padded.append(torch.cat([t, *([empty.to(t)] * missing)], dim=1) if missing else t)
    return padded


def truncated_text(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """What a plain tokenization to ``model_max_length`` (diffusers' pipelines; :meth:`Pipeline.encode_prompt`)
    drops of each prompt (empty strings where nothing is dropped)."""
    keep = tokenizer.model_max_length - 2
    dropped = []
    for ids in tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False).input_ids:
        dropped.append(tokenizer.decode(ids[keep:]) if len(ids) > keep else "")
    return dropped
