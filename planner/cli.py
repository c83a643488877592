"""``distplan plan`` and ``distplan simulate``.

A command module, registered by ``distplan.cli``. The tracer is imported inside the command, and only when
MODEL is not a graph JSON file, so planning a saved graph never loads torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from distplan.errors import PlanError
from distplan.presentation.cli_support import check_output, check_trace_size, json_option, write_output
from distplan.units import format_bytes

__all__ = ["load_graph", "plan_summary", "register"]

_DEFAULT_CLUSTER = "a100x8-v100x8"


def load_graph(model: str, *, batch: int = 1, seq: int | None = None, progress: Any | None = None) -> Any:
    """An ``OpGraph`` from a graph JSON file, or traced from a model spec (built-in name, config.json or
    ``package.module:function``) by ``distplan.tracer`` at ``batch`` x ``seq`` (the tracer's default
    ``seq`` when None). ``progress`` (a :class:`~distplan.presentation.progress.ProgressLine`) is retitled
    while tracing. Raises :class:`PlanError` for a ``.json`` file that is not JSON, and the tracer's errors.
    """
    from distplan.graph import OpGraph

    p = Path(model)
    if p.suffix == ".json" and p.exists():
        text = p.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{model}: not valid JSON: {e}") from e
        if isinstance(data, dict) and "nodes" in data:
            return OpGraph.load(p)
    if progress is not None:
        progress.set_title(f"tracing {model} (batch {batch}, seq {seq}) on the meta device")
    from distplan.tracer import trace  # imported lazily: it pulls in torch

    kw: dict[str, Any] = {"batch": batch}
    if seq is not None:
        kw["seq"] = seq
    return trace(model, **kw)


def plan_summary(plan: Any) -> dict[str, Any]:
    """The machine-readable summary ``distplan plan --json`` prints (see the issue's contract)."""
    pred = plan.predictions
    stages = []
    for s in plan.stages:
        cap = plan.request.cluster.kinds[s.kind].usable_memory_bytes
        stages.append(
            {
                "index": s.index,
                "start": s.start,
                "end": s.end,
                "start_node": s.start_node,
                "modules": list(s.modules),
                "kind": s.kind,
                "devices": list(s.devices),
                "dp": s.dp,
                "tp": s.tp,
                "recompute": s.recompute,
                "shard": s.shard,
                "fwd_time_s": s.fwd_time_s,
                "bwd_time_s": s.bwd_time_s,
                "send_time_s": s.send_time_s,
                "grad_send_time_s": s.grad_send_time_s,
                "allreduce_time_s": s.allreduce_time_s,
                "time_s": s.fwd_time_s + s.bwd_time_s,
                "memory_bytes": s.memory_bytes,
                # Per device: parameters, gradients, optimizer state, activations, and what recomputation and
                # sharding removed (None for plans made without the breakdown).
                "memory": None if s.memory is None else s.memory.to_dict(),
                "memory_capacity_bytes": cap,
                "param_bytes": s.param_bytes,
                # Parameters other stages hold too (tied weights) and the time to sum their gradients.
                "shared_param_bytes": s.shared_param_bytes,
                "tied_allreduce_time_s": s.tied_allreduce_time_s,
            }
        )
    it = pred.iteration_time_s
    return {
        "id": plan.id,
        "graph": plan.graph.name,
        "cluster": plan.request.cluster.name,
        "layout": plan.layout,
        "schedule": plan.schedule,
        "num_microbatches": plan.num_microbatches,
        # Samples per microbatch over all replicas of a stage; each stage's own degrees are in "stages".
        "microbatch_size": plan.microbatch_size,
        "dp": plan.stages[0].dp if plan.uniform_dp else None,
        "iteration_time_s": it,
        "throughput_samples_per_s": pred.throughput_samples_s,
        "bubble_fraction": pred.bubble_fraction,
        "num_stages": plan.num_stages,
        "devices_used": len(plan.devices_used),
        "device_ids": list(plan.devices_used),
        "solver": {
            "status": plan.solver.status,
            "objective": plan.solver.objective_s,
            "bound": plan.solver.bound_s,
            "gap": plan.solver.gap,
            "seconds": plan.solver.seconds,
            "notes": list(plan.solver.notes),
        },
        "baselines": dict(plan.baselines),
        "speedup": {k: (v / it if v and it > 0 else None) for k, v in plan.baselines.items()},
        "matmul_precision": pred.matmul_precision,
        # Per device kind and link: measured (distplan profile) or datasheet figures.
        "figures": dict(pred.figures),
        "stages": stages,
    }


def _span(modules: list[str]) -> str:
    if not modules:
        return "-"
    return modules[0] if len(modules) == 1 else f"{modules[0]} .. {modules[-1]} ({len(modules)})"


def _print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"{summary['graph']} on {summary['cluster']}: {summary['layout']}")
    shared = any(s["shared_param_bytes"] for s in summary["stages"])
    tp = any(s["tp"] != 1 for s in summary["stages"])
    saving = any(s["recompute"] != "none" or s["shard"] != "none" for s in summary["stages"])
    cols = [
        "stage",
        "modules",
        "devices",
        "dp x tp" if tp else "dp",
        "fwd+bwd ms",
        "send ms",
        "memory / capacity",
    ]
    if saving:
        cols.append("recompute / shard (saved)")
    if shared:
        cols.append("shared params (all-reduce ms)")
    for col in cols:
        t.add_column(col)
    for s in summary["stages"]:
        row = [
            str(s["index"]),
            _span(s["modules"]),
            f"{s['kind']} {','.join(str(d) for d in s['devices'])}",
            f"{s['dp']} x {s['tp']}" if tp else str(s["dp"]),
            f"{s['time_s'] * 1e3:.2f}",
            f"{s['send_time_s'] * 1e3:.2f}",
            f"{format_bytes(s['memory_bytes'])} / {format_bytes(s['memory_capacity_bytes'])}",
        ]
        if saving:
            mem = s["memory"] or {}
            saved = mem.get("recompute_saved", 0) + mem.get("shard_saved", 0)
            row.append(f"{s['recompute']} / {s['shard']}" + (f" (-{format_bytes(saved)})" if saved else ""))
        if shared:
            b = s["shared_param_bytes"]
            row.append(f"{format_bytes(b)} ({s['tied_allreduce_time_s'] * 1e3:.2f})" if b else "-")
        t.add_row(*row)
    con.print(t)
    sv = summary["solver"]
    con.print(
        f"predicted iteration {summary['iteration_time_s']:.4g} s, {summary['throughput_samples_per_s']:.4g} "
        f"samples/s, bubble {summary['bubble_fraction']:.1%}; {summary['num_microbatches']} microbatches of "
        f"{summary['microbatch_size']} samples, {summary['devices_used']} devices"
    )
    con.print(
        f"solver {sv['status']}: objective {sv['objective']:.4g} s, bound {sv['bound']:.4g} s, "
        f"gap {sv['gap']:.2%}, {sv['seconds']:.2f} s"
    )
    for note in sv["notes"][1:]:  # the first one summarises the candidates (in --json)
        con.print(f"  note: {note}")
    figures = summary.get("figures") or {}
    if figures:
        measured = [k for k, v in figures.items() if v != "datasheet"]
        guessed = [k for k, v in figures.items() if v == "datasheet"]
        con.print(
            f"figures (matmuls at {summary.get('matmul_precision') or 'the dtype'}): "
            + (f"calibrated: {', '.join(measured)}" if measured else "no calibration")
            + (f"; datasheet: {', '.join(guessed)}" if guessed else "")
        )
    for name, v in summary["baselines"].items():
        if v is None:
            con.print(f"  baseline {name}: does not fit")
        else:
            con.print(
                f"  baseline {name}: {v:.4g} s  (distplan is {v / summary['iteration_time_s']:.2f}x faster)"
            )


def register(app: typer.Typer) -> None:
    """Add ``plan`` and ``simulate`` to the ``distplan`` app."""

    @app.command("plan")
    def plan_command(
        model: str = typer.Argument(..., help="GRAPH.json (from `distplan trace`) or a model to trace."),
        cluster: str = typer.Option(
            _DEFAULT_CLUSTER, "--cluster", help="Cluster preset name or YAML/JSON file."
        ),
        global_batch: int = typer.Option(
            64, "--global-batch", help="Samples per training iteration. Default: 64."
        ),
        microbatches: int | None = typer.Option(
            None, "--microbatches", help="Fix the microbatch count (default: the planner chooses)."
        ),
        schedule: str | None = typer.Option(
            None, "--schedule", help="Fix the schedule: 1f1b or gpipe (default: the planner chooses)."
        ),
        dtype: str = typer.Option(
            "fp32", "--dtype", help="fp32, bf16 or fp16 (mixed precision). Default: fp32."
        ),
        matmul_precision: str | None = typer.Option(
            None,
            "--matmul-precision",
            help="How matmuls run: fp32, tf32 (fp32 tensors on TF32 tensor cores), bf16 or fp16 (autocast). "
            "Default: the dtype's own.",
        ),
        optimizer: str = typer.Option(
            "adam", "--optimizer", help="adam, adamw or sgd (its state is counted). Default: adam."
        ),
        time_limit: float = typer.Option(
            10.0,
            "--time-limit",
            help="Wall-clock limit of the whole planning, in seconds; the plan is decided by deterministic work "
            "sized well inside it, so it does not depend on the machine's load (the report says so if the "
            "limit was reached first). Default: 10.",
        ),
        workers: int = typer.Option(
            2, "--workers", help="CP-SAT worker threads (the plan does not depend on it). Default: 2."
        ),
        seq: int = typer.Option(
            512, "--seq", help="Sequence length when tracing MODEL (ignored for a graph JSON). Default: 512."
        ),
        batch: int = typer.Option(1, "--batch", help="Batch size when tracing MODEL. Default: 1."),
        out: Path | None = typer.Option(
            None, "--out", help="Write the plan JSON here (default: not written)."
        ),
        json_out: bool = json_option("one JSON object instead of a table"),
        no_baselines: bool = typer.Option(
            False, "--no-baselines", help="Skip the baselines (default: price them)."
        ),
        no_tensor_parallel: bool = typer.Option(
            False,
            "--no-tensor-parallel",
            help="Keep tp 1 in every stage (default: a stage may split over a tensor-parallel group of one host).",
        ),
        recompute: str = typer.Option(
            "none,selective,full",
            "--recompute",
            help="Activation recomputation modes a stage may use, comma-separated (none, selective, full); "
            "the planner chooses per stage. Default: none,selective,full.",
        ),
        shard: str = typer.Option(
            "none,optimizer,optimizer+gradients,full",
            "--shard",
            help="Sharding levels over a stage's data-parallel replicas a stage may use, comma-separated (none, "
            "optimizer, optimizer+gradients, full: ZeRO-1/2/3). Default: none,optimizer,optimizer+gradients,full.",
        ),
    ) -> None:
        """Plan pipeline stages and device placement for a model on a cluster."""
        from distplan.planner import plan as make_plan
        from distplan.presentation.progress import ProgressLine
        from distplan.request import as_request

        # The request (and the output, and the trace size) is checked before the model is traced: a bad
        # option fails at once, named as its option (see [Note: the request spine] in distplan.request).
        request = as_request(
            cluster=cluster,
            global_batch=global_batch,
            microbatches=microbatches,
            schedule=schedule,
            dtype=dtype,
            optimizer=optimizer,
            time_limit_s=time_limit,
            workers=workers,
            baselines=not no_baselines,
            matmul_precision=matmul_precision,
            tensor_parallel=not no_tensor_parallel,
            recompute=tuple(x.strip() for x in recompute.split(",") if x.strip()),
            shard=tuple(x.strip() for x in shard.split(",") if x.strip()),
        )
        check_trace_size(batch=batch, seq=seq)
        if out is not None:
            check_output(out, option="--out")
        with ProgressLine(f"loading {model}", json_out=json_out) as show:
            graph = load_graph(model, batch=batch, seq=seq, progress=show)
            show.set_title(f"planning on {request.cluster.name} ({request.cluster.num_devices} devices)")
            p = make_plan(graph, request, progress=show)
        if out is not None:
            write_output(out, p.to_json(), option="--out")
        summary = plan_summary(p)
        if json_out:
            typer.echo(json.dumps(summary, indent=1))
            return
        _print_table(summary)
        if out is not None:
            typer.echo(f"plan written to {out}")

    @app.command("simulate")
    def simulate_command(
        plan_file: Path = typer.Argument(..., help="A plan JSON written by `distplan plan --out`."),
        timeline: Path | None = typer.Option(
            None, "--timeline", help="Write a Chrome-trace/Perfetto JSON here (default: not written)."
        ),
        graph_file: Path | None = typer.Option(
            None,
            "--graph",
            help="The plan's graph JSON, checked against the plan and passed to the simulator (default: none).",
        ),
        json_out: bool = json_option("one JSON object instead of text"),
    ) -> None:
        """Simulate one training iteration of a plan, event by event."""
        from distplan.graph import OpGraph
        from distplan.plan import Plan
        from distplan.planner import simulate

        if timeline is not None:
            check_output(timeline, option="--timeline")
        p = Plan.load(plan_file)
        graph = OpGraph.load(graph_file) if graph_file is not None else None
        if graph is not None:
            p.check(graph)
        tl = simulate(p, graph)
        if timeline is not None:
            write_output(timeline, tl.to_chrome_trace_json(), option="--timeline")
        result = {
            "iteration_time_s": tl.iteration_time_s,
            "predicted_iteration_time_s": p.predictions.iteration_time_s,
            "bubble_fraction": tl.bubble_fraction,
            "events": len(tl.events),
            "devices": len(tl.devices),
            "timeline": str(timeline) if timeline is not None else None,
        }
        if json_out:
            typer.echo(json.dumps(result, indent=1))
            return
        typer.echo(
            f"simulated iteration {tl.iteration_time_s:.4g} s (predicted {p.predictions.iteration_time_s:.4g} s), "
            f"bubble {tl.bubble_fraction:.1%}, {len(tl.events)} events on {len(tl.devices)} devices"
            + (f"; timeline written to {timeline}" if timeline is not None else "")
        )
