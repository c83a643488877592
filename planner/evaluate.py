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
    LayoutStage,
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
from .parallelism import StageConfig

__all__ = [
    "StageSpec",
    "boundary_transfer",
    "build_plan",
    "evaluate",
    "layout_cost",
    "shared_costs",
    "stage_modules",
]


@dataclass(frozen=True, slots=True)
class StageSpec(LayoutStage):
    """A stage of a fixed layout (the fields of :class:`distplan.plan.LayoutStage`): node positions
    ``[start, end)`` on ``devices`` (``dp * tp`` of them, replica-major: ``devices[r * tp + t]`` is
    tensor-parallel rank ``t`` of replica ``r``), with its recomputation and sharding (see [Note: stages and
    replicas] in ``distplan.plan``); what the planner asks of it besides."""

    @property
    def config(self) -> StageConfig:
        """How the stage runs (raises :class:`PlanError` for an invalid combination)."""
        return StageConfig(self.dp, self.tp, self.recompute, self.shard)

    def group(self, replica: int) -> tuple[int, ...]:
        """The devices of one replica (its tensor-parallel group)."""
        return self.devices[replica * self.tp : (replica + 1) * self.tp]


def _slowest(links: Sequence[Link]) -> Link:
    return min(links, key=lambda lk: (lk.bandwidth_bytes_s, -lk.latency_s))


def _group_link(cluster: Cluster, devs: Sequence[Device], group: Sequence[int]) -> Link:
    hosts = {devs[d].host_index for d in group}
    return cluster.hosts[next(iter(hosts))].link if len(hosts) == 1 else cluster.network


def _dp_link(cluster: Cluster, devs: Sequence[Device], st: StageSpec) -> tuple[Link, int]:
    """The link a stage's data-parallel rings run on (one ring per tensor-parallel rank) and how many rings
    share it: a host's link when the whole stage sits on it, else the network, shared by all ``tp`` rings."""
    hosts = {devs[d].host_index for d in st.devices}
    if len(hosts) == 1:
        return cluster.hosts[next(iter(hosts))].link, 1
    return cluster.network, st.tp


def _tp_link(cluster: Cluster, devs: Sequence[Device], st: StageSpec) -> Link:
    """The link a stage's tensor-parallel groups sit on (the slowest, when they differ)."""
    return _slowest([_group_link(cluster, devs, st.group(r)) for r in range(st.dp)])


def boundary_transfer(cost: CostModel, a: StageSpec, b: StageSpec, *, microbatch: int) -> tuple[float, float]:
    """Seconds to send one microbatch's activations from stage ``a`` to the next stage ``b``, and their
    gradients back, as the lowering moves them (see [Note: transfers] in ``distplan.planner.cost``): the
    microbatch in ``lcm(dp_a, dp_b)`` chunks, each chunk from the replica of ``a`` that owns it to the
    replica of ``b`` that owns it, one copy per tensor-parallel rank of the receiver (forward: from sender
    rank ``t % tp_a`` to receiver rank ``t``; backward the other way). Messages inside a host run in parallel,
    each device on its own link (the busiest device paces them); messages between hosts share the network.
    """
    cluster = cost.cluster
    devs = cost.devices
    chunks = math.lcm(a.dp, b.dp)
    rows = microbatch / chunks
    per_a, per_b = chunks // a.dp, chunks // b.dp

    def direction(pairs: list[tuple[int, int]]) -> float:
        net = 0.0
        load: dict[int, float] = {}
        for src, dst in pairs:
            if devs[src].host_index != devs[dst].host_index:
                net += rows
            else:
                load[src] = load.get(src, 0.0) + rows
                load[dst] = load.get(dst, 0.0) + rows
        t = cost.send_time(a.end, net, link=cluster.network) if net else 0.0
        for d, r in load.items():
            t = max(t, cost.send_time(a.end, r, link=cluster.hosts[devs[d].host_index].link))
        return t

    fwd: list[tuple[int, int]] = []
    bwd: list[tuple[int, int]] = []
    for c in range(chunks):
        ga, gb = a.group(c // per_a), b.group(c // per_b)
        fwd += [(ga[t % a.tp], gb[t]) for t in range(b.tp)]
        bwd += [(gb[t % b.tp], ga[t]) for t in range(a.tp)]
    return direction(fwd), direction(bwd)


def shared_costs(cost: CostModel, stages: Sequence[StageSpec]) -> tuple[list[int], list[float]]:
    """Per stage: bytes of the parameters it shares with other stages of the layout, and the time to sum the
    gradients of the shared parameters it holds over every rank holding a copy (one ring, as the lowering's
    group of tied parameters; with a single holding stage, its ranks' sum), see ``cost``'s module
    docstring."""
    devs = cost.devices
    nbytes = [0] * len(stages)
    seconds = [0.0] * len(stages)
    for sp in cost.shared:
        holders = [i for i, st in enumerate(stages) if _reads(sp, st)]
        if not holders:
            continue
        ranks = [d for i in holders for d in stages[i].devices]
        link = _group_link(cost.cluster, devs, ranks)
        if link is not cost.cluster.network:
            link = _slowest([cost.cluster.hosts[devs[d].host_index].link for d in ranks])
        t = cost.tied_allreduce_time(sp.nbytes, world=len(ranks), link=link)
        for i in holders:
            if len(holders) > 1:
                nbytes[i] += sp.nbytes
            seconds[i] += t
    return nbytes, seconds


def layout_cost(
    cost: CostModel,
    stages: Sequence[StageSpec],
    *,
    schedule: str,
    microbatches: int,
    microbatch: int,
) -> tuple[list[StageCost], float, float]:
    """Per-stage costs, iteration time and bubble fraction of a layout (no memory check); ``microbatch``:
    rows of one microbatch over all replicas of a stage (each stage's ``dp`` divides it)."""
    cluster = cost.cluster
    devs = cost.devices
    out: list[StageCost] = []
    num = len(stages)
    if schedule == "1f1b" and num > microbatches:
        # Not runnable (Schedule1F1B needs microbatches >= stages): price it out of every comparison.
        return [], math.inf, 1.0
    for i, st in enumerate(stages):
        kind = devs[st.devices[0]].kind
        transfer = (0.0, 0.0)
        if i + 1 < num:
            transfer = boundary_transfer(cost, st, stages[i + 1], microbatch=microbatch)
        link, streams = _dp_link(cluster, devs, st)
        out.append(
            cost.stage_cost(
                st.start,
                st.end,
                kind=kind,
                microbatch=microbatch // st.dp,
                inflight=inflight_microbatches(schedule, stage=i, num_stages=num, microbatches=microbatches),
                config=st.config,
                allreduce_link=link,
                allreduce_streams=streams,
                tp_link=_tp_link(cluster, devs, st),
                transfer=transfer,
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
        if st.tp < 1 or len(st.devices) % st.tp:
            raise PlanError(
                f"stage {i} has {len(st.devices)} devices, not a multiple of its tensor-parallel degree {st.tp}"
            )
        try:
            st.config  # noqa: B018 -- checks dp, tp, recompute and shard together
        except PlanError as e:
            raise PlanError(f"stage {i}: {e}") from None
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
    microbatch: int,
    solver: SolverReport | None = None,
    baselines: dict[str, float | None] | None = None,
) -> Plan:
    """A checked plan for a fixed layout, ``microbatches`` of ``microbatch`` rows over all replicas of a
    stage; raises :class:`InfeasiblePlanError` when a stage overflows its devices' memory (naming what holds
    it) and :class:`PlanError` when the layout is malformed."""
    cluster = cost.cluster
    _check_layout(graph, cluster, stages)
    if schedule not in ("gpipe", "1f1b"):
        raise PlanError(f"the planner's cost model supports schedules gpipe and 1f1b, not {schedule!r}")
    dps = {st.dp for st in stages}
    if microbatches * microbatch != request.global_batch:
        if len(dps) == 1 and microbatch % stages[0].dp == 0:
            dp = stages[0].dp
            what = f"{microbatches} microbatches x {microbatch // dp} samples x dp {dp}"
        else:
            what = f"{microbatches} microbatches x {microbatch} samples"
        raise PlanError(f"{what} = {microbatches * microbatch}, but global_batch is {request.global_batch}")
    for i, st in enumerate(stages):
        if microbatch % st.dp:
            raise PlanError(
                f"stage {i} has dp {st.dp}, which does not divide the microbatch of {microbatch} samples "
                f"(remainder {microbatch % st.dp})"
            )
    if schedule == "1f1b" and len(stages) > microbatches:
        raise PlanError(
            f"1f1b needs at least as many microbatches as stages: {microbatches} microbatches, "
            f"{len(stages)} stages (use more microbatches, fewer stages, or gpipe)"
        )
    costs, total, bubble = layout_cost(
        cost, stages, schedule=schedule, microbatches=microbatches, microbatch=microbatch
    )
    devs = cost.devices
    out: list[Stage] = []
    memory: dict[int, int] = {}
    for i, (st, c) in enumerate(zip(stages, costs, strict=True)):
        kind = devs[st.devices[0]].kind
        cap = cluster.kinds[kind].usable_memory_bytes
        parts = c.memory
        assert parts is not None
        if c.memory_bytes > cap:
            how = "" if st.config == StageConfig(dp=st.dp) else f", {st.config.text()}"
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
                f"stage {i} (nodes {st.start}..{st.end - 1}{how}) needs "
                f"{format_bytes(c.memory_bytes)} per device ({format_bytes(parts.parameters)} parameters, "
                f"{format_bytes(parts.gradients)} gradients, {format_bytes(parts.optimizer)} optimizer state"
                f"{shared}; {format_bytes(parts.activations)} activations of {c.inflight} microbatch(es) in "
                f"flight) but a {kind} has {format_bytes(cap)} usable ({format_bytes(c.memory_bytes - cap)} "
                "short)"
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
                dp=st.dp,
                tp=st.tp,
                recompute=st.recompute,
                shard=st.shard,
                start_node=graph.nodes[st.start].name,
                modules=stage_modules(graph, st.start, st.end),
                fwd_time_s=c.fwd_s,
                bwd_time_s=c.bwd_s,
                send_time_s=c.send_s,
                grad_send_time_s=c.grad_send_s,
                allreduce_time_s=c.allreduce_s,
                optimizer_time_s=c.optimizer_s,
                memory_bytes=c.memory_bytes,
                param_bytes=c.param_bytes,
                shared_param_bytes=c.shared_param_bytes,
                tied_allreduce_time_s=c.tied_allreduce_s,
                memory=parts,
            )
        )
    plan = Plan(
        request=request,
        graph=GraphRef.of(graph),
        stages=tuple(out),
        num_microbatches=microbatches,
        microbatch_size=microbatch,
        schedule=schedule,
        rank_map=build_rank_map(cluster, [s.devices for s in stages], tp=[s.tp for s in stages]),
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

    ``layout`` is the compact form (``"1f1b m4x2 | 0:812@0,1 | 812:1603@8,9,10,11 tp2 rc=full"``, see
    ``Plan.layout``; its schedule and microbatch count win) or a list of :class:`StageSpec` (then ``schedule``
    and ``microbatches`` apply; by default the microbatch is the least common multiple of the stages'
    ``dp``). Stages may have their own ``dp``, ``tp``, recomputation and sharding.

        >>> from distplan.planner.synthetic import synthetic_transformer
        >>> g = synthetic_transformer(layers=2, hidden=64, heads=4, seq=16, vocab=100)
        >>> p = evaluate(g, cluster="cpu-local", layout=f"1f1b m2x1 | 0:10@0 | 10:{len(g)}@1", global_batch=2)
        >>> p.num_stages
        2
    """
    c = load_cluster(cluster)
    if isinstance(layout, str):
        parsed = parse_layout(layout)
        schedule, microbatches = parsed.schedule, parsed.num_microbatches
        mb = parsed.microbatch_size
        stages = [
            StageSpec(st.start, st.end, st.devices, st.tp, st.recompute, st.shard) for st in parsed.stages
        ]
    else:
        stages = list(layout)
        if not stages:
            raise PlanError("a layout needs at least one stage")
        # Default: the smallest microbatch every stage's replicas divide.
        smallest = math.lcm(*(max(1, st.dp) for st in stages))
        if microbatches is None:
            microbatches = max(1, global_batch // smallest)
        if global_batch % microbatches:
            raise PlanError(
                f"global_batch {global_batch} is not divisible into {microbatches} microbatches "
                f"(remainder {global_batch % microbatches})"
            )
        mb = global_batch // microbatches
    request = PlanRequest(
        cluster=c,
        global_batch=global_batch,
        dtype=dtype,
        optimizer=optimizer,
        matmul_precision=matmul_precision,
    )
    cost = CostModel(graph, c, dtype=dtype, optimizer=optimizer, matmul_precision=matmul_precision)
    return build_plan(
        graph, cost, request, stages, schedule=schedule, microbatches=microbatches, microbatch=mb
    )
