"""``distplan demo``: the README's main job (see :mod:`distplan.presentation.demo`).

A command module, registered by ``distplan.cli``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from distplan.presentation.cli_support import check_output, json_option, write_output
from distplan.presentation.demo import (
    DEFAULT_CLUSTER,
    DEFAULT_GLOBAL_BATCH,
    DEFAULT_MODEL,
    DEFAULT_SEQ,
    DEFAULT_TIME_LIMIT_S,
)
from distplan.presentation.formatting import format_count, format_elapsed

__all__ = ["demo_command", "register"]


def demo_command(
    model: str = typer.Option(
        DEFAULT_MODEL,
        "--model",
        "-m",
        help="Built-in model name (see `distplan models`) or HF config.json path.",
    ),
    cluster: str = typer.Option(
        DEFAULT_CLUSTER,
        "--cluster",
        "-c",
        help="Cluster preset name (see `distplan clusters`) or a YAML file.",
    ),
    global_batch: int = typer.Option(
        DEFAULT_GLOBAL_BATCH, "--global-batch", "-b", help="Samples per training iteration."
    ),
    seq: int = typer.Option(DEFAULT_SEQ, "--seq", help="Sequence length the model is traced and planned at."),
    time_limit: float = typer.Option(
        DEFAULT_TIME_LIMIT_S, "--time-limit", help="Wall-clock limit of the planning, in seconds."
    ),
    steps: int = typer.Option(1, "--steps", help="Training steps the CPU validation runs and compares."),
    validate: bool = typer.Option(
        True, "--validate/--no-validate", help="Validate the lowered plan on this machine's CPU (gloo)."
    ),
    report: Path | None = typer.Option(
        None,
        "--report",
        help="Also write the plan's HTML report page here (default: none).",
        show_default=False,
    ),
    plan_out: Path | None = typer.Option(
        None, "--plan-out", help="Also save the plan JSON here (default: none).", show_default=False
    ),
    json_out: bool = json_option("one JSON object instead of tables (no progress)"),
    inject_fault: str | None = typer.Option(
        None, "--inject-fault", hidden=True, help="Testing aid passed to the validation (e.g. raise:1)."
    ),
) -> None:
    """The main job: trace, plan, simulate and validate a built-in model on a mixed cluster, and summarise.

    Traces the model on the meta device, plans it on the cluster, simulates one iteration, runs the lowered
    plan on this machine's CPU (one gloo process per rank) against the single-device model, then prints
    the plan table, the predicted iteration time, the speed-up over the equal split and over the best
    baseline, and the validation verdict. Exits 1 if the validation fails.
    """
    from rich.console import Console

    from distplan.presentation.demo import run_demo, summary_dict, summary_lines
    from distplan.presentation.progress import ProgressLine
    from distplan.presentation.tables import plan_table

    for path, option in ((plan_out, "--plan-out"), (report, "--report")):
        if path is not None:
            check_output(path, option=option)
    console = Console(width=None if sys.stdout.isatty() else 120, highlight=False)
    with ProgressLine("starting", json_out=json_out) as show:
        result = run_demo(
            model=model,
            cluster=cluster,
            global_batch=global_batch,
            seq=seq,
            time_limit_s=time_limit,
            validate=validate,
            steps=steps,
            progress=show,
            inject_fault=inject_fault,
        )
    if plan_out is not None:
        write_output(plan_out, result.plan.to_json(), option="--plan-out")
    if report is not None:
        from distplan.presentation.report import render_report

        page = render_report(result.plan, graph=result.graph, timeline=result.timeline)
        write_output(report, page, option="--report")
    if json_out:
        typer.echo(json.dumps(summary_dict(result), indent=1))
    else:
        g = result.graph
        c = result.plan.request.cluster
        kinds = ", ".join(f"{n} x {k}" for k, n in c.kind_counts().items())
        timing = ", ".join(f"{k} {format_elapsed(v)}" for k, v in result.seconds.items())
        console.print(
            f"distplan demo: {g.name} ({format_count(g.num_params)} parameters, {len(g.nodes):,} graph nodes) "
            f"on {c.name} ({kinds})"
        )
        console.print()
        console.print(plan_table(result.plan, result.graph))
        console.print()
        for line in summary_lines(result):
            console.print(line, soft_wrap=True)
        if plan_out is not None:
            console.print(f"Plan saved to {plan_out}")
        if report is not None:
            console.print(f"Report page written to {report}")
        console.print(f"[dim]({timing})[/dim]")
    if result.passed is False:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to the ``distplan`` CLI."""
    app.command("demo")(demo_command)
