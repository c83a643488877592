"""Baseline policies, implemented from their papers, driven by the same scheduler and simulator as distplan.

Every baseline treats a job as *rigid*: it asks for ``max_devices`` (the largest shape of at most that many
devices, see ``distplan.scheduler.shapes``) and runs the plan the planner makes for that shape; all of them
pay the same checkpoint-restart costs in the simulator. They differ in who runs:

* :class:`FifoPolicy` -- first in, first out with head-of-line blocking and no preemption, the default of
  YARN-style GPU clusters and the "FIFO" baseline of Tiresias (``one_queue_fifo`` in its simulator).
* :class:`TiresiasPolicy` -- Tiresias's discretised two-dimensional least-attained-service (2D-LAS; Gu et
  al., "Tiresias: A GPU Cluster Manager for Distributed Deep Learning", NSDI 2019): attained service is
  devices x seconds; ``K`` queues split by ``thresholds``; a new job enters the first queue and is demoted as
  its service crosses each threshold; queues are served in order, FIFO inside a queue with running jobs
  ahead of waiting ones, work-conserving (a job that does not fit is skipped); a job a higher one needs the
  devices of is preempted. Optional promotion against starvation: a waiting job goes back to the first queue
  once it has waited ``promote_knob`` times its executed time (0 disables it, as in the public simulator's
  runs).
* :class:`GavelPolicy` -- Gavel's heterogeneity-aware max-min fairness (Narayanan et al., "Heterogeneity-
  Aware Cluster Scheduling Policies for Deep Learning Workloads", OSDI 2020): a linear program over the time
  fractions ``X[j, k]`` of job ``j`` on device kind (pool) ``k`` maximises ``min_j sum_k T[j,k] z_j X[j,k] /
  (w_j T_iso_j)`` subject to ``sum_k X[j,k] <= 1`` and ``sum_j z_j X[j,k] <= n_k`` (``T``: throughput,
  ``z``: devices, ``w``: priority weight, ``T_iso``: throughput under the equal-time-share allocation, the
  same program with every ``T = 1``); rounds of ``round_s`` (360 s, Gavel's default) give devices to jobs in
  the order of ``X[j,k] / (share of time j received on k)``, keeping a job on its devices when it is
  rescheduled on the same kind; between rounds nothing changes.
* :class:`StrictPriorityPolicy` -- strict priority with naive preemption: jobs in (priority, arrival) order;
  a job that does not fit stops running jobs of lower priority, lowest priority and most recently started
  first, until it fits (regardless of their restart costs); lower jobs backfill what is left.

FIFO, Tiresias and strict priority are heterogeneity-unaware: a job goes to the first pool (in cluster
order) where its shape fits memory and has free devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ortools.linear_solver import pywraplp

from distplan.graph import OpGraph

from .core import Assignment, JobRecord, Policy, PolicyResult, View
from .model import JobSpec, SchedulerError, priority_rank
from .pricing import Price, Pricer
from .shapes import Placer, Pool, Shape

__all__ = ["FifoPolicy", "GavelPolicy", "StrictPriorityPolicy", "TiresiasPolicy"]

PRIORITY_WEIGHTS = {"high": 4.0, "normal": 2.0, "low": 1.0}


def rigid_shapes(view: View, rec: JobRecord) -> list[tuple[Shape, Price]]:
    """The job's rigid request in each pool where it fits memory: the largest shape of at most
    ``max_devices`` devices (and at least ``min_devices``), in cluster order."""
    out = []
    for pool in view.pools:
        shape = pool.largest_shape(rec.spec.max_devices)
        if shape is None or shape.devices < rec.spec.min_devices:
            continue
        price = view.price(rec, shape)
        if price.feasible:
            out.append((shape, price))
    return out


class _Rigid(Policy):
    """A policy that asks each job for its rigid shape in every pool (see the module docstring)."""

    def prepare(self, pricer: Pricer, job: JobSpec, graph: OpGraph, pools: Sequence[Pool]) -> None:
        """Price the job's rigid shape in every pool (what :func:`rigid_shapes` and the reasons ask)."""
        for pool in pools:
            shape = pool.largest_shape(job.max_devices)
            if shape is not None and shape.devices >= job.min_devices:
                pricer.price(job, graph, pool, shape)


def _no_fit(view: View, rec: JobRecord) -> str:
    tried = []
    for pool in view.pools:
        shape = pool.largest_shape(rec.spec.max_devices)
        if shape is None or shape.devices < rec.spec.min_devices:
            continue
        tried.append(f"{shape.devices} x {pool.kind}: {view.price(rec, shape).reason}")
    if not tried:
        return f"no pool offers a device set of {rec.spec.min_devices}-{rec.spec.max_devices} devices"
    return "fits no pool: " + "; ".join(tried)


def _first_fit(
    placer: Placer, rec: JobRecord, shapes: list[tuple[Shape, Price]], avoid: Any = ()
) -> Assignment | None:
    """Place on the first pool (cluster order) with room; a running job prefers its devices."""
    prefer = rec.placement.devices if rec.placement is not None else ()
    # A running job first tries to stay where it is.
    for shape, price in shapes:
        if rec.shape == shape:
            got = placer.place(shape, prefer, avoid)
            if got is not None:
                return Assignment(shape, got, price)
    for shape, price in shapes:
        got = placer.place(shape, prefer, avoid)
        if got is not None:
            return Assignment(shape, got, price)
    return None


def _keep(placer: Placer, rec: JobRecord) -> Assignment | None:
    """Keep a running job on its exact devices if they are still free."""
    if rec.placement is None or rec.shape is None or rec.price is None:
        return None
    if not placer.is_free(rec.placement.devices):
        return None
    placer.take(rec.placement.devices)
    return Assignment(rec.shape, rec.placement.devices, rec.price)


class FifoPolicy(_Rigid):
    """First in, first out, head-of-line blocking, no preemption (see module docstring)."""

    name = "fifo"

    def decide(self, view: View) -> PolicyResult:
        res = PolicyResult()
        placer = view.placer()
        for r in view.running():
            a = _keep(placer, r)
            if a is not None:
                res.assignments[r.id] = a
        blocked: str | None = None
        for r in view.waiting():
            shapes = rigid_shapes(view, r)
            if not shapes:
                res.reasons[r.id] = _no_fit(view, r)
                continue  # a job that can never run must not block the queue forever
            if blocked is not None:
                res.reasons[r.id] = f"behind {blocked} in the FIFO queue"
                continue
            a = _first_fit(placer, r, shapes)
            if a is None:
                blocked = r.id
                res.reasons[r.id] = f"head of the queue: {shapes[0][0].devices} devices are not free"
                continue
            res.assignments[r.id] = a
        res.info = {"reasons": dict(res.reasons)}
        return res


class TiresiasPolicy(_Rigid):
    """Discretised 2D-LAS (see module docstring).

    Args:
        thresholds: attained-service thresholds (devices x seconds) between queues; ``K = len + 1`` queues.
            Default one threshold of 3600 device-seconds (two queues), the example of Tiresias's simulator.
        promote_knob: promote a waiting job to the first queue when its wait reaches this multiple of its
            executed time (0: never).
    """

    name = "las"

    def __init__(
        self, thresholds: tuple[float, ...] | list[float] = (3600.0,), promote_knob: float = 0.0
    ) -> None:
        if not isinstance(thresholds, (tuple, list)):
            raise SchedulerError(f"thresholds must be a list of device-seconds, got {thresholds!r}")
        th = tuple(float(t) for t in thresholds)
        if any(not (math.isfinite(t) and t > 0) for t in th) or list(th) != sorted(th):
            raise SchedulerError(
                f"thresholds must be increasing positive device-seconds, got {list(thresholds)}"
            )
        if not (math.isfinite(promote_knob) and promote_knob >= 0):
            raise SchedulerError(f"promote_knob must be >= 0, got {promote_knob}")
        self.thresholds = th
        self.promote_knob = float(promote_knob)

    def params(self) -> dict[str, Any]:
        return {"thresholds": list(self.thresholds), "promote_knob": self.promote_knob}

    def _service(self, r: JobRecord) -> float:
        return r.attained_device_s - float(r.data.get("las_base", 0.0))

    def _update_queues(self, view: View) -> None:
        for r in view.records:
            d = r.data
            if "las_q" not in d:
                d.update(las_q=0, las_base=0.0, las_exec_base=0.0, las_entered=view.now)
            q = int(d["las_q"])
            while q < len(self.thresholds) and self._service(r) >= self.thresholds[q] - 1e-6:
                q += 1
                d["las_entered"] = view.now
            d["las_q"] = q
            executed = r.executed_s - float(d["las_exec_base"])
            if (
                self.promote_knob > 0
                and r.status == "waiting"
                and q > 0
                and executed > 0
                and r.current_wait(view.now) >= self.promote_knob * executed
            ):
                d.update(
                    las_q=0, las_base=r.attained_device_s, las_exec_base=r.executed_s, las_entered=view.now
                )

    def next_tick(self, view: View) -> float | None:
        """When the next running job crosses its queue's threshold (a demotion), or a promotion is due."""
        due = []
        for r in view.records:
            q = int(r.data.get("las_q", 0))
            if r.running and r.placement is not None and q < len(self.thresholds):
                left = self.thresholds[q] - self._service(r)
                due.append(view.now + max(left, 0.0) / len(r.placement.devices))
            if self.promote_knob > 0 and r.status == "waiting" and q > 0 and r.wait_since_s is not None:
                executed = r.executed_s - float(r.data.get("las_exec_base", 0.0))
                if executed > 0:
                    due.append(r.wait_since_s + self.promote_knob * executed)
        due = [t for t in due if t > view.now + 1e-6]
        return min(due) if due else None

    def decide(self, view: View) -> PolicyResult:
        self._update_queues(view)
        res = PolicyResult()
        order = sorted(
            enumerate(view.records),
            key=lambda ir: (
                int(ir[1].data["las_q"]),
                0 if ir[1].running else 1,
                ir[1].data["las_entered"],
                ir[0],
            ),
        )
        placer = view.placer()
        undecided = {d for r in view.running() if r.placement is not None for d in r.placement.devices}
        for _, r in order:
            mine = set(r.placement.devices) if r.placement is not None else set()
            undecided -= mine
            if r.running:
                a = _keep(placer, r)
                if a is not None:
                    res.assignments[r.id] = a
                    continue
            shapes = rigid_shapes(view, r)
            if not shapes:
                res.reasons[r.id] = _no_fit(view, r)
                continue
            # Free devices first; else those of running jobs further down the queues (they are preempted).
            a = _first_fit(placer, r, shapes, avoid=undecided) or _first_fit(placer, r, shapes)
            if a is None:
                res.reasons[r.id] = f"queue {r.data['las_q']}: {shapes[0][0].devices} devices are not free"
                continue
            res.assignments[r.id] = a
        for r in view.running():
            if r.id not in res.assignments:
                res.reasons[r.id] = f"preempted for jobs in queue {r.data['las_q']} or above"
        res.info = {"reasons": dict(res.reasons)}
        return res


class GavelPolicy(_Rigid):
    """Gavel's max-min fairness with round-based scheduling (see module docstring).

    Args:
        round_s: round length in seconds (Gavel's default: 6 minutes).
    """

    name = "gavel"

    def __init__(self, round_s: float = 360.0) -> None:
        if not (math.isfinite(round_s) and round_s > 0):
            raise SchedulerError(f"round_s must be a positive number of seconds, got {round_s}")
        self.round_s = float(round_s)

    def params(self) -> dict[str, Any]:
        return {"round_s": self.round_s}

    def next_tick(self, view: View) -> float | None:
        if not view.records:
            return None
        return (math.floor(view.now / self.round_s + 1e-9) + 1) * self.round_s

    def _is_round(self, now: float) -> bool:
        k = round(now / self.round_s)
        return abs(now - k * self.round_s) <= 1e-6 * max(1.0, self.round_s)

    @staticmethod
    def _lp(tp: list[list[float]], z: list[list[float]], w: list[float], n: list[int]) -> list[list[float]]:
        """Gavel's max-min program: ``max t`` s.t. ``t <= sum_k tp[j][k] z[j][k] X[j,k] / w[j]``."""
        solver = pywraplp.Solver.CreateSolver("GLOP")
        if solver is None:
            raise SchedulerError("OR-Tools GLOP is not available")
        nj, nk = len(tp), len(n)
        x = [
            [solver.NumVar(0.0, 1.0 if tp[j][k] > 0 else 0.0, f"x{j}_{k}") for k in range(nk)]
            for j in range(nj)
        ]
        t = solver.NumVar(0.0, solver.infinity(), "t")
        for j in range(nj):
            solver.Add(sum(x[j]) <= 1.0)
            solver.Add(t <= sum(tp[j][k] * z[j][k] / w[j] * x[j][k] for k in range(nk)))
        for k in range(nk):
            solver.Add(sum(z[j][k] * x[j][k] for j in range(nj)) <= n[k])
        solver.Maximize(t)
        status = solver.Solve()
        if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
            return [[0.0] * nk for _ in range(nj)]
        return [[min(1.0, max(0.0, x[j][k].solution_value())) for k in range(nk)] for j in range(nj)]

    def decide(self, view: View) -> PolicyResult:
        res = PolicyResult()
        placer = view.placer()
        if not self._is_round(view.now):
            # Between rounds the lease holds: running jobs go on, nobody starts.
            for r in view.running():
                a = _keep(placer, r)
                if a is not None:
                    res.assignments[r.id] = a
            for r in view.waiting():
                res.reasons[r.id] = f"waits for the next round (every {self.round_s:.0f} s)"
            res.info = {"reasons": dict(res.reasons)}
            return res
        jobs = view.records
        pools = view.pools
        shapes: list[dict[int, tuple[Shape, Price]]] = []
        for r in jobs:
            shapes.append({s.pool: (s, p) for s, p in rigid_shapes(view, r)})
        tp = [
            [shapes[j][k][1].throughput_samples_s if k in shapes[j] else 0.0 for k in range(len(pools))]
            for j in range(len(jobs))
        ]
        z = [
            [float(shapes[j][k][0].devices) if k in shapes[j] else 1.0 for k in range(len(pools))]
            for j in range(len(jobs))
        ]
        n = [p.num_devices for p in pools]
        w = [PRIORITY_WEIGHTS[r.spec.priority] for r in jobs]
        ones = [[1.0 if tp[j][k] > 0 else 0.0 for k in range(len(pools))] for j in range(len(jobs))]
        x_iso = self._lp(ones, z, [1.0] * len(jobs), n)
        iso = [sum(tp[j][k] * x_iso[j][k] for k in range(len(pools))) for j in range(len(jobs))]
        norm = [
            [tp[j][k] / iso[j] if iso[j] > 0 else 0.0 for k in range(len(pools))] for j in range(len(jobs))
        ]
        x = self._lp(norm, z, w, n)
        order = []
        for j, r in enumerate(jobs):
            elapsed = max(view.now - r.submitted_s, 1e-9)
            for k in range(len(pools)):
                if k not in shapes[j] or x[j][k] <= 1e-9:
                    continue
                share = r.service_s.get(k, 0.0) / elapsed
                prio = math.inf if share <= 0 else x[j][k] / share
                order.append((-prio, -x[j][k], j, k))
        order.sort()
        scheduled: set[int] = set()
        # Leases: a job rescheduled on its kind keeps its devices, so place those before the others.
        chosen: list[tuple[int, int]] = []
        cap = {k: n[k] for k in range(len(pools))}
        for _, _, j, k in order:
            if j in scheduled or cap[k] < shapes[j][k][0].devices:
                continue
            scheduled.add(j)
            cap[k] -= shapes[j][k][0].devices
            chosen.append((j, k))
        renewals = [(j, k) for j, k in chosen if jobs[j].shape == shapes[j][k][0]]
        for j, k in renewals + [jk for jk in chosen if jk not in renewals]:
            r = jobs[j]
            shape, price = shapes[j][k]
            if r.shape == shape and r.placement is not None and placer.is_free(r.placement.devices):
                placer.take(r.placement.devices)
                res.assignments[r.id] = Assignment(shape, r.placement.devices, price)
                continue
            got = placer.place(shape, r.placement.devices if r.placement is not None else ())
            if got is not None:
                res.assignments[r.id] = Assignment(shape, got, price)
        for j, r in enumerate(jobs):
            if r.id not in res.assignments:
                res.reasons[r.id] = (
                    _no_fit(view, r) if not shapes[j] else "not scheduled this round (lower max-min priority)"
                )
        res.info = {"reasons": dict(res.reasons)}
        return res


class StrictPriorityPolicy(_Rigid):
    """Strict priority with naive preemption (see module docstring)."""

    name = "strict-priority"

    def decide(self, view: View) -> PolicyResult:
        res = PolicyResult()
        placer = view.placer()
        kept: dict[str, Assignment] = {}
        for r in view.running():
            a = _keep(placer, r)
            if a is not None:
                kept[r.id] = a
        order = sorted(enumerate(view.waiting()), key=lambda ir: (priority_rank(ir[1].spec.priority), ir[0]))
        for _, r in order:
            shapes = rigid_shapes(view, r)
            if not shapes:
                res.reasons[r.id] = _no_fit(view, r)
                continue
            a = _first_fit(placer, r, shapes)
            if a is None:
                rank = priority_rank(r.spec.priority)
                victims = sorted(
                    (v for v in view.running() if v.id in kept and priority_rank(v.spec.priority) > rank),
                    key=lambda v: (
                        -priority_rank(v.spec.priority),
                        -(v.placement.since_s if v.placement else 0.0),
                        v.id,
                    ),
                )
                stopped = []
                for v in victims:
                    placer.release(kept[v.id].devices)
                    stopped.append(v)
                    a = _first_fit(placer, r, shapes)
                    if a is not None:
                        break
                if a is None:
                    for v in stopped:
                        placer.take(kept[v.id].devices)
                    res.reasons[r.id] = (
                        f"{shapes[0][0].devices} devices are held by jobs of equal or higher priority"
                    )
                    continue
                for v in stopped:
                    del kept[v.id]
                    res.reasons[v.id] = f"preempted by {r.spec.priority}-priority job {r.id}"
            res.assignments[r.id] = a
        res.assignments.update(kept)
        res.info = {"reasons": dict(res.reasons)}
        return res
