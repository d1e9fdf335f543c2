"""The package's import graph: no module imports, through any chain, a module that imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import rollbackd

PACKAGE = Path(rollbackd.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every rollbackd module ``path`` imports, anywhere in the file (typing-only included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    wanted = set()
    for imported in found:
        name = imported
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            wanted.add(name)
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            parent = name.rpartition(".")[0]
            while parent:
                wanted.add(parent)
                parent = parent.rpartition(".")[0]
    return wanted - {"rollbackd"}


def graph() -> dict[str, set[str]]:
    """Module -> the rollbackd modules it imports (the root package's own __init__ left out)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, modules) - {name} for name, path in paths.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_has_no_cycle() -> None:
    """No rollbackd module imports itself through others (typing-only imports count too)."""
    assert _cycle(graph()) is None


def test_cycle_finder_finds_a_cycle() -> None:
    """The finder itself reports a planted cycle (so the test above can fail)."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_config_and_options_know_no_plugin() -> None:
    """config.py and options.py (what plugins import) import no plugin and nothing above.

    config.py reads rollout windows with ``windows`` (which imports nothing) and builds the
    pure ``rollouts.Spec``; ``overrides`` (the environment over [daemon]) imports nothing.
    """
    assert graph()["rollbackd.options"] == {"rollbackd.errors"}
    assert graph()["rollbackd.problems"] == set()
    assert graph()["rollbackd.overrides"] == set()
    assert graph()["rollbackd.config"] == {
        "rollbackd.errors",
        "rollbackd.options",
        "rollbackd.overrides",
        "rollbackd.problems",
        "rollbackd.rollouts",
        "rollbackd.windows",
    }
    assert graph()["rollbackd.windows"] == set()
    assert graph()["rollbackd.rollouts"] == {"rollbackd.windows"}
