"""The integer data of one candidate: the cost model priced at block boundaries and quantised for CP-SAT
(:func:`build_problem`), the integer program's objective evaluated in Python (:func:`int_objective`, the
mirror of ``ilp.solve_stage_problem`` that warm starts, bounds and tests use), and a solution turned back
into a layout (:func:`stage_specs`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distplan.errors import PlanError

from .candidates import Candidate, DeviceGroups, device_groups
from .coarsen import Blocks
from .cost import CostModel
from .evaluate import StageSpec
from .ilp import GroupType, SharedGroup, StageProblem, StageSlot

__all__ = [
    "KIB",
    "MAX_COEFFICIENT",
    "TIME_RESOLUTION",
    "CandidateProblem",
    "build_problem",
    "int_objective",
    "stage_specs",
]

KIB = 1024
#: Resolution of the integer program: the whole model's forward + backward of one microbatch on the
#: slowest kind is this many time units.
TIME_RESOLUTION = 1_000_000
#: Largest time coefficient given to CP-SAT (sums over stages and microbatches stay far below 2**63).
MAX_COEFFICIENT = 2**40


@dataclass(frozen=True, slots=True)
class CandidateProblem:
    """One candidate's integer data (:attr:`problem`) and the device groups its group types stand for."""

    problem: StageProblem
    groups: DeviceGroups


def build_problem(
    cost: CostModel, blocks: Blocks, cand: Candidate, groups: DeviceGroups | None = None
) -> CandidateProblem:
    """The integer data of one candidate (see ``ilp.StageProblem``), with the device groups behind it
    (``groups``: :func:`~distplan.planner.candidates.device_groups` of ``cand.dp``, computed when None).

    Raises:
        PlanError: the cost model gives a non-finite time (a figure outside what can be priced).
    """
    cluster = cost.cluster
    g = groups or device_groups(cluster, cand.dp)
    b = cand.microbatch_size
    bounds = np.array(blocks.bounds)
    fwd, bwd = [], []
    for k in g.kinds:
        f, bw = cost.time_prefix(k, b)
        fwd.append(f[bounds])
        bwd.append(bw[bounds])
    unit = max(max(float(f[-1] + bw[-1]) for f, bw in zip(fwd, bwd, strict=True)), 1e-12) / TIME_RESOLUTION

    def q(x: np.ndarray | Sequence[float]) -> tuple[int, ...]:
        return tuple(int(v) for v in np.rint(np.asarray(x, dtype=np.float64) / unit))

    params = cost.param_prefix[bounds].astype(np.float64)
    comm_s = []
    for li, lk in enumerate(g.links):
        streams = cand.dp if li == g.net_link else 1
        comm_s.append([cost.send_time(int(p), b, link=lk, streams=streams) for p in bounds])
    # all-reduce + optimizer per (kind, link) class: linear in the parameter bytes, latency kept apart.
    ar_s: dict[int, list[float]] = {}
    for t in g.types:
        lk = g.links[t.link]
        if t.ar_class not in ar_s:
            ar_s[t.ar_class] = [
                cost.allreduce_time(p, dp=cand.dp, link=lk)
                - cost.allreduce_latency(dp=cand.dp, link=lk)
                + cost.optimizer_time(p, g.kinds[t.kind])
                for p in params
            ]
    lat_s = [cost.allreduce_latency(dp=cand.dp, link=lk) for lk in g.links]
    # torch.distributed.pipelining's Schedule1F1B needs at least as many microbatches as stages, and a
    # plan the lowering cannot run is no plan (GPipe has no such limit).
    total_groups = sum(t.count for t in g.types)
    max_stages = max(
        1,
        min(
            blocks.num_blocks,
            total_groups,
            cand.microbatches if cand.schedule == "1f1b" else total_groups,
        ),
    )
    # Shared parameters read in two blocks or more (see ilp.SharedGroup): one more copy's all-reduce and
    # optimizer step per class, and the holders' gradient sum by holder count per link (the network is
    # shared by the dp replicas' rings, as in evaluate.layout_cost).
    shared_raw: list[tuple[tuple[int, ...], float, list[float], list[list[float]]]] = []
    for sp in cost.shared:
        in_blocks = tuple(sorted({bisect.bisect_right(blocks.bounds, x) - 1 for x in sp.positions}))
        if len(in_blocks) < 2:
            continue
        ar_one = [0.0] * len(ar_s)
        for t in g.types:
            lk = g.links[t.link]
            ar_one[t.ar_class] = (
                cost.allreduce_time(sp.nbytes, dp=cand.dp, link=lk)
                - cost.allreduce_latency(dp=cand.dp, link=lk)
                + cost.optimizer_time(sp.nbytes, g.kinds[t.kind])
            )
        tied = [
            [
                cost.allreduce_time(sp.nbytes, dp=h, link=lk, streams=cand.dp if li == g.net_link else 1)
                for h in range(max_stages + 1)
            ]
            for li, lk in enumerate(g.links)
        ]
        shared_raw.append((in_blocks, cost.state_bytes(sp.nbytes), ar_one, tied))
    # CP-SAT needs bounded integers: where communication dwarfs compute (slow links, tiny models) the unit
    # grows so that no coefficient passes MAX_COEFFICIENT (compute then has fewer than TIME_RESOLUTION
    # steps). Non-finite figures are rejected by name (check_cluster_figures catches the usual causes).
    sh_times = [x for _, _, ar_one, tied in shared_raw for x in (ar_one, *tied)]
    biggest = max(
        [float(np.max(np.abs(x))) for x in (*fwd, *bwd, *comm_s, *ar_s.values(), lat_s, *sh_times) if len(x)],
        default=0.0,
    )
    if not math.isfinite(biggest):
        raise PlanError(
            f"the cost model gives a non-finite time on cluster {cluster.name!r} (check its bandwidths, "
            "FLOP/s and latencies)"
        )
    unit = max(unit, biggest / MAX_COEFFICIENT)
    comm = [q(x) for x in comm_s]
    ar = {c: q(x) for c, x in ar_s.items()}
    types = []
    for t in g.types:
        kind = g.kinds[t.kind]
        lk = g.links[t.link]
        cap = cluster.kinds[kind].usable_memory_bytes // KIB
        lat = round(cost.allreduce_latency(dp=cand.dp, link=lk) / unit)
        types.append(GroupType(t.host, t.kind, t.count, cap, t.ar_class, lat, t.link))
    mem = tuple(int(v) for v in np.ceil(np.array([cost.state_bytes(p) for p in params]) / KIB))
    # The largest over the kinds: a kind whose attention stores the scores holds more (see cost).
    act = tuple(int(v) for v in np.ceil(cost.act_prefix_max[bounds] * b / KIB))
    identical = []
    hosts = cluster.hosts
    used_hosts = sorted({t.host for t in types})
    for i, h1 in enumerate(used_hosts):
        for h2 in used_hosts[i + 1 :]:
            if hosts[h1].devices == hosts[h2].devices and hosts[h1].link == hosts[h2].link:
                identical.append((h1, h2))
                break
    shared = tuple(
        SharedGroup(
            blocks=in_blocks,
            mem_kib=math.ceil(state / KIB),
            ar=q(ar_one),
            tied=tuple(q(t) for t in tied),
        )
        for in_blocks, state, ar_one, tied in shared_raw
    )
    prob = StageProblem(
        num_blocks=blocks.num_blocks,
        max_stages=max_stages,
        microbatches=cand.microbatches,
        schedule=cand.schedule,
        groups=tuple(types),
        fwd_prefix=tuple(q(f) for f in fwd),
        bwd_prefix=tuple(q(bw) for bw in bwd),
        ar_prefix=tuple(ar[c] for c in sorted(ar)),
        comm_prefix=tuple(comm),
        net_link=g.net_link,
        mem_prefix=mem,
        act_prefix=act,
        identical_hosts=tuple(identical),
        time_unit_s=unit,
        shared=shared,
    )
    return CandidateProblem(prob, g)


def int_objective(
    p: StageProblem, stages: Sequence[StageSlot] | Sequence[tuple[int, int, int]]
) -> int | None:
    """The integer program's objective for a solution, or None if it breaks a constraint (mirror of the
    model, used for warm starts and tests)."""
    if not stages or stages[0][0] != 0 or stages[-1][1] != p.num_blocks or len(stages) > p.max_stages:
        return None
    counts: dict[int, int] = {}
    n = len(stages)
    total_t, comm, z = 0, 0, 0
    t_max = f_max = b_max = 0
    # Shared parameters (ilp (j)): the holders of each group, and their gradient sum's time.
    held: list[list[int]] = [
        [k for k, sh in enumerate(p.shared) if any(a <= b < e for b in sh.blocks)] if p.shared else []
        for a, e, _ in stages
    ]
    tied = []
    for k, sh in enumerate(p.shared):
        holders = [s for s in range(n) if k in held[s]]
        hosts = {p.groups[stages[s][2]].host for s in holders}
        lk = p.net_link if len(hosts) > 1 else (p.groups[stages[holders[0]][2]].link if holders else 0)
        tied.append(sh.tied[lk][len(holders)])
    for s, (a, e, gi) in enumerate(stages):
        if e <= a or (s and stages[s - 1][1] != a):
            return None
        counts[gi] = counts.get(gi, 0) + 1
        g = p.groups[gi]
        if counts[gi] > g.count:
            return None
        f = p.fwd_prefix[g.kind][e] - p.fwd_prefix[g.kind][a]
        bw = p.bwd_prefix[g.kind][e] - p.bwd_prefix[g.kind][a]
        total_t += f + bw
        t_max, f_max, b_max = max(t_max, f + bw), max(f_max, f), max(b_max, bw)
        inflight = p.microbatches if p.schedule == "gpipe" else min(n - s, p.microbatches)
        copies = [k for k in held[s] if a > p.shared[k].blocks[0]]
        mem = (
            p.mem_prefix[e]
            - p.mem_prefix[a]
            + sum(p.shared[k].mem_kib for k in copies)
            + inflight * (p.act_prefix[e] - p.act_prefix[a])
        )
        if mem > g.cap_kib:
            return None
        z = max(
            z,
            p.ar_prefix[g.ar_class][e]
            - p.ar_prefix[g.ar_class][a]
            + g.ar_latency
            + sum(p.shared[k].ar[g.ar_class] for k in copies)
            + sum(tied[k] for k in held[s]),
        )
        if s + 1 < n:
            nxt = p.groups[stages[s + 1][2]]
            lk = g.link if nxt.host == g.host else p.net_link
            comm += p.comm_prefix[lk][e]
            t_max = max(t_max, f + bw + 2 * p.comm_prefix[lk][e])
    m = p.microbatches
    steady = (m - 1) * (f_max + b_max) if p.schedule == "gpipe" else (m - 1) * t_max
    return total_t + steady + 2 * comm + z


def stage_specs(groups: DeviceGroups, stages: Sequence[StageSlot], blocks: Blocks) -> list[StageSpec]:
    """The layout of a solution: each stage's node range and the devices of the next free group of its type
    (groups of one type are handed out in order)."""
    taken: dict[int, int] = {}
    out = []
    for a, e, gi in stages:
        i = taken.get(gi, 0)
        taken[gi] = i + 1
        out.append(StageSpec(blocks.bounds[a], blocks.bounds[e], groups.devices[gi][i]))
    return out
