"""The planner package's own structure: its modules import each other one way (no cycle, none hidden behind
an import inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import distplan.planner

PACKAGE = Path(distplan.planner.__file__).resolve().parent


def _sibling_imports() -> dict[str, dict[str, bool]]:
    """``module -> {sibling it imports: whether the import is at module level}``."""
    out: dict[str, dict[str, bool]] = {}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        found: dict[str, bool] = {}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            names: list[str] = []
            if node.level == 1 and node.module:
                names = [node.module.split(".")[0]]
            elif node.level == 1:
                names = [a.name for a in node.names]
            elif node.module and node.module.startswith("distplan.planner."):
                names = [node.module.split(".")[2]]
            elif node.module == "distplan.planner":
                names = [a.name for a in node.names]
            for name in names:
                if name in modules and name != path.stem:
                    found[name] = found.get(name, False) or id(node) in top
        out[path.stem] = found
    return out


def test_planner_modules_import_one_way() -> None:
    graph = _sibling_imports()
    lazy = sorted(
        f"{m} -> {dep}"
        for m, deps in graph.items()
        for dep, at_top in deps.items()
        if not at_top and m != "cli"
    )
    # (The CLI imports the planner lazily on purpose: ``distplan --help`` stays fast.)
    assert not lazy, f"imports of sibling modules inside functions (hidden cycles?): {lazy}"
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, f"import cycle: {' -> '.join([*path, m])}"
        state[m] = 1
        for dep in graph.get(m, {}):
            visit(dep, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    # The baselines are priced like the search's layouts but never need the search itself.
    assert "search" not in graph["baselines"]
    assert "baselines" not in graph["search"]
