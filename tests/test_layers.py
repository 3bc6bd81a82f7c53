"""The package's import layering: no import cycle at any depth, and ``controlnet --help`` without torch.

The import graph is read from the source with :mod:`ast`, so it counts every import a module can make: at module
level, inside functions (imported on first use), under ``if TYPE_CHECKING:``, and ``importlib.import_module`` of a
literal module name. An edge ``a -> b`` means module ``a`` names module ``b`` in an import. The implicit import of
a package's ``__init__`` when one of its sub-modules is imported is not an edge (every sub-module has it).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "controlnet"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The module ``name`` refers to: itself, or the longest prefix of it that is a module of the package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <node.module> import ...`` written in ``module`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    here = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = here[: len(here) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported_names(module: str, tree: ast.AST) -> list[tuple[str, int]]:
    """(dotted name, line) of everything ``module`` imports; ``from a import b`` gives ``a.b`` (a module or not)."""
    calls_import_module = any(isinstance(n, ast.Attribute) and n.attr == "import_module" for n in ast.walk(tree))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
        elif calls_import_module and isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in MODULES:  # a module imported by name (a registry of modules)
                found.append((node.value, node.lineno))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: the line of the first such import}, for every module of the package."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        edges: dict[str, int] = {}
        for name, line in _imported_names(module, ast.parse(path.read_text(), str(path))):
            target = _resolve(name) if name.split(".")[0] == PACKAGE else None
            if target is not None and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it is acyclic (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_graph_sees_function_local_type_checking_and_importlib_imports(tmp_path):
    """The reader finds the kinds of import a cycle hides in (checked on a module written for the purpose)."""
    source = (
        "from typing import TYPE_CHECKING\nimport importlib\n"
        "if TYPE_CHECKING:\n    from controlnet.model import ControlNet\n"
        "def f():\n    from controlnet import hub\n    from . import fileio\n"
        "    importlib.import_module('controlnet.errors')\n"
    )
    names = [name for name, _ in _imported_names("controlnet.cli", ast.parse(source))]
    assert {_resolve(n) for n in names if n.startswith(PACKAGE)} == {
        "controlnet.model", "controlnet.hub", "controlnet.fileio", "controlnet.errors"}
    assert find_cycle({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 3, "b": 4}}) is None


def test_no_import_cycle_at_any_depth():
    graph = import_graph()
    assert len(graph) > 50 and graph["controlnet.loading"], "the package's modules were not found"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {_describe(cycle, graph)}"


def _defined_names(path: Path) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports, and anything under if/try)."""
    names: set[str] = set()
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            stack += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            stack += [s for h in getattr(node, "handlers", []) for s in h.body]
    return names


@pytest.mark.parametrize("folder", ["src", "tests", "benchmarks", "scripts"])
def test_every_import_of_a_package_name_finds_it(folder):
    """``from controlnet.x import name`` anywhere (also inside functions, which run late) names something that
    ``controlnet.x`` defines or a sub-module of it: a moved name fails here, not on first use."""
    root = SRC.parent / folder
    missing = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                missing += [f"{path.relative_to(SRC.parent)}:{node.lineno}: no module {alias.name}"
                            for alias in node.names if alias.name.split(".")[0] == PACKAGE and alias.name not in MODULES]
            if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith(PACKAGE):
                continue
            if node.module not in MODULES:
                missing.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: no module {node.module}")
                continue
            defined = _defined_names(MODULES[node.module])
            if node.module == PACKAGE:
                defined |= _lazy_exports()
            for alias in node.names:
                if alias.name != "*" and alias.name not in defined and f"{node.module}.{alias.name}" not in MODULES:
                    missing.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {node.module} has no {alias.name}")
    assert not missing, "\n".join(missing)


def _lazy_exports() -> set[str]:
    """The names ``controlnet/__init__.py`` exports lazily (the keys of its ``_EXPORTS`` table)."""
    tree = ast.parse(MODULES[PACKAGE].read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets) and node.value is not None:
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return set()


HEAVY = ("torch", "diffusers", "transformers", "cv2", "gradio", "numpy")


def test_help_imports_no_heavy_library():
    """``controlnet --help`` (every command's parser) loads none of the heavy libraries: the modules a parser
    needs import them inside the functions that do the work."""
    code = (
        "import sys\nfrom controlnet.cli import build_parser\n"
        "try:\n    build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print('imported:', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "imported: []", result.stdout.splitlines()[-1]
