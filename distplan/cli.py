"""The ``distplan`` command line.

Each pipeline stage registers its own sub-commands from its package's ``cli.py`` (``register(app)``), so
the stages stay independent. Those modules import torch and other heavy libraries inside the command
functions only, which keeps ``distplan --help`` and ``distplan plan graph.json`` fast.

Errors a user can cause (:class:`~distplan.errors.DistplanError`) print one paragraph and exit with code 2;
``--debug`` (anywhere on the line) or ``DISTPLAN_DEBUG=1`` shows the traceback too.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from distplan.errors import DistplanError

__all__ = ["app", "fail", "main", "option_of", "write_output"]

app = typer.Typer(
    name="distplan",
    help="Plan, lower and validate the distribution of a PyTorch model over a (mixed) GPU cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Sub-packages that contribute commands, in the order of the pipeline.
_COMMAND_MODULES = (
    "distplan.tracer.cli",
    "distplan.planner.cli",
    "distplan.lowering.cli",
    "distplan.profiler.cli",
    "distplan.service.cli",
    "distplan.presentation.report_cli",
    "distplan.presentation.demo_cli",
    "distplan.scheduler.cli",
)

_registered = False


def _register_all() -> None:
    global _registered
    if _registered:
        return
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that stage has no commands yet
                continue
            raise
        module.register(app)
    _registered = True


@app.command("clusters")
def clusters_command(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """List the built-in cluster presets: name, device count and the device kinds each holds."""
    import json

    from distplan.profiles import list_presets, preset_cluster

    rows: list[dict[str, Any]] = []
    for name in list_presets():
        c = preset_cluster(name)
        rows.append(
            {
                "name": name,
                "num_devices": c.num_devices,
                "num_hosts": len(c.hosts),
                "kinds": c.kind_counts(),
                "description": c.description,
            }
        )
    if json_out:
        typer.echo(json.dumps({"clusters": rows}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="cluster presets (use with --cluster NAME, or pass a YAML file)")
    for col in ("name", "devices", "hosts", "kinds", "description"):
        t.add_column(col)
    for r in rows:
        kinds = ", ".join(f"{n} x {k}" for k, n in r["kinds"].items())
        t.add_row(str(r["name"]), str(r["num_devices"]), str(r["num_hosts"]), kinds, str(r["description"]))
    Console().print(t)


@app.command("device-kinds")
def device_kinds_command(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """List the device-kind catalogue: memory, bandwidth and peak TFLOP/s per dtype."""
    import json

    from distplan.profiles import device_kinds

    kinds = device_kinds()
    if json_out:
        typer.echo(json.dumps({"kinds": [k.to_dict() for k in kinds.values()]}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="device kinds")
    for col in ("name", "memory GiB", "HBM GB/s", "fp32", "tf32", "bf16", "fp16", "efficiency"):
        t.add_column(col)
    for k in kinds.values():
        tf = [
            f"{k.peak_flops[d] / 1e12:g}" if d in k.peak_flops else "-"
            for d in ("fp32", "tf32", "bf16", "fp16")
        ]
        t.add_row(
            k.name,
            f"{k.memory_bytes / 2**30:g}",
            f"{k.memory_bandwidth_bytes_s / 1e9:g}",
            *tf,
            f"{k.efficiency:g}",
        )
    Console().print(t)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print an error paragraph to stderr and exit (for commands' own argument checks)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def write_output(path: Path, text: str) -> None:
    """Write a command's output file (making its folder); an OS error becomes a one-line DistplanError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise DistplanError(f"cannot write {str(path)!r}: {e.strerror}") from e


# Request fields whose command-line option is not ``--`` + the field with dashes.
_OPTIONS = {"time_limit_s": "--time-limit", "baselines": "--no-baselines", "model": "MODEL"}


def option_of(field: str | None) -> str:
    """The command-line spelling of a request field (``global_batch`` -> ``--global-batch``), for error
    messages that name a field (``DistplanError.field``; see [Note: the request spine] in
    ``distplan.request``)."""
    if not field:
        return ""
    return _OPTIONS.get(field, "--" + field.replace("_", "-"))


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DISTPLAN_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    _register_all()
    try:
        # Without standalone mode, click returns a command's `typer.Exit(code)` instead of exiting.
        rc = app(args=args, prog_name="distplan", standalone_mode=False)
        if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
            sys.exit(rc)
    except DistplanError as e:
        if debug:
            raise
        flag = option_of(e.field) if getattr(e, "field", None) else ""
        typer.echo(f"error: {flag + ': ' if flag else ''}{e}", err=True)
        if e.__cause__ is not None and not isinstance(e.__cause__, DistplanError):
            cause = str(e.__cause__).strip().splitlines()
            typer.echo(
                f"  caused by {type(e.__cause__).__name__}: {cause[0][:300] if cause else ''}", err=True
            )
        typer.echo("  (run with --debug for the traceback)", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        # Usage errors (unknown command, bad option value): typer raises its own vendored copy of click's
        # ClickException, so recognise it by behaviour rather than by class.
        show = getattr(e, "show", None)
        if callable(show) and isinstance(getattr(e, "exit_code", None), int):
            show()
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        if debug:
            raise
        typer.echo(f"internal error: {type(e).__name__}: {e}", err=True)
        typer.echo("  (this is a distplan bug; run with --debug for the traceback and report it)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
