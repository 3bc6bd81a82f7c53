"""Training a ControlNet on a locked base: the paper's recipe, resumable, cached, data-parallel.

Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models" (ICCV 2023), Sec. 3.3:
the base model is locked, a trainable copy of its encoder (:meth:`ControlNet.from_unet`; on Flux, SD3 and Qwen-Image bases,
of its first blocks: :mod:`.flow`) learns from (image, condition, prompt) triples with the base's own objective
(:mod:`.objective`), t uniform over the scheduler's training timesteps (flow matching: σ logit-normal), and 50% of
the prompts replaced by the empty string.

    from controlnet.train import TrainConfig, train
    result = train(TrainConfig(data="fill", out="runs/fill", max_steps=3000, batch_size=8, validate_every=250))

The modules, in the order a run uses them:

    config        TrainConfig (one field per `controlnet train` option) and TrainResult
    setup         the inputs, checked before anything is written (base, --init, manifest, --resume); then the
                  caches, the locked base, the optimizer, the resumed state and the sample stream
    folder        OUT/.lock and the temporaries a killed run left
    objective     the denoising loss (UNet bases), the flow-matching loss (Flux, SD3, Qwen-Image), AdamW, gradient checkpointing
    flow          Flux, SD3 and Qwen-Image bases: their ControlNet, text caches and objective
    loop          train(): the optimizer steps, then the outputs
    distributed   several processes: accelerate + DistributedDataParallel
    state         checkpoints (optimizer state by parameter name) and RNG states
    scores        the controllability scores of validation samples (a table by --score name)
    validation    validation samples and their scores, the sudden-convergence rule
    log           OUT/log.jsonl, TensorBoard, OUT/training.png

Decisions:

* **Locked base.** Every base weight has ``requires_grad=False``; with mixed precision the locked UNet is stored in
  the reduced dtype. ``--unlock-decoder-after N`` (the original's ``sd_locked=False``) trains the UNet's decoder
  too from step N, with fp32 master weights.
* **Caches.** VAE latent distributions, text embeddings (incl. the empty prompt's) and conditions at the training
  resolution are computed once and stored on disk (:mod:`controlnet.data.cache`), so a step runs only the UNet and
  the ControlNet. The latent is *sampled* from the cached distribution at every step, as the original does.
* **Randomness** is a function of (seed, sample position) (:mod:`controlnet.data.datasets`), so a resumed run, a
  run with data-loader workers and a run on N processes with the same global batch see the same samples, the
  same empty prompts, timesteps and noise.
* **Only the main process writes** checkpoints, logs, samples and outputs.

This package's top level imports no torch: ``controlnet train --help`` reads :class:`TrainConfig` only.
"""

from __future__ import annotations

from controlnet.train.config import TrainConfig, TrainResult

__all__ = ["TrainConfig", "TrainResult", "train"]


def train(config: TrainConfig) -> TrainResult:
    """Train a ControlNet as ``config`` says: :func:`controlnet.train.loop.train`."""
    from controlnet.train.loop import train as run_training

    return run_training(config)
