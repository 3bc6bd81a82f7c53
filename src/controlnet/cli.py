"""The ``controlnet`` command line: one sub-command per module in ``controlnet.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets ``func`` to a function
``(args) -> int``. Bad input raises :class:`controlnet.errors.UserError`; here it becomes one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
