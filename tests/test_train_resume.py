"""Resume: a training run killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_train import R, make_base  # the tiny seeded base (pytest puts tests/ on sys.path)

STEPS = 24  # long enough after the first checkpoint that the kill lands mid-run


def _cmd(base, data, out, *extra):
    return [sys.executable, "-m", "controlnet", "train", "--base", str(base), "--data", str(data), "--out", str(out),
            "--resolution", str(R), "--max-steps", str(STEPS), "--checkpoint-every", "4", "--keep", "2",
            "--batch-size", "2", "--grad-accum", "2", "--hflip", "--lr", "1e-4", "--seed", "3",
            "--quiet", "--no-plot", "--no-tensorboard", *extra]


@pytest.mark.slow  # three training runs in subprocesses, one killed: about a minute
def test_sigkill_then_resume_latest_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    from controlnet.data.fill import make_fill_dataset
    from controlnet.train.state import CHECKPOINT_RE

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
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]  # no temporaries of the kill left


def test_a_checkpoint_with_the_optimizer_state_keyed_by_index_still_resumes(tmp_path):
    """Checkpoint format 1 stored torch's own optimizer state_dict: the AdamW moments keyed by the parameter's
    index (ControlNet parameters in registration order, then the decoder's). Such a checkpoint, written here the
    old way, resumes to the same weights as an uninterrupted run (with the decoder unlocked: two groups)."""
    from controlnet.data.fill import make_fill_dataset
    from controlnet.train import TrainConfig, train
    from controlnet.train.state import STATE_FILE

    base = make_base(tmp_path / "base")
    data = make_fill_dataset(tmp_path / "data", n=6, size=R, seed=1)

    def run(out, steps, **kw):
        return train(TrainConfig(data=data, out=out, base=base, resolution=R, max_steps=steps, checkpoint_every=2,
                                 batch_size=2, lr=1e-4, seed=3, unlock_decoder_after=1, decoder_lr=1e-4, quiet=True,
                                 plot=False, tensorboard=False, **kw))

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "old", 2)
    path = tmp_path / "old" / "checkpoints" / "step-000002" / STATE_FILE
    state = torch.load(path, weights_only=True)
    named = state["optimizer"]
    order = [name for group in named["param_groups"] for name in group["params"]]  # the optimizer's order
    assert order[0].startswith("controlnet.") and order[-1].startswith("unet.")
    index = {name: i for i, name in enumerate(order)}
    state["optimizer"] = {"state": {index[n]: moments for n, moments in named["state"].items()},
                          "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                           for g in named["param_groups"]]}
    state["version"] = 1
    torch.save(state, path)

    resumed = run(tmp_path / "old", 4, resume="latest")
    assert resumed.resumed_from == path.parent and resumed.losses == whole.losses[2:]
    for part in ("controlnet", "unet"):
        a = load_file(tmp_path / "whole" / part / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "old" / part / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
