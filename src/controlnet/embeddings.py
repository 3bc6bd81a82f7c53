"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): files and their tokens.

A file holds one or more vectors for a new token of the text encoder's vocabulary. The layouts in use::

    A1111 .pt / .bin        {"string_to_param": {"*": (n, D)}, "name": ..., ...}
    A1111 .safetensors      {"emb_params": (n, D)}
    diffusers               {"<token>": (D,) or (n, D)} (learned_embeds.bin / .safetensors)
    SDXL (A1111, diffusers) {"clip_l": (n, 768), "clip_g": (n, 1280)}: one part per text encoder

The token is the one given (``--embedding FILE:TOKEN``), else the diffusers layout's key, else the file name
without its suffix (A1111's rule: the file ``easynegative.safetensors`` is written ``easynegative`` in prompts).
Loading into the tokenizer and the text encoder is diffusers' ``TextualInversionLoaderMixin``'s (a token of n
vectors becomes ``token token_1 ... token_{n-1}``). A token must be one word that is not already a word of the
vocabulary (:func:`check_token`): an added token wins over the word it spells, so "red" as an embedding's token
would silently change every prompt that says red.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from controlnet.errors import UserError

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
# The keys of the layouts above.
A1111_PARAMS, A1111_SAFETENSORS = "string_to_param", "emb_params"
SDXL_PARTS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def parse_embedding_spec(text: str) -> tuple[str, str | None]:
    """``FILE[:TOKEN]`` (``--embedding``) → (file, token or None). A suffix after the last colon is a token only
    when the whole text is not an existing path (``C:/embeddings/x.pt`` stays a path)."""
    if Path(text).expanduser().exists():
        return text, None
    source, sep, token = str(text).rpartition(":")
    if sep and source and token and "/" not in token and "\\" not in token:
        return source, token
    return str(text), None


def find_embedding(source: str | os.PathLike) -> Path:
    """The embedding file ``source``: a path, or a file in a hub repository (``org/name/file.safetensors``)."""
    from controlnet import hub

    path = Path(source).expanduser()
    if path.is_file():
        return path
    ref = hub.hub_ref(source)
    if ref is not None and ref.filename is not None:
        return hub.hub_file(ref.repo_id, ref.filename, revision=ref.revision)
    raise UserError(f"embedding {source} not found; give a .pt/.bin/.safetensors file or a hub file id "
                    "(org/name/file.safetensors)")


def read_embedding(path: Path, token: str | None,
                   widths: Mapping[str, int]) -> tuple[str, dict[str, torch.Tensor]]:
    """(token, text encoder name → vectors ``(n, D)``) of the embedding file at ``path``, checked against the
    base's text encoders (``widths``: name → embedding width)."""
    from controlnet.safe_io import read_state_dict

    data = read_state_dict(path)  # safetensors, or a pickle with weights_only=True
    if isinstance(data.get(A1111_PARAMS), Mapping):
        vectors = {"text_encoder": _one_tensor(data[A1111_PARAMS], path)}
    elif A1111_SAFETENSORS in data:
        vectors = {"text_encoder": data[A1111_SAFETENSORS]}
    elif set(data) & set(SDXL_PARTS):
        vectors = {SDXL_PARTS[k]: v for k, v in data.items() if k in SDXL_PARTS}
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        key, tensor = next(iter(data.items()))
        token = token or key
        vectors = {"text_encoder": tensor}
    else:
        raise UserError(f"embedding {path}: not a textual-inversion file (keys: {', '.join(sorted(map(str, data))[:5])})")
    vectors = {name: _as_matrix(v, path) for name, v in vectors.items()}
    _check_widths(vectors, widths, path)
    return token or path.stem, vectors


def check_token(token: str, path: Path, tokenizers: Sequence[Any]) -> None:
    """Refuse, in one line, an embedding token that is empty, holds white space, or is already in a tokenizer's
    vocabulary (a word of it, in CLIP's lower-cased ``word</w>`` form too, or an embedding loaded before)."""
    hint = "name another with --embedding FILE:TOKEN"
    if not token or any(c.isspace() for c in token):
        raise UserError(f"embedding {path}: its token {token!r} is empty or holds a space, so a prompt cannot name "
                        f"it as one word; {hint}")
    for tokenizer in tokenizers:
        if tokenizer is None:
            continue
        if token in tokenizer.get_added_vocab():
            raise UserError(f"embedding {path}: the token {token!r} is taken by an embedding loaded before; {hint}")
        vocabulary = tokenizer.get_vocab()
        if token in vocabulary or f"{token.lower()}</w>" in vocabulary:
            raise UserError(f"embedding {path}: its token {token!r} is a word of the text encoder's vocabulary; the "
                            f"embedding would replace that word in every prompt; {hint} (e.g. <{token}>)")


def _one_tensor(params: Mapping, path: Path) -> torch.Tensor:
    tensors = [v for v in params.values() if isinstance(v, torch.Tensor)]
    if len(tensors) != 1:
        raise UserError(f"embedding {path}: expected one tensor in string_to_param, found {len(tensors)}")
    return tensors[0]


def _as_matrix(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2) or tensor.numel() == 0:
        raise UserError(f"embedding {path}: its vectors are not a (n, D) tensor")
    if not bool(torch.isfinite(tensor).all()):
        raise UserError(f"embedding {path}: its vectors hold NaN or Inf")
    return tensor.detach().float().reshape(-1, tensor.shape[-1])


def _check_widths(vectors: Mapping[str, torch.Tensor], widths: Mapping[str, int], path: Path) -> None:
    if "text_encoder_2" in vectors and "text_encoder_2" not in widths:
        raise UserError(f"embedding {path} is for SDXL (it has clip_g vectors); this base has one text encoder")
    for name, tensor in vectors.items():
        if tensor.shape[-1] != widths[name]:
            raise UserError(f"embedding {path} has {tensor.shape[-1]}-wide vectors, this base's {name} takes "
                            f"{widths[name]} (SD1.x: 768, SD2.x: 1024, SDXL: 768 and 1280); it is for another family")
    if "text_encoder_2" in widths and "text_encoder_2" not in vectors:
        raise UserError(f"embedding {path} has vectors for one text encoder; an SDXL base needs clip_l and clip_g")
