"""The presentation package as a whole. Where it sits: it imports distplan's core (and itself), only the
demo and the command modules run pipeline stages, and nothing below the CLI and the service imports it.
Its templates ship with it, and each quantity has one formatter.

Read from the source (``ast``), so an import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

from presentation_handmade import handmade_plan, handmade_timeline

from distplan.presentation.formatting import format_count, format_flops, format_seconds, plural
from distplan.presentation.pictures import render_timeline_svg
from distplan.presentation.progress import describe
from distplan.presentation.report import render_report

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "presentation"
CORE = {p.stem for p in (ROOT / "distplan").glob("*.py")} - {"__init__", "cli"}
STAGES = ("distplan.tracer", "distplan.planner", "distplan.lowering")
# Modules that run pipeline stages: the demo (the whole pipeline) and the command modules (`*_cli`:
# `distplan trace` traces, `distplan report` simulates a plan given without a timeline, ...).
RUNNERS = {"demo"} | {p.stem for p in PACKAGE.glob("*_cli.py")}


def _distplan_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "distplan" or n.startswith("distplan.")}


def test_presentation_imports_core_and_only_its_runners_import_stages() -> None:
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        for name in sorted(_distplan_imports(path)):
            parts = name.split(".")
            core = len(parts) == 2 and parts[1] in CORE
            own = name.startswith("distplan.presentation")
            stage = name.startswith(STAGES)
            cli = name == "distplan.cli"
            if core or own or ((stage or cli) and path.stem in RUNNERS):
                continue
            problems.append(f"presentation/{path.name} imports {name}")
    assert problems == [], "\n".join(problems)


def test_nothing_below_the_cli_and_the_service_imports_presentation() -> None:
    problems = []
    for folder in ("distplan", "tracer", "planner", "lowering"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "cli.py":  # command modules are the CLI
                continue
            if any(n.startswith("distplan.presentation") for n in _distplan_imports(path)):
                problems.append(f"{path.relative_to(ROOT)} imports presentation")
    assert problems == [], "\n".join(problems)


def _setuptools_entry(section: str, key: str) -> object:
    """``key``'s value in ``[section]`` of pyproject.toml (a string or list of strings, which read as
    Python literals; the standard library's TOML reader needs Python 3.11, the project supports 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    body = text.split(f"[{section}]\n", 1)[1].split("\n[", 1)[0]
    for line in body.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == f'"{key}"':
            return ast.literal_eval(value.strip())
    raise AssertionError(f"pyproject.toml has no {key!r} in [{section}]")


def test_every_template_is_package_data() -> None:
    assert _setuptools_entry("tool.setuptools.package-dir", "distplan.presentation") == "presentation"
    patterns = _setuptools_entry("tool.setuptools.package-data", "distplan.presentation")
    assert isinstance(patterns, list)
    templates = [p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "templates").rglob("*") if p.is_file()]
    assert {"templates/report.html", "templates/timeline.svg"} <= set(templates)
    for t in templates:
        assert any(fnmatch(t, pat) for pat in patterns), f"{t} is not package data"


def test_timeline_labels_are_escaped_in_the_svg_and_the_page() -> None:
    plan = handmade_plan()
    tl = handmade_timeline(plan)
    evil = "<b>h&1</b> \"q\" 'a'"
    tl = type(tl)(tl.events, tl.devices, (evil,) * len(tl.devices), tl.iteration_time_s, tl.bubble_fraction)
    svg = render_timeline_svg(tl, title=evil)
    assert "<b>" not in svg and "&lt;b&gt;h&amp;1&lt;/b&gt;" in svg
    assert svg.count("&lt;b&gt;h&amp;1&lt;/b&gt;") == len(tl.devices) + 1  # every row and the title
    page = render_report(plan, timeline=tl)
    assert "<b>" not in page and page.count("&lt;b&gt;h&amp;1&lt;/b&gt;") == len(tl.devices)


def test_one_formatter_per_quantity() -> None:
    # The progress line writes a solver's times as the report and the tables do.
    for s in (5e-4, 0.0123, 0.528, 3.774):
        assert describe({"objective_s": s}) == f"best {format_seconds(s)}"
    assert [format_count(n) for n in (999, 184_000, 124_439_808, 1_557_611_200)] == [
        "999",
        "184K",
        "124M",
        "1.56B",
    ]
    assert [format_flops(n) for n in (900, 1200, 3.26e12)] == ["900 FLOP", "1.2 kFLOP", "3.26 TFLOP"]
    assert plural(1, "stage") == "1 stage" and plural(16, "microbatch", "microbatches") == "16 microbatches"
