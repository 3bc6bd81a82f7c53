"""Training on a flow-matching transformer base (FLUX.1, SD3/SD3.5, Qwen-Image): what differs from a UNet base,
chosen once when the run is set up (:mod:`controlnet.train.setup`). The loop, the data stream, the caches,
checkpoints, exact resume and data parallelism are the UNet trainer's.

* **Base**: :meth:`controlnet.transformer_pipeline.TransformerPipeline.from_pretrained`, every model locked.
* **ControlNet**: a trainable copy of the base's embedders and first blocks,
  :meth:`~controlnet.transformer_controlnet.FluxControlNet.from_transformer` /
  :meth:`~controlnet.transformer_controlnet.SD3ControlNet.from_transformer` /
  :meth:`~controlnet.transformer_controlnet.QwenImageControlNet.from_transformer` (``--controlnet-layers``,
  ``--controlnet-single-layers``; defaults :data:`DEFAULT_LAYERS`), or ``--init`` checked against the base.
* **Caches**: image latents as for UNets (the VAE's posterior; Qwen-Image's video VAE gets the image as one frame);
  text embeddings as the family encodes them (Flux: T5 + CLIP pooled; SD3: CLIP + T5 joint + both pooled;
  Qwen-Image: each prompt's own tokens, unpadded, padded per batch with a mask by
  :func:`controlnet.data.datasets.collate_samples`), keyed by the family and the encoders; the conditions' VAE
  posteriors, for ControlNets that take latents (:func:`caches_condition_latents`). Latents are normalised as the
  sampler's: :func:`latent_normalisation`.
* **Objective**: :class:`controlnet.train.objective.FlowMatchingObjective`; a cached condition posterior is sampled
  and scaled as the sampler's own :meth:`~controlnet.transformer_pipeline.TransformerPipeline.encode_condition`
  does; an XLabs ControlNet's condition pixels go through that method.
* **Output**: OUT/controlnet in diffusers' layout (:func:`controlnet.transformer_formats.save_transformer_controlnet`),
  which ``controlnet generate --base <the same base> --controlnet OUT/controlnet`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from controlnet.data.cache import bound_annotator, entry_key, module_digest, tokenizer_digest
from controlnet.data.datasets import Encoders
from controlnet.errors import UserError
from controlnet.train.config import TrainConfig
from controlnet.train.objective import FlowMatchingObjective
from controlnet.train.validation import Validator
from controlnet.transformer_controlnet import (FAMILY_NAMES, FLUX, QWEN, SD3, FluxControlNet, QwenImageControlNet,
                                               SD3ControlNet, TransformerControlNet)

FLOW_FAMILIES = (FLUX, SD3, QWEN)
# (double/joint blocks, single blocks) copied by default: diffusers' train_controlnet_flux.py `--num_double_layers 4`,
# `--num_single_layers 4`; SD3ControlNetModel.from_transformer's `num_layers=12` (train_controlnet_sd3.py);
# QwenImageControlNetModel.from_transformer's `num_layers=5` (InstantX's Qwen-Image-ControlNet-Union has 5 blocks).
DEFAULT_LAYERS = {FLUX: (4, 4), SD3: (12, 0), QWEN: (5, 0)}


def flow_family(base: str | Path | None) -> str | None:
    """"flux", "sd3" or "qwenimage" when ``base`` is such a diffusers folder (or hub repository), else None."""
    from controlnet.loading import base_folder_family

    family = base_folder_family(None if base is None else str(base))
    return family if family in FLOW_FAMILIES else None


def is_flow_pipeline(base: Any) -> bool:
    from controlnet.transformer_pipeline import TransformerPipeline

    return isinstance(base, TransformerPipeline)


def check_flow_options(config: TrainConfig, family: str) -> None:
    """Refuse, in one line, what training on a Flux, SD3 or Qwen-Image base does not do."""
    label = FAMILY_NAMES[family]
    unsupported = {"--export-original": bool(config.export_original),
                   "--unlock-decoder-after": config.unlock_decoder_after is not None,
                   f"--architecture {config.architecture}": config.architecture != "copy",
                   f"--zero-conv-init {config.zero_conv_init}": config.zero_conv_init != "zero"}
    for flag, given in unsupported.items():
        if given:
            raise UserError(f"{flag} is for UNet bases; drop it to train on this {label} base")
    layers = [f"--{n.replace('_', '-')}" for n in ("controlnet_layers", "controlnet_single_layers")
              if getattr(config, n) is not None]
    if config.init and layers:
        raise UserError(f"{' and '.join(layers)}: the --init ControlNet has its own blocks; drop the option")
    if family != FLUX and config.controlnet_single_layers:
        raise UserError(f"--controlnet-single-layers: this {label} base has no single blocks; drop the option")


def check_unet_options(config: TrainConfig) -> None:
    """Refuse, in one line, the transformer ControlNet's options, and an ``--init`` folder holding a Flux, SD3 or
    Qwen-Image ControlNet, on a UNet base."""
    for name in ("controlnet_layers", "controlnet_single_layers"):
        if getattr(config, name) is not None:
            raise UserError(f"--{name.replace('_', '-')} is for Flux, SD3 and Qwen-Image bases; drop it for this "
                            "UNet base (its ControlNet copies the whole encoder)")
    family = init_family(config.init)
    if family is not None:
        raise UserError(f"--init {config.init} is a {FAMILY_NAMES[family]} ControlNet but the base is "
                        f"{FAMILY_NAMES['unet']}; use a ControlNet made for this base, or a "
                        f"{FAMILY_NAMES[family]} base")


def init_family(init: str | Path | None) -> str | None:
    """"flux", "sd3" or "qwenimage" when ``init`` is a diffusers folder whose config.json names such a ControlNet."""
    import json

    from controlnet.transformer_controlnet import CLASS_NAMES

    config = Path(init).expanduser() / "config.json" if init is not None else None
    if config is None or not config.is_file():
        return None
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None  # the loader names what is wrong with it
    return next((family for family, cls in CLASS_NAMES.items() if cls == name), None)


def read_flow_base(config: TrainConfig, family: str, device: torch.device) -> tuple[Any, int, TransformerControlNet]:
    """The locked base, the training resolution (``--resolution``, default the base's native size:
    :attr:`~controlnet.transformer_pipeline.TransformerPipeline.native_size`) and the ControlNet to train (fp32), as
    for a UNet base."""
    from controlnet.transformer_pipeline import TransformerPipeline

    check_flow_options(config, family)
    pipe = TransformerPipeline.from_pretrained(config.base, dtype=torch.float32, device=device)
    for module in pipe.models():
        module.requires_grad_(False)
    resolution = check_flow_resolution(config.resolution or pipe.native_size, pipe)
    torch.manual_seed(config.seed)  # a new ControlNet starts alike on every process
    controlnet = make_flow_controlnet(config, pipe.transformer).to(device=device, dtype=torch.float32)
    return pipe, resolution, controlnet


def check_flow_resolution(resolution: int, pipe: Any) -> int:
    """``resolution`` if the VAE and the packing (Flux 2x2, SD3 and Qwen-Image the patch size) divide it; else a
    one-line error."""
    from controlnet.transformer_controlnet import FLUX_LATENT_PATCH

    patch = FLUX_LATENT_PATCH if pipe.family == FLUX else pipe.transformer.config.patch_size
    factor = pipe.vae_scale_factor * patch
    if resolution % factor:
        lower = max(factor, resolution // factor * factor)
        raise UserError(f"--resolution {resolution} must be a multiple of {factor} for this "
                        f"{FAMILY_NAMES[pipe.family]} base (VAE x packing); try {lower}")
    return int(resolution)


def make_flow_controlnet(config: TrainConfig, transformer: torch.nn.Module) -> TransformerControlNet:
    """``--init`` (any layout the loader reads, checked against the base), or a new copy of the base's first blocks
    with its zero linears and condition embedder at zero."""
    from controlnet.transformer_controlnet import base_family

    family = base_family(transformer)
    if config.init:
        return lock_unreached(load_init(config.init, transformer)).train()
    double, single = DEFAULT_LAYERS[family]
    layers = double if config.controlnet_layers is None else config.controlnet_layers
    if family == FLUX:
        single = single if config.controlnet_single_layers is None else config.controlnet_single_layers
        cn = FluxControlNet.from_transformer(transformer, num_layers=layers, num_single_layers=single)
    elif family == QWEN:
        cn = QwenImageControlNet.from_transformer(transformer, num_layers=layers)
    else:
        cn = SD3ControlNet.from_transformer(transformer, num_layers=layers)
    return lock_unreached(cn).train()


# The parameters of a joint (double-stream) block that only compute its text-stream output: the text attention
# output and feed-forward (diffusers FluxTransformerBlock / JointTransformerBlock: `ff_context`;
# QwenImageTransformerBlock: `txt_mlp`).
TEXT_OUTPUT_PARAMETERS = ("attn.to_add_out.", "ff_context.", "txt_mlp.")


def lock_unreached(cn: TransformerControlNet) -> TransformerControlNet:
    """``cn`` with the parameters no residual depends on locked (``requires_grad=False``): the text-stream output
    of its last joint block when no block reads it (SD3's and Qwen-Image's last block; Flux's last double block
    without single blocks). They would never get a gradient, which DistributedDataParallel's reduction refuses;
    locked, they stay as copied, as they would unlocked."""
    blocks = cn.transformer_blocks
    text_output = len(blocks) and (hasattr(blocks[-1], "ff_context") or hasattr(blocks[-1], "txt_mlp"))
    if text_output and not len(getattr(cn, "single_transformer_blocks", ())):
        for name, p in blocks[-1].named_parameters():
            if name.startswith(TEXT_OUTPUT_PARAMETERS):
                p.requires_grad_(False)
    return cn


def load_init(init: str | Path, transformer: torch.nn.Module) -> TransformerControlNet:
    """The ControlNet ``--init`` names, refused in one line when it does not fit the base or cannot be trained
    here (a union ControlNet needs a mode per sample; an SD3.5-layout one shares the base's patch embedding; a
    Qwen-Image inpainting one takes a mask with its condition)."""
    from controlnet.loading import resolve_controlnet_source
    from controlnet.transformer_formats import load_transformer_controlnet

    path = resolve_controlnet_source(str(init))
    try:
        cn = load_transformer_controlnet(path, base=transformer)
    except UserError as err:
        raise UserError(f"--init {init}: {err}") from None
    if getattr(cn.config, "num_mode", None):
        raise UserError(f"--init {init} is a union ControlNet; training one (a control mode per sample) is not "
                        "supported: start from a single-condition ControlNet or a new one")
    if getattr(cn.config, "extra_condition_channels", 0):
        raise UserError(f"--init {init} is an inpainting Qwen-Image ControlNet (its condition carries a mask); "
                        "training one is not supported: start from a control ControlNet or a new one")
    if cn.from_base:
        raise UserError(f"--init {init} has the SD3.5 layout (it shares the base's patch embedding); training it is "
                        "not supported: start from an InstantX-layout ControlNet or a new one")
    return cn


def flow_encoders(pipe: Any, config: TrainConfig) -> Encoders:
    """The VAE and text-encoder callables that fill the caches, with identities that name the family."""
    vae, device = pipe.vae, next(pipe.vae.parameters()).device

    def encode_images(x: torch.Tensor) -> torch.Tensor:
        if pipe.family == QWEN:  # a video VAE: the image as one frame (B, 3, 1, H, W) → (B, 2C, 1, h, w)
            return vae.encode(x[:, :, None].to(device, vae.dtype)).latent_dist.parameters[:, :, 0].float().cpu()
        return vae.encode(x.to(device, vae.dtype)).latent_dist.parameters.float().cpu()  # (B, 2C, h, w)

    def encode_prompts(prompts: list[str]) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None]:
        text = pipe.encode_prompt(prompts)
        if pipe.family == QWEN:  # each prompt's own tokens (T_i, D), no pooled embedding
            embeds = text.embeds.float().cpu()
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool) if text.mask is None else text.mask.bool().cpu()
            return [e[m] for e, m in zip(embeds, mask)], None
        return text.embeds.float().cpu(), text.pooled.float().cpu()  # (N, T, D), (N, P)

    annotate = annotator_id = None
    if config.annotator:
        annotate, annotator_id = bound_annotator(config.annotator, config.annotator_params)
    encoders = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3)
    return Encoders(
        encode_images=encode_images, encode_prompts=encode_prompts,
        vae_id=entry_key(pipe.family, module_digest(vae)),
        text_id=entry_key(pipe.family, module_digest(*encoders), tokenizer_digest(*tokenizers),
                          pipe.max_sequence_length),
        annotate=annotate, annotator_id=annotator_id,
    )


def caches_condition_latents(base: Any, controlnet: torch.nn.Module) -> bool:
    """Whether training caches the conditions' VAE posteriors: on a Flux, SD3 or Qwen-Image base, for a ControlNet
    that takes the condition's latents (InstantX / diffusers layout); XLabs' hint encoder takes the pixels
    (:meth:`~controlnet.transformer_pipeline.TransformerPipeline.encode_condition`)."""
    return is_flow_pipeline(base) and getattr(controlnet, "input_hint_block", None) is None


def flow_objective(config: TrainConfig, pipe: Any, base_dtype: torch.dtype) -> FlowMatchingObjective:
    """The flow-matching objective of ``pipe``'s base, with only the VAE kept for the conditions."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from controlnet.transformer_pipeline import TransformerPipeline

    # The training scheduler's noise levels before any set_timesteps (diffusers' examples index these): Flux's and
    # Qwen-Image's (dynamic shifting; Qwen-Image's shift_terminal acts in set_timesteps only) unshifted, SD3's
    # shifted by its `shift`.
    sigmas = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler_config).sigmas.float()
    conditions = TransformerPipeline(pipe.transformer, pipe.vae, None, None, None, None, pipe.scheduler_config)
    norm = latent_normalisation(pipe)
    return FlowMatchingObjective(pipe.family, sigmas, conditions.encode_condition, config.seed, base_dtype,
                                 shift_factor=norm["shift_factor"], scaling_factor=norm["scaling_factor"],
                                 latent_std=norm.get("latent_std"))


def latent_normalisation(base: Any) -> dict[str, Any]:
    """How a VAE posterior sample z becomes the base's latents, as :class:`~controlnet.data.datasets.TrainDataset`'s
    keyword arguments: ``(z − shift_factor) · scaling_factor`` with the VAE config's numbers, or, on a Qwen-Image
    base, per channel ``(z − latents_mean) / latents_std`` (``shift_factor`` and ``latent_std`` (C, 1, 1)), as
    :meth:`~controlnet.transformer_pipeline.TransformerPipeline.encode_latents` normalises them."""
    c = base.vae.config
    if is_flow_pipeline(base) and base.family == QWEN:
        from controlnet.transformer_pipeline import qwen_latent_statistics

        mean, std = qwen_latent_statistics(c)
        return dict(scaling_factor=1.0, shift_factor=mean, latent_std=std)
    return dict(scaling_factor=float(c.scaling_factor), shift_factor=float(getattr(c, "shift_factor", None) or 0.0))


class FlowValidator(Validator):
    """Validation samples on a Flux, SD3 or Qwen-Image base:
    :class:`~controlnet.transformer_pipeline.TransformerPipeline`'s flow-matching sampler, ``--validation-steps``
    Euler steps at ``--validation-guidance`` (Flux: the distilled guidance scale; SD3: the CFG weight; Qwen-Image:
    the true CFG weight, the empty negative prompt), the ControlNet at strength 1."""

    def components_of(self, base: Any) -> dict[str, Any]:
        names = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                 "tokenizer_3", "scheduler_config")
        return {name: getattr(base, name) for name in names}

    def sampler(self, controlnet: Any) -> Any:
        from controlnet.transformer_pipeline import TransformerPipeline, TransformerUnit

        pipe = TransformerPipeline(**self.components)
        size = self.resolution

        def sample(condition: np.ndarray, prompt: str) -> np.ndarray:
            hint = torch.from_numpy(np.ascontiguousarray(condition)).permute(2, 0, 1)[None].float() / 255  # (1, 3, R, R)
            image = pipe(prompt, [TransformerUnit(controlnet, hint)], height=size, width=size,
                         steps=self.config.validation_steps, guidance=self.config.validation_guidance,
                         seed=self.config.seed, output_type="pt")[0]  # (3, R, R) in [0, 1]
            return (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)

        return sample


def save_trained(controlnet: torch.nn.Module, path: Path) -> Path:
    """A trained ControlNet in its native layout: diffusers' folder for transformer ControlNets
    (:func:`~controlnet.transformer_formats.save_transformer_controlnet`) and UNet ones
    (:func:`~controlnet.checkpoints.save_controlnet`)."""
    if isinstance(controlnet, TransformerControlNet):
        from controlnet.transformer_formats import save_transformer_controlnet

        return save_transformer_controlnet(controlnet, path)
    from controlnet.checkpoints import save_controlnet

    return save_controlnet(controlnet, path)
