"""The run's record: OUT/log.jsonl (one JSON object per line), TensorBoard scalars, and OUT/training.png.

Record kinds: ``start`` (cache counts, digest of the locked base), ``train`` (one per optimizer step: loss, lr,
samples/s, empty prompts, gradient norm), ``validation``, ``checkpoint``, ``end`` (the base's digest again).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

from controlnet.fileio import atomic_path, atomic_write_text

# The smoothing of the plotted loss (TensorBoard's default smoothing weight).
LOSS_EMA = 0.9


class RunLog:
    """OUT/log.jsonl, and TensorBoard scalars when the package is installed; only the main process writes.

    On resume (``keep_until`` = the checkpoint's step), records after that step, written before the run was
    stopped, are dropped, so the log reads as one run.
    """

    def __init__(self, path: Path, enabled: bool, keep_until: int | None, tensorboard: bool):
        self.path, self.enabled = path, enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        kept = [r for r in self.records() if keep_until is not None and r.get("step", 0) <= keep_until]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a", encoding="utf-8")
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(path.parent / "tensorboard"))

    def records(self) -> list[dict[str, Any]]:
        """Every complete record in the file (a line cut by a kill is left out)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            if record.get("kind") == "train":
                for name in ("loss", "lr", "samples_per_s"):
                    self._tb.add_scalar(f"train/{name}", record[name], record["step"])
            elif record.get("kind") == "validation":
                self._tb.add_scalar(f"validation/{record['metric']}", record["score"], record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def write_plot(path: Path, records: Sequence[dict[str, Any]], jump: int | None) -> Path | None:
    """A PNG of the loss and the controllability score against steps (matplotlib's object API, no pyplot state);
    None when matplotlib is not installed or nothing was logged."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    train_recs = [r for r in records if r.get("kind") == "train"]
    val_recs = [r for r in records if r.get("kind") == "validation"]
    if not train_recs and not val_recs:
        return None
    fig = Figure(figsize=(8, 6), dpi=100)
    ax_loss, ax_score = fig.subplots(2, 1, sharex=True)
    if train_recs:
        steps = [r["step"] for r in train_recs]
        losses = [r["loss"] for r in train_recs]
        ema = [losses[0]]
        for value in losses[1:]:
            ema.append(LOSS_EMA * ema[-1] + (1 - LOSS_EMA) * value)
        ax_loss.plot(steps, losses, alpha=0.3, label="loss")
        ax_loss.plot(steps, ema, label=f"loss (EMA {LOSS_EMA})")
        ax_loss.legend()
    ax_loss.set_ylabel("MSE loss")
    if val_recs:
        ax_score.plot([r["step"] for r in val_recs], [r["score"] for r in val_recs], marker="o")
        ax_score.set_ylabel(val_recs[-1]["metric"])
    else:
        ax_score.set_ylabel("controllability (no validation)")
    if jump is not None:
        for ax in (ax_loss, ax_score):
            ax.axvline(jump, linestyle="--", color="grey")
        ax_score.annotate(f"sudden convergence: step {jump}", (jump, ax_score.get_ylim()[0]), fontsize=8)
    ax_score.set_xlabel("step")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
