"""The README's code blocks run as written, in order, in a fresh folder (as a newcomer would paste them).

Skipped: the set-up commands (``make``, ``pip install``) that the test run itself stands on, and ``controlnet ui``,
which serves until stopped (the UI has its own tests). Every other command must exit 0 and the Python block must
run; what they write is checked to exist.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
# Commands the test run stands on or that do not return (a server).
SKIPPED = ("make ", "pip ", "controlnet ui")


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced bash/python block of the README, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(README.read_text(encoding="utf-8"))]


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def test_readme_parses_into_blocks():
    blocks = readme_blocks()
    assert [lang for lang, _ in blocks].count("python") >= 1
    assert sum(len(shell_commands(text)) for lang, text in blocks if lang == "bash") >= 10


@pytest.mark.slow
def test_readme_blocks_run_in_order(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), HF_HUB_OFFLINE="1")
    ran = []
    for lang, text in readme_blocks():
        if lang == "python":
            steps = [[sys.executable, "-c", text]]
        else:
            steps = [["bash", "-c", cmd] for cmd in shell_commands(text) if not cmd.startswith(SKIPPED)]
        for argv in steps:
            proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"README command failed ({proc.returncode}): {argv[-1]}\n{proc.stderr[-2000:]}"
            ran.append(argv[-1])
    assert any(c.startswith("controlnet generate") for c in ran)
    for made in ("examples/circle.png", "outputs/first", "outputs/python.png", "runs/fill-small/controlnet"):
        assert (tmp_path / made).exists(), f"{made} was not written by the README's commands"
