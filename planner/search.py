"""The planner's outer search over candidates (data-parallel degree ``D`` x microbatch count ``M``).

For every candidate: build the integer data (``build_problem``), skip it if its groups cannot hold one
copy of the model state, compute a greedy warm start (``_greedy``: every order of the device kinds, hosts
kept together, binary search on the bottleneck) and a lower bound (``_lower_bound``: the smallest
bottleneck any layout can have, ``_min_bottleneck``, under an LP and a fluid relaxation). The three best
warm starts get a local search (``_improve``); the weakest bounds are then tightened by the fill
relaxation (``_fill_bound``, ``FILL_ROUNDS`` of them). Then, most promising first, up to ``MAX_SOLVES``
candidates whose bound can still beat the incumbent go to CP-SAT (``ilp.solve_stage_problem``) with the
warm start as hint, as many as fit the time limit's share for solving (see [Note: determinism]), unless
the incumbent is already within ``GAP_TOLERANCE``. The best layout under the cost model wins (the
baselines' layouts compete too); the reported bound is the smallest bound over all candidates, so the gap
is honest even where a candidate was not solved.

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
A plan and its solver report (wall seconds aside) depend only on the request, not on the machine's load,
and ``time_limit_s`` bounds the whole planning call's wall time. The two are reconciled so:

- Every decision is a pure function of the inputs: the greedy, the local search, the bounds and the fill
  relaxation run a fixed amount of work; candidates are visited in a fixed order, ties go to the earlier
  one, devices are handed out in index order.
- CP-SAT runs with a fixed seed, ``interleave_search`` (a deterministic portfolio whatever the number of
  workers) and a *deterministic* work limit that depends on ``time_limit_s`` alone
  (``DETERMINISTIC_SHARE``). Which candidates it solves is decided from the inputs too: most promising
  first, while their estimated wall time (``_solve_estimate_s``, from the model's size, measured on this
  2-core machine under its usual load) adds up to ``SOLVE_SHARE`` of the limit. So on a machine like this
  one the deterministic work ends well inside the limit, with room for a busy neighbour.
- The limit itself is a wall-clock budget (:class:`Budget`) started when planning starts: checked between
  steps, and what is left of it is CP-SAT's wall-clock cap. Only on a machine several times slower than
  the estimates (or under heavy load) is it reached; then the remaining steps are skipped, the plan is
  the best found so far (candidates not reached count with bound 0, so the gap stays honest), and the
  report's notes say where the limit was reached.
- CP-SAT's ``core`` subsolver is left out: in OR-Tools 9.15 it ignored the deterministic limit inside
  interleaved search (a 6-block, 4-stage model proved optimal by another worker in 0.04 s ran until the
  wall clock stopped it, 5-20 s; compare google/or-tools#3958), which made time limits late and plans
  load-dependent.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distplan.cluster import Cluster, Link
from distplan.errors import InfeasiblePlanError, PlanError
from distplan.graph import OpGraph, SharedParam
from distplan.limits import check_cluster_figures
from distplan.plan import Plan, SolverReport
from distplan.request import PlanRequest, as_request
from distplan.units import format_bytes

from .coarsen import Blocks, coarsen
from .cost import CostModel, IterationCost
from .evaluate import StageSpec, build_plan, layout_cost
from .ilp import GroupType, SharedGroup, SolverProgress, StageProblem, StageSolution, solve_stage_problem

__all__ = [
    "Budget",
    "Candidate",
    "build_problem",
    "candidate_dp",
    "candidate_microbatches",
    "int_objective",
    "plan",
    "search",
]

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
#: CP-SAT's deterministic work limit per solve (deterministic seconds), as a fraction of ``time_limit_s``
#: and clamped to [MIN_DETERMINISTIC_S, MAX_DETERMINISTIC_S] (see [Note: determinism] for the sizing).
DETERMINISTIC_SHARE = 0.01
MIN_DETERMINISTIC_S = 0.05
MAX_DETERMINISTIC_S = 0.2
#: Integer programs are solved while their estimated wall time adds up to at most this share of
#: ``time_limit_s`` (the rest of the limit is margin for a loaded machine; see [Note: determinism]).
SOLVE_SHARE = 0.2
#: Estimated wall seconds of one CP-SAT solve (model building, presolve, search) per value of its element
#: constraints, plus ``SOLVE_S_PER_VALUE_DET`` per value and deterministic second of search: fitted on this
#: 2-core machine under its usual load (load average 3-5) to solves from 4 stages x 44 blocks to 8 stages
#: x 160 blocks, 2 workers (measured 0.08-0.25 ms per value at 0.05 deterministic seconds, 0.12-0.25 ms at
#: 0.125: CP-SAT's interleaved workers load the model for every task, so the model's size dominates).
SOLVE_S_PER_ELEMENT_VALUE = 1e-4
SOLVE_S_PER_VALUE_DET = 1e-3
#: Fraction of ``time_limit_s`` kept back from the last solve's wall-clock cap for building the plan.
FINISH_RESERVE = 0.05
#: Integer programs are skipped once the incumbent is provably within this fraction of the optimum.
GAP_TOLERANCE = 0.005
#: Candidates whose bound the fill relaxation tightens (weakest first; ~0.1-1 s each on 64 GPUs).
FILL_ROUNDS = 8


class Budget:
    """The wall-clock budget of one planning call: ``limit_s`` seconds from its creation on ``clock``.

    The planner asks :meth:`expired` between steps (a candidate's warm start and bounds, a round of local
    search or of the fill relaxation, an integer program) and gives CP-SAT what is left
    (:meth:`left_for_solve`). Once it has fired, every later step is skipped and :meth:`note` says where
    (see [Note: determinism]). ``clock`` is injectable so tests can script the passing of time.
    """

    def __init__(self, limit_s: float, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.limit_s = limit_s
        self.clock = clock
        self.t0 = clock()
        self.fired = ""
        self.fired_at = 0.0

    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return self.clock() - self.t0

    def left_for_solve(self) -> float:
        """Seconds an integer program may take: what is left, less a reserve for building the plan."""
        return self.limit_s * (1 - FINISH_RESERVE) - self.elapsed()

    def fire(self, during: str) -> None:
        """Record that the limit was reached during ``during`` (the first time only)."""
        if not self.fired:
            self.fired, self.fired_at = during, self.elapsed()

    def expired(self, during: str) -> bool:
        """Whether the limit is reached; the first time it is, remember ``during`` for the note."""
        if not self.fired and self.elapsed() >= self.limit_s:
            self.fire(during)
        return bool(self.fired)

    def note(self) -> str:
        """The solver report's note once the limit fired ("" before)."""
        if not self.fired:
            return ""
        return (
            f"wall-clock limit of {self.limit_s:g} s reached during {self.fired} after {self.fired_at:.1f} s: "
            "the remaining steps were skipped, so this plan and its bound may differ from a run on a less "
            "loaded machine (a larger time limit avoids it)"
        )


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
    return prob, g


def _solve_estimate_s(p: StageProblem, deterministic_s: float) -> float:
    """Estimated wall seconds to build and solve ``p`` with a deterministic limit of ``deterministic_s``
    (see ``SOLVE_S_PER_ELEMENT_VALUE``): CP-SAT's time here goes mostly into its element constraints, one
    per stage slot and prefix array, each expanded into one literal per block boundary."""
    arrays = (
        len(p.fwd_prefix) * (2 if p.schedule == "gpipe" else 1)
        + len(p.comm_prefix)
        + len(p.ar_prefix)
        + 2
        + len(p.shared)
    )
    values = p.max_stages * (p.num_blocks + 1) * arrays
    return values * (SOLVE_S_PER_ELEMENT_VALUE + deterministic_s * SOLVE_S_PER_VALUE_DET)


def int_objective(p: StageProblem, stages: Sequence[tuple[int, int, int]]) -> int | None:
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


def _copies_kib(p: StageProblem, a: int, e: int) -> int:
    """KiB of shared-parameter copies a stage over blocks ``[a, e)`` holds beyond ``mem_prefix``."""
    return sum(sh.mem_kib for sh in p.shared if sh.blocks[0] < a and any(a <= b < e for b in sh.blocks))


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
            # Copies of shared parameters whose first reader lies before the stage (ilp (j)).
            while p.shared and e > a and r[e] - r[a] + _copies_kib(p, a, e) > g.cap_kib:
                e -= 1
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

        # feasible() relies on a stage's earliest start never falling as its end moves right: it prices each
        # cut at the suffix minimum of its price (a relaxation of it).
        def env(x: np.ndarray) -> np.ndarray:
            if nb < 2:
                return x
            e = np.minimum.accumulate(x[:nb][::-1])[::-1]
            return np.append(e, e[-1])

        self.rt_net_env = env(rt_net)
        self.pair_env = {key: (run, env(price)) for key, (run, price) in pair.items()}
        # _feasible_pooled's price of a stage's cut: the cheapest link a stage of that kind can use (its
        # host's, where the host has another group; else the network).
        self.rt_kind = []
        for k in kinds:
            price = rt_net.copy()
            if nb > 1 and sum(counts.values()) > 1:
                for h in sorted({g.host for g in p.groups if g.kind == k}):
                    if sum(g.count for g in p.groups if g.host == h) >= 2:
                        link = next(g.link for g in p.groups if g.host == h)
                        price = np.minimum(price, 2 * np.array(p.comm_prefix[link], dtype=np.int64))
            self.rt_kind.append(env(price))

    def feasible(self, limit: int, *, runs: bool = False) -> bool:
        """Whether some relaxed layout has bottleneck <= ``limit`` (see :func:`_min_bottleneck`).

        With ``runs`` a walk from the last stage backwards whose state is (stages per kind, kind and length
        of the current host run) and which keeps, per state, every boundary its suffix can start at;
        without, the cheaper walk of :meth:`_feasible_pooled`."""
        if not runs:
            return self._feasible_pooled(limit)
        nb, m, kinds, nk, tfb = self.nb, self.m, self.kinds, self.nk, self.tfb
        idx = np.arange(nb + 1)
        cnt = np.zeros((1, len(kinds)), dtype=np.int64)
        cur = np.array([-1], dtype=np.int64)
        run = np.array([0], dtype=np.int64)
        reach = np.zeros((1, nb + 1), dtype=bool)
        reach[0, nb] = True
        for r in range(self.max_stages):
            v = m if self.gpipe else min(r + 1, m)
            room = self.mem + v * self.act
            parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
            for i, k in enumerate(kinds):
                ok = cnt[:, i] < nk[i]
                if not ok.any():
                    continue
                a_mem = np.searchsorted(room, room - self.caps[k], side="left")
                # (kind of the stage to the right that a host run continues with, or -1 for a new run; cut
                # price); the last stage sends nothing.
                options = [(-1, self.zero)] if r == 0 else [(-1, self.rt_net_env)]
                if r > 0:
                    options += [
                        (j, self.pair_env[i, j][1]) for j in range(len(kinds)) if (i, j) in self.pair_env
                    ]
                for j, rt in options:
                    sel = ok & ((cur == j) & (run < self.pair_env[i, j][0]) if j >= 0 else True)
                    if not sel.any():
                        continue
                    on_t = self.zero if self.gpipe else rt
                    # Stage [a, f) fits iff a >= a_min[f]; a_min never falls as f grows (prices are suffix
                    # minima), so a is reachable iff the first reachable f above it admits it.
                    a_min = np.maximum(a_mem, np.searchsorted(tfb[i], tfb[i] + on_t - limit, side="left"))
                    marked = np.where(reach[sel], idx, nb + 1)
                    nxt = np.minimum.accumulate(marked[:, ::-1], axis=1)[:, ::-1]
                    above = np.concatenate([nxt[:, 1:], np.full((len(nxt), 1), nb + 1)], axis=1)
                    new = (above <= nb) & (a_min[np.minimum(above, nb)] <= idx)
                    if new[:, 0].any():
                        return True
                    live = new.any(axis=1)
                    if not live.any():
                        continue
                    c2 = cnt[sel][live].copy()
                    c2[:, i] += 1
                    r2 = run[sel][live] + 1 if j >= 0 else np.ones(int(live.sum()), dtype=np.int64)
                    parts.append((c2, np.full(len(r2), i, dtype=np.int64), r2, new[live]))
            if not parts:
                return False
            cnt_all = np.concatenate([x[0] for x in parts])
            cur_all = np.concatenate([x[1] for x in parts])
            run_all = np.concatenate([x[2] for x in parts])
            reach_all = np.concatenate([x[3] for x in parts])
            keys = cnt_all @ self.radix + self.span * (cur_all * self.rmax + run_all)
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            heads = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
            first = order[heads]
            reach = np.logical_or.reduceat(reach_all[order], heads, axis=0)
            cnt, cur, run = cnt_all[first], cur_all[first], run_all[first]
        return False

    def _feasible_pooled(self, limit: int) -> bool:
        """:meth:`feasible` with each stage's cut priced by the stage alone (its kind and position: the
        cheapest link a stage of that kind can reach a neighbour over, as a suffix minimum). Then a state
        is the number of stages per kind and only its smallest start matters: any continuation from a later
        start, cut short at an earlier one, keeps or drops stages with no more time, memory or cut price.
        A relaxation of the host runs (its prices are never higher), so its answer is never above theirs."""
        nb, m, kinds, nk, tfb = self.nb, self.m, self.kinds, self.nk, self.tfb
        cnt = np.zeros((1, len(kinds)), dtype=np.int64)
        start = np.array([nb], dtype=np.int64)
        for r in range(self.max_stages):
            v = m if self.gpipe else min(r + 1, m)
            room = self.mem + v * self.act
            parts: list[tuple[np.ndarray, np.ndarray]] = []
            for i, k in enumerate(kinds):
                ok = cnt[:, i] < nk[i]
                if not ok.any():
                    continue
                f = start[ok]
                a_mem = np.searchsorted(room, room[f] - self.caps[k], side="left")
                on_t = self.zero if (self.gpipe or r == 0) else self.rt_kind[i]
                a_time = np.searchsorted(tfb[i], tfb[i][f] + on_t[f] - limit, side="left")
                a = np.maximum(a_mem, a_time)
                grow = a < f
                if not grow.any():
                    continue
                if (a[grow] == 0).any():
                    return True
                c2 = cnt[ok][grow].copy()
                c2[:, i] += 1
                parts.append((c2, a[grow]))
            if not parts:
                return False
            cnt_all = np.concatenate([x[0] for x in parts])
            st_all = np.concatenate([x[1] for x in parts])
            uniq, inv = np.unique(cnt_all @ self.radix, return_inverse=True)
            best = np.full(len(uniq), nb, dtype=np.int64)
            np.minimum.at(best, inv, st_all)
            first = np.zeros(len(uniq), dtype=np.int64)
            first[inv[::-1]] = np.arange(len(inv))[::-1]
            cnt, start = cnt_all[first], best
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


def _min_bottleneck(p: StageProblem, upper: int | None = None, *, runs: bool = False) -> int | None:
    """A lower bound on the bottleneck of every layout (1F1B: ``max_s T_s + 2 c_s``; GPipe: ``Fmax + Bmax``
    >= ``max_s T_s``), or None if no layout fits memory.

    Exact feasibility test of a relaxation for a bottleneck ``T``, binary-searched: stages are built from the
    last one backwards; the ``r``-th stage from the end holds ``min(r, M)`` microbatches of activations
    under 1F1B (``M`` under GPipe) whatever the stage count, so memory is checked exactly. Each kind's groups
    are pooled (kind-``k`` stages at most ``n_k``); under 1F1B a cut between two stages of one host (a
    *run*, at most as long as a host offering both kinds has groups) pays the cheapest such host's link,
    any other cut the network, each price replaced by its suffix minimum. A state is (stages per kind, kind
    and length of the current run) and keeps *every* boundary its suffix can start at: keeping only the
    smallest is not safe, because a shorter suffix may have to drop a stage, which changes who neighbours
    whom and so the price of a cut (found by the brute-force test). ``T`` is feasible if some state reaches
    boundary 0. ``upper``: a bottleneck known to be feasible (saves steps). Shared parameters' extra copies
    are left out (more memory only), so the bound stays a bound.
    """
    rel = _Relaxation(p)
    tfb = rel.tfb

    def feasible(limit: int) -> bool:
        return rel.feasible(limit, runs=runs)

    hi = int(max(int(t[-1]) for t in tfb) + 2 * int(max(max(c) for c in p.comm_prefix)) + 1)
    if upper is not None and upper < hi and feasible(upper):
        hi = upper
    elif not feasible(hi):
        return None
    # Every layout has a stage holding the largest block (on its fastest kind): no smaller bottleneck is
    # feasible, so the search may start there (same answer, fewer steps); with host runs, no bottleneck
    # below the pooled relaxation's is either.
    lo = min(hi, max(int(min(t[j + 1] - t[j] for t in tfb)) for j in range(p.num_blocks)))
    if runs:
        pooled = _min_bottleneck(p, hi)
        lo = max(lo, pooled if pooled is not None else hi)
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
    # Rows are built coefficient by coefficient: the natural (operator) API took most of the planner's
    # preparation time on 160-block models.
    inf = solver.infinity()
    for j in range(nb):
        row = solver.Constraint(1.0, 1.0)
        for k in kinds:
            row.SetCoefficient(x[j, k], 1.0)
    for k in kinds:
        time_row = solver.Constraint(-inf, 2 * c_min * (1 - counts[k]))
        cap_row = solver.Constraint(-inf, float(caps[k]))
        stages_row = solver.Constraint(-inf, 0.0)
        ar_row = solver.Constraint(counts[k] * lat_min, inf)
        for j in range(nb):
            time_row.SetCoefficient(x[j, k], float(t[k][j]))
            cap_row.SetCoefficient(x[j, k], float(mem[j]))
            stages_row.SetCoefficient(x[j, k], float(mem[j]))
            ar_row.SetCoefficient(x[j, k], -float(ar[k][j]))
        time_row.SetCoefficient(bottleneck, -float(counts[k]))
        stages_row.SetCoefficient(n[k], -float(cap_max[k]))
        ar_row.SetCoefficient(z, float(counts[k]))
    obj = solver.Objective()
    for j in range(nb):
        for k in kinds:
            obj.SetCoefficient(x[j, k], float(t[k][j]))
    obj.SetCoefficient(bottleneck, float(m - 1))
    for k in kinds:
        obj.SetCoefficient(n[k], 2 * c_fill)
    obj.SetCoefficient(z, 1.0)
    obj.SetOffset(-2 * c_fill)
    obj.SetMinimization()
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
    biggest = max(k.usable_memory_bytes for k in cluster.kinds.values())
    forced = _forced_copies(cost, biggest)
    copies = sum(cost.state_bytes(sp.nbytes) for sp, _ in forced)
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
        m = cost.stage_memory(a, e, microbatch=1, inflight=1)
        if m > biggest:
            raise InfeasiblePlanError(
                f"block {i} ({blocks.labels[i]}, nodes {a}..{e - 1}) alone needs {format_bytes(m)} (state and "
                f"one sample's activations) but the largest device has {format_bytes(biggest)} usable "
                f"({format_bytes(m - biggest)} short); cuts fall only between blocks"
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
    budget: Budget | None = None,
) -> SearchResult:
    """Find the best layout over all candidates (see module docstring). ``extra`` layouts (e.g. the
    baselines) compete too, so the result is never worse than any of them. ``budget``: the wall-clock
    budget of the whole planning call (by default ``time_limit_s`` from now; see [Note: determinism])."""
    budget = budget or Budget(time_limit_s)
    cluster = cost.cluster
    check_cluster_figures(cluster, dtype=cost.dtype)
    blocks = coarsen(graph, max_blocks=max_blocks)
    _precheck(cost, cluster, blocks)
    # The schedule is a decision too: 1F1B holds fewer activations, but its steady state carries each
    # stage's round trip, which GPipe overlaps (see cost.py).
    scheds = [schedule] if schedule else ["1f1b", "gpipe"]
    cands: list[tuple[Candidate, StageProblem, _Groups, int, tuple[int, tuple] | None]] = []
    memory_short = 0
    unexplored = 0  # candidates the wall-clock limit left out (their bound is unknown: 0)
    for dp, sched in itertools.product(candidate_dp(cluster, global_batch, microbatches), scheds):
        groups = _groups(cluster, dp)
        total_groups = sum(t.count for t in groups.types)
        per = global_batch // dp
        for m in candidate_microbatches(
            per, max_stages=min(blocks.num_blocks, total_groups), fixed=microbatches
        ):
            if budget.expired("the warm starts and bounds of the candidates"):
                unexplored += 1
                continue
            cand = Candidate(dp, m, per // m, sched)
            prob, _ = build_problem(cost, blocks, cand, groups)
            # Every replica holds its stage's whole state: if all groups together cannot hold one copy of
            # the model's state plus one microbatch of activations, no layout of this candidate fits.
            if prob.mem_prefix[-1] + prob.act_prefix[-1] > sum(g.count * g.cap_kib for g in prob.groups):
                memory_short += 1
                continue
            gr = _greedy(prob)
            cands.append((cand, prob, groups, _lower_bound(prob, gr[0] if gr else None), gr))
    if not cands and memory_short and not unexplored:
        raise InfeasiblePlanError(
            (schedule == "1f1b" and _why_1f1b(cost, blocks, global_batch, microbatches))
            or _why_infeasible(cost, cluster, blocks, global_batch)
        )
    if not cands and not unexplored:
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
        if budget.expired("the local search"):
            break
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
        if best is None or budget.expired("the fill relaxation"):
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
        t_star = _min_bottleneck(prob, upper // max(1, prob.microbatches) + 1, runs=True)
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
    # The others, most promising first, while their estimated wall time fits SOLVE_SHARE of the limit: a
    # decision from the inputs alone, so a loaded machine solves the same programs (see [Note: determinism]).
    det_each = min(MAX_DETERMINISTIC_S, max(MIN_DETERMINISTIC_S, DETERMINISTIC_SHARE * time_limit_s))
    allowance = SOLVE_SHARE * time_limit_s - sum(_solve_estimate_s(cands[i][1], det_each) for i in tiny)
    chosen: list[int] = []
    over_budget = 0
    for i in [i for i in promising if i not in tiny][:MAX_SOLVES]:
        est = _solve_estimate_s(cands[i][1], det_each)
        if est > allowance:
            over_budget += 1
            continue
        chosen.append(i)
        allowance -= est
    to_solve = tiny + chosen
    # The integer programs' deterministic work depends on the time limit alone (the same on any load); the
    # wall clock only caps it (see [Note: determinism]).
    bounds: list[float] = [0.0] if unexplored else []
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
        label = f"dp={cand.dp} m={cand.microbatches} {cand.schedule}"
        left = budget.left_for_solve()
        if left <= 0:
            budget.fire(f"the integer programs (before {label})")
        if budget.expired(f"the integer programs (before {label})"):
            bounds.append(lb * unit)
            statuses["NOT_SOLVED"] = statuses.get("NOT_SOLVED", 0) + 1
            continue
        # Only the deterministic work limit decides (same plan on any load); the wall clock is what is left
        # of the time limit, and the notes say when it cut a solve short.
        sol: StageSolution = solve_stage_problem(
            prob,
            hint=gr[1] if gr else None,
            workers=workers,
            deterministic_time=det_each,
            time_limit_s=left,
            progress=progress,
            label=label,
        )
        statuses[sol.status] = statuses.get(sol.status, 0) + 1
        if sol.seconds >= left * 0.98:
            budget.fire(f"the integer program {label}")
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
        if best is None and math.isfinite(it.iteration_time_s):
            # Only a baseline fits (its devices in rank order may span hosts, outside the search's scope),
            # or the time limit stopped the search first.
            notes.append(f"the {name} layout is the only one found ({it.iteration_time_s:.4g} s)")
            best = (it.iteration_time_s, list(specs_x), cand_x, it, name, 0, 0.0)
            bounds.append(0.0)  # nothing proven about layouts the search did not reach
            statuses["NO_SEARCH_LAYOUT"] = 1
        elif best is not None and it.iteration_time_s < best[0] - 1e-12:
            notes.append(
                f"the {name} layout beat the solver's ({it.iteration_time_s:.4g} s < {best[0]:.4g} s)"
            )
            best = (it.iteration_time_s, list(specs_x), cand_x, it, name, 0, 0.0)
    elapsed = budget.elapsed()
    if best is None and budget.fired:
        raise PlanError(f"no plan found within the time limit of {budget.limit_s:g} s: {budget.note()}")
    if best is None:
        raise InfeasiblePlanError(
            (schedule == "1f1b" and _why_1f1b(cost, blocks, global_batch, microbatches))
            or _why_infeasible(cost, cluster, blocks, global_batch)
        )
    total, specs, cand, it, source, _, _ = best
    bound = min(bounds) if bounds else total
    bound = min(bound, total)
    gap = max(0.0, (total - bound) / total) if total > 0 else 0.0
    exact = not unexplored and all(
        k in ("OPTIMAL", "INFEASIBLE", "LP_INFEASIBLE", "PRUNED") for k in statuses
    )
    status = "OPTIMAL" if exact else "FEASIBLE"
    summary = ", ".join(f"{k.lower()} {v}" for k, v in sorted(statuses.items()))
    notes.insert(
        0,
        f"{len(cands) + unexplored} candidates (dp x microbatches x schedule): {summary}"
        + (f", unexplored {unexplored}" if unexplored else "")
        + f"; best from {source}"
        + (f"; {memory_short} more cannot hold the model's state" if memory_short else ""),
    )
    if over_budget:
        notes.append(
            f"{over_budget} integer program(s) left to the warm start: their estimated solve time does not "
            f"fit {SOLVE_SHARE:.0%} of the {time_limit_s:g} s time limit (a larger limit solves them)"
        )
    if budget.fired:
        notes.append(budget.note())
    unsized = cost.graph.unsized_shared_names()
    if unsized:
        notes.append(
            f"the graph gives no parameter sizes (schema 1 or hand-built): {len(unsized)} names read by "
            f"several nodes ({', '.join(unsized[:3])}{', ...' if len(unsized) > 3 else ''}) are counted once, "
            "in the stage of their first reader; a stage that reads a parameter holds a copy of it, so "
            "re-trace the model with this distplan to price those copies"
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


def _forced_copies(cost: CostModel, biggest: int) -> list[tuple[SharedParam, int]]:
    """Shared parameters that no single stage can hold with all their readers (nodes first..last of them
    need more than the largest device with one sample in flight): every layout holds them at least twice.
    Each comes with that one-stage need."""
    out = []
    for sp in cost.shared:
        together = cost.stage_memory(sp.positions[0], sp.positions[-1] + 1, microbatch=1, inflight=1)
        if together > biggest:
            out.append((sp, together))
    return out


def _copies_text(cost: CostModel, forced: Sequence[tuple[SharedParam, int]], biggest: int) -> str:
    nodes = cost.graph.nodes
    parts = []
    for sp, together in forced:
        where = " and ".join(f"{p} ({nodes[p].name})" for p in sp.positions[:3])
        more = f" and {len(sp.positions) - 3} more" if len(sp.positions) > 3 else ""
        parts.append(
            f"{', '.join(sp.names)} ({format_bytes(sp.nbytes)}; {format_bytes(cost.state_bytes(sp.nbytes))} "
            f"with gradients and optimizer state) is read by nodes {where}{more}: one stage holding all of them "
            f"needs at least {format_bytes(together)} (largest device {format_bytes(biggest)}), so at least two "
            "stages hold a copy"
        )
    return "; ".join(parts)


def _why_infeasible(cost: CostModel, cluster: Cluster, blocks: Blocks, global_batch: int) -> str:
    """The smallest shortfall: every device filled to capacity, one sample in flight per stage, and a second
    copy of every shared parameter no single stage can hold with its readers."""
    biggest = max(k.usable_memory_bytes for k in cluster.kinds.values())
    forced = _forced_copies(cost, biggest)
    copies = sum(cost.state_bytes(sp.nbytes) for sp, _ in forced)
    need = cost.state_bytes(int(cost.param_prefix[-1])) + float(cost.act_prefix[-1]) + copies
    have = cluster.total_memory_bytes()
    msg = (
        f"no layout of {cost.graph.name!r} fits cluster {cluster.name!r}: parameters, gradients, optimizer "
        f"state and one sample's activations need at least {format_bytes(need)}"
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


def plan(
    graph: OpGraph,
    request: PlanRequest | None = None,
    /,
    *,
    progress: Callable[[SolverProgress], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    **fields: Any,
) -> Plan:
    """The fastest plan the search finds for ``graph`` under ``request`` (checked, deterministic).

    ``request`` is the :class:`~distplan.request.PlanRequest` a door built (see [Note: the request spine]
    in ``distplan.request``); from Python, its fields may be given as keywords instead
    (``plan(graph, cluster="a100x4-t4x4", global_batch=64)``).

    Decides the stages (contiguous node ranges at block boundaries), each stage's group of ``dp``
    same-kind devices on one host, the data-parallel degree, the microbatch count and, unless given, the
    schedule (1F1B or GPipe), minimising the cost model's iteration time under every device's memory.

    The plan's ``solver`` report carries status, objective, bound, gap and seconds; ``baselines`` maps
    each baseline's name to its predicted iteration time (None where it does not fit).

    ``request.time_limit_s`` bounds the whole call's wall time (baselines, warm starts, bounds, integer
    programs); the answer is decided by deterministic work limits sized well inside it, so the same request
    gives the same plan and report on a quiet or a busy machine. Only if the machine is so slow that the
    limit is reached does the search stop early, and the report's notes say so (see [Note: determinism]).
    ``progress``: called with the solver's progress. ``clock``: the wall clock the limit is measured on
    (tests script it). A cluster with calibrations (``distplan profile``) is priced with its measured
    figures; ``request.matmul_precision`` is priced here and set by the lowering.

    Raises:
        PlanError: an invalid request (naming the field) or an empty graph.
        InfeasiblePlanError: no layout fits (naming the memory that is short, and by how much).

        >>> from distplan.planner.synthetic import synthetic_transformer
        >>> g = synthetic_transformer(layers=4, hidden=512, heads=8, seq=256, vocab=1000)
        >>> p = plan(g, cluster="a100x4-t4x4", global_batch=8, time_limit_s=2)
        >>> p.check(g)
    """
    from .baselines import baseline_layouts

    req = as_request(request, **fields)
    budget = Budget(req.time_limit_s, clock=clock)
    if not graph.nodes:
        raise PlanError(f"graph {graph.name!r} has no nodes")
    c = req.cluster
    global_batch, microbatches, schedule = req.global_batch, req.microbatches, req.schedule
    cost = CostModel(
        graph, c, dtype=req.dtype, optimizer=req.optimizer, matmul_precision=req.matmul_precision
    )
    base = (
        baseline_layouts(
            graph,
            cost,
            global_batch=global_batch,
            microbatches=microbatches,
            schedule=schedule,
            stop=lambda: budget.expired("the baselines"),
        )
        if req.baselines
        else {}
    )
    extra = [(name, b.stages, b.candidate) for name, b in base.items() if b is not None]
    res = search(
        graph,
        cost,
        global_batch=global_batch,
        microbatches=microbatches,
        schedule=schedule,
        time_limit_s=req.time_limit_s,
        workers=req.workers,
        progress=progress,
        extra=extra,
        budget=budget,
    )
    cand = res.candidate
    return build_plan(
        graph,
        cost,
        req,
        res.stages,
        schedule=cand.schedule,
        microbatches=cand.microbatches,
        microbatch_size=cand.microbatch_size,
        solver=res.report,
        baselines={name: (None if b is None else b.iteration_time_s) for name, b in base.items()},
    )
