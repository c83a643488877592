"""Diagnostics of infeasibility: why no layout fits, in words that name the memory that is short and by how
much (:func:`precheck` before the search, :func:`infeasible_reason` after it found nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from distplan.cluster import Cluster
from distplan.errors import InfeasiblePlanError
from distplan.graph import SharedParam
from distplan.units import format_bytes

from .bounds import INFEASIBLE_BOUND, Relaxation
from .candidates import Candidate, PlanSpace, device_pools
from .coarsen import Blocks
from .cost import CostModel
from .parallelism import StageConfig
from .problem import build_problem

__all__ = [
    "ForcedCopy",
    "forced_copies",
    "infeasible_reason",
    "least_memory",
    "precheck",
    "why_1f1b",
    "why_infeasible",
]


@dataclass(frozen=True, slots=True)
class ForcedCopy:
    """A shared parameter group that every layout holds at least twice: one stage holding all its readers
    would need ``together_bytes`` (state and one sample's activations), more than the largest device."""

    param: SharedParam
    together_bytes: int


def least_memory(cost: CostModel, start: int, end: int, space: PlanSpace) -> tuple[int, StageConfig]:
    """The least memory per device any stage over nodes ``[start, end)`` needs in ``space``, and how it runs
    then: one sample per replica and one microbatch in flight, the widest tensor-parallel split and
    sharding over the most replicas one host's pool of a kind allows, the best recomputation (an attention
    kernel that stores no scores)."""
    most = max(len(p.devices) for p in device_pools(cost.cluster).pools)
    tps = [1] + ([t for t in cost.parallel.tp_degrees if t <= most] if space.tensor_parallel else [])
    best: tuple[int, StageConfig] | None = None
    for tp in tps:
        dp = most // tp
        for rc in space.recompute:
            for sh in space.shard if dp > 1 else ("none",):
                cfg = StageConfig(dp if sh != "none" else 1, tp, rc, sh)
                need = cost.stage_memory(start, end, microbatch=1, inflight=1, config=cfg)
                if best is None or need < best[0]:
                    best = (need, cfg)
    assert best is not None
    return best


def precheck(cost: CostModel, cluster: Cluster, blocks: Blocks, space: PlanSpace | None = None) -> None:
    """Fail early, and precisely, when no layout can fit whatever the batch split.

    Raises:
        InfeasiblePlanError: the model's state exceeds the cluster's memory, or one block (with one sample's
            activations) exceeds the largest device however it runs (naming it and the shortfall).
    """
    g = cost.graph
    space = space or PlanSpace()
    biggest = max(k.usable_memory_bytes for k in cluster.kinds.values())
    forced = forced_copies(cost, biggest, space)
    copies = sum(cost.state_bytes(f.param.nbytes) for f in forced)
    need = cost.state_bytes(g.param_bytes or int(cost.param_prefix[-1])) + copies
    have = cluster.total_memory_bytes()
    per = cost.state_per_param
    if need > have:
        raise InfeasiblePlanError(
            f"model {g.name!r} needs at least {format_bytes(need)} across devices for parameters, gradients "
            f"and optimizer state ({per} bytes per parameter with {cost.dtype} {cost.optimizer}"
            + (f"; {format_bytes(copies)} of it for second copies of shared parameters" if forced else "")
            + f"); cluster {cluster.name!r} has {format_bytes(have)} usable ({format_bytes(need - have)} short)"
            + ("; " + _copies_text(cost, forced, biggest) if forced else "")
        )
    for i in range(blocks.num_blocks):
        a, e = blocks.bounds[i], blocks.bounds[i + 1]
        if cost.stage_memory(a, e, microbatch=1, inflight=1) <= biggest:
            continue  # fits as it is: no need to look for the least memory
        m, cfg = least_memory(cost, a, e, space)
        if m > biggest:
            raise InfeasiblePlanError(
                f"block {i} ({blocks.labels[i]}, nodes {a}..{e - 1}) alone needs {format_bytes(m)} per device "
                f"(state and one sample's activations, at least, run as {cfg.text()}) but the largest device "
                f"has {format_bytes(biggest)} usable ({format_bytes(m - biggest)} short); cuts fall only "
                "between blocks"
            )


def why_1f1b(
    cost: CostModel,
    blocks: Blocks,
    global_batch: int,
    microbatches: int | None,
    space: PlanSpace | None = None,
) -> str | None:
    """Why a forced 1F1B schedule fails, if memory needs more stages than it allows microbatches
    (torch's Schedule1F1B runs at most as many stages as microbatches); None otherwise.

    The stage count is a proven minimum: the smallest count whose relaxation (:class:`~distplan.planner.bounds.Relaxation`, one
    device per stage, one sample per microbatch; with at most as many stages as microbatches, the ``r``-th
    stage from the end holds ``r`` microbatches whatever the count) fits memory."""
    most = microbatches or global_batch
    # One sample per replica: no candidate needs less memory per stage.
    cand = Candidate(most, 1, "1f1b")
    prob = build_problem(cost, blocks, cand, space, least_rows=True).problem
    room = min(blocks.num_blocks, cost.cluster.num_devices)
    if room <= most:
        return None
    for k in range(1, room + 1):
        if Relaxation(dataclasses.replace(prob, max_stages=k)).feasible(INFEASIBLE_BOUND):
            if k <= most:
                return None
            batch, fix = (
                (f"microbatches={microbatches}", "more microbatches")
                if microbatches
                else (f"global batch {global_batch}", "a larger global batch")
            )
            return (
                f"{cost.graph.name!r} needs at least {k} stages to fit the memory of cluster "
                f"{cost.cluster.name!r}, but 1f1b with {batch} allows at most {most} microbatches (torch's "
                f"Schedule1F1B runs at most as many stages as microbatches); use gpipe or {fix}"
            )
    return None


def forced_copies(cost: CostModel, biggest: int, space: PlanSpace | None = None) -> list[ForcedCopy]:
    """Shared parameters that no single stage can hold with all their readers (nodes first..last of them
    need more than ``biggest`` bytes, the largest device, with one sample in flight, however the stage runs;
    :func:`least_memory`): every layout holds them at least twice."""
    out = []
    for sp in cost.shared:
        together, _ = least_memory(cost, sp.positions[0], sp.positions[-1] + 1, space or PlanSpace())
        if together > biggest:
            out.append(ForcedCopy(sp, together))
    return out


def _copies_text(cost: CostModel, forced: Sequence[ForcedCopy], biggest: int) -> str:
    nodes = cost.graph.nodes
    parts = []
    for f in forced:
        sp, together = f.param, f.together_bytes
        where = " and ".join(f"{p} ({nodes[p].name})" for p in sp.positions[:3])
        more = f" and {len(sp.positions) - 3} more" if len(sp.positions) > 3 else ""
        parts.append(
            f"{', '.join(sp.names)} ({format_bytes(sp.nbytes)}; {format_bytes(cost.state_bytes(sp.nbytes))} "
            f"with gradients and optimizer state) is read by nodes {where}{more}: one stage holding all of them "
            f"needs at least {format_bytes(together)} (largest device {format_bytes(biggest)}), so at least two "
            "stages hold a copy"
        )
    return "; ".join(parts)


def why_infeasible(
    cost: CostModel, cluster: Cluster, blocks: Blocks, global_batch: int, space: PlanSpace | None = None
) -> str:
    """The smallest shortfall: every device filled to capacity, one sample in flight per stage (none kept
    where recomputation is allowed), and a second copy of every shared parameter no single stage can hold
    with its readers."""
    space = space or PlanSpace()
    biggest = max(k.usable_memory_bytes for k in cluster.kinds.values())
    forced = forced_copies(cost, biggest, space)
    copies = sum(cost.state_bytes(f.param.nbytes) for f in forced)
    acts = float(cost.act_prefix[-1]) if space.recompute == ("none",) else 0.0
    need = cost.state_bytes(int(cost.param_prefix[-1])) + acts + copies
    what = " and one sample's activations" if acts else ""
    have = cluster.total_memory_bytes()
    msg = (
        f"no layout of {cost.graph.name!r} fits cluster {cluster.name!r}: parameters, gradients, optimizer "
        f"state{what} need at least {format_bytes(need)}"
        + (f" (with {format_bytes(copies)} for second copies of shared parameters)" if forced else "")
        + f", the cluster has {format_bytes(have)} usable"
    )
    if need > have:
        msg += f" ({format_bytes(need - have)} short)"
    else:
        msg += (
            "; the stages cannot be balanced into the devices' memory "
            f"(largest device {format_bytes(biggest)}, {blocks.num_blocks} blocks); try a larger global batch "
            "split, bf16, or more devices"
        )
    if forced:
        msg += "; " + _copies_text(cost, forced, biggest)
    return msg


def infeasible_reason(
    cost: CostModel,
    cluster: Cluster,
    blocks: Blocks,
    *,
    global_batch: int,
    microbatches: int | None,
    schedule: str | None,
    space: PlanSpace | None = None,
) -> str:
    """Why no layout was found although the state fits the cluster: a forced 1F1B schedule that allows too
    few stages (:func:`why_1f1b`), else the smallest memory shortfall (:func:`why_infeasible`)."""
    return (schedule == "1f1b" and why_1f1b(cost, blocks, global_batch, microbatches, space)) or (
        why_infeasible(cost, cluster, blocks, global_batch, space)
    )
