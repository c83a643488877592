"""The architecture as the code has it: imports go one way, and every module imports on its own.

The one-way rule, read from each module's source with ``ast`` (imports at the top, inside functions and
under ``TYPE_CHECKING`` alike, relative ones resolved, and module names written as strings for lazy
loading, e.g. ``importlib.import_module("distplan.tracer")``):

================  ==========================================================================================
layer             may import (besides itself and third-party libraries)
================  ==========================================================================================
CLI               ``distplan.cli``, the one top-level CLI: the command modules, and anything below them
commands          ``<package>/cli.py`` and ``presentation/*_cli.py``: every layer below (never the CLI or
                  another command module); only the CLI imports them
service           scheduler, lowering, planner, tracer, presentation, core
presentation      core; its ``demo`` module also tracer, planner, lowering (it runs the whole pipeline)
profiler          core; its ``compute`` module also tracer, planner, lowering (the per-microbatch overhead is
                  measured by lowering a one-stage plan of a traced model, see ``_runtime_overhead``); its
                  ``reference`` module also tracer, planner (whole reference models are traced and priced to
                  fit the in-graph costs, see ``in_graph_costs``)
scheduler         planner, core; its ``executor`` module names the lowering's entry point, which it runs as
                  ``torchrun`` processes (it imports no torch itself)
lowering          tracer, core
tracer            core
planner           core
Python door       ``distplan/__init__.py`` (``import distplan``): core, and lazily tracer, planner, lowering,
                  profiler (``distplan.plan``, ``distplan.trace``, ...)
core              ``distplan/*.py``: only core (and the data package ``device_profiles``)
================  ==========================================================================================

``import distplan`` itself loads only core (the door's stage functions load on first use), so it counts
as core; using one of the door's stage functions (``distplan.lower(...)``) counts as importing that stage.

Third-party: planner and scheduler import no torch, transformers or FastAPI; core imports none of these
nor OR-Tools. (``tests/planner/test_plan.py`` and ``tests/scheduler/test_cli.py`` also check at run time
that planning and scheduling never load torch.)

Each module is then imported in a process of its own, with no distplan module loaded before it, so a
module that only imports when another was imported first (an import cycle, a missing import) is caught.
The processes fork from one that has loaded the third-party libraries distplan imports at module level,
so the check takes seconds rather than minutes; it loads none of distplan.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tracer", "planner", "lowering", "service", "presentation", "profiler", "scheduler")
FOLDERS = ("distplan", *PACKAGES, "device_profiles")

#: layer -> the layers it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "cli": {"commands", "service", "presentation", "profiler", "scheduler", "lowering", "tracer", "planner"}
    | {"core", "door"},
    "commands": {"service", "presentation", "profiler", "scheduler", "lowering", "tracer", "planner"}
    | {"core", "door"},
    "service": {"scheduler", "lowering", "planner", "tracer", "presentation", "core"},
    "presentation": {"core"},
    "profiler": {"core"},
    "scheduler": {"planner", "core"},
    "lowering": {"tracer", "core"},
    "tracer": {"core"},
    "planner": {"core"},
    "door": {"core", "tracer", "planner", "lowering", "profiler"},
    "core": {"device_profiles"},
    "device_profiles": set(),
}
#: Single modules that may reach further than their layer, and why (see the module docstring).
EXTRA: dict[str, set[str]] = {
    "distplan.presentation.demo": {"tracer", "planner", "lowering"},
    "distplan.profiler.compute": {"tracer", "planner", "lowering"},
    "distplan.profiler.reference": {"tracer", "planner"},
    "distplan.scheduler.executor": {"lowering"},
}
#: Third-party libraries a layer must not import.
FORBIDDEN_LIBRARIES: dict[str, set[str]] = {
    "planner": {"torch", "transformers", "fastapi"},
    "scheduler": {"torch", "transformers", "fastapi"},
    "core": {"torch", "transformers", "fastapi", "ortools"},
}
_MODULE_STRING = re.compile(r"^distplan(\.[A-Za-z_][A-Za-z0-9_]*)+$")


@dataclass(frozen=True)
class Import:
    """One import of a module: the module imported, where (file and line), and how it is written."""

    target: str
    path: Path
    line: int
    text: str


def module_files() -> dict[str, Path]:
    """Every module of the installed package, by its import name (``distplan.planner.ilp``)."""
    out: dict[str, Path] = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            prefix = ["distplan"] if folder == "distplan" else ["distplan", folder]
            out[".".join(prefix + parts)] = path
    return out


MODULES = module_files()


def _door_functions() -> dict[str, str]:
    """The stage functions ``import distplan`` offers and the module each loads (``trace`` ->
    ``distplan.tracer``): the door's lazy table ``_LAZY`` and its functions that import a stage."""
    out: dict[str, str] = {}
    for node in ast.parse(MODULES["distplan"].read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_LAZY" for t in node.targets):
            for key, value in zip(node.value.keys, node.value.values, strict=True):  # type: ignore[attr-defined]
                out[key.value] = value.elts[0].value  # type: ignore[union-attr]
        elif isinstance(node, ast.FunctionDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("distplan."):
                    out[node.name] = sub.module
    return out


def layer(module: str, *, importing: bool = False) -> str:
    """The layer a distplan module belongs to (see the module docstring's table); ``importing``: as the
    target of an import, where the package ``distplan`` is core."""
    parts = module.split(".")
    if module == "distplan.cli":
        return "cli"
    if module == "distplan":
        return "core" if importing else "door"
    if len(parts) >= 2 and parts[1] in (*PACKAGES, "device_profiles"):
        if len(parts) == 3 and (
            parts[2] == "cli" or (parts[1] == "presentation" and parts[2].endswith("_cli"))
        ):
            return "commands"
        return parts[1]
    return "core"


DOOR_FUNCTIONS = _door_functions()


def _resolve(name: str) -> str:
    """The longest prefix of a dotted name that is a distplan module (``distplan.plan.Plan`` ->
    ``distplan.plan``)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or name


@functools.cache
def _tree(module: str) -> tuple[ast.Module, tuple[str, ...]]:
    source = MODULES[module].read_text()
    return ast.parse(source, str(MODULES[module])), tuple(source.splitlines())


def imports_of(module: str, source: str | None = None) -> list[Import]:
    """Every distplan module ``module`` imports, wherever in the file the import stands (``source``: read
    this text as the module's instead of its file)."""
    path = MODULES.get(module, Path(*module.split(".")).with_suffix(".py"))
    tree, lines = _tree(module) if source is None else (ast.parse(source), tuple(source.splitlines()))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def add(target: str, node: ast.AST) -> None:
        if target == "distplan" or target.startswith("distplan."):
            line = getattr(node, "lineno", 0)
            text = lines[line - 1].strip() if line else target
            found.append(Import(_resolve(target), path, line, text))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from distplan.presentation import demo_cli` imports a module
                sub = f"{mod}.{a.name}"
                add(sub if sub in MODULES else mod, node)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_STRING.match(node.value)
        ):
            if node.value in MODULES:  # a module named for lazy loading
                add(node.value, node)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "distplan"
            and node.attr in DOOR_FUNCTIONS
            and module != "distplan"
        ):
            add(DOOR_FUNCTIONS[node.attr], node)  # `distplan.lower(...)` loads the lowering
    return found


def libraries_of(module: str, source: str | None = None) -> list[tuple[str, int, str]]:
    """Top-level names of the third-party libraries ``module`` imports (anywhere in the file), with the
    line and its text."""
    tree, lines = _tree(module) if source is None else (ast.parse(source), tuple(source.splitlines()))
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for n in names:
            out.append((n.split(".")[0], node.lineno, lines[node.lineno - 1].strip()))
    return out


def module_violations(module: str, source: str | None = None) -> list[str]:
    """The imports of ``module`` that break the one-way rule, as ``file:line: <import> (<why>)``."""
    path = MODULES.get(module, Path(*module.split(".")).with_suffix(".py"))
    shown = path.relative_to(ROOT) if path.is_absolute() else path
    src = layer(module)
    allowed = ALLOWED[src] | EXTRA.get(module, set()) | {src}
    problems = []
    for imp in imports_of(module, source):
        if imp.target == module:
            continue
        dst = layer(imp.target, importing=True)
        where = f"{shown}:{imp.line}: {imp.text}"
        if dst == "cli":
            problems.append(f"{where} (nothing imports the top-level CLI; it imports the commands)")
        elif dst == "commands" and src != "cli":
            problems.append(f"{where} (only distplan.cli imports a command module)")
        elif dst not in allowed:
            problems.append(f"{where} ({src} -> {dst}: {src} may import {', '.join(sorted(allowed))})")
    for lib, line, text in libraries_of(module, source):
        if lib in FORBIDDEN_LIBRARIES.get(src, set()):
            problems.append(f"{shown}:{line}: {text} ({src} must not import {lib})")
    return problems


def test_imports_go_one_way() -> None:
    problems = [p for module in sorted(MODULES) for p in module_violations(module)]
    assert problems == [], "imports against the one-way rule:\n" + "\n".join(problems)


def test_the_rule_reader_sees_every_kind_of_import() -> None:
    """The reader itself, on modules whose imports are known: relative imports (the planner package),
    function-level ones (the planner's command imports the tracer inside the command), string-named lazy
    ones (``import distplan`` names the tracer for ``distplan.trace``), a door function, and the CLI's
    static imports; and on made-up modules that break the rule, each reported with its file and line."""
    assert {"distplan.planner.coarsen", "distplan.planner.simulate"} <= {
        i.target for i in imports_of("distplan.planner")
    }
    assert "distplan.tracer" in {i.target for i in imports_of("distplan.planner.cli")}
    assert "distplan.tracer" in {i.target for i in imports_of("distplan")}
    assert "distplan.lowering" in {i.target for i in imports_of("distplan.lowering.train")}  # distplan.lower(
    cli = {i.target for i in imports_of("distplan.cli")}
    commands = {m for m in MODULES if layer(m) == "commands"}
    assert commands and commands <= cli, sorted(commands - cli)
    assert layer("distplan.presentation.trace_cli") == "commands"
    assert layer("distplan.presentation.demo") == "presentation" and layer("distplan.request") == "core"

    # The kinds of fault this test exists for, each named with its file, line and import.
    back_to_cli = module_violations(
        "distplan.presentation.report_cli", "def f():\n    from distplan.cli import write_output\n"
    )
    assert back_to_cli == [
        "presentation/report_cli.py:2: from distplan.cli import write_output "
        "(nothing imports the top-level CLI; it imports the commands)"
    ]
    [upward] = module_violations("distplan.planner.cost", "from ..lowering import lower\n")
    assert upward.startswith("planner/cost.py:1: from ..lowering import lower (planner -> lowering")
    [lazy] = module_violations(
        "distplan.tracer.api", "import importlib\nimportlib.import_module('distplan.service')\n"
    )
    assert "tracer -> service" in lazy
    [torch] = module_violations("distplan.scheduler.core", "def f():\n    import torch.nn\n")
    assert torch == "scheduler/core.py:2: import torch.nn (scheduler must not import torch)"
    [command] = module_violations(
        "distplan.service.routes", "from distplan.planner.cli import plan_summary\n"
    )
    assert "only distplan.cli imports a command module" in command


# A fork server: load the third-party libraries once, then import each module in a child of its own.
_ISOLATED = r"""
import importlib, os, sys, traceback
preload, modules = sys.argv[1].split(","), sys.argv[2].split(",")
for name in preload:
    try:
        importlib.import_module(name)
    except Exception:
        pass  # the child that needs it reports it
assert not [m for m in sys.modules if m == "distplan" or m.startswith("distplan.")], "distplan preloaded"
failed = []
running = {}  # pid -> (module, read end of the pipe its traceback comes through)
width = len(os.sched_getaffinity(0))  # one child per core at a time


def reap():
    pid, status = os.wait()
    module, read = running.pop(pid)
    with os.fdopen(read) as f:
        why = f.read()
    if status != 0:
        failed.append(f"{module}: {why.strip() or 'exit status %d' % status}")


for module in modules:
    while len(running) >= width:
        reap()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            importlib.import_module(module)
        except BaseException:
            os.write(write, traceback.format_exc(limit=-3).encode())
            code = 1
        os._exit(code)
    os.close(write)
    running[pid] = (module, read)
while running:
    reap()
failed.sort()
print("\n\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _third_party_preload() -> list[str]:
    """The third-party modules distplan imports at module level (``from a.b import c``: ``a.b`` and
    ``a.b.c``)."""
    names: set[str] = set()
    for path in MODULES.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
    return sorted(
        n for n in names if n.split(".")[0] not in sys.stdlib_module_names and n.split(".")[0] != "distplan"
    )


@pytest.mark.slow  # about 30 s: some 110 imports, each in a process of its own
@pytest.mark.timeout(300)
def test_every_module_imports_on_its_own() -> None:
    r = subprocess.run(
        [sys.executable, "-c", _ISOLATED, ",".join(_third_party_preload()), ",".join(sorted(MODULES))],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert r.returncode == 0, f"modules that do not import on their own:\n{r.stdout}{r.stderr[-3000:]}"


def test_the_cli_starts_without_torch() -> None:
    """``distplan --help`` (and every command before it runs) loads the CLI and its command modules only:
    no torch, transformers, FastAPI or uvicorn, which keeps it fast and keeps a broken heavy import out
    of the commands that do not need it."""
    code = (
        "import sys, distplan.cli\n"
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
