"""Tiny seeded Flux and SD3 bases for tests and benchmarks: transformer, 16-channel VAE, CLIP and T5 text encoders
with tokenizers built in code (no download), and the released scheduler configs.

The layouts are the released ones at a size a CPU runs in milliseconds: FLUX.1's 16 latent channels packed 2x2
into 64 token features, guidance embedding, CLIP pooled + T5 text; SD3's two CLIPs with projections + T5,
2x2 patches. The VAE downsamples 8x like the real ones.
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


def build_t5_tokenizer(words: tuple[str, ...] = WORDS):
    """A T5 (SentencePiece-Unigram) tokenizer whose vocabulary holds ``words`` and every lowercase letter."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581" + w, -1.0) for w in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_TOKENS)


def build_t5(vocab_size: int, width: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=width, d_ff=2 * width, d_kv=8, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0)
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


def flux_components(seed: int = 0, posterior_std: float | None = None) -> dict[str, Any]:
    """The components of diffusers' FluxPipeline (scheduler as its config)."""
    from diffusers import FluxTransformer2DModel

    tok = build_tokenizer(list(WORDS), max_length=CLIP_TOKENS)
    t5_tok = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_FLUX).eval()
    return dict(transformer=transformer, vae=build_flow_vae(FLUX_VAE_FACTORS, seed + 3, posterior_std),
                text_encoder=build_text_encoder(len(tok), hidden_size=TINY_FLUX["pooled_projection_dim"],
                                                max_positions=CLIP_TOKENS, seed=seed + 4),
                tokenizer=tok, text_encoder_2=build_t5(len(t5_tok), TINY_FLUX["joint_attention_dim"], seed + 5),
                tokenizer_2=t5_tok, scheduler_config=dict(FLUX_SCHEDULER))


def sd3_components(seed: int = 0, posterior_std: float | None = None) -> dict[str, Any]:
    """The components of diffusers' StableDiffusion3Pipeline (scheduler as its config)."""
    from diffusers import SD3Transformer2DModel

    tok, tok_2, t5_tok = build_tokenizer(list(WORDS), CLIP_TOKENS), build_tokenizer(list(WORDS), CLIP_TOKENS), build_t5_tokenizer()
    clip = dict(hidden_size=32, projection_dim=32, max_positions=CLIP_TOKENS)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TINY_SD3).eval()
    return dict(transformer=transformer, vae=build_flow_vae(SD3_VAE_FACTORS, seed + 3, posterior_std),
                text_encoder=build_text_encoder(len(tok), **clip, seed=seed + 4), tokenizer=tok,
                text_encoder_2=build_text_encoder(len(tok_2), **clip, seed=seed + 6), tokenizer_2=tok_2,
                text_encoder_3=build_t5(len(t5_tok), TINY_SD3["joint_attention_dim"], seed + 5), tokenizer_3=t5_tok,
                scheduler_config=dict(SD3_SCHEDULER))


def diffusers_components(components: dict[str, Any]) -> dict[str, Any]:
    """``components`` for a diffusers pipeline: the scheduler config made a FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = {k: v for k, v in components.items() if k != "scheduler_config"}
    return {**parts, "scheduler": FlowMatchEulerDiscreteScheduler.from_config(components["scheduler_config"])}
