"""`controlnet evaluate`: known answers of the scores, the fill IoU equal to the demo's, resume, the bootstrap,
comparisons (of two runs, and of two ControlNets evaluated side by side), image quality from local weights only,
and bad input refused in one line."""

from __future__ import annotations

import json
from json import dumps as json_dumps  # the stand-in pose detector's parameter is called json
from pathlib import Path

import numpy as np
import pytest

from cli_checks import offline_hub
from controlnet.data.fill import fill_iou, make_fill_dataset
from controlnet.errors import EXIT_BAD_INPUT, UserError
from controlnet.eval_compare import COMPARISON_FILE, evaluate_pair, pair_configs, run_folder
from controlnet.eval_stats import bootstrap_interval, compare, describe, format_comparison
from controlnet.evaluate import (EvalConfig, controlnet_annotators, evaluate, ms_ssim, palette_labels, pck,
                                 score_kind)
from controlnet.images import load_image


def _main(argv: list[str]) -> int:
    from controlnet.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def fill_data(tmp_path_factory) -> Path:
    """Five fill examples (128 px circles) in the fill50k layout."""
    return make_fill_dataset(tmp_path_factory.mktemp("evaluate") / "fill", 5, seed=3)


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """No test sees this machine's Hugging Face cache: CLIP weights are absent unless a test makes them."""
    offline_hub(monkeypatch, tmp_path / "hub")


def identity(example, seeds):
    """A generator that returns the image the condition was made from."""
    return [example.image.copy() for _ in seeds]


def blank(example, seeds):
    return [np.zeros_like(example.image) for _ in seeds]


def half_blank(example, seeds):
    image = example.image.copy()
    image[image.shape[0] // 2:] = 0
    return [image for _ in seeds]


def _run(data: Path, out: Path, generate, **settings) -> dict:
    config = EvalConfig(data, out, clip_weights="none", **{"per_example": 2, **settings})
    return evaluate(config, generate=generate, progress=False)


def _mean(summary: dict, metric: str) -> float:
    return summary["scores"][metric]["mean"]


# --------------------------------------------------------------------------- known answers


def test_canny_own_image_scores_f1_one_and_ms_ssim_one_blank_scores_zero(fill_data, tmp_path):
    kw = {"controlnet": "lllyasviel/control_v11p_sd15_canny", "annotator": "canny"}
    own = _run(fill_data, tmp_path / "own", identity, **kw)
    assert own["score"] == "edge_f1" and own["examples"] == 5
    assert _mean(own, "edge_f1") == 1.0
    assert _mean(own, "ms_ssim") == pytest.approx(1.0, abs=1e-6)
    empty = _run(fill_data, tmp_path / "blank", blank, **kw)
    half = _run(fill_data, tmp_path / "half", half_blank, **kw)
    assert _mean(empty, "edge_f1") == 0.0  # no edge found: no true positive
    assert 0.0 < _mean(half, "edge_f1") < 1.0
    assert _mean(empty, "ms_ssim") < _mean(half, "ms_ssim") < 1.0


def test_soft_edges_own_image_scores_ssim_one_blank_lowest(fill_data, tmp_path):
    kw = {"controlnet": None, "annotator": "softedge"}
    own = _run(fill_data, tmp_path / "own", identity, **kw)
    assert own["score"] == "ms_ssim"
    assert _mean(own, "ms_ssim") == pytest.approx(1.0, abs=1e-6)
    assert _mean(own, "ssim") == pytest.approx(1.0, abs=1e-12)
    empty = _run(fill_data, tmp_path / "blank", blank, **kw)
    half = _run(fill_data, tmp_path / "half", half_blank, **kw)
    for metric in ("ms_ssim", "ssim"):
        assert _mean(empty, metric) < _mean(half, metric) < 1.0, metric


def test_fill_iou_equals_the_demo_metric_on_the_same_cases(tmp_path):
    """The demo (with a pipeline that draws given pictures) and evaluate (with a generator that returns the same
    pictures) score the demo's 8 conditions alike: both are fill_iou of the picture and the condition."""
    from controlnet.data.fill import FillSample
    from controlnet.demo import DEMO_SAMPLES, compare as demo_compare
    from controlnet.images import save_png

    def drawn(s: FillSample) -> np.ndarray:  # the circle drawn 6 px right and 3 px down
        return FillSample(s.cx + 6, s.cy + 3, s.radius, s.circle, s.background, s.size).target

    by_prompt = {s.prompt: drawn(s) for s in DEMO_SAMPLES}

    class DrawingPipe:
        def __call__(self, prompt, controls, **kwargs):
            return type("Result", (), {"images": [by_prompt[prompt]]})()

    demo = demo_compare(DrawingPipe(), DEMO_SAMPLES)
    data = tmp_path / "demo_cases"
    rows = []
    for i, s in enumerate(DEMO_SAMPLES):
        save_png(data / "source" / f"{i}.png", s.condition)
        save_png(data / "target" / f"{i}.png", s.target)
        rows.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": s.prompt}))
    (data / "prompt.json").write_text("\n".join(rows) + "\n")
    summary = _run(data, tmp_path / "out", lambda ex, seeds: [by_prompt[ex.prompt] for _ in seeds], per_example=1)
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["scores"]["iou"] for r in results] == demo.iou_control
    assert [r["scores"]["iou"] for r in results] == [fill_iou(by_prompt[s.prompt], s.condition, s.prompt)
                                                     for s in DEMO_SAMPLES]
    assert _mean(summary, "iou") == pytest.approx(np.mean(demo.iou_control), abs=1e-12)
    assert _mean(summary, "colour_accuracy") == np.mean(demo.colour_control)
    assert 0.3 < _mean(summary, "iou") < 0.95  # shifted circles: neither all right nor all wrong


def test_ms_ssim_uses_the_scales_that_fit():
    rng = np.random.default_rng(0)
    for side, scales in ((64, 3), (128, 4), (175, 4), (176, 5)):
        a = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        assert ms_ssim(a, a) == (pytest.approx(1.0, abs=1e-6), scales)


def test_pck_counts_keypoints_within_a_tenth_of_the_box():
    ref = np.array([[0, 0, 1], [100, 0, 1], [0, 200, 1], [100, 200, 1], [50, 50, 0]], float)  # box 100 x 200
    found = np.array([[19, 0, 1], [100, 20, 1], [0, 200, 0], [150, 200, 1], [50, 50, 1]], float)
    assert pck([ref], [found]) == 0.5  # within 20 px (19, 20: yes; 50: no; unseen: no) of four seen
    assert pck([ref], [np.zeros((5, 3)), ref]) == 1.0  # matched to the right person
    assert pck([ref], []) == 0.0
    assert np.isnan(pck([np.zeros((5, 3))], [ref]))


def _toy_pose(image, json=None):
    """A stand-in pose detector: one "person" whose first five keypoints are the centroid and the four extreme
    points of the pixels unlike the border colour (none found: no person), as OpenPose JSON; drawn as dots."""
    from controlnet.data.fill import circle_mask

    mask = circle_mask(image)
    people = []
    if mask.any():
        ys, xs = np.nonzero(mask)
        points = [(xs.mean(), ys.mean()), (xs.min(), ys[xs.argmin()]), (xs.max(), ys[xs.argmax()]),
                  (xs[ys.argmin()], ys.min()), (xs[ys.argmax()], ys.max())]
        flat = [v for x, y in points for v in (float(x), float(y), 1.0)] + [0.0] * 3 * (18 - len(points))
        people.append({"pose_keypoints_2d": flat})
    if json is not None:
        Path(json).write_text(json_dumps({"people": people}))
    canvas = np.zeros_like(image)
    for person in people:
        for x, y in np.array(person["pose_keypoints_2d"]).reshape(18, 3)[:5, :2].astype(int):
            canvas[y, x] = 255
    return canvas


def test_pose_scores_pck_through_the_annotators_json(fill_data, tmp_path, monkeypatch):
    """The pose route end to end, with a stand-in detector registered as "pose": the keypoints of the dataset's
    image are the reference, those of each generated image are compared (all found: 1; no person: 0)."""
    from controlnet import annotators
    from controlnet.annotators.registry import Annotator, Param

    toy = Annotator("pose", _toy_pose, "stand-in", (Param("json", Path, None, "keypoints out"),))
    monkeypatch.setitem(annotators.REGISTRY, "pose", toy)
    kw = {"controlnet": "lllyasviel/control_v11p_sd15_openpose", "annotator": "pose"}
    own = _run(fill_data, tmp_path / "own", identity, **kw)
    assert own["score"] == "pck" and _mean(own, "pck") == 1.0
    assert _mean(_run(fill_data, tmp_path / "blank", blank, **kw), "pck") == 0.0

    def moved(example, seeds):  # the picture 40 px to the right: the circle's keypoints far off
        return [np.roll(example.image, 40, axis=1) for _ in seeds]

    assert _mean(_run(fill_data, tmp_path / "moved", moved, **kw), "pck") < 0.5


def _toy_depth(image):
    """A stand-in depth detector: brightness as nearness (8-bit, grey)."""
    return np.repeat(image.mean(axis=2, keepdims=True).round().astype(np.uint8), 3, axis=2)


def _toy_segmentation(image):
    """A stand-in segmenter: ADE20K class 12 where the pixels are unlike the border colour, class 0 elsewhere."""
    from controlnet.annotators.palettes import ADE20K
    from controlnet.data.fill import circle_mask

    return ADE20K[np.where(circle_mask(image), 12, 0)]


@pytest.mark.parametrize("name, detector", [("depth", _toy_depth), ("segmentation", _toy_segmentation)])
def test_depth_rmse_and_segmentation_miou_known_answers(fill_data, tmp_path, monkeypatch, name, detector):
    """With stand-in detectors registered under the real names: the own image scores RMSE 0 / mIoU 1; a blank
    one scores the condition's RMS / the background's share over two classes, computed here from the files."""
    from controlnet import annotators
    from controlnet.annotators.registry import Annotator

    monkeypatch.setitem(annotators.REGISTRY, name, Annotator(name, detector, "stand-in"))
    kw = {"controlnet": None, "annotator": name}
    metric, perfect = ("rmse", 0.0) if name == "depth" else ("miou", 1.0)
    assert _mean(_run(fill_data, tmp_path / "own", identity, **kw), metric) == perfect
    _run(fill_data, tmp_path / "blank", blank, **kw)
    rows = [json.loads(line) for line in (tmp_path / "blank" / "results.jsonl").read_text().splitlines()]
    for row in rows:
        condition = load_image(tmp_path / "blank" / "images" / f"{row['id']}_condition.png")
        if name == "depth":
            expected = np.sqrt(np.mean(condition[..., 0].astype(np.float64) ** 2))
        else:
            background = np.mean((condition == condition[0, 0]).all(axis=2))
            expected = background / 2  # background IoU = its share; the circle's class: 0
        assert row["scores"][metric] == pytest.approx(expected, abs=1e-9), row["id"]


def test_segmentation_colours_read_back_as_their_classes():
    from controlnet.annotators.palettes import ADE20K
    from controlnet.annotators.structured import segmentation

    labels = np.random.default_rng(1).integers(0, len(ADE20K), (16, 24))
    shared = np.where(labels == 48, 6, labels)  # ADE20K gives classes 6 and 48 one colour: read back as 6
    assert (labels == 48).any() and np.array_equal(palette_labels(segmentation(labels), ADE20K), shared)


def test_condition_type_from_the_controlnet_name():
    assert controlnet_annotators("lllyasviel/control_v11p_sd15_canny") == ("canny",)
    assert controlnet_annotators("diffusers/controlnet-depth-sdxl-1.0") == ("depth",)
    assert controlnet_annotators("fill") == ("fill",)
    assert controlnet_annotators("my-model") is None
    assert score_kind(None, "fill", []) == "iou"
    assert score_kind(None, None, ["red circle with blue background"]) == "iou"
    assert score_kind("hed", "lllyasviel/control_v11p_sd15_softedge", []) == "ms_ssim"
    with pytest.raises(UserError, match="does not make the conditions"):
        score_kind("depth", "lllyasviel/control_v11p_sd15_canny", [])
    with pytest.raises(UserError, match="pass --annotator"):
        score_kind(None, "my-model", ["a photo"])


# --------------------------------------------------------------------------- resume, statistics, comparison


def test_resume_skips_the_examples_done_with_the_same_settings(fill_data, tmp_path):
    calls = []

    def counting(example, seeds):
        calls.append(example.id)
        if example.id == "000003" and stop:
            raise KeyboardInterrupt
        return identity(example, seeds)

    out = tmp_path / "out"
    stop = True
    with pytest.raises(KeyboardInterrupt):
        _run(fill_data, out, counting)
    assert calls == ["000001", "000002", "000003"] and not (out / "results.jsonl").exists()
    stop, calls[:] = False, []
    first = _run(fill_data, out, counting)
    assert calls == ["000003", "000004", "000005"]  # the stopped run's two examples are read back
    calls.clear()
    assert _run(fill_data, out, counting) == first and calls == []
    (out / "examples" / "000002.json").unlink()
    _run(fill_data, out, counting)
    assert calls == ["000002"]
    calls.clear()
    _run(fill_data, out, counting, seed=1)  # other settings: every example again
    assert len(calls) == 5


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    values = np.random.default_rng(5).normal(0.6, 0.2, 40)
    low, high = bootstrap_interval(values, seed=0)
    assert low < values.mean() < high
    assert bootstrap_interval(values, seed=0) == (low, high)
    assert bootstrap_interval(values, seed=1) != (low, high)
    assert high - low == pytest.approx(2 * 1.96 * values.std(ddof=1) / np.sqrt(40), rel=0.2)  # normal theory
    assert bootstrap_interval([0.7, 0.7, 0.7]) == (pytest.approx(0.7), pytest.approx(0.7))
    assert describe([1.0, float("nan"), 3.0])["n"] == 2


def test_compare_picks_the_known_better_run(fill_data, tmp_path, capsys):
    kw = {"controlnet": "lllyasviel/control_v11p_sd15_canny", "annotator": "canny"}
    _run(fill_data, tmp_path / "blank", blank, **kw)
    _run(fill_data, tmp_path / "half", half_blank, **kw)
    table = {r["metric"]: r for r in compare(tmp_path / "blank" / "summary.json", tmp_path / "half")}
    assert table["edge_f1"]["better"] == "B" and table["edge_f1"]["n"] == 5
    assert 0 < table["edge_f1"]["low"] <= table["edge_f1"]["difference"] <= table["edge_f1"]["high"]
    same = {r["metric"]: r for r in compare(tmp_path / "half", tmp_path / "half" / "results.jsonl")}
    assert same["edge_f1"]["better"] == "neither" and same["edge_f1"]["difference"] == 0.0
    code = _main(["evaluate", "--compare", str(tmp_path / "half" / "summary.json"),
                  str(tmp_path / "blank" / "summary.json")])
    printed = capsys.readouterr().out
    assert code == 0 and "edge_f1" in printed and printed.splitlines()[-2].split()[-1] == "A", printed
    assert "B - A" in format_comparison(list(table.values()), "a", "b")


CANNY = "lllyasviel/control_v11p_sd15_canny"
DEPTH = "lllyasviel/control_v11f1p_sd15_depth"


def _pair(data: Path, out: Path, generators, controlnets=(CANNY, None), **settings) -> dict:
    config = EvalConfig(data, out, annotator="canny", clip_weights="none", **{"per_example": 2, **settings})
    return evaluate_pair(config, list(controlnets), generators=generators, progress=False)


def test_two_controlnets_the_own_image_beats_blank_with_an_interval_excluding_zero(fill_data, tmp_path):
    out = tmp_path / "pair"
    comparison = _pair(fill_data, out, (identity, blank))
    runs = out / "lllyasviel--control_v11p_sd15_canny", out / "none"
    assert [comparison[side]["run"] for side in ("a", "b")] == [str(r) for r in runs]
    for run, controlnet in zip(runs, (CANNY, None)):
        assert json.loads((run / "summary.json").read_text())["settings"]["controlnet"] == controlnet
    table = {r["metric"]: r for r in comparison["scores"]}
    f1 = table["edge_f1"]
    assert (f1["a"], f1["b"], f1["n"]) == (1.0, 0.0, 5) and f1["better"] == "A"
    assert f1["low"] == f1["difference"] == f1["high"] == -1.0  # B - A is -1 on every example
    assert table["ms_ssim"]["better"] == "A" and table["ms_ssim"]["high"] < 0
    assert comparison["scores"] == compare(*runs, comparison["bootstrap"]["samples"], comparison["bootstrap"]["seed"])
    assert json.loads((out / COMPARISON_FILE).read_text()) == comparison


def test_a_stopped_comparison_resumes_without_generating_finished_examples(fill_data, tmp_path):
    calls: dict[str, list[str]] = {"a": [], "b": []}
    stop = True

    def counting(side, generate):
        def wrapped(example, seeds):
            calls[side].append(example.id)
            if side == "b" and example.id == "000003" and stop:
                raise KeyboardInterrupt
            return generate(example, seeds)
        return wrapped

    generators = counting("a", half_blank), counting("b", identity)
    out = tmp_path / "pair"
    with pytest.raises(KeyboardInterrupt):
        _pair(fill_data, out, generators)
    assert calls == {"a": ["000001", "000002", "000003", "000004", "000005"], "b": ["000001", "000002", "000003"]}
    assert not (out / COMPARISON_FILE).exists()
    stop, calls["a"], calls["b"] = False, [], []
    first = _pair(fill_data, out, generators)
    assert calls == {"a": [], "b": ["000003", "000004", "000005"]}
    assert {r["metric"]: r["better"] for r in first["scores"]}["edge_f1"] == "B"
    calls["b"].clear()
    assert _pair(fill_data, out, generators) == first and calls == {"a": [], "b": []}


def test_sub_folders_are_named_by_the_controlnet_and_told_apart_when_names_collide(tmp_path):
    assert [run_folder(c) for c in (None, "fill", CANNY, "./runs/a b/final/")] == [
        "none", "fill", "lllyasviel--control_v11p_sd15_canny", "runs--a--b--final"]
    a, b = pair_configs(EvalConfig(tmp_path / "data", tmp_path / "out"), ["runs/a", "runs--a"])
    assert (a.out.name, b.out.name, a.controlnet, b.controlnet) == ("runs--a-A", "runs--a-B", "runs/a", "runs--a")


@pytest.mark.parametrize("extra, message", [
    (["--controlnet", CANNY, "--controlnet", DEPTH], "take different conditions (canny vs depth)"),
    (["--controlnet", "fill", "--controlnet", DEPTH], "take different conditions (fill vs depth)"),
    (["--annotator", "canny", "--controlnet", CANNY, "--controlnet", DEPTH],
     f"--annotator canny does not make the conditions of the ControlNet {DEPTH}"),
    (["--controlnet", "fill", "--controlnet", "fill"], "--controlnet fill is given twice"),
    (["--controlnet", "none", "--controlnet", "none"], "--controlnet none is given twice"),
    (["--controlnet", "{cn}", "--controlnet", "{cn}/../cn"], "is given twice"),
    (["--controlnet", "fill", "--controlnet", "none", "--controlnet", CANNY], "give one to evaluate, or two"),
    (["--annotator", "canny", "--controlnet", "none", "--controlnet", "no-such-folder/controlnet"],
     "no-such-folder/controlnet"),  # the second model is loaded before the first generates
])
def test_comparison_refusals_exit_2_in_one_line_before_generating(fill_data, tmp_path, capsys, extra, message):
    (tmp_path / "cn").mkdir()
    out = tmp_path / "out"
    extra = [arg.replace("{cn}", str(tmp_path / "cn")) for arg in extra]
    assert _main(["evaluate", "--data", str(fill_data), "--out", str(out), *extra]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("controlnet evaluate: error: ") and message in err, err
    assert not out.exists()


def test_outputs_summary_and_worst_grid(fill_data, tmp_path):
    summary = _run(fill_data, tmp_path / "out", half_blank, controlnet=None, annotator="canny")
    out = tmp_path / "out"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["scores"] == summary["scores"] and saved["settings"]["per_example"] == 2
    assert saved["settings"]["guidance"] == 7.5 and saved["settings"]["steps"] == 20
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["images"][1]["seed"] for r in rows] == [1] * 5 and "settings" not in rows[0]
    grid = load_image(out / "worst.png")
    assert grid.shape[0] > 5 * 128 and grid.shape[1] >= 3 * 128


# --------------------------------------------------------------------------- image quality


def _tiny_clip(folder: Path) -> Path:
    """A random CLIP model (16-wide towers, 32 px images) in save_pretrained layout."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from controlnet.testing import write_clip_vocabulary

    folder.mkdir(parents=True)
    write_clip_vocabulary(folder, ("red", "green", "blue", "circle", "with", "background"))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=77),
                        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_clip_score_and_fid_from_a_local_folder(fill_data, tmp_path):
    from controlnet.eval_quality import frechet_distance

    clip = _tiny_clip(tmp_path / "clip")
    config = EvalConfig(fill_data, tmp_path / "out", per_example=2, clip_weights=str(clip))
    summary = evaluate(config, generate=identity, progress=False)
    assert summary["notes"] == []
    assert 0.0 <= _mean(summary, "clip_score") <= 100.0 and summary["scores"]["clip_score"]["n"] == 5
    assert summary["scores"]["fid"]["n"] == 10 and summary["scores"]["fid"]["mean"] > -1e-6
    features = np.random.default_rng(0).normal(size=(50, 4))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(features, features + [1.0, 2.0, 0.0, 0.0]) == pytest.approx(5.0, abs=1e-9)


def test_missing_weights_skip_the_columns_in_one_line(fill_data, tmp_path):
    config = EvalConfig(fill_data, tmp_path / "out", per_example=1, clip_weights="org/absent-clip")
    summary = evaluate(config, generate=identity, progress=False)
    assert len(summary["notes"]) == 1 and "hf download org/absent-clip" in summary["notes"][0]
    assert "CLIP score and FID skipped" in summary["notes"][0]
    assert "clip_score" not in summary["scores"] and "fid" not in summary["scores"]


# --------------------------------------------------------------------------- the command


def test_cli_on_the_embedded_model_with_and_without_the_controlnet(fill_data, tmp_path, capsys):
    common = ["evaluate", "--data", str(fill_data), "--limit", "2", "-k", "1", "--steps", "2", "-q"]
    assert _main(common + ["--out", str(tmp_path / "with")]) == 0
    printed = capsys.readouterr().out
    assert "CLIP score and FID skipped" in printed and "iou" in printed
    assert _main(common + ["--out", str(tmp_path / "without"), "--controlnet", "none"]) == 0
    for name, controlnet in (("with", "fill"), ("without", None)):
        settings = json.loads((tmp_path / name / "summary.json").read_text())["settings"]
        assert settings["controlnet"] == controlnet and settings["negative_prompt"] == ""  # embedded base
        assert settings["resolution"] == 128 and settings["scheduler"] == "unipc"
    assert _main(["evaluate", "--compare", str(tmp_path / "without"), str(tmp_path / "with")]) == 0


def test_cli_compares_the_controlnet_with_the_base_alone_on_the_embedded_model(fill_data, tmp_path, capsys):
    out = tmp_path / "pair"
    argv = ["evaluate", "--data", str(fill_data), "--limit", "2", "-k", "1", "--steps", "2", "-q", "--out", str(out),
            "--controlnet", "fill", "--controlnet", "none"]
    assert _main(argv) == 0
    printed = capsys.readouterr().out
    assert f"A = fill: {out / 'fill'}" in printed and f"B = none (the base alone): {out / 'none'}" in printed
    comparison = json.loads((out / COMPARISON_FILE).read_text())
    assert [r["metric"] for r in comparison["scores"]] == ["iou", "colour_accuracy"]
    assert comparison["scores"] == compare(out / "fill", out / "none")
    assert _main(["evaluate", "--compare", str(out / "fill"), str(out / "none")]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == printed.splitlines()[-len(comparison["scores"]) - 2:-1]


@pytest.mark.parametrize("extra, message", [
    (["-k", "0"], "--per-example must be at least 1"),
    (["--annotator", "canny"], "does not make the conditions of the ControlNet fill"),
    (["--annotator", "tile"], "has no controllability score"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--controlnet", "no-such-folder/controlnet", "--annotator", "canny"], "no-such-folder/controlnet"),
    (["--controlnet", "none", "--annotator", "hed"], "ControlNetHED.pth"),  # weights not in the (empty) cache
])
def test_bad_input_exits_2_in_one_line_and_writes_nothing(fill_data, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert _main(["evaluate", "--data", str(fill_data), "--out", str(out), *extra]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("controlnet evaluate: error: ") and message in err, err
    assert not out.exists()


def test_dataset_with_missing_files_exits_2_in_one_line(tmp_path, capsys):
    data = make_fill_dataset(tmp_path / "data", 3, seed=4)
    (data / "target" / "1.png").unlink()
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes((data / "target" / "0.png").read_bytes())
    for source, message in ((data, "missing file"), (images, "have no caption file (a.txt)")):
        out = tmp_path / "out"
        code = _main(["evaluate", "--data", str(source), "--out", str(out), "--annotator", "canny",
                      "--controlnet", "none"])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_BAD_INPUT and len(err.splitlines()) == 1 and message in err, err
        assert not out.exists()


def test_no_data_and_missing_runs_to_compare_exit_2_in_one_line(tmp_path, capsys):
    for argv, message in ((["evaluate"], "pass --data DATASET"),
                          (["evaluate", "--compare", str(tmp_path / "a"), str(tmp_path / "b")], "does not exist")):
        assert _main(argv) == EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_the_pipeline_is_called_in_batches_of_at_most_twelve_consecutive_seeds():
    from controlnet.evaluate import generate_images

    calls = []

    class Recording:
        def __call__(self, prompt, controls, **settings):
            calls.append((settings["seed"], settings["num_images"]))
            images = [np.full((8, 8, 3), settings["seed"] + k, np.uint8) for k in range(settings["num_images"])]
            return type("Result", (), {"images": images})()

    seeds = list(range(5, 19))
    images = generate_images(Recording(), "p", None, np.zeros((8, 8, 3), np.uint8), seeds,
                             EvalConfig(Path("data"), Path("out")), "")
    assert calls == [(5, 12), (17, 2)] and [int(im[0, 0, 0]) for im in images] == seeds
