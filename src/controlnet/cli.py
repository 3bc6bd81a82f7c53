"""The ``controlnet`` command line: one sub-command per module in ``controlnet.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets ``func`` to a function
``(args) -> int``. Bad input raises :class:`controlnet.errors.UserError`; here it becomes one line on stderr
and exit code 2, as does a bad argument (:class:`Parser`).

``controlnet --help`` builds every command's parser, so the command modules import nothing heavy (torch,
diffusers, transformers, OpenCV, numpy, gradio) at module level or in ``register``: the values their help shows
come from :mod:`controlnet.defaults`, and the work is imported inside the command function.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
from typing import Any, NoReturn

from controlnet.errors import EXIT_BAD_INPUT, UserError
from controlnet.options import HelpFormatter

# Sub-commands, in the order ``controlnet --help`` lists them.
COMMANDS = [
    "controlnet.commands.generate",
    "controlnet.commands.upscale",
    "controlnet.commands.annotate",
    "controlnet.commands.train",
    "controlnet.commands.data",
    "controlnet.commands.demo",
    "controlnet.commands.evaluate",
    "controlnet.commands.convert",
    "controlnet.commands.info",
    "controlnet.commands.ui",
]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``controlnet CMD: error: ...; see `controlnet CMD --help```,
    instead of argparse's usage block; exit code 2. Sub-parsers inherit the class and its :class:`HelpFormatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.set_defaults(_parser=self)  # the innermost sub-command's parser wins: it reports unknown options

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """argparse's, with unknown options reported by the sub-command they were given to (``controlnet generate:
        error: unrecognized arguments: --bogus; see `controlnet generate --help```)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            getattr(parsed, "_parser", self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``controlnet`` parser with every sub-command registered."""
    parser = Parser(
        prog="controlnet",
        description="Spatial control for text-to-image diffusion models (ControlNet, ICCV 2023).",
    )
    from controlnet import __version__

    parser.add_argument("--version", action="version", version=f"controlnet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``controlnet`` console script; returns the exit code.

    A :class:`UserError`, and a failure of the machine rather than of the code (an ``OSError`` such as no space
    or no permission, running out of memory, a failed safetensors write), is one line on stderr and exit code 2;
    anything else is a bug and keeps its traceback.
    """
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # bare `controlnet`: what it can do
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        message = str(err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = describe_failure(err)
        if message is None:
            raise
    print(f"controlnet {args.command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


# errno → what to do about it, for the one-line message of an OSError.
_OS_ADVICE = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EFBIG: "the file-size limit (ulimit -f) was hit; raise it or write smaller files",
    errno.EACCES: "check the permissions, or choose another path",
    errno.EPERM: "check the permissions, or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOTDIR: "a file is in the way where a folder is needed; choose another path",
    errno.EISDIR: "a folder is in the way where a file is needed; choose another path",
    errno.ENOMEM: "free some memory, or lower --size / --num-images / --max-pixels",
}
# How a failed allocation reads: torch's CPU allocator (a RuntimeError, c10 alloc_cpu.cpp), CUDA's, OpenCV's
# (a cv2.error, core/src/alloc.cpp "Insufficient memory").
_NO_MEMORY = ("can't allocate memory", "out of memory", "Insufficient memory")


def describe_failure(err: BaseException) -> str | None:
    """One line naming the path and the cause of a failure of the machine (disk, permissions, memory), or None
    when ``err`` is not one."""
    if isinstance(err, OSError):
        return _describe_os_error(err)
    first = (str(err).strip().splitlines() or [""])[0][:300]
    allocator = isinstance(err, RuntimeError) or type(err).__module__ == "cv2"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
            allocator and any(text in first for text in _NO_MEMORY)):
        detail = f" ({first})" if first else ""
        return (f"out of memory{detail}; free some memory, or lower --size / --num-images, or the limit "
                "--max-pixels")
    if type(err).__name__ == "SafetensorError":  # safetensors' Rust errors; a failed save carries the OS cause
        cause = re.search(r'message: "([^"]+)"', first)
        return (f"cannot read or write a .safetensors file ({cause.group(1) if cause else first}); check the free "
                "space and the file")
    return None


def _describe_os_error(err: OSError) -> str:
    path = err.filename if err.filename is not None else err.filename2
    if path is not None:
        from controlnet.fileio import destination_of

        path = destination_of(os.fsdecode(path))  # the file being written, not its temporary name
    cause = err.strerror or str(err) or type(err).__name__
    advice = _OS_ADVICE.get(err.errno or -1, "check the path")
    where = f"{path}: " if path is not None else ""
    return " ".join(f"{where}{cause}; {advice}".split())


if __name__ == "__main__":
    sys.exit(main())
