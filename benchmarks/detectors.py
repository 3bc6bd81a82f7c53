"""Time per 512x512 image of each neural detector on this CPU, with random weights (the time does not depend on
the weights' values).

    .venv/bin/python -m benchmarks.detectors                       # every detector, 3 timed calls each
    .venv/bin/python -m benchmarks.detectors hed mlsd --threads 1  # some detectors, one core
    .venv/bin/python -m benchmarks.detectors --json out.json
    .venv/bin/python -m benchmarks.detectors hed --batch-size 4    # also: 4 images per forward (folder mode)
    .venv/bin/python -m benchmarks.detectors --reference /tmp/cnaux  # our networks against controlnet_aux's

Each detector is called as ``controlnet annotate`` calls it (``annotators.get(name)(image, weights=FILE)``) on a
512x512 RGB picture at the default detect resolution (512): resize, network forward, post-processing. The first
call loads the weights file (a random state dict saved in the released file's layout) and is not timed; the
fastest and the median of the timed calls are reported, with the network forward alone for comparison.

With ``--batch-size N`` the detectors that have a batch form (``controlnet annotate`` folder mode) are also timed
on N pictures per call, per picture. With ``--reference DIR`` (a folder holding the ``controlnet_aux`` package, e.g.
``pip install --no-deps --target DIR controlnet_aux``; it is never imported as a package nor installed) the script
instead compares the HED and OpenPose body and hand networks with the reference implementations (see
:func:`reference_networks`): the same random weights in the released layouts, the outputs' largest difference,
and interleaved forward times on one ``--size`` input (median, and ours / reference).

Detectors register here in :data:`CASES`: ``name -> prepare(folder) -> (annotator keyword arguments, network)``,
where ``prepare`` writes the weights file into ``folder``. Other detectors (OpenPose, ...) add their entry the same
way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

SIZE = 512


def _released(name: str, folder: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    """A random network ``name`` of :data:`controlnet.annotators.networks.NETWORKS`, saved as its released file."""
    from controlnet.annotators.networks import NETWORKS

    spec = NETWORKS[name]
    torch.manual_seed(0)
    model = spec.build().eval()
    state = model.state_dict()
    if name == "pidinet":  # table5_pidinet.pth: {'epoch', 'state_dict'} with DataParallel's 'module.' prefix
        state = {"epoch": 0, "state_dict": {"module." + k: v for k, v in state.items()}}
    path = folder / (spec.filename or f"{name}.pth")
    torch.save(state, path)
    return {"weights": str(path)}, model


def _network_case(name: str, **kwargs: Any) -> Callable[[Path], tuple[dict[str, Any], torch.nn.Module]]:
    def prepare(folder: Path) -> tuple[dict[str, Any], torch.nn.Module]:
        params, model = _released(name, folder)
        return {**params, **kwargs}, model

    return prepare


# annotator name -> prepare(folder) -> (annotator keyword arguments, the network, for the forward-only time)
CASES: dict[str, Callable[[Path], tuple[dict[str, Any], torch.nn.Module]]] = {
    "hed": _network_case("hed"),
    "pidinet": _network_case("pidinet"),
    "lineart": _network_case("lineart"),
    "lineart_coarse": _network_case("lineart_coarse"),
    "mlsd": _network_case("mlsd"),
    "mlsd_tiny": _network_case("mlsd_tiny", model="tiny"),
}
# Input channels and scale of each network's forward (for the forward-only time).
_INPUT_CHANNELS = {"mlsd": 4, "mlsd_tiny": 4}


class _Forward(torch.nn.Module):
    """Networks run on fixed inputs, whatever ``x`` the timing loop passes: the forward-only time of detectors
    whose networks do not see the picture itself (OpenPose's 184 px body input, a hand crop; the pixels a
    transformers processor prepares). ``runs`` is a list of ``(network, positional args, keyword args)``."""

    def __init__(self, runs: list[tuple[Any, tuple, dict[str, Any]]]) -> None:
        super().__init__()
        self.runs = runs

    def forward(self, x: torch.Tensor) -> list[Any]:
        return [net(*args, **kwargs) for net, args, kwargs in self.runs]


def _openpose_case(hands: bool) -> Callable[[Path], tuple[dict[str, Any], torch.nn.Module]]:
    """Random OpenPose nets saved in the released flat-key layout. Forward: the body net on the 184 px input a
    512 px picture becomes (0.5 x 368); with hands, one hand crop at the four scales (184..736 px) instead; the
    annotate time with hands grows with the number of hands found, which random weights make arbitrary."""
    from controlnet.annotators.networks.openpose import HAND_SCALES, BodyPoseNet, HandPoseNet, released_key

    def prepare(folder: Path) -> tuple[dict[str, Any], torch.nn.Module]:
        torch.manual_seed(0)
        nets = {"body_pose_model.pth": BodyPoseNet().eval(), "hand_pose_model.pth": HandPoseNet().eval()}
        for filename, net in nets.items():
            torch.save({released_key(k): v for k, v in net.state_dict().items()}, folder / filename)
        params = {"weights": str(folder / "body_pose_model.pth")}
        if not hands:
            return params, _Forward([(nets["body_pose_model.pth"], (torch.rand(1, 3, 184, 184),), {})])
        sides = [int(s * 368) // 8 * 8 for s in HAND_SCALES]
        runs = [(nets["hand_pose_model.pth"], (torch.rand(1, 3, n, n),), {}) for n in sides]
        return {**params, "hand_weights": str(folder / "hand_pose_model.pth")}, _Forward(runs)

    return prepare


def _hf_model(kind: str) -> tuple[Any, Any]:
    """A randomly initialised transformers model of the real checkpoint's architecture, with its processor as the
    hub repository configures it (annotators.transformers_detectors lists the repositories)."""
    import transformers as T
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil as DPT

    torch.manual_seed(0)
    if kind == "dpt_hybrid":  # Intel/dpt-hybrid-midas: ViT-B/16 on a BiT-R50 (3, 4, 9) stem, 384 x 384
        bit = {"layer_type": "bottleneck", "depths": [3, 4, 9], "out_features": ["stage1", "stage2", "stage3"],
               "global_padding": "SAME", "embedding_dynamic_padding": True, "hidden_sizes": [256, 512, 1024, 2048]}
        config = T.DPTConfig(is_hybrid=True, backbone_config=bit, backbone_out_indices=[2, 5, 8, 11],
                             neck_hidden_sizes=[256, 512, 768, 768], reassemble_factors=[1, 1, 1, 0.5],
                             backbone_featmap_shape=[1, 1024, 24, 24], neck_ignore_stages=[0, 1])
        return T.DPTForDepthEstimation(config), DPT(size={"height": 384, "width": 384}, keep_aspect_ratio=False)
    if kind == "depth_anything_v2":  # Small: DINOv2 ViT-S/14, 518 px short side
        return T.DepthAnythingForDepthEstimation(T.DepthAnythingConfig()), DPT(
            size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    if kind == "zoedepth":  # BEiT-L/16 at 384 x 512, two bin heads (NYU, KITTI)
        from transformers.models.zoedepth.image_processing_pil_zoedepth import ZoeDepthImageProcessorPil

        bins = [{"n_bins": 64, "min_depth": 1e-3, "max_depth": 10.0, "name": "nyu"},
                {"n_bins": 64, "min_depth": 1e-3, "max_depth": 80.0, "name": "kitti"}]
        config = T.ZoeDepthConfig(bin_configurations=bins, num_patch_transformer_layers=4,
                                  patch_transformer_hidden_size=128, patch_transformer_intermediate_size=1024,
                                  patch_transformer_num_attention_heads=4)
        return T.ZoeDepthForDepthEstimation(config), ZoeDepthImageProcessorPil(
            size={"height": 384, "width": 512}, keep_aspect_ratio=True, ensure_multiple_of=32)
    if kind == "upernet":  # ConvNeXt-S, 512 x 512
        from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

        backbone = T.ConvNextConfig(depths=[3, 3, 27, 3], hidden_sizes=[96, 192, 384, 768],
                                    out_features=["stage1", "stage2", "stage3", "stage4"])
        return (T.UperNetForSemanticSegmentation(T.UperNetConfig(backbone_config=backbone, num_labels=150)),
                SegformerImageProcessorPil(size={"height": 512, "width": 512}))
    raise ValueError(kind)


def _hf_case(annotator_model: str, kind: str) -> Callable[[Path], tuple[dict[str, Any], torch.nn.Module]]:
    def prepare(folder: Path) -> tuple[dict[str, Any], torch.nn.Module]:
        from PIL import Image

        from controlnet.hub import quiet_loading

        model, processor = _hf_model(kind)
        with quiet_loading():
            model.eval().save_pretrained(folder)
        processor.save_pretrained(folder)
        inputs = dict(processor(images=Image.fromarray(picture()), return_tensors="pt"))
        return {"model": annotator_model, "weights": str(folder)}, _Forward([(model, (), inputs)])

    return prepare


def _oneformer_case(folder: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    """OneFormer Swin-T (transformers' default OneFormerConfig), 512 px short side, with a CLIP tokenizer spelling
    the task prompt (the real one has CLIP's 49k-token vocabulary; the task token is a fixed 77-token input)."""
    import transformers as T
    from PIL import Image
    from transformers.models.oneformer.image_processing_pil_oneformer import OneFormerImageProcessorPil

    from controlnet.testing import ONEFORMER_TASK_WORDS, write_clip_vocabulary

    torch.manual_seed(0)
    model = T.OneFormerModel(T.OneFormerConfig(num_labels=150)).eval()
    model.save_pretrained(folder)
    write_clip_vocabulary(folder, ONEFORMER_TASK_WORDS)
    tokenizer = T.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    image_processor = OneFormerImageProcessorPil(size={"shortest_edge": 512, "longest_edge": 2048}, num_labels=150)
    processor = T.OneFormerProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(folder)
    inputs = dict(processor(images=Image.fromarray(picture()), task_inputs=["semantic"], return_tensors="pt"))
    return {"model": "oneformer", "weights": str(folder)}, _Forward([(model, (), inputs)])


def _pose_case(folder: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    """RT-DETR R50 (640 x 640) + ViTPose-B (256 x 192 per person). Forward: the detector on the picture and
    ViTPose on one person crop; the annotate time grows with the number of people found."""
    import transformers as T
    from PIL import Image
    from transformers.models.rt_detr.image_processing_pil_rt_detr import RTDetrImageProcessorPil
    from transformers.models.vitpose.image_processing_pil_vitpose import VitPoseImageProcessorPil

    torch.manual_seed(0)
    labels = {i: "person" if i == 0 else f"class{i}" for i in range(80)}
    detector = T.RTDetrForObjectDetection(T.RTDetrConfig(num_labels=80, id2label=labels)).eval()
    vitpose = T.VitPoseForPoseEstimation(T.VitPoseConfig(num_labels=17)).eval()
    detector_processor = RTDetrImageProcessorPil(size={"height": 640, "width": 640})
    for sub, model, processor in (("detector", detector, detector_processor),
                                  ("vitpose", vitpose, VitPoseImageProcessorPil(size={"height": 256, "width": 192}))):
        model.save_pretrained(folder / sub)
        processor.save_pretrained(folder / sub)
    inputs = dict(detector_processor(images=Image.fromarray(picture()), return_tensors="pt"))
    runs = [(detector, (), inputs), (vitpose, (), {"pixel_values": torch.rand(1, 3, 256, 192)})]
    return {"weights": str(folder / "vitpose"), "detector_weights": str(folder / "detector")}, _Forward(runs)


CASES.update({
    "openpose": _openpose_case(hands=False),
    "openpose_hand": _openpose_case(hands=True),
    "depth": _hf_case("dpt_hybrid", "dpt_hybrid"),
    "depth_anything_v2": _hf_case("depth_anything_v2", "depth_anything_v2"),
    "zoedepth": _hf_case("zoedepth", "zoedepth"),
    "normal": _hf_case("dpt_hybrid", "dpt_hybrid"),
    "segmentation": _oneformer_case,
    "segmentation_upernet": _hf_case("upernet", "upernet"),
    "pose": _pose_case,
})
# The annotator a case runs, where the case is named after a model rather than an annotator.
ANNOTATOR_OF = {"mlsd_tiny": "mlsd", "depth_anything_v2": "depth", "zoedepth": "depth",
                "segmentation_upernet": "segmentation"}


def picture(size: int = SIZE) -> np.ndarray:
    """A ``size`` x ``size`` RGB test picture: smooth shading, rectangles, a disc and lines."""
    import cv2

    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:size, 0:size] / size
    image = np.stack([120 + 80 * xs, 100 + 60 * ys, 160 - 50 * xs * ys], axis=2)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    cv2.rectangle(image, (size // 8, size // 6), (size // 2, size // 2), (30, 40, 150), -1)
    cv2.circle(image, (3 * size // 4, size // 3), size // 8, (230, 220, 90), -1)
    for k in range(5):
        cv2.line(image, (k * size // 6, size - 1), (size // 2 + k * size // 10, size // 2), (20, 20, 20), 3)
    return image


def _times(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def time_detector(name: str, repeats: int = 3, size: int = SIZE, batch_size: int = 1) -> dict[str, Any]:
    """One row: the detector's time per ``size`` x ``size`` image (whole annotator, and network forward alone);
    with ``batch_size`` > 1 and a batch form, also per image of ``batch_size`` annotated in one call, in rounds
    alternating with the one-image calls (``batch_over_single``: the median of the rounds' ratios)."""
    from benchmarks.run import paired_times

    from controlnet import annotators

    image = picture(size)
    annotator = annotators.get(ANNOTATOR_OF.get(name, name))
    batched = batch_size > 1 and annotator.batch is not None
    with tempfile.TemporaryDirectory() as tmp:
        params, model = CASES[name](Path(tmp))
        annotator(image, **params)  # loads and caches the network
        if batched:
            batch = [image] * batch_size
            annotator.call_batch(batch, **params)
            calls, batch_calls = paired_times(lambda: annotator(image, **params),
                                              lambda: annotator.call_batch(batch, **params), repeats,
                                              torch.device("cpu"))
            batch_calls = [t / batch_size for t in batch_calls]
        else:
            calls = _times(lambda: annotator(image, **params), repeats)
    x = torch.rand(1, _INPUT_CHANNELS.get(name, 3), size, size)
    with torch.inference_mode():
        model(x)
        forwards = _times(lambda: model(x), repeats)
    row = {
        "detector": name, "size": size, "threads": torch.get_num_threads(), "repeats": repeats,
        "annotate_s": min(calls), "annotate_median_s": statistics.median(calls),
        "forward_s": min(forwards), "forward_median_s": statistics.median(forwards),
    }
    if batched:
        row.update(batch_size=batch_size, batch_annotate_s=min(batch_calls),
                   batch_annotate_median_s=statistics.median(batch_calls),
                   batch_over_single=statistics.median(b / c for b, c in zip(batch_calls, calls)))
    return row


# --- against the reference implementation ----------------------------------------------------------------------

# The network definitions of controlnet_aux (identical to ControlNet-v1-1-nightly annotator/hed/__init__.py and
# annotator/openpose/model.py): (our network, file under DIR/controlnet_aux, reference class).
REFERENCES = {
    "hed": ("hed", "hed/__init__.py", "ControlNetHED_Apache2"),
    "openpose_body": ("openpose_body", "open_pose/model.py", "bodypose_model"),
    "openpose_hand": ("openpose_hand", "open_pose/model.py", "handpose_model"),
}
# What hed/__init__.py imports beside the network (its detector's pre- and post-processing): empty stand-ins.
_REFERENCE_STUBS = {"einops": ("rearrange",), "util": ("HWC3", "nms", "resize_image", "safe_step")}
_REFERENCE_PACKAGE = "_controlnet_aux_reference"  # the name the loaded files get; never "controlnet_aux"


def _stub(name: str, attributes: tuple[str, ...]) -> Any:
    import types

    module = types.ModuleType(name)
    for attribute in attributes:
        setattr(module, attribute, None)
    return module


def reference_class(folder: Path, file: str, cls: str) -> type:
    """Class ``cls`` of ``folder/controlnet_aux/file``, loaded by path with importlib: the package's
    ``__init__`` (which imports timm, torchvision, ...) is not run, and the few other imports of the file are empty
    stand-ins while it loads (``sys.modules`` is restored afterwards)."""
    import importlib.util
    from unittest import mock

    root = folder / "controlnet_aux"
    path = root / file
    if not path.is_file():
        raise SystemExit(f"--reference {folder}: no {path}; `pip install --no-deps --target {folder} controlnet_aux`")
    package = _stub(_REFERENCE_PACKAGE, ())
    package.__path__ = [str(root)]
    stubs = {_REFERENCE_PACKAGE: package, f"{_REFERENCE_PACKAGE}.util": _stub("util", _REFERENCE_STUBS["util"])}
    if importlib.util.find_spec("einops") is None:
        stubs["einops"] = _stub("einops", _REFERENCE_STUBS["einops"])
    name = f"{_REFERENCE_PACKAGE}.{Path(file).parent.name}"
    is_package = path.name == "__init__.py"
    spec = importlib.util.spec_from_file_location(name, path,
                                                  submodule_search_locations=[str(path.parent)] if is_package else None)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(sys.modules, {**stubs, name: module}):
        spec.loader.exec_module(module)
    return getattr(module, cls)


def reference_networks(folder: Path, name: str, weights_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, reference) for ``name`` of :data:`REFERENCES`, both in eval mode with one random state dict saved
    in the released file's layout: ours through :func:`controlnet.annotators.networks.load_network`, the reference
    as its detector loads it (HED: ``load_state_dict(torch.load(file))``; OpenPose: ``util.transfer``, the
    released key without the model's first component)."""
    from controlnet.annotators.networks import NETWORKS, load_network
    from controlnet.annotators.networks.openpose import released_key

    network, file, cls = REFERENCES[name]
    spec = NETWORKS[network]
    torch.manual_seed(0)
    state = spec.build().state_dict()
    released = {released_key(k): v for k, v in state.items()} if network.startswith("openpose") else state
    path = weights_dir / str(spec.filename)
    torch.save(released, path)
    reference = reference_class(folder, file, cls)()
    loaded = torch.load(path, weights_only=True)
    if network.startswith("openpose"):
        loaded = {k: loaded[released_key(k)] for k in reference.state_dict()}
    reference.load_state_dict(loaded)
    return load_network(network, path), reference.float().eval()


def _reference_input(name: str, size: int) -> torch.Tensor:
    """The ``(1, 3, size, size)`` input each detector builds: HED a channels-last view of RGB 0..255 (einops
    ``h w c -> 1 c h w``), OpenPose a contiguous BGR / 256 - 0.5."""
    image = picture(size)
    if name == "hed":
        return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)
    bgr = np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))
    return torch.from_numpy(bgr).float().unsqueeze(0) / 256 - 0.5


def compare_reference(folder: Path, name: str, repeats: int = 7, size: int = SIZE) -> dict[str, Any]:
    """One row: ours against the reference network ``name`` on one ``size`` input: the largest output difference
    and interleaved forward times (ours under ``inference_mode`` as :func:`controlnet.annotators.released.
    run_network` calls it, both OpenPose nets and the reference HED under ``no_grad`` as their detectors do)."""
    from benchmarks.run import max_abs_diff, paired_times, summarize

    x = _reference_input(name, size)
    ours_context = torch.inference_mode if name == "hed" else torch.no_grad
    with tempfile.TemporaryDirectory() as tmp:
        ours, reference = reference_networks(folder, name, Path(tmp))

    def run_ours() -> Any:
        with ours_context():
            return ours(x)

    def run_reference() -> Any:
        with torch.no_grad():
            return reference(x)

    ours_out, reference_out = _tensors(run_ours()), _tensors(run_reference())  # also the warm-up
    diffs = [max_abs_diff(a, b) for a, b in zip(ours_out, reference_out, strict=True)]
    if any(d is None for d in diffs):
        raise SystemExit(f"{name}: our outputs and the reference's differ in shape")
    ours_t, reference_t = paired_times(run_ours, run_reference, repeats, torch.device("cpu"))
    return summarize(name, ours_t, reference_t, size=size, threads=torch.get_num_threads(), max_abs_diff=max(diffs),
                     largest_output=max(float(b.abs().max()) for b in reference_out))


def _tensors(output: Any) -> list[torch.Tensor]:
    return list(output) if isinstance(output, (tuple, list)) else [output]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("detectors", nargs="*", help=f"default: all of {', '.join(CASES)} (with --reference: "
                        f"{', '.join(REFERENCES)})")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per detector (--reference: rounds)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--size", type=int, default=SIZE, help="square picture size in pixels")
    parser.add_argument("--batch-size", type=int, default=1, help="also time this many pictures per call")
    parser.add_argument("--reference", type=Path, default=None,
                        help="folder holding controlnet_aux: compare our networks with its HED and OpenPose")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    known = REFERENCES if args.reference else CASES
    unknown = [d for d in args.detectors if d not in known]
    if unknown:
        parser.error(f"unknown detector(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if args.reference:
        print(f"{'network':14s} {'ours s':>8s} {'reference s':>12s} {'ours/ref':>9s} {'range':>12s} "
              f"{'max |diff|':>11s}")
        for name in args.detectors or list(REFERENCES):
            row = compare_reference(args.reference, name, args.repeats, args.size)
            rows.append(row)
            print(f"{name:14s} {row['ours_s']:8.3f} {row['reference_s']:12.3f} {row['ratio']:9.3f} "
                  f"{row['ratio_min']:5.2f}-{row['ratio_max']:<5.2f} {row['max_abs_diff']:11.2e}", flush=True)
    else:
        batch = f" {'batch ' + str(args.batch_size) + ' s/img':>16s} {'/single':>8s}" if args.batch_size > 1 else ""
        print(f"{'detector':16s} {'annotate s/img':>15s} {'median':>8s} {'forward s':>10s} {'median':>8s}{batch}")
        for name in args.detectors or list(CASES):
            row = time_detector(name, args.repeats, args.size, args.batch_size)
            rows.append(row)
            extra = (f" {row['batch_annotate_median_s']:16.3f} {row['batch_over_single']:8.3f}"
                     if "batch_over_single" in row else "")
            print(f"{name:16s} {row['annotate_s']:15.3f} {row['annotate_median_s']:8.3f} {row['forward_s']:10.3f} "
                  f"{row['forward_median_s']:8.3f}{extra}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
