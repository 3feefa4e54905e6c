"""The package layout: the library imports no job or tool, has no import circle, and every module
imports on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIBRARY = REPO / "speechssl"
ABOVE_THE_LIBRARY = ("data_tools", "pretrain", "finetune", "speechssl_cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(LIBRARY.rglob("*.py"))}


def _imports(path: Path) -> list[str]:
    """Every module named by an import statement of ``path``, at any depth (a late import in a
    function still ties the two modules together); ``from a import b`` names ``a.b`` when that is
    a module."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names]
    return names


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> the modules it imports), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return [*stack[stack.index(child):], child]
            if child not in state and (found := visit(child)):
                return found
        state[node], _ = "done", stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_library_imports_no_job_and_no_tool() -> None:
    offending = [f"{name} imports {imported}" for name, path in MODULES.items() for imported in _imports(path)
                 if imported.split(".")[0] in ABOVE_THE_LIBRARY]
    assert not offending, offending


def test_the_library_has_no_import_circle() -> None:
    graph = {name: {i for i in _imports(path) if i in MODULES and i != name} for name, path in MODULES.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_circle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.slow
def test_every_library_module_imports_alone() -> None:
    def alone(name: str) -> str | None:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=REPO,
                              check=False)
        return None if done.returncode == 0 else f"{name}: {done.stderr.strip().splitlines()[-1]}"

    with ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(alone, MODULES) if f]
    assert not failures, failures
