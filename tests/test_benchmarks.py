"""The benchmark harness: the CI smoke run (every record produced; no timing assertions) and the checks that it
compares the same work (our pipeline and diffusers' give the same outputs on the benchmark's own calls)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import cases as bc
from benchmarks import run as bench

PER_STEP = ("unet", "controlnet", "two_controlnets", "guess_mode", "end_half")
EXPECTED_RECORDS = {*bc.CASES, "load", "train_step", "train_memory"}


def test_paired_summary_known_answer():
    rec = bench.summarize("x", [2.0, 4.0, 6.0], [1.0, 2.0, 2.0], divide_by=2)
    assert rec["ours_s"] == 2.0 and rec["reference_s"] == 1.0  # medians, per step
    assert rec["ratios"] == [2.0, 2.0, 3.0]
    assert (rec["ratio"], rec["ratio_min"], rec["ratio_max"], rec["repetitions"]) == (2.0, 2.0, 3.0, 3)


def test_targets_and_derived_ratio():
    records = [
        {"case": "unet", "resolution": 256, "dtype": "bf16", "ours_s": 2.0, "reference_s": 2.0},
        {"case": "controlnet", "resolution": 256, "dtype": "bf16", "ours_s": 2.8, "reference_s": 3.0},
        {"case": "unet", "resolution": 512, "dtype": "bf16", "ours_s": 1.0, "reference_s": 1.0},
    ]
    (d,) = bench.derived_ratios(records)  # 512 has no controlled case
    assert d["ours"] == pytest.approx(1.4) and d["reference"] == pytest.approx(1.5) and d["met"] is True
    assert bench.target_status({"target": 1.0, "target_on": "time", "ratio": 1.01}) == "≤ 1 missed"
    assert bench.target_status({"target": 0.8, "target_on": "memory", "ratio": 2.0, "memory_ratio": 0.5}) == "≤ 0.8 met"


def test_both_pipelines_do_the_same_work():
    """On the harness's own calls (tiny UNet, fp32), ours and diffusers' outputs agree, and the cases differ from
    each other (the ControlNets act; end=0.5 and guess mode change the result)."""
    device = torch.device("cpu")
    models = bc.build_models("tiny", torch.float32, device)
    setting = bc.Setting("tiny", 64, torch.float32, device)
    outputs = {}
    for name in (*PER_STEP, "generation"):
        case = bc.CASES[name]
        steps = 2  # the generation case (10 steps in the benchmark) with 2: the same code path
        got = {}
        for impl in bc.IMPLS:
            pipe = bc.make_pipeline(impl, models, case, setting)
            got[impl] = bc.make_call(impl, pipe, models, case, setting, steps)()
        atol = 1e-4 if case.output_type == "latent" else 1.5 / 255  # images: one 8-bit level of rounding
        torch.testing.assert_close(got["ours"], got["reference"], atol=atol, rtol=0)
        outputs[name] = got["ours"]
    for name in ("controlnet", "two_controlnets", "guess_mode", "end_half"):
        assert (outputs[name] - outputs["unet"]).abs().max() > 1e-3, name
    assert (outputs["end_half"] - outputs["controlnet"]).abs().max() > 1e-3
    assert (outputs["guess_mode"] - outputs["controlnet"]).abs().max() > 1e-3


def test_reuse_cases_differ_from_their_default_only_on_our_side():
    """The residual-reuse rows run ours with reuse_residuals=2 (so its output moves) and diffusers' default (so the
    reference is exactly that of the case without reuse)."""
    device = torch.device("cpu")
    models = bc.build_models("tiny", torch.float32, device)
    setting = bc.Setting("tiny", 64, torch.float32, device)
    for reuse, default in (("controlnet_reuse2", "controlnet"), ("end_half_reuse2", "end_half")):
        assert bc.CASES[reuse].reuse == 2 and bc.CASES[default].reuse == 1
        got = {}
        for name in (reuse, default):
            case = bc.CASES[name]
            for impl in bc.IMPLS:
                pipe = bc.make_pipeline(impl, models, case, setting)
                got[name, impl] = bc.make_call(impl, pipe, models, case, setting, bc.CASES[reuse].min_steps)()
        assert torch.equal(got[reuse, "reference"], got[default, "reference"])
        assert (got[reuse, "ours"] - got[default, "ours"]).abs().max() > 1e-4, reuse


def test_fast_init_builds_the_same_shapes():
    """The memory subprocesses' meta-device build has the timed models' parameters, shapes and dtype."""
    slow = bc.build_models("tiny", torch.float32, torch.device("cpu"))
    fast = bc.build_models_fast("tiny", torch.bfloat16, torch.device("cpu"), "reference")
    assert fast.ours_cn is None
    for a, b in ((slow.unet, fast.unet), (slow.reference_cn, fast.reference_cn)):
        shapes = {k: tuple(v.shape) for k, v in a.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in b.state_dict().items()}
        assert {v.dtype for v in b.state_dict().values()} == {torch.bfloat16}
        assert all(torch.isfinite(v.float()).all() for v in b.state_dict().values())


@pytest.mark.slow
def test_quick_run_produces_every_record(tmp_path, capsys):
    """The CI smoke test: ``python -m benchmarks.run --quick`` produces every record (no timing assertions)."""
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    records = {r["case"]: r for r in result["records"]}
    assert set(records) == EXPECTED_RECORDS
    for name, r in records.items():
        assert "error" not in r, (name, r.get("error"))
        for key in ("ours_s", "reference_s", "ratio", "ours_peak_mb", "reference_peak_mb"):
            assert isinstance(r[key], float) and r[key] > 0, (name, key, r.get(key))
        assert r["repetitions"] >= 1 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert f"| {r['title']} |" in table
    for name in PER_STEP:  # bf16: same work, loosely the same numbers
        assert records[name]["max_abs_diff"] is not None and records[name]["max_abs_diff"] < 0.5, name
    assert records["load"]["same_tensors"] is True  # our loader and diffusers' converter agree
    assert [o["case"] for o in result["options"]] == list(bench.OPTIONS)
    assert [(d["resolution"], d["dtype"]) for d in result["derived"]] == [(256, "bf16")]


def test_the_full_cpu_plan_follows_hardware_bf16(monkeypatch):
    """Without hardware bf16 every case runs in fp32 (the dtype `auto` picks there), with it in bf16."""
    import controlnet.devices as devices

    args = bench.parse_args([])
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: [])
    plan = bench.build_plan(args, torch.device("cpu"))
    assert (256, "fp32", tuple(bc.CASES)) in plan and all(set(c) < set(bc.CASES) for _, d, c in plan if d == "bf16")
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert (256, "bf16", tuple(bc.CASES)) in bench.build_plan(args, torch.device("cpu"))
