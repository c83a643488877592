"""The planner's outer search over candidates (data-parallel degree ``D`` x microbatch count ``M``).

For every candidate: build the integer data (``build_problem``), skip it if its groups cannot hold one
copy of the model state, compute a greedy warm start (``_greedy``: every order of the device kinds, hosts
kept together, binary search on the bottleneck) and a lower bound (``_lower_bound``: the smallest
bottleneck any layout can have, ``_min_bottleneck``, under an LP and a fluid relaxation). The three best
warm starts get a local search (``_improve``); the weakest bounds are then tightened by the fill
relaxation (``_fill_bound``, ``FILL_ROUNDS`` of them). Then, most promising first, up to ``MAX_SOLVES``
candidates whose bound can still beat the incumbent go to CP-SAT (``ilp.solve_stage_problem``) with the
warm start as hint, sharing the time limit, unless the incumbent is already within ``GAP_TOLERANCE``. The best layout under the cost model wins (the baselines'
layouts compete too); the reported bound is the smallest bound over all candidates, so the gap is honest
even where a candidate was not solved.

[Note: where CP-SAT helps]
Measured on this 2-core machine: the integer program proves optimality in well under a second up to a few
hundred (stage slots x blocks), e.g. every brute-force test and 2-4 stage plans on 16-GPU clusters; at
Llama-7B x 64 GPUs (64 slots x 160 blocks) it finds nothing better than the warm start within 10 s and
its own LP bound is far below the fluid bound. Models larger than ``LARGE_MODEL`` slots x blocks are
therefore left to the warm start + local search, and their gap comes from the relaxations.

[Note: the relaxations]
Each bound pools the groups of one device kind. ``_Relaxation`` walks stages from the last one backwards:
the ``r``-th stage from the end holds ``min(r, M)`` microbatches under 1F1B whatever the stage count, so
1F1B's memory (early stages hold more activations) and memory-forced stage counts are exact; cuts inside a
host run pay the host link, others the network. All bounds are checked against exhaustive search
(``tests/planner/test_brute_force.py``), including on raw random integer data.

[Note: determinism]
A plan depends only on its inputs. CP-SAT runs with a fixed seed, ``interleave_search`` (a deterministic
portfolio whatever the number of workers) and a *deterministic* work limit derived from ``time_limit_s``;
the wall-clock limit is only a generous safety net (``SAFETY_FACTOR`` x the solve's share of the time limit;
if it fires, the report's notes say so and the run may differ). No step is skipped for lack of wall time.
The greedy, the local search and the bounds are pure functions of the inputs; candidates are visited in a
fixed order, ties go to the earlier one, devices are handed out in index order.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from distplan.cluster import Cluster, Link
from distplan.errors import InfeasiblePlanError, PlanError
from distplan.graph import OpGraph
from distplan.plan import Plan, SolverReport
from distplan.profiles import load_cluster

from .coarsen import Blocks, coarsen
from .cost import CostModel, IterationCost
from .evaluate import StageSpec, build_plan, layout_cost, make_request
from .ilp import GroupType, SolverProgress, StageProblem, StageSolution, solve_stage_problem

__all__ = [
    "Candidate",
    "build_problem",
    "candidate_dp",
    "candidate_microbatches",
    "check_cluster_figures",
    "int_objective",
    "plan",
    "search",
]

GIB = 2**30
KIB = 1024
#: Resolution of the integer program: the whole model's forward + backward of one microbatch on the
#: slowest kind is this many time units.
TIME_RESOLUTION = 1_000_000
#: Largest time coefficient given to CP-SAT (sums over stages and microbatches stay far below 2**63).
MAX_COEFFICIENT = 2**40
#: At most this many microbatch counts per data-parallel degree (spread geometrically).
MAX_MICROBATCH_CANDIDATES = 6
#: Bound of a candidate the LP relaxation proves infeasible (memory).
INFEASIBLE_BOUND = 2**62
#: Warm starts refined by local search (the best by their greedy value).
IMPROVE_TOP = 3
#: At most this many integer programs per plan; the other candidates keep their greedy solution and bound.
MAX_SOLVES = 4
#: Stage slots x blocks up to which every candidate is solved (outside the MAX_SOLVES budget).
TINY_MODEL = 64
#: Stage slots x blocks above which the integer program is not attempted (see ``search``).
LARGE_MODEL = 700
#: CP-SAT's deterministic work limit per solve, as a fraction of its share of ``time_limit_s`` (measured
#: here: one deterministic second took 1-5 wall seconds on this shared 2-core machine).
DETERMINISTIC_SHARE = 0.05
#: Wall-clock safety net per solve, as a multiple of its share of ``time_limit_s`` (plus half a second).
SAFETY_FACTOR = 2.0
#: Integer programs are skipped once the incumbent is provably within this fraction of the optimum.
GAP_TOLERANCE = 0.005
#: Candidates whose bound the fill relaxation tightens (weakest first; ~0.1-1 s each on 64 GPUs).
FILL_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class Candidate:
    """One integer program of the search: ``dp`` replicas, ``microbatches`` per iteration."""

    dp: int
    microbatches: int
    microbatch_size: int
    schedule: str


@dataclass(frozen=True, slots=True)
class _Groups:
    """Group types of one dp degree with the devices behind each group (in hand-out order)."""

    types: tuple[GroupType, ...]
    kinds: tuple[str, ...]
    devices: tuple[tuple[tuple[int, ...], ...], ...]  # per type: groups of device indices
    links: tuple[Link, ...]
    net_link: int


def candidate_dp(cluster: Cluster, global_batch: int, microbatches: int | None = None) -> list[int]:
    """Data-parallel degrees worth a model: divide the batch and fit in some host's same-kind devices."""
    most = 0
    for h in cluster.hosts:
        for k in set(h.devices):
            most = max(most, h.devices.count(k))
    per = global_batch // microbatches if microbatches else global_batch
    return [d for d in range(1, most + 1) if per % d == 0 and (global_batch % d == 0)]


def candidate_microbatches(per_replica: int, *, max_stages: int, fixed: int | None = None) -> list[int]:
    """Microbatch counts to try for ``per_replica`` samples per iteration: divisors of it, at most
    :data:`MAX_MICROBATCH_CANDIDATES`, favouring counts near and above the possible stage count."""
    if fixed is not None:
        return [fixed] if per_replica % fixed == 0 else []
    divs = [m for m in range(1, per_replica + 1) if per_replica % m == 0]
    if len(divs) <= MAX_MICROBATCH_CANDIDATES:
        return divs
    # Keep 1, the largest, and a geometric spread that includes counts around 1x-4x the stage count.
    keep = {divs[0], divs[-1]}
    for target in (max_stages, 2 * max_stages, 4 * max_stages):
        keep.add(min(divs, key=lambda m, t=target: (abs(math.log(m / t)), m)))  # type: ignore[misc]
    i = 0
    while len(keep) < MAX_MICROBATCH_CANDIDATES and i < len(divs):
        step = max(1, len(divs) // MAX_MICROBATCH_CANDIDATES)
        keep.add(divs[i])
        i += step
    return sorted(keep)[:MAX_MICROBATCH_CANDIDATES] if len(keep) > MAX_MICROBATCH_CANDIDATES else sorted(keep)


def _groups(cluster: Cluster, dp: int) -> _Groups:
    devs = cluster.devices()
    kinds = tuple(sorted({d.kind for d in devs}))
    links: list[Link] = []

    def link_index(lk: Link) -> int:
        if lk not in links:
            links.append(lk)
        return links.index(lk)

    net = link_index(cluster.network)
    types: list[GroupType] = []
    devices: list[tuple[tuple[int, ...], ...]] = []
    ar_classes: dict[tuple[int, int], int] = {}
    for hi, h in enumerate(cluster.hosts):
        lk = link_index(h.link)
        for k in kinds:
            ids = [d.index for d in devs if d.host_index == hi and d.kind == k]
            n = len(ids) // dp
            if n == 0:
                continue
            ki = kinds.index(k)
            ac = ar_classes.setdefault((ki, lk), len(ar_classes))
            types.append(GroupType(host=hi, kind=ki, count=n, cap_kib=0, ar_class=ac, ar_latency=0, link=lk))
            devices.append(tuple(tuple(ids[i * dp : (i + 1) * dp]) for i in range(n)))
    return _Groups(tuple(types), kinds, tuple(devices), tuple(links), net)


def build_problem(
    cost: CostModel, blocks: Blocks, cand: Candidate, groups: _Groups | None = None
) -> tuple[StageProblem, _Groups]:
    """The integer data of one candidate (see ``ilp.StageProblem``)."""
    cluster = cost.cluster
    g = groups or _groups(cluster, cand.dp)
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
                - (2 * (cand.dp - 1) * lk.latency_s if cand.dp > 1 else 0.0)
                + cost.optimizer_time(p, g.kinds[t.kind])
                for p in params
            ]
    lat_s = [2 * (cand.dp - 1) * lk.latency_s for lk in g.links]
    # CP-SAT needs bounded integers: where communication dwarfs compute (slow links, tiny models) the unit
    # grows so that no coefficient passes MAX_COEFFICIENT (compute then has fewer than TIME_RESOLUTION
    # steps). Non-finite figures are rejected by name (check_cluster_figures catches the usual causes).
    biggest = max(
        [float(np.max(np.abs(x))) for x in (*fwd, *bwd, *comm_s, *ar_s.values(), lat_s) if len(x)],
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
        lat = round(2 * (cand.dp - 1) * lk.latency_s / unit) if cand.dp > 1 else 0
        types.append(GroupType(t.host, t.kind, t.count, cap, t.ar_class, lat, t.link))
    mem = tuple(int(v) for v in np.ceil(np.array([cost.state_bytes(p) for p in params]) / KIB))
    act = tuple(int(v) for v in np.ceil(cost.act_prefix[bounds] * b / KIB))
    identical = []
    hosts = cluster.hosts
    used_hosts = sorted({t.host for t in types})
    for i, h1 in enumerate(used_hosts):
        for h2 in used_hosts[i + 1 :]:
            if hosts[h1].devices == hosts[h2].devices and hosts[h1].link == hosts[h2].link:
                identical.append((h1, h2))
                break
    total_groups = sum(t.count for t in types)
    prob = StageProblem(
        num_blocks=blocks.num_blocks,
        # torch.distributed.pipelining's Schedule1F1B needs at least as many microbatches as stages, and a
        # plan the lowering cannot run is no plan (GPipe has no such limit).
        max_stages=max(
            1,
            min(
                blocks.num_blocks,
                total_groups,
                cand.microbatches if cand.schedule == "1f1b" else total_groups,
            ),
        ),
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
    )
    return prob, g


def int_objective(p: StageProblem, stages: Sequence[tuple[int, int, int]]) -> int | None:
    """The integer program's objective for a solution, or None if it breaks a constraint (mirror of the
    model, used for warm starts and tests)."""
    if not stages or stages[0][0] != 0 or stages[-1][1] != p.num_blocks or len(stages) > p.max_stages:
        return None
    counts: dict[int, int] = {}
    n = len(stages)
    total_t, comm, z = 0, 0, 0
    t_max = f_max = b_max = 0
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
        mem = p.mem_prefix[e] - p.mem_prefix[a] + inflight * (p.act_prefix[e] - p.act_prefix[a])
        if mem > g.cap_kib:
            return None
        z = max(z, p.ar_prefix[g.ar_class][e] - p.ar_prefix[g.ar_class][a] + g.ar_latency)
        if s + 1 < n:
            nxt = p.groups[stages[s + 1][2]]
            lk = g.link if nxt.host == g.host else p.net_link
            comm += p.comm_prefix[lk][e]
            t_max = max(t_max, f + bw + 2 * p.comm_prefix[lk][e])
    m = p.microbatches
    steady = (m - 1) * (f_max + b_max) if p.schedule == "gpipe" else (m - 1) * t_max
    return total_t + steady + 2 * comm + z


def _greedy(p: StageProblem) -> tuple[int, tuple[tuple[int, int, int], ...]] | None:
    """A quick feasible solution: order the groups (kinds in every order, hosts kept together; or largest
    memory first), binary-search the smallest bottleneck a left-to-right fill achieves, then move single
    stage boundaries while that lowers the objective."""
    nb = p.num_blocks
    tfb = [
        [f + b for f, b in zip(fp, bp, strict=True)]
        for fp, bp in zip(p.fwd_prefix, p.bwd_prefix, strict=True)
    ]
    rooms: dict[int, list[int]] = {}

    def room(v: int) -> list[int]:
        if v not in rooms:
            rooms[v] = [m + v * a for m, a in zip(p.mem_prefix, p.act_prefix, strict=True)]
        return rooms[v]

    speed_rank = {k: i for i, k in enumerate(sorted(range(len(tfb)), key=lambda k: (tfb[k][-1], k)))}
    kinds = sorted({g.kind for g in p.groups}, key=lambda k: speed_rank[k])
    perms = list(itertools.permutations(kinds)) if len(kinds) <= 4 else [tuple(kinds)]
    orders = [
        sorted(
            range(len(p.groups)),
            key=lambda gi, pm=pm: (pm.index(p.groups[gi].kind), p.groups[gi].host, gi),  # type: ignore[misc]
        )
        for pm in perms
    ]
    orders.append(
        sorted(
            range(len(p.groups)), key=lambda gi: (-p.groups[gi].cap_kib, speed_rank[p.groups[gi].kind], gi)
        )
    )

    def fill(slots: list[int], limit: int, n_guess: int) -> list[tuple[int, int, int]] | None:
        out: list[tuple[int, int, int]] = []
        a = 0
        for s, gi in enumerate(slots):
            if a == nb:
                break
            g = p.groups[gi]
            pre = tfb[g.kind]
            e = bisect.bisect_right(pre, pre[a] + limit) - 1
            v = p.microbatches if p.schedule == "gpipe" else max(1, min(n_guess - s, p.microbatches))
            r = room(v)
            e = min(e, bisect.bisect_right(r, r[a] + g.cap_kib) - 1, nb)
            if p.schedule == "1f1b" and s + 1 < len(slots):
                # Leave room for this stage's round trip to the next one (it rides on the bottleneck).
                lk = g.link if p.groups[slots[s + 1]].host == g.host else p.net_link
                while a < e < nb and pre[e] - pre[a] + 2 * p.comm_prefix[lk][e] > limit:
                    e -= 1
            if e <= a:
                return None
            out.append((a, e, gi))
            a = e
        return out if a == nb else None

    best: tuple[int, tuple[tuple[int, int, int], ...]] | None = None
    for order in orders:
        slots = [gi for gi in order for _ in range(p.groups[gi].count)][: p.max_stages]

        def feasible(limit: int, slots: list[int] = slots) -> list[tuple[int, int, int]] | None:
            sol = fill(slots, limit, len(slots))
            if sol is not None:
                tighter = fill(slots, limit, len(sol))
                for c in (tighter, sol):
                    if c is not None and int_objective(p, c) is not None:
                        return c
            return None

        lo, hi = 0, int(max(x[-1] for x in tfb)) * 2 + 1
        if feasible(hi) is None:
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if feasible(mid) is not None:
                hi = mid
            else:
                lo = mid + 1
        sol = feasible(hi)
        if sol is not None:
            obj = int_objective(p, sol)
            if obj is not None and (best is None or obj < best[0]):
                best = (obj, tuple(sol))
    if best is None:
        return None
    return best


def _spread(p: StageProblem, stages: Sequence[tuple[int, int, int]]) -> int:
    """Sum of squared per-stage loads (compute + round trip): the local search's tie-breaker, so it can walk
    across plateaus of the bottleneck (several stages at the maximum) towards a lower maximum."""
    out = 0
    for s, (a, e, gi) in enumerate(stages):
        g = p.groups[gi]
        load = (
            p.fwd_prefix[g.kind][e]
            - p.fwd_prefix[g.kind][a]
            + p.bwd_prefix[g.kind][e]
            - p.bwd_prefix[g.kind][a]
        )
        if s + 1 < len(stages):
            lk = g.link if p.groups[stages[s + 1][2]].host == g.host else p.net_link
            load += 2 * p.comm_prefix[lk][e]
        out += load * load
    return out


def _improve(
    p: StageProblem, start: tuple[int, tuple[tuple[int, int, int], ...]], rounds: int = 200
) -> tuple[int, tuple[tuple[int, int, int], ...]]:
    """Local search from a feasible solution, first improvement of (objective, :func:`_spread`): move a
    stage boundary by up to 3 blocks, swap the groups of two neighbouring stages, move a stage to another
    group type with a free group, split a stage onto a free group, or merge two neighbouring stages."""
    obj, stages = start[0], list(start[1])
    key = (obj, _spread(p, stages))

    def moves(st: list[tuple[int, int, int]]):
        n = len(st)
        used: dict[int, int] = {}
        for _, _, g in st:
            used[g] = used.get(g, 0) + 1
        free = [gi for gi, grp in enumerate(p.groups) if used.get(gi, 0) < grp.count]
        for s in range(n - 1):
            (a, e, g), (_, e2, g2) = st[s], st[s + 1]
            for delta in (-1, 1, -2, 2, -3, 3):
                if a < e + delta < e2:
                    yield [*st[:s], (a, e + delta, g), (e + delta, e2, g2), *st[s + 2 :]]
            if g != g2:
                yield [*st[:s], (a, e, g2), (e, e2, g), *st[s + 2 :]]
            for keep in (g, g2):
                yield [*st[:s], (a, e2, keep), *st[s + 2 :]]
        for s in range(n):
            a, e, g = st[s]
            for gi in free:
                if gi != g:
                    yield [*st[:s], (a, e, gi), *st[s + 1 :]]
                if e - a >= 2 and n < p.max_stages:
                    mid = (a + e) // 2
                    yield [*st[:s], (a, mid, g), (mid, e, gi), *st[s + 1 :]]

    for _ in range(rounds):
        improved = False
        for trial in moves(stages):
            val = int_objective(p, trial)
            if val is None or val > key[0]:
                continue
            k = (val, _spread(p, trial))
            if k < key:
                key, stages, improved = k, trial, True
                break
        if not improved:
            break
    return key[0], tuple(stages)


def _lower_bound(p: StageProblem, upper: int | None = None) -> int:
    """A bound on the objective from the inputs alone: the larger of the LP relaxation (:func:`_lp_bound`)
    and the fluid relaxation described here.

    For a bottleneck ``T`` every non-last stage does at most ``T - 2 c_min`` of work (its round trip of at
    least the cheapest cut on the fastest link rides on the 1F1B critical path), the last at most ``T``;
    kind ``k`` with ``n_k`` groups covers at most ``n_k (T - 2 c_min) / W_k`` of the model (``W_k``: whole
    model on kind ``k``). The fill term is at least the cheapest fractional cover (fastest kinds first), and
    ``T`` at least the largest block on its fastest kind. Minimised over ``T`` on a grid, taking for each
    grid cell the cover at its right end and the steady state at its left end, so the bound stays valid.
    Both start ``T`` at :func:`_min_bottleneck` (memory-forced stage counts, 1F1B's early stages holding
    more activations), which also proves a candidate infeasible (``INFEASIBLE_BOUND``).
    """
    tfb = [
        np.array(f, dtype=np.float64) + np.array(b) for f, b in zip(p.fwd_prefix, p.bwd_prefix, strict=True)
    ]
    counts: dict[int, int] = {}
    for g in p.groups:
        counts[g.kind] = counts.get(g.kind, 0) + g.count
    # Work in units of the per-block fastest time ``w`` (``W`` the whole model): kind ``k`` runs any set of
    # blocks at least ``r_k`` times slower, ``r_k`` its smallest ratio to ``w``. Kinds are not exactly
    # proportional (memory-bound ops favour bandwidth), so pricing kind ``k`` at its whole-model time would
    # not be a bound.
    per_block = np.diff(np.array([tfb[k] for k in sorted(counts)]), axis=1)
    w = per_block.min(axis=0)
    whole = float(w.sum())
    pos = w > 0
    work = {
        k: whole * (float(np.min(row[pos] / w[pos])) if pos.any() else 1.0)
        for k, row in zip(sorted(counts), per_block, strict=True)
    }
    kinds = sorted(counts, key=lambda k: (work[k], k))
    block = max(float(min(tfb[k][j + 1] - tfb[k][j] for k in kinds)) for j in range(p.num_blocks))
    m = p.microbatches
    c_min = 0.0
    if p.schedule == "1f1b" and p.num_blocks > 1 and sum(counts.values()) > 1:
        # Two consecutive stages share a host only where a host offers two groups or more.
        per_host: dict[int, int] = {}
        for g in p.groups:
            per_host[g.host] = per_host.get(g.host, 0) + g.count
        links = {g.link for g in p.groups if per_host[g.host] >= 2} | {p.net_link}
        c_min = float(min(min(p.comm_prefix[lk][1 : p.num_blocks]) for lk in links))
    # The fill's round trips: every cut between two stages sends at least the cheapest cut on a usable link
    # (both schedules put 2 x the send on the fill; only 1F1B puts it on the bottleneck too).
    c_fill = c_min
    if p.num_blocks > 1 and sum(counts.values()) > 1 and p.schedule != "1f1b":
        per_host = {}
        for g in p.groups:
            per_host[g.host] = per_host.get(g.host, 0) + g.count
        links = {g.link for g in p.groups if per_host[g.host] >= 2} | {p.net_link}
        c_fill = float(min(min(p.comm_prefix[lk][1 : p.num_blocks]) for lk in links))
    upper_t = None if upper is None else upper // max(1, m) + 1
    t_star = _min_bottleneck(p, upper_t)
    if t_star is None:
        return INFEASIBLE_BOUND
    block = max(block, float(t_star))
    lp = _lp_bound(p, c_min, c_fill, t_star)
    if lp is not None and not math.isfinite(lp):
        return INFEASIBLE_BOUND
    lp_floor = math.floor(lp) if lp is not None else 0
    if m == 1:
        return max(lp_floor, math.floor(whole))
    hi = max(block, (upper if upper is not None else whole * (m + 1)) / (m - 1)) * 1.0001
    grid = np.geomspace(max(block, 1e-9), max(hi, block * 1.0001 + 1e-9), 256)

    def cover(t: float) -> float:
        """Cheapest fill for bottleneck ``t`` (inf if the groups cannot cover the model)."""
        left, fill = 1.0, 0.0
        for i, k in enumerate(kinds):
            room = counts[k] * max(0.0, t - 2 * c_min) + (2 * c_min if i == 0 else 0.0)
            frac = min(left, room / max(work[k], 1e-12))
            fill += frac * work[k]
            left -= frac
            if left <= 1e-12:
                return fill
        return math.inf

    best = math.inf
    for lo_t, hi_t in itertools.pairwise(grid):
        best = min(best, cover(float(hi_t)) + (m - 1) * float(lo_t))
    best = min(best, whole + (m - 1) * float(grid[-1]))
    fluid = math.floor(best) if math.isfinite(best) else math.floor(whole + (m - 1) * block)
    # Both are valid; neither dominates (the LP prices blocks per kind, the fluid bound gives only one
    # stage the comm-free bonus).
    return max(lp_floor, fluid)


class _Relaxation:
    """The stage problem with each kind's groups pooled (see :func:`_min_bottleneck`): ``feasible(T)`` and
    ``min_fill(T)`` walk stages from the last one backwards; a state is (stages per kind, kind and length of
    the current host run)."""

    def __init__(self, p: StageProblem) -> None:
        nb, m = p.num_blocks, p.microbatches
        counts: dict[int, int] = {}
        caps: dict[int, int] = {}
        per_host: dict[tuple[int, int], int] = {}
        for g in p.groups:
            counts[g.kind] = counts.get(g.kind, 0) + g.count
            caps[g.kind] = max(caps.get(g.kind, 0), g.cap_kib)  # one per kind in practice
            per_host[g.host, g.kind] = per_host.get((g.host, g.kind), 0) + g.count
        kinds = sorted(counts)
        nk = np.array([counts[k] for k in kinds], dtype=np.int64)
        tfb = [
            np.array(p.fwd_prefix[k], dtype=np.int64) + np.array(p.bwd_prefix[k], dtype=np.int64)
            for k in kinds
        ]
        mem = np.array(p.mem_prefix, dtype=np.int64)
        act = np.array(p.act_prefix, dtype=np.int64)
        gpipe = p.schedule == "gpipe"
        zero = np.zeros(nb + 1, dtype=np.int64)
        # (kind of the left stage, kind of the right stage) -> (longest run, cut price) where a host offers both.
        pair: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
        rt_net = zero
        # Cut prices: on the bottleneck under 1F1B only, on the fill under both schedules.
        if nb > 1 and sum(counts.values()) > 1:
            rt_net = 2 * np.array(p.comm_prefix[p.net_link], dtype=np.int64)
            hosts = sorted({g.host for g in p.groups})
            for h in hosts:
                on_h = {g.kind: 0 for g in p.groups if g.host == h}
                for g in p.groups:
                    if g.host == h:
                        on_h[g.kind] += g.count
                size = sum(on_h.values())
                for ki, kj in itertools.product(on_h, on_h):
                    if ki == kj and on_h[ki] < 2:
                        continue
                    i, j = kinds.index(ki), kinds.index(kj)
                    price = 2 * np.array(
                        p.comm_prefix[next(g.link for g in p.groups if g.host == h)], dtype=np.int64
                    )
                    if (i, j) in pair:
                        old_run, old_price = pair[i, j]
                        pair[i, j] = (max(old_run, size), np.minimum(old_price, price))
                    else:
                        pair[i, j] = (size, price)
        rmax = max([run for run, _ in pair.values()], default=1) + 1
        radix = np.cumprod(np.concatenate(([1], nk[:-1] + 1)))
        span = int(np.prod(nk + 1))

        max_stages = p.max_stages
        self.nb = nb
        self.m = m
        self.kinds = kinds
        self.nk = nk
        self.tfb = tfb
        self.mem = mem
        self.act = act
        self.gpipe = gpipe
        self.zero = zero
        self.pair = pair
        self.rt_net = rt_net
        self.rmax = rmax
        self.radix = radix
        self.span = span
        self.caps = caps
        self.max_stages = max_stages

        # feasible() keeps only the smallest start per state, which dominates only if a cut's price never
        # falls as the cut moves left: it uses the suffix minimum of each price (a relaxation of it).
        def env(x: np.ndarray) -> np.ndarray:
            if nb < 2:
                return x
            e = np.minimum.accumulate(x[:nb][::-1])[::-1]
            return np.append(e, e[-1])

        self.rt_net_env = env(rt_net)
        self.pair_env = {key: (run, env(price)) for key, (run, price) in pair.items()}

    def feasible(self, limit: int) -> bool:
        """Whether some relaxed layout has bottleneck <= ``limit``."""
        nb = self.nb
        m = self.m
        kinds = self.kinds
        nk = self.nk
        tfb = self.tfb
        mem = self.mem
        act = self.act
        gpipe = self.gpipe
        zero = self.zero
        pair = self.pair_env
        rt_net = self.rt_net_env
        rmax = self.rmax
        radix = self.radix
        span = self.span
        caps = self.caps
        max_stages = self.max_stages
        cnt = np.zeros((1, len(kinds)), dtype=np.int64)
        start = np.array([nb], dtype=np.int64)
        cur = np.array([-1], dtype=np.int64)
        run = np.array([0], dtype=np.int64)
        for r in range(max_stages):
            v = m if gpipe else min(r + 1, m)
            room = mem + v * act
            parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
            for i, k in enumerate(kinds):
                ok = cnt[:, i] < nk[i]
                if not ok.any():
                    continue
                f = start[ok]
                a_mem = np.searchsorted(room, room[f] - caps[k], side="left")
                # (right stage's kind to continue a run with, or -1 for a new run; cut price): the last
                # stage has no cut.
                options = [(-1, zero)] if r == 0 else [(-1, rt_net)]
                if r > 0:
                    options += [(j, pair[i, j][1]) for j in range(len(kinds)) if (i, j) in pair]
                for j, rt in options:
                    sel = (
                        (cur[ok] == j) & (run[ok] < pair[i, j][0]) if j >= 0 else np.ones(len(f), dtype=bool)
                    )
                    if not sel.any():
                        continue
                    fs = f[sel]
                    on_t = zero if gpipe else rt
                    a_time = np.searchsorted(tfb[i], tfb[i][fs] + on_t[fs] - limit, side="left")
                    a = np.maximum(a_mem[sel], a_time)
                    grow = a < fs
                    if not grow.any():
                        continue
                    if (a[grow] == 0).any():
                        return True
                    c2 = cnt[ok][sel][grow].copy()
                    c2[:, i] += 1
                    r2 = run[ok][sel][grow] + 1 if j >= 0 else np.ones(int(grow.sum()), dtype=np.int64)
                    parts.append((c2, a[grow], np.full(len(r2), i, dtype=np.int64), r2))
            if not parts:
                return False
            cnt_all = np.concatenate([x[0] for x in parts])
            st_all = np.concatenate([x[1] for x in parts])
            cur_all = np.concatenate([x[2] for x in parts])
            run_all = np.concatenate([x[3] for x in parts])
            keys = cnt_all @ radix + span * (cur_all * rmax + run_all)
            uniq, inv = np.unique(keys, return_inverse=True)
            best = np.full(len(uniq), nb, dtype=np.int64)
            np.minimum.at(best, inv, st_all)
            first = np.zeros(len(uniq), dtype=np.int64)
            first[inv[::-1]] = np.arange(len(inv))[::-1]
            cnt, start, cur, run = cnt_all[first], best, cur_all[first], run_all[first]
        return False

    def min_fill(self, limit: int) -> float:
        """The smallest ``sum_s (T_s + 2 c_s)`` of a relaxed layout with bottleneck <= ``limit`` (inf if
        none): the same walk as :meth:`feasible`, keeping per state the cheapest suffix from every boundary
        (a stage ``[a, f)`` fits exactly when ``a`` is at least a bound that depends on ``f`` alone)."""
        nb, m, kinds, nk = self.nb, self.m, self.kinds, self.nk
        inf = math.inf
        fill = np.full((1, nb + 1), inf)
        fill[0, nb] = 0.0
        cnt = np.zeros((1, len(kinds)), dtype=np.int64)
        cur = np.array([-1], dtype=np.int64)
        run = np.array([0], dtype=np.int64)
        best = inf
        idx = np.arange(nb + 1)
        for r in range(self.max_stages):
            v = m if self.gpipe else min(r + 1, m)
            room = self.mem + v * self.act
            parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
            for i, k in enumerate(kinds):
                ok = cnt[:, i] < nk[i]
                if not ok.any():
                    continue
                tk = self.tfb[i].astype(np.float64)
                a_mem = np.searchsorted(room, room - self.caps[k], side="left")
                options = [(-1, self.zero)] if r == 0 else [(-1, self.rt_net)]
                if r > 0:
                    options += [(j, self.pair[i, j][1]) for j in range(len(kinds)) if (i, j) in self.pair]
                for j, rt in options:
                    sel = ok & ((cur == j) & (run < self.pair[i, j][0]) if j >= 0 else True)
                    if not sel.any():
                        continue
                    on_t = self.zero if self.gpipe else rt
                    a_min = np.maximum(
                        a_mem, np.searchsorted(self.tfb[i], self.tfb[i] + on_t - limit, side="left")
                    )
                    w = fill[sel] + (tk + rt)[None, :]
                    new = np.full_like(w, inf)
                    for f in range(1, nb + 1):
                        lo = int(a_min[f])
                        if lo < f:
                            np.minimum(new[:, lo:f], w[:, f : f + 1], out=new[:, lo:f])
                    new -= tk[None, :]
                    new[:, idx == nb] = inf
                    live = np.isfinite(new).any(axis=1)
                    if not live.any():
                        continue
                    best = min(best, float(new[:, 0].min()))
                    c2 = cnt[sel][live].copy()
                    c2[:, i] += 1
                    r2 = run[sel][live] + 1 if j >= 0 else np.ones(int(live.sum()), dtype=np.int64)
                    parts.append((c2, new[live], np.full(len(r2), i, dtype=np.int64), r2))
            if not parts:
                break
            cnt_all = np.concatenate([x[0] for x in parts])
            fill_all = np.concatenate([x[1] for x in parts])
            cur_all = np.concatenate([x[2] for x in parts])
            run_all = np.concatenate([x[3] for x in parts])
            keys = cnt_all @ self.radix + self.span * (cur_all * self.rmax + run_all)
            uniq, inv = np.unique(keys, return_inverse=True)
            merged = np.full((len(uniq), nb + 1), inf)
            np.minimum.at(merged, inv, fill_all)
            first = np.zeros(len(uniq), dtype=np.int64)
            first[inv[::-1]] = np.arange(len(inv))[::-1]
            fill, cnt, cur, run = merged, cnt_all[first], cur_all[first], run_all[first]
            # A suffix that cannot reach boundary 0 any more is still needed; one that starts at 0 is done.
            fill[:, 0] = inf
        return best


def _fill_bound(p: StageProblem, t_star: int, upper: int, cells: int = 3) -> int:
    """A bound on the objective tighter than :func:`_lower_bound`'s where memory forces slow stages: for a
    bottleneck ``T`` in ``[T_i, T_i+1]`` the objective is at least ``min_fill(T_i+1) + (M - 1) T_i + Z``
    (:meth:`_Relaxation.min_fill`, nonincreasing in ``T``); a bottleneck above ``T_up`` (where even the
    cheapest fill reaches ``upper``) cannot go below ``upper``. ``t_star``: :func:`_min_bottleneck`."""
    rel = _Relaxation(p)
    m = p.microbatches
    nb = p.num_blocks
    per_block = [min(int(t[j + 1] - t[j]) for t in rel.tfb) for j in range(nb)]
    fill_lo = sum(per_block)
    ar_min = sum(
        min(p.ar_prefix[g.ar_class][j + 1] - p.ar_prefix[g.ar_class][j] for g in p.groups) for j in range(nb)
    )
    # The slowest stage's all-reduce is at least the average over the (at most all) groups' stages.
    z_lo = min(g.ar_latency for g in p.groups) + (
        ar_min / max(1, sum(g.count for g in p.groups)) if ar_min >= 0 else ar_min
    )
    t_up = (upper - fill_lo - z_lo) / (m - 1) if m > 1 else float(upper)
    if t_up <= t_star:
        return upper
    grid = [int(x) for x in np.geomspace(max(1, t_star), t_up, cells + 1)]
    grid[0] = t_star
    best = float(upper)
    for lo_t, hi_t in itertools.pairwise(grid):
        best = min(best, rel.min_fill(hi_t + 1) + (m - 1) * lo_t + z_lo)
    return min(upper, math.floor(best))


def _min_bottleneck(p: StageProblem, upper: int | None = None) -> int | None:
    """A lower bound on the bottleneck of every layout (1F1B: ``max_s T_s + 2 c_s``; GPipe: ``Fmax + Bmax``
    >= ``max_s T_s``), or None if no layout fits memory.

    Exact feasibility test of a relaxation for a bottleneck ``T``, binary-searched: stages are built from the
    last one backwards; the ``r``-th stage from the end holds ``min(r, M)`` microbatches of activations
    under 1F1B (``M`` under GPipe) whatever the stage count, so memory is checked exactly. Each kind's groups
    are pooled (kind-``k`` stages at most ``n_k``); under 1F1B a cut between two stages of one host (a
    *run*, at most as long as a host offering both kinds has groups) pays the cheapest such host's link,
    any other cut the network. A state is (stages per kind, kind and length of the current run); its value
    the smallest boundary the suffix can start at (a stage can only grow leftwards while time and memory
    allow, so the smallest start dominates once each cut price is replaced by its suffix minimum). ``T`` is feasible if some state reaches boundary 0.
    ``upper``: a bottleneck known to be feasible (saves steps).
    """
    rel = _Relaxation(p)
    tfb, feasible = rel.tfb, rel.feasible
    hi = int(max(int(t[-1]) for t in tfb) + 2 * int(max(max(c) for c in p.comm_prefix)) + 1)
    if upper is not None and upper < hi and feasible(upper):
        hi = upper
    elif not feasible(hi):
        return None
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _lp_bound(p: StageProblem, c_min: float, c_fill: float = 0.0, t_min: int = 0) -> float | None:
    """The LP relaxation of the stage problem with stages of one kind pooled (GLOP), or None if GLOP fails.

    Variables ``x[j, k]`` (share of block ``j`` run on kind ``k``) and the bottleneck ``T``:

    - cover:    ``sum_k x[j, k] = 1``
    - time:     ``sum_j t[j, k] x[j, k] <= n_k (T - 2 c_min) + 2 c_min`` (kind ``k``'s ``n_k`` groups each
      carry at most ``T`` minus its round trip; the last stage has none)
    - memory:   ``sum_j (state[j] + v act[j]) x[j, k] <= N_k cap_k``, ``N_k <= n_k`` (``N_k``: the number of
      kind-``k`` stages, relaxed; each stage's devices hold its state and ``v`` microbatches of
      activations: ``M`` under GPipe, at least one under 1F1B)
    - cuts:     ``S >= sum_k N_k`` stages have ``S - 1`` cuts, each sending at least ``c_fill`` both ways
    - all-reduce: ``Z >= sum_j ar_k[j] x[j, k] / n_k + lat_min`` (the slowest stage's all-reduce + optimizer
      step is at least the average over kind ``k``'s stages; ``ar_k``: the cheapest class of kind ``k``)
    - ``T >=`` the largest block on its fastest kind and ``t_min`` (:func:`_min_bottleneck`)
    - minimise ``sum_jk t[j, k] x[j, k] + (M - 1) T + 2 c_fill (sum_k N_k - 1) + Z``
    """
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:
        return None
    nb, m = p.num_blocks, p.microbatches
    counts: dict[int, int] = {}
    caps: dict[int, int] = {}
    cap_max: dict[int, int] = {}
    for g in p.groups:
        counts[g.kind] = counts.get(g.kind, 0) + g.count
        caps[g.kind] = caps.get(g.kind, 0) + g.count * g.cap_kib
        cap_max[g.kind] = max(cap_max.get(g.kind, 0), g.cap_kib)
    kinds = sorted(counts)
    t = {
        k: [
            p.fwd_prefix[k][j + 1] - p.fwd_prefix[k][j] + p.bwd_prefix[k][j + 1] - p.bwd_prefix[k][j]
            for j in range(nb)
        ]
        for k in kinds
    }
    inflight = m if p.schedule == "gpipe" else 1
    mem = [
        p.mem_prefix[j + 1] - p.mem_prefix[j] + inflight * (p.act_prefix[j + 1] - p.act_prefix[j])
        for j in range(nb)
    ]
    # Per kind, the cheapest all-reduce class block by block (a stage's span on any class is at least the
    # sum of these minima).
    ar = {
        k: [
            min(p.ar_prefix[g.ar_class][j + 1] - p.ar_prefix[g.ar_class][j] for g in p.groups if g.kind == k)
            for j in range(nb)
        ]
        for k in kinds
    }
    lat_min = float(min(g.ar_latency for g in p.groups))
    x = {(j, k): solver.NumVar(0.0, 1.0, f"x[{j},{k}]") for j in range(nb) for k in kinds}
    n = {k: solver.NumVar(0.0, float(counts[k]), f"N[{k}]") for k in kinds}
    big = float(max(sum(v) for v in t.values())) * (m + 2)
    t_lo = float(max(t_min, max(min(t[k][j] for k in kinds) for j in range(nb))))
    bottleneck = solver.NumVar(t_lo, max(big, t_lo), "T")
    z = solver.NumVar(lat_min, solver.infinity(), "Z")
    for j in range(nb):
        solver.Add(sum(x[j, k] for k in kinds) == 1)
    for k in kinds:
        solver.Add(
            sum(t[k][j] * x[j, k] for j in range(nb)) <= counts[k] * (bottleneck - 2 * c_min) + 2 * c_min
        )
        solver.Add(sum(mem[j] * x[j, k] for j in range(nb)) <= caps[k])
        solver.Add(sum(mem[j] * x[j, k] for j in range(nb)) <= n[k] * cap_max[k])
        solver.Add(counts[k] * (z - lat_min) >= sum(ar[k][j] * x[j, k] for j in range(nb)))
    solver.Minimize(
        sum(t[k][j] * x[j, k] for j in range(nb) for k in kinds)
        + (m - 1) * bottleneck
        + 2 * c_fill * (sum(n.values()) - 1)
        + z
    )
    status = solver.Solve()
    if status == pywraplp.Solver.INFEASIBLE:
        return math.inf
    if status != pywraplp.Solver.OPTIMAL:
        return None
    # GLOP's tolerances are ~1e-9 relative: shave a little so the bound stays a bound.
    return solver.Objective().Value() * (1 - 1e-6)


def _stage_specs(groups: _Groups, stages: Sequence[tuple[int, int, int]], blocks: Blocks) -> list[StageSpec]:
    taken: dict[int, int] = {}
    out = []
    for a, e, gi in stages:
        i = taken.get(gi, 0)
        taken[gi] = i + 1
        out.append(StageSpec(blocks.bounds[a], blocks.bounds[e], groups.devices[gi][i]))
    return out


@dataclass(frozen=True, slots=True)
class SearchResult:
    """The best layout found, its candidate, costs and the solver's account."""

    stages: tuple[StageSpec, ...]
    candidate: Candidate
    iteration: IterationCost
    report: SolverReport


def _precheck(cost: CostModel, cluster: Cluster, blocks: Blocks) -> None:
    """Fail early, and precisely, when no layout can fit whatever the batch split."""
    g = cost.graph
    need = cost.state_bytes(g.param_bytes or int(cost.param_prefix[-1]))
    have = cluster.total_memory_bytes()
    per = cost.state_per_param
    if need > have:
        raise InfeasiblePlanError(
            f"model {g.name!r} needs at least {need / GIB:.1f} GiB across devices for parameters, gradients "
            f"and optimizer state ({per} bytes per parameter with {cost.dtype} {cost.optimizer}); cluster "
            f"{cluster.name!r} has {have / GIB:.1f} GiB usable ({(need - have) / GIB:.1f} GiB short)"
        )
    biggest = max(k.usable_memory_bytes for k in cluster.kinds.values())
    for i in range(blocks.num_blocks):
        a, e = blocks.bounds[i], blocks.bounds[i + 1]
        m = cost.stage_memory(a, e, microbatch=1, inflight=1)
        if m > biggest:
            raise InfeasiblePlanError(
                f"block {i} ({blocks.labels[i]}, nodes {a}..{e - 1}) alone needs {m / GIB:.2f} GiB (state and "
                f"one sample's activations) but the largest device has {biggest / GIB:.2f} GiB usable "
                f"({(m - biggest) / GIB:.2f} GiB short); cuts fall only between blocks"
            )


def search(
    graph: OpGraph,
    cost: CostModel,
    *,
    global_batch: int,
    microbatches: int | None = None,
    schedule: str | None = None,
    time_limit_s: float = 10.0,
    workers: int = 2,
    progress: Callable[[SolverProgress], None] | None = None,
    max_blocks: int = 160,
    extra: Sequence[tuple[str, Sequence[StageSpec], Candidate]] = (),
) -> SearchResult:
    """Find the best layout over all candidates (see module docstring). ``extra`` layouts (e.g. the
    baselines) compete too, so the result is never worse than any of them."""
    t0 = time.perf_counter()
    cluster = cost.cluster
    check_cluster_figures(cluster, dtype=cost.dtype)
    blocks = coarsen(graph, max_blocks=max_blocks)
    _precheck(cost, cluster, blocks)
    # The schedule is a decision too: 1F1B holds fewer activations, but its steady state carries each
    # stage's round trip, which GPipe overlaps (see cost.py).
    scheds = [schedule] if schedule else ["1f1b", "gpipe"]
    cands: list[tuple[Candidate, StageProblem, _Groups, int, tuple[int, tuple] | None]] = []
    memory_short = 0
    for dp, sched in itertools.product(candidate_dp(cluster, global_batch, microbatches), scheds):
        groups = _groups(cluster, dp)
        total_groups = sum(t.count for t in groups.types)
        per = global_batch // dp
        for m in candidate_microbatches(
            per, max_stages=min(blocks.num_blocks, total_groups), fixed=microbatches
        ):
            cand = Candidate(dp, m, per // m, sched)
            prob, _ = build_problem(cost, blocks, cand, groups)
            # Every replica holds its stage's whole state: if all groups together cannot hold one copy of
            # the model's state plus one microbatch of activations, no layout of this candidate fits.
            if prob.mem_prefix[-1] + prob.act_prefix[-1] > sum(g.count * g.cap_kib for g in prob.groups):
                memory_short += 1
                continue
            gr = _greedy(prob)
            cands.append((cand, prob, groups, _lower_bound(prob, gr[0] if gr else None), gr))
    if not cands and memory_short:
        raise InfeasiblePlanError(
            (schedule == "1f1b" and _why_1f1b(cost, blocks, global_batch, microbatches))
            or _why_infeasible(cost, cluster, blocks, global_batch)
        )
    if not cands:
        raise PlanError(
            f"no data-parallel degree and microbatch count divide global_batch {global_batch}"
            + (f" into {microbatches} microbatches" if microbatches else "")
        )

    def seconds(c: Candidate, stages: Sequence[StageSpec]) -> IterationCost:
        _, total, bubble = layout_cost(
            cost, stages, schedule=c.schedule, microbatches=c.microbatches, microbatch_size=c.microbatch_size
        )
        return IterationCost(total, bubble)

    # Local search on the few most promising warm starts (it costs ~0.1-1 s each on 64 GPUs).
    first = sorted(
        (i for i, c in enumerate(cands) if c[4] is not None),
        key=lambda i: (cands[i][4][0] * cands[i][1].time_unit_s, i),  # type: ignore[index]
    )
    for i in first[:IMPROVE_TOP]:
        cand, prob, groups, lb, gr = cands[i]
        cands[i] = (cand, prob, groups, lb, _improve(prob, gr))  # type: ignore[arg-type]
    best: tuple[float, list[StageSpec], Candidate, IterationCost, str, int, float] | None = None
    for cand, prob, groups, _, gr in cands:
        if gr is not None:
            specs = _stage_specs(groups, gr[1], blocks)
            it = seconds(cand, specs)
            if best is None or it.iteration_time_s < best[0]:
                best = (it.iteration_time_s, specs, cand, it, "greedy", gr[0], prob.time_unit_s)
    greedy_s = {}
    for i, (cand, _, groups, _, gr) in enumerate(cands):
        greedy_s[i] = seconds(cand, _stage_specs(groups, gr[1], blocks)).iteration_time_s if gr else math.inf

    def lb_s(i: int) -> float:
        return cands[i][3] * cands[i][1].time_unit_s

    # Tighten the weakest bounds (they decide the reported gap) with the fill relaxation; a fixed number of
    # rounds, not a clock, so the plan and its report do not depend on the machine's load.
    tightened: set[int] = set()
    for _ in range(FILL_ROUNDS):
        if best is None:
            break
        open_ = [i for i in range(len(cands)) if cands[i][3] < INFEASIBLE_BOUND and lb_s(i) < best[0]]
        if not open_:
            break
        i = min(open_, key=lambda i: (lb_s(i), i))
        if i in tightened:
            break
        tightened.add(i)
        cand, prob, groups, lb, gr = cands[i]
        upper = math.floor(best[0] / prob.time_unit_s)
        t_star = _min_bottleneck(prob, upper // max(1, prob.microbatches) + 1)
        new_lb = INFEASIBLE_BOUND if t_star is None else _fill_bound(prob, t_star, upper)
        cands[i] = (cand, prob, groups, max(lb, new_lb), gr)

    # Most promising first (by the greedy's value); candidates whose bound cannot beat the incumbent are
    # pruned, and at most MAX_SOLVES integer programs share the time limit.
    order = sorted(range(len(cands)), key=lambda i: (greedy_s[i], lb_s(i), i))
    small = [
        i
        for i in order
        if cands[i][1].max_stages * cands[i][1].num_blocks <= LARGE_MODEL and cands[i][3] < INFEASIBLE_BOUND
    ]
    promising = [i for i in small if best is None or lb_s(i) < best[0]]
    # Tiny models (brute-force sizes) take milliseconds: solve them all; the rest share the time limit.
    tiny = [i for i in promising if cands[i][1].max_stages * cands[i][1].num_blocks <= TINY_MODEL]
    to_solve = tiny + [i for i in promising if i not in tiny][:MAX_SOLVES]
    share = time_limit_s / max(1, len(to_solve))
    bounds: list[float] = []
    statuses: dict[str, int] = {}
    notes: list[str] = []
    # The bound over all candidates before any solve: once the incumbent is within GAP_TOLERANCE of it, the
    # integer programs cannot change the answer by more than that (a deterministic test, no clock).
    floor = min((lb_s(i) for i in range(len(cands)) if cands[i][3] < INFEASIBLE_BOUND), default=math.inf)
    close_enough = best is not None and best[0] - floor <= GAP_TOLERANCE * best[0]
    for i in order:
        cand, prob, groups, lb, gr = cands[i]
        unit = prob.time_unit_s
        if lb >= INFEASIBLE_BOUND:
            statuses["LP_INFEASIBLE"] = statuses.get("LP_INFEASIBLE", 0) + 1
            continue
        # (Tiny models still go to CP-SAT: milliseconds, and it proves them optimal.)
        if (
            i in to_solve
            and i not in tiny
            and close_enough
            and not (best is not None and lb * unit >= best[0])
        ):
            bounds.append(lb * unit)
            statuses["WITHIN_GAP"] = statuses.get("WITHIN_GAP", 0) + 1
            continue
        if i not in to_solve or (best is not None and lb * unit >= best[0]):
            bounds.append(lb * unit)
            key = "PRUNED" if best is not None and lb * unit >= best[0] else "NOT_SOLVED"
            if key == "NOT_SOLVED" and i not in small:
                # Measured: CP-SAT finds nothing better than the warm start within 10 s on such models
                # here (Llama-7B on 64 GPUs: 64 stage slots x 160 blocks); keep the greedy and its bound.
                key = "TOO_LARGE"
            statuses[key] = statuses.get(key, 0) + 1
            continue
        # Only the deterministic work limit decides (same plan on any load); the wall-clock limit is a
        # generous safety net against a runaway solve, and the notes say when it fired.
        left = SAFETY_FACTOR * share + 0.5
        sol: StageSolution = solve_stage_problem(
            prob,
            hint=gr[1] if gr else None,
            workers=workers,
            deterministic_time=max(0.05, DETERMINISTIC_SHARE * share),
            time_limit_s=left,
            progress=progress,
            label=f"dp={cand.dp} m={cand.microbatches}",
        )
        statuses[sol.status] = statuses.get(sol.status, 0) + 1
        if sol.seconds >= left * 0.98:
            notes.append(f"dp={cand.dp} m={cand.microbatches}: stopped by the wall-clock safety limit")
        proven = sol.status in ("OPTIMAL", "FEASIBLE", "INFEASIBLE")
        if sol.status == "INFEASIBLE" and proven:
            continue
        bounds.append(max(sol.bound, lb) * unit if proven and sol.stages else lb * unit)
        if not sol.stages:
            continue
        specs = _stage_specs(groups, sol.stages, blocks)
        it = seconds(cand, specs)
        if best is None or it.iteration_time_s < best[0] - 1e-12:
            best = (it.iteration_time_s, specs, cand, it, "cp-sat", sol.objective, unit)
    for name, specs_x, cand_x in extra:
        it = seconds(cand_x, specs_x)
        if best is not None and it.iteration_time_s < best[0] - 1e-12:
            notes.append(
                f"the {name} layout beat the solver's ({it.iteration_time_s:.4g} s < {best[0]:.4g} s)"
            )
            best = (it.iteration_time_s, list(specs_x), cand_x, it, name, 0, 0.0)
    elapsed = time.perf_counter() - t0
    if best is None:
        raise InfeasiblePlanError(
            (schedule == "1f1b" and _why_1f1b(cost, blocks, global_batch, microbatches))
            or _why_infeasible(cost, cluster, blocks, global_batch)
        )
    total, specs, cand, it, source, _, _ = best
    bound = min(bounds) if bounds else total
    bound = min(bound, total)
    gap = max(0.0, (total - bound) / total) if total > 0 else 0.0
    exact = all(k in ("OPTIMAL", "INFEASIBLE", "LP_INFEASIBLE", "PRUNED") for k in statuses)
    status = "OPTIMAL" if exact else "FEASIBLE"
    summary = ", ".join(f"{k.lower()} {v}" for k, v in sorted(statuses.items()))
    notes.insert(
        0,
        f"{len(cands)} candidates (dp x microbatches x schedule): {summary}; best from {source}"
        + (f"; {memory_short} more cannot hold the model's state" if memory_short else ""),
    )
    report = SolverReport(
        solver="cp-sat",
        status=status,
        objective_s=total,
        bound_s=bound,
        gap=gap,
        seconds=elapsed,
        notes=tuple(notes),
    )
    return SearchResult(tuple(specs), cand, it, report)


def _why_1f1b(cost: CostModel, blocks: Blocks, global_batch: int, microbatches: int | None) -> str | None:
    """Why a forced 1F1B schedule fails, if memory needs more stages than it allows microbatches
    (torch's Schedule1F1B runs at most as many stages as microbatches); None otherwise.

    The stage count is a proven minimum: the smallest count whose relaxation (:class:`_Relaxation`, one
    device per stage, one sample per microbatch; with at most as many stages as microbatches, the ``r``-th
    stage from the end holds ``r`` microbatches whatever the count) fits memory."""
    most = microbatches or global_batch
    # One sample per microbatch and one device per stage: no candidate needs less memory per stage.
    cand = Candidate(1, most, 1, "1f1b")
    prob, _ = build_problem(cost, blocks, cand)
    room = min(blocks.num_blocks, sum(g.count for g in prob.groups))
    if room <= most:
        return None
    for k in range(1, room + 1):
        if _Relaxation(dataclasses.replace(prob, max_stages=k)).feasible(INFEASIBLE_BOUND):
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


def _why_infeasible(cost: CostModel, cluster: Cluster, blocks: Blocks, global_batch: int) -> str:
    """The smallest shortfall: every device filled to capacity, one sample in flight per stage."""
    need = cost.state_bytes(int(cost.param_prefix[-1])) + float(cost.act_prefix[-1])
    have = cluster.total_memory_bytes()
    msg = (
        f"no layout of {cost.graph.name!r} fits cluster {cluster.name!r}: parameters, gradients, optimizer "
        f"state and one sample's activations need at least {need / GIB:.1f} GiB, the cluster has "
        f"{have / GIB:.1f} GiB usable"
    )
    if need > have:
        return msg + f" ({(need - have) / GIB:.1f} GiB short)"
    return msg + (
        "; the stages cannot be balanced into the devices' memory "
        f"(largest device {max(k.usable_memory_bytes for k in cluster.kinds.values()) / GIB:.1f} GiB, "
        f"{blocks.num_blocks} blocks); try a larger global batch split, bf16, or more devices"
    )


#: Figures the planner accepts (per device / link); outside them the integer program's units degenerate.
#: Generous: about 1000x beyond any accelerator or interconnect made so far, either way.
FIGURE_RANGES = {
    "peak FLOP/s": (1e6, 1e19),
    "memory bandwidth (B/s)": (1e6, 1e16),
    "memory (bytes)": (1, 2**50),
    "link bandwidth (B/s)": (1e3, 1e15),
    "link latency (s)": (0.0, 60.0),
}


def check_cluster_figures(cluster: Cluster, *, dtype: str = "fp32") -> None:
    """Raise :class:`PlanError` naming the first figure of ``cluster`` outside :data:`FIGURE_RANGES` (the
    cost model would give infinite or degenerate times, and the integer program unbounded coefficients)."""

    def check(what: str, where: str, value: float) -> None:
        lo, hi = FIGURE_RANGES[what]
        if not (math.isfinite(value) and lo <= value <= hi):
            raise PlanError(
                f"{where}: {what} {value:g} is outside the range the planner supports ({lo:g} .. {hi:g})"
            )

    for name, k in sorted(cluster.kinds.items()):
        where = f"cluster {cluster.name!r}, device kind {name!r}"
        check("peak FLOP/s", where, k.flops(dtype))
        check("memory bandwidth (B/s)", where, k.memory_bandwidth_bytes_s)
        check("memory (bytes)", where, k.memory_bytes)
    for h in cluster.hosts:
        where = f"cluster {cluster.name!r}, host {h.name!r}"
        check("link bandwidth (B/s)", where, h.link.bandwidth_bytes_s)
        check("link latency (s)", where, h.link.latency_s)
    where = f"cluster {cluster.name!r}, network"
    check("link bandwidth (B/s)", where, cluster.network.bandwidth_bytes_s)
    check("link latency (s)", where, cluster.network.latency_s)


def _validate(
    global_batch: int, microbatches: int | None, schedule: str | None, time_limit_s: float, workers: int
) -> None:
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise PlanError(f"global_batch must be a positive integer, got {global_batch!r}")
    if microbatches is not None:
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
            raise PlanError(f"microbatches must be a positive integer, got {microbatches!r}")
        if global_batch % microbatches:
            raise PlanError(
                f"global_batch {global_batch} is not divisible into {microbatches} microbatches "
                f"(remainder {global_batch % microbatches})"
            )
    if schedule is not None and schedule not in ("1f1b", "gpipe"):
        raise PlanError(f"schedule must be 1f1b or gpipe for the planner, got {schedule!r}")
    if not time_limit_s > 0:
        raise PlanError(f"time_limit_s must be > 0, got {time_limit_s}")
    if workers < 1:
        raise PlanError(f"workers must be >= 1, got {workers}")


def plan(
    graph: OpGraph,
    *,
    cluster: str | Cluster | dict,
    global_batch: int,
    microbatches: int | None = None,
    schedule: str | None = None,
    dtype: str = "fp32",
    optimizer: str = "adam",
    time_limit_s: float = 10.0,
    workers: int = 2,
    progress: Callable[[SolverProgress], None] | None = None,
    baselines: bool = True,
) -> Plan:
    """The fastest plan the search finds for ``graph`` on ``cluster`` (checked, deterministic).

    Decides the stages (contiguous node ranges at block boundaries), each stage's group of ``dp``
    same-kind devices on one host, the data-parallel degree, the microbatch count and, unless given, the
    schedule (1F1B or GPipe), minimising the cost model's iteration time under every device's memory.

    The plan's ``solver`` report carries status, objective, bound, gap and seconds; ``baselines`` maps
    each baseline's name to its predicted iteration time (None where it does not fit).

        >>> from distplan.planner.synthetic import synthetic_transformer
        >>> g = synthetic_transformer(layers=4, hidden=512, heads=8, seq=256, vocab=1000)
        >>> p = plan(g, cluster="a100x4-t4x4", global_batch=8, time_limit_s=2)
        >>> p.check(g)
    """
    from .baselines import baseline_layouts

    _validate(global_batch, microbatches, schedule, time_limit_s, workers)
    if not graph.nodes:
        raise PlanError(f"graph {graph.name!r} has no nodes")
    c = load_cluster(cluster)
    check_cluster_figures(c, dtype=dtype)
    request = make_request(
        graph,
        c,
        global_batch=global_batch,
        dtype=dtype,
        optimizer=optimizer,
        microbatches=microbatches,
        schedule=schedule,
        time_limit_s=time_limit_s,
    )
    cost = CostModel(graph, c, dtype=dtype, optimizer=optimizer)
    base = (
        baseline_layouts(graph, cost, global_batch=global_batch, microbatches=microbatches, schedule=schedule)
        if baselines
        else {}
    )
    extra = [(name, b.stages, b.candidate) for name, b in base.items() if b is not None]
    res = search(
        graph,
        cost,
        global_batch=global_batch,
        microbatches=microbatches,
        schedule=schedule,
        time_limit_s=time_limit_s,
        workers=workers,
        progress=progress,
        extra=extra,
    )
    cand = res.candidate
    return build_plan(
        graph,
        cost,
        request,
        res.stages,
        schedule=cand.schedule,
        microbatches=cand.microbatches,
        microbatch_size=cand.microbatch_size,
        solver=res.report,
        baselines={name: (None if b is None else b.iteration_time_s) for name, b in base.items()},
    )
