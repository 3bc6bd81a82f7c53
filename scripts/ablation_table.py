"""The zero-convolution ablation table (the paper's Fig. 8, as numbers): controllability and colour accuracy
against training steps for several `controlnet train` runs on the same fill data.

    .venv/bin/python scripts/ablation_table.py --data outputs/fill-data \
        "zero convs=outputs/train_fill/run2" "Gaussian convs=outputs/train_fill/gaussian" \
        "ControlNet-lite=outputs/train_fill/lite" --out docs/ablation.md

Each run's ``log.jsonl`` gives the validation IoU per step (`controlnet train --score fill`); the colour accuracy
is read off the same validation grids (``validation/step-NNNNNN.png``: one row per validation example,
condition | sample | dataset image), with the prompts of the data's first examples (the validation set).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from controlnet.data.fill import circle_colour_correct
from controlnet.fileio import atomic_write_text


def validation_prompts(data: Path, n: int) -> list[str]:
    """The prompts of the first ``n`` rows of a fill manifest (the trainer's validation examples)."""
    rows = (data / "prompt.json").read_text().splitlines()[:n]
    return [json.loads(r)["prompt"] for r in rows]


def run_scores(run: Path, data: Path) -> dict[int, tuple[float, float]]:
    """step → (mean validation IoU, colour accuracy of the validation samples)."""
    scores = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") != "validation":
            continue
        grid = np.asarray(Image.open(run / rec["grid"]).convert("RGB"))
        n = len(rec["scores"])
        size = grid.shape[0] // n  # square rows: condition | sample | image
        prompts = validation_prompts(data, n)
        samples = [grid[i * size:(i + 1) * size, size:2 * size] for i in range(n)]
        colour = float(np.mean([circle_colour_correct(s, p) for s, p in zip(samples, prompts)]))
        scores[int(rec["step"])] = (float(rec["score"]), colour)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    ap.add_argument("--data", type=Path, required=True, help="the fill data the runs trained on")
    ap.add_argument("--out", type=Path, default=Path("docs/ablation.md"))
    args = ap.parse_args()

    runs = [(label, run_scores(Path(path), args.data)) for label, path in (r.split("=", 1) for r in args.runs)]
    steps = sorted(set.union(*(set(s) for _, s in runs)))  # a shorter run's missing steps show as "–"
    head = "| step | " + " | ".join(f"{label}: IoU | {label}: colour" for label, _ in runs) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(runs))]
    for step in steps:
        cells = [f"{s[step][0]:.2f} | {s[step][1]:.2f}" if step in s else "– | –" for _, s in runs]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(args.out, table)
    print(table)


if __name__ == "__main__":
    main()
