"""Tables for the terminal (rich): a plan, one row per stage.

>>> from rich.console import Console                                       # doctest: +SKIP
>>> Console().print(plan_table(plan, graph))                               # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distplan.presentation.formatting import (
    device_ranges,
    format_bytes,
    format_degrees,
    format_seconds,
    layer_summary,
    plural,
)

if TYPE_CHECKING:
    from rich.table import Table

    from distplan.graph import OpGraph
    from distplan.plan import Plan

__all__ = ["plan_table"]


def plan_table(plan: Plan, graph: OpGraph) -> Table:
    """``plan`` as a rich table, one row per stage: devices, kind, the layers it covers (named from
    ``graph``, the graph the plan is for), forward + backward time of one microbatch, memory per device
    against the kind's usable memory. The title gives the shape of the plan and the solver's verdict."""
    from rich.table import Table

    cluster = plan.request.cluster
    s = plan.solver
    title = (
        f"Plan: {plural(plan.num_stages, 'stage')} x {format_degrees(plan)} on {len(plan.devices_used)} of "
        f"{cluster.num_devices} devices, {plan.schedule}, "
        f"{plural(plan.num_microbatches, 'microbatch', 'microbatches')} of {plan.microbatch_size} "
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
    return t
