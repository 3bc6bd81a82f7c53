"""Command-line options generated from a typed config dataclass (:class:`controlnet.train.config.TrainConfig`,
:class:`controlnet.generation_config.GenerationConfig`): one option per field, its help text, option group and
argparse settings taken from the field's metadata. Imports nothing heavy (``--help`` stays fast)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def option(default: Any = dataclasses.MISSING, *, help: str, group: str, **argparse_settings: Any) -> Any:
    """A config field with its command-line help, option group and any argparse settings (``flags``, ``metavar``,
    ``choices``, ``action``, ``type``) that differ from those derived from the field; ``cli=False`` keeps a field
    off the command line."""
    metadata = {"help": help, "group": group, **argparse_settings}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def add_config_options(parser: argparse.ArgumentParser, config_class: type, prefix: str = "") -> None:
    """One option per field of the dataclass ``config_class``, in the option group its metadata names.

    ``--field-name`` for ``field_name`` (``--<prefix>field-name`` with a ``prefix``, its dest ``<prefix>field_name``);
    a bool field is a switch (``--name`` when it defaults to False, ``--no-name`` when it defaults to True); a dict
    field is a repeatable ``KEY=VALUE`` option (collected as a list); a field without a default is required.
    Metadata ``flags``, ``metavar``, ``choices`` and ``type`` override; fields whose metadata says ``cli=False``
    (nested parts, values only Python gives) are left out.
    """
    hints = typing.get_type_hints(config_class)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(config_class):
        settings = dict(f.metadata)
        if not settings or not settings.pop("cli", True):
            continue
        group_name = settings.pop("group")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        kind = settings.pop("type", None) or option_type(hints[f.name])
        name = ("no_" if kind is bool and f.default is True else "") + prefix + f.name
        flags = settings.pop("flags", ("--" + name.replace("_", "-"),))
        if kind is bool and f.default is True:
            settings.update(dest=name, action="store_true", help="don't " + settings["help"])
        elif kind is bool:
            settings.update(dest=prefix + f.name, action="store_true")
        elif kind is dict:
            settings.update(dest=prefix + f.name, action="append", default=[])
        elif f.default is dataclasses.MISSING:
            settings.update(dest=prefix + f.name, type=kind, required=True)
        else:
            settings.update(dest=prefix + f.name, type=kind, default=f.default)
        groups[group_name].add_argument(*flags, **settings)


def option_type(hint: Any) -> Any:
    """The type an option's value is parsed to: ``int | None`` → int; paths, strings and the rest → str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    origin = typing.get_origin(args[0]) or args[0]
    return origin if origin in (bool, int, float, dict) else str


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with "(default: X)" added to an option's help, unless the help already says what the
    default is (it mentions "default") or there is none worth stating (None, False, an empty string or list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default in ("", []):
            return action.help
        return super()._get_help_string(action)


def shipped_or_out(parser: argparse.ArgumentParser, ship: bool, out: Any, shipped: Any, default: Any) -> Any:
    """A script's output with a ``--ship`` switch: ``shipped`` (a tracked file or folder) with ``--ship``, which
    refuses another ``--out`` (parser error); else ``out``, or ``default``."""
    if ship and out is not None and out != shipped:
        parser.error(f"--ship writes {shipped}; drop --out {out}")
    return shipped if ship else (out or default)
