"""Plans for the lowering tests, made by the planner's ``evaluate`` for a fixed layout (the same cost model
and plan builder the solver uses), or by hand where the planner has no such layout (interleaved)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from distplan.graph import OpGraph
from distplan.plan import GraphRef, Plan, PlanRequest, Stage, build_rank_map
from distplan.planner import evaluate
from distplan.profiles import load_cluster
from distplan.request import PLANNER_SCHEDULES
from distplan.tracer import trace

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def graph_of(spec: str) -> OpGraph:
    return trace(spec, batch=1, seq=16)


def layout_plan(spec: str, layout: str, *, global_batch: int, cluster: str = "cpu-local") -> Plan:
    """``layout`` may use ``{n}`` for the node count and ``{n*F}`` style fractions via ``cut(F)``."""
    g = graph_of(spec)
    return evaluate(g, cluster=cluster, layout=layout.format(n=len(g)), global_batch=global_batch)


def cut(spec: str, fraction: float) -> int:
    return int(len(graph_of(spec)) * fraction)


def hand_plan(
    spec: str,
    *,
    bounds: list[int],
    devices: list[tuple[int, ...]],
    schedule: str,
    microbatches: int,
    microbatch_size: int = 1,
    cluster: str = "cpu-local",
) -> Plan:
    """A plan built directly from ``distplan.plan`` (for layouts ``evaluate`` does not take)."""
    g = graph_of(spec)
    c = load_cluster(cluster)
    edges = [0, *bounds, len(g)]
    stages = tuple(
        Stage(i, edges[i], edges[i + 1], devices[i], c.devices()[devices[i][0]].kind, dp=len(devices[i]))
        for i in range(len(devices))
    )
    dp = len(devices[0])
    # The request records what a planner would be asked; interleaved-1f1b plans are written by hand only.
    req = PlanRequest(
        c,
        global_batch=microbatches * microbatch_size * dp,
        schedule=schedule if schedule in PLANNER_SCHEDULES else None,
    )
    return Plan(
        req,
        GraphRef.of(g),
        stages,
        microbatches,
        microbatch_size * dp,
        schedule,
        build_rank_map(c, [s.devices for s in stages]),
    )


def cli_env() -> dict[str, str]:
    """Environment for ``python -m distplan.cli`` subprocesses: this tree first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x)
    env["DISTPLAN_PROGRESS"] = "0"
    return env


PYTHON = sys.executable
