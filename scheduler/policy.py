"""distplan's policy: every job's shape (and plan) chosen jointly by one integer program per event.

At each event the policy prices every active job on its shapes (``distplan.scheduler.pricing``: the
planner's throughput, cached), values every option, and lets ``distplan.scheduler.allocate`` choose, for all
jobs at once, who runs on which shape, who shares a device and who waits. Devices are then handed out by
:class:`~distplan.scheduler.shapes.Placer`, which the program's packing constraint guarantees to succeed.

[Note: the objective]
With ``n_jo = thr_jo / thr_j*`` the *normalised throughput* of job ``j`` on option ``o`` (``thr_j*``: its
best throughput on any shape of the cluster), the value of the option is::

    v_jo = u_j * n_jo * max(0, 1 - delta_jo / H_j)

* ``u_j``, the job's urgency: ``1 / R_j`` where ``R_j`` is its remaining time at its best throughput
  (objective ``jct``, the default), or 1 (objective ``throughput``: plain normalised throughput). ``u_j n_jo``
  is then the rate at which the job completes its remaining work, and maximising the sum of completion rates
  gives the shortest remaining jobs the devices first: Smith's rule for weighted completion time (Smith,
  "Various optimizers for single-stage production", 1956) extended to many devices and shapes. A job whose
  length is not declared is assumed to run as long again as it has (at least ``min_remaining_s``): the
  least-attained-service guess of Tiresias (Gu et al., NSDI 2019). A deadline at risk (slack under ``R_j``)
  doubles ``u_j``.
* ``delta_jo``, what the option costs before the job makes progress: for a running job that changes, its
  checkpoint save, load and restart (see [Note: restart cost] in ``distplan.scheduler.pricing``); for a
  waiting job its start (and checkpoint load). ``H_j = R_j`` is the time over which the gain accrues, so a
  move pays only if ``n' (1 - delta / R) > n``. A running job that stops loses ``u_j n_j min(1,
  delta_j / H_j)``, the work its later restart will cost; the program adds that to every way of keeping it
  running, so preemption is priced.
* Co-location: a pair's members each get their value at the co-located throughput (``thr / slowdown``,
  [Note: co-location] in ``distplan.scheduler.pricing``); pairs are offered only where both jobs' memory
  fits the device and the slowdown is at most ``max_slowdown`` (1.5: two equal jobs sharing at slowdown
  ``s`` finish together at ``2 s L``, run one after the other at ``L + 2 L``; sharing lowers the mean
  completion time only for ``s < 1.5``).

Priority classes are *lexicographic* levels: the program first maximises the value of the jobs in the most
important level, fixes it, then the next (:data:`LEVELS`): aged high-priority jobs, high, aged others,
normal, low. A high-priority job therefore preempts lower ones whenever that lets it run, as strict priority
does, but the program picks the victims (and their shrinking or moving) that lose the least.

[Note: ageing]
A normal or low job that has waited ``ageing_bound_s`` (4 h by default) without interruption becomes
*aged*: it moves above every normal and low job, into a level of its own behind the jobs aged before it, and
stays there until it finishes; the policy asks to be woken (``next_tick``) exactly when the bound is reached.
A high-priority job that waits as long moves above all other high jobs the same way. The earliest
``AGED_LEVELS`` aged jobs get levels of their own (first come, first served); later ones share one level.
The bound must suit the load: too tight a bound ages many jobs at once, and served in order they form a
convoy -- measured on the benchmark's overloaded 16-GPU trace, 2 h aged 68 of 200 jobs and doubled the
average completion time against 4 h.

[Note: what waiting means]
What the program guarantees, exactly (``DistplanPolicy.check_waits`` checks it; the tests run it after every
decision of overloaded traces):

  (W) after a decision whose solves are optimal (``info["statuses"]`` all ``OPTIMAL``), a job waits only if
      none of its shapes fits the devices left free by the jobs running at its level or above.

Why: every option of a job is worth more than waiting (values are floored at ``START_FLOOR`` of the
option's throughput value, so even a start that costs more than the job's remaining work counts), and
preempting jobs of lower levels to start it changes no value at its level or above; an optimum at its level
therefore starts it whenever such devices exist. What (W) gives, and what it does not:

* Priority without inversion: no low job holds devices a waiting normal or high job could start on, and no
  non-aged job holds devices a waiting aged job could start on.
* Ageing bounds the time *until a job is first in line*, not its wait: a normal or low job waits without
  interruption at most ``ageing_bound_s``, then waits only while high-priority jobs and jobs aged before it
  (and, past the first ``AGED_LEVELS`` aged jobs, others of the shared level) hold every device set it fits.
  How long that is depends on the load. Under overload (more high-priority and aged work than devices) it
  is unbounded, for this policy as for any: on the benchmark's overloaded ``a100x8-v100x8`` trace one job
  waited 31,134 s in one stretch, 14,400 s to the bound and 16,734 s more while all 16 devices were held by
  high-priority jobs and the six jobs aged before it, as (W) allows.
* (W) is conditional on optimality: a decision cut short by its work budget (``deterministic_time``) keeps
  the best solution found, which may leave a job waiting that (W) would start; its statuses say so.
* The fairness variants (``max-min``, ``finish-time``) optimise a score before the levels' values and give
  no such guarantee.

Variants (``objective``): ``jct`` (default), ``throughput``; ``max-min`` -- Gavel's heterogeneity-aware
max-min fairness (Narayanan et al., OSDI 2020) as an integer program: maximise the smallest
priority-weighted, time-averaged normalised throughput (what the job received since it arrived, extended by
this decision over ``fairness_horizon_s``); ``finish-time`` -- Themis's finish-time fairness (Mahajan et al.,
NSDI 2020): minimise the largest ratio of expected completion time to the completion time alone at the best
throughput, priority-weighted. Both then maximise the values above as a tie-break.

[Note: decision time]
Each event costs a lookup of cached prices (a job's shapes are planned once, when it is first seen: see
[Note: pricing]), building the program (``jobs x shapes`` binaries, plus at most ``partners`` co-location
partners per job, among the ``COLOCATION_CANDIDATES`` most urgent waiting jobs) and one CP-SAT solve per
non-empty level, all under one deterministic work budget (``deterministic_time``): a decision's time is
bounded whatever the load, and when the budget runs out the best solution found stands (it is never worse
than every running job staying, completed greedily with waiting jobs). Measured on this 2-core machine
under other work (``benchmarks/schedule_quality.py``, prices cached): 64 GPUs / 200 jobs, p99 0.14 s and at
most 0.16 s per decision; 1,024 GPUs / 2,000 jobs (up to 86 active jobs), p99 0.28 s, at most 0.39 s; the
same cluster at four times the load (402 active jobs, 283 running), 7.4 s with the default budget, with the
contended level's value within 0.7% of the optimum that CP-SAT needs 21 s to prove. The first time a model
is seen, pricing its shapes costs planner calls of about a second each (tens of seconds for a large model on
many shapes); they are made when the job is submitted, not in a decision (see [Note: pricing off the
decision path] in ``distplan.scheduler.core``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .allocate import (
    AllocationProblem,
    BinSpec,
    Choice,
    JobEntry,
    Join,
    Keep,
    Option,
    Pair,
    SharedKeep,
    solve_allocation,
)
from .core import Assignment, JobRecord, Policy, PolicyResult, View
from .model import Event, SchedulerError
from .pricing import Price, colocation_slowdown
from .shapes import Shape

__all__ = ["DISTPLAN_OBJECTIVES", "LEVELS", "POLICIES", "DistplanPolicy", "WaitCheck", "make_policy"]

DISTPLAN_OBJECTIVES = ("jct", "throughput", "max-min", "finish-time")
#: The lexicographic classes, most important first (see [Note: ageing] for the aged ones).
LEVELS = ("aged-high", "high", "aged", "normal", "low")
#: Aged jobs with a lexicographic level of their own (the earliest aged); later ones share one.
AGED_LEVELS = 16
#: Waiting jobs considered for co-location per decision (the most important and urgent).
COLOCATION_CANDIDATES = 48
#: Least fraction of an option's value its start or restart delay leaves (see [Note: what waiting means]).
START_FLOOR = 0.05
#: Priority weights of the fairness variants (Gavel's ``priority_weights``).
PRIORITY_WEIGHTS = {"high": 4.0, "normal": 2.0, "low": 1.0}


def make_policy(name: str, **params: Any) -> Policy:
    """A policy by name (:data:`POLICIES`) with its parameters.

    Raises:
        SchedulerError: unknown name or parameter.
    """
    from . import baselines

    classes: dict[str, type[Policy]] = {
        "distplan": DistplanPolicy,
        "fifo": baselines.FifoPolicy,
        "las": baselines.TiresiasPolicy,
        "gavel": baselines.GavelPolicy,
        "strict-priority": baselines.StrictPriorityPolicy,
    }
    if name not in classes:
        raise SchedulerError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    try:
        return classes[name](**params)
    except SchedulerError:
        raise
    except (TypeError, ValueError) as e:  # a parameter of the wrong kind (a string for a number, ...)
        raise SchedulerError(f"policy {name!r}: {e}") from e


POLICIES = ("distplan", "fifo", "las", "gavel", "strict-priority")


@dataclass(frozen=True, slots=True)
class WaitCheck:
    """A waiting job after a decision, against (W) (see [Note: what waiting means]).

    Attributes:
        job_id: the job.
        level: its lexicographic level (0 first); level_class: its class in :data:`LEVELS`.
        held_above: devices held by the jobs running at its level or above.
        fitting: its shapes that fit the devices those jobs leave free (``"2 x a100-sxm-80g"``); any
            breaks (W).
    """

    job_id: str
    level: int
    level_class: str
    held_above: int
    fitting: tuple[str, ...]

    @property
    def holds(self) -> bool:
        """Whether (W) holds for this job."""
        return not self.fitting


@dataclass(slots=True)
class _Job:
    """One active job as the program sees it."""

    rec: JobRecord
    options: list[tuple[Shape, Price]]
    best: float  # best throughput over its options
    level: int
    urgency: float
    horizon: float  # H_j, seconds
    remaining: float  # R_j, seconds at the best throughput
    weight: float  # priority weight (fairness variants)
    one: dict[int, Price | None] = field(default_factory=dict)  # one-device prices by pool


class DistplanPolicy(Policy):
    """See the module docstring.

    Args:
        objective: ``jct`` (default), ``throughput``, ``max-min`` or ``finish-time``.
        ageing_bound_s: waiting time after which a job moves up a level (see [Note: ageing]).
        colocation: offer co-location at all.
        max_slowdown: largest co-location slowdown offered.
        partners: co-location partners offered per job (the best by combined value).
        min_remaining_s: the least remaining time assumed for a job of undeclared length.
        min_gain: a running job is moved or resized only if that raises its value by more than this
            fraction (hysteresis against restarts for small gains).
        fairness_horizon_s: the horizon of the fairness variants' scores.
        deterministic_time: CP-SAT work budget per decision, all lexicographic stages together
            (deterministic seconds; about as many wall seconds on an idle core).
        time_limit_s: wall-clock safety net per solve.
        workers: CP-SAT workers.
    """

    name = "distplan"

    def __init__(
        self,
        objective: str = "jct",
        ageing_bound_s: float = 14400.0,
        colocation: bool = True,
        max_slowdown: float = 1.5,
        partners: int = 4,
        min_remaining_s: float = 600.0,
        fairness_horizon_s: float = 1800.0,
        deterministic_time: float = 2.0,
        time_limit_s: float = 10.0,
        workers: int = 1,
        min_gain: float = 0.1,
    ) -> None:
        if objective not in DISTPLAN_OBJECTIVES:
            raise SchedulerError(
                f"objective must be one of {', '.join(DISTPLAN_OBJECTIVES)}, got {objective!r}"
            )
        for nm, v in (
            ("ageing_bound_s", ageing_bound_s),
            ("min_remaining_s", min_remaining_s),
            ("fairness_horizon_s", fairness_horizon_s),
            ("deterministic_time", deterministic_time),
            ("time_limit_s", time_limit_s),
        ):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise SchedulerError(f"{nm} must be a positive number of seconds, got {v!r}")
        if not 1.0 <= max_slowdown <= 4.0:
            raise SchedulerError(f"max_slowdown must be between 1 and 4, got {max_slowdown}")
        if not (isinstance(partners, int) and 0 <= partners <= 64):
            raise SchedulerError(f"partners must be an integer between 0 and 64, got {partners!r}")
        if not (isinstance(min_gain, (int, float)) and 0 <= min_gain < 1):
            raise SchedulerError(f"min_gain must be in [0, 1), got {min_gain!r}")
        if not (isinstance(workers, int) and 1 <= workers <= 64):
            raise SchedulerError(f"workers must be an integer between 1 and 64, got {workers!r}")
        self.objective = objective
        self.ageing_bound_s = float(ageing_bound_s)
        self.colocation = bool(colocation)
        self.max_slowdown = float(max_slowdown)
        self.partners = partners
        self.min_remaining_s = float(min_remaining_s)
        self.fairness_horizon_s = float(fairness_horizon_s)
        self.deterministic_time = float(deterministic_time)
        self.time_limit_s = float(time_limit_s)
        self.workers = workers
        self.min_gain = float(min_gain)

    def params(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "ageing_bound_s": self.ageing_bound_s,
            "colocation": self.colocation,
            "max_slowdown": self.max_slowdown,
            "partners": self.partners,
            "min_remaining_s": self.min_remaining_s,
            "fairness_horizon_s": self.fairness_horizon_s,
            "deterministic_time": self.deterministic_time,
            "time_limit_s": self.time_limit_s,
            "workers": self.workers,
            "min_gain": self.min_gain,
        }

    # ------------------------------------------------------------------ ageing
    def next_tick(self, view: View) -> float | None:
        due = [
            r.wait_since_s + self.ageing_bound_s
            for r in view.waiting()
            if not r.aged and r.wait_since_s is not None and r.wait_since_s + self.ageing_bound_s > view.now
        ]
        return min(due) if due else None

    def _age(self, view: View) -> list[Event]:
        out = []
        for r in view.waiting():
            if not r.aged and r.current_wait(view.now) >= self.ageing_bound_s - 1e-6:
                r.aged = True
                r.data["aged_at"] = view.now
                out.append(
                    Event(
                        view.now,
                        "age",
                        r.id,
                        f"waited {r.current_wait(view.now):.0f} s (ageing bound {self.ageing_bound_s:.0f} s): "
                        f"now above every {'high' if r.spec.priority == 'high' else 'normal and low'} job",
                    )
                )
        return out

    def _class(self, r: JobRecord) -> int:
        """The job's class in :data:`LEVELS`."""
        if r.spec.priority == "high":
            return LEVELS.index("aged-high" if r.aged else "high")
        return LEVELS.index("aged" if r.aged else r.spec.priority)

    def _levels(self, records: Sequence[JobRecord]) -> dict[str, int]:
        """Each job's lexicographic level (0 first): classes in :data:`LEVELS` order; inside the two aged
        classes every job has a level of its own, earliest aged first (the first ``AGED_LEVELS`` of them;
        later ones share one level), so aged jobs are served first come, first served."""
        keys: dict[str, tuple[int, float, str]] = {}
        for r in records:
            c = self._class(r)
            if LEVELS[c] in ("aged", "aged-high"):
                keys[r.id] = (c, float(r.data.get("aged_at", 0.0)), r.id)
            else:
                keys[r.id] = (c, 0.0, "")
        merged: dict[str, tuple[int, float, str]] = {}
        for c in {k[0] for k in keys.values()}:
            aged = sorted((k, jid) for jid, k in keys.items() if k[0] == c and k[2])
            for n, (k, jid) in enumerate(aged):
                merged[jid] = k if n < AGED_LEVELS else (c, math.inf, "")
        keys.update(merged)
        order = sorted(set(keys.values()))
        return {jid: order.index(k) for jid, k in keys.items()}

    # ------------------------------------------------------------------ decide
    def decide(self, view: View) -> PolicyResult:
        res = PolicyResult(events=self._age(view))
        now = view.now
        jobs: list[_Job] = []
        levels = self._levels(view.records)
        for r in view.records:
            opts = view.pricer.options(r.spec, view.graph(r), view.pools)
            # A running job may always keep what it has, even where pricing now skips that shape.
            if (
                r.running
                and r.shape is not None
                and r.price is not None
                and r.shape not in [s for s, _ in opts]
            ):
                opts.append((r.shape, r.price))
            if not opts:
                res.reasons[r.id] = self._no_shape_reason(view, r)
                continue
            best = max(p.throughput_samples_s for _, p in opts)
            total = r.spec.total_samples
            if total is not None:
                rem = max(total - r.samples_done, float(r.spec.global_batch))
            else:
                rem = max(r.samples_done, best * self.min_remaining_s)
            remaining = max(rem / best, 60.0)
            level = levels[r.id]
            urgency = 1.0 / remaining if self.objective == "jct" and not r.aged else 1.0
            if r.spec.deadline_s is not None and r.spec.deadline_s - now - remaining < remaining:
                urgency *= 2.0
            jobs.append(
                _Job(r, opts, best, level, urgency, remaining, remaining, PRIORITY_WEIGHTS[r.spec.priority])
            )
        if not jobs:
            return res
        problem, meta = self._problem(view, jobs)
        meta["levels"] = levels
        sol = solve_allocation(problem)
        self._assign(view, jobs, problem, meta, sol.choices, res)
        res.info = {
            "statuses": list(sol.statuses),
            "objectives": list(sol.objectives),
            "solve_s": sol.seconds,
            "variables": sol.variables,
            "reasons": dict(res.reasons),
            "notes": list(sol.notes),
        }
        return res

    # ------------------------------------------------------------------ the program's data
    def _restart(self, view: View, j: _Job, shape: Shape) -> float:
        r = j.rec
        g = view.graph(r)
        if r.running and r.placement is not None:
            hosts_old = r.shape.hosts if r.shape is not None else 1
            return view.pricer.restart_s(r.spec, g, hosts_old, shape.hosts)
        return view.pricer.restart_s(r.spec, g, 0, shape.hosts if r.has_checkpoint else 0)

    def _value(self, j: _Job, thr: float, delay: float) -> float:
        # Floored above zero: see [Note: what waiting means].
        return j.urgency * (thr / j.best) * max(START_FLOOR, 1.0 - delay / j.horizon)

    def _fair(self, view: View, j: _Job, thr: float, delay: float) -> float:
        """The job's fairness score if it runs at ``thr`` after ``delay`` (``thr = 0``: it waits)."""
        r = j.rec
        age = max(view.now - r.submitted_s, 1.0)
        if self.objective == "max-min":
            h = self.fairness_horizon_s
            got = r.samples_done / j.best  # seconds of work at the best throughput received so far
            share = (thr / j.best) * max(0.0, h - delay)
            return (got + share) / (age + h) / j.weight
        if self.objective == "finish-time":
            ideal = (r.samples_done / j.best) + j.remaining
            finish = age + (
                delay + j.remaining * j.best / thr if thr > 0 else self.fairness_horizon_s + j.remaining
            )
            return finish / ideal * j.weight
        return 0.0

    def _problem(self, view: View, jobs: list[_Job]) -> tuple[AllocationProblem, dict[str, Any]]:
        bins: list[BinSpec] = []
        bin_of: dict[int, int] = {}
        for pool in view.pools:
            for b in pool.bins:
                for d in b.devices:
                    bin_of[d] = len(bins)
                bins.append(BinSpec(pool.index, len(b.devices)))
        index = {j.rec.id: i for i, j in enumerate(jobs)}
        entries: list[JobEntry] = []
        shared: list[SharedKeep] = []
        solo_one: dict[int, int] = {}  # running solo one-device job index -> its pool
        for i, j in enumerate(jobs):
            r = j.rec
            options: list[Option] = []
            stop_loss = 0.0
            keep: Keep | None = None
            if r.running and r.placement is not None and r.price is not None and r.shape is not None:
                cur = r.price.throughput_samples_s
                back = view.pricer.restart_s(r.spec, view.graph(r), r.shape.hosts, r.shape.hosts)
                stop_loss = j.urgency * (cur / j.best) * min(1.0, back / j.horizon)
                usage: dict[int, int] = {}
                co = [c for c in r.placement.colocated_with if c in index]
                if not co:
                    for d in r.placement.devices:
                        usage[bin_of[d]] = usage.get(bin_of[d], 0) + 1
                    if r.shape.devices == 1:
                        solo_one[i] = r.shape.pool
                keep = Keep(usage, self._value(j, cur, 0.0) + stop_loss, self._fair(view, j, cur, 0.0))
                if co and index[co[0]] > i:
                    # A running pair: the second member's record comes later; both keep one shared device.
                    other = jobs[index[co[0]]]
                    s = r.price.throughput_samples_s / r.placement.throughput_samples_s
                    oc = self._cur(other)
                    shared.append(
                        SharedKeep(
                            i,
                            index[co[0]],
                            bin_of[r.placement.devices[0]],
                            self._value(j, cur / s, 0.0) - self._value(j, cur, 0.0),
                            self._value(other, oc / s, 0.0) - self._value(other, oc, 0.0),
                            self._fair(view, j, cur / s, 0.0) - self._fair(view, j, cur, 0.0),
                            self._fair(view, other, oc / s, 0.0) - self._fair(view, other, oc, 0.0),
                        )
                    )
            for shape, price in j.options:
                if r.running and r.shape == shape and keep is not None:
                    continue  # the same shape elsewhere is a move; staying is ``keep``
                delay = self._restart(view, j, shape)
                thr = price.throughput_samples_s
                # Hysteresis: a running job changes only for a clear gain (see [Note: the objective]).
                damp = 1.0 - self.min_gain if keep is not None else 1.0
                options.append(
                    Option(
                        shape.pool,
                        shape.per_host,
                        shape.hosts,
                        damp * self._value(j, thr, delay) + stop_loss,
                        self._fair(view, j, thr, delay),
                    )
                )
            entries.append(JobEntry(j.level, tuple(options), keep, self._fair(view, j, 0.0, 0.0)))
        pairs, joins = self._colocation(view, jobs, solo_one) if self.colocation else ([], [])
        objective = {"max-min": "max-min", "finish-time": "min-max"}.get(self.objective, "lexicographic")
        problem = AllocationProblem(
            bins=tuple(bins),
            jobs=tuple(entries),
            pairs=tuple(pairs),
            joins=tuple(joins),
            shared=tuple(shared),
            objective=objective,
            deterministic_time=self.deterministic_time,
            time_limit_s=self.time_limit_s,
            workers=self.workers,
        )
        return problem, {"bin_of": bin_of}

    def _cur(self, j: _Job) -> float:
        return j.rec.price.throughput_samples_s if j.rec.price is not None else 0.0

    def _one_device(self, view: View, j: _Job, pool: int) -> Price | None:
        if j.rec.spec.min_devices > 1:
            return None
        if pool not in j.one:
            pr = view.price(j.rec, Shape(pool, 1, 1))
            j.one[pool] = pr if pr.feasible else None
        return j.one[pool]

    def _slowdown(self, view: View, a: _Job, b: _Job, shape: Shape) -> float | None:
        """The co-location slowdown of ``a`` and ``b`` on one device of ``shape``'s pool, or None when their
        memory does not fit the device together or the slowdown passes ``max_slowdown``."""
        pa, pb = self._one_device(view, a, shape.pool), self._one_device(view, b, shape.pool)
        if pa is None or pb is None:
            return None
        cap = view.cluster.kinds[view.pools[shape.pool].kind].usable_memory_bytes
        if pa.memory_bytes + pb.memory_bytes > cap:
            return None
        s = colocation_slowdown(pa, pb, view.pricer.restart.interference)
        return s if s <= self.max_slowdown else None

    def _colocation(
        self, view: View, jobs: list[_Job], solo_one: dict[int, int]
    ) -> tuple[list[Pair], list[Join]]:
        """Co-location terms: pairs of waiting jobs on a new device, waiting jobs joining a running
        one-device job; at most ``partners`` per job, the best by combined value."""
        cands: dict[int, list[tuple[float, Any]]] = {}
        waiting = [i for i, j in enumerate(jobs) if not j.rec.running and j.rec.spec.min_devices == 1]
        # The most urgent waiting jobs only: pairs grow with the square of the candidates.
        waiting = sorted(waiting, key=lambda i: (jobs[i].level, -jobs[i].urgency, i))[:COLOCATION_CANDIDATES]
        for pool in view.pools:
            one = Shape(pool.index, 1, 1)
            here = [i for i in waiting if self._one_device(view, jobs[i], pool.index) is not None]
            for x_, a in enumerate(here):
                for b in here[x_ + 1 :]:
                    s = self._slowdown(view, jobs[a], jobs[b], one)
                    if s is None:
                        continue
                    ja, jb = jobs[a], jobs[b]
                    ta = self._one_device(view, ja, pool.index).throughput_samples_s  # type: ignore[union-attr]
                    tb = self._one_device(view, jb, pool.index).throughput_samples_s  # type: ignore[union-attr]
                    da, db = self._restart(view, ja, one), self._restart(view, jb, one)
                    pair = Pair(
                        a,
                        b,
                        pool.index,
                        self._value(ja, ta / s, da),
                        self._value(jb, tb / s, db),
                        self._fair(view, ja, ta / s, da),
                        self._fair(view, jb, tb / s, db),
                    )
                    gain = pair.value_a + pair.value_b
                    cands.setdefault(a, []).append((gain, pair))
                    cands.setdefault(b, []).append((gain, pair))
            for h, hp in solo_one.items():
                if hp != pool.index:
                    continue
                jh = jobs[h]
                for a in here:
                    s = self._slowdown(view, jobs[a], jh, one)
                    if s is None:
                        continue
                    ja = jobs[a]
                    ta = self._one_device(view, ja, pool.index).throughput_samples_s  # type: ignore[union-attr]
                    th = self._cur(jh)
                    da = self._restart(view, ja, one)
                    join = Join(
                        a,
                        h,
                        self._value(ja, ta / s, da),
                        self._value(jh, th / s, 0.0) - self._value(jh, th, 0.0),
                        self._fair(view, ja, ta / s, da),
                        self._fair(view, jh, th / s, 0.0) - self._fair(view, jh, th, 0.0),
                    )
                    gain = join.value_job + join.delta_host
                    cands.setdefault(a, []).append((gain, join))
                    cands.setdefault(h, []).append((gain, join))
        keep_terms: set[int] = set()
        terms: list[Any] = []
        for i in sorted(cands):
            best = sorted(cands[i], key=lambda gt: -gt[0])[: self.partners]
            for _, t in best:
                if id(t) not in keep_terms:
                    keep_terms.add(id(t))
                    terms.append(t)
        pairs = [t for t in terms if isinstance(t, Pair)]
        joins = [t for t in terms if isinstance(t, Join)]
        pairs.sort(key=lambda p: (p.pool, p.a, p.b))
        joins.sort(key=lambda jn: (jn.host, jn.job))
        return pairs, joins

    # ------------------------------------------------------------------ devices
    def _assign(
        self,
        view: View,
        jobs: list[_Job],
        p: AllocationProblem,
        meta: dict[str, Any],
        choices: Sequence[Choice],
        res: PolicyResult,
    ) -> None:
        placer = view.placer()
        # Jobs that stay keep their devices (and jobs joining them share one).
        for i, c in enumerate(choices):
            if c.kind == "keep":
                r = jobs[i].rec
                assert r.placement is not None and r.shape is not None and r.price is not None
                placer.take(r.placement.devices)
        partner: dict[int, tuple[int, float]] = {}
        for i, c in enumerate(choices):
            if c.kind == "join":
                jn = p.joins[c.index]
                jh = jobs[jn.host]
                s = self._slowdown(view, jobs[i], jh, Shape(jh.rec.shape.pool, 1, 1))  # type: ignore[union-attr]
                assert s is not None
                partner[i] = (jn.host, s)
                partner[jn.host] = (i, s)
        for sk in p.shared:
            if choices[sk.a].kind == "keep" and choices[sk.b].kind == "keep":
                ra = jobs[sk.a].rec
                assert ra.price is not None and ra.placement is not None
                s = ra.price.throughput_samples_s / ra.placement.throughput_samples_s
                partner[sk.a] = (sk.b, s)
                partner[sk.b] = (sk.a, s)
        # New placements, largest pieces first (see [Note: pools, bins and shapes]).
        items: list[tuple[int, int, int, int, Shape]] = []  # (-per_host, -hosts, order, job, shape)
        for i, c in enumerate(choices):
            if c.kind == "option":
                o = p.jobs[i].options[c.index]
                items.append((-o.per_host, -o.hosts, i, i, Shape(o.pool, o.per_host, o.hosts)))
        done_pairs: set[int] = set()
        for c in choices:
            if c.kind == "pair" and c.index not in done_pairs:
                done_pairs.add(c.index)
                pr = p.pairs[c.index]
                items.append((-1, -1, len(jobs) + c.index, -1 - c.index, Shape(pr.pool, 1, 1)))
        items.sort(key=lambda t: (t[0], t[1], t[2]))
        devices: dict[int, tuple[int, ...]] = {}
        shapes: dict[int, Shape] = {}
        for *_, who, shape in items:
            if who >= 0:
                r = jobs[who].rec
                prefer = r.placement.devices if r.placement is not None else ()
                got = placer.place(shape, prefer)
                if got is None:
                    raise SchedulerError(
                        f"placement of job {r.id!r} on {shape.devices} x {view.pools[shape.pool].kind} failed "
                        "although the program's packing count allowed it -- report this"
                    )
                devices[who], shapes[who] = got, shape
            else:
                pr = p.pairs[-1 - who]
                got = placer.place(shape)
                if got is None:
                    raise SchedulerError("placement of a co-located pair failed -- report this")
                s = self._slowdown(view, jobs[pr.a], jobs[pr.b], shape)
                assert s is not None
                for a, b in ((pr.a, pr.b), (pr.b, pr.a)):
                    devices[a], shapes[a] = got, shape
                    partner[a] = (b, s)
        waits: list[_Job] = []
        for i, c in enumerate(choices):
            j = jobs[i]
            r = j.rec
            if c.kind == "wait":
                waits.append(j)
                continue
            if c.kind == "keep":
                assert r.placement is not None and r.shape is not None and r.price is not None
                shape, devs, price = r.shape, r.placement.devices, r.price
            elif c.kind == "join":
                h = jobs[p.joins[c.index].host].rec
                assert h.placement is not None and h.shape is not None
                shape, devs = h.shape, h.placement.devices
                price = view.price(r, shape)
            else:
                shape, devs = shapes[i], devices[i]
                price = next((pr for sh, pr in j.options if sh == shape), None) or view.price(r, shape)
            other = partner.get(i)
            res.assignments[r.id] = Assignment(
                shape,
                devs,
                price,
                jobs[other[0]].rec.id if other else None,
                other[1] if other else 1.0,
            )
        held = {jid: a.devices for jid, a in res.assignments.items()}
        for j in waits:
            res.reasons[j.rec.id] = self._wait_reason(view, j, meta["levels"], held)

    # ------------------------------------------------------------------ reasons
    def _no_shape_reason(self, view: View, r: JobRecord) -> str:
        shapes = [
            (pool, s) for pool in view.pools for s in pool.shapes(r.spec.min_devices, r.spec.max_devices)
        ]
        if not shapes:
            return (
                f"no device set between {r.spec.min_devices} and {r.spec.max_devices} devices exists here "
                "(a job gets 1, 2, 4, ... devices of one host, or whole hosts)"
            )
        why = ""
        for pool, s in reversed(shapes):
            pr = view.price(r, s)
            if not pr.feasible:
                why = f"{s.devices} x {pool.kind}: {pr.reason}"
                break
        return f"fits none of its device sets ({len(shapes)} tried); largest: {why}"

    def _fitting(
        self,
        view: View,
        rec: JobRecord,
        options: Sequence[tuple[Shape, Price]],
        levels: dict[str, int],
        held: dict[str, tuple[int, ...]],
    ) -> tuple[list[Shape], list[str]]:
        """The job's shapes that fit the devices left free by the jobs at its level or above (``held``: job
        -> devices it runs on), and those jobs."""
        mine = levels[rec.id]
        above = sorted(jid for jid in held if jid != rec.id and levels.get(jid, len(levels) + 1) <= mine)
        placer = view.placer([d for jid in above for d in held[jid]])
        return [sh for sh, _ in options if placer.fits(sh)], above

    def check_waits(self, view: View) -> list[WaitCheck]:
        """Every waiting job of ``view`` against (W) (see [Note: what waiting means]): call it after a
        decision (``View(scheduler)``). Jobs with no feasible shape are left out (nothing can start them)."""
        levels = self._levels(view.records)
        held = {r.id: r.placement.devices for r in view.running() if r.placement is not None}
        out = []
        for r in view.waiting():
            opts = view.pricer.options(r.spec, view.graph(r), view.pools)
            if not opts:
                continue
            fits, above = self._fitting(view, r, opts, levels, held)
            out.append(
                WaitCheck(
                    r.id,
                    levels[r.id],
                    LEVELS[self._class(r)],
                    sum(len(held[a]) for a in above),
                    tuple(f"{sh.devices} x {view.pools[sh.pool].kind}" for sh in fits),
                )
            )
        return out

    def _wait_reason(
        self, view: View, j: _Job, levels: dict[str, int], held: dict[str, tuple[int, ...]]
    ) -> str:
        """Why the job waits after this decision, in the terms of (W) (see [Note: what waiting means])."""
        small = min(j.options, key=lambda sp: (sp[0].devices, -sp[1].throughput_samples_s))
        kinds = sorted({view.pools[s.pool].kind for s, _ in j.options})
        fits, above = self._fitting(view, j.rec, j.options, levels, held)
        level = LEVELS[self._class(j.rec)]
        if fits:
            return (
                f"{fits[0].devices} x {view.pools[fits[0].pool].kind} is free of jobs at its level ({level}) or "
                "above, but the decision's work budget ran out before the program placed it; the next "
                "decision tries again"
            )
        recs = {r.id: r for r in view.records}
        by_class: dict[str, int] = {}
        for jid in above:
            c = LEVELS[self._class(recs[jid])]
            by_class[c] = by_class.get(c, 0) + 1
        who = ", ".join(f"{n} {c}" for c, n in sorted(by_class.items(), key=lambda cn: LEVELS.index(cn[0])))
        return (
            f"every device set it fits (smallest {small[0].devices} x {view.pools[small[0].pool].kind}; kinds "
            f"{', '.join(kinds)}) is held by jobs at its level ({level}) or above: {len(above)} running"
            + (f" ({who})" if who else "")
        )
