"""The scripts that reproduce the shipped models write to outputs/ by default; only --ship replaces tracked files."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, default, shipped", [
    ("evaluate_demo", "outputs/evaluation.json", "docs/evaluation.json"),
    ("train_embedded", "outputs/tiny-sd", "src/controlnet/assets/tiny-sd"),
])
def test_python_scripts_write_tracked_files_only_with_ship(name, default, shipped, capsys):
    script = _script(name)
    assert script.parse_args([]).out == Path(default)
    assert script.parse_args(["--out", "elsewhere"]).out == Path("elsewhere")
    assert script.parse_args(["--ship"]).out == Path(shipped)
    assert (ROOT / shipped).exists()  # the tracked file or folder --ship replaces
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--ship", "--out", "elsewhere"])
    assert exit_.value.code == 2 and "--ship writes" in capsys.readouterr().err


def test_train_embedded_refuses_an_out_in_the_packages_assets_without_ship(capsys):
    with pytest.raises(SystemExit):
        _script("train_embedded").parse_args(["--out", str(ROOT / "src/controlnet/assets/tiny-sd")])
    assert "pass --ship" in capsys.readouterr().err


@pytest.mark.parametrize("script, controlnet", [("train_fill_controlnet.sh", "fill"),
                                                ("train_tile_controlnet.sh", "tile")])
@pytest.mark.parametrize("ship", [False, True])
def test_shell_scripts_ship_only_with_ship(tmp_path, script, controlnet, ship):
    """Run with a stand-in for Python that records each call: the calls are the data, the training (with its
    progress bar: no --quiet) and, only with --ship, the copy into the package."""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$CALLS"\ncat > /dev/null\n')
    fake.chmod(0o755)
    work = tmp_path / "work"
    argv = [str(ROOT / "scripts" / script), *(["--ship"] if ship else []), str(work), "3"]
    proc = subprocess.run(argv, env={**os.environ, "PYTHON": str(fake), "CALLS": str(calls)}, capture_output=True, stdin=subprocess.DEVNULL,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("-m controlnet data fill " + str(work))
    assert lines[1].startswith("-m controlnet train ") and f"--out {work}/run" in lines[1]
    assert "--max-steps 3" in lines[1] and "--quiet" not in lines[1]
    if ship:
        assert lines[2:] == [f"- {work}/run/controlnet"]
    else:
        hint = f"rerun with --ship to copy it over src/controlnet/assets/controlnets/{controlnet}"
        assert len(lines) == 2 and hint in proc.stdout


def test_train_embedded_shapes_world_writes_its_own_base_only_with_ship():
    script = _script("train_embedded")
    assert script.parse_args(["--world", "shapes"]).out == Path("outputs/tiny-shapes")
    assert script.parse_args(["--world", "shapes", "--ship"]).out == Path("src/controlnet/assets/tiny-shapes")
    assert (ROOT / "src/controlnet/assets/tiny-shapes/model_index.json").is_file()


@pytest.mark.parametrize("kind, annotator", [("canny", "canny"), ("segmentation", "shapes"), ("softedge", "softedge")])
@pytest.mark.parametrize("ship", [False, True])
def test_shapes_controlnet_script_trains_on_the_types_annotator_and_ships_only_with_ship(tmp_path, kind, annotator,
                                                                                      ship):
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> "$CALLS"\ncat > /dev/null\n')
    fake.chmod(0o755)
    work, data = tmp_path / "work", tmp_path / "data"
    argv = [str(ROOT / "scripts" / "train_shapes_controlnet.sh"), *(["--ship"] if ship else []), kind, str(work), "3"]
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "DATA": str(data)}
    proc = subprocess.run(argv, env=env, capture_output=True, stdin=subprocess.DEVNULL, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith(f"-m controlnet data shapes {data}")
    assert f"--annotator {annotator} " in lines[1] and "--base src/controlnet/assets/tiny-shapes" in lines[1]
    if ship:
        assert lines[2:] == [f"- {work}/run/controlnet src/controlnet/assets/controlnets/shapes-{kind}"]
    else:
        assert len(lines) == 2 and f"controlnets/shapes-{kind}" in proc.stdout


def test_shapes_controlnet_script_refuses_an_unknown_type(tmp_path):
    proc = subprocess.run([str(ROOT / "scripts" / "train_shapes_controlnet.sh"), "depth", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "canny, segmentation or softedge" in proc.stderr
