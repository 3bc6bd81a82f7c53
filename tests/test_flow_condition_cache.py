"""The conditions' VAE posteriors cached for Flux and SD3 training: the training step samples them into exactly the
condition latents the uncached path encodes (losses bit for bit, flips included), the entries are keyed by the VAE,
the condition's content, annotator and resolution and the orientation, and XLabs' pixel ControlNets stay uncached."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from controlnet.data.cache import CacheStore
from controlnet.data.datasets import (TrainDataset, condition_latents_key, condition_to_tensor, prepare_examples,
                                      read_manifest, sample_draws)
from test_datasets import FakeEncoders, _fill_layout

R = 32  # training resolution: 4x4 latents, 2x2 Flux tokens / SD3 patches
LAYERS = {"flux": dict(controlnet_layers=2, controlnet_single_layers=1), "sd3": dict(controlnet_layers=2)}
SEED = 5
POSITIONS = [[0, 1], [2, 3], [4, 5], [6, 7]]  # the first four steps' micro-batches (batch 2): a stream epoch and more


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny Flux and SD3 diffusers folders whose VAE posteriors have their own (non-negligible) spread, and a fill
    data set of 4 examples."""
    from controlnet.data.fill import make_fill_dataset
    from controlnet.testing_flow import diffusers_components, flux_components, sd3_components

    root = tmp_path_factory.mktemp("flow-condition-cache")
    FluxPipeline(**diffusers_components(flux_components())).save_pretrained(root / "flux")
    StableDiffusion3Pipeline(**diffusers_components(sd3_components())).save_pretrained(root / "sd3")
    make_fill_dataset(root / "data", n=4, size=R, seed=0)
    return root


def _config(assets, family, out, **kw):
    from controlnet.train import TrainConfig

    kw = {"max_steps": 2, "checkpoint_every": 2, "batch_size": 2, "quiet": True, "plot": False, "tensorboard": False,
          "seed": SEED, "hflip": True, "empty_prompt_prob": 0.5, **LAYERS[family], **kw}
    return TrainConfig(data=assets / "data", out=out, base=assets / family, resolution=R, **kw)


def _trained_like(cn: torch.nn.Module) -> torch.nn.Module:
    """``cn`` with every weight moved off its initial value (zero linears included), so its residuals depend on the
    condition."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return cn


@pytest.mark.parametrize("family,force_zeros", [("flux", False), ("sd3", False), ("sd3", True)])
def test_cached_condition_latents_give_the_uncached_conditions_and_losses_bit_for_bit(assets, tmp_path, family,
                                                                                      force_zeros):
    """The first steps' micro-batches read with the conditions' cached posteriors and with the condition images
    (what the trainer did before caching them) give identical condition latents and identical losses, in both
    orientations (hflip) and both SD3 encodings (shifted; unshifted for force_zeros_for_pooled_projection)."""
    from controlnet.train.flow import flow_encoders, flow_objective, make_flow_controlnet
    from controlnet.transformer_pipeline import TransformerPipeline

    config = _config(assets, family, tmp_path / "out")
    pipe = TransformerPipeline.from_pretrained(assets / family, dtype=torch.float32)
    store, manifest = CacheStore(tmp_path / "cache"), read_manifest(assets / "data")
    encoders = flow_encoders(pipe, config)
    cached = prepare_examples(manifest, store, encoders, R, hflip=True, condition_latents=True)
    plain = prepare_examples(manifest, store, encoders, R, hflip=True)
    assert cached.stats.condition_latents_encoded == 8 and plain.stats.condition_latents_encoded == 0
    objective = flow_objective(config, pipe, torch.float32)
    cn = _trained_like(make_flow_controlnet(config, pipe.transformer))
    cn.config.force_zeros_for_pooled_projection = force_zeros
    vae = pipe.vae.config

    def stream(prep):
        return TrainDataset(prep.examples, store, SEED, 0.5, True, objective.num_timesteps, vae.scaling_factor,
                            prep.empty_text_key, shift_factor=vae.shift_factor or 0.0)

    with_cache, without = stream(cached), stream(plain)
    collate = torch.utils.data.default_collate
    for positions in POSITIONS:
        a, b = collate([with_cache[p] for p in positions]), collate([without[p] for p in positions])
        assert "condition_params" in a and "condition" not in a and "condition" in b
        ca, cb = objective.condition(a, cn), objective.condition(b, cn)
        assert ca.shape == cb.shape and torch.equal(ca, cb)
        with torch.no_grad():
            assert torch.equal(objective(cn, pipe.transformer, a), objective(cn, pipe.transformer, b))
    flips = {sample_draws(SEED, p, 0.5, True, objective.num_timesteps).flip for ps in POSITIONS for p in ps}
    assert flips == {False, True}  # both cached orientations were read
    # the posterior's spread is sampled, not dropped: another position's draw gives other latents
    other = dict(a, position=a["position"] + 100)
    assert not torch.equal(objective.condition(other, cn), ca)


def test_condition_latents_are_the_conditions_encoded_and_keyed_by_vae_resolution_annotator_and_flip(tmp_path):
    """Each orientation's entry holds the VAE's posterior of the stored condition (mirrored for the flip), as the
    uncached path feeds it (``condition * 2 - 1``); a second preparation reuses them; another VAE, resolution or
    annotator gets new keys and encodes again."""
    root = _fill_layout(tmp_path / "data", n=3)
    store = CacheStore(tmp_path / "cache")
    enc = FakeEncoders()
    prep = prepare_examples(read_manifest(root), store, enc.encoders(), R, hflip=True, condition_latents=True)
    assert prep.stats.condition_latents_encoded == 6 and enc.image_calls == 6 + 6  # images and conditions, 2 ways
    for ex in prep.examples:
        condition = store.load_condition(ex.condition_key)  # (R, R, 3) uint8
        for key, flip in zip(ex.condition_latent_keys, (False, True)):
            assert key == condition_latents_key("vae-a", ex.condition_key, flip)
            pixels = condition_to_tensor(condition[:, ::-1] if flip else condition)[None] * 2 - 1
            assert torch.equal(store.load_tensors("latents", key)["params"], enc.encode_images(pixels)[0])
    assert len({k for ex in prep.examples for k in ex.condition_latent_keys}) == 6

    again = prepare_examples(read_manifest(root), store, FakeEncoders().encoders(), R, hflip=True,
                             condition_latents=True)
    assert (again.stats.condition_latents_encoded, again.stats.condition_latents_cached) == (0, 6)
    assert [ex.condition_latent_keys for ex in again.examples] == [ex.condition_latent_keys for ex in prep.examples]

    other_vae = prepare_examples(read_manifest(root), store, FakeEncoders(vae_id="vae-b").encoders(), R,
                                 hflip=True, condition_latents=True)
    bigger = prepare_examples(read_manifest(root), store, FakeEncoders().encoders(), 2 * R, condition_latents=True)
    keys = {k for ex in prep.examples for k in ex.condition_latent_keys}
    for changed in (other_vae, bigger):
        assert changed.stats.condition_latents_cached == 0
        assert not keys & {k for ex in changed.examples for k in ex.condition_latent_keys}

    def annotator(name):
        return FakeEncoders().encoders(annotate=lambda im: 255 - im, annotator_id=name)

    manifest = read_manifest(root, need_conditions=False)
    first = prepare_examples(manifest, store, annotator("invert"), R, condition_latents=True)
    second = prepare_examples(manifest, store, annotator("invert-v2"), R, condition_latents=True)
    assert second.stats.condition_latents_cached == 0
    assert not {k for ex in first.examples for k in ex.condition_latent_keys} & {
        k for ex in second.examples for k in ex.condition_latent_keys}


def test_training_caches_the_conditions_of_latent_controlnets_only(assets, tmp_path):
    """A Flux run caches each condition's posterior once per orientation and reuses them on the next run; an XLabs
    ControlNet (pixels through its hint encoder) and a UNet base get the condition images."""
    from controlnet.train import train
    from controlnet.train.flow import caches_condition_latents
    from controlnet.transformer_controlnet import FluxControlNet
    from controlnet.transformer_pipeline import TransformerPipeline

    cache = tmp_path / "cache"
    first = train(_config(assets, "flux", tmp_path / "a", cache_dir=cache))
    second = train(_config(assets, "flux", tmp_path / "b", cache_dir=cache))
    assert (first.cache.condition_latents_encoded, first.cache.condition_latents_cached) == (8, 0)
    assert (second.cache.condition_latents_encoded, second.cache.condition_latents_cached) == (0, 8)
    assert first.losses == second.losses

    pipe = TransformerPipeline.from_pretrained(assets / "flux", dtype=torch.float32)
    latent = FluxControlNet.from_transformer(pipe.transformer, num_layers=1, num_single_layers=0)
    xlabs = FluxControlNet.from_transformer(pipe.transformer, num_layers=1, num_single_layers=0,
                                            conditioning_embedding_channels=16)
    assert caches_condition_latents(pipe, latent) and not caches_condition_latents(pipe, xlabs)
    assert not caches_condition_latents(object(), latent)  # a UNet base's components
