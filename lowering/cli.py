"""``distplan lower`` and ``distplan validate``.

Both check the plan and the model before anything is written or spawned: a plan of another schema version,
a plan made for another model (structure hash), a model spec that cannot be built (unknown name, factory
that cannot be imported) or an ``--output`` selector that selects no tensor is a one-paragraph error and
exit code 2. ``validate`` exits 0 when the plan passed and 1 when it failed (numerics or a rank's failure);
``--json`` prints the report's contract. A command module, registered by ``distplan.cli``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from distplan.presentation.cli_support import (
    check_output,
    check_trace_size,
    json_option,
    model_option,
    output_selector_option,
    overrides_option,
    parse_overrides,
)

__all__ = ["lower_command", "register", "validate_command"]


def _check_model(
    plan: Any, model: str, *, seq: int, overrides: dict[str, Any], output: str | None = None
) -> None:
    """Build the model on the meta device, check the plan's structure hash against its trace and the output
    selector against its captured output."""
    from distplan.lowering._model import check_node_names, check_plan_graph
    from distplan.lowering.outputs import graph_output_node
    from distplan.tracer import capture, resolve_model, trace_bundle

    bundle = resolve_model(
        model, batch=plan.replica_microbatch(0), seq=seq, device="meta", config_overrides=overrides
    )
    graph = trace_bundle(bundle)
    check_plan_graph(plan, graph)
    check_node_names(plan, [n.name for n in graph.nodes], graph)
    if output is not None or len(graph.outputs) != 1:
        graph_output_node(capture(bundle.module, bundle.example_args, bundle.example_kwargs).gm, output)


def lower_command(
    plan_path: Path = typer.Argument(..., help="Plan JSON written by `distplan plan --out`."),
    model: str = model_option(),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder to write plan.json, train.py, launch.sh, commands.txt."
    ),
    steps: int = typer.Option(5, "--steps", help="Training steps the commands run. Default: 5."),
    seq: int = typer.Option(512, "--seq", "-s", help="Sequence length the commands use. Default: 512."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate the commands use. Default: 0.001."),
    checkpoint: str | None = typer.Option(
        None,
        "--checkpoint",
        help=(
            "Pretrained weights every command fine-tunes: a Hugging Face safetensors folder or a "
            "torch.distributed.checkpoint folder, as seen from the hosts. Default: none (fresh start)."
        ),
    ),
    port: int = typer.Option(29500, "--port", help="Rendezvous port on the first host. Default: 29500."),
    overrides: list[str] = overrides_option(),
    output: str | None = output_selector_option(),
    check: bool = typer.Option(
        True,
        "--check/--no-check",
        help="Trace the model and check the plan belongs to it. Default: check.",
    ),
    json_out: bool = json_option("one JSON object (files, commands) instead of text"),
) -> None:
    """Emit a launcher for a plan: plan.json, a train.py entry point and the torchrun command per host."""
    from distplan.lowering.launcher import emit_launcher
    from distplan.plan import Plan
    from distplan.presentation.progress import ProgressLine

    check_trace_size(seq=seq)
    config_overrides = parse_overrides(overrides)
    check_output(out, option="--out", folder=True)
    plan = Plan.load(plan_path)
    if check:
        with ProgressLine(f"checking the plan against {model}", json_out=json_out):
            _check_model(plan, model, seq=seq, overrides=config_overrides, output=output)
    files = emit_launcher(
        plan, model, out, steps=steps, seq=seq, lr=lr, port=port, output=output, checkpoint=checkpoint
    )
    if json_out:
        typer.echo(json.dumps(files.to_dict()))
        return
    typer.echo(f"wrote {files.plan_json}, {files.train_py}, {files.launch_sh}, {files.commands_txt}")
    typer.echo(f"plan: {plan.layout}")
    for h in files.hosts:
        typer.echo(f"host {h.host} (index {h.host_index}, {h.nproc} processes):")
        typer.echo(f"  {h.command}")
    typer.echo("all ranks on this machine's CPU (test):")
    typer.echo(f"  cd {files.out_dir} && {files.local_command}")


def validate_command(
    plan_path: Path = typer.Argument(..., help="Plan JSON written by `distplan plan --out`."),
    model: str = model_option(),
    steps: int = typer.Option(1, "--steps", "-k", help="Training steps to compare. Default: 1."),
    seq: int = typer.Option(
        16, "--seq", "-s", help="Sequence length of the validation batches. Default: 16."
    ),
    timeout: float = typer.Option(
        120.0, "--timeout", help="Seconds before a run (or any collective) counts as hung. Default: 120."
    ),
    width_reduce: bool | None = typer.Option(
        None,
        "--width-reduce/--full-width",
        help="Validate on a width-reduced copy of the model, or at full width. Default: decided by size.",
    ),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd, adam or adamw. Default: sgd."),
    max_ranks: int = typer.Option(
        16,
        "--max-ranks",
        help="Most processes to start; larger plans run one replica per stage. Default: 16.",
    ),
    overrides: list[str] = overrides_option(),
    output: str | None = output_selector_option(),
    json_out: bool = json_option("one JSON object (the report) instead of text"),
) -> None:
    """Run a plan on CPU ranks (gloo) and compare it with the single-device model.

    One process per rank runs the steps; loss, gradients and updated parameters are compared by original
    parameter name. Exit code 0 when it passed, 1 when it failed."""
    from distplan.lowering.validation import validate
    from distplan.plan import Plan
    from distplan.presentation.progress import ProgressLine

    check_trace_size(seq=seq)
    config_overrides = parse_overrides(overrides)
    plan = Plan.load(plan_path)
    with ProgressLine("validating", json_out=json_out) as show:
        report = validate(
            plan,
            model,
            steps=steps,
            seq=seq,
            timeout_s=timeout,
            width_reduce=width_reduce,
            optimizer=optimizer,
            max_ranks=max_ranks,
            config_overrides=config_overrides,
            progress=show,
            output=output,
        )
    if json_out:
        typer.echo(json.dumps(report.to_dict()))
    else:
        typer.echo(report.summary())
    if not report.passed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``lower`` and ``validate`` commands to the distplan CLI."""
    app.command("lower")(lower_command)
    app.command("validate")(validate_command)
