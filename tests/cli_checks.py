"""Checks shared by the command-line tests: a refusal in one line that writes nothing, and an offline hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlnet.errors import EXIT_BAD_INPUT


def refused_in_one_line(code: int, capsys: pytest.CaptureFixture[str], out: Path) -> str:
    """The error of a refused ``controlnet annotate`` run that exited with ``code``: exit 2, one line, no ``out``."""
    assert code == EXIT_BAD_INPUT, f"exit code {code}, expected {EXIT_BAD_INPUT}"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("controlnet annotate: error: "), err
    assert not out.exists(), out
    return err


def offline_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """HF_HUB_CACHE=cache and HF_HUB_OFFLINE=1, also in huggingface_hub.constants (read once, at first use)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
