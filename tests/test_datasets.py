"""Training data: manifests, bad rows, the cache (hits, invalidation, flips), the sample stream and its draws.

No diffusion model here: the encoders are small deterministic functions that count their calls.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.data.cache import CacheStore, module_digest
from controlnet.data.datasets import (
    Encoders, StreamBatches, TrainDataset, epoch_order, prepare_examples, read_manifest, sample_draws,
)
from controlnet.errors import UserError

R = 16  # training resolution of these tests


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pair(i: int, size: int = R) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    condition = np.zeros((size, size, 3), np.uint8)
    condition[:, : size // 2] = 255  # left half white: a flip is visible
    condition[i % size, :] = 128
    return image, condition


def _fill_layout(root, n=4, size=R):
    rows = []
    for i in range(n):
        image, condition = _pair(i, size)
        _png(root / "target" / f"{i}.png", image)
        _png(root / "source" / f"{i}.png", condition)
        rows.append({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"prompt {i % 2}"})
    (root / "prompt.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


class FakeEncoders:
    """Latent "distribution" = the image itself downsampled 4x (mean) and zeros (log-variance): flips are visible."""

    def __init__(self, vae_id="vae-a", text_id="text-a"):
        self.image_calls = 0
        self.prompt_calls = 0
        self.vae_id, self.text_id = vae_id, text_id

    def encode_images(self, x):  # (B, 3, R, R) → (B, 6, R/4, R/4)
        self.image_calls += x.shape[0]
        mean = torch.nn.functional.avg_pool2d(x, 4)
        return torch.cat([mean, torch.full_like(mean, -30.0)], dim=1)  # logvar -30: a sample equals the mean

    def encode_prompts(self, prompts):
        self.prompt_calls += len(prompts)
        hidden = torch.stack([torch.full((3, 5), float(len(p))) for p in prompts])  # (N, 3, 5)
        return hidden, None

    def encoders(self, annotate=None, annotator_id=None):
        return Encoders(self.encode_images, self.encode_prompts, self.vae_id, self.text_id, annotate, annotator_id)


# --------------------------------------------------------------------------- manifests


def test_both_layouts_read_alike(tmp_path):
    fill = _fill_layout(tmp_path / "fill", n=3)
    m = read_manifest(fill)
    assert m.layout == "fill50k" and len(m.examples) == 3 and not m.skipped
    assert m.examples[0].image == fill / "target/0.png" and m.examples[0].condition == fill / "source/0.png"

    hf = tmp_path / "hf"
    rows = [{"image": f"target/{i}.png", "conditioning_image": f"source/{i}.png", "text": f"p{i}"} for i in range(3)]
    for i in range(3):
        image, condition = _pair(i)
        _png(hf / "target" / f"{i}.png", image)
        _png(hf / "source" / f"{i}.png", condition)
    (hf / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m2 = read_manifest(hf / "metadata.jsonl")  # the file itself works too
    assert m2.layout == "diffusers" and [e.prompt for e in m2.examples] == ["p0", "p1", "p2"]


def test_bad_rows_are_counted_listed_and_skipped_or_fail_with_strict(tmp_path):
    root = _fill_layout(tmp_path / "d", n=3)
    with open(root / "prompt.json", "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"source": "source/0.png", "target": "target/missing.png", "prompt": "x"}) + "\n")
        f.write(json.dumps({"source": "source/0.png", "prompt": "no target column"}) + "\n")
    m = read_manifest(root)
    assert len(m.examples) == 3
    assert [s.line for s in m.skipped] == [4, 5, 6]
    assert "not JSON" in m.skipped[0].reason and "missing file" in m.skipped[1].reason
    assert "missing columns" in m.skipped[2].reason
    with pytest.raises(UserError, match="line 4"):
        read_manifest(root, strict=True)
    # Without conditions (an annotator makes them) the condition column is not needed.
    (root / "prompt.json").write_text(json.dumps({"target": "target/0.png", "prompt": "p"}) + "\n")
    with pytest.raises(UserError, match="no usable rows"):
        read_manifest(root)
    assert len(read_manifest(root, need_conditions=False).examples) == 1
    with pytest.raises(UserError, match="prompt.json"):
        read_manifest(tmp_path / "empty_dir_that_does_not_exist")


# --------------------------------------------------------------------------- preparation and the cache


def test_cache_hits_second_time_and_recomputes_only_what_changed(tmp_path):
    root = _fill_layout(tmp_path / "d", n=4)
    store = CacheStore(tmp_path / "cache")
    enc = FakeEncoders()
    p1 = prepare_examples(read_manifest(root), store, enc.encoders(), R, hflip=True)
    assert (enc.image_calls, enc.prompt_calls) == (8, 3)  # 4 images x 2 flips; "prompt 0", "prompt 1", ""
    assert p1.stats.latents_encoded == 8 and p1.stats.prompts_encoded == 3 and p1.stats.conditions_made == 4

    enc2 = FakeEncoders()
    p2 = prepare_examples(read_manifest(root), store, enc2.encoders(), R, hflip=True)
    assert (enc2.image_calls, enc2.prompt_calls) == (0, 0)
    assert p2.stats.latents_cached == 8 and p2.stats.prompts_cached == 3 and p2.stats.conditions_cached == 4
    assert [e.latent_keys for e in p2.examples] == [e.latent_keys for e in p1.examples]

    # One image changes (same name, new bytes): only its two latents are recomputed.
    _png(root / "target" / "2.png", np.full((R, R, 3), 7, np.uint8))
    enc3 = FakeEncoders()
    p3 = prepare_examples(read_manifest(root), store, enc3.encoders(), R, hflip=True)
    assert (enc3.image_calls, enc3.prompt_calls) == (2, 0)
    assert p3.stats.conditions_made == 1  # the condition's key includes its image (size rule)

    # Another VAE: every latent again; the text encoder's entries still hit.
    enc4 = FakeEncoders(vae_id="vae-b")
    prepare_examples(read_manifest(root), store, enc4.encoders(), R, hflip=True)
    assert (enc4.image_calls, enc4.prompt_calls) == (8, 0)
    # Another resolution: everything but the text.
    enc5 = FakeEncoders()
    prepare_examples(read_manifest(root), store, enc5.encoders(), R * 2, hflip=False)
    assert (enc5.image_calls, enc5.prompt_calls) == (4, 0)


def test_module_digest_changes_with_any_weight():
    torch.manual_seed(0)
    a = torch.nn.Conv2d(3, 4, 3)
    d0 = module_digest(a)
    assert module_digest(a) == d0
    with torch.no_grad():
        a.weight[0, 0, 0, 0] += 1e-6
    assert module_digest(a) != d0


def test_unreadable_files_are_skipped_and_other_sizes_resized_with_a_warning(tmp_path):
    root = _fill_layout(tmp_path / "d", n=3)
    (root / "target" / "1.png").write_bytes(b"not a png at all")
    _, big_condition = _pair(2, size=2 * R)  # condition twice the image's size
    _png(root / "source" / "2.png", big_condition)
    store = CacheStore(tmp_path / "cache")
    prep = prepare_examples(read_manifest(root), store, FakeEncoders().encoders(), R)
    assert [e.line for e in prep.examples] == [1, 3]
    assert len(prep.skipped) == 1 and prep.skipped[0].line == 2
    assert prep.resized == [f"line 3: {2 * R}x{2 * R} → {R}x{R}"]
    cond = store.load_condition(prep.examples[1].condition_key)
    assert cond.shape == (R, R, 3)


def test_annotator_conditions_are_made_from_the_resized_image_and_cached(tmp_path):
    root = _fill_layout(tmp_path / "d", n=2, size=2 * R)
    calls = []

    def annotate(image):
        calls.append(image.shape)
        return 255 - image

    store = CacheStore(tmp_path / "cache")
    enc = FakeEncoders().encoders(annotate, "invert-v1")
    prep = prepare_examples(read_manifest(root, need_conditions=False), store, enc, R)
    assert calls == [(R, R, 3), (R, R, 3)]
    prepare_examples(read_manifest(root, need_conditions=False), store, enc, R)
    assert len(calls) == 2  # cached
    image = np.asarray(Image.open(root / "target" / "0.png"))
    from controlnet.data.datasets import to_resolution

    assert np.array_equal(store.load_condition(prep.examples[0].condition_key), 255 - to_resolution(image, R))


# --------------------------------------------------------------------------- the sample stream


def test_stream_sharding_matches_one_process_with_the_global_batch():
    one = list(StreamBatches(4, first_position=8, count=3))
    r0 = list(StreamBatches(2, first_position=8, count=3, rank=0, world_size=2))
    r1 = list(StreamBatches(2, first_position=8, count=3, rank=1, world_size=2))
    assert one == [a + b for a, b in zip(r0, r1)] == [[8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    order = epoch_order(0, 3, 10)
    assert sorted(order.tolist()) == list(range(10)) and not torch.equal(order, epoch_order(0, 4, 10))


def test_empty_prompt_rate_over_many_samples():
    n = 20000
    rate = np.mean([sample_draws(7, p, 0.5, False, 1000).empty_prompt for p in range(n)])
    assert abs(rate - 0.5) < 0.015  # 4 standard deviations of a fair coin over 20000 draws
    assert not any(sample_draws(7, p, 0.0, False, 1000).empty_prompt for p in range(200))
    assert all(sample_draws(7, p, 1.0, False, 1000).empty_prompt for p in range(200))
    ts = [sample_draws(7, p, 0.5, False, 1000).timestep for p in range(n)]
    assert min(ts) == 0 and max(ts) == 999 and abs(np.mean(ts) - 499.5) < 10  # uniform timesteps
    assert sample_draws(7, 5, 0.5, True, 1000).timestep == sample_draws(7, 5, 0.5, False, 1000).timestep


def test_dataset_items_follow_the_draws_flip_together_and_use_the_empty_embedding(tmp_path):
    root = _fill_layout(tmp_path / "d", n=4)
    store = CacheStore(tmp_path / "cache")
    prep = prepare_examples(read_manifest(root), store, FakeEncoders().encoders(), R, hflip=True)
    ds = TrainDataset(prep.examples, store, seed=3, empty_prompt_prob=0.5, hflip=True, num_timesteps=1000,
                      scaling_factor=1.0, empty_text_key=prep.empty_text_key)
    seen_flip = seen_plain = seen_empty = 0
    for position in range(40):
        item = ds[position]
        draws = sample_draws(3, position, 0.5, True, 1000)
        ex = ds.example_at(position)
        cond = store.load_condition(ex.condition_key)
        expected_cond = cond[:, ::-1] if draws.flip else cond
        assert torch.equal(item["condition"], torch.from_numpy(expected_cond.copy()).permute(2, 0, 1).float() / 255)
        image = np.asarray(Image.open(ex.image).convert("RGB"))
        image = image[:, ::-1] if draws.flip else image
        mean = torch.nn.functional.avg_pool2d(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1, 4)[0]
        assert torch.allclose(item["latents"], mean, atol=1e-5)  # the latents of the same orientation
        want_len = 0 if draws.empty_prompt else len(ex.prompt)
        assert torch.all(item["hidden"] == want_len) and bool(item["empty"]) == draws.empty_prompt
        assert int(item["timesteps"]) == draws.timestep
        seen_flip += draws.flip
        seen_plain += not draws.flip
        seen_empty += draws.empty_prompt
    assert seen_flip and seen_plain and 0 < seen_empty < 40
    # Epochs visit every example once.
    assert sorted(ds.example_at(p).index for p in range(4, 8)) == [0, 1, 2, 3]


def test_annotator_identity_follows_its_output_not_only_its_name():
    """A changed annotator (same name and parameters, other output) gets another cache identity."""
    from controlnet.data.cache import behaviour_digest, bound_annotator, probe_image

    annotate, identity = bound_annotator("canny", {"low_threshold": 50})
    assert bound_annotator("canny", {"low_threshold": 50})[1] == identity  # deterministic
    assert bound_annotator("canny", {"low_threshold": 60})[1] != identity
    same, inverted = behaviour_digest(annotate), behaviour_digest(lambda image: 255 - annotate(image))
    assert same == behaviour_digest(annotate) and inverted != same
    probe = probe_image()
    assert probe.shape == (128, 128, 3) and probe.dtype == np.uint8 and annotate(probe).any()  # the probe has edges

    def broken(image):
        raise ValueError("needs a larger picture")

    assert behaviour_digest(broken) == "unprobed"
