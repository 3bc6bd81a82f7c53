"""Figures of the shapes world's measurements (docs/results.md): validation score against training steps for runs
of `controlnet train`, and held-out scores with their bootstrap intervals from `controlnet evaluate` summaries.

    python scripts/shapes_figures.py curves OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--title T]
    python scripts/shapes_figures.py panels OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]     # one panel per run
    python scripts/shapes_figures.py bars OUT.png LABEL=EVAL_DIR [LABEL=EVAL_DIR ...] [--title T]

RUN_DIR is a `controlnet train --out` folder (its log.jsonl); EVAL_DIR a `controlnet evaluate --out` folder (its
summary.json). Only matplotlib's object API is used (no pyplot state).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from controlnet.fileio import atomic_path


def _pairs(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: write LABEL=PATH")
        out.append((label, Path(path)))
    return out


def validation_curve(run: Path) -> tuple[list[int], list[float], str]:
    """(steps, scores, metric) of the validation records of a training run's log.jsonl."""
    steps, scores, metric = [], [], ""
    for line in (run / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "score" in row and "step" in row and row.get("metric"):
            steps.append(int(row["step"]))
            scores.append(float(row["score"]))
            metric = row["metric"]
    return steps, scores, metric


def summary_score(folder: Path) -> tuple[str, float, float, float]:
    """(metric, mean, low, high) of the primary score of an evaluation's summary.json."""
    summary = json.loads((folder / "summary.json").read_text())
    metric = summary["score"]
    described = summary["scores"][metric]
    return metric, described["mean"], described["low"], described["high"]


def _save(figure, out: Path) -> None:
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


def plot_curves(out: Path, runs: list[tuple[str, Path]], title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6))
    ax = figure.add_subplot()
    metric = ""
    for label, run in runs:
        steps, scores, metric = validation_curve(run)
        ax.plot(steps, scores, marker="o", markersize=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(figure, out)


def plot_panels(out: Path, runs: list[tuple[str, Path]], title: str) -> None:
    """One panel per run, each in its own metric (runs of different condition types)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.7 * len(runs), 3.2))
    for i, (label, run) in enumerate(runs):
        ax = figure.add_subplot(1, len(runs), i + 1)
        steps, scores, metric = validation_curve(run)
        ax.plot(steps, scores, marker="o", markersize=3)
        ax.set_title(label)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    _save(figure, out)


def plot_bars(out: Path, evaluations: list[tuple[str, Path]], title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6))
    ax = figure.add_subplot()
    metric = ""
    for i, (label, folder) in enumerate(evaluations):
        metric, mean, low, high = summary_score(folder)
        ax.bar(i, mean, yerr=[[mean - low], [high - mean]], capsize=4)
        ax.text(i, high, f"{mean:.2f}", ha="center", va="bottom")
    ax.set_xticks(range(len(evaluations)), [label for label, _ in evaluations])
    ax.set_ylabel(f"held-out {metric} (95% interval)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    _save(figure, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("curves", "panels", "bars"))
    ap.add_argument("out", type=Path)
    ap.add_argument("items", nargs="+", help="LABEL=PATH")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    plot = {"curves": plot_curves, "panels": plot_panels, "bars": plot_bars}[args.kind]
    plot(args.out, _pairs(args.items), args.title)


if __name__ == "__main__":
    main()
