"""The allocation integer program: which job runs on which device-set shape, solved with OR-Tools CP-SAT.

All data arrive in one :class:`AllocationProblem` (built by the distplan policy, ``distplan.scheduler.policy``;
the values are already priced there). Sets: jobs ``j`` (waiting and running), bins ``b`` (the devices of one
kind on one host, capacity ``C_b``), pools ``P`` (interchangeable bins), the divisible chain of piece sizes
``p = 1, 2, 4, ...`` (see [Note: pools, bins and shapes] in ``distplan.scheduler.shapes``).

Variables:
  ``x[j, o]``   job ``j`` starts (or restarts) on option ``o``: ``hosts_o`` pieces of ``per_host_o`` devices
                on bins of pool ``P_o``
  ``keep[j]``   running job ``j`` stays on its devices with its plan (no restart)
  ``y[k]``      pair ``k = (a, b, P)``: jobs ``a`` and ``b`` (re)start together on one new device of ``P``
  ``z[k]``      join ``k = (j, r)``: job ``j`` (re)starts on the device of running one-device job ``r``,
                which stays
  ``pin[s]``, ``both[s]``  running co-located pair ``s = (a, b)`` on bin ``b_s``: its device stays held,
                both members stay together
  ``q[b, p]``   whole pieces of size ``p`` that still fit bin ``b`` (integer; constants for bins no running
                job holds)

Constraints:
  (a) one choice per job:   ``sum_o x[j,o] + keep[j] + sum_{k ∋ j} y[k] + sum_{k: joiner j} z[k] <= 1``
  (b) joins:                ``z[k] <= keep[r_k]``, ``sum_{k: host r} z[k] <= 1`` (two jobs per device at most)
  (c) running pairs:        ``pin[s] >= keep[a_s]``, ``pin[s] >= keep[b_s]``,
                            ``both[s] >= keep[a_s] + keep[b_s] - 1``, ``both[s] <= keep[a_s], keep[b_s]``
  (d) free devices:         ``F_b = C_b - sum_j U_jb keep[j] - sum_{s on b} pin[s]``,  ``p q[b,p] <= F_b``
                            (``U_jb``: devices of bin ``b`` running job ``j`` holds)
  (e) packing (divisible sizes, exact):  for every pool ``P`` and size ``p``:
                            ``sum_{o in P, per_host_o >= p} hosts_o per_host_o x[j,o] + [p = 1] sum_{k in P} y[k]
                              <= sum_{b in P} p q[b,p]``
  Device counts between each job's minimum and maximum, and co-location only where both jobs' memory fits
  the device, hold by construction: no other option or pair is given to the program.

Objective (``objective``):
  ``lexicographic``  levels ``l = 0, 1, ...`` in order (the policy puts priority classes there): maximise
                     ``V_l = sum v_l(var) var`` over the level's value terms, then fix ``V_l >= V_l*`` and go on.
  ``max-min``        maximise ``t`` with ``t <= f_j`` for every job (``f_j`` = its fairness score: the value
                     of its choice, ``f^wait_j`` if it waits), then fix ``t`` and maximise ``sum V_l``.
  ``min-max``        minimise ``t`` with ``t >= f_j`` (finish-time fairness), then fix ``t`` and maximise
                     ``sum V_l``.
  Values and scores are floats, scaled per solve to integers of at most ``VALUE_RESOLUTION``.

Solve: CP-SAT, one worker (its sequential search is deterministic), fixed seed, one deterministic work
budget for all stages (each stage gets what is left divided by the stages left; the wall-clock limit is only
a safety net). Each stage starts from a complete hint: the previous stage's solution (at first, every
running job staying), completed by ``_greedy`` (waiting jobs by level and value per device, packed for
real). Inside a stage the value of the later stages breaks ties (scaled to ``SECONDARY_RESOLUTION`` in all,
below one unit of the stage's own value), so a stage cut short by the budget does not stop later jobs for
nothing. Small programs are proven optimal (the brute-force tests); on large fragmented clusters the LP
relaxation is loose (``q[b, p]`` relaxes to ``F_b / p``, which ignores fragmentation), and the budget rather
than a proof ends the stages: the result is the best solution found, never worse than the hint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ortools.sat.python import cp_model

from .model import SchedulerError
from .shapes import power_counts

__all__ = [
    "OBJECTIVES",
    "AllocationProblem",
    "AllocationSolution",
    "BinSpec",
    "Choice",
    "JobEntry",
    "Join",
    "Keep",
    "Option",
    "Pair",
    "SharedKeep",
    "solve_allocation",
]

OBJECTIVES = ("lexicographic", "max-min", "min-max")
#: Largest integer coefficient of a scaled objective or score.
VALUE_RESOLUTION = 1_000_000
#: Least deterministic work a stage gets, whatever is left of the budget.
MIN_STAGE_WORK = 0.02
#: Total magnitude of a stage's tie-breaking (secondary) coefficients.
SECONDARY_RESOLUTION = 1_000


@dataclass(frozen=True, slots=True)
class BinSpec:
    """A bin: ``capacity`` devices of pool ``pool``."""

    pool: int
    capacity: int


@dataclass(frozen=True, slots=True)
class Option:
    """A new placement: ``hosts`` pieces of ``per_host`` devices on bins of ``pool``; ``value`` counts at the
    job's level; ``fair`` is the job's fairness score if chosen."""

    pool: int
    per_host: int
    hosts: int
    value: float
    fair: float = 0.0


@dataclass(frozen=True, slots=True)
class Keep:
    """A running job stays: it holds ``usage[b]`` devices of bin ``b`` (empty for a member of a running
    co-located pair, whose device :class:`SharedKeep` holds)."""

    usage: Mapping[int, int]
    value: float
    fair: float = 0.0


@dataclass(frozen=True, slots=True)
class JobEntry:
    """A job: its level (0 = decided first), its options, its keep (running jobs), its score if it waits."""

    level: int
    options: tuple[Option, ...] = ()
    keep: Keep | None = None
    wait_fair: float = 0.0


@dataclass(frozen=True, slots=True)
class Pair:
    """Jobs ``a`` and ``b`` share one new device of ``pool``; each gets its value and score."""

    a: int
    b: int
    pool: int
    value_a: float
    value_b: float
    fair_a: float = 0.0
    fair_b: float = 0.0


@dataclass(frozen=True, slots=True)
class Join:
    """Job ``job`` moves onto running one-device job ``host``'s device (``host`` keeps it and changes by
    ``delta_host`` in value and ``fair_delta_host`` in score)."""

    job: int
    host: int
    value_job: float
    delta_host: float
    fair_job: float = 0.0
    fair_delta_host: float = 0.0


@dataclass(frozen=True, slots=True)
class SharedKeep:
    """Running jobs ``a`` and ``b`` share one device of bin ``bin``; if both keep, they change by the deltas
    (the difference between sharing and running alone)."""

    a: int
    b: int
    bin: int
    delta_a: float
    delta_b: float
    fair_delta_a: float = 0.0
    fair_delta_b: float = 0.0


@dataclass(frozen=True, slots=True)
class AllocationProblem:
    """Everything the program needs (see the module docstring for the math).

    Attributes:
        bins: the cluster's bins (indices are referred to by :class:`Keep` and :class:`SharedKeep`).
        jobs: one entry per job.
        pairs / joins / shared: co-location terms.
        objective: one of :data:`OBJECTIVES`.
        deterministic_time: CP-SAT work limit of the whole solve, all stages together (deterministic
            seconds); each stage gets the unused budget divided by the stages left.
        time_limit_s: wall-clock safety net per solve.
        workers: CP-SAT workers.
        relative_gap: stop a solve once within this fraction of its bound (0: prove the optimum).
    """

    bins: tuple[BinSpec, ...]
    jobs: tuple[JobEntry, ...]
    pairs: tuple[Pair, ...] = ()
    joins: tuple[Join, ...] = ()
    shared: tuple[SharedKeep, ...] = ()
    objective: str = "lexicographic"
    deterministic_time: float = 2.0
    time_limit_s: float = 20.0
    workers: int = 1
    relative_gap: float = 0.0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise SchedulerError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        pools = {b.pool for b in self.bins}
        part = {p: power_counts(max(b.capacity for b in self.bins if b.pool == p))[-1] for p in pools}
        nj = len(self.jobs)
        for j, e in enumerate(self.jobs):
            for o in e.options:
                if o.pool not in pools:
                    raise SchedulerError(f"job {j}: option on unknown pool {o.pool}")
                if o.per_host not in power_counts(part[o.pool]) or o.hosts < 1:
                    raise SchedulerError(
                        f"job {j}: option of {o.hosts} x {o.per_host} devices is not a shape of pool {o.pool} "
                        f"(pieces are powers of two up to {part[o.pool]})"
                    )
                if o.hosts > 1 and o.per_host != part[o.pool]:
                    raise SchedulerError(
                        f"job {j}: a multi-host option must use {part[o.pool]} devices per host"
                    )
            if e.keep is not None:
                for b in e.keep.usage:
                    if not 0 <= b < len(self.bins):
                        raise SchedulerError(f"job {j}: keeps devices of unknown bin {b}")
        for pr in self.pairs:
            if not (0 <= pr.a < nj and 0 <= pr.b < nj) or pr.a == pr.b or pr.pool not in pools:
                raise SchedulerError(f"pair {pr}: bad jobs or pool")
        for jn in self.joins:
            if not (0 <= jn.job < nj and 0 <= jn.host < nj) or jn.job == jn.host:
                raise SchedulerError(f"join {jn}: bad jobs")
            if self.jobs[jn.host].keep is None:
                raise SchedulerError(f"join {jn}: job {jn.host} is not running")
        values = [
            v
            for e in self.jobs
            for v in (e.wait_fair, *(o.value for o in e.options), *(o.fair for o in e.options))
        ]
        values += [v for e in self.jobs if e.keep is not None for v in (e.keep.value, e.keep.fair)]
        values += [v for k in self.pairs for v in (k.value_a, k.value_b, k.fair_a, k.fair_b)]
        values += [v for k in self.joins for v in (k.value_job, k.delta_host, k.fair_job, k.fair_delta_host)]
        values += [v for k in self.shared for v in (k.delta_a, k.delta_b, k.fair_delta_a, k.fair_delta_b)]
        _check_finite(values, "allocation problem")
        for s in self.shared:
            if self.jobs[s.a].keep is None or self.jobs[s.b].keep is None or not 0 <= s.bin < len(self.bins):
                raise SchedulerError(f"running pair {s}: both jobs must be running, on a known bin")


@dataclass(frozen=True, slots=True)
class Choice:
    """What one job got: ``kind`` is ``wait``, ``keep``, ``option`` (``index`` into its options), ``pair`` or
    ``join`` (``index`` into the problem's pairs or joins)."""

    kind: str
    index: int = -1


@dataclass(frozen=True, slots=True)
class AllocationSolution:
    """The program's answer: a choice per job, each solve's status and objective, and the wall time."""

    choices: tuple[Choice, ...]
    statuses: tuple[str, ...]
    objectives: tuple[float, ...]
    seconds: float
    variables: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def optimal(self) -> bool:
        return all(s == "OPTIMAL" for s in self.statuses)


def _scale(values: Sequence[float]) -> float:
    biggest = max((abs(v) for v in values), default=0.0)
    return VALUE_RESOLUTION / biggest if biggest > 0 else 1.0


def _ints(values: Sequence[float], scale: float) -> list[int]:
    out = []
    for v in values:
        i = round(v * scale)
        # A positive value must stay attractive (and a negative one costly) after rounding.
        out.append(i if i or v == 0 else (1 if v > 0 else -1))
    return out


def solve_allocation(p: AllocationProblem) -> AllocationSolution:
    """Solve the program (see module docstring); deterministic for equal inputs."""
    t0 = time.perf_counter()
    model = cp_model.CpModel()
    nj = len(p.jobs)

    # Variables ----------------------------------------------------------------------------------------
    x = {
        (j, o): model.new_bool_var(f"x[{j},{o}]") for j, e in enumerate(p.jobs) for o in range(len(e.options))
    }
    keep = {j: model.new_bool_var(f"keep[{j}]") for j, e in enumerate(p.jobs) if e.keep is not None}
    y = [model.new_bool_var(f"y[{k}]") for k in range(len(p.pairs))]
    z = [model.new_bool_var(f"z[{k}]") for k in range(len(p.joins))]
    pin = [model.new_bool_var(f"pin[{s}]") for s in range(len(p.shared))]
    both = [model.new_bool_var(f"both[{s}]") for s in range(len(p.shared))]
    held: dict[int, list[tuple[int, Any]]] = {}  # bin -> (devices, var) held by running jobs that stay
    for j, e in enumerate(p.jobs):
        if e.keep is not None:
            for b, n in e.keep.usage.items():
                held.setdefault(b, []).append((n, keep[j]))
    for s, sk in enumerate(p.shared):
        held.setdefault(sk.bin, []).append((1, pin[s]))
    sizes = {
        pool: power_counts(max(b.capacity for b in p.bins if b.pool == pool))
        for pool in {b.pool for b in p.bins}
    }
    q: dict[tuple[int, int], Any] = {}
    for bi, spec in enumerate(p.bins):
        for size in sizes[spec.pool]:
            if size > spec.capacity:
                continue
            q[bi, size] = (
                model.new_int_var(0, spec.capacity // size, f"q[{bi},{size}]")
                if bi in held
                else spec.capacity // size
            )

    # Constraints --------------------------------------------------------------------------------------
    # (a) one choice per job
    mine: dict[int, list[Any]] = {j: [] for j in range(nj)}
    for (j, _o), v in x.items():
        mine[j].append(v)
    for j, v in keep.items():
        mine[j].append(v)
    for k, pr in enumerate(p.pairs):
        mine[pr.a].append(y[k])
        mine[pr.b].append(y[k])
    for k, jn in enumerate(p.joins):
        mine[jn.job].append(z[k])
    for vs in mine.values():
        if len(vs) > 1:
            model.add_at_most_one(vs)
    # (b) joins
    hosts: dict[int, list[Any]] = {}
    for k, jn in enumerate(p.joins):
        model.add_implication(z[k], keep[jn.host])
        hosts.setdefault(jn.host, []).append(z[k])
    for zs in hosts.values():
        if len(zs) > 1:
            model.add_at_most_one(zs)
    # (c) running pairs
    for s, sk in enumerate(p.shared):
        ka, kb = keep[sk.a], keep[sk.b]
        model.add_implication(ka, pin[s])
        model.add_implication(kb, pin[s])
        model.add_bool_or([ka.Not(), kb.Not(), both[s]])
        model.add_implication(both[s], ka)
        model.add_implication(both[s], kb)
    # (d) free devices, (e) packing
    for (bi, size), qv in q.items():
        if bi in held:
            hv = [v for _, v in held[bi]] + [qv]
            hc = [n for n, _ in held[bi]] + [size]
            model.add(cp_model.LinearExpr.weighted_sum(hv, hc) <= p.bins[bi].capacity)
    for pool, chain in sorted(sizes.items()):
        for size in chain:
            dv: list[Any] = []
            dc: list[int] = []
            for (j, o), v in x.items():
                opt = p.jobs[j].options[o]
                if opt.pool == pool and opt.per_host >= size:
                    dv.append(v)
                    dc.append(opt.hosts * opt.per_host)
            if size == 1:
                dv += [y[k] for k, pr in enumerate(p.pairs) if pr.pool == pool]
                dc += [1] * (len(dv) - len(dc))
            if not dv:
                continue
            const = 0
            sv: list[Any] = []
            for bi, spec in enumerate(p.bins):
                if spec.pool != pool or (bi, size) not in q:
                    continue
                if isinstance(q[bi, size], int):
                    const += size * q[bi, size]
                else:
                    sv.append(q[bi, size])
            supply = cp_model.LinearExpr.weighted_sum(sv, [size] * len(sv)) + const
            model.add(cp_model.LinearExpr.weighted_sum(dv, dc) <= supply)

    # Objective ----------------------------------------------------------------------------------------
    # Value terms as (level, var, value, job, own): ``own`` terms are the job's own value of a choice (at
    # most one is 1 per job, constraint (a)); the others are co-location deltas. Score terms: (job, var, score).
    terms: list[tuple[int, Any, float, int, bool]] = []
    fair: list[tuple[int, Any, float]] = []
    for (j, o), v in x.items():
        opt = p.jobs[j].options[o]
        terms.append((p.jobs[j].level, v, opt.value, j, True))
        fair.append((j, v, opt.fair - p.jobs[j].wait_fair))
    for j, v in keep.items():
        kp = p.jobs[j].keep
        assert kp is not None
        terms.append((p.jobs[j].level, v, kp.value, j, True))
        fair.append((j, v, kp.fair - p.jobs[j].wait_fair))
    for k, pr in enumerate(p.pairs):
        terms += [
            (p.jobs[pr.a].level, y[k], pr.value_a, pr.a, True),
            (p.jobs[pr.b].level, y[k], pr.value_b, pr.b, True),
        ]
        fair += [
            (pr.a, y[k], pr.fair_a - p.jobs[pr.a].wait_fair),
            (pr.b, y[k], pr.fair_b - p.jobs[pr.b].wait_fair),
        ]
    for k, jn in enumerate(p.joins):
        terms += [
            (p.jobs[jn.job].level, z[k], jn.value_job, jn.job, True),
            (p.jobs[jn.host].level, z[k], jn.delta_host, jn.host, False),
        ]
        fair += [(jn.job, z[k], jn.fair_job - p.jobs[jn.job].wait_fair), (jn.host, z[k], jn.fair_delta_host)]
    for s, sk in enumerate(p.shared):
        terms += [
            (p.jobs[sk.a].level, both[s], sk.delta_a, sk.a, False),
            (p.jobs[sk.b].level, both[s], sk.delta_b, sk.b, False),
        ]
        fair += [(sk.a, both[s], sk.fair_delta_a), (sk.b, both[s], sk.fair_delta_b)]
    levels = sorted({t[0] for t in terms})

    def level_expr(lvs: Sequence[int], total: float | None = None) -> tuple[Any, int]:
        """The value of levels ``lvs`` as an integer expression: scaled so the largest coefficient is
        ``VALUE_RESOLUTION`` or, given ``total``, so the coefficients' magnitudes add up to about it."""
        mine = [t for t in terms if t[0] in lvs]
        vals = [t[2] for t in mine]
        scale = _scale(vals) if total is None else total / max(sum(abs(x) for x in vals), 1e-300)
        return cp_model.LinearExpr.weighted_sum([t[1] for t in mine], _ints(vals, scale)), len(mine)

    def level_bound(lv: int) -> tuple[list[Any], list[int], int]:
        """Level ``lv``'s integer terms and an upper bound of its value: each job's best own term
        (deltas are never positive)."""
        mine = [t for t in terms if t[0] == lv]
        coefs = _ints([t[2] for t in mine], _scale([t[2] for t in mine]))
        best: dict[int, int] = {}
        for t, c in zip(mine, coefs, strict=True):
            if t[4]:
                best[t[3]] = max(best.get(t[3], 0), c)
        return [t[1] for t in mine], coefs, sum(best.values())

    # Each stage: (sense, primary, secondary). The primary is optimised and then fixed; the secondary, the
    # value of everything decided later, breaks ties inside the stage (scaled below one unit of the
    # primary), so a solve stopped by its work limit does not disturb the jobs of later stages for nothing.
    stages: list[tuple[str, Any, Any, int]] = []
    bounds: list[tuple[list[Any], list[int], int] | None] = []
    if p.objective == "lexicographic":
        for i, lv in enumerate(levels):
            primary, _ = level_expr([lv])
            bounds.append(level_bound(lv))
            rest = levels[i + 1 :]
            if rest:
                secondary, n = level_expr(rest, SECONDARY_RESOLUTION)
                stages.append(("max", primary, secondary, SECONDARY_RESOLUTION + n + 1))
            else:
                stages.append(("max", primary, None, 0))
    else:
        scores = [f for _, _, f in fair] + [e.wait_fair for e in p.jobs]
        sc = _scale(scores)
        hi = VALUE_RESOLUTION * (1 + len(p.jobs))
        t = model.new_int_var(-hi, hi, "t")
        by_job: dict[int, list[tuple[Any, float]]] = {j: [] for j in range(nj)}
        for j, v, f in fair:
            by_job[j].append((v, f))
        for j, e in enumerate(p.jobs):
            expr = round(e.wait_fair * sc) + cp_model.LinearExpr.weighted_sum(
                [v for v, _ in by_job[j]], _ints([f for _, f in by_job[j]], sc)
            )
            if p.objective == "max-min":
                model.add(t <= expr)
            else:
                model.add(t >= expr)
        secondary, n = level_expr(levels, SECONDARY_RESOLUTION)
        sense = "max" if p.objective == "max-min" else "min"
        bounds = [None, None]
        stages = [
            (sense, t, secondary, SECONDARY_RESOLUTION + n + 1),
            ("max", level_expr(levels)[0], None, 0),
        ]

    # Solve --------------------------------------------------------------------------------------------
    statuses: list[str] = []
    objectives: list[float] = []
    notes: list[str] = []
    solver = cp_model.CpSolver()
    prm = solver.parameters
    prm.num_workers = max(1, p.workers)
    prm.random_seed = 0
    # CP-SAT's own Ctrl-C handler is installed for each solve and reset to the default action afterwards
    # (OR-Tools 9.15): a SIGINT after any solve then killed the process outright -- the service lost its
    # graceful shutdown, the CLI its "interrupted". The caller's handlers stay in charge instead.
    prm.catch_sigint_signal = False
    if p.workers > 1:
        # A deterministic portfolio whatever the worker count (as the planner's stage program).
        prm.interleave_search = True
        prm.interleave_batch_size = p.workers
    # One worker: CP-SAT's single sequential search, deterministic by itself. Measured on a 246-job,
    # 1,024-GPU snapshot: 1.2 s to the proven optimum, against 7-12 s when the same single thread
    # interleaves the whole portfolio (the LP subsolver that closes the gap gets a turn only every few
    # hundred milliseconds).
    prm.max_time_in_seconds = p.time_limit_s
    prm.relative_gap_limit = p.relative_gap

    def assignment(choices: Sequence[Choice]) -> dict[Any, int]:
        kept = {j for j, c in enumerate(choices) if c.kind == "keep"}
        out: dict[Any, int] = {}
        for (j, o), v in x.items():
            out[v] = int(choices[j] == Choice("option", o))
        for j, v in keep.items():
            out[v] = int(j in kept)
        for k in range(len(p.pairs)):
            out[y[k]] = int(choices[p.pairs[k].a] == Choice("pair", k))
        for k in range(len(p.joins)):
            out[z[k]] = int(choices[p.joins[k].job] == Choice("join", k))
        for s_, sk in enumerate(p.shared):
            out[pin[s_]] = int(sk.a in kept or sk.b in kept)
            out[both[s_]] = int(sk.a in kept and sk.b in kept)
        free = _held_free(p, choices)
        for (bi, size), qv in q.items():
            if not isinstance(qv, int):
                out[qv] = free[bi] // size
        return out

    def hint(values: Mapping[Any, int]) -> None:
        # A complete hint, so CP-SAT starts from a solution instead of searching for one.
        model.clear_hints()
        for v, val in values.items():
            model.add_hint(v, val)

    # Every running job staying is a solution; each stage starts from the previous stage's solution,
    # completed greedily (``_greedy``), and only improves on it.
    choices = [Choice("keep") if e.keep is not None else Choice("wait") for e in p.jobs]
    solved = False
    budget = p.deterministic_time
    for i, (sense, primary, secondary, weight) in enumerate(stages):
        start = _greedy(p, choices)
        values = assignment(start)
        bound = bounds[i]
        if bound is not None:
            got = sum(c * values[v] for v, c in zip(bound[0], bound[1], strict=True))
            if got >= bound[2]:
                # The hint reaches the level's upper bound: optimal without a solve (typical of the aged
                # levels, one job each, and of an uncontended high level).
                statuses.append("OPTIMAL")
                objectives.append(float(got))
                choices = start
                solved = True
                model.add(primary >= got)
                continue
        prm.max_deterministic_time = max(MIN_STAGE_WORK, budget / (len(stages) - i))
        hint(values)
        model.clear_objective()
        sign = 1 if sense == "max" else -1
        objective = primary if secondary is None else weight * primary + sign * secondary
        if sense == "max":
            model.maximize(objective)
        else:
            model.minimize(objective)
        status = solver.solve(model)
        budget -= solver.response_proto.deterministic_time
        name = solver.status_name(status)
        statuses.append(name)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            notes.append(f"a solve ended {name}; the previous solution stands")
            break
        best = int(solver.value(primary))
        objectives.append(float(best))
        choices = _decode(
            p,
            {k: solver.value(v) for k, v in x.items()},
            {j: solver.value(v) for j, v in keep.items()},
            [solver.value(v) for v in y],
            [solver.value(v) for v in z],
        )
        solved = True
        if solver.wall_time >= p.time_limit_s * 0.98:
            notes.append("a solve stopped at the wall-clock safety limit")
        # Fix this stage; the next one starts from its solution.
        if sense == "max":
            model.add(primary >= best)
        else:
            model.add(primary <= best)
    # Whatever the last stage reached (a stage may end without a solution when the budget is spent), devices
    # left idle go to waiting jobs that fit them: values are positive, so no level's value falls. (Not under
    # the fairness objectives, where a job's score alone decides whether running it helps.)
    if p.objective == "lexicographic":
        choices = _greedy(p, choices)
    if not solved:
        raise SchedulerError(
            f"the allocation program found no solution ({', '.join(statuses)}); every running job staying "
            "should always be one -- report this"
        )
    all_vars = list(x.values()) + list(keep.values()) + y + z + pin + both
    return AllocationSolution(
        choices=tuple(choices),
        statuses=tuple(statuses),
        objectives=tuple(objectives),
        seconds=time.perf_counter() - t0,
        variables=len(all_vars) + sum(1 for v in q.values() if not isinstance(v, int)),
        notes=tuple(notes),
    )


def _decode(
    p: AllocationProblem,
    xs: Mapping[tuple[int, int], int],
    keeps: Mapping[int, int],
    ys: Sequence[int],
    zs: Sequence[int],
) -> list[Choice]:
    choices = [Choice("wait")] * len(p.jobs)
    for (j, o), val in xs.items():
        if val:
            choices[j] = Choice("option", o)
    for j, val in keeps.items():
        if val:
            choices[j] = Choice("keep")
    for k, pr in enumerate(p.pairs):
        if ys[k]:
            choices[pr.a] = choices[pr.b] = Choice("pair", k)
    for k, jn in enumerate(p.joins):
        if zs[k]:
            choices[jn.job] = Choice("join", k)
    return choices


def _held_free(p: AllocationProblem, choices: Sequence[Choice]) -> list[int]:
    """Devices per bin not held by running jobs that stay (the ``F_b`` of constraint (d))."""
    free = [b.capacity for b in p.bins]
    kept = {j for j, c in enumerate(choices) if c.kind == "keep"}
    for j in kept:
        keep = p.jobs[j].keep
        assert keep is not None
        for b, n in keep.usage.items():
            free[b] -= n
    for sk in p.shared:
        if sk.a in kept or sk.b in kept:
            free[sk.bin] -= 1
    return free


def _greedy(p: AllocationProblem, start: Sequence[Choice]) -> list[Choice]:
    """``start`` (a solution) completed greedily: waiting jobs take options by level, then by value per
    device, on the bins that fit them best -- a real packing, so the result satisfies (e). It only adds
    jobs, so no level's value falls below what ``start`` achieved (values are positive)."""
    choices = list(start)
    free = _held_free(p, choices)
    bins_of: dict[int, list[int]] = {}
    for bi, spec in enumerate(p.bins):
        bins_of.setdefault(spec.pool, []).append(bi)

    def place(pool: int, piece: int, hosts: int) -> bool:
        fit = sorted((free[b], b) for b in bins_of[pool] if free[b] >= piece)
        if len(fit) < hosts:
            return False
        for _, b in fit[:hosts]:
            free[b] -= piece
        return True

    items: list[tuple[int, int, int, int]] = []  # (-piece, pool, hosts, job)
    for j, c in enumerate(choices):
        if c.kind == "option":
            o = p.jobs[j].options[c.index]
            items.append((-o.per_host, o.pool, o.hosts, j))
        elif c.kind == "pair" and p.pairs[c.index].a == j:
            items.append((-1, p.pairs[c.index].pool, 1, j))
    for neg, pool, hosts, j in sorted(items):
        # Largest pieces first always fit a solution of the program (see [Note: pools, bins and shapes]).
        if not place(pool, -neg, hosts):
            raise SchedulerError(f"job {j}'s choice in an allocation solution does not pack -- report this")
    # Running jobs a stage left waiting stay where they are if their devices are still free (free for
    # them, and worth their keep value); members of running pairs only when their partner left.
    partner = {sk.a: sk for sk in p.shared} | {sk.b: sk for sk in p.shared}
    for j, c in enumerate(choices):
        keep = p.jobs[j].keep
        if c.kind != "wait" or keep is None:
            continue
        usage = dict(keep.usage)
        if j in partner:
            sk = partner[j]
            if choices[sk.b if j == sk.a else sk.a].kind == "keep":
                continue
            usage = {sk.bin: 1}
        if all(free[b] >= n for b, n in usage.items()):
            for b, n in usage.items():
                free[b] -= n
            choices[j] = Choice("keep")
    cands = sorted(
        (p.jobs[j].level, -o.value / (o.per_host * o.hosts), j, oi)
        for j, c in enumerate(choices)
        if c.kind == "wait"
        for oi, o in enumerate(p.jobs[j].options)
        if o.value > 0
    )
    for _, _, j, oi in cands:
        o = p.jobs[j].options[oi]
        if choices[j].kind == "wait" and place(o.pool, o.per_host, o.hosts):
            choices[j] = Choice("option", oi)
    return choices


def lexicographic_values(p: AllocationProblem, choices: Sequence[Choice]) -> tuple[float, ...] | None:
    """The per-level objective values (floats) of a choice vector, or None if it breaks a constraint other
    than packing (a mirror of the model for tests: packing is checked by the caller on real bins)."""
    kept = {j for j, c in enumerate(choices) if c.kind == "keep"}
    for k, jn in enumerate(p.joins):
        if choices[jn.job] == Choice("join", k) and jn.host not in kept:
            return None
    hosts = [jn.host for k, jn in enumerate(p.joins) if choices[jn.job] == Choice("join", k)]
    if len(hosts) != len(set(hosts)):
        return None
    for j, c in enumerate(choices):
        if c.kind == "keep" and p.jobs[j].keep is None:
            return None
        if c.kind == "pair" and j not in (p.pairs[c.index].a, p.pairs[c.index].b):
            return None
        if c.kind == "pair":
            pr = p.pairs[c.index]
            if choices[pr.a] != c or choices[pr.b] != c:
                return None
    levels = sorted({e.level for e in p.jobs})
    total = dict.fromkeys(levels, 0.0)
    for j, c in enumerate(choices):
        e = p.jobs[j]
        if c.kind == "option":
            total[e.level] += e.options[c.index].value
        elif c.kind == "keep":
            assert e.keep is not None
            total[e.level] += e.keep.value
        elif c.kind == "pair":
            pr = p.pairs[c.index]
            total[e.level] += pr.value_a if j == pr.a else pr.value_b
        elif c.kind == "join":
            jn = p.joins[c.index]
            total[e.level] += jn.value_job
            total[p.jobs[jn.host].level] += jn.delta_host
    for sk in p.shared:
        if choices[sk.a].kind == "keep" and choices[sk.b].kind == "keep":
            total[p.jobs[sk.a].level] += sk.delta_a
            total[p.jobs[sk.b].level] += sk.delta_b
    return tuple(total[lv] for lv in levels)


def _check_finite(values: Sequence[float], what: str) -> None:
    for v in values:
        if not math.isfinite(v):
            raise SchedulerError(f"{what}: non-finite value {v}")
