"""Paths from an untrusted source (controlnet.untrusted) and the prompt's <lora:NAME> tags that follow its rule:
inputs only inside the allowed roots, after ``..`` and symlinks, one message whatever the disk holds.

The web UI's cases are served over HTTP in test_ui_security.py; these are the rule itself and the command line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from controlnet.errors import EXIT_BAD_INPUT, UserError
from controlnet.lora import find_tag_lora
from controlnet.untrusted import resolve_untrusted_input


@pytest.fixture
def disk(tmp_path) -> tuple[Path, Path]:
    """A root with a file, a sub-folder, a FIFO and a link out of it; beside it (outside) a secret file."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(b"a")
    (outside / "secret.png").write_bytes(b"s")
    (root / "out.png").symlink_to(outside / "secret.png")
    os.mkfifo(root / "fifo.png")
    return root, outside


def test_inputs_inside_the_roots_resolve_to_their_real_paths(disk):
    root, _ = disk
    real = (root / "sub" / "a.png").resolve()
    assert resolve_untrusted_input(root / "sub" / "a.png", [root], "mask") == real
    assert resolve_untrusted_input("sub/a.png", [root], "mask") == real  # relative to the root, not the cwd
    assert resolve_untrusted_input(str(root / "sub" / ".." / "sub" / "a.png"), [root], "mask") == real
    assert resolve_untrusted_input("sub", [root], "model", folders=True) == (root / "sub").resolve()
    (root / "inner.png").symlink_to(root / "sub" / "a.png")  # a link that stays inside is followed
    assert resolve_untrusted_input("inner.png", [root], "mask") == real


def test_every_refusal_is_one_message_whether_or_not_the_file_exists(disk):
    root, outside = disk
    texts = [str(outside / "secret.png"), str(outside / "missing.png"), "../outside/secret.png", "out.png",
             "fifo.png", "sub", "missing.png", "/etc/passwd", "/etc/nonexistent", "~/.bashrc", "a\0b", "x" * 5000]
    messages = set()
    for text in texts:
        with pytest.raises(UserError) as err:
            resolve_untrusted_input(text, [root], "mask", hint="upload it")
        messages.add(str(err.value).replace(repr(text), "PATH"))
    assert messages == {"mask PATH is not a file in the allowed folders; upload it"}


def _lora(path: Path) -> Path:
    """A tiny file in the diffusers/peft LoRA layout (only its name and place matter here)."""
    save_file({"unet.x.lora_A.weight": torch.zeros(1, 1), "unet.x.lora_B.weight": torch.zeros(1, 1)}, str(path))
    return path


def test_prompt_tags_name_files_in_the_lora_folder_only(tmp_path):
    loras, outside = tmp_path / "loras", tmp_path / "outside"
    (loras / "sub").mkdir(parents=True)
    outside.mkdir()
    style = _lora(loras / "sub" / "style.safetensors")
    secret = _lora(outside / "secret.safetensors")
    (outside / "passwd").write_text("root:x:0:0")
    (loras / "escape.safetensors").symlink_to(secret)
    assert find_tag_lora("style", loras) == style.resolve()  # by stem, in a sub-folder (A1111's lookup)
    assert find_tag_lora("style.safetensors", loras) == style.resolve()
    messages = set()
    for name in [str(secret), str(outside / "passwd"), str(outside / "nothing"), "../outside/secret", "escape",
                 "sub/style", "org/repo", "org/repo/file.safetensors", "..", "missing"]:
        with pytest.raises(UserError) as err:
            find_tag_lora(name, loras)
        messages.add(str(err.value).replace(name, "NAME"))
    assert len(messages) == 1, messages
    assert messages.pop().startswith("LoRA tag <lora:NAME>: no LoRA of that name in the LoRA folder;")
    with pytest.raises(UserError, match="there is no LoRA folder to look in"):
        find_tag_lora(str(secret), None)


def test_the_command_lines_prompt_tags_do_not_leave_the_lora_dir(tmp_path, capsys):
    from controlnet.cli import main

    loras = tmp_path / "loras"
    loras.mkdir()
    secret = _lora(tmp_path / "secret.safetensors")
    common = ["--steps", "1", "--size", "64x64", "-q", "--lora-dir", str(loras), "--out", str(tmp_path / "out")]
    for name in [str(secret), "../secret", "org/repo"]:
        assert main(["generate", "--prompt", f"a circle <lora:{name}>", *common]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"LoRA tag <lora:{name}>: no LoRA of that name in the LoRA folder" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_hub_ids_are_told_by_their_spelling_alone(tmp_path, monkeypatch):
    from controlnet.hub import spelled_as_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)  # a local folder of the same name changes nothing
    assert spelled_as_hub_id("org/name") and spelled_as_hub_id("org/name/sub/model.safetensors")
    for text in ["org", "/org/name", "org//name", "../org/name", "org/../x", "-org/name", "org/name/", "./org/name"]:
        assert not spelled_as_hub_id(text), text
