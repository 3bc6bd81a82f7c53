"""Reading untrusted text: settings stored in a PNG (``generate --from-png``), A1111 ``parameters`` text.

Bounds come before parsing (a text's length, a JSON document's nesting depth), so no input makes a parser run long
or deep; paths named by such text are resolved after symlinks and accepted only under the folders the reader
allows, with one message whether the file exists or not (nothing is learnt about files outside). Imports nothing
heavy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controlnet.errors import UserError

# Longest settings text read from a PNG, in characters: a generation's JSON settings with a long prompt take a few
# KB; A1111 allows prompts of any length, and 64 K characters is some 16 K tokens.
MAX_SETTINGS_CHARS = 65536
# Deepest JSON nesting of our settings: the object, a ControlNet list, a unit, its parameters (4); some slack.
MAX_JSON_DEPTH = 8


def check_text_size(text: Any, what: str) -> str:
    """``text`` if it is a string of at most :data:`MAX_SETTINGS_CHARS` characters; else a one-line UserError."""
    if not isinstance(text, str):
        raise UserError(f"{what}: not text")
    if len(text) > MAX_SETTINGS_CHARS:
        raise UserError(f"{what}: {len(text)} characters, more than the {MAX_SETTINGS_CHARS} settings may have; "
                        "the file was not written by a generation")
    return text


def json_depth(text: str) -> int:
    """The deepest nesting of ``[`` / ``{`` in a JSON text, brackets inside strings not counted (one pass)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def load_json_settings(text: Any, what: str) -> dict[str, Any]:
    """A JSON object read from untrusted ``text``: its size and depth bounded first; one-line UserError otherwise."""
    text = check_text_size(text, what)
    if json_depth(text) > MAX_JSON_DEPTH:
        raise UserError(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels; the settings are not ours")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise UserError(f"{what}: not JSON ({str(err)[:80]})") from None
    if not isinstance(value, dict):
        raise UserError(f"{what}: a JSON {type(value).__name__}, not an object of settings")
    return value


def resolve_untrusted(value: Any, roots: Sequence[Path], what: str) -> str:
    """``value``, a path named by untrusted text, if it resolves (symlinks followed, relative to the current
    folder) under one of ``roots``; else a one-line UserError that reads the same whether the file exists or not.
    Bare names and hub ids (``org/name``) resolve under the current folder and pass: their loader decides."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise UserError(f"{what}: not a path ({str(value)[:40]!r})")
    try:
        resolved = Path(os.path.expanduser(value)).resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loops, names the system refuses
        resolved = None
    allowed = [Path(root).resolve() for root in roots]
    if resolved is None or not any(resolved == root or root in resolved.parents for root in allowed):
        folders = " or ".join(str(root) for root in allowed)
        raise UserError(f"{what} {value!r} is outside the folders stored settings may name ({folders}); copy the file "
                        "there, or give the option on the command line after --from-png")
    return value


__all__ = ["MAX_JSON_DEPTH", "MAX_SETTINGS_CHARS", "check_text_size", "json_depth", "load_json_settings",
           "resolve_untrusted"]
