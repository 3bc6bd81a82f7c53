"""Detectors from transformers checkpoints (``depth``, ``normal``, ``segmentation``, ``pose``): tiny randomly
initialised models of the real architectures, saved with ``save_pretrained``, load from a local folder and from a
prepared hub cache offline; our post-processing gives known answers with the networks mocked at their outputs;
bad weights and photos given to map-only annotators are refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.testing import ONEFORMER_TASK_WORDS, write_clip_vocabulary
from cli_checks import offline_hub, refused_in_one_line
from controlnet import annotators
from controlnet.annotators import transformers_detectors as hf
from controlnet.annotators.loader import clear_cache
from controlnet.annotators.palettes import ADE20K
from controlnet.cli import main
from controlnet.errors import UserError
from hubcache import add_to_hub_cache

H, W = 48, 64  # the test photo


def _registered() -> None:
    if "depth" not in annotators.REGISTRY or annotators.get("depth").fn is not hf.depth:
        hf.register_photo_detectors(lambda *a, **k: annotators.register(*a, replace=True, **k))


# --------------------------------------------------------------------------- tiny models of the real architectures


def build_tiny(name: str, folder: Path) -> Path:
    """A randomly initialised (seed 0) tiny model of the architecture behind ``name``, saved in ``folder`` with its
    processor in the layout of the hub repository."""
    import transformers as T

    torch.manual_seed(0)
    pil = "transformers.models.{0}.image_processing_pil_{0}"
    processor_module = lambda model: __import__(pil.format(model), fromlist=["x"])  # noqa: E731
    if name == "dpt_hybrid":  # ViT-hybrid: BiT backbone (no timm), input fixed at image_size like the real 384
        cfg = T.DPTConfig(
            image_size=32, patch_size=16, hidden_size=32, fusion_hidden_size=32, num_hidden_layers=4,
            backbone_out_indices=[0, 1, 2, 3], num_attention_heads=4, intermediate_size=37, is_hybrid=True,
            backbone_featmap_shape=[1, 32, 24, 24], neck_hidden_sizes=[16, 16, 32, 32],
            backbone_config={"global_padding": "same", "layer_type": "bottleneck", "depths": [1, 1, 1],
                             "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True,
                             "hidden_sizes": [16, 16, 32, 32], "num_groups": 2})
        model = T.DPTForDepthEstimation(cfg)
        processor = processor_module("dpt").DPTImageProcessorPil(size={"height": 32, "width": 32},
                                                                 keep_aspect_ratio=False, resample=2)
    elif name == "depth_anything_v2":
        cfg = T.DepthAnythingConfig(
            backbone_config=T.Dinov2Config(image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=4,
                                           num_attention_heads=2, intermediate_size=32, reshape_hidden_states=False,
                                           out_features=["stage1", "stage2", "stage3", "stage4"]),
            reassemble_hidden_size=16, neck_hidden_sizes=[8, 16, 16, 16], fusion_hidden_size=16, head_hidden_size=8,
            patch_size=14)
        model = T.DepthAnythingForDepthEstimation(cfg)
        processor = processor_module("dpt").DPTImageProcessorPil(
            size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    elif name == "zoedepth":
        backbone = T.BeitConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=4,
                                num_attention_heads=2, intermediate_size=32, use_relative_position_bias=True, reshape_hidden_states=False,
                                out_features=["stage1", "stage2", "stage3", "stage4"])
        cfg = T.ZoeDepthConfig(
            backbone_config=backbone, neck_hidden_sizes=[8, 16, 16, 16], fusion_hidden_size=16,
            reassemble_hidden_size=16, num_relative_features=8, bottleneck_features=16, num_attractors=[4, 4, 2, 2],
            # transformers' multi-head ZoeDepth runs 4 patch-transformer layers of 128 features whatever the config
            bin_embedding_dim=16, patch_size=16, num_patch_transformer_layers=4, patch_transformer_hidden_size=128,
            patch_transformer_intermediate_size=32, patch_transformer_num_attention_heads=2,
            bin_configurations=[{"n_bins": 8, "min_depth": 1e-3, "max_depth": 10.0, "name": "nyu"},
                                {"n_bins": 8, "min_depth": 1e-3, "max_depth": 80.0, "name": "kitti"}])  # NYU + KITTI
        model = T.ZoeDepthForDepthEstimation(cfg)
        processor = processor_module("zoedepth").ZoeDepthImageProcessorPil(
            size={"height": 32, "width": 32}, keep_aspect_ratio=True, ensure_multiple_of=16)
    elif name == "upernet":
        backbone = T.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                    out_features=["stage1", "stage2", "stage3", "stage4"])
        model = T.UperNetForSemanticSegmentation(T.UperNetConfig(
            backbone_config=backbone, hidden_size=16, auxiliary_in_channels=24, auxiliary_channels=8,
            num_labels=150))
        processor = processor_module("segformer").SegformerImageProcessorPil(size={"height": 32, "width": 32})
    elif name == "oneformer":
        return _build_oneformer(folder)
    elif name == "rtdetr":
        cfg = T.RTDetrConfig(
            backbone_config=T.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                                 layer_type="basic", out_features=["stage2", "stage3", "stage4"]),
            encoder_hidden_dim=16, encoder_in_channels=[16, 24, 32], feat_strides=[8, 16, 32], encoder_layers=1,
            encoder_ffn_dim=32, encoder_attention_heads=2, d_model=16, decoder_layers=1, decoder_ffn_dim=32,
            decoder_attention_heads=2, decoder_in_channels=[16, 16, 16], num_queries=10, num_feature_levels=3,
            decoder_n_points=2, num_labels=80, num_denoising=0, anchor_image_size=None,
            id2label={i: "person" if i == 0 else f"thing{i}" for i in range(80)})
        model = T.RTDetrForObjectDetection(cfg)
        with torch.no_grad():  # every query a confident person, so the pose test sees people
            for head in model.model.decoder.class_embed:
                head.bias[0] = 8.0
            model.model.enc_score_head.bias[0] = 8.0
        processor = processor_module("rt_detr").RTDetrImageProcessorPil(size={"height": 64, "width": 64})
    elif name == "vitpose":
        backbone = T.VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16], hidden_size=16,
                                           num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                           out_indices=[2])
        model = T.VitPoseForPoseEstimation(T.VitPoseConfig(backbone_config=backbone, use_simple_decoder=True,
                                                                 num_labels=17))
        processor = processor_module("vitpose").VitPoseImageProcessorPil(size={"height": 64, "width": 48})
    else:
        raise ValueError(name)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _build_oneformer(folder: Path) -> Path:
    """OneFormer in the hub repository's layout: OneFormerForUniversalSegmentation keys (``model.`` prefix; that
    class itself needs scipy to build), preprocessor_config.json naming its metadata file (which the detector
    must not download), and the CLIP tokenizer's vocab.json and merges.txt."""
    import transformers as T
    from safetensors.torch import save_file
    from transformers.models.oneformer.image_processing_pil_oneformer import OneFormerImageProcessorPil

    cfg = T.OneFormerConfig(
        text_encoder_vocab_size=27, hidden_size=32, num_queries=8, num_labels=150, encoder_feedforward_dim=32,
        dim_feedforward=64, encoder_layers=1, decoder_layers=2, hidden_dim=32, mask_dim=32, conv_dim=32,
        text_encoder_width=32, text_encoder_n_ctx=4, backbone=None,
        backbone_config=T.SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                     out_features=["stage1", "stage2", "stage3", "stage4"]))
    model = T.OneFormerModel(cfg)
    cfg.architectures = ["OneFormerForUniversalSegmentation"]
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    save_file({"model." + k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    processor = OneFormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128}, num_labels=150,
                                           do_reduce_labels=True, ignore_index=255).to_dict()
    processor.update(image_processor_type="OneFormerImageProcessor", class_info_file="ade20k_panoptic.json",
                     repo_path="shi-labs/oneformer_demo")
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    write_clip_vocabulary(folder, ONEFORMER_TASK_WORDS)
    return folder


TINY = ("dpt_hybrid", "depth_anything_v2", "zoedepth", "oneformer", "upernet", "rtdetr", "vitpose")
REPO = {**{m.name: m.repo_id for m in (*hf.DEPTH_MODELS.values(), *hf.SEGMENTATION_MODELS.values())},
        "rtdetr": hf.PERSON_DETECTOR.repo_id, "vitpose": hf.POSE_MODEL.repo_id}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: build_tiny(name, root / name) for name in TINY}


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=2) + rng.integers(0, 30, (H, W, 3))
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _annotate(args: list[str]) -> int:
    _registered()
    return main(["annotate", *args, "-q"])


# --------------------------------------------------------------------------- the tiny models, end to end


def _reference_depth(folder: Path, name: str, image: np.ndarray) -> np.ndarray:
    """transformers' own path for the prediction: the processor, the model, post_process_depth_estimation."""
    import transformers

    spec = hf.DEPTH_MODELS[name]
    model = getattr(transformers, spec.model_class).from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    with torch.no_grad():
        out = model(**processor(images=Image.fromarray(image), return_tensors="pt"))
    if name != "zoedepth":
        return processor.post_process_depth_estimation(out, target_sizes=[(H, W)])[0]["predicted_depth"].numpy()
    # ZoeDepth's PIL post-processing needs torchvision; its steps: bicubic to the padded size, padding cut off.
    ph, pw = int(np.sqrt(H / 2) * 3), int(np.sqrt(W / 2) * 3)
    up = torch.nn.functional.interpolate(out.predicted_depth[:, None], size=(H + 2 * ph, W + 2 * pw), mode="bicubic")
    return up[0, 0, ph : ph + H, pw : pw + W].numpy()


@pytest.mark.parametrize("name", list(hf.DEPTH_MODELS))
def test_depth_from_a_local_folder(name, tiny, photo, tmp_path):
    """``depth --model NAME --weights FOLDER``: the prediction mapped to 8 bits, near = bright: relative inverse
    depth min → 0, max → 255; ZoeDepth's metres inverted between percentiles 2 and 85 (rounded)."""
    out = tmp_path / "depth.png"
    assert _annotate(["depth", str(photo), str(out), "--model", name, "--weights", str(tiny[name])]) == 0
    d = _reference_depth(tiny[name], name, _rgb(photo)).astype(np.float64)
    if name == "zoedepth":
        lo, hi = np.percentile(d, [2, 85])
        t = 1.0 - np.clip((d - lo) / (hi - lo), 0, 1)
    else:
        t = (d - d.min()) / (d.max() - d.min())
    got = _rgb(out)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 0] == got[..., 2]).all()
    assert np.array_equal(got[..., 0], np.round(t * 255).astype(np.uint8))


def test_normal_from_a_photo_is_normal_map_of_the_predicted_depth(tiny, photo, tmp_path):
    """One step (``normal``) equals two (the predicted depth saved as .npy, then ``normal_map``)."""
    out, depth = tmp_path / "normal.png", tmp_path / "depth.npy"
    weights = str(tiny["depth_anything_v2"])
    assert _annotate(["normal", str(photo), str(out), "--model", "depth_anything_v2", "--weights", weights]) == 0
    np.save(depth, hf.predict_depth(_rgb(photo), "depth_anything_v2", weights))
    two_step = annotators.get("normal_map")(depth, near="large")
    assert np.array_equal(_rgb(out), two_step)


@pytest.mark.parametrize("name", list(hf.SEGMENTATION_MODELS))
def test_segmentation_from_a_local_folder(name, tiny, photo, tmp_path):
    """Our semantic map equals transformers' ``post_process_semantic_segmentation`` of the same outputs; every
    pixel is the ADE20K palette colour of its class."""
    import transformers

    out = tmp_path / "seg.png"
    assert _annotate(["segmentation", str(photo), str(out), "--model", name, "--weights", str(tiny[name])]) == 0
    net, processor = hf.load(hf.SEGMENTATION_MODELS[name], str(tiny[name]), "cpu")
    extra = {"task_inputs": ["semantic"]} if name == "oneformer" else {}
    with torch.no_grad():
        outputs = net(**processor(images=Image.fromarray(_rgb(photo)), return_tensors="pt", **extra))
    if name == "oneformer":
        outputs = SimpleNamespace(class_queries_logits=outputs.transformer_decoder_class_predictions,
                                  masks_queries_logits=outputs.transformer_decoder_mask_predictions)
        assert isinstance(processor, transformers.OneFormerProcessor)
    labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[(H, W)])[0].numpy()
    assert np.array_equal(_rgb(out), ADE20K[labels])


def test_pose_from_local_folders(tiny, photo, tmp_path):
    """Detector + ViTPose from folders: one skeleton per person box, written as OpenPose JSON that pose_json
    draws identically."""
    out, doc = tmp_path / "pose.png", tmp_path / "pose.json"
    args = ["pose", str(photo), str(out), "--weights", str(tiny["vitpose"]), "--detector_weights",
            str(tiny["rtdetr"]), "--keypoint_threshold", "0", "--json", str(doc)]
    assert _annotate(args) == 0
    people = json.loads(doc.read_text())["people"]
    assert len(people) == len(hf.person_boxes(_rgb(photo), str(tiny["rtdetr"]))) > 0
    assert all(len(p["pose_keypoints_2d"]) == 54 for p in people)
    assert np.array_equal(_rgb(out), annotators.get("pose_json")(str(photo), keypoints=str(doc)))


def test_hub_ids_resolve_from_a_prepared_cache_offline(tiny, photo, tmp_path, monkeypatch, capsys):
    """Default weights (and ``--weights org/name``) come from the hub cache, offline; ``--list`` reports them."""
    cache = tmp_path / "hub"
    for name, folder in tiny.items():
        add_to_hub_cache(cache, REPO[name], {f.name: f for f in folder.iterdir()})
    offline_hub(monkeypatch, cache)
    clear_cache()
    for args in (["depth"], ["depth", "--model", "depth_anything_v2", "--weights", REPO["depth_anything_v2"]],
                 ["segmentation"], ["segmentation", "--model", "upernet"], ["pose"]):
        out = tmp_path / f"{'-'.join(args)}.png"
        assert _annotate([args[0], str(photo), str(out), *args[1:]]) == 0, args
        local = {"depth": ["--weights", str(tiny["dpt_hybrid"])], "segmentation": ["--weights", str(tiny["oneformer"])],
                 "pose": ["--weights", str(tiny["vitpose"]), "--detector_weights", str(tiny["rtdetr"])]}
        if len(args) == 1:  # the same picture as from the local folder
            again = tmp_path / "local.png"
            assert _annotate([args[0], str(photo), str(again), *local[args[0]]]) == 0
            assert np.array_equal(_rgb(out), _rgb(again))
    capsys.readouterr()
    assert main(["annotate", "--list", "pose"]) == 0
    listing = capsys.readouterr().out
    assert f"weights cached ({hf.POSE_MODEL.repo_id}, {hf.PERSON_DETECTOR.repo_id})" in listing


def test_models_are_loaded_once_per_process(tiny):
    a = hf.load(hf.DEPTH_MODELS["depth_anything_v2"], str(tiny["depth_anything_v2"]), "cpu")
    assert hf.load(hf.DEPTH_MODELS["depth_anything_v2"], str(tiny["depth_anything_v2"]), "cpu") is a


# --------------------------------------------------------------------------- known answers, networks mocked


class FakeNet:
    """A model whose forward returns fixed outputs (the network boundary); device and config like a model's."""

    def __init__(self, outputs: SimpleNamespace, **config):
        self.outputs, self.config = outputs, SimpleNamespace(**config)
        self.calls = []

    def parameters(self):
        yield torch.zeros(1)

    def __call__(self, **inputs):
        self.calls.append(inputs)
        return self.outputs


def _with_fake(monkeypatch, tiny, name: str, fake: FakeNet) -> None:
    spec = {**hf.DEPTH_MODELS, **hf.SEGMENTATION_MODELS, "rtdetr": hf.PERSON_DETECTOR, "vitpose": hf.POSE_MODEL}[name]
    _, processor = hf.load(spec, str(tiny[name]), "cpu")
    real_load = hf.load
    monkeypatch.setattr(hf, "load", lambda s, *a, **k: (fake, processor) if s is spec else real_load(s, *a, **k))


@pytest.mark.parametrize("name", ["dpt_hybrid", "depth_anything_v2"])
def test_depth_mapping_known_answer(name, tiny, monkeypatch):
    """A prediction (at the photo's size) of 0..3071 in raster order: near = large, so value v → round(v / 3071 *
    255), exactly."""
    values = torch.arange(H * W, dtype=torch.float32).reshape(1, H, W)
    _with_fake(monkeypatch, tiny, name, FakeNet(SimpleNamespace(predicted_depth=values)))
    out = hf.depth(np.zeros((H, W, 3), np.uint8), model=name, weights=str(tiny[name]))
    want = np.round(np.arange(H * W).reshape(H, W) / (H * W - 1) * 255).astype(np.uint8)
    assert np.array_equal(out[..., 0], want) and np.array_equal(out[..., 2], want)


def test_metric_depth_mapping_known_answer():
    """ZoeDepth metres: percentile 2 → 255 (near), percentile 85 → 0, linear and clipped in between."""
    metres = np.linspace(1.0, 101.0, 101).reshape(1, 101)
    out = hf.depth_condition(metres, "zoedepth")[0, :, 0]
    lo, hi = np.percentile(metres, [2, 85])  # 3 and 86
    assert (lo, hi) == (3.0, 86.0)
    want = np.round((1 - np.clip((metres[0] - lo) / (hi - lo), 0, 1)) * 255)
    assert np.array_equal(out, want.astype(np.uint8)) and out[2] == 255 and out[85] == 0


def test_segmentation_known_answer_upernet(tiny, monkeypatch):
    """Logits whose argmax is class (x // 4 + 13 * (y // 4)) % 150 at the photo's size → exactly those ADE20K
    colours."""
    yy, xx = np.mgrid[0:H, 0:W]
    labels = (xx // 4 + 13 * (yy // 4)) % 150
    logits = torch.zeros(1, 150, H, W)
    logits[0, torch.from_numpy(labels), torch.from_numpy(yy), torch.from_numpy(xx)] = 5.0
    _with_fake(monkeypatch, tiny, "upernet", FakeNet(SimpleNamespace(logits=logits), num_labels=150))
    out = hf.segmentation(np.zeros((H, W, 3), np.uint8), model="upernet", weights=str(tiny["upernet"]))
    assert np.array_equal(out, ADE20K[labels])


def test_segmentation_known_answer_oneformer(tiny, monkeypatch):
    """Three queries: "wall" (0) on the left third, "sky" (2) above the rest, "grass" (9) below it; a fourth query
    predicts "no object". The semantic map is exactly those classes in their ADE20K colours; the task token is
    the tokenized "the task is semantic"."""
    q_classes = torch.full((1, 4, 151), -10.0)
    for q, c in enumerate((0, 2, 9, 150)):
        q_classes[0, q, c] = 10.0
    masks = torch.full((1, 4, H, W), -10.0)
    masks[0, 0, :, : W // 3] = 10.0
    masks[0, 1, : H // 2, W // 3 :] = 10.0
    masks[0, 2, H // 2 :, W // 3 :] = 10.0
    masks[0, 3] = 10.0  # "no object" everywhere: ignored
    fake = FakeNet(SimpleNamespace(transformer_decoder_class_predictions=q_classes,
                                   transformer_decoder_mask_predictions=masks), num_labels=150)
    _with_fake(monkeypatch, tiny, "oneformer", fake)
    out = hf.segmentation(np.zeros((H, W, 3), np.uint8), model="oneformer", weights=str(tiny["oneformer"]))
    want = np.full((H, W), 9)
    want[: H // 2] = 2
    want[:, : W // 3] = 0
    assert np.array_equal(out, ADE20K[want])
    assert fake.calls[0]["task_inputs"][0, :6].tolist() == [0, 6, 12, 15, 26, 1]  # <start> the task is semantic <end>


def test_person_crop_follows_udp():
    """The crop's corner pixels sit on the grown box's edges: on a horizontal ramp I(x, y) = x the crop's column
    u holds centre_x - size_x / 2 + u * size_x / (width - 1)."""
    ramp = np.tile(np.arange(200, dtype=np.float32), (120, 1))[..., None].repeat(3, axis=2)
    center, size = hf.box_center_size(np.array([40.0, 20.0, 100.0, 100.0]), 48 / 64)
    assert np.allclose(center, [70, 60]) and np.allclose(size, [75, 100])  # 60 x 80 grown to 3:4, x 1.25
    crop = hf.crop_person(ramp, center, size, 48, 64)
    want = center[0] - size[0] / 2 + np.arange(48) * size[0] / 47
    assert np.abs(crop[32, :, 0] - want).max() < 0.05  # OpenCV's 1/32 px sub-pixel steps


def test_pose_known_answer(tiny, monkeypatch):
    """Boxes from the detector mocked, ViTPose heatmaps mocked with a Gaussian peak per keypoint at heatmap pixel
    (u, v): keypoint = box crop origin + (u, v) * size / (heatmap size - 1) (DARK leaves a symmetric peak where
    it is);
    COCO-17 → COCO-18 with the neck at the shoulders' midpoint; a low-score keypoint is left out."""
    boxes = np.array([[10.0, 5.0, 40.0, 45.0], [30.0, 2.0, 60.0, 42.0]])  # xyxy
    hm_h, hm_w = 16, 12
    # Peaks 4 px or more from the heatmap's edges, where DARK's smoothing sees the Gaussian as symmetric.
    peaks = [[(4 + k % 4, 4 + k % 8) for k in range(17)], [(7 - k % 4, 11 - k % 8) for k in range(17)]]
    heat = np.zeros((2, 17, hm_h, hm_w), np.float32)
    yy, xx = np.mgrid[0:hm_h, 0:hm_w]
    for n in range(2):
        for k, (u, v) in enumerate(peaks[n]):
            heat[n, k] = 0.9 * np.exp(-((xx - u) ** 2 + (yy - v) ** 2) / (2 * 1.5**2))
    heat[1, 3] *= 0.1  # left ear of person 2: score 0.09 < 0.3
    _with_fake(monkeypatch, tiny, "vitpose", FakeNet(SimpleNamespace(heatmaps=torch.from_numpy(heat)), num_labels=17,
                                                     backbone_config=SimpleNamespace(num_experts=1)))
    monkeypatch.setattr(hf, "person_boxes", lambda image, weights, threshold, device: boxes)
    doc = tiny["vitpose"].parent / "pose-known.json"
    hf.pose(np.zeros((H, W, 3), np.uint8), weights=str(tiny["vitpose"]), json=str(doc))
    people = [np.array(p["pose_keypoints_2d"]).reshape(18, 3) for p in json.loads(doc.read_text())["people"]]
    for n, body in enumerate(people):
        center, size = hf.box_center_size(boxes[n], 48 / 64)
        origin, step = center - size / 2, size / [hm_w - 1, hm_h - 1]
        coco = np.array([[*(origin + np.array(p) * step), 0.9] for p in peaks[n]])
        if n == 1:
            coco[3] = 0
        for k18, k17 in enumerate(hf.COCO17_OF):
            want = 0.5 * (coco[5] + coco[6]) if k17 is None else coco[k17]
            np.testing.assert_allclose(body[k18], want, atol=2e-3)  # JSON keeps 3 decimals
    assert len(people) == 2 and people[1][17].tolist() == [0, 0, 0]  # left ear (COCO-17 3) is OpenPose 17


def test_dark_recovers_a_sub_pixel_peak():
    """DARK's Newton step on the log of the smoothed heatmap finds a Gaussian's off-grid centre from its argmax
    (a Gaussian stays Gaussian under the smoothing, so its log is exactly quadratic)."""
    yy, xx = np.mgrid[0:16, 0:12]
    heat = np.exp(-((xx - 5.3) ** 2 + (yy - 7.6) ** 2) / (2 * 1.5**2)).astype(np.float32)[None, None]
    np.testing.assert_allclose(hf.dark_refine(np.array([[[5, 8]]]), heat), [[[5.3, 7.6]]], atol=1e-4)


def test_coco17_to_openpose18():
    kp = np.array([[10 * k, 100 + k, 0.5 + k / 100] for k in range(17)], dtype=float)
    out = hf.coco17_to_openpose18(kp)
    assert out[0].tolist() == kp[0].tolist() and out[2].tolist() == kp[6].tolist() and out[5].tolist() == kp[5].tolist()
    assert out[14].tolist() == kp[2].tolist() and out[17].tolist() == kp[3].tolist()
    np.testing.assert_allclose(out[1], [55, 105.5, 0.55])  # shoulders 5 (50, 105, .55) and 6 (60, 106, .56)
    kp[6, 2] = 0.1  # right shoulder below the threshold: no right shoulder, no neck
    out = hf.coco17_to_openpose18(kp)
    assert out[1].tolist() == [0, 0, 0] and out[2].tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- bad inputs: one line, nothing written


def _bad(args: list[str], capsys, out: Path) -> str:
    return refused_in_one_line(_annotate(args), capsys, out)


def test_missing_weights_offline(photo, tmp_path, monkeypatch, capsys):
    offline_hub(monkeypatch, tmp_path / "empty")
    out = tmp_path / "out.png"
    err = _bad(["depth", str(photo), str(out)], capsys, out)
    assert "Intel/dpt-hybrid-midas" in err and "`hf download Intel/dpt-hybrid-midas`" in err
    err = _bad(["pose", str(photo), str(out)], capsys, out)
    assert "`hf download PekingU/rtdetr_r50vd_coco_o365`" in err


def test_wrong_folder_file_and_corrupt_weights_are_refused(tiny, photo, tmp_path, capsys):
    out = tmp_path / "out.png"
    err = _bad(["depth", str(photo), str(out), "--model", "zoedepth", "--weights", str(tiny["depth_anything_v2"])],
               capsys, out)
    assert "holds a 'depth_anything' model, not ZoeDepth" in err and "use model=depth_anything_v2" in err
    err = _bad(["segmentation", str(photo), str(out), "--weights", str(tiny["vitpose"])], capsys, out)
    assert "'vitpose' model, not OneFormer" in err
    (tmp_path / "empty").mkdir()
    err = _bad(["depth", str(photo), str(out), "--weights", str(tmp_path / "empty")], capsys, out)
    assert "not a transformers model folder" in err
    err = _bad(["depth", str(photo), str(out), "--weights", str(tiny["dpt_hybrid"] / "config.json")], capsys, out)
    assert "is a file" in err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny["depth_anything_v2"], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    err = _bad(["depth", str(photo), str(out), "--model", "depth_anything_v2", "--weights", str(corrupt)], capsys, out)
    assert "cannot load the Depth Anything V2 Small checkpoint" in err
    partial = tmp_path / "partial"
    shutil.copytree(tiny["depth_anything_v2"], partial)
    from safetensors.torch import load_file, save_file

    state = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "head" not in k}, str(partial / "model.safetensors"),
              metadata={"format": "pt"})
    err = _bad(["depth", str(photo), str(out), "--model", "depth_anything_v2", "--weights", str(partial)], capsys, out)
    assert "not a complete Depth Anything V2 Small checkpoint" in err


def test_photos_are_refused_by_map_only_annotators(photo, tmp_path):
    """A colour photo is not a depth or label map: refused, naming the detector; grey maps stored as RGB (also
    through JPEG) are still read."""
    with pytest.raises(UserError, match=r"colour photo.*`depth` annotator") as err:
        annotators.get("depth_map")(photo)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"colour photo.*`depth` annotator"):
        annotators.get("normal_map")(photo)
    with pytest.raises(UserError, match=r"colour photo.*`segmentation` annotator"):
        annotators.get("segmentation_map")(photo)
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(tmp_path / "grey.jpg", quality=75)
    assert annotators.get("depth_map")(tmp_path / "grey.jpg").shape == (32, 64, 3)
    assert annotators.get("segmentation_map")(np.repeat(grey[..., None], 3, axis=2)).shape == (32, 64, 3)
    with pytest.raises(UserError, match="openpose or pose annotator"):
        annotators.get("pose_json")(photo)


def test_one_model_cache_for_released_networks_and_transformers_checkpoints(tiny, tmp_path):
    """Both kinds of detector keep one model per weights and device in one cache; one clear_cache empties it."""
    from controlnet.annotators.networks import load_network
    from fixture_weights import write_released_weights

    hed_file = write_released_weights("hed", tmp_path)
    spec, folder = hf.DEPTH_MODELS["depth_anything_v2"], str(tiny["depth_anything_v2"])
    depth, hed = hf.load(spec, folder, "cpu"), load_network("hed", hed_file)
    assert hf.load(spec, folder, "cpu") is depth and load_network("hed", hed_file) is hed
    clear_cache()
    assert hf.load(spec, folder, "cpu")[0] is not depth[0] and load_network("hed", hed_file) is not hed
