"""Reading settings stored in a file (``generate --from-png``: our JSON settings, A1111's ``parameters`` text):
untrusted input.

Bounds come before parsing (a text's length, a JSON document's nesting depth), so no input makes a parser run long
or deep; the paths it names are inputs only, inside the folders the reader allows
(:mod:`controlnet.untrusted`). Imports nothing heavy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controlnet.errors import UserError
from controlnet.hub import spelled_as_hub_id
from controlnet.untrusted import resolve_untrusted_input

# A hub repository id's spelling (controlnet.hub): org/name.
_HINT = "copy it under the current folder or the PNG's folder, or run without --from-png giving it as an option"

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


def stored_path(value: Any, roots: Sequence[Path], what: str, names: Sequence[str] = (), folders: bool = False) -> str:
    """An input named by stored settings: one of ``names`` (bundled models) as it is; a file (or, with
    ``folders``, a folder) inside ``roots`` after ``..`` and symlinks, as its real path
    (:func:`controlnet.untrusted.resolve_untrusted_input`: one message whatever the disk holds); or a hub id
    (``org/name``) with no local path of that name, as it is (its loader downloads it or says it is unknown)."""
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise UserError(f"{what}: not a path ({str(value)[:40]!r})")
    if value in names:
        return value
    try:
        return str(resolve_untrusted_input(value, roots, what, hint=_HINT, folders=folders))
    except UserError:
        if spelled_as_hub_id(value) and not os.path.lexists(value):
            return value
        raise


__all__ = ["MAX_JSON_DEPTH", "MAX_SETTINGS_CHARS", "check_text_size", "json_depth", "load_json_settings",
           "stored_path"]
