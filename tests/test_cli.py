"""The command line's plumbing: where errors point, what bare `controlnet` shows, the hub's offline hint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from controlnet.cli import main
from controlnet.errors import EXIT_BAD_INPUT


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--bogus"], "controlnet generate: error: unrecognized arguments: --bogus; "
                                               "see `controlnet generate --help`"),
    (["data", "fill", "out", "--n", "1", "--bogus"], "controlnet data fill: error: unrecognized arguments: --bogus; "
                                                     "see `controlnet data fill --help`"),
    (["upscale", "x.png", "--bogus"], "controlnet upscale: error: unrecognized arguments: --bogus; "
                                      "see `controlnet upscale --help`"),
])
def test_an_unknown_option_points_to_its_sub_commands_help(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == EXIT_BAD_INPUT
    assert capsys.readouterr().err == message + "\n"


def test_bare_controlnet_prints_the_help():
    from controlnet.cli import build_parser

    proc = subprocess.run([sys.executable, "-m", "controlnet.cli"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == build_parser().format_help()


def test_a_hub_error_suggests_hf_hub_offline(monkeypatch):
    from controlnet.hub import _not_available

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    message = _not_available("org/name", None, None, ConnectionError("no route to host"))
    assert message == ("cannot get org/name from the Hugging Face hub (ConnectionError: no route to host); fetch it "
                       "with `hf download org/name`, or set HF_HUB_OFFLINE=1 to use only the Hugging Face cache "
                       "without network retries")


def test_train_help_says_how_to_launch_several_processes_without_accelerates_traceback(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "accelerate launch --quiet -m controlnet train" in " ".join(capsys.readouterr().out.split())
