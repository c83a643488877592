"""``distplan clusters`` and ``distplan device-kinds``: the built-in cluster presets and the device-kind
catalogue (``distplan.profiles``), as tables or JSON. A command module, registered by ``distplan.cli``."""

from __future__ import annotations

import json
from typing import Any

import typer

from distplan.presentation.cli_support import json_option

__all__ = ["clusters_command", "device_kinds_command", "register"]


def clusters_command(json_out: bool = json_option()) -> None:
    """List the built-in cluster presets: name, device count and the device kinds each holds."""
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


def device_kinds_command(json_out: bool = json_option()) -> None:
    """List the device-kind catalogue: memory, bandwidth and peak TFLOP/s per dtype."""
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


def register(app: typer.Typer) -> None:
    """Add the ``clusters`` and ``device-kinds`` commands to the distplan CLI."""
    app.command("clusters")(clusters_command)
    app.command("device-kinds")(device_kinds_command)
