"""``distplan profile``: measure this machine for the cost model and write a calibration file.

A command module, registered by ``distplan.cli``; torch is imported inside the command only.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from distplan.errors import DistplanError
from distplan.presentation.cli_support import check_output, json_option, write_output

__all__ = ["profile_command", "register"]


def profile_command(
    kind: str | None = typer.Option(
        None,
        "--kind",
        "-k",
        help="Device-kind name the calibration is for, as your cluster YAML names it (e.g. a100-sxm-80g). "
        "Default: a name made from the device (e.g. nvidia-a100-sxm4-80gb).",
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Calibration file to write. Default: calibration-<kind>.json."
    ),
    device: str | None = typer.Option(
        None, "--device", help="cpu, cuda or cuda:N. Default: cuda when available, else cpu."
    ),
    ranks: int | None = typer.Option(
        None,
        "--ranks",
        help="Processes the link is measured between (1: no link). Default: every GPU on CUDA; 2 on a CPU "
        "with 2 cores or more.",
    ),
    quick: bool = typer.Option(False, "--quick", help="Under a minute, coarse curves. Default: off."),
    thorough: bool = typer.Option(
        False, "--thorough", help="Several minutes, fine curves and larger sizes. Default: off."
    ),
    precision: list[str] | None = typer.Option(
        None,
        "--precision",
        help="Matmul precision to measure (fp32, tf32, bf16, fp16); repeat for several. Default: the "
        "device's native ones.",
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="CPU compute threads while measuring. Default: 1 on CPU (one rank per core).",
    ),
    json_out: bool = json_option("one JSON object (file and headline figures) instead of a table"),
) -> None:
    """Measure this machine's device and link and write a calibration file for the cost model.

    The device part times matmuls, attention, memory-bound ops, per-op and per-microbatch overheads and the
    optimizer; the link part times point-to-point transfers and collectives over gloo or NCCL. Takes a
    couple of minutes by default."""
    from distplan.presentation.progress import ProgressLine

    if quick and thorough:
        raise DistplanError("give at most one of --quick and --thorough")
    if out is not None:
        check_output(out, option="--out")
    mode = "quick" if quick else "thorough" if thorough else "default"
    from distplan.profiler.api import profile

    with ProgressLine("profiling", json_out=json_out) as show:

        def progress(what: str, done: int, total: int) -> None:
            show({"phase": what, "done": done, "total": total})

        cal = profile(
            kind=kind,
            device=device,
            ranks=ranks,
            mode=mode,
            precisions=precision or None,
            threads=threads,
            progress=progress if show.enabled else None,
        )
    path = write_output(out or Path(f"calibration-{cal.kind}.json"), cal.to_json(), option="--out")
    figures = cal.summary()
    if json_out:
        typer.echo(json.dumps({"out": str(path), "seconds": cal.meta.get("seconds"), **figures}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"calibration of {cal.kind} ({figures.get('device', '')})", show_header=False)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in figures.items():
        if k in ("kind", "device"):
            continue
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(t)
    typer.echo(
        f"wrote {path} ({cal.meta.get('seconds')} s). Use it in a cluster YAML:\n"
        f"  calibrations: [{path}]\n"
        f"(it applies to device kind {cal.kind!r}; --kind sets that name)"
    )


def register(app: typer.Typer) -> None:
    """Add the ``profile`` command to the distplan CLI."""
    app.command("profile")(profile_command)
