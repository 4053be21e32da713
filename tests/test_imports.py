"""The floors of the house (docs/ARCHITECTURE.md): every module imports, and no two import each other."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

STUDIO = Path(__file__).resolve().parent.parent / "studio"


def _module_name(path: Path) -> str:
    parts = path.relative_to(STUDIO.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(path) for path in STUDIO.rglob("*.py"))


def _imported_studio_modules(path: Path) -> set[str]:
    """Every studio module ``path`` imports, at the top or inside a function (a lazy import is
    still a dependency); ``from studio.x import name`` counts as studio.x, or studio.x.name when
    that is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            # ``from studio.ui import views`` needs the module views, not what the package's __init__ imports
            names = submodules if all(name in MODULES for name in submodules) else [node.module, *submodules]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    return found - {_module_name(path)}


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imported_studio_modules(path) for path in STUDIO.rglob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph`` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


@pytest.mark.parametrize("name", MODULES)
def test_every_studio_module_imports(name):
    importlib.import_module(name)


def test_no_two_studio_modules_import_each_other_directly_or_through_a_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_only_the_ui_imports_gradio():
    offenders = [
        _module_name(path) for path in STUDIO.rglob("*.py")
        if "ui" not in path.relative_to(STUDIO).parts
        and any(isinstance(node, (ast.Import, ast.ImportFrom))
                and any((alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0] == "gradio"
                        for alias in node.names)
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))
    ]
    assert offenders == []
