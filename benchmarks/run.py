"""Benchmark harness: our ControlNet code against diffusers, side by side in one process, same weights.

    .venv/bin/python -m benchmarks.run                          # the full run (the README)
    .venv/bin/python -m benchmarks.run --quick                  # CI smoke test: tiny UNet, 256x256, bf16
    .venv/bin/python -m benchmarks.run --cases controlnet end_half --resolutions 256 --dtypes bf16 --json out.json

Timing: per case, ours and diffusers run the same call (:mod:`benchmarks.cases`) once each as a warm-up, then
``--repeats`` times each, alternated (ours first in even rounds, diffusers first in odd ones); a case reports
the median time of each and the median (and the spread) of the paired ratios ours/diffusers of each round.
Peak memory: each (case, implementation) runs once more in a fresh subprocess (``--quick``: one subprocess per
implementation for all cases), which builds the models, resets the resident-set high-water mark and reports
``getrusage(RUSAGE_SELF).ru_maxrss`` after the case (on CUDA: ``max_memory_allocated``).

Records (stdout: markdown tables; ``--json``: all of it) carry ``case``, ``ours_s``, ``reference_s``, ``ratio``
(median of paired ratios), ``ratio_min``/``ratio_max``, ``ours_peak_mb``, ``reference_peak_mb``, ``repetitions``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import cases as bc
from controlnet.defaults import DTYPE_CHOICES
from controlnet.devices import DTYPES

REPO = Path(__file__).resolve().parents[1]
EXTRA_CASES = ("load", "train", "options")
ALL_CASES = (*bc.CASES, *EXTRA_CASES)
# The target for a controlled step over a plain UNet step (both ours) at 256x256 bf16. The FLOP floor is about
# 1.35: one forward of SD1.5 at 512x512, batch 1, is 803 GFLOP for the UNet and 283 GFLOP for the ControlNet
# (torch.utils.flop_counter on the meta device).
CONTROLLED_OVER_PLAIN_TARGET = 1.45
# Training targets as benchmarks/training.py states them: step time ours/diffusers' way <= 0.8, peak memory
# ours/full fine-tuning <= 0.8.
TRAIN_TIME_TARGET = 0.8
TRAIN_MEMORY_TARGET = 0.8

# The full run on a CPU, (resolution, dtype, cases), used when neither --resolutions, --dtypes nor --cases is
# given. It is trimmed for 2-core CPUs: the fp32 table of docs/performance.md (7 cases at 256 px) took 20 minutes on one. With hardware bf16 (AVX-512 BF16
# or AMX): every case at 256x256 in bf16 (the setting the targets are stated for), cases 1-2 in fp32 and at 512x512.
FULL_PLAN_CPU: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (256, "bf16", tuple(bc.CASES)),
    (256, "fp32", ("unet", "controlnet")),
    (512, "bf16", ("unet", "controlnet")),
)
# Without it bf16 is emulated (about 2.2x slower than fp32 on the Intel Xeon measured, so `--dtype auto` picks
# fp32): every case in fp32, bf16 only for cases 1-2 (the controlled/plain ratio), 512x512 in fp32.
FULL_PLAN_CPU_EMULATED_BF16: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (256, "fp32", tuple(bc.CASES)),
    (256, "bf16", ("unet", "controlnet")),
    (512, "fp32", ("unet", "controlnet", "end_half")),
)
FULL_PLAN_CUDA: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (256, "fp16", tuple(bc.CASES)), (256, "bf16", tuple(bc.CASES)),
    (512, "fp16", tuple(bc.CASES)), (512, "bf16", tuple(bc.CASES)),
)
QUICK_PLAN: tuple[tuple[int, str, tuple[str, ...]], ...] = ((256, "bf16", tuple(bc.CASES)),)


# --------------------------------------------------------------------------------------------- measuring


def paired_times(first: Callable[[], Any], second: Callable[[], Any], repeats: int,
                 device: torch.device) -> tuple[list[float], list[float]]:
    """``repeats`` rounds of one run of each, alternating which goes first; the two lists of seconds."""
    a_times, b_times = [], []
    for r in range(repeats):
        if r % 2 == 0:
            a_times.append(bc.timed(first, device)[0])
            b_times.append(bc.timed(second, device)[0])
        else:
            b_times.append(bc.timed(second, device)[0])
            a_times.append(bc.timed(first, device)[0])
    return a_times, b_times


def summarize(name: str, ours: Sequence[float], reference: Sequence[float], divide_by: int = 1,
              **fields: Any) -> dict[str, Any]:
    """A record from paired times (seconds per call, divided by ``divide_by`` steps)."""
    ratios = [o / r for o, r in zip(ours, reference)]
    return {
        "case": name,
        "ours_s": statistics.median(ours) / divide_by,
        "reference_s": statistics.median(reference) / divide_by,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        "repetitions": len(ratios),
        "ours_times_s": list(ours),
        "reference_times_s": list(reference),
        **fields,
    }


def max_abs_diff(a: Any, b: Any) -> float | None:
    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
        return None
    return float((a.float() - b.float()).abs().max())


def time_case(models: bc.Models, case: bc.Case, setting: bc.Setting, repeats: int, step_steps: int) -> dict[str, Any]:
    """Warm-up, then ``repeats`` alternated rounds of ours and diffusers on one case."""
    steps = case.steps or case.timed_steps(step_steps)
    calls, warm = {}, {}
    for impl in bc.IMPLS:
        pipe = bc.make_pipeline(impl, models, case, setting)
        calls[impl] = bc.make_call(impl, pipe, models, case, setting, steps)
        # The warm-up runs every code path once; a long generation warms up on a 1-step one.
        warm[impl] = calls[impl] if case.per_step else bc.make_call(impl, pipe, models, case, setting, 1)
    outputs = {impl: bc.timed(warm[impl], setting.device)[1] for impl in bc.IMPLS}
    # Same outputs (the same work) where the numbers are comparable: the warm-up of the per-step cases (with
    # residual reuse the outputs differ by design; the difference is still reported).
    diff = max_abs_diff(outputs["ours"], outputs["reference"]) if case.per_step else None
    ours, ref = paired_times(calls["ours"], calls["reference"], repeats, setting.device)
    return summarize(
        case.name, ours, ref, divide_by=steps if case.per_step else 1,
        number=case.number, title=case.title, resolution=setting.resolution, dtype=setting.dtype_name,
        device=setting.device.type, model=setting.size, steps=steps,
        unit="s/step" if case.per_step else "s/generation", target=case.target, target_on="time",
        max_abs_diff=diff, diff_of="final latents (warm-up run)" if diff is not None else None,
    )


def memory_jobs(record: dict[str, Any], setting: bc.Setting, step_steps: int) -> list[dict[str, Any]]:
    """The memory subprocess jobs of one timed case: one per implementation.

    The peak of a generation is that of its costliest step (plus the decoding), so the memory runs generate one
    step; the end=0.5 case generates ``step_steps`` (a controlled and an uncontrolled half).
    """
    case = bc.CASES[record["case"]]
    steps = case.timed_steps(step_steps) if case.end < 1.0 else 1
    return [dict(impl=impl, case=record["case"], size=setting.size, resolution=setting.resolution,
                 dtype=setting.dtype_name, device=str(setting.device), steps=steps) for impl in bc.IMPLS]


def memory_of(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run :func:`benchmarks.cases.memory_child` for ``jobs`` in one fresh interpreter; a result (or an error) each."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--memory-child", json.dumps(jobs)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"error": f"memory subprocess failed (exit {proc.returncode}): {tail[-300:]}"}] * len(jobs)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(pending: list[tuple[dict[str, Any], dict[str, Any]]], per_job: bool) -> None:
    """Fill ``ours_peak_mb`` / ``reference_peak_mb`` of the records in ``pending`` ((record, job) pairs).

    ``per_job``: a fresh subprocess per (case, implementation); otherwise one subprocess runs every job, with the
    high-water mark reset before each (``--quick``: interpreter start-ups would dominate the smoke test).
    """
    groups = [[p] for p in pending] if per_job else [pending]
    for group in groups:
        if not group:
            continue
        for (rec, job), got in zip(group, memory_of([job for _, job in group])):
            rec[f"{job['impl']}_peak_mb"] = got.get("peak_mb")
            rec[f"{job['impl']}_base_mb"] = got.get("base_mb")
            rec["peak_memory"] = got.get("how", got.get("error"))
            if rec.get("ours_peak_mb") and rec.get("reference_peak_mb"):
                rec["memory_ratio"] = rec["ours_peak_mb"] / rec["reference_peak_mb"]


def bench_load(models: bc.Models, work: Path, repeats: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load time of an original-layout fp16 file of our ControlNet (361M parameters for SD1.5), on the CPU; the
    record and its memory jobs (the file stays in ``work`` for them)."""
    device = torch.device("cpu")
    path, config_dir = bc.write_original_file(models, work)
    calls = {impl: bc.make_load_call(impl, path, config_dir) for impl in bc.IMPLS}
    loaded = {impl: bc.timed(calls[impl], device)[1] for impl in bc.IMPLS}  # warm-up (the page cache too)
    params = sum(p.numel() for p in loaded["ours"].parameters())
    ours_sd, ref_sd = loaded["ours"].state_dict(), loaded["reference"].state_dict()
    same = set(ours_sd) == set(ref_sd) and all(torch.equal(ours_sd[k], ref_sd[k]) for k in ours_sd)
    del loaded, ours_sd, ref_sd

    def drop(call: Callable[[], Any]) -> Callable[[], None]:
        def load_and_free() -> None:  # the loaded model is freed at once
            call()
        return load_and_free

    ours, ref = paired_times(drop(calls["ours"]), drop(calls["reference"]), repeats, device)
    rec = summarize("load", ours, ref, number="", title="load an original-layout fp16 .safetensors (s)",
                    resolution=None, dtype="fp16 file → fp32", device="cpu", model=models.size,
                    steps=None, unit="s/load", target=None, target_on="time", params_m=params / 1e6,
                    file_mb=path.stat().st_size / 2**20, same_tensors=same)
    jobs = [dict(impl=impl, case="load", file=str(path), config_dir=str(config_dir), device="cpu", dtype="fp32")
            for impl in bc.IMPLS]
    return rec, jobs


def bench_train(size: str, quick: bool) -> list[dict[str, Any]]:
    """The training records from :func:`benchmarks.training.bench_training` (each case in its own process)."""
    from benchmarks import training

    kwargs = dict(resolution=256, batch=1, dtype=torch.bfloat16, steps=1) if quick else \
        dict(resolution=256, batch=2, dtype=torch.bfloat16, steps=3)
    if quick:  # in this process (interpreter start-ups would dominate), the peak window reset before each case
        rows = []
        for case in training.CASES:
            bc.reset_peak_memory(torch.device("cpu"))
            rows.append(training.run_case(case, size=size, **kwargs))
    else:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its own table
            rows = training.bench_training(size=size, **kwargs)
    by = {r["case"]: r for r in rows}
    common = dict(resolution=kwargs["resolution"], dtype="bf16", device="cpu", model=size, steps=None,
                  batch=kwargs["batch"], unit="s/step", training_rows=rows)

    def record(name: str, title: str, ours_case: str, ref_case: str, target: float, target_on: str) -> dict[str, Any]:
        o, r = by.get(ours_case, {}), by.get(ref_case, {})
        if "step_s" not in o or "step_s" not in r:
            skipped = "; ".join(f"{c}: {x['skipped']}" for c, x in ((ours_case, o), (ref_case, r)) if "skipped" in x)
            return {"case": name, "title": title, "error": skipped or "training case missing", **common,
                    "target": target, "target_on": target_on}
        # Not alternated: each training case runs in its own process (benchmarks/training.py); pairs by step index.
        rec = summarize(name, o["step_times_s"], r["step_times_s"], number="", title=title, target=target,
                        target_on=target_on, **common)
        rec["ours_s"], rec["reference_s"] = o["step_s"], r["step_s"]
        rec["ours_peak_mb"], rec["reference_peak_mb"] = o["peak_rss_gb"] * 1024, r["peak_rss_gb"] * 1024
        rec["memory_ratio"] = o["peak_rss_gb"] / r["peak_rss_gb"]
        rec["peak_memory"] = "ru_maxrss of the case's own process (benchmarks/training.py)"
        return rec

    return [
        record("train_step", "training step: ours vs diffusers' train_controlnet.py way (s/step)",
               "controlnet_cached", "controlnet_diffusers_way", TRAIN_TIME_TARGET, "time"),
        record("train_memory", "training: ControlNet step vs full UNet fine-tuning (peak memory)",
               "controlnet_cached", "full_finetune", TRAIN_MEMORY_TARGET, "memory"),
    ]


# --------------------------------------------------------------------------------------------- speed options


def _set_channels_last(models: bc.Models, on: bool) -> None:
    fmt = torch.channels_last if on else torch.contiguous_format
    for m in (models.unet, models.ours_cn):
        torch.nn.Module.to(m, memory_format=fmt)


def _set_attention(models: bc.Models, sdpa: bool) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    for m in (models.unet, models.ours_cn):
        for module in m.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


# name → (what it compares, apply(models, variant_on)); "ours_s" is the variant, "reference_s" the default.
OPTIONS: dict[str, tuple[str, Callable[[bc.Models, bool], None]]] = {
    "channels_last": ("channels_last UNet + ControlNet vs contiguous (default)", _set_channels_last),
    "attention_classic": ("attention: classic bmm+softmax (AttnProcessor) vs SDPA (default)",
                          lambda m, on: _set_attention(m, sdpa=not on)),
}


def bench_options(models: bc.Models, setting: bc.Setting, repeats: int, step_steps: int) -> list[dict[str, Any]]:
    """Ours only, one ControlNet per step: each option against our default, alternated like the main cases."""
    case = bc.CASES["controlnet"]
    pipe = bc.make_pipeline("ours", models, case, setting)
    call = bc.make_call("ours", pipe, models, case, setting, step_steps)
    records = []
    for name, (title, apply) in OPTIONS.items():
        def run_variant() -> float:  # switching costs a copy of the weights: outside the timed call
            apply(models, True)
            try:
                return bc.timed(call, setting.device)[0]
            finally:
                apply(models, False)

        run_variant()
        bc.timed(call, setting.device)  # warm-up of both
        var_t, base_t = [], []
        for r in range(repeats):
            if r % 2 == 0:
                var_t.append(run_variant())
                base_t.append(bc.timed(call, setting.device)[0])
            else:
                base_t.append(bc.timed(call, setting.device)[0])
                var_t.append(run_variant())
        records.append(summarize(name, var_t, base_t, divide_by=step_steps, title=title,
                                 resolution=setting.resolution, dtype=setting.dtype_name, device=setting.device.type,
                                 model=setting.size, steps=step_steps, unit="s/step", baseline="ours, default"))
    return records


# --------------------------------------------------------------------------------------------- reporting


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def target_status(rec: dict[str, Any]) -> str:
    target = rec.get("target")
    if target is None or "error" in rec:
        return "–"
    value = rec.get("memory_ratio") if rec.get("target_on") == "memory" else rec.get("ratio")
    if value is None:
        return "–"
    return f"≤ {target:g} {'met' if value <= target else 'missed'}"


def markdown_table(records: list[dict[str, Any]]) -> str:
    head = ("| # | case | res | dtype | ours | diffusers | ratio (median) | spread | ours peak MB | "
            "diffusers peak MB | target |")
    lines = [head, "|" + " --- |" * head.count(" | ")]
    for r in records:
        if "error" in r:
            lines.append(f"| {r.get('number', '')} | {r['case']} | {_fmt(r.get('resolution'))} | {r.get('dtype', '')} "
                         f"| error: {r['error']} | | | | | | |")
            continue
        ratio = _fmt(r["ratio"]) if r.get("target_on") != "memory" else f"{_fmt(r['ratio'])} (memory {_fmt(r.get('memory_ratio'))})"
        lines.append(
            f"| {r.get('number', '')} | {r.get('title', r['case'])} | {_fmt(r.get('resolution'))} | {r.get('dtype', '')} "
            f"| {_fmt(r['ours_s'])} | {_fmt(r['reference_s'])} | {ratio} | {_fmt(r['ratio_min'])}–{_fmt(r['ratio_max'])} "
            f"| {_fmt(r.get('ours_peak_mb'), 4)} | {_fmt(r.get('reference_peak_mb'), 4)} | {target_status(r)} |"
        )
    return "\n".join(lines)


def derived_ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Controlled step / plain UNet step for each setting that measured both (ours, and diffusers for context)."""
    out = []
    by = {(r["case"], r.get("resolution"), r.get("dtype")): r for r in records if "error" not in r}
    for (case, res, dtype), plain in by.items():
        controlled = by.get(("controlnet", res, dtype))
        if case != "unet" or controlled is None:
            continue
        ratio = controlled["ours_s"] / plain["ours_s"]
        target = CONTROLLED_OVER_PLAIN_TARGET if (res, dtype) == (256, "bf16") else None
        out.append({"case": "controlled_over_plain", "resolution": res, "dtype": dtype, "ours": ratio,
                    "reference": controlled["reference_s"] / plain["reference_s"], "target": target,
                    "met": None if target is None else ratio <= target})
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    import diffusers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


# --------------------------------------------------------------------------------------------- main


def build_plan(args: argparse.Namespace, device: torch.device) -> list[tuple[int, str, tuple[str, ...]]]:
    if args.quick:
        base = QUICK_PLAN
    else:
        from controlnet.devices import cpu_bf16_flags

        if device.type == "cuda":
            base = FULL_PLAN_CUDA
        else:
            base = FULL_PLAN_CPU if cpu_bf16_flags() else FULL_PLAN_CPU_EMULATED_BF16
    if args.resolutions is None and args.dtypes is None and args.cases is None:
        return list(base)
    resolutions = args.resolutions or sorted({p[0] for p in base})
    dtypes = args.dtypes or list(dict.fromkeys(p[1] for p in base))
    wanted = tuple(c for c in (args.cases or ALL_CASES) if c in bc.CASES)
    return [(r, d, wanted) for r in resolutions for d in dtypes if wanted]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI smoke test: the tiny UNet, 256x256, bf16, 1 repetition, memory in one process per implementation")
    p.add_argument("--json", type=Path, help="write every record to this JSON file")
    p.add_argument("--cases", nargs="+", choices=ALL_CASES, help="only these cases (default: all)")
    p.add_argument("--resolutions", nargs="+", type=int, help="square sizes in pixels (default: the plan's)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPE_CHOICES, help="model dtypes (default: the plan's)")
    p.add_argument("--repeats", type=int, help="paired timed rounds per case (default 3; --quick 1)")
    p.add_argument("--step-steps", type=int, default=2,
                   help="steps of the generation a per-step case times (even, so that end=0.5 halves it; default 2)")
    p.add_argument("--size", choices=("full", "tiny"), help="UNet size: SD1.5 (full, default) or tiny (--quick)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step_steps < 2 or args.step_steps % 2:
        p.error(f"--step-steps must be an even number >= 2, got {args.step_steps}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.size or ("tiny" if args.quick else "full")
    repeats = args.repeats or (1 if args.quick else 3)
    plan = build_plan(args, device)
    wanted = set(args.cases or ALL_CASES)
    started = time.time()
    result: dict[str, Any] = {"command": " ".join(["python -m benchmarks.run", *args.argv]),
                              "machine": machine_info(device), "size": size, "repeats": repeats,
                              "step_steps": args.step_steps, "plan": plan,
                              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                              "records": [], "derived": [], "options": []}

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {msg}", file=sys.stderr, flush=True)

    pending: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (record, memory job)
    with tempfile.TemporaryDirectory(prefix="controlnet-bench-") as tmp:
        models = None
        if plan or wanted & {"load", "options"}:
            log(f"building the {size} models")
            models = bc.build_models(size, torch.float32, device)
        # fp32 before reduced precision: the shared models are cast in place, from the float32 build.
        current = torch.float32
        for resolution, dtype_name, names in sorted(plan, key=lambda p: (p[1] != "fp32", p[0])):
            setting = bc.Setting(size, resolution, DTYPES[dtype_name], device)
            if setting.dtype != current:
                models.to(device, setting.dtype)
                current = setting.dtype
            for name in names:
                log(f"case {name} at {resolution} {dtype_name}")
                try:
                    rec = time_case(models, bc.CASES[name], setting, repeats, args.step_steps)
                except Exception as err:  # noqa: BLE001 - a failed case is reported, the others still run
                    rec = {"case": name, "number": bc.CASES[name].number, "title": bc.CASES[name].title,
                           "resolution": resolution, "dtype": dtype_name, "error": f"{type(err).__name__}: {err}"}
                result["records"].append(rec)
                if "error" not in rec:
                    pending += [(rec, job) for job in memory_jobs(rec, setting, args.step_steps)]
        if "options" in wanted and models is not None:
            dtype_name = "bf16" if device.type == "cpu" else "fp16"
            setting = bc.Setting(size, 256, DTYPES[dtype_name], device)
            models.to(device, setting.dtype)
            log(f"speed options at 256 {dtype_name}")
            result["options"] = bench_options(models, setting, repeats, args.step_steps)
        if "load" in wanted and models is not None:
            log("load case")
            rec, jobs = bench_load(models, Path(tmp), repeats)
            result["records"].append(rec)
            pending += [(rec, job) for job in jobs]
        del models
        gc.collect()
        # Subprocesses inherit the parent's peak in ru_maxrss (benchmarks.training reads it): start it afresh.
        bc.reset_peak_memory(torch.device("cpu"))
        if not args.no_memory:
            log(f"peak memory: {len(pending)} runs")
            measure_memory(pending, per_job=not args.quick)
    if "train" in wanted:
        log("training cases (benchmarks/training.py)")
        result["records"].extend(bench_train(size, args.quick))
    result["derived"] = derived_ratios(result["records"])
    result["elapsed_s"] = time.time() - started
    return result


def report(result: dict[str, Any]) -> str:
    lines = [markdown_table(result["records"]), ""]
    for d in result["derived"]:
        status = "" if d["target"] is None else f" (target ≤ {d['target']:g}: {'met' if d['met'] else 'missed'})"
        lines.append(f"controlled step / plain UNet step at {d['resolution']} {d['dtype']}: ours {d['ours']:.3f}{status}, "
                     f"diffusers {d['reference']:.3f}")
    if result["options"]:
        lines += ["", "| option (ours, one ControlNet, s/step) | with | without | ratio (median) | spread |",
                  "| --- | --- | --- | --- | --- |"]
        for o in result["options"]:
            lines.append(f"| {o['title']} | {_fmt(o['ours_s'])} | {_fmt(o['reference_s'])} | {_fmt(o['ratio'])} "
                         f"| {_fmt(o['ratio_min'])}–{_fmt(o['ratio_max'])} |")
    m = result["machine"]
    lines += ["", f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, diffusers {m['diffusers']}; "
                  f"model {result['size']}; {result['elapsed_s']:.0f} s"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.memory_child:
        print(json.dumps([bc.memory_child(job) for job in json.loads(args.memory_child)]))
        return 0
    result = run(args)
    print(report(result))
    if args.json:
        from controlnet.fileio import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
