"""``distplan demo``: the README's main job (see :mod:`distplan.presentation.demo`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from distplan.cli import write_output
from distplan.presentation.demo import (
    DEFAULT_CLUSTER,
    DEFAULT_GLOBAL_BATCH,
    DEFAULT_MODEL,
    DEFAULT_SEQ,
    DEFAULT_TIME_LIMIT_S,
)

if TYPE_CHECKING:
    from rich.console import Console

    from distplan.presentation.demo import DemoResult

__all__ = ["demo_command", "print_plan_table", "register"]


def print_plan_table(result: DemoResult, console: Console) -> None:
    """The plan as a table: one row per stage."""
    from rich.table import Table

    from distplan.presentation.report import device_ranges, format_bytes, format_seconds, layer_summary

    plan, graph = result.plan, result.graph
    cluster = plan.request.cluster
    s = plan.solver
    title = (
        f"Plan: {_n(plan.num_stages, 'stage')} x dp {plan.dp} on {len(plan.devices_used)} of {cluster.num_devices} "
        f"devices, {plan.schedule}, {_n(plan.num_microbatches, 'microbatch', 'microbatches')} of {plan.microbatch_size} "
        f"(solver {s.status}, gap {s.gap * 100:.1f}%, {s.seconds:.1f} s)"
    )
    t = Table(title=title, title_justify="left")
    for col, justify in (
        ("stage", "right"),
        ("devices", "left"),
        ("kind", "left"),
        ("layers / modules", "left"),
        ("fwd+bwd / microbatch", "right"),
        ("memory / device", "right"),
    ):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for st in plan.stages:
        cap = cluster.kinds[st.kind].usable_memory_bytes
        mods = (
            layer_summary([n.module for n in graph.nodes[st.start : st.end]]) or f"nodes {st.start}-{st.end}"
        )
        t.add_row(
            str(st.index),
            device_ranges(st.devices),
            st.kind,
            mods,
            format_seconds(st.fwd_time_s + st.bwd_time_s),
            f"{format_bytes(st.memory_bytes)} / {format_bytes(cap)}",
        )
    console.print(t)


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
        DEFAULT_TIME_LIMIT_S, "--time-limit", help="Solver time limit in seconds."
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
    json_out: bool = typer.Option(
        False, "--json", help="Print one JSON object instead of tables (no progress)."
    ),
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
        write_output(plan_out, result.plan.to_json())
    if report is not None:
        from distplan.presentation.report import render_report

        write_output(report, render_report(result.plan, graph=result.graph, timeline=result.timeline))
    if json_out:
        typer.echo(json.dumps(summary_dict(result), indent=1))
    else:
        g = result.graph
        c = result.plan.request.cluster
        kinds = ", ".join(f"{n} x {k}" for k, n in c.kind_counts().items())
        timing = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
        console.print(
            f"distplan demo: {g.name} ({_count(g.num_params)} parameters, {len(g.nodes):,} graph nodes) "
            f"on {c.name} ({kinds})"
        )
        console.print()
        print_plan_table(result, console)
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


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _count(n: int) -> str:
    """``124M``, ``1.56B``, ``184K``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(n)


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to the ``distplan`` CLI."""
    app.command("demo")(demo_command)
