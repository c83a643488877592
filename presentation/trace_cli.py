"""``distplan trace`` and ``distplan models``: a model to an annotated graph, and the built-in zoo.

A command module (registered by ``distplan.cli``). It lives here rather than in the tracer package because
importing anything from ``distplan.tracer`` imports torch (the package loads its parts eagerly): the tracer
is imported inside the commands, so ``distplan --help`` and every other command start without torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import typer

from distplan.presentation.cli_support import (
    check_output,
    json_option,
    overrides_option,
    parse_overrides,
    write_output,
)
from distplan.presentation.formatting import format_bytes, format_count, format_flops

__all__ = ["models_command", "register", "summary_dict", "trace_command"]

_NUMERIC = re.compile(r"^\d+$")


def summary_dict(graph: Any, *, out: str | None = None) -> dict[str, Any]:
    """The machine-readable summary of a traced graph (the ``--json`` contract of ``distplan trace``)."""
    costs = graph.cut_costs()
    interior = costs[1:-1] or costs
    meta = dict(graph.meta)
    return {
        "model": meta.get("spec", graph.name),
        "name": graph.name,
        "kind": meta.get("kind"),
        "method": meta.get("method"),
        "batch": meta.get("batch"),
        "seq": meta.get("seq"),
        "num_nodes": len(graph.nodes),
        "num_params": graph.num_params,
        "param_bytes": graph.param_bytes,
        "param_dtype": graph.param_dtype,
        "fwd_flops": graph.fwd_flops,
        "bwd_flops": graph.bwd_flops,
        "activation_bytes": graph.activation_bytes,
        "max_cut_bytes": max(interior),
        "min_cut_bytes": min(interior),
        "trace_seconds": meta.get("trace_seconds"),
        "structure_hash": graph.structure_hash,
        "uncounted_flops": meta.get("uncounted_flops", {}),
        "sampled_nodes": meta.get("sampled_nodes", 0),
        "out": out,
    }


def _module_group(module: str) -> str:
    """Group a module FQN at its first repeated-layer index (``model.layers.3.mlp`` -> ``model.layers.3``),
    or at depth 2 for modules outside a layer list."""
    if not module:
        return "<root>"
    parts = module.split(".")
    for i, p in enumerate(parts):
        if _NUMERIC.match(p):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2])


def _op(target: str) -> str:
    """``aten.linear.default`` -> ``linear``; other targets as they are."""
    if target.startswith("aten."):
        parts = target.split(".")
        return parts[1] if len(parts) == 3 and parts[2] == "default" else ".".join(parts[1:])
    return target


def _print_summary(graph: Any, info: dict[str, Any], top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{info['name']}[/bold] ({info['model']}, {info['kind']}) traced with {info['method']} "
        f"in {info['trace_seconds']:.2f} s at batch {info['batch']}, seq {info['seq']}"
    )
    console.print(
        f"  nodes {info['num_nodes']}   parameters {format_count(info['num_params'])} "
        f"({format_bytes(info['param_bytes'])} {info['param_dtype']})   "
        f"forward {format_flops(info['fwd_flops'])} / backward {format_flops(info['bwd_flops'])}   "
        f"activations saved {format_bytes(info['activation_bytes'])}   "
        f"cut cost {format_bytes(info['min_cut_bytes'])} .. {format_bytes(info['max_cut_bytes'])}"
    )
    for target, gap in info["uncounted_flops"].items():
        console.print(f"  [yellow]warning[/yellow]: {gap['nodes']} node(s) of {target}: {gap['reason']}")
    if info["sampled_nodes"]:
        console.print(
            f"  note: {info['sampled_nodes']} node(s) could not run on the meta device (data-dependent sizes, "
            "e.g. expert routing) and were evaluated on sampled values (top-k routing: uniform random)"
        )
    largest = sorted(graph.nodes, key=lambda n: n.output_bytes, reverse=True)[:top]
    t = Table(title=f"largest activations (top {len(largest)})")
    for col in ("node", "op", "module", "shape", "bytes"):
        t.add_column(col)
    for n in largest:
        shape = " ".join(f"{o.dtype}{list(o.shape)}" for o in n.outputs[:2])
        t.add_row(n.name, _op(n.target), n.module or "<root>", shape, format_bytes(n.output_bytes))
    console.print(t)
    groups: dict[str, list[Any]] = {}
    for n in graph.nodes:
        groups.setdefault(_module_group(n.module), []).append(n)
    t = Table(title="per module (grouped at layer index)")
    for col in ("module", "nodes", "params", "fwd FLOPs", "bwd FLOPs", "act. saved"):
        t.add_column(col, justify="left" if col == "module" else "right")
    for key, ns in groups.items():
        t.add_row(
            key,
            str(len(ns)),
            format_bytes(sum(n.param_bytes for n in ns)),
            format_flops(sum(n.fwd_flops for n in ns)),
            format_flops(sum(n.bwd_flops for n in ns)),
            format_bytes(sum(n.activation_bytes for n in ns)),
        )
    console.print(t)


def trace_command(
    model: str = typer.Argument(
        ...,
        help="Built-in model name (see `distplan models`), path to a Hugging Face config.json, "
        "or an importable factory package.module:function.",
    ),
    batch: int = typer.Option(1, "--batch", "-b", help="Batch size of the example inputs. Default: 1."),
    seq: int = typer.Option(
        512,
        "--seq",
        "-s",
        help="Sequence length of the example input_ids of language models. Default: 512.",
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write the annotated graph as JSON to this file. Default: not written."
    ),
    json_out: bool = json_option("one JSON object (model, num_nodes, num_params, ...) instead of tables"),
    device: str = typer.Option(
        "meta",
        "--device",
        help="Device the model is built on: meta (no weights allocated) or cpu (real random weights). "
        "Default: meta.",
    ),
    overrides: list[str] = overrides_option(),
    top: int = typer.Option(10, "--top", help="Rows of the largest-activations table. Default: 10."),
) -> None:
    """Trace a model into an annotated graph (shapes, FLOPs, bytes, memory) and summarise it."""
    from distplan.presentation.progress import ProgressLine

    # Options are checked before the model is built (batch and seq by resolve_model, first thing).
    config_overrides = parse_overrides(overrides)
    if out is not None:
        check_output(out, option="--out")
    from distplan.tracer.api import trace_bundle
    from distplan.tracer.zoo import resolve_model

    with ProgressLine(f"tracing {model} (batch {batch}, seq {seq}) on {device}", json_out=json_out):
        bundle = resolve_model(model, batch=batch, seq=seq, device=device, config_overrides=config_overrides)
        graph = trace_bundle(bundle)
    if out is not None:
        write_output(out, graph.to_json(), option="--out")
    info = summary_dict(graph, out=str(out) if out is not None else None)
    if json_out:
        typer.echo(json.dumps(info))
        return
    _print_summary(graph, info, top)
    if out is not None:
        typer.echo(f"graph written to {out}")


def models_command(json_out: bool = json_option()) -> None:
    """List the built-in models (use their names with `distplan trace`, `distplan plan`, ...)."""
    from distplan.tracer.zoo import list_models

    infos = list_models()
    if json_out:
        typer.echo(json.dumps({"models": [m.to_dict() for m in infos]}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="built-in models (random weights, built from configs)")
    for col in ("name", "family", "kind", "params", "description"):
        t.add_column(col)
    for m in infos:
        t.add_row(m.name, m.family, m.kind, format_count(m.approx_params), m.description)
    Console().print(t)


def register(app: typer.Typer) -> None:
    """Add the ``trace`` and ``models`` commands to the distplan CLI."""
    app.command("trace")(trace_command)
    app.command("models")(models_command)
