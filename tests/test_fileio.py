"""Atomic writes: what is moved into place gets the permissions the user's umask gives, not the writer's own."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from controlnet.fileio import atomic_path, atomic_write_bytes, current_umask


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_current_umask_reads_the_processes_umask(umask):
    assert current_umask() == umask


def test_files_and_folders_get_the_umasks_mode(umask, tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert _mode(tmp_path / "a.bin") == 0o666 & ~umask
    with atomic_path(tmp_path / "folder") as tmp:
        (tmp / "sub").mkdir(parents=True)
        fd = os.open(tmp / "sub" / "private.bin", os.O_WRONLY | os.O_CREAT, 0o600)  # as save_file / mkstemp do
        os.close(fd)
    assert _mode(tmp_path / "folder") == 0o777 & ~umask
    assert _mode(tmp_path / "folder" / "sub") == 0o777 & ~umask
    assert _mode(tmp_path / "folder" / "sub" / "private.bin") == 0o666 & ~umask


@pytest.mark.parametrize("fmt, name", [("diffusers", "cn"), ("original", "cn.safetensors"), ("original", "cn.pth")])
def test_saved_controlnets_get_the_umasks_mode(umask, tmp_path, fmt, name):
    from controlnet.testing import build_unet
    from controlnet.checkpoints import save_controlnet
    from controlnet.model import ControlNet

    path = Path(save_controlnet(ControlNet.from_unet(build_unet("sd1", "tiny")), tmp_path / name, format=fmt))
    written = [path, *path.rglob("*")] if path.is_dir() else [path]
    assert len(written) > 1 or fmt == "original"
    for p in written:
        assert _mode(p) == (0o777 if p.is_dir() else 0o666) & ~umask, p
