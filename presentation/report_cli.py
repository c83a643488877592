"""``distplan report``: write a plan's report page (and its timeline as SVG / PNG) from a plan file.

A command module, registered by ``distplan.cli``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from distplan.presentation.cli_support import check_output, write_output

if TYPE_CHECKING:
    from distplan.graph import OpGraph
    from distplan.plan import Plan
    from distplan.timeline import Timeline

__all__ = ["register", "report_command"]


def _simulate(plan: Plan, graph: OpGraph | None) -> Timeline:
    from distplan.planner import simulate

    return simulate(plan, graph)


def report_command(
    plan_file: Path = typer.Argument(
        ...,
        help="Plan JSON written by `distplan plan --out` (or the service).",
        show_default=False,
        metavar="PLAN.json",
    ),
    out: Path = typer.Option(
        Path("report.html"), "--out", "-o", help="Where to write the HTML page. Default: report.html."
    ),
    graph_file: Path | None = typer.Option(
        None,
        "--graph",
        help="Traced graph JSON (`distplan trace --out`) the plan is for: sizes the model view by compute. "
        "(default: none; the model view lists each stage's modules)",
        show_default=False,
    ),
    timeline_file: Path | None = typer.Option(
        None,
        "--timeline",
        help="Timeline JSON (`distplan simulate --timeline`) to draw. (default: simulate the plan now)",
        show_default=False,
    ),
    timeline_svg: Path | None = typer.Option(
        None,
        "--timeline-svg",
        help="Also write the timeline alone as a standalone SVG file, for docs. (default: none)",
        show_default=False,
    ),
    timeline_png: Path | None = typer.Option(
        None,
        "--timeline-png",
        help="Also write the timeline as a PNG (rendered by headless chromium, which must be installed). "
        "(default: none)",
        show_default=False,
    ),
) -> None:
    """Write a plan's report: one self-contained HTML page (and the timeline alone as SVG or PNG).

    The page shows the cluster's hosts and devices coloured by stage, per-stage time and memory against
    capacity, the model's layers coloured by stage, the simulated timeline (one row per device), the
    baselines and the solver report. It needs no network to view.
    """
    import tempfile

    from distplan.graph import OpGraph
    from distplan.plan import Plan
    from distplan.presentation.pictures import render_timeline_svg, write_timeline_png
    from distplan.presentation.report import render_report

    for path, option in ((out, "--out"), (timeline_svg, "--timeline-svg"), (timeline_png, "--timeline-png")):
        if path is not None:
            check_output(path, option=option)
    plan = Plan.load(plan_file)
    graph = OpGraph.load(graph_file) if graph_file is not None else None
    if graph is not None:
        plan.check(graph)
    timeline = _load_timeline(timeline_file) if timeline_file is not None else _simulate(plan, graph)
    page = render_report(plan, graph=graph, timeline=timeline)
    write_output(out, page, option="--out")
    typer.echo(f"wrote {out} ({len(page) / 1024:.0f} KiB): open it in a browser")
    title = f"{plan.graph.name} on {plan.request.cluster.name}"
    if timeline_svg is not None:
        write_output(timeline_svg, render_timeline_svg(timeline, title=title), option="--timeline-svg")
        typer.echo(f"wrote {timeline_svg}")
    if timeline_png is not None:
        # chromium draws into a file of its own; the one output writer puts it in place.
        with tempfile.TemporaryDirectory(prefix="distplan-report-") as tmp:
            drawn = Path(tmp) / "timeline.png"
            write_timeline_png(timeline, drawn, title=title)
            write_output(timeline_png, drawn.read_bytes(), option="--timeline-png")
        typer.echo(f"wrote {timeline_png}")


def _load_timeline(path: Path) -> Timeline:
    from distplan.timeline import Timeline

    return Timeline.load(path)


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to the ``distplan`` CLI."""
    app.command("report")(report_command)
