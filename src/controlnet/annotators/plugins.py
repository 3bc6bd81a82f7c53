"""Annotator plugins: a Python file or module that calls :func:`controlnet.annotators.register` when imported
(``controlnet annotate --plugin my_hed.py``; folder mode's worker processes import them again)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from controlnet.errors import UserError


def load_plugin(spec: str) -> None:
    """Import a plugin (a ``.py`` file or a module name) that calls ``controlnet.annotators.register``."""
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise UserError(f"--plugin {spec}: no such Python file")
        module_name = f"controlnet_plugin_{abs(hash(str(path))):x}"
        if module_name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"--plugin {spec}: cannot import this file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except UserError:
            raise
        except Exception as err:  # a broken plugin is the user's input: one line, no traceback
            del sys.modules[module_name]
            raise UserError(f"--plugin {spec}: failed to import ({type(err).__name__}: {err})") from None
    else:
        try:
            importlib.import_module(spec)
        except ImportError as err:
            raise UserError(f"--plugin {spec}: cannot import module ({err})") from None
