"""Tiny seeded Flux, SD3 and Qwen-Image bases for tests and benchmarks: transformer, VAE, text encoders (CLIP and
T5; Qwen2.5-VL) with tokenizers built in code (no download), and the released scheduler configs.

The layouts are the released ones at a size a CPU runs in milliseconds: FLUX.1's 16 latent channels packed 2x2
into 64 token features, guidance embedding, CLIP pooled + T5 text; SD3's two CLIPs with projections + T5,
2x2 patches. The VAE downsamples 8x like the real ones. Qwen-Image's are diffusers' own test components
(tests/pipelines/qwenimage): a 4-channel AutoencoderKLQwenImage that downsamples 4x, a two-layer Qwen2.5-VL, with
a byte-level BPE tokenizer that knows the chat template's special tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from controlnet.testing import build_text_encoder, build_tokenizer

WORDS = ("a", "red", "circle", "on", "blue", "square", "green", "background")
CLIP_TOKENS = 16
T5_TOKENS = 16
# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
# stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# The latent shift and scale of FLUX.1's and SD3's VAEs (their vae/config.json).
FLUX_VAE_FACTORS = dict(shift_factor=0.1159, scaling_factor=0.3611)
SD3_VAE_FACTORS = dict(shift_factor=0.0609, scaling_factor=1.5305)
LATENT_CHANNELS = 16
TINY_FLUX = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=3, num_single_layers=4,
                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                 guidance_embeds=True, axes_dims_rope=[4, 4, 8])
# Two 32-wide CLIPs side by side (64) padded into T5's width: T5 is 64 wide here.
TINY_SD3 = dict(sample_size=32, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=4, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                out_channels=LATENT_CHANNELS)
# shape="real": the released widths (FLUX.1-dev's and SD3-medium's transformers, random weights) at a chosen depth,
# with one-layer text encoders of the released output widths: the per-step cost of the real models, fewer blocks.
# The widths of black-forest-labs/FLUX.1-dev transformer/config.json (released depth: 19 double, 38 single blocks).
REAL_FLUX = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
REAL_FLUX_DEPTH = (19, 38)
# The widths of stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (released depth: 24 blocks).
REAL_SD3 = dict(sample_size=128, patch_size=2, in_channels=LATENT_CHANNELS, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=LATENT_CHANNELS, pos_embed_max_size=192)
REAL_SD3_DEPTH = 24
# The hidden sizes of SD3's CLIP ViT-L/14 and OpenCLIP bigG/14 text encoders (their projections keep them: 768 +
# 1280 = the 2048 pooled features); the tiny SD3's two CLIPs are 32 wide.
REAL_SD3_CLIPS = (768, 1280)
TINY_SD3_CLIPS = (32, 32)
SHAPES = ("tiny", "real")

# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                      max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                      stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                      use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)
# diffusers tests/pipelines/qwenimage/test_qwenimage.py get_dummy_components: transformer, VAE, Qwen2.5-VL.
QWEN_LATENT_CHANNELS = 4
TINY_QWEN = dict(patch_size=2, in_channels=4 * QWEN_LATENT_CHANNELS, out_channels=QWEN_LATENT_CHANNELS, num_layers=2,
                 attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False,
                 axes_dims_rope=(8, 4, 4))
TINY_QWEN_VAE = dict(base_dim=6 * QWEN_LATENT_CHANNELS, z_dim=QWEN_LATENT_CHANNELS, dim_mult=[1, 2, 4],
                     num_res_blocks=1, temperal_downsample=[False, True])
# Per-channel latent statistics away from (0, 1), so that the normalisation is exercised (the real VAE's are 16 wide).
TINY_QWEN_LATENTS = dict(latents_mean=[0.1, -0.2, 0.3, -0.1], latents_std=[1.5, 0.8, 1.2, 2.0])
TINY_QWEN_TEXT = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, rope_theta=1000000.0,
                      rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})
TINY_QWEN_VISION = dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
# The chat-template tokens QwenImagePipeline's prompt template uses, and Qwen2's end-of-text (its pad token).
QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


def build_t5_tokenizer(words: tuple[str, ...] = WORDS):
    """A T5 (SentencePiece-Unigram) tokenizer whose vocabulary holds ``words`` and every lowercase letter."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_TOKENS)


def build_t5(vocab_size: int, width: int, seed: int, layers: int = 2, d_ff: int | None = None):
    """A T5 encoder of output width ``width`` (4 heads of 8 features; ``d_ff`` default 2 * width)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=width, d_ff=d_ff or 2 * width, d_kv=8, num_layers=layers,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0)
    return T5EncoderModel(config).eval()


def build_flow_vae(factors: dict[str, float], seed: int = 3, posterior_std: float | None = None):
    """An AutoencoderKL with 16 latent channels and no quant convs (as FLUX.1's and SD3's), 8x downsampling.

    ``posterior_std``: the encoder's log-variance output made constant, so that the posterior's samples are its
    mean up to that std (for comparing with a pipeline that samples it from the global generator).
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64,
                        use_quant_conv=False, use_post_quant_conv=False, **factors).eval()
    if posterior_std is not None:
        conv = vae.encoder.conv_out  # (mean, logvar) channels
        with torch.no_grad():
            conv.weight[LATENT_CHANNELS:] = 0
            conv.bias[LATENT_CHANNELS:] = 2 * torch.log(torch.tensor(posterior_std))
    return vae


def _text_size(shape: str) -> dict[str, Any]:
    """The text encoders' depth: the tiny bases' two layers, or one narrow-FFN layer at the real widths."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    return dict(layers=2, d_ff=None) if shape == "tiny" else dict(layers=1, d_ff=64)


def flux_config(shape: str = "tiny", depth: tuple[int, int] | None = None) -> dict[str, Any]:
    """The FluxTransformer2DModel config of ``shape``; ``depth``: (double, single) blocks, default the shape's
    (tiny: 3, 4; real: FLUX.1-dev's 19, 38)."""
    _text_size(shape)
    config = dict(TINY_FLUX) if shape == "tiny" else {**REAL_FLUX, "num_layers": REAL_FLUX_DEPTH[0],
                                                      "num_single_layers": REAL_FLUX_DEPTH[1]}
    if depth is not None:
        config.update(num_layers=depth[0], num_single_layers=depth[1])
    return config


def sd3_config(shape: str = "tiny", depth: int | None = None) -> dict[str, Any]:
    """The SD3Transformer2DModel config of ``shape``; ``depth``: joint blocks, default the shape's (tiny: 4;
    real: SD3-medium's 24)."""
    _text_size(shape)
    config = dict(TINY_SD3) if shape == "tiny" else {**REAL_SD3, "num_layers": REAL_SD3_DEPTH}
    if depth is not None:
        config["num_layers"] = depth
    return config


def flux_components(seed: int = 0, posterior_std: float | None = None, shape: str = "tiny",
                    depth: tuple[int, int] | None = None) -> dict[str, Any]:
    """The components of diffusers' FluxPipeline (scheduler as its config); ``shape``, ``depth``: :func:`flux_config`.
    The CLIP's pooled output and T5's states have the transformer's pooled and joint attention widths."""
    from diffusers import FluxTransformer2DModel

    config, text = flux_config(shape, depth), _text_size(shape)
    tok = build_tokenizer(list(WORDS), max_length=CLIP_TOKENS)
    t5_tok = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**config).eval()
    return dict(transformer=transformer, vae=build_flow_vae(FLUX_VAE_FACTORS, seed + 3, posterior_std),
                text_encoder=build_text_encoder(len(tok), hidden_size=config["pooled_projection_dim"],
                                                layers=text["layers"], max_positions=CLIP_TOKENS, seed=seed + 4),
                tokenizer=tok, text_encoder_2=build_t5(len(t5_tok), config["joint_attention_dim"], seed + 5, **text),
                tokenizer_2=t5_tok, scheduler_config=dict(FLUX_SCHEDULER))


def sd3_components(seed: int = 0, posterior_std: float | None = None, shape: str = "tiny",
                   depth: int | None = None) -> dict[str, Any]:
    """The components of diffusers' StableDiffusion3Pipeline (scheduler as its config); ``shape``, ``depth``:
    :func:`sd3_config`. The two CLIPs' projections add up to the pooled width, T5 has the joint attention width."""
    from diffusers import SD3Transformer2DModel

    config, text = sd3_config(shape, depth), _text_size(shape)
    tok, tok_2, t5_tok = build_tokenizer(list(WORDS), CLIP_TOKENS), build_tokenizer(list(WORDS), CLIP_TOKENS), build_t5_tokenizer()
    widths = TINY_SD3_CLIPS if shape == "tiny" else REAL_SD3_CLIPS
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**config).eval()
    clips = [build_text_encoder(len(tok), hidden_size=w, projection_dim=w, layers=text["layers"],
                                max_positions=CLIP_TOKENS, seed=seed + s) for w, s in zip(widths, (4, 6))]
    return dict(transformer=transformer, vae=build_flow_vae(SD3_VAE_FACTORS, seed + 3, posterior_std),
                text_encoder=clips[0], tokenizer=tok, text_encoder_2=clips[1], tokenizer_2=tok_2,
                text_encoder_3=build_t5(len(t5_tok), config["joint_attention_dim"], seed + 5, **text),
                tokenizer_3=t5_tok, scheduler_config=dict(SD3_SCHEDULER))


def diffusers_components(components: dict[str, Any]) -> dict[str, Any]:
    """``components`` for a diffusers pipeline: the scheduler config made a FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = {k: v for k, v in components.items() if k != "scheduler_config"}
    return {**parts, "scheduler": FlowMatchEulerDiscreteScheduler.from_config(components["scheduler_config"])}


def build_qwen_tokenizer(words: tuple[str, ...] = WORDS):
    """A Qwen2Tokenizer (byte-level BPE, Qwen2's pre-tokenizer) over the 256 byte symbols, with merges that make
    each of ``words`` after a space one token ("Ġred", as Qwen's vocabulary has them; the merges grow from the space
    symbol, so no word's merges break another's), and the chat template's special tokens
    (:data:`QWEN_SPECIAL_TOKENS`)."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    space = "\u0120"  # byte-level BPE's symbol for " "
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for word in words:
        merged = space
        for ch in word:
            if (merged, ch) not in merges:
                merges.append((merged, ch))
            merged += ch
            vocab.setdefault(merged, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    return tok


def build_qwen_text_encoder(tokenizer: Any, seed: int):
    """A two-layer Qwen2_5_VLForConditionalGeneration 16 wide (diffusers' test config) for ``tokenizer`` 's
    vocabulary, its end-of-text token as begin, end and padding."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = Qwen2_5_VLConfig(text_config={**TINY_QWEN_TEXT, **ids}, vision_config=TINY_QWEN_VISION, hidden_size=16,
                              **ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_components(seed: int = 0, posterior_std: float | None = None) -> dict[str, Any]:
    """The components of diffusers' QwenImagePipeline (scheduler as its config). ``posterior_std``: the VAE's
    log-variance made constant, as :func:`build_flow_vae` 's (diffusers' ControlNet pipeline encodes a condition
    once per prompt, each row a posterior sample of its own)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    tok = build_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TINY_QWEN).eval()
    torch.manual_seed(seed + 3)
    vae = AutoencoderKLQwenImage(**TINY_QWEN_VAE, **TINY_QWEN_LATENTS).eval()
    if posterior_std is not None:
        conv = vae.quant_conv  # (mean, logvar) channels
        with torch.no_grad():
            conv.weight[QWEN_LATENT_CHANNELS:] = 0
            conv.bias[QWEN_LATENT_CHANNELS:] = 2 * torch.log(torch.tensor(posterior_std))
    return dict(transformer=transformer, vae=vae, text_encoder=build_qwen_text_encoder(tok, seed + 4),
                tokenizer=tok, scheduler_config=dict(QWEN_SCHEDULER))
