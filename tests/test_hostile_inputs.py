"""A table of bad inputs across every command: each must exit with code 2, say why in at most 3 lines of stderr
without a traceback, and write nothing.

Most cases run in-process through :func:`controlnet.cli.main`. The memory cases (sizes a user or a file controls)
run in a subprocess under a memory limit (``RLIMIT_AS``), so that a regression fails on an allocation instead of
taking the machine's memory; the disk-full cases run in a subprocess under a file-size limit (``RLIMIT_FSIZE``:
a write past it fails with EFBIG, as a full disk fails with ENOSPC). Every case names a fragment its message must
contain, so a case cannot pass by failing for another reason (running out of memory included).

Model-dependent cases use the embedded tiny base and the bundled ``fill`` ControlNet (shipped in the package).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet.cli import describe_failure, main
from controlnet.errors import EXIT_BAD_INPUT

MEMORY_LIMIT = 3 * 2**30  # bytes of address space for the memory cases (importing torch maps about 1 GB)
FILE_SIZE_LIMIT = 64  # bytes: every PNG (signature, header, data, end: more than 64) or checkpoint is larger
MAX_STDERR_LINES = 3


@dataclass
class Case:
    """One bad input: ``argv`` with ``{fx}`` (the fixtures folder) and ``{work}`` (an empty folder for outputs)."""

    id: str
    argv: list[str]
    expect: str  # a fragment of the one-line message
    memory: bool = False  # run in a subprocess under MEMORY_LIMIT
    file_size: bool = False  # run in a subprocess under FILE_SIZE_LIMIT
    marks: list = field(default_factory=list)


def gen(*extra: str) -> list[str]:
    return ["generate", "--prompt", "red circle", "-q", "--steps", "2", "--out", "{work}/out", *extra]


FILL = ["--controlnet", "fill", "--control", "{fx}/ok.png"]
TRAIN = ["train", "--data", "{fx}/data", "--out", "{work}/run", "-q", "--max-steps", "1"]

CASES = [
    # generate: sizes a user or a file controls (memory), then every other input
    Case("generate-size-huge", gen("--size", "99999x99999"), "each side in 1..16384", memory=True),
    Case("generate-control-100000x1", gen("--controlnet", "fill", "--control", "{fx}/wide.png", "--size", "64x64"),
         "aspect ratio", memory=True),
    Case("generate-control-100000x1-default-size", gen("--controlnet", "fill", "--control", "{fx}/wide.png"),
         "over the limit", memory=True),
    Case("generate-control-10000x10000", gen("--controlnet", "fill", "--control", "{fx}/big.png"),
         "input images", memory=True),
    Case("generate-size-over-max-pixels", gen("--size", "512x512", "--max-pixels", "4096"), "--max-pixels 4,096"),
    Case("generate-max-pixels-zero", gen("--max-pixels", "0"), "--max-pixels must be"),
    Case("generate-size-zero", gen("--size", "0x64"), "WIDTHxHEIGHT"),
    Case("generate-size-text", gen("--size", "large"), "WIDTHxHEIGHT"),
    Case("generate-steps-zero", gen("--steps", "0"), "steps must be in 1..1000"),
    Case("generate-steps-beyond-scheduler", gen("--steps", "5000"), "steps must be in 1..1000"),
    Case("generate-steps-not-a-number", gen("--steps", "ten"), "invalid int value"),
    Case("generate-seed-negative", gen("--seed", "-2"), "seed must be"),
    Case("generate-seed-2**63", gen("--seed", str(2**63)), "seed must be"),
    Case("generate-num-images-zero", gen("--num-images", "0"), "number of images must be in 1..12"),
    Case("generate-num-images-13", gen("--num-images", "13"), "number of images must be in 1..12"),
    Case("generate-device-absent", gen("--device", "cuda:99"), "not available"),
    Case("generate-device-unknown", gen("--device", "tpu"), "unknown device"),
    Case("generate-control-fifo", gen("--controlnet", "fill", "--control", "{fx}/fifo"), "not a regular file"),
    Case("generate-control-missing", gen("--controlnet", "fill", "--control", "{fx}/nope.png"), "no such file"),
    Case("generate-control-folder", gen("--controlnet", "fill", "--control", "{fx}/folder"), "is a folder"),
    Case("generate-control-not-an-image", gen("--controlnet", "fill", "--control", "{fx}/broken.png"),
         "not an image file"),
    Case("generate-control-empty-file", gen("--controlnet", "fill", "--control", "{fx}/empty.png"), "not an image"),
    Case("generate-control-truncated-png", gen("--controlnet", "fill", "--control", "{fx}/truncated.png"),
         "truncated"),
    Case("generate-out-is-a-file", gen("--out", "{fx}/a_file"), "is a file"),
    Case("generate-out-under-a-file", gen("--out", "{fx}/a_file/sub"), "is a file, not a folder"),
    Case("generate-controlnet-unknown", gen("--controlnet", "nope", "--control", "{fx}/ok.png"), "no ControlNet"),
    Case("generate-controlnet-fifo", gen("--controlnet", "{fx}/fifo", "--control", "{fx}/ok.png"),
         "not a regular file"),
    Case("generate-controlnet-non-finite", gen("--controlnet", "{fx}/cn-nan", "--control", "{fx}/ok.png"), "NaN"),
    Case("generate-controlnet-absurd-config", gen("--controlnet", "{fx}/cn-badconfig", "--control", "{fx}/ok.png"),
         "block_out_channels"),
    Case("generate-control-without-controlnet", gen("--control", "{fx}/ok.png"), "1 --control"),
    Case("generate-strength-negative", gen(*FILL, "--strength", "-1"), "strength must be"),
    Case("generate-start-above-1", gen(*FILL, "--start", "2"), "start must be in [0, 1]"),
    Case("generate-start-after-end", gen(*FILL, "--start", "0.8", "--end", "0.2"), "is after end"),
    Case("generate-option-before-its-unit", gen("--strength", "0.5", *FILL), "must come after"),
    Case("generate-annotator-unknown", gen(*FILL, "--annotator", "nope"), "unknown annotator"),
    Case("generate-annotator-param-without-annotator", gen(*FILL, "--annotator-param", "a=1"), "no --annotator"),
    Case("generate-annotator-param-unknown", gen(*FILL, "--annotator", "canny", "--annotator-param", "bogus=1"),
         "bogus"),
    Case("generate-guidance-nan", gen("--guidance", "nan"), "guidance must be"),
    Case("generate-guidance-overflow", gen("--guidance", "1e38"), "NaN or Inf"),
    Case("generate-eta-above-1", gen("--eta", "2"), "eta must be in [0, 1]"),
    Case("generate-reuse-residuals-zero", gen("--reuse-residuals", "0"), "reuse_residuals must be"),
    Case("generate-base-missing", gen("--base", "{fx}/nope"), "nope"),
    Case("generate-dtype-unknown", gen("--dtype", "fp8"), "invalid choice"),
    Case("generate-scheduler-unknown", gen("--scheduler", "nope"), "'nope'"),
    Case("generate-unknown-option", gen("--bogus"), "unrecognized arguments"),
    Case("generate-no-prompt", ["generate", "--out", "{work}/out"], "--prompt"),
    Case("generate-disk-full", gen("--size", "64x64"), "File too large", file_size=True),
    # annotate
    Case("annotate-unknown-annotator", ["annotate", "nope", "{fx}/ok.png", "{work}/o.png"], "unknown annotator"),
    Case("annotate-input-missing", ["annotate", "canny", "{fx}/nope.png", "{work}/o.png"], "no such file"),
    Case("annotate-input-fifo", ["annotate", "canny", "{fx}/fifo", "{work}/o.png"], "not a regular file"),
    Case("annotate-input-10000x10000", ["annotate", "canny", "{fx}/big.png", "{work}/o.png"], "input images",
         memory=True),
    Case("annotate-output-not-png", ["annotate", "canny", "{fx}/ok.png", "{work}/o.jpg"], "must be a .png"),
    Case("annotate-output-under-a-file", ["annotate", "canny", "{fx}/ok.png", "{fx}/a_file/o.png"],
         "cannot write the PNG"),
    Case("annotate-param-wrong-type", ["annotate", "canny", "{fx}/ok.png", "{work}/o.png", "--low_threshold", "abc"],
         "expects an integer"),
    Case("annotate-param-unknown", ["annotate", "canny", "{fx}/ok.png", "{work}/o.png", "--bogus", "1"], "bogus"),
    Case("annotate-workers-negative", ["annotate", "canny", "{fx}/ok.png", "{work}/o.png", "--workers", "-1"],
         "--workers must be >= 0"),
    Case("annotate-no-name", ["annotate"], "give an annotator NAME"),
    Case("annotate-plugin-missing", ["annotate", "--plugin", "{fx}/nope.py", "--list"], "no such Python file"),
    Case("annotate-disk-full", ["annotate", "canny", "{fx}/ok.png", "{work}/o.png"], "File too large",
         file_size=True),
    # convert
    Case("convert-src-missing", ["convert", "{fx}/nope", "{work}/o", "--to", "diffusers"], "nope"),
    Case("convert-src-fifo", ["convert", "{fx}/fifo", "{work}/o.safetensors", "--to", "original"],
         "not a regular file"),
    Case("convert-dst-wrong-suffix", ["convert", "fill", "{work}/o.txt", "--to", "original"], ".safetensors"),
    Case("convert-absurd-config", ["convert", "{fx}/cn-badconfig", "{work}/o", "--to", "diffusers"],
         "block_out_channels"),
    Case("convert-non-finite-weights", ["convert", "{fx}/cn-nan", "{work}/o", "--to", "diffusers"], "NaN"),
    Case("convert-truncated-file", ["convert", "{fx}/truncated.safetensors", "{work}/o", "--to", "diffusers"],
         "truncated.safetensors"),
    Case("convert-pickle-with-code", ["convert", "{fx}/evil.pth", "{work}/o", "--to", "diffusers"], "refused"),
    Case("convert-config-missing", ["convert", "fill", "{work}/o", "--to", "diffusers", "--config", "{fx}/nope.json"],
         "nope.json"),
    Case("convert-to-missing", ["convert", "fill", "{work}/o"], "--to"),
    Case("convert-disk-full", ["convert", "fill", "{work}/o.safetensors", "--to", "original"], "File too large",
         file_size=True),
    # data
    Case("data-fill-size-99992", ["data", "fill", "{work}/d", "--size", "99992"], "over the limit", memory=True),
    Case("data-fill-size-8", ["data", "fill", "{work}/d", "--size", "8"], "at least 16"),
    Case("data-fill-size-not-multiple-of-8", ["data", "fill", "{work}/d", "--size", "100"], "multiple of 8"),
    Case("data-fill-n-zero", ["data", "fill", "{work}/d", "--n", "0"], "--n must be at least 1"),
    Case("data-fill-max-pixels-negative", ["data", "fill", "{work}/d", "--max-pixels", "-5"], "--max-pixels must be"),
    Case("data-fill-out-not-empty", ["data", "fill", "{fx}", "--n", "1"], "not empty"),
    Case("data-fill-out-is-a-file", ["data", "fill", "{fx}/a_file", "--n", "1"], "not empty"),
    Case("data-fill-disk-full", ["data", "fill", "{work}/d", "--n", "3", "--size", "64"], "File too large",
         file_size=True),
    Case("data-no-kind", ["data"], "KIND"),
    # train
    Case("train-resolution-99968", [*TRAIN, "--resolution", "99968"], "over the limit", memory=True),
    Case("train-out-is-a-file", [*TRAIN[:3], "--out", "{fx}/a_file"], "is a file"),
    Case("train-cache-dir-is-a-file", [*TRAIN, "--cache-dir", "{fx}/a_file"], "is a file"),
    Case("train-export-original-suffix", [*TRAIN, "--export-original", "{work}/x.txt"], "one file ending in"),
    Case("train-data-missing", ["train", "--data", "{fx}/nope", "--out", "{work}/run"], "does not exist"),
    Case("train-lr-zero", [*TRAIN, "--lr", "0"], "--lr must be a positive number"),
    Case("train-batch-size-zero", [*TRAIN, "--batch-size", "0"], "--batch-size must be >= 1"),
    Case("train-empty-prompt-prob", [*TRAIN, "--empty-prompt-prob", "2"], "--empty-prompt-prob must be in [0, 1]"),
    Case("train-mixed-precision-unknown", [*TRAIN, "--mixed-precision", "fp8"], "invalid choice"),
    # ui
    Case("ui-outputs-is-a-file", ["ui", "--outputs", "{fx}/a_file"], "is a file"),
    Case("ui-port-zero", ["ui", "--port", "0", "--outputs", "{work}/ui"], "--port must be in 1..65535"),
    Case("ui-auth-without-password", ["ui", "--auth", "admin", "--outputs", "{work}/ui"], "USER:PASSWORD"),
    Case("ui-models-dir-missing", ["ui", "--models-dir", "{fx}/nope", "--outputs", "{work}/ui"], "not a folder"),
    Case("ui-timeout-zero", ["ui", "--timeout", "0", "--outputs", "{work}/ui"], "--timeout must be"),
    Case("ui-max-pixels-zero", ["ui", "--max-pixels", "0", "--outputs", "{work}/ui"], "--max-pixels must be"),
    # demo and the command line itself
    Case("demo-steps-zero", ["demo", "--steps", "0", "--out", "{work}/demo"], "--steps must be at least 1"),
    Case("no-command", ["-q"], "COMMAND"),  # bare `controlnet` prints the help (tests/test_cli.py)
    Case("unknown-command", ["frobnicate"], "invalid choice"),
]


# --------------------------------------------------------------------------- fixtures


def _evil_pickle(path: Path) -> None:
    """A legacy pickle whose loading would call os.system (it must be refused, never run)."""
    path.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """The inputs the cases read: images good and bad, a FIFO, a file, broken and hostile checkpoints, fill data."""
    from safetensors.torch import load_file, save_file

    from controlnet.data.fill import make_fill_dataset
    from controlnet.embedded import bundled_controlnets

    root = tmp_path_factory.mktemp("hostile")
    Image.new("RGB", (64, 64), (255, 255, 255)).save(root / "ok.png")
    Image.new("L", (100000, 1), 255).save(root / "wide.png")  # 178 bytes
    Image.new("L", (10000, 10000), 0).save(root / "big.png")  # about 100 KB
    good = root / "ok.png"
    (root / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (root / "broken.png").write_bytes(b"not a png at all")
    (root / "empty.png").write_bytes(b"")
    (root / "a_file").write_text("a file, not a folder")
    (root / "folder").mkdir()
    os.mkfifo(root / "fifo")
    fill = bundled_controlnets()["fill"]
    weights = load_file(fill / "diffusion_pytorch_model.safetensors")
    nan = root / "cn-nan"
    nan.mkdir()
    shutil.copy(fill / "config.json", nan / "config.json")
    first = sorted(weights)[0]
    weights[first] = weights[first].clone().fill_(float("nan"))
    save_file(weights, str(nan / "diffusion_pytorch_model.safetensors"))
    bad = root / "cn-badconfig"
    shutil.copytree(fill, bad)
    config = json.loads((bad / "config.json").read_text())
    config["block_out_channels"] = [0, 64, 64]
    (bad / "config.json").write_text(json.dumps(config))
    data = (fill / "diffusion_pytorch_model.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 3])
    _evil_pickle(root / "evil.pth")
    make_fill_dataset(root / "data", n=2, size=64, seed=0)
    return root


def _snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folders`` with its size and modification time (what "nothing written" compares)."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            info = path.lstat()
            found[str(path)] = (info.st_size if path.is_file() else 0, info.st_mtime_ns)
    return found


def _fill(argv: list[str], fx: Path, work: Path) -> list[str]:
    return [a.replace("{fx}", str(fx)).replace("{work}", str(work)) for a in argv]


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse
        code = stop.code
    return code, capsys.readouterr().err


def _run_limited(argv: list[str], cwd: Path, memory: int | None = None, file_size: int | None = None) -> tuple[int, str]:
    """``controlnet ARGV`` in a fresh interpreter under the given resource limits."""
    script = (
        "import resource, sys\n"
        f"memory, file_size = {memory!r}, {file_size!r}\n"
        "if memory: resource.setrlimit(resource.RLIMIT_AS, (memory, memory))\n"
        "if file_size: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))\n"
        "from controlnet.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stderr


# --------------------------------------------------------------------------- the table


def test_table_is_large_and_ids_are_unique():
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, fx, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative default (outputs/) would land here and be seen
    argv = _fill(case.argv, fx, work)
    before = _snapshot(fx, work)
    if case.memory or case.file_size:
        code, err = _run_limited(argv, work, MEMORY_LIMIT if case.memory else None,
                                 FILE_SIZE_LIMIT if case.file_size else None)
    else:
        code, err = _run_in_process(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_BAD_INPUT, err
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= MAX_STDERR_LINES, err
    assert case.expect in err, err
    assert _snapshot(fx, work) == before, "something was written"


# --------------------------------------------------------------------------- cases that need a setup


def test_port_taken_is_one_line_and_nothing_is_written(fx, tmp_path, capsys):
    pytest.importorskip("gradio", reason="the web UI's extra is not installed")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, err = _run_in_process(["ui", "--port", str(port), "--outputs", str(tmp_path / "ui")], capsys)
    assert code == EXIT_BAD_INPUT and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"127.0.0.1:{port}" in err and "--port" in err
    assert not (tmp_path / "ui").exists()  # the port is checked before the output folder is made


def test_second_training_run_on_a_locked_folder_refuses_naming_the_pid(fx, tmp_path, capsys):
    from controlnet.train.folder import locked

    out = tmp_path / "run"
    with locked(out):
        before = _snapshot(tmp_path)
        code, err = _run_in_process(["train", "--data", str(fx / "data"), "--out", str(out), "-q", "--max-steps",
                                     "1", "--resolution", "64"], capsys)
        after = _snapshot(tmp_path)
    assert code == EXIT_BAD_INPUT and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"pid {os.getpid()}" in err
    assert after == before


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/.00000-0.png.k2j4.tmp"),
     "/data/out/00000-0.png: No space left on device; free some space"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"), "/data/out: Permission denied"),
    (OSError(errno.EFBIG, "File too large", "/data/x.safetensors"), "ulimit -f"),
    (MemoryError(), "out of memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 4000000000 bytes."), "out of memory"),
])
def test_failures_of_the_machine_become_one_line(error, expected):
    message = describe_failure(error)
    assert message is not None and expected in message and "\n" not in message


def test_opencv_out_of_memory_becomes_one_line():
    import cv2

    message = describe_failure(cv2.error("OpenCV(5.0.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to "
                                         "allocate 4915200000 bytes in function 'OutOfMemoryError'"))
    assert message is not None and message.startswith("out of memory (") and "\n" not in message


def test_safetensors_error_becomes_one_line():
    from safetensors import SafetensorError

    message = describe_failure(SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'))
    assert message == "cannot read or write a .safetensors file (No space left on device); check the free space and the file"


def test_bugs_keep_their_traceback():
    assert describe_failure(ValueError("a bug")) is None
    assert describe_failure(RuntimeError("shapes cannot be multiplied")) is None


def test_no_space_while_writing_generate_outputs_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """ENOSPC itself (not the file-size limit): the PNG writer fails after part of the outputs are written."""
    from PIL import PngImagePlugin

    calls = []
    real = PngImagePlugin._save

    def fail_on_second(im, fp, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(im, fp, filename, *args, **kwargs)

    monkeypatch.setattr(PngImagePlugin, "_save", fail_on_second)
    Image.register_save("PNG", fail_on_second)
    try:
        out = tmp_path / "out"
        code, err = _run_in_process(["generate", "--prompt", "red circle", "-q", "--steps", "1", "--size", "64x64",
                                     "--num-images", "2", "--out", str(out)], capsys)
    finally:
        Image.register_save("PNG", real)
    assert code == EXIT_BAD_INPUT and len(calls) == 2, err
    assert "No space left on device" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{out}/00000-" in err and ".tmp" not in err  # the file being written, not its temporary name
    assert not out.exists() or list(out.iterdir()) == []


def test_cases_cover_every_command():
    commands = {case.argv[0] for case in CASES if case.argv and not case.argv[0].startswith("-")}
    assert commands == {"generate", "annotate", "convert", "data", "train", "ui", "demo", "frobnicate"}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_fixture_images_are_what_the_cases_say(fx):
    with Image.open(fx / "wide.png") as im:
        assert im.size == (100000, 1) and (fx / "wide.png").stat().st_size < 1000
    with Image.open(fx / "big.png") as im:
        assert im.size == (10000, 10000) and (fx / "big.png").stat().st_size < 200_000
    assert np.asarray(Image.open(fx / "ok.png")).shape == (64, 64, 3)


# --------------------------------------------------------------------------- stored settings (--from-png): untrusted

# A valid generation's settings as a PNG of ours stores them; each case below spoils one part.
STORED = {"prompt": "red circle", "negative_prompt": "", "steps": 2, "scheduler": "ddim", "guidance": 5.0, "seed": 3,
          "size": "64x64", "eta": 0.0, "guess_mode": False, "reuse_residuals": 1, "num_images": 1, "dtype": "fp32",
          "base": "embedded", "controlnets": [{"controlnet": "fill", "control": "ok.png", "strength": 1.0,
                                               "start": 0.0, "end": 1.0, "control_mode": "balanced",
                                               "annotator": "", "annotator_params": {}}]}
A1111 = "red circle\nSteps: 2, Sampler: DDIM, CFG scale: 5.0, Seed: 3, Size: 64x64, Model: embedded"


def _unit(**changes):
    return {**STORED["controlnets"][0], **changes}


# (id, the PNG's text chunks, a fragment of the message)
STORED_CASES = [
    ("steps-text", {**STORED, "steps": "20"}, "steps must be a whole number"),
    ("seed-text", {**STORED, "seed": "3"}, "seed must be a whole number"),
    ("guidance-text", {**STORED, "guidance": "9"}, "guidance must be a finite number"),
    ("guidance-nan", {**STORED, "guidance": float("nan")}, "guidance must be a finite number"),
    ("clip-skip-text", {**STORED, "clip_skip": "2"}, "clip skip must be a whole number"),
    ("mask-blur-text", {**STORED, "init_image": "ok.png", "mask": "ok.png", "mask_blur": "4"},
     "mask blur must be a finite number"),
    ("size-int", {**STORED, "size": 64}, "give WIDTHxHEIGHT"),
    ("size-huge", {**STORED, "size": "99999999x99999999"}, "each side in"),
    ("steps-huge", {**STORED, "steps": 10**12}, "steps must be in"),
    ("bool-as-int", {**STORED, "steps": True}, "steps must be a whole number"),
    ("prompt-list", {**STORED, "prompt": ["red"]}, "the prompt must be text"),
    ("controlnets-missing-keys", {**STORED, "controlnets": [{"strength": 1}]}, "has no controlnet and control"),
    ("controlnets-not-list", {**STORED, "controlnets": {"a": 1}}, "must be a list of objects"),
    ("controlnets-strings", {**STORED, "controlnets": ["fill"]}, "must be a list of objects"),
    ("unit-strength-text", {**STORED, "controlnets": [_unit(strength="1")]}, "strength must be a number"),
    ("hires-not-object", {**STORED, "hires": "x"}, "hires settings must be a JSON object"),
    ("hires-scale-text", {**STORED, "hires": {"scale": "2"}}, "hires scale must be a finite number"),
    ("hires-scale-huge", {**STORED, "hires": {"scale": 1e308}}, "hires scale must be a number in"),
    ("hires-upscaler-list", {**STORED, "hires": {"upscaler": ["latent"]}}, "unknown hires upscaler"),
    ("lora-files-malformed", {**STORED, "lora_files": {"a": "x"}}, "LoRA files must be"),
    ("lora-weights-text", {**STORED, "lora_files": {"a": ["a.safetensors", "1", "1"]}}, "weights must be numbers"),
    ("embeddings-malformed", {**STORED, "embeddings": ["x"]}, "embeddings must be"),
    ("annotator-params-list", {**STORED, "controlnets": [_unit(annotator="canny", annotator_params=[1])]},
     "parameters an object"),
    ("annotator-output-path", {**STORED, "controlnets": [_unit(annotator="openpose",
                                                               annotator_params={"json": "keypoints.json"})]},
     "names a file to write"),
    ("annotator-weights-outside", {**STORED, "controlnets": [_unit(annotator="openpose",
                                                                   annotator_params={"weights": "/etc/body.pth"})]},
     "is not a file in the allowed folders"),
    ("control-outside", {**STORED, "controlnets": [_unit(control="/etc/hostname")]}, "is not a file in the allowed folders"),
    ("controlnet-outside", {**STORED, "controlnets": [_unit(controlnet="../../elsewhere/cn")]}, "is not a file in the allowed folders"),
    ("init-image-outside", {**STORED, "init_image": "/etc/passwd", "denoise": 0.5}, "is not a file in the allowed folders"),
    ("lora-outside", {**STORED, "lora_files": {"a": ["/tmp/../etc/a.safetensors", 1.0, 1.0]}}, "is not a file in the allowed folders"),
    ("in-memory-control", {**STORED, "controlnets": [_unit(control="<ndarray>")]}, "given in memory"),
]
RAW_CASES = [  # (id, chunks as text, fragment)
    ("settings-not-json", {"settings": "{not json"}, "not JSON"),
    ("settings-list", {"settings": "[1, 2]"}, "a JSON list"),
    ("settings-number", {"settings": "3"}, "a JSON int"),
    ("settings-deep", {"settings": "[" * 5000 + "]" * 5000}, "nested deeper"),
    ("settings-huge", {"settings": json.dumps({**STORED, "prompt": "x" * 900_000})}, "characters"),
    ("a1111-steps-text", {"parameters": A1111.replace("Steps: 2", "Steps: many")}, "Steps 'many' is not a whole"),
    ("a1111-seed-float", {"parameters": A1111.replace("Seed: 3", "Seed: 1.5")}, "Seed '1.5' is not a whole"),
    ("a1111-cfg-text", {"parameters": A1111.replace("CFG scale: 5.0", "CFG scale: high")}, "is not a number"),
    ("a1111-broken-quote", {"parameters": A1111 + ', ControlNet 0: "Module: canny, Model: x'}, "no closing quote"),
    ("a1111-huge", {"parameters": "a " * 450_000 + "\nSteps: 2, Sampler: DDIM, CFG scale: 5"}, "characters"),
    ("a1111-steps-zero", {"parameters": A1111.replace("Steps: 2", "Steps: 0")}, "steps must be in"),
    ("no-settings", {"comment": "hello"}, "no generation settings"),
]


def _stored_png(folder: Path, chunks: dict[str, str]) -> Path:
    """A PNG in ``folder`` whose text chunks are ``chunks``, with the condition image its settings name beside it."""
    from PIL import PngImagePlugin

    folder.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (255, 255, 255)).save(folder / "ok.png")
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value, zip=len(value) > 1000)
    Image.new("RGB", (8, 8)).save(folder / "stored.png", pnginfo=info)
    return folder / "stored.png"


@pytest.mark.parametrize("chunks, expect", [(({"settings": json.dumps(s)}), e) for _, s, e in STORED_CASES]
                         + [(c, e) for _, c, e in RAW_CASES],
                         ids=[i for i, _, _ in STORED_CASES] + [i for i, _, _ in RAW_CASES])
def test_stored_settings_are_checked_as_options_are(chunks, expect, tmp_path, capsys, monkeypatch):
    """A PNG's settings, spoiled one part at a time: exit 2 and one line naming the part, before any model loads
    and with nothing written."""
    png = _stored_png(tmp_path / "png", chunks)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    code, err = _run_in_process(["generate", "--from-png", str(png), "-q", "--out", str(work / "out")], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_BAD_INPUT and "Traceback" not in err and len(lines) == 1, err
    assert expect in err, err
    assert _snapshot(tmp_path) == before, "something was written"


def test_stored_settings_that_are_valid_give_the_options_back(tmp_path, monkeypatch):
    """The unspoiled settings and A1111 text become the options they came from (so the cases above fail for the
    reason they name, not for every input)."""
    from controlnet.commands.generate import stored_options

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    options = stored_options({"settings": json.dumps(STORED)}, str(tmp_path / "stored.png"))
    assert (options["prompt"], options["steps"], options["seed"], options["size"], options["guidance"]) == (
        "red circle", 2, 3, "64x64", 5.0)
    assert options["unit_options"][:2] == [("--controlnet", "fill"), ("--control", str((tmp_path / "ok.png").resolve()))]
    a1111 = stored_options({"parameters": A1111 + ", Hires upscale: 2, Hires steps: 3, Denoising strength: 0.5"},
                           str(tmp_path / "stored.png"))
    assert (a1111["steps"], a1111["seed"], a1111["size"], a1111["scheduler"]) == (2, 3, "64x64", "ddim")
    assert (a1111["hires_scale"], a1111["hires_steps"], a1111["hires_denoise"]) == (2.0, 3, 0.5)


def test_a1111_parser_is_linear_on_long_lines():
    """Texts that made the backtracking expression run for minutes parse (or are refused) at once: the result is
    checked, and the inputs are large enough that a quadratic parser would not finish the test run."""
    from controlnet.a1111 import parse_parameters

    for text in ("a " * 450_000 + ":", "," * 900_000 + ":", "a" * 900_000, 'x: "' + "\\\\" * 200_000):
        parsed = parse_parameters(text)
        assert parsed["Prompt"] == text.strip("\n") and parsed["Negative prompt"] == ""


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_KEYS = st.sampled_from(sorted({*STORED, "hires", "init_image", "mask", "mask_blur", "denoise", "lora_files",
                                "embeddings", "clip_skip", "vae", "lora_dir", "inpaint_full_res", "mask_invert"}))


@st.composite
def _stored_chunks(draw):
    """Mutated settings, random JSON, or A1111 text with random values."""
    kind = draw(st.sampled_from(["mutated", "json", "a1111", "text"]))
    if kind == "mutated":
        settings = {**STORED, **draw(st.dictionaries(_KEYS, _JSON, max_size=4))}
        return {"settings": json.dumps(settings)}
    if kind == "json":
        return {"settings": json.dumps(draw(_JSON))}
    if kind == "a1111":
        fields = draw(st.dictionaries(st.sampled_from(["Steps", "Seed", "CFG scale", "Size", "Sampler",
                                                       "Hires upscale", "Hires steps", "Denoising strength",
                                                       "Hires upscaler"]), st.text(max_size=12), min_size=3))
        return {"parameters": "prompt\n" + ", ".join(f"{k}: {v}" for k, v in fields.items())}
    return {draw(st.sampled_from(["settings", "parameters"])): draw(st.text(max_size=200))}


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(chunks=_stored_chunks())
def test_fuzzed_stored_settings_give_options_or_one_line(chunks, tmp_path, monkeypatch):
    """Each input becomes options whose settings pass every check, or a one-line UserError; nothing is written."""
    from controlnet.commands.generate import stored_options
    from controlnet.errors import UserError
    from controlnet.generation_config import GenerationConfig, HiresFix

    monkeypatch.chdir(tmp_path)
    try:
        options = stored_options(chunks, str(tmp_path / "stored.png"))
    except UserError as err:
        assert "\n" not in str(err) and str(err)
    else:
        assert isinstance(options["prompt"], str) and options["num_images"] == 1
        config = GenerationConfig(**{k: options[k] for k in ("negative_prompt", "steps", "guidance", "scheduler",
                                                            "size", "eta", "guess_mode", "reuse_residuals")},
                                  hires=HiresFix(options["hires_scale"]) if options["hires_scale"] else None)
        config.check()
    assert not any(tmp_path.iterdir()), "something was written"


def test_stored_paths_are_inputs_inside_the_roots_with_one_message(tmp_path, monkeypatch):
    """A stored path is a file inside the roots after symlinks; a link out, an absolute path out, a missing file
    and a ``..`` escape get the same message; a bundled name and a hub id with no local path pass as they are."""
    from controlnet.errors import UserError
    from controlnet.stored_settings import stored_path

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"s")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "a.png").write_bytes(b"a")
    monkeypatch.chdir(root)
    assert stored_path("a.png", [root], "init image") == str((root / "a.png").resolve())
    messages = set()
    for value in ("link.png", str(outside / "secret.png"), str(outside / "missing.png"), "../outside/secret.png",
                  str(root / "missing.png")):
        with pytest.raises(UserError) as err:
            stored_path(value, [root], "init image")
        messages.add(str(err.value).replace(repr(value), "VALUE"))
    assert len(messages) == 1, messages
    assert stored_path("org/model", [root], "ControlNet", folders=True) == "org/model"
    assert stored_path("fill", [root], "ControlNet", names=["fill"]) == "fill"


# --------------------------------------------------------------------------- upscale scale, non-regular files, --out


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.fixture
def small_png(tmp_path) -> Path:
    path = tmp_path / "small.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path)
    return path


@pytest.mark.parametrize("argv, message", [
    (["--scale", "inf"], "--scale must be a finite number >= 1, got inf"),
    (["--scale=-inf"], "--scale must be a finite number >= 1, got -inf"),
    (["--scale", "1e6"], "--scale 1e+06: 64000000x64000000 is 4,096,000,000,000,000 pixels, over the limit of"),
    (["--scale", "64", "--max-pixels", "1000000"], "--scale 64: 4096x4096 is 16,777,216 pixels, over the limit of "
                                                   "1,000,000 (--max-pixels 1,000,000)"),
    (["--scale", "150", "--max-pixels", "1000000"], "--scale 150: 9600x9600 is 92,160,000 pixels"),
])
def test_upscale_scale_is_refused_in_one_line_before_any_model_loads(small_png, tmp_path, capsys, argv, message):
    out = tmp_path / "out.png"
    code, err = _run_in_process(["upscale", str(small_png), *argv, "--out", str(out), "-q"], capsys)
    assert code == EXIT_BAD_INPUT and err.startswith(f"controlnet upscale: error: {message}"), err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("door", ["upscale-image", "lora", "lora-dir", "data", "data-manifest"])
def test_fifos_are_refused_at_every_door_without_blocking(tmp_path, capsys, door):
    out = tmp_path / "out"
    fifo = _fifo(tmp_path / "x.safetensors")
    if door == "upscale-image":
        argv, message = ["upscale", str(_fifo(tmp_path / "in.png")), "--out", str(out / "o.png")], "not a regular file"
    elif door in ("lora", "lora-dir"):
        loras = tmp_path / "loras"
        loras.mkdir()
        os.replace(fifo, loras / "style.safetensors")
        source = ["--lora", str(loras / "style.safetensors")] if door == "lora" else ["--lora", "style", "--lora-dir",
                                                                                      str(loras)]
        argv, message = ["generate", "--prompt", "red circle", *source, "--steps", "1", "--size", "64x64", "--out",
                         str(out)], "style"
    elif door == "data":
        argv, message = ["train", "--data", str(fifo), "--out", str(out)], "is not a regular file"
    else:
        data = tmp_path / "data"
        data.mkdir()
        _fifo(data / "prompt.json")
        argv, message = ["train", "--data", str(data), "--out", str(out)], "its prompt.json is not a regular file"
    code, err = _run_in_process(argv, capsys)
    assert code == EXIT_BAD_INPUT and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_train_out_of_someone_elses_files_is_refused_and_nothing_is_removed(tmp_path, capsys):
    out = tmp_path / "home"
    (out / ".photos.deleting").mkdir(parents=True)
    (out / ".thesis.tmp").write_text("draft")
    (out / ".bashrc.old-1").write_text("alias")
    data = tmp_path / "data"
    assert main(["data", "fill", str(data), "--n", "2", "--size", "64", "-q"]) == 0
    code, err = _run_in_process(["train", "--data", str(data), "--out", str(out), "--max-steps", "1"], capsys)
    assert code == EXIT_BAD_INPUT and "not a training run folder" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == [".bashrc.old-1", ".photos.deleting", ".thesis.tmp"]
