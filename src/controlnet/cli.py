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
import importlib
import sys
from typing import Any, NoReturn

from controlnet.errors import EXIT_BAD_INPUT, UserError

# Sub-commands, in the order ``controlnet --help`` lists them.
COMMANDS = [
    "controlnet.commands.generate",
    "controlnet.commands.annotate",
    "controlnet.commands.train",
    "controlnet.commands.data",
    "controlnet.commands.demo",
    "controlnet.commands.convert",
    "controlnet.commands.ui",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with "(default: X)" added to an option's help, unless the help already says what the
    default is (it mentions "default") or there is none worth stating (None, False, an empty string or list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default in ("", []):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``controlnet CMD: error: ...; see `controlnet CMD --help```,
    instead of argparse's usage block; exit code 2. Sub-parsers inherit the class and its :class:`HelpFormatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

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
    """Entry point of the ``controlnet`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"controlnet {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
