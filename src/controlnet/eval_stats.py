"""Statistics of ``controlnet evaluate``: means with seeded bootstrap intervals, and paired comparisons of two runs.

Every score of a run is a per-example value (the mean over the example's K images), so the interval is over
examples: the percentile bootstrap (Efron & Tibshirani 1993, ch. 13) of the mean, ``samples`` resamples of the
examples with replacement from a generator seeded ``seed``. A comparison pairs the two runs' examples by id and
bootstraps the mean of the per-example differences the same way (the paired bootstrap of Koehn 2004).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from controlnet.errors import UserError

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
# Scores where smaller is better; every other score is better when larger.
LOWER_IS_BETTER = frozenset({"rmse", "fid"})
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"


def bootstrap_interval(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (NaN left out): ``(low, high)``; NaN for none."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)  # (samples,)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def describe(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """``{"n", "mean", "low", "high"}`` of the finite ``values``: the mean and its bootstrap interval."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    low, high = bootstrap_interval(finite, samples, seed)
    return {"n": len(finite), "mean": float(np.mean(finite)) if finite else float("nan"), "low": low, "high": high}


def better(metric: str, a: float, b: float) -> str:
    """"A" or "B": which value is better for ``metric`` (lower for :data:`LOWER_IS_BETTER`); "tie" when equal."""
    if a == b:
        return "tie"
    return ("A" if a < b else "B") if metric in LOWER_IS_BETTER else ("A" if a > b else "B")


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's results.jsonl, given the file, its summary.json or the run's folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / RESULTS_FILE
    elif path.name == SUMMARY_FILE or path.suffix == ".json":
        path = path.with_name(RESULTS_FILE)
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a run's results.jsonl, its summary.json or its folder "
                        "(written by `controlnet evaluate --out`)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} line {number} is not JSON; give a results.jsonl written by "
                            "`controlnet evaluate`") from None
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("scores"), dict):
            raise UserError(f"{path} line {number} has no id and scores; give a results.jsonl written by "
                            "`controlnet evaluate`")
        rows.append(row)
    if not rows:
        raise UserError(f"{path} is empty; run `controlnet evaluate` to the end first")
    return rows


def compare(a: str | Path, b: str | Path, samples: int = BOOTSTRAP_SAMPLES,
            seed: int = BOOTSTRAP_SEED) -> list[dict[str, Any]]:
    """Per score both runs have: the paired difference ``B - A`` over the examples both scored, its bootstrap
    interval, and which run is better ("A", "B", or "neither" when the interval contains 0)."""
    rows_a, rows_b = ({r["id"]: r["scores"] for r in read_results(p)} for p in (a, b))
    common = [i for i in rows_a if i in rows_b]
    if not common:
        raise UserError(f"{a} and {b} share no example id; compare two runs over the same dataset")
    metrics = [m for m in rows_a[common[0]] if m in rows_b[common[0]]]
    table = []
    for metric in metrics:
        pairs = [(rows_a[i].get(metric), rows_b[i].get(metric)) for i in common]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
        if not pairs:
            continue
        xa, xb = np.array(pairs, np.float64).T
        low, high = bootstrap_interval(xb - xa, samples, seed)
        verdict = "neither" if low <= 0.0 <= high else better(metric, 0.0, float(np.mean(xb - xa)))
        table.append({"metric": metric, "n": len(pairs), "a": float(xa.mean()), "b": float(xb.mean()),
                      "difference": float((xb - xa).mean()), "low": low, "high": high, "better": verdict})
    return table


def format_summary(scores: dict[str, dict[str, Any]]) -> str:
    """The summary table: one line per score, mean and 95% interval."""
    lines = [f"{'score':<16} {'n':>5} {'mean':>10}   95% interval        better"]
    for metric, s in scores.items():
        if s.get("low") is None:
            interval = "(dataset-level)"
        else:
            interval = f"[{s['low']:.4f}, {s['high']:.4f}]"
        direction = "lower" if metric in LOWER_IS_BETTER else "higher"
        lines.append(f"{metric:<16} {s['n']:>5} {s['mean']:>10.4f}   {interval:<19} {direction}")
    return "\n".join(lines)


def format_comparison(table: list[dict[str, Any]], a: str, b: str) -> str:
    """The comparison table: per score, A's and B's means, B - A with its interval, the better run."""
    lines = [f"A = {a}", f"B = {b}",
             f"{'score':<16} {'n':>5} {'A':>10} {'B':>10} {'B - A':>10}   95% interval          better"]
    for r in table:
        interval = f"[{r['low']:+.4f}, {r['high']:+.4f}]"
        lines.append(f"{r['metric']:<16} {r['n']:>5} {r['a']:>10.4f} {r['b']:>10.4f} {r['difference']:>+10.4f}   "
                     f"{interval:<21} {r['better']}")
    return "\n".join(lines)
