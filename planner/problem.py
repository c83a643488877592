"""The integer data of one candidate: the cost model priced at block boundaries for every way a stage may run
and quantised for CP-SAT (:func:`build_problem`), the integer program's objective evaluated in Python
(:func:`int_objective`, the mirror of ``ilp.solve_stage_problem`` that warm starts, bounds and tests use), and
a solution turned back into a layout (:func:`stage_specs`).

[Note: options]
Every pool (the devices of one kind on one host) offers every :class:`~distplan.planner.parallelism.
StageConfig` the request allows and the microbatch divides (:func:`~distplan.planner.candidates.
stage_configs`); each becomes a :class:`~distplan.planner.ilp.StageOption` whose prefix arrays the cost model
fills in. Arrays are shared between options that price alike (the same kind, rows, split, recomputation and
link), so a cluster of identical hosts adds options, not arrays. An option is dropped when another of the
same pool, degrees and recomputation is at least as good block by block in every array and constant (time,
state, all-reduce): sharding levels that buy no memory at the peak (ZeRO-2/3 while the stage is one FSDP2
unit, see ``distplan.planner.cost``) never survive, and neither does ``none`` where ZeRO-1 divides the
optimizer state at no extra time. Dropping dominated options changes no optimum.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distplan.cluster import Link
from distplan.errors import PlanError

from .candidates import Candidate, PlanSpace, Pools, device_pools, stage_configs
from .coarsen import Blocks
from .cost import CostModel, boundary_rows, boundary_sides
from .evaluate import StageSpec
from .ilp import PoolSupply, SharedGroup, StageOption, StageProblem, StageSlot
from .parallelism import StageConfig

__all__ = [
    "KIB",
    "MAX_COEFFICIENT",
    "TIME_RESOLUTION",
    "CandidateProblem",
    "build_problem",
    "for_schedule",
    "int_objective",
    "option_config",
    "stage_specs",
]

KIB = 1024
#: Resolution of the integer program: the whole model's forward + backward of one microbatch in the slowest
#: way any option runs it is this many time units.
TIME_RESOLUTION = 1_000_000
#: Largest time coefficient given to CP-SAT (sums over stages and microbatches stay far below 2**63).
MAX_COEFFICIENT = 2**40


@dataclass(frozen=True, slots=True)
class CandidateProblem:
    """One candidate's integer data (:attr:`problem`), the pools its options draw from, and each option's
    configuration."""

    problem: StageProblem
    pools: Pools
    configs: tuple[StageConfig, ...]


def option_config(o: StageOption) -> StageConfig:
    """The :class:`StageConfig` an option runs."""
    return StageConfig(o.dp, o.tp, o.recompute, o.shard)


def _const(value: Any) -> Callable[[], Any]:
    return lambda: value


class _Arrays:
    """Distinct float arrays by key, built on first use (options that price alike share one)."""

    def __init__(self) -> None:
        self.keys: dict[object, int] = {}
        self.values: list[np.ndarray] = []

    def index(self, key: object, make: Callable[[], Any]) -> int:
        if key not in self.keys:
            self.keys[key] = len(self.values)
            self.values.append(np.asarray(make(), dtype=np.float64))
        return self.keys[key]


def build_problem(
    cost: CostModel,
    blocks: Blocks,
    cand: Candidate,
    space: PlanSpace | None = None,
    pools: Pools | None = None,
    *,
    least_rows: bool = False,
) -> CandidateProblem:
    """The integer data of one candidate (see ``ilp.StageProblem`` and [Note: options]); ``space``: what the
    request allows (default: everything), ``pools``: the cluster's (computed when None). ``least_rows``
    (diagnostics): every option at one row per replica, whatever its ``dp`` (the least memory any microbatch
    gives it), the candidate's microbatch ignored.

    Raises:
        PlanError: the cost model gives a non-finite time (a figure outside what can be priced).
    """
    cluster = cost.cluster
    space = space or PlanSpace()
    pl = pools or device_pools(cluster)
    b = cand.microbatch
    bounds = np.array(blocks.bounds)
    nb = blocks.num_blocks
    # Per-block parameter quantities (traced bytes at the boundaries): what one rank holds, what sharding
    # may divide, what tensor parallelism's replicated parameters sum over the group.
    unshard = cost.unshardable_prefix[bounds]

    def held(tp: int) -> np.ndarray:
        return cost.param_prefix_tp(tp)[bounds]

    def reduce_prefix(tp: int) -> np.ndarray:
        per = np.zeros(cost.n, dtype=np.float64)
        for ri, lst in enumerate(cost.parallel.grad_reduce):
            if cost.parallel.splits(ri, tp):
                for pos, nbytes in lst:
                    per[pos] += nbytes
        return np.concatenate([[0.0], np.cumsum(per)])[bounds]

    to_grad = cost.grad_bytes_per_param / cost.param_elem_bytes
    to_weight = cost.weight_bpp / cost.param_elem_bytes
    per_param = 1.0 / cost.param_elem_bytes

    def linear(op: str, nbytes: np.ndarray, world: int, link: Link) -> tuple[np.ndarray, float]:
        """A collective's seconds at each prefix value, as (part that grows with the bytes, latency)."""
        lat = cost.collective_time(op, 0.0, world=world, link=link)
        return cost.collective_times(op, nbytes, world=world, link=link) - lat, lat

    wbp, gbp, obp = cost.weight_bpp * per_param, cost.grad_bpp * per_param, cost.opt_bpp * per_param
    times_f, times_b = _Arrays(), _Arrays()
    mems, acts, inputs, ars = _Arrays(), _Arrays(), _Arrays(), _Arrays()
    options: list[StageOption] = []
    configs: list[StageConfig] = []
    consts: list[tuple[float, float, float, float]] = []  # fwd, bwd, ar latency, extra bytes
    comm_classes: dict[tuple[int, int], int] = {}
    supplies: list[PoolSupply] = []
    edges: list[tuple[float, float]] = []  # per pool: the runtime's cost of a pipeline boundary (fwd, bwd)
    tcache: dict[object, tuple[np.ndarray, np.ndarray, float, float]] = {}
    acache: dict[object, tuple[np.ndarray, float]] = {}
    for pi, pool in enumerate(pl.pools):
        kind = pool.kind
        link_i = pl.link_index(pool.link)
        cap = cluster.kinds[kind].usable_memory_bytes
        supplies.append(PoolSupply(pool.host, pl.kinds.index(kind), len(pool.devices), cap // KIB, link_i))
        cal = cluster.kinds[kind].calibration
        edges.append((cal.boundary_fwd_s, cal.boundary_bwd_s) if cal is not None else (0.0, 0.0))
        any_dp = math.lcm(*range(1, len(pool.devices) + 1))
        for cfg in stage_configs(
            microbatch=any_dp if least_rows else b,
            devices=len(pool.devices),
            tp_degrees=cost.parallel.tp_degrees,
            space=space,
        ):
            dp, tp, rc, sh = cfg.dp, cfg.tp, cfg.recompute, cfg.shard
            rows = 1 if least_rows else b // dp
            part = held(tp) - unshard
            fc = cal.microbatch_fwd_s if cal is not None else 0.0
            bc = cal.microbatch_bwd_s if cal is not None else 0.0
            step_c = cal.step_s if cal is not None else 0.0
            per_mb_link = link_i if (tp > 1 or sh in ("optimizer+gradients", "full")) else None

            def time_arrays(
                kind: str = kind,
                rows: int = rows,
                tp: int = tp,
                rc: str = rc,
                sh: str = sh,
                part: np.ndarray = part,
                link: Link = pool.link,
                dp: int = dp,
            ) -> tuple[np.ndarray, np.ndarray, float, float]:
                f, bw = cost.time_prefix(kind, rows, tp=tp, recompute=rc)
                f, bw = f[bounds], bw[bounds]
                lf = lb = 0.0
                if tp > 1:
                    cf, cb = cost.tp_comm_prefix(link, rows, tp, rc)
                    f, bw = f + cf[bounds], bw + cb[bounds]
                if sh in ("optimizer+gradients", "full"):
                    rs, rs_lat = linear("reduce_scatter", part * to_grad, dp, link)
                    bw, lb = bw + rs, lb + rs_lat
                if sh == "full":
                    ag, ag_lat = linear("all_gather", part * to_weight, dp, link)
                    f, lf = f + ag, lf + ag_lat
                    bw, lb = bw + ag, lb + ag_lat
                return f, bw, lf, lb

            tkey = (kind, rows, tp, rc, sh if sh in ("optimizer+gradients", "full") else "", per_mb_link)
            if tkey not in tcache:
                tcache[tkey] = time_arrays()
            built = tcache[tkey]
            ti = times_f.index(tkey, _const(built[0]))
            times_b.index(tkey, _const(built[1]))
            lat_f, lat_b = built[2], built[3]

            # State per device (see cost.memory_parts): weights, gradients, optimizer state; sharding divides the
            # optimizer state (and gradients, from ZeRO-2) of the stage's own parameters.
            def state(tp: int = tp, sh: str = sh, dp: int = dp) -> np.ndarray:
                hd = held(tp)
                whole = unshard
                prt = hd - whole
                if sh == "none":
                    return (wbp + gbp + obp) * hd
                out = wbp * hd + wbp * prt / dp + gbp * hd + obp * whole + obp * prt / dp
                if sh in ("optimizer+gradients", "full"):
                    out = out + gbp * prt / dp
                return out

            si = mems.index(("state", tp, sh, dp if sh != "none" else 1), state)
            act_pre = cost.act_prefix_tp(kind, tp)[bounds] * rows
            act = once = inp = -1
            extra = 0.0
            if rc == "full":
                once = acts.index(("act", kind, tp, rows), _const(act_pre))
                inp = inputs.index(("inp", rows), _const(cost.cut_per_sample[bounds] * rows))
            elif rc == "selective":
                core = cost.core_prefix(kind, tp)[bounds] * rows
                act = acts.index(("sel", kind, tp, rows), _const(act_pre - core))
                extra = cost.core_transient(kind, tp) * rows
            else:
                act = acts.index(("act", kind, tp, rows), _const(act_pre))

            def tail(
                kind: str = kind,
                tp: int = tp,
                sh: str = sh,
                dp: int = dp,
                part: np.ndarray = part,
                link: Link = pool.link,
            ) -> tuple[np.ndarray, float]:
                whole = unshard
                if sh == "none":
                    comm, lat = linear("all_reduce", part * to_grad, dp, link)
                    opt = cost.optimizer_times(held(tp), kind)
                else:
                    comm, lat = np.zeros(nb + 1), 0.0
                    if sh == "optimizer":
                        rs, l1 = linear("reduce_scatter", part * to_grad, dp, link)
                        ag, l2 = linear("all_gather", part * to_weight, dp, link)
                        comm, lat = rs + ag, l1 + l2
                    elif sh == "optimizer+gradients":
                        comm, lat = linear("all_gather", part * to_weight, dp, link)
                    opt = cost.optimizer_times(whole, kind) + cost.optimizer_times(part, kind) / dp
                if tp > 1:
                    red, l3 = linear("all_reduce", reduce_prefix(tp) * to_grad, tp, link)
                    comm, lat = comm + red, lat + l3
                return comm + opt, lat

            akey = (kind, link_i, tp, sh, dp)
            if akey not in acache:
                acache[akey] = tail()
            ar_built = acache[akey]
            ai = ars.index(akey, _const(ar_built[0]))
            ci = comm_classes.setdefault((dp, tp), len(comm_classes))
            options.append(
                StageOption(
                    pool=pi,
                    size=cfg.devices,
                    dp=dp,
                    tp=tp,
                    time=ti,
                    state=si,
                    ar=ai,
                    comm=ci,
                    act=act,
                    once=once,
                    inputs=inp,
                    recompute=rc,
                    shard=sh,
                )
            )
            configs.append(cfg)
            consts.append((fc + lat_f, bc + lat_b, ar_built[1] + step_c, extra))
    # Dominance (see [Note: options]): per pool, degrees and recomputation, drop an option another beats or
    # ties everywhere (ties keep the first in configuration order).
    groups: dict[tuple[int, int, int, str], list[int]] = {}
    for i, oi in enumerate(options):
        groups.setdefault((oi.pool, oi.dp, oi.tp, oi.recompute), []).append(i)
    diffs: dict[tuple[int, int], np.ndarray] = {}

    def per_block(which: int, arrays: _Arrays, idx: int) -> np.ndarray:
        if (which, idx) not in diffs:
            diffs[which, idx] = np.diff(arrays.values[idx])
        return diffs[which, idx]

    def signature(i: int) -> list[np.ndarray]:
        o = options[i]
        return [
            per_block(0, times_f, o.time),
            per_block(1, times_b, o.time),
            per_block(2, mems, o.state),
            per_block(3, ars, o.ar),
            np.array(consts[i]),
        ]

    dominated: set[int] = set()
    for members in groups.values():
        sigs = {i: signature(i) for i in members}
        for i in members:
            for j in members:
                if j == i or j in dominated:
                    continue
                if all((a <= c + 1e-15).all() for a, c in zip(sigs[j], sigs[i], strict=True)):
                    equal = all((abs(a - c) <= 1e-15).all() for a, c in zip(sigs[j], sigs[i], strict=True))
                    if not equal or j < i:
                        dominated.add(i)
                        break
    keep = [i for i in range(len(options)) if i not in dominated]
    # Integer units: the slowest whole-model microbatch is TIME_RESOLUTION units (coarser where a figure
    # would pass MAX_COEFFICIENT).
    used_t = sorted({options[i].time for i in keep})
    unit = (
        max(max(float(times_f.values[t][-1] + times_b.values[t][-1]) for t in used_t), 1e-12)
        / TIME_RESOLUTION
    )
    ctab = sorted(comm_classes.items(), key=lambda kv: kv[1])
    class_cfg = [(dp, tp) for (dp, tp), _ in ctab]
    # Transfer tables (see cost.boundary_rows): one per link and multiple of the microbatch.
    tables = _Arrays()
    n_links = len(pl.links)
    fwd_ix: list[list[list[int]]] = []
    bwd_ix: list[list[list[int]]] = []
    for li, lk in enumerate(pl.links):
        network = li == pl.net_link
        rows_f: list[list[int]] = []
        rows_b: list[list[int]] = []
        for c1 in class_cfg:
            rf: list[int] = []
            rb: list[int] = []
            for c2 in class_cfg:
                fwd, bwd = boundary_rows(StageConfig(*c1), StageConfig(*c2), network=network)
                for factor, into in ((fwd, rf), (bwd, rb)):
                    key = (li, factor)
                    if key not in tables.keys:
                        tables.index(key, _const(cost.send_times(b * factor, link=lk)[bounds]))
                    into.append(tables.keys[key])
            rows_f.append(rf)
            rows_b.append(rb)
        fwd_ix.append(rows_f)
        bwd_ix.append(rows_b)
    assert len(fwd_ix) == n_links
    # Shared parameters read in two blocks or more (see ilp.SharedGroup): one more copy's optimizer step per
    # all-reduce class, and the gradient sum over every rank holding a copy by rank count per link.
    total_devices = cluster.num_devices
    shared_raw: list[tuple[tuple[int, ...], float, list[float], list[list[float]]]] = []
    ar_kinds = {ai: key[0] for key, ai in ars.keys.items()}  # type: ignore[index]
    for sp in cost.shared:
        in_blocks = tuple(sorted({bisect.bisect_right(blocks.bounds, x) - 1 for x in sp.positions}))
        if len(in_blocks) < 2:
            continue
        ar_one = [cost.optimizer_time(sp.nbytes, str(ar_kinds[c])) for c in range(len(ars.values))]
        tied = [
            [cost.tied_allreduce_time(sp.nbytes, world=w, link=lk) for w in range(total_devices + 1)]
            for lk in pl.links
        ]
        shared_raw.append((in_blocks, cost.state_bytes(sp.nbytes), ar_one, tied))
    # CP-SAT needs bounded integers: where communication dwarfs compute (slow links, tiny models) the unit
    # grows so that no coefficient passes MAX_COEFFICIENT (compute then has fewer than TIME_RESOLUTION
    # steps). Non-finite figures are rejected by name (check_cluster_figures catches the usual causes).
    sh_times = [np.asarray(x) for _, _, one, by_world in shared_raw for x in (one, *by_world)]
    every = [*times_f.values, *times_b.values, *ars.values, *tables.values, *sh_times]
    biggest = max([float(np.max(np.abs(x))) for x in every if len(x)], default=0.0)
    biggest = max([biggest] + [abs(x) for c in consts for x in c[:3]])
    if not math.isfinite(biggest):
        raise PlanError(
            f"the cost model gives a non-finite time on cluster {cluster.name!r} (check its bandwidths, "
            "FLOP/s and latencies)"
        )
    unit = max(unit, biggest / MAX_COEFFICIENT)

    def q(x: np.ndarray | Sequence[float]) -> tuple[int, ...]:
        return tuple(np.rint(np.asarray(x, dtype=np.float64) / unit).astype(np.int64).tolist())

    def kib(x: np.ndarray) -> tuple[int, ...]:
        return tuple(np.ceil(np.asarray(x, dtype=np.float64) / KIB).astype(np.int64).tolist())

    final = []
    for i in keep:
        o = options[i]
        fcst, bcst, alat, extra = consts[i]
        final.append(
            StageOption(
                pool=o.pool,
                size=o.size,
                dp=o.dp,
                tp=o.tp,
                time=o.time,
                state=o.state,
                ar=o.ar,
                comm=o.comm,
                act=o.act,
                once=o.once,
                inputs=o.inputs,
                extra_kib=math.ceil(extra / KIB),
                fwd_const=round(fcst / unit),
                bwd_const=round(bcst / unit),
                ar_latency=round(alat / unit),
                edge_fwd=round(edges[o.pool][0] / unit),
                edge_bwd=round(edges[o.pool][1] / unit),
                recompute=o.recompute,
                shard=o.shard,
            )
        )
    identical = []
    hosts = cluster.hosts
    used_hosts = sorted({s.host for s in supplies})
    for i, h1 in enumerate(used_hosts):
        for h2 in used_hosts[i + 1 :]:
            if hosts[h1].devices == hosts[h2].devices and hosts[h1].link == hosts[h2].link:
                identical.append((h1, h2))
                break
    shared = tuple(
        SharedGroup(
            blocks=in_blocks, mem_kib=math.ceil(st / KIB), ar=q(one), tied=tuple(q(t) for t in by_world)
        )
        for in_blocks, st, one, by_world in shared_raw
    )
    # Schedule1F1B runs at most as many stages as microbatches (a plan the lowering cannot run is no plan);
    # GPipe has no such limit.
    max_stages = max(
        1, min(nb, total_devices, cand.microbatches if cand.schedule == "1f1b" else total_devices)
    )
    prob = StageProblem(
        num_blocks=nb,
        max_stages=max_stages,
        microbatches=cand.microbatches,
        schedule=cand.schedule,
        pools=tuple(supplies),
        options=tuple(final),
        fwd_prefix=tuple(q(x) for x in times_f.values),
        bwd_prefix=tuple(q(x) for x in times_b.values),
        mem_prefix=tuple(kib(x) for x in mems.values),
        act_prefix=tuple(kib(x) for x in acts.values),
        input_kib=tuple(kib(x) for x in inputs.values),
        ar_prefix=tuple(q(x) for x in ars.values),
        comm_classes=tuple(class_cfg),
        transfers=tuple(q(x) for x in tables.values),
        comm_fwd=tuple(tuple(tuple(r) for r in rows) for rows in fwd_ix),
        comm_bwd=tuple(tuple(tuple(r) for r in rows) for rows in bwd_ix),
        net_link=pl.net_link,
        identical_hosts=tuple(identical),
        time_unit_s=unit,
        shared=shared,
    )
    return CandidateProblem(prob, pl, tuple(configs[i] for i in keep))


def for_schedule(cp: CandidateProblem, cand: Candidate) -> CandidateProblem:
    """``cp`` (built for another schedule with the same microbatch) for ``cand``'s schedule and microbatch
    count: the arrays do not depend on them, only the stage limit does."""
    p = cp.problem
    total = sum(q.devices for q in p.pools)
    most = max(1, min(p.num_blocks, total, cand.microbatches if cand.schedule == "1f1b" else total))
    problem = dataclasses.replace(p, schedule=cand.schedule, microbatches=cand.microbatches, max_stages=most)
    return dataclasses.replace(cp, problem=problem)


@dataclass(frozen=True, slots=True)
class StageTerms:
    """What one stage of a solution costs in the integer program (units and KiB)."""

    fwd: int
    bwd: int
    memory: int
    ar: int


def stage_terms(p: StageProblem, a: int, e: int, oi: int, inflight: int, copies_kib: int = 0) -> StageTerms:
    """The stage ``[a, e)`` run as option ``oi`` holding ``inflight`` microbatches: its forward and backward
    per microbatch, memory per device (with ``copies_kib`` of shared-parameter copies) and all-reduce term
    (without shared parameters)."""
    o = p.options[oi]
    sides = boundary_sides(a, e, p.num_blocks)
    f = p.fwd_prefix[o.time][e] - p.fwd_prefix[o.time][a] + o.fwd_const + o.edge_fwd * sides
    bw = p.bwd_prefix[o.time][e] - p.bwd_prefix[o.time][a] + o.bwd_const + o.edge_bwd * sides
    mem = p.mem_prefix[o.state][e] - p.mem_prefix[o.state][a] + copies_kib + o.extra_kib
    if o.act >= 0:
        mem += inflight * (p.act_prefix[o.act][e] - p.act_prefix[o.act][a])
    if o.once >= 0:
        mem += p.act_prefix[o.once][e] - p.act_prefix[o.once][a]
    if o.inputs >= 0:
        mem += inflight * p.input_kib[o.inputs][a]
    ar = p.ar_prefix[o.ar][e] - p.ar_prefix[o.ar][a] + o.ar_latency
    return StageTerms(f, bw, mem, ar)


def cut_times(p: StageProblem, e: int, o1: int, o2: int) -> tuple[int, int]:
    """Forward and backward transfer across boundary ``e`` from a stage run as option ``o1`` to the next run as
    ``o2`` (their host's link when both sit on one host, else the network)."""
    a, b = p.options[o1], p.options[o2]
    pa, pb = p.pools[a.pool], p.pools[b.pool]
    lk = pa.link if pa.host == pb.host else p.net_link
    return (
        p.transfers[p.comm_fwd[lk][a.comm][b.comm]][e],
        p.transfers[p.comm_bwd[lk][a.comm][b.comm]][e],
    )


def int_objective(
    p: StageProblem, stages: Sequence[StageSlot] | Sequence[tuple[int, int, int]]
) -> int | None:
    """The integer program's objective for a solution, or None if it breaks a constraint (mirror of the
    model, used for warm starts and tests)."""
    if not stages or stages[0][0] != 0 or stages[-1][1] != p.num_blocks or len(stages) > p.max_stages:
        return None
    n = len(stages)
    taken = [0] * len(p.pools)
    fill = z = 0
    t_max = f_max = b_max = 0
    # Shared parameters (ilp (j)): the holders of each group, their ranks and their gradient sum's time.
    held: list[list[int]] = [
        [k for k, sh in enumerate(p.shared) if any(a <= b < e for b in sh.blocks)] if p.shared else []
        for a, e, _ in stages
    ]
    tied = []
    for k, sh in enumerate(p.shared):
        holders = [s for s in range(n) if k in held[s]]
        hosts = {p.host_of(stages[s][2]) for s in holders}
        world = sum(p.options[stages[s][2]].size for s in holders)
        lk = (
            p.net_link
            if len(hosts) > 1
            else (p.pools[p.options[stages[holders[0]][2]].pool].link if holders else 0)
        )
        if world >= len(sh.tied[lk]):
            return None  # more ranks than the cluster has: the supply check would refuse it too
        tied.append(sh.tied[lk][world])
    for s, (a, e, oi) in enumerate(stages):
        if e <= a or (s and stages[s - 1][1] != a):
            return None
        o = p.options[oi]
        taken[o.pool] += o.size
        if taken[o.pool] > p.pools[o.pool].devices:
            return None
        inflight = p.microbatches if p.schedule == "gpipe" else min(n - s, p.microbatches)
        copies = [k for k in held[s] if a > p.shared[k].blocks[0]]
        terms = stage_terms(p, a, e, oi, inflight, sum(p.shared[k].mem_kib for k in copies))
        if terms.memory > p.pools[o.pool].cap_kib:
            return None
        z = max(z, terms.ar + sum(p.shared[k].ar[o.ar] for k in copies) + sum(tied[k] for k in held[s]))
        rt = 0
        if s + 1 < n:
            cf, cb = cut_times(p, e, oi, stages[s + 1][2])
            rt = cf + cb
        t = terms.fwd + terms.bwd
        fill += t + rt
        t_max = max(t_max, t + rt)
        f_max, b_max = max(f_max, terms.fwd), max(b_max, terms.bwd)
    m = p.microbatches
    steady = (m - 1) * (f_max + b_max) if p.schedule == "gpipe" else (m - 1) * t_max
    return fill + steady + z


def stage_specs(cp: CandidateProblem, stages: Sequence[StageSlot], blocks: Blocks) -> list[StageSpec]:
    """The layout of a solution: each stage's node range and its option's devices, handed out in index order
    within the pool (replica-major, each replica's tensor-parallel group on consecutive devices)."""
    taken = [0] * len(cp.pools.pools)
    out = []
    for a, e, oi in stages:
        o = cp.problem.options[oi]
        pool = cp.pools.pools[o.pool]
        devs = pool.devices[taken[o.pool] : taken[o.pool] + o.size]
        taken[o.pool] += o.size
        out.append(StageSpec(blocks.bounds[a], blocks.bounds[e], devs, o.tp, o.recompute, o.shard))
    return out
