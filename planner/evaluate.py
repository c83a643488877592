"""Price a fixed layout with the cost model and turn it into a checked :class:`~distplan.plan.Plan`.

The planner, every baseline and the lowering's test plans go through :func:`build_plan`, so they are all
predicted by the same model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from distplan.cluster import Cluster, Device, Link
from distplan.errors import InfeasiblePlanError, PlanError
from distplan.graph import OpGraph, SharedParam
from distplan.plan import (
    GraphRef,
    Plan,
    PlanRequest,
    Predictions,
    SolverReport,
    Stage,
    build_rank_map,
    parse_layout,
)
from distplan.profiles import load_cluster
from distplan.units import format_bytes

from .cost import CostModel, StageCost, inflight_microbatches, iteration_time

__all__ = [
    "StageSpec",
    "build_plan",
    "evaluate",
    "layout_cost",
    "shared_costs",
    "stage_modules",
]


@dataclass(frozen=True, slots=True)
class StageSpec:
    """A stage of a fixed layout: node positions ``[start, end)`` on ``devices`` (one per replica)."""

    start: int
    end: int
    devices: tuple[int, ...]


def _send_link(
    cluster: Cluster, devs: Sequence[Device], a: Sequence[int], b: Sequence[int]
) -> tuple[Link, int]:
    """The link the replicas of one stage use to reach the next, and how many transfers share it."""
    crossing = sum(1 for x, y in zip(a, b, strict=True) if devs[x].host_index != devs[y].host_index)
    if crossing:
        return cluster.network, crossing
    # Each replica pair has its own intra-host link; the slowest one paces the stage.
    links = [cluster.hosts[devs[x].host_index].link for x in a]
    return min(links, key=lambda lk: (lk.bandwidth_bytes_s, -lk.latency_s)), 1


def _group_link(cluster: Cluster, devs: Sequence[Device], group: Sequence[int]) -> Link:
    hosts = {devs[d].host_index for d in group}
    return cluster.hosts[next(iter(hosts))].link if len(hosts) == 1 else cluster.network


def _holders_link(
    cluster: Cluster, devs: Sequence[Device], groups: Sequence[Sequence[int]]
) -> tuple[Link, int]:
    """The link the holders of a shared parameter sum its gradient on, and how many rings share it: replica
    ``r``'s ring joins device ``r`` of every holding stage (``groups``); rings that leave a host share the
    network, rings inside one host use its link (the slowest such host's paces the step)."""
    rings = [{devs[g[r]].host_index for g in groups} for r in range(len(groups[0]))]
    crossing = sum(1 for hosts in rings if len(hosts) > 1)
    if crossing:
        return cluster.network, crossing
    links = [cluster.hosts[next(iter(hosts))].link for hosts in rings]
    return min(links, key=lambda lk: (lk.bandwidth_bytes_s, -lk.latency_s)), 1


def shared_costs(cost: CostModel, stages: Sequence[StageSpec]) -> tuple[list[int], list[float]]:
    """Per stage: bytes of the parameters it shares with other stages of the layout, and the time to sum
    their gradients with them (see ``cost``'s module docstring)."""
    devs = cost.cluster.devices()
    nbytes = [0] * len(stages)
    seconds = [0.0] * len(stages)
    for sp in cost.shared:
        holders = [i for i, st in enumerate(stages) if _reads(sp, st)]
        if len(holders) < 2:
            continue
        link, streams = _holders_link(cost.cluster, devs, [stages[i].devices for i in holders])
        t = cost.allreduce_time(sp.nbytes, dp=len(holders), link=link, streams=streams)
        for i in holders:
            nbytes[i] += sp.nbytes
            seconds[i] += t
    return nbytes, seconds


def layout_cost(
    cost: CostModel,
    stages: Sequence[StageSpec],
    *,
    schedule: str,
    microbatches: int,
    microbatch_size: int,
) -> tuple[list[StageCost], float, float]:
    """Per-stage costs, iteration time and bubble fraction of a layout (no memory check)."""
    cluster = cost.cluster
    devs = cluster.devices()
    out: list[StageCost] = []
    num = len(stages)
    if schedule == "1f1b" and num > microbatches:
        # Not runnable (Schedule1F1B needs microbatches >= stages): price it out of every comparison.
        return [], math.inf, 1.0
    for i, st in enumerate(stages):
        kind = devs[st.devices[0]].kind
        send_link: Link | None = None
        streams = 1
        if i + 1 < num:
            send_link, streams = _send_link(cluster, devs, st.devices, stages[i + 1].devices)
        out.append(
            cost.stage_cost(
                st.start,
                st.end,
                kind=kind,
                microbatch=microbatch_size,
                inflight=inflight_microbatches(schedule, stage=i, num_stages=num, microbatches=microbatches),
                dp=len(st.devices),
                allreduce_link=_group_link(cluster, devs, st.devices),
                send_link=send_link,
                send_streams=streams,
            )
        )
    if cost.shared:
        shared_b, tied_s = shared_costs(cost, stages)
        out = [
            dataclasses.replace(c, shared_param_bytes=b, tied_allreduce_s=t)
            for c, b, t in zip(out, shared_b, tied_s, strict=True)
        ]
    it = iteration_time(out, schedule=schedule, microbatches=microbatches)
    return out, it.iteration_time_s, it.bubble_fraction


def stage_modules(graph: OpGraph, start: int, end: int) -> tuple[str, ...]:
    """Module paths a node range covers, cut after the first numbered component (``model.layers.3``)."""
    seen: dict[str, None] = {}
    for n in graph.nodes[start:end]:
        if not n.module:
            continue
        parts = n.module.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                parts = parts[: i + 1]
                break
        seen.setdefault(".".join(parts), None)
    return tuple(seen)


def _check_layout(graph: OpGraph, cluster: Cluster, stages: Sequence[StageSpec]) -> None:
    n = len(graph.nodes)
    devs = cluster.devices()
    if not stages:
        raise PlanError("a layout needs at least one stage")
    pos = 0
    used: dict[int, int] = {}
    dp = len(stages[0].devices)
    for i, st in enumerate(stages):
        if st.start != pos:
            what = (
                "overlaps the previous one"
                if st.start < pos
                else f"leaves nodes {pos}..{st.start - 1} unplaced"
            )
            raise PlanError(f"stage {i} starts at node {st.start}, expected {pos}: it {what}")
        if st.end <= st.start:
            raise PlanError(f"stage {i} covers no nodes ([{st.start}, {st.end}))")
        if st.end > n:
            raise PlanError(f"stage {i} ends at node {st.end} but the graph has only {n} nodes")
        pos = st.end
        if not st.devices:
            raise PlanError(f"stage {i} has no devices")
        if len(st.devices) != dp:
            raise PlanError(
                f"stage {i} has {len(st.devices)} devices but stage 0 has {dp}; all stages share one "
                "data-parallel degree"
            )
        kinds = set()
        for d in st.devices:
            if not 0 <= d < len(devs):
                raise PlanError(
                    f"stage {i} uses device {d}, but cluster {cluster.name!r} has {len(devs)} devices"
                )
            if d in used:
                raise PlanError(f"device {d} is used by stages {used[d]} and {i}")
            used[d] = i
            kinds.add(devs[d].kind)
        if len(kinds) > 1:
            raise PlanError(
                f"stage {i} mixes device kinds {sorted(kinds)}; a stage's devices must be one kind"
            )
    if pos != n:
        raise PlanError(
            f"the stages end at node {pos} but the graph has {n} nodes (nodes {pos}..{n - 1} unplaced)"
        )


def _reads(sp: SharedParam, st: StageSpec) -> bool:
    return any(st.start <= p < st.end for p in sp.positions)


def build_plan(
    graph: OpGraph,
    cost: CostModel,
    request: PlanRequest,
    stages: Sequence[StageSpec],
    *,
    schedule: str,
    microbatches: int,
    microbatch_size: int,
    solver: SolverReport | None = None,
    baselines: dict[str, float | None] | None = None,
) -> Plan:
    """A checked plan for a fixed layout; raises :class:`InfeasiblePlanError` when a stage overflows its
    devices' memory and :class:`PlanError` when the layout is malformed."""
    cluster = cost.cluster
    _check_layout(graph, cluster, stages)
    if schedule not in ("gpipe", "1f1b"):
        raise PlanError(f"the planner's cost model supports schedules gpipe and 1f1b, not {schedule!r}")
    dp = len(stages[0].devices)
    if microbatches * microbatch_size * dp != request.global_batch:
        raise PlanError(
            f"{microbatches} microbatches x {microbatch_size} samples x dp {dp} = "
            f"{microbatches * microbatch_size * dp}, but global_batch is {request.global_batch}"
        )
    if schedule == "1f1b" and len(stages) > microbatches:
        raise PlanError(
            f"1f1b needs at least as many microbatches as stages: {microbatches} microbatches, "
            f"{len(stages)} stages (use more microbatches, fewer stages, or gpipe)"
        )
    costs, total, bubble = layout_cost(
        cost, stages, schedule=schedule, microbatches=microbatches, microbatch_size=microbatch_size
    )
    devs = cluster.devices()
    out: list[Stage] = []
    memory: dict[int, int] = {}
    for i, (st, c) in enumerate(zip(stages, costs, strict=True)):
        kind = devs[st.devices[0]].kind
        cap = cluster.kinds[kind].usable_memory_bytes
        if c.memory_bytes > cap:
            shared = ""
            if c.shared_param_bytes:
                names = [
                    ", ".join(sp.names)
                    for sp in cost.shared
                    if _reads(sp, st) and any(_reads(sp, o) for o in stages if o is not st)
                ]
                shared = (
                    f", of which {format_bytes(cost.state_bytes(c.shared_param_bytes))} for parameters it "
                    f"shares with other stages ({'; '.join(names)})"
                )
            raise InfeasiblePlanError(
                f"stage {i} (nodes {st.start}..{st.end - 1}) needs {format_bytes(c.memory_bytes)} per device "
                f"({format_bytes(cost.state_bytes(c.param_bytes))} parameters, gradients and optimizer state"
                f"{shared} + {c.inflight} x "
                f"{format_bytes(cost.activation_bytes(st.start, st.end, microbatch_size, kind))} activations) but a "
                f"{kind} has {format_bytes(cap)} usable ({format_bytes(c.memory_bytes - cap)} short)"
            )
        for d in st.devices:
            memory[d] = c.memory_bytes
        out.append(
            Stage(
                index=i,
                start=st.start,
                end=st.end,
                devices=tuple(st.devices),
                kind=kind,
                dp=dp,
                start_node=graph.nodes[st.start].name,
                modules=stage_modules(graph, st.start, st.end),
                fwd_time_s=c.fwd_s,
                bwd_time_s=c.bwd_s,
                send_time_s=c.send_s,
                allreduce_time_s=c.allreduce_s,
                memory_bytes=c.memory_bytes,
                param_bytes=c.param_bytes,
                shared_param_bytes=c.shared_param_bytes,
                tied_allreduce_time_s=c.tied_allreduce_s,
            )
        )
    plan = Plan(
        request=request,
        graph=GraphRef.of(graph),
        stages=tuple(out),
        num_microbatches=microbatches,
        microbatch_size=microbatch_size * dp,
        schedule=schedule,
        rank_map=build_rank_map(cluster, [s.devices for s in stages]),
        predictions=Predictions(
            iteration_time_s=total,
            throughput_samples_s=request.global_batch / total if total > 0 else 0.0,
            bubble_fraction=bubble,
            device_memory_bytes=memory,
            matmul_precision=cost.precision,
            figures=cost.figures(),
        ),
        solver=solver
        or SolverReport(solver="fixed-layout", status="FIXED", objective_s=total, bound_s=total),
        baselines=dict(baselines or {}),
    )
    plan.check(graph)
    return plan


def evaluate(
    graph: OpGraph,
    *,
    cluster: str | Cluster | dict,
    layout: str | Sequence[StageSpec],
    global_batch: int,
    dtype: str = "fp32",
    optimizer: str = "adam",
    schedule: str = "1f1b",
    microbatches: int | None = None,
    matmul_precision: str | None = None,
) -> Plan:
    """A plan for a FIXED layout, predicted by the cost model.

    ``layout`` is the compact form (``"1f1b m4x2 | 0:812@0,1 | 812:1603@8,9"``, see ``Plan.layout``; its
    schedule and microbatch count win) or a list of :class:`StageSpec` (then ``schedule`` and
    ``microbatches``, default one microbatch per sample per replica, apply).

        >>> from distplan.planner.synthetic import synthetic_transformer
        >>> g = synthetic_transformer(layers=2, hidden=64, heads=4, seq=16, vocab=100)
        >>> p = evaluate(g, cluster="cpu-local", layout=f"1f1b m2x1 | 0:10@0 | 10:{len(g)}@1", global_batch=2)
        >>> p.num_stages
        2
    """
    c = load_cluster(cluster)
    if isinstance(layout, str):
        parsed = parse_layout(layout)
        if (
            any(st.tp != 1 or st.recompute != "none" or st.shard != "none" for st in parsed.stages)
            or len({st.dp for st in parsed.stages}) > 1
        ):
            raise PlanError(
                f"layout {layout!r}: the cost model prices stages with one shared dp degree, tp 1, no "
                "recomputation and no sharding"
            )
        schedule, microbatches = parsed.schedule, parsed.num_microbatches
        dp = parsed.stages[0].dp
        if parsed.microbatch_size % dp:
            raise PlanError(
                f"layout {layout!r}: global microbatch {parsed.microbatch_size} does not divide among dp {dp}"
            )
        mb_size = parsed.microbatch_size // dp
        stages = [StageSpec(st.start, st.end, st.devices) for st in parsed.stages]
    else:
        stages = list(layout)
        if not stages:
            raise PlanError("a layout needs at least one stage")
        dp = len(stages[0].devices)
        if microbatches is None:
            microbatches = max(1, global_batch // max(dp, 1))
        if global_batch % (microbatches * dp):
            raise PlanError(
                f"global_batch {global_batch} is not divisible into {microbatches} microbatches x dp {dp} "
                f"(remainder {global_batch % (microbatches * dp)})"
            )
        mb_size = global_batch // (microbatches * dp)
    request = PlanRequest(
        cluster=c,
        global_batch=global_batch,
        dtype=dtype,
        optimizer=optimizer,
        matmul_precision=matmul_precision,
    )
    cost = CostModel(graph, c, dtype=dtype, optimizer=optimizer, matmul_precision=matmul_precision)
    return build_plan(
        graph, cost, request, stages, schedule=schedule, microbatches=microbatches, microbatch_size=mb_size
    )
