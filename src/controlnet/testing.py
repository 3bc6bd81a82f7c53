"""Seeded model components for tests, benchmarks and scripts: the real SD-family UNet configs, and tiny ones.

The full configs are those of the public base models (their ``unet/config.json``), so a ControlNet built on
them has exactly the released shapes (SD1.5: 361.28M parameters). The tiny ones keep each family's
distinguishing features (SD2: linear projections and per-block head dims; SDXL: text_time addition
embedding and several transformer layers per block) at a size a CPU test runs in milliseconds. The tiny VAE,
CLIP text encoders, tokenizers and a DDIM scheduler join them into a pipeline's components;
:func:`build_diffusers_pipeline` makes diffusers' pipeline on them (the oracle the tests compare with), and
:func:`write_clip_vocabulary` writes the CLIP BPE files of a hub tokenizer. Nothing here is imported by the
library itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch

from controlnet.checkpoints import FAMILIES

M = TypeVar("M", bound=torch.nn.Module)

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, norm_num_groups=32,
)
# stabilityai/stable-diffusion-2-1 unet/config.json
SD21_UNET: dict[str, Any] = dict(
    SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

TINY_SD1_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
    norm_num_groups=8,
)
TINY_SD2_UNET: dict[str, Any] = dict(
    TINY_SD1_UNET, cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True,
)
TINY_SDXL_TEXT_EMBED_DIM = 32  # pooled text embedding width of the tiny SDXL config
TINY_SDXL_TIME_EMBED_DIM = 8
TINY_SDXL_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64, transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
    # SDXL's time_ids are 6 numbers (original size, crop top-left, target size), each embedded separately.
    projection_class_embeddings_input_dim=TINY_SDXL_TEXT_EMBED_DIM + 6 * TINY_SDXL_TIME_EMBED_DIM,
    norm_num_groups=8,
)

_UNETS = {
    ("sd1", "full"): SD15_UNET, ("sd2", "full"): SD21_UNET, ("sdxl", "full"): SDXL_UNET,
    ("sd1", "tiny"): TINY_SD1_UNET, ("sd2", "tiny"): TINY_SD2_UNET, ("sdxl", "tiny"): TINY_SDXL_UNET,
}


def unet_config(family: str, size: str = "tiny") -> dict[str, Any]:
    """The UNet2DConditionModel config of ``family`` ("sd1", "sd2", "sdxl") at ``size`` ("full" or "tiny")."""
    try:
        return dict(_UNETS[(family, size)])
    except KeyError:
        raise ValueError(f"unknown family/size {family!r}/{size!r}; families {FAMILIES}, sizes ('full', 'tiny')") from None


def build_unet(family: str, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
               **overrides: Any):
    """A UNet2DConditionModel with seeded random weights (no download); ``overrides`` replace config entries."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**unet_config(family, size), **overrides}).eval()
    return unet if dtype == torch.float32 else unet.to(dtype)


def sdxl_added_cond_kwargs(unet_cfg: dict[str, Any], batch: int, height: int, width: int,
                           seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pooled text embeddings and real size/crop time ids for an SDXL-family UNet config."""
    text_dim = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
    g = torch.Generator().manual_seed(seed)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)
    return {"text_embeds": torch.randn(batch, text_dim, generator=g), "time_ids": time_ids}


# --------------------------------------------------------------------------- tiny VAE / text encoder / tokenizer

TINY_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64,
)  # 3 downsamplers: 8x, as SD's VAE


def build_vae(config: dict[str, Any] | None = None, seed: int = 0):
    """An AutoencoderKL with seeded random weights (8x downsampling, 4 latent channels by default)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**(config or TINY_VAE)).eval()


SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def build_tokenizer(words: list[str], max_length: int = 16):
    """A CLIPTokenizer (CLIP's byte-level BPE conventions) whose vocabulary is built from ``words``.

    Every lowercase letter and digit is a token (so any text tokenizes) and each word of ``words`` gets
    merges that build it into one token when nothing else interferes. No file is downloaded.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for tok in SPECIAL_TOKENS:
        add(tok)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":
        add(ch)
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = (merged, piece)
            if rule not in merges:
                merges.append(rule)
            merged = merged + piece
            add(merged)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    return tok


def build_text_encoder(vocab_size: int, hidden_size: int = 32, layers: int = 2, heads: int = 2,
                       max_positions: int = 16, projection_dim: int | None = None, seed: int = 0):
    """A CLIPTextModel (or CLIPTextModelWithProjection when ``projection_dim`` is set), seeded weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 4,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions,
        projection_dim=projection_dim or hidden_size, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)
    return model.eval()


def build_text_encoder_2(words: list[str], seed: int, layers: int = 2) -> dict[str, Any]:
    """SDXL's second tokenizer and text encoder (with projection), tiny and seeded."""
    tok = build_tokenizer(words)
    encoder = build_text_encoder(len(tok.get_vocab()), projection_dim=TINY_SDXL_TEXT_EMBED_DIM, layers=layers,
                                 seed=seed)
    return dict(text_encoder_2=encoder, tokenizer_2=tok)


# --------------------------------------------------------------------------- tiny pipelines

# Stable Diffusion's training schedule (runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json).
SD_SCHEDULE: dict[str, Any] = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_components(words: list[str], family: str = "sd1", scheduler: Any = None, unet: Any = None,
                    vae_seed: int = 3, text_layers: int = 2, **extra: Any) -> dict[str, Any]:
    """Seeded tiny pipeline components: UNet (seed 1), VAE, text encoder (seed 4, ``text_layers`` layers),
    tokenizer, DDIM scheduler."""
    from diffusers import DDIMScheduler

    tok = build_tokenizer(words)
    context = unet_config(family)["cross_attention_dim"]
    hidden = context // 2 if family == "sdxl" else context  # SDXL: two encoders' states side by side
    return dict(
        unet=build_unet(family, seed=1) if unet is None else unet,
        vae=build_vae(seed=vae_seed),
        text_encoder=build_text_encoder(len(tok.get_vocab()), hidden_size=hidden, layers=text_layers, seed=4),
        tokenizer=tok,
        scheduler=DDIMScheduler(**SD_SCHEDULE) if scheduler is None else scheduler,
        **extra,
    )


def build_diffusers_pipeline(components: dict[str, Any]):
    """diffusers' text-to-image pipeline on ``components`` (SDXL's when there is a second text encoder)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if "text_encoder_2" in components:
        return StableDiffusionXLPipeline(**components)
    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def trained_like(model: M, seed: int) -> M:
    """``model`` in eval mode with seeded noise (std 0.05) added to every parameter, zero convs included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


# The words of OneFormer's task prompt ("the task is semantic"), which its tokenizer must spell.
ONEFORMER_TASK_WORDS = ("the", "task", "is", "semantic")


def write_clip_vocabulary(folder: Path, words: tuple[str, ...]) -> None:
    """CLIP BPE files (vocab.json, merges.txt, as hub repositories ship them) whose vocabulary spells ``words``."""
    vocab, merges = {"<|startoftext|>": 0, "<|endoftext|>": 1}, []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
