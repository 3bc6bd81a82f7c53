"""Resume: a training run killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from test_train import R, make_base  # the tiny seeded base (pytest puts tests/ on sys.path)

STEPS = 24  # long enough after the first checkpoint that the kill lands mid-run


def _cmd(base, data, out, *extra):
    return [sys.executable, "-m", "controlnet", "train", "--base", str(base), "--data", str(data), "--out", str(out),
            "--resolution", str(R), "--max-steps", str(STEPS), "--checkpoint-every", "4", "--keep", "2",
            "--batch-size", "2", "--grad-accum", "2", "--hflip", "--lr", "1e-4", "--seed", "3",
            "--no-progress", "--no-plot", "--no-tensorboard", *extra]


def test_sigkill_then_resume_latest_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    from controlnet.data.fill import make_fill_dataset
    from controlnet.train import CHECKPOINT_RE

    base = make_base(tmp_path / "base")
    data = make_fill_dataset(tmp_path / "data", n=6, size=R, seed=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.Popen(_cmd(base, data, tmp_path / "whole"), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    killed_out = tmp_path / "killed"
    victim = subprocess.Popen(_cmd(base, data, killed_out), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    checkpoints = killed_out / "checkpoints"
    while victim.poll() is None and time.monotonic() < deadline:
        if checkpoints.is_dir() and any(CHECKPOINT_RE.match(p.name) for p in checkpoints.iterdir()):
            break
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (killed_out / "controlnet").exists()  # it died mid-run

    # Resumed with data-loader workers: the samples depend on (seed, position) only, not on who loads them.
    resumed = subprocess.run(_cmd(base, data, killed_out, "--resume", "latest", "--num-workers", "2"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-2000:]

    records = [json.loads(line) for line in (killed_out / "log.jsonl").read_text().splitlines()]
    starts = [r for r in records if r["kind"] == "start"]
    assert len(starts) == 2 and 0 < starts[1]["step"] < STEPS and starts[1]["resumed_from"]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, STEPS + 1))  # the log reads as one run
    whole_losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()
                    if json.loads(line)["kind"] == "train"]
    assert [r["loss"] for r in records if r["kind"] == "train"] == whole_losses

    a = load_file(tmp_path / "whole" / "controlnet" / "diffusion_pytorch_model.safetensors")
    b = load_file(killed_out / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
