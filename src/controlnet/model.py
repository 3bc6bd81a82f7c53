"""The ControlNet: a trainable copy of a locked SD-family UNet encoder plus zero convolutions.

Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models" (ICCV 2023), Sec. 3:
for a locked block F(x; Θ) the ControlNet computes

    y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2)

where Θc is a trainable copy of Θ and Z are 1x1 convolutions whose weight and bias start at zero, so at
initialisation y_c == y exactly. For a UNet the "copy" is the encoder (conv_in, time embedding, down blocks,
mid block: :attr:`ControlNet.copied_from_unet`); its skip activations go through one zero conv each and are
*added* to the locked UNet's skip connections (``down_block_additional_residuals`` /
``mid_block_additional_residual`` in diffusers): a :class:`~controlnet.residuals.Residuals` keyed by location.

:class:`UNetControlNet` holds what every ControlNet of a UNet base shares: the input x + E(c) (the copied conv_in
plus the hint encoder, :mod:`controlnet.hint_encoders`), the zero convs and the residuals they make. Its
subclasses differ in the encoder between them: :class:`ControlNet` is the paper's model (the trainable copy);
:class:`ControlNetLite` is the paper's ablation "ControlNet-lite" (Sec. 4.2, Fig. 8c), one convolution per
encoder layer. :func:`build_controlnet` builds either from a :class:`~controlnet.model_config.ControlNetConfig`
(its ``architecture``); :mod:`controlnet.checkpoints` reads and writes them.

Module attribute names follow diffusers' ``ControlNetModel`` (``controlnet_cond_embedding``,
``controlnet_down_blocks``, ``controlnet_mid_block``, ...) so state dicts move between the two unconverted. The
building blocks themselves (down blocks, mid block, time embedding) come from diffusers, the field's library for
the base models.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UNetMidBlock2DCrossAttn, get_down_block
from torch import nn

from controlnet.hint_encoders import make_hint_encoder
from controlnet.model_config import PAPER_HINT_CHANNELS, ControlNetConfig, released_hint_channels
from controlnet.residuals import Residuals


def _zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 convolution with weight and bias exactly zero (the paper's Z(·; Θz))."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def zero_convs(config: ControlNetConfig) -> nn.ModuleList:
    """One zero conv per skip connection of the base's encoder (``controlnet_down_blocks``)."""
    return nn.ModuleList([_zero_conv(channels) for channels, _ in config.skip_layout()])


# --------------------------------------------------------------------------------------------- the shared base


class UNetControlNet(nn.Module):
    """What every ControlNet of a UNet base shares: x + E(c) in, zero convs out, residuals for the locked UNet.

    A subclass names its ``architecture`` (the config's), the base modules ``from_unet`` copies
    (``copied_from_unet``), and the encoder between input and zero convs: it registers its modules in
    :meth:`_build_embedding`, :meth:`_build_encoder` and :meth:`_build_middle`, and runs them in :meth:`encode`
    (and :meth:`time_embed` if it sees the timestep). Call any of them like the base's encoder::

        cn = ControlNet.from_unet(unet)                    # or architecture="lite"
        res = cn(latents, t, text_emb, hint)               # hint: (B, 3, 8h, 8w) in [0, 1]
        eps = unet(latents, t, text_emb, **res.unet_kwargs()).sample
    """

    architecture: str  # the config's architecture the class builds
    copied_from_unet: tuple[str, ...]  # the base UNet's modules that from_unet copies, weights included

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        if config.architecture != self.architecture:
            raise ValueError(f"{type(self).__name__} builds architecture {self.architecture!r}, the config says "
                             f"{config.architecture!r}; build it with build_controlnet(config)")
        self.config = config
        c = config
        # Modules are registered in the order of the first releases of these classes: training checkpoints stored
        # the optimizer state by parameter index, so the order must not change (resuming would mix tensors up).
        self._build_embedding()
        # x + Z(c): the copied conv_in and the hint encoder E(c) (its last conv is the zero conv Z(·; Θz1)).
        self.conv_in = nn.Conv2d(c.in_channels, c.block_out_channels[0], kernel_size=3, padding=1)
        self.controlnet_cond_embedding = make_hint_encoder(c)
        self._build_encoder()
        self.controlnet_down_blocks = zero_convs(c)  # Z(·; Θz2), one per skip connection
        self._build_middle()
        self.controlnet_mid_block = _zero_conv(c.block_out_channels[-1])  # Z(·; Θz2) of the mid block

    def _build_embedding(self) -> None:
        """Register the encoder's timestep (and class) embedding, if it has one."""

    def _build_encoder(self) -> None:
        """Register the encoder's modules up to its skip connections."""
        raise NotImplementedError

    def _build_middle(self) -> None:
        """Register the encoder's mid block, if it is a module of its own."""

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        conditioning_channels: int = 3,
        hint_encoder: str = "released",
        vae_scale_factor: int = 8,
        global_pool_conditions: bool = False,
        load_weights_from_unet: bool = True,
        architecture: str | None = None,
    ) -> "UNetControlNet":
        """A new ControlNet whose encoder is a copy, with weights, of a diffusers ``UNet2DConditionModel``'s.

        ``architecture`` (default: this class's) picks the model: "copy" builds :class:`ControlNet`, "lite" the
        paper's ControlNet-lite ablation (:class:`ControlNetLite`: only conv_in is copied).

        The hint encoder has log2(``vae_scale_factor``) stride-2 convs so conditions are given at image
        resolution. Zero convs (and the hint encoder's last conv) start at exactly zero, so the augmented UNet's
        output equals the base's bit for bit until training moves them.
        """
        channels = PAPER_HINT_CHANNELS if hint_encoder == "paper" else released_hint_channels(vae_scale_factor)
        config = ControlNetConfig.from_unet_config(
            unet.config,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=channels,
            hint_encoder=hint_encoder,
            global_pool_conditions=global_pool_conditions,
            vae_scale_factor=vae_scale_factor,
            architecture=architecture or cls.architecture,
        )
        cn = build_controlnet(config)
        if load_weights_from_unet:
            for name in cn.copied_from_unet:
                module = getattr(unet, name, None)
                if module is not None:
                    setattr(cn, name, copy.deepcopy(module))
        # The copy is trainable even when the base was frozen first (deepcopy keeps requires_grad=False).
        cn.requires_grad_(True)
        return cn.to(dtype=next(unet.parameters()).dtype)

    # ------------------------------------------------------------------ forward

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """E(c): condition image (B, 3, H, W) in [0, 1] → features (B, C0, H/8, W/8).

        Independent of the timestep: a sampler computes it once per generation and passes it as
        ``hint_embedding``.
        """
        if self.config.controlnet_conditioning_channel_order == "bgr":
            hint = torch.flip(hint, dims=[1])
        return self.controlnet_cond_embedding(hint.to(self.dtype))

    def time_embed(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                   added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """The encoder's time (+ class / SDXL addition) embedding (B, 4*C0); None for an encoder without one."""
        return None

    def encode(self, h: torch.Tensor, emb: torch.Tensor | None,
               encoder_hidden_states: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The encoder from x + E(c) ``h`` (B, C0, h, w): its skip activations (one per zero conv) and the mid
        block's output."""
        raise NotImplementedError

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        hint: torch.Tensor | None = None,
        conditioning_scale: float | Sequence[float] = 1.0,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        hint_embedding: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> Residuals:
        """Residuals for the locked UNet: ``("down", i)`` per skip connection, then ``("mid", 0)``.

        Args:
            sample: noisy latents (B, 4, h, w).
            timestep: scalar or (B,) diffusion timesteps.
            encoder_hidden_states: text embeddings (B, L, D).
            hint: condition image (B, 3, 8h, 8w) in [0, 1]; or pass ``hint_embedding`` from :meth:`encode_hint`.
            conditioning_scale: one float, or one value per residual (``num_residuals``: down residuals then mid),
                e.g. :func:`~controlnet.residuals.original_guess_mode_scales`.
            added_cond_kwargs: SDXL's ``text_embeds`` and ``time_ids``.
        """
        emb = self.time_embed(sample, timestep, added_cond_kwargs, class_labels)  # (B, 4*C0) or None
        h = self.conv_in(sample) + self._hint_embedding(hint, hint_embedding)  # (B, C0, h, w): x + Z(c)
        skips, mid = self.encode(h, emb, encoder_hidden_states)
        return self._residuals(skips, mid, conditioning_scale)

    def _hint_embedding(self, hint: torch.Tensor | None, hint_embedding: torch.Tensor | None) -> torch.Tensor:
        if hint_embedding is not None:
            return hint_embedding
        if hint is None:
            raise ValueError("pass either hint or hint_embedding")
        return self.encode_hint(hint)

    def _residuals(self, skips: list[torch.Tensor], mid: torch.Tensor,
                   conditioning_scale: float | Sequence[float]) -> Residuals:
        """The zero convs Z(·; Θz2) over the skips and the mid features, scaled (and pooled) as configured."""
        down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips)]
        res = Residuals.for_unet(down, self.controlnet_mid_block(mid)).scaled(conditioning_scale)
        if self.config.global_pool_conditions:  # ControlNet 1.1 shuffle: residuals averaged over H, W
            res = res.map(lambda r: r.mean(dim=(2, 3), keepdim=True))
        return res

    @property
    def num_residuals(self) -> int:
        return len(self.controlnet_down_blocks) + 1

    def zero_convs(self) -> list[nn.Conv2d]:
        """The zero 1x1 convs (down then mid), e.g. to check they start at zero or to inspect their growth."""
        return [*self.controlnet_down_blocks, self.controlnet_mid_block]


# --------------------------------------------------------------------------------------------- the paper's model


class ControlNet(UNetControlNet):
    """A ControlNet for an SD-family UNet (SD1.x, SD2.x, SDXL): the paper's model, a trainable copy of the
    base's encoder.

    Build a new one with :meth:`from_unet` (a copy of the base's encoder, zero convs at zero), or load one with
    ``controlnet.load_controlnet``; write one with ``controlnet.save_controlnet`` (diffusers' folder layout, or
    the original releases' file).
    """

    architecture = "copy"
    # The base UNet's modules that from_unet copies, weights included, into the new ControlNet: the paper's Θc.
    copied_from_unet = ("time_proj", "time_embedding", "class_embedding", "add_time_proj", "add_embedding",
                        "conv_in", "down_blocks", "mid_block")

    def _build_embedding(self) -> None:
        """The time embedding (+ class / SDXL addition embeddings) of the copy, as the base's: a sinusoidal
        projection then a 2-layer MLP."""
        c = self.config
        c0 = c.block_out_channels[0]
        time_embed_dim = c.time_embed_dim
        self.time_proj = Timesteps(c0, c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(c0, time_embed_dim, act_fn=c.act_fn)
        if c.class_embed_type is None and c.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(c.num_class_embeds, time_embed_dim)
        elif c.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(c0, time_embed_dim)
        elif c.class_embed_type == "projection":
            self.class_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, time_embed_dim)
        else:
            self.class_embedding = None
        if c.addition_embed_type == "text_time":  # SDXL: pooled text embedding + size/crop time ids
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, time_embed_dim)

    def _build_encoder(self) -> None:
        self.down_blocks = self._copied_down_blocks()  # the trainable copy of the encoder

    def _build_middle(self) -> None:
        self.mid_block = self._copied_mid_block()

    def _copied_down_blocks(self) -> nn.ModuleList:
        """The trainable copy's down blocks (diffusers' blocks, the base's layout)."""
        c = self.config
        heads, head_dim = c.heads_per_block(), c.per_block(c.attention_head_dim)
        cross_only, layers = c.per_block(c.only_cross_attention), c.per_block(c.transformer_layers_per_block)
        blocks = nn.ModuleList()
        out_ch = c.block_out_channels[0]
        for i, block_type in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, c.block_out_channels[i]
            blocks.append(
                get_down_block(
                    block_type,
                    num_layers=c.layers_per_block,
                    transformer_layers_per_block=layers[i],
                    in_channels=in_ch,
                    out_channels=out_ch,
                    temb_channels=c.time_embed_dim,
                    add_downsample=i < len(c.down_block_types) - 1,
                    resnet_eps=c.norm_eps,
                    resnet_act_fn=c.act_fn,
                    resnet_groups=c.norm_num_groups,
                    cross_attention_dim=c.cross_attention_dim,
                    num_attention_heads=heads[i],
                    attention_head_dim=head_dim[i],
                    downsample_padding=c.downsample_padding,
                    use_linear_projection=c.use_linear_projection,
                    only_cross_attention=cross_only[i],
                    upcast_attention=c.upcast_attention,
                    resnet_time_scale_shift=c.resnet_time_scale_shift,
                )
            )
        return blocks

    def _copied_mid_block(self) -> nn.Module:
        """The trainable copy's mid block."""
        c = self.config
        mid_ch = c.block_out_channels[-1]
        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            return UNetMidBlock2DCrossAttn(
                transformer_layers_per_block=c.per_block(c.transformer_layers_per_block)[-1],
                in_channels=mid_ch,
                temb_channels=c.time_embed_dim,
                resnet_eps=c.norm_eps,
                resnet_act_fn=c.act_fn,
                output_scale_factor=c.mid_block_scale_factor,
                resnet_time_scale_shift=c.resnet_time_scale_shift,
                cross_attention_dim=c.cross_attention_dim,
                num_attention_heads=c.heads_per_block()[-1],
                resnet_groups=c.norm_num_groups,
                use_linear_projection=c.use_linear_projection,
                upcast_attention=c.upcast_attention,
            )
        return UNetMidBlock2D(
            in_channels=mid_ch,
            temb_channels=c.time_embed_dim,
            num_layers=0,
            resnet_eps=c.norm_eps,
            resnet_act_fn=c.act_fn,
            output_scale_factor=c.mid_block_scale_factor,
            resnet_groups=c.norm_num_groups,
            resnet_time_scale_shift=c.resnet_time_scale_shift,
            add_attention=False,
        )

    def time_embed(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                   added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The copied time (+ class / SDXL addition) embedding, (B, 4*C0)."""
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
        t = t.reshape(-1).to(sample.device).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(dtype=sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this ControlNet needs class_labels (class_embed_type is set)")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(dtype=emb.dtype)
        if self.config.addition_embed_type == "text_time":
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise ValueError("an SDXL ControlNet needs added_cond_kwargs with 'text_embeds' and 'time_ids'")
            text_embeds = added_cond_kwargs["text_embeds"]
            time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].flatten()).reshape(text_embeds.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        return emb

    def encode(self, h: torch.Tensor, emb: torch.Tensor | None,
               encoder_hidden_states: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The trainable copy F(·; Θc): its down blocks (one skip per layer) and its mid block."""
        skips = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips.extend(res)
        if getattr(self.mid_block, "has_cross_attention", False):
            h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h = self.mid_block(h, emb)
        return skips, h


# --------------------------------------------------------------------------------------------- the lite ablation


class ControlNetLite(UNetControlNet):
    """The paper's ablation "ControlNet-lite" (Sec. 4.2, Fig. 8c): the trainable copy replaced by one convolution
    per encoder layer, so it sees the latent and the condition but neither the timestep nor the prompt.

    It is used wherever a :class:`ControlNet` is: the same call, the same residuals, hint encoder, zero convs and
    native layout (``_class_name`` ``ControlNetLiteModel``, ``"architecture": "lite"``, so diffusers refuses it by
    name; the original layout has no place for it).
    """

    architecture = "lite"
    copied_from_unet = ("conv_in",)

    def _build_encoder(self) -> None:
        self.lite_blocks = self._lite_convs()  # its mid block's conv included, as the last

    def _lite_convs(self) -> nn.ModuleList:
        """One 3x3 conv (then SiLU) per skip connection after conv_in, and one for the mid block.

        Each conv maps the previous skip's features to the next skip's width, with stride 2 where the base's
        encoder downsamples, so the residuals have the shapes the locked UNet expects.
        """
        skips = self.config.skip_layout()
        convs = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2 if down else 1)
                 for (c_in, _), (c_out, down) in zip(skips[:-1], skips[1:])]
        convs.append(nn.Conv2d(skips[-1][0], self.config.block_out_channels[-1], kernel_size=3, padding=1))  # mid
        return nn.ModuleList(convs)

    def encode(self, h: torch.Tensor, emb: torch.Tensor | None,
               encoder_hidden_states: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Skips from x + E(c) alone: ``emb`` (None) and ``encoder_hidden_states`` are not used."""
        skips = [h]
        for conv in self.lite_blocks[:-1]:  # one conv per skip connection of the base
            h = F.silu(conv(h))
            skips.append(h)
        return skips, F.silu(self.lite_blocks[-1](h))  # (B, C_last, h', w'): the mid block's conv


# The class of each architecture name (ControlNetConfig.architecture).
MODEL_CLASSES: dict[str, type[UNetControlNet]] = {"copy": ControlNet, "lite": ControlNetLite}


def build_controlnet(config: ControlNetConfig) -> UNetControlNet:
    """A new model of ``config.architecture`` (:class:`ControlNet` or :class:`ControlNetLite`), zero convs at zero.

    Weights are freshly initialised; build it under ``torch.device("meta")`` to load weights into it instead.
    """
    return MODEL_CLASSES[config.architecture](config)
