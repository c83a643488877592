"""``distplan profile``: measure this machine for the cost model and write a calibration file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile_command(
        kind: str = typer.Option(
            None,
            "--kind",
            "-k",
            help="Device-kind name the calibration is for, as your cluster YAML names it (e.g. a100-sxm-80g). "
            "Default: a name made from the device (e.g. nvidia-a100-sxm4-80gb).",
        ),
        out: Path = typer.Option(
            None, "--out", "-o", help="Calibration file to write. Default: calibration-<kind>.json."
        ),
        device: str = typer.Option(
            None, "--device", help="cpu, cuda or cuda:N. Default: cuda when available."
        ),
        ranks: int = typer.Option(
            None,
            "--ranks",
            help="Processes the link is measured between (1: no link). Default: every GPU on CUDA; 2 on a CPU "
            "with 2 cores or more.",
        ),
        quick: bool = typer.Option(False, "--quick", help="A few seconds, coarse curves. Default: off."),
        thorough: bool = typer.Option(
            False, "--thorough", help="Several minutes, fine curves and larger sizes. Default: off."
        ),
        precision: list[str] = typer.Option(
            None,
            "--precision",
            help="Matmul precision to measure (fp32, tf32, bf16, fp16); repeat for several. Default: the "
            "device's native ones.",
        ),
        threads: int = typer.Option(
            None,
            "--threads",
            help="CPU compute threads while measuring. Default: 1 on CPU (one rank per core).",
        ),
        json_out: bool = typer.Option(
            False, "--json", help="Print one JSON object (file and headline figures)."
        ),
    ) -> None:
        """Measure this machine's device and link (matmul, attention, memory-bound ops, per-op and
        per-microbatch overheads, optimizer; point-to-point and collectives over gloo/NCCL) and write a
        calibration file for the cost model. Takes about a minute by default."""
        from distplan.cli import fail
        from distplan.presentation.progress import progress_wanted

        if quick and thorough:
            fail("give at most one of --quick and --thorough")
        mode = "quick" if quick else "thorough" if thorough else "default"
        from distplan.profiler.api import profile

        show = progress_wanted(json_out=json_out)
        kwargs: dict[str, Any] = {
            "kind": kind,
            "device": device,
            "ranks": ranks,
            "mode": mode,
            "precisions": precision or None,
            "threads": threads,
        }
        if show:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(
                TextColumn("[bold]profiling[/bold] {task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                transient=True,
            ) as bar:
                task = bar.add_task("", total=1.0)
                phase = {"link": False}

                def progress(what: str, done: int, total: int) -> None:
                    # The device part fills the first 70% of the bar, the link the rest.
                    frac = done / max(total, 1)
                    if what == "link":
                        phase["link"] = True
                        bar.update(task, completed=0.7 + 0.3 * frac, description="link")
                    elif not phase["link"]:
                        bar.update(task, completed=0.7 * frac, description=what)

                cal = profile(**kwargs, progress=progress)
        else:
            cal = profile(**kwargs)
        path = out or Path(f"calibration-{cal.kind}.json")
        cal.save(path)
        figures = cal.summary()
        if json_out:
            typer.echo(
                json.dumps({"out": str(path), "seconds": cal.meta.get("seconds"), **figures}, indent=1)
            )
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
