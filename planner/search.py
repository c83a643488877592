"""The planner's outer search over candidates (microbatch count ``M`` x schedule;
:mod:`~distplan.planner.candidates`).

For every candidate: build the integer data (:func:`~distplan.planner.problem.build_problem`: every way a
stage may run on every pool), compute a greedy warm start (:func:`~distplan.planner.warmstart.greedy`: stage
shapes per pool, every order of the device kinds, hosts kept together, binary search on the bottleneck) and
a lower bound (:func:`~distplan.planner.bounds.lower_bound`: the smallest bottleneck any layout can have,
and an LP relaxation). The three best warm starts get a local search
(:func:`~distplan.planner.warmstart.improve`); the weakest bounds are then tightened by the fill relaxation
(:func:`~distplan.planner.bounds.fill_bound`, ``FILL_ROUNDS`` of them, where its walk is small enough). Then, most promising first, up to ``MAX_SOLVES`` candidates whose bound can still beat the incumbent go to CP-SAT
(``ilp.solve_stage_problem``) with the warm start as hint, as many as fit the time limit's share for
solving (see [Note: determinism]), unless the incumbent is already within ``GAP_TOLERANCE``. The best
layout under the cost model wins (the baselines' layouts compete too); the reported bound is the smallest
bound over all candidates, so the gap is honest even where a candidate was not solved. What each candidate
came to is counted by :class:`Outcome` in the report's first note.

[Note: where CP-SAT helps]
Measured on this 2-core machine: the integer program proves optimality in well under a second up to a few
hundred (stage slots x blocks), e.g. every brute-force test and 2-4 stage plans on 16-GPU clusters; at
Llama-7B x 64 GPUs (64 slots x 160 blocks) it finds nothing better than the warm start within 10 s and
its own LP bound is far below the fluid bound. Models larger than ``LARGE_MODEL`` slots x blocks are
therefore left to the warm start + local search, and their gap comes from the relaxations.

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
  the best found so far (candidates whose integer data was not built count with bound 0, the others with
  at least their pooled bound, ``bounds.pooled_bound``, so the gap stays honest), and the
  report's notes say where the limit was reached.
- CP-SAT's ``core`` subsolver is left out: in OR-Tools 9.15 it ignored the deterministic limit inside
  interleaved search (a 6-block, 4-stage model proved optimal by another worker in 0.04 s ran until the
  wall clock stopped it, 5-20 s; compare google/or-tools#3958), which made time limits late and plans
  load-dependent.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from distplan.errors import InfeasiblePlanError, PlanError
from distplan.graph import OpGraph
from distplan.limits import check_cluster_figures
from distplan.plan import SolverReport

from .bounds import INFEASIBLE_BOUND, Relaxation, fill_bound, lower_bound, min_bottleneck, pooled_bound
from .candidates import Candidate, PlanSpace, candidate_microbatches, device_pools
from .coarsen import coarsen
from .cost import CostModel, IterationCost
from .diagnose import infeasible_reason, precheck
from .evaluate import StageSpec, layout_cost
from .ilp import SolverProgress, StageProblem, StageSlot, StageSolution, solve_stage_problem
from .problem import CandidateProblem, build_problem, for_schedule, stage_specs
from .warmstart import WarmStart, greedy, improve

__all__ = [
    "Budget",
    "ExtraLayout",
    "Outcome",
    "SearchResult",
    "search",
]

#: Warm starts refined by local search (the best by their greedy value).
IMPROVE_TOP = 3
#: At most this many integer programs per plan; the other candidates keep their greedy solution and bound.
MAX_SOLVES = 4
#: Stage slots x blocks up to which every candidate is solved (outside the MAX_SOLVES budget).
TINY_MODEL = 64
#: ... with at most this many stage options (CP-SAT's presolve alone took seconds on 144).
TINY_OPTIONS = 64
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
#: constraints and per-option constraints (stage slots x block boundaries x (arrays + options)), plus
#: ``SOLVE_S_PER_VALUE_DET`` per value and deterministic second of search: fitted on this 2-core machine
#: under its usual load (load average 3-6) to solves from 2 stages x 28 blocks x 144 options to 8 stages x
#: 160 blocks x 42 options, 2 workers (measured 0.15-0.6 ms per value at 0.1 deterministic seconds:
#: CP-SAT's interleaved workers load the model for every task, so the model's size dominates; presolve alone
#: took 1.4 s on the smallest). In practice this leaves CP-SAT the small problems, where it proves optima.
SOLVE_S_PER_ELEMENT_VALUE = 3e-4
SOLVE_S_PER_VALUE_DET = 3e-3
#: Fraction of ``time_limit_s`` kept back from the last solve's wall-clock cap for building the plan.
FINISH_RESERVE = 0.05
#: Integer programs are skipped once the incumbent is provably within this fraction of the optimum.
GAP_TOLERANCE = 0.005
#: Candidates whose bound the fill relaxation tightens (weakest first), its finest grid of bottlenecks, and
#: the work all its rounds may do together: ``FILL_SHARE`` of ``time_limit_s`` at ``FILL_S_PER_WORK`` seconds
#: per ``bounds.Relaxation.fill_work`` unit (measured 3 ns here; a loaded machine's margin included), at least
#: ``FILL_BUDGET``. A candidate whose finest grid does not fit what is left gets a coarser one (down to one
#: cell), so large models get a fill bound too (a deterministic amount of work: the limit alone decides).
FILL_ROUNDS = 12
FILL_CELLS = 6
FILL_BUDGET = 5e7
FILL_SHARE = 0.15
FILL_S_PER_WORK = 5e-9


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


class Outcome(enum.Enum):
    """What became of one candidate in the search (counted in the report's first note)."""

    OPTIMAL = "OPTIMAL"  #: CP-SAT proved its optimum
    FEASIBLE = "FEASIBLE"  #: CP-SAT found a solution but did not prove it optimal
    INFEASIBLE = "INFEASIBLE"  #: CP-SAT proved that no layout fits
    UNKNOWN = "UNKNOWN"  #: CP-SAT stopped before finding anything
    MODEL_INVALID = "MODEL_INVALID"  #: CP-SAT refused the model (a bug)
    LP_INFEASIBLE = "LP_INFEASIBLE"  #: the relaxations prove that no layout fits memory
    WITHIN_GAP = "WITHIN_GAP"  #: not solved: the incumbent is already within GAP_TOLERANCE of every bound
    PRUNED = "PRUNED"  #: not solved: its bound cannot beat the incumbent
    NOT_SOLVED = "NOT_SOLVED"  #: not solved: outside the solve budget, or the time limit was reached
    TOO_LARGE = "TOO_LARGE"  #: not solved: above LARGE_MODEL (see [Note: where CP-SAT helps])
    NO_SEARCH_LAYOUT = "NO_SEARCH_LAYOUT"  #: the search found nothing; a baseline's layout is the plan

    @property
    def exact(self) -> bool:
        """Whether the candidate's optimum is known (proved, or proved not to matter)."""
        return self in (Outcome.OPTIMAL, Outcome.INFEASIBLE, Outcome.LP_INFEASIBLE, Outcome.PRUNED)


@dataclass(frozen=True, slots=True)
class ExtraLayout:
    """A fixed layout that competes with the search's (a baseline): its name, stages and candidate."""

    name: str
    stages: tuple[StageSpec, ...]
    candidate: Candidate


@dataclass(frozen=True, slots=True)
class SearchResult:
    """The best layout found, its candidate, costs and the solver's account."""

    stages: tuple[StageSpec, ...]
    candidate: Candidate
    iteration: IterationCost
    report: SolverReport


@dataclass(frozen=True, slots=True)
class _CandidateState:
    """One candidate during the search: its integer data (with the pools and configurations behind it), its
    best lower bound (integer units; ``INFEASIBLE_BOUND`` when proved infeasible) and its warm start (None if
    the greedy found none)."""

    candidate: Candidate
    data: CandidateProblem
    bound: int
    warm: WarmStart | None

    @property
    def problem(self) -> StageProblem:
        return self.data.problem

    @property
    def bound_s(self) -> float:
        return self.bound * self.problem.time_unit_s

    @property
    def size(self) -> int:
        """Stage slots x blocks: what makes its integer program hard."""
        return self.problem.max_stages * self.problem.num_blocks


@dataclass(frozen=True, slots=True)
class _Incumbent:
    """The best layout so far: its iteration time, stages, candidate, costs and where it came from
    (``greedy``, ``cp-sat`` or a baseline's name)."""

    time_s: float
    stages: tuple[StageSpec, ...]
    candidate: Candidate
    iteration: IterationCost
    source: str


def _solve_estimate_s(p: StageProblem, deterministic_s: float) -> float:
    """Estimated wall seconds to build and solve ``p`` with a deterministic limit of ``deterministic_s``
    (see ``SOLVE_S_PER_ELEMENT_VALUE``): CP-SAT's time here goes into its element constraints, one per stage
    slot and prefix array, each expanded into one literal per block boundary, and into the per-option
    constraints on them."""
    arrays = (
        len(p.fwd_prefix) * (2 if p.schedule == "gpipe" else 1)
        + len(p.transfers)
        + len(p.ar_prefix)
        + len(p.mem_prefix)
        + len(p.act_prefix)
        + len(p.shared)
    )
    values = p.max_stages * (p.num_blocks + 1) * (arrays + len(p.options))
    return values * (SOLVE_S_PER_ELEMENT_VALUE + deterministic_s * SOLVE_S_PER_VALUE_DET)


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
    extra: Sequence[ExtraLayout] = (),
    budget: Budget | None = None,
    space: PlanSpace | None = None,
) -> SearchResult:
    """Find the best layout over all candidates (see module docstring). ``extra`` layouts (e.g. the
    baselines) compete too, so the result is never worse than any of them. ``budget``: the wall-clock
    budget of the whole planning call (by default ``time_limit_s`` from now; see [Note: determinism]).
    ``space``: what a stage may be (the request's tensor parallelism, recomputation and sharding; default:
    everything).

    Raises:
        InfeasiblePlanError: no layout fits memory (naming what is short and by how much).
        PlanError: no microbatch count divides the batch, or the time limit ran out before any layout was
            found.
    """
    budget = budget or Budget(time_limit_s)
    cluster = cost.cluster
    check_cluster_figures(cluster, dtype=cost.dtype)
    blocks = coarsen(graph, max_blocks=max_blocks)
    space = space or PlanSpace()
    precheck(cost, cluster, blocks, space)

    def infeasible() -> InfeasiblePlanError:
        return InfeasiblePlanError(
            infeasible_reason(
                cost,
                cluster,
                blocks,
                global_batch=global_batch,
                microbatches=microbatches,
                schedule=schedule,
                space=space,
            )
        )

    # The schedule is a decision too: 1F1B holds fewer activations, but its steady state carries each
    # stage's round trip, which GPipe overlaps (see cost.py).
    scheds = [schedule] if schedule else ["1f1b", "gpipe"]
    pools = device_pools(cluster)
    cands: list[_CandidateState] = []
    unexplored = 0  # candidates the wall-clock limit left out (their bound is unknown: 0)
    unexplored_bounds = 0  # candidates whose bound the wall-clock limit left out
    counts = candidate_microbatches(
        global_batch,
        max_stages=min(blocks.num_blocks, cluster.num_devices),
        fixed=microbatches,
        typical_stages=min(blocks.num_blocks, len(pools.pools)),
    )
    built: dict[int, CandidateProblem] = {}  # by microbatch: both schedules share the arrays
    for m, sched in itertools.product(counts, scheds):
        if budget.expired("the integer data of the candidates"):
            unexplored += 1
            continue
        cand = Candidate(m, global_batch // m, sched)
        if cand.microbatch in built:
            data = for_schedule(built[cand.microbatch], cand)
        else:
            data = built[cand.microbatch] = build_problem(cost, blocks, cand, space, pools)
        # Every candidate built has a bound from the start (a fraction of a second), so a time limit that
        # stops the search before its relaxations still reports an honest gap, not 100%.
        cands.append(_CandidateState(cand, data, pooled_bound(data.problem), None))
    for i, st in enumerate(cands):
        if budget.expired("the warm starts of the candidates"):
            break
        cands[i] = replace(st, warm=greedy(st.problem))
    if not cands and not unexplored:
        raise PlanError(
            f"no microbatch count divides global_batch {global_batch}"
            + (f" into {microbatches} microbatches" if microbatches else "")
        )

    def seconds(c: Candidate, stages: Sequence[StageSpec]) -> IterationCost:
        _, total, bubble = layout_cost(
            cost, stages, schedule=c.schedule, microbatches=c.microbatches, microbatch=c.microbatch
        )
        return IterationCost(total, bubble)

    def layout(st: _CandidateState, slots: Sequence[StageSlot]) -> tuple[StageSpec, ...]:
        return tuple(stage_specs(st.data, slots, blocks))

    # Local search on the few most promising warm starts (it costs ~0.1-1 s each on 64 GPUs).
    first = sorted(
        (i for i, c in enumerate(cands) if c.warm is not None),
        key=lambda i: (cands[i].warm.objective * cands[i].problem.time_unit_s, i),  # type: ignore[union-attr]
    )
    for i in first[:IMPROVE_TOP]:
        if budget.expired("the local search"):
            break
        st = cands[i]
        assert st.warm is not None
        cands[i] = replace(st, warm=improve(st.problem, st.warm))
    best: _Incumbent | None = None
    greedy_s: dict[int, float] = {}
    for i, st in enumerate(cands):
        if st.warm is None:
            greedy_s[i] = math.inf
            continue
        specs = layout(st, st.warm.stages)
        it = seconds(st.candidate, specs)
        greedy_s[i] = it.iteration_time_s
        if best is None or it.iteration_time_s < best.time_s:
            best = _Incumbent(it.iteration_time_s, specs, st.candidate, it, "greedy")

    # Bounds, most promising candidate first: one that cannot beat the incumbent gets a cheaper bound (see
    # bounds.lower_bound); one the wall-clock limit leaves out keeps its pooled bound.
    for i in sorted(range(len(cands)), key=lambda i: (greedy_s[i], i)):
        if budget.expired("the bounds of the candidates"):
            unexplored_bounds += 1  # (it keeps its pooled bound)
            continue
        st = cands[i]
        prob = st.problem
        prune_at = None if best is None else math.floor(best.time_s / prob.time_unit_s) + 1
        lb = lower_bound(prob, st.warm.objective if st.warm else None, prune_at=prune_at)
        cands[i] = replace(st, bound=max(lb, st.bound))

    # Tighten the weakest bounds (they decide the reported gap) with the fill relaxation where its walk is
    # small enough (bounds.FILL_WORK); a fixed number of rounds, not a clock, so the plan and its report do
    # not depend on the machine's load.
    tightened: set[int] = set()
    fill_left = max(FILL_BUDGET, FILL_SHARE * time_limit_s / FILL_S_PER_WORK)
    # The reported bound is the least over the candidates, so the budget is shared: each of the open
    # candidates (FILL_ROUNDS at most, weakest first) gets as many cells as all of them can have alike.
    per_cell: dict[int, float] = {}
    even = FILL_CELLS
    if best is not None:
        open_all = sorted(
            (i for i, c in enumerate(cands) if 0 < c.bound < INFEASIBLE_BOUND and c.bound_s < best.time_s),
            key=lambda i: (cands[i].bound_s, i),
        )[:FILL_ROUNDS]
        per_cell = {i: Relaxation(cands[i].problem).fill_work() for i in open_all}
        even = max(1, min(FILL_CELLS, int(fill_left // max(1.0, sum(per_cell.values())))))
    for _ in range(FILL_ROUNDS):
        if best is None or budget.expired("the fill relaxation"):
            break
        incumbent = best.time_s
        open_ = [
            i
            for i, c in enumerate(cands)
            if i not in tightened and 0 < c.bound < INFEASIBLE_BOUND and c.bound_s < incumbent
        ]
        if not open_:
            break
        i = min(open_, key=lambda i: (cands[i].bound_s, i))
        tightened.add(i)
        st = cands[i]
        prob = st.problem
        work = per_cell[i] if i in per_cell else Relaxation(prob).fill_work()
        cells = min(even, int(fill_left // max(work, 1.0)))
        if cells < 1:
            continue
        fill_left -= work * cells
        upper = math.floor(incumbent / prob.time_unit_s)
        t_star = min_bottleneck(prob, upper // max(1, prob.microbatches) + 1)
        new_lb = INFEASIBLE_BOUND if t_star is None else fill_bound(prob, t_star, upper, cells=cells)
        cands[i] = replace(st, bound=max(st.bound, new_lb))

    # Most promising first (by the greedy's value); candidates whose bound cannot beat the incumbent are
    # pruned, and at most MAX_SOLVES integer programs share the time limit.
    order = sorted(range(len(cands)), key=lambda i: (greedy_s[i], cands[i].bound_s, i))
    small = [i for i in order if cands[i].size <= LARGE_MODEL and cands[i].bound < INFEASIBLE_BOUND]
    promising = [i for i in small if best is None or cands[i].bound_s < best.time_s]
    # Tiny models (brute-force sizes) take milliseconds: solve them all; the rest share the time limit.
    tiny = [
        i for i in promising if cands[i].size <= TINY_MODEL and len(cands[i].problem.options) <= TINY_OPTIONS
    ]
    # The others, most promising first, while their estimated wall time fits SOLVE_SHARE of the limit: a
    # decision from the inputs alone, so a loaded machine solves the same programs (see [Note: determinism]).
    det_each = min(MAX_DETERMINISTIC_S, max(MIN_DETERMINISTIC_S, DETERMINISTIC_SHARE * time_limit_s))
    allowance = SOLVE_SHARE * time_limit_s - sum(_solve_estimate_s(cands[i].problem, det_each) for i in tiny)
    chosen: list[int] = []
    over_budget = 0
    for i in [i for i in promising if i not in tiny][:MAX_SOLVES]:
        est = _solve_estimate_s(cands[i].problem, det_each)
        if est > allowance:
            over_budget += 1
            continue
        chosen.append(i)
        allowance -= est
    to_solve = tiny + chosen
    # The integer programs' deterministic work depends on the time limit alone (the same on any load); the
    # wall clock only caps it (see [Note: determinism]).
    bounds: list[float] = [0.0] if unexplored else []
    outcomes: Counter[Outcome] = Counter()
    notes: list[str] = []
    # The bound over all candidates before any solve (candidates without one count as 0): once the incumbent is within GAP_TOLERANCE of it, the
    # integer programs cannot change the answer by more than that (a deterministic test, no clock).
    floor = min((c.bound_s for c in cands if c.bound < INFEASIBLE_BOUND), default=math.inf)
    close_enough = best is not None and best.time_s - floor <= GAP_TOLERANCE * best.time_s
    for i in order:
        st = cands[i]
        cand, prob, lb = st.candidate, st.problem, st.bound
        unit = prob.time_unit_s
        if lb >= INFEASIBLE_BOUND:
            outcomes[Outcome.LP_INFEASIBLE] += 1
            continue
        beaten = best is not None and lb * unit >= best.time_s
        # (Tiny models still go to CP-SAT: milliseconds, and it proves them optimal.)
        if i in to_solve and i not in tiny and close_enough and not beaten:
            bounds.append(lb * unit)
            outcomes[Outcome.WITHIN_GAP] += 1
            continue
        if i not in to_solve or beaten:
            bounds.append(lb * unit)
            if beaten:
                outcomes[Outcome.PRUNED] += 1
            elif i not in small:
                # Measured: CP-SAT finds nothing better than the warm start within 10 s on such models
                # here (Llama-7B on 64 GPUs: 64 stage slots x 160 blocks); keep the greedy and its bound.
                outcomes[Outcome.TOO_LARGE] += 1
            else:
                outcomes[Outcome.NOT_SOLVED] += 1
            continue
        label = f"m={cand.microbatches} b={cand.microbatch} {cand.schedule}"
        left = budget.left_for_solve()
        if left <= 0:
            budget.fire(f"the integer programs (before {label})")
        if budget.expired(f"the integer programs (before {label})"):
            bounds.append(lb * unit)
            outcomes[Outcome.NOT_SOLVED] += 1
            continue
        # Only the deterministic work limit decides (same plan on any load); the wall clock is what is left
        # of the time limit, and the notes say when it cut a solve short.
        sol: StageSolution = solve_stage_problem(
            prob,
            hint=st.warm.stages if st.warm else None,
            workers=workers,
            deterministic_time=det_each,
            time_limit_s=left,
            progress=progress,
            label=label,
        )
        outcome = Outcome(sol.status)
        outcomes[outcome] += 1
        if sol.seconds >= left * 0.98:
            budget.fire(f"the integer program {label}")
        if outcome is Outcome.INFEASIBLE:
            continue
        proven = outcome in (Outcome.OPTIMAL, Outcome.FEASIBLE)
        bounds.append(max(sol.bound, lb) * unit if proven and sol.stages else lb * unit)
        if not sol.stages:
            continue
        specs = layout(st, sol.stages)
        it = seconds(cand, specs)
        if best is None or it.iteration_time_s < best.time_s - 1e-12:
            best = _Incumbent(it.iteration_time_s, specs, cand, it, "cp-sat")
    for x in extra:
        it = seconds(x.candidate, x.stages)
        if best is None and math.isfinite(it.iteration_time_s):
            # Only a baseline fits (its devices in rank order may span hosts, outside the search's scope),
            # or the time limit stopped the search first.
            notes.append(f"the {x.name} layout is the only one found ({it.iteration_time_s:.4g} s)")
            best = _Incumbent(it.iteration_time_s, x.stages, x.candidate, it, x.name)
            bounds.append(0.0)  # nothing proven about layouts the search did not reach
            outcomes[Outcome.NO_SEARCH_LAYOUT] = 1
        elif best is not None and it.iteration_time_s < best.time_s - 1e-12:
            notes.append(
                f"the {x.name} layout beat the solver's ({it.iteration_time_s:.4g} s < {best.time_s:.4g} s)"
            )
            best = _Incumbent(it.iteration_time_s, x.stages, x.candidate, it, x.name)
    elapsed = budget.elapsed()
    if best is None and budget.fired:
        raise PlanError(f"no plan found within the time limit of {budget.limit_s:g} s: {budget.note()}")
    if best is None:
        raise infeasible()
    total = best.time_s
    bound = min(bounds) if bounds else total
    bound = min(bound, total)
    gap = max(0.0, (total - bound) / total) if total > 0 else 0.0
    exact = not unexplored and not unexplored_bounds and all(k.exact for k in outcomes)
    status = "OPTIMAL" if exact else "FEASIBLE"
    summary = ", ".join(
        f"{k.value.lower()} {v}" for k, v in sorted(outcomes.items(), key=lambda kv: kv[0].value)
    )
    notes.insert(
        0,
        f"{len(cands) + unexplored} candidates (microbatches x schedule): {summary}"
        + (f", unexplored {unexplored}" if unexplored else "")
        + f"; best from {best.source}",
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
    return SearchResult(best.stages, best.candidate, best.iteration, report)
