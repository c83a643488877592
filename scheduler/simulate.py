"""Replay a job set on a cluster under a policy, in simulated time, and measure it.

The simulator drives a :class:`~distplan.scheduler.core.Scheduler` (the same object a live service would
use) with the job set's arrivals, the completions its own clock predicts, and the ticks the policy asks
for. A job runs at the throughput of its plan (the planner's prediction, divided by any co-location
slowdown) from the moment its restart is over (see [Note: progress] in ``distplan.scheduler.core``) and
finishes after ``run_steps`` steps. Events at the same instant are handled together, completions first,
then arrivals, then one decision.

[Note: metrics]
Over the jobs that finished: ``avg_jct_s`` / ``p99_jct_s``, job completion time (finish - arrival), mean
and 99th percentile (linear interpolation); ``makespan_s``, last finish - first arrival; ``utilisation``,
device-seconds held by jobs (restarts included, a shared device once) over devices x makespan;
``high_priority_p99_wait_s``, 99th percentile of the high-priority jobs' queueing delay; ``preemptions``,
times a running job was stopped, moved or resized by the scheduler; ``max_wait_s``, the largest queueing
delay. A job's *queueing delay* is all the time it spent submitted but without devices (before its first
start and after every preemption); ``max_continuous_wait_s`` is the longest single such stretch, the
quantity the distplan policy's ageing bound limits. Decision times are wall-clock seconds per decision,
including any planner call a decision still makes (``pricing_total_s``: none when every shape was priced at
submission). A job's shapes are priced when it is submitted (see [Note: pricing off the decision path] in
``distplan.scheduler.core``): ``submit_pricing_total_s`` / ``submit_pricing_max_s`` are the wall seconds of
that pricing in all and for the costliest submission (planner calls on a cold cache, lookups otherwise),
``submit_planner_calls`` the planner calls it made.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distplan.cluster import Cluster
from distplan.graph import OpGraph

from .core import Decision, Policy, Scheduler
from .model import GraphSource, JobSet, SchedulerError
from .pricing import Pricer

__all__ = ["JobOutcome", "SimulationResult", "simulate"]

#: Completions closer than this (seconds) are simultaneous.
_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """One job's fate in a simulation (times in seconds; ``finish_s`` None if it never finished)."""

    id: str
    priority: str
    arrival_s: float
    first_start_s: float | None
    finish_s: float | None
    wait_s: float
    longest_wait_s: float
    preemptions: int
    deadline_s: float | None = None

    @property
    def jct_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "priority": self.priority,
            "arrival_s": self.arrival_s,
            "first_start_s": self.first_start_s,
            "finish_s": self.finish_s,
            "jct_s": self.jct_s,
            "wait_s": self.wait_s,
            "longest_wait_s": self.longest_wait_s,
            "preemptions": self.preemptions,
            "deadline_s": self.deadline_s,
        }


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else 0.0


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """A simulation's outcome (see [Note: metrics]).

    Attributes:
        cluster / trace / policy: names.
        num_devices: the cluster's devices.
        outcomes: per job, in job-set order.
        unfinished: ``(job id, reason)`` for jobs that never finished (no shape fits them, or the run was cut
            short by ``max_decisions``).
        busy_device_s: device-seconds held by jobs.
        decisions: per decision, ``(wall seconds, pricing seconds, active jobs)``.
        submissions: per submitted job, ``(wall seconds of pricing its shapes, planner calls)``.
        truncated: the run stopped at ``max_decisions``.
        scheduler: the scheduler at the end (its state, events and allocations).
    """

    cluster: str
    trace: str
    policy: str
    num_devices: int
    outcomes: tuple[JobOutcome, ...]
    unfinished: tuple[tuple[str, str], ...]
    busy_device_s: float
    decisions: tuple[tuple[float, float, int], ...]
    submissions: tuple[tuple[float, int], ...] = ()
    truncated: bool = False
    scheduler: Scheduler | None = field(default=None, compare=False, repr=False)

    def metrics(self) -> dict[str, Any]:
        """The benchmark row: the contract's keys (see [Note: metrics]) first, then extras."""
        done = [o for o in self.outcomes if o.finish_s is not None]
        jct = [o.jct_s for o in done if o.jct_s is not None]
        first = min((o.arrival_s for o in self.outcomes), default=0.0)
        last = max((o.finish_s for o in done if o.finish_s is not None), default=first)
        makespan = max(last - first, 0.0)
        high = [o.wait_s for o in self.outcomes if o.priority == "high"]
        secs = [d[0] for d in self.decisions]
        pricing = [d[1] for d in self.decisions]
        alloc = [d[0] - d[1] for d in self.decisions]
        return {
            "cluster": self.cluster,
            "trace": self.trace,
            "policy": self.policy,
            "avg_jct_s": float(np.mean(jct)) if jct else 0.0,
            "p99_jct_s": _pct(jct, 99),
            "makespan_s": makespan,
            "utilisation": self.busy_device_s / (self.num_devices * makespan) if makespan > 0 else 0.0,
            "high_priority_p99_wait_s": _pct(high, 99),
            "preemptions": int(sum(o.preemptions for o in self.outcomes)),
            "max_wait_s": max((o.wait_s for o in self.outcomes), default=0.0),
            # extras
            "max_continuous_wait_s": max((o.longest_wait_s for o in self.outcomes), default=0.0),
            "jobs": len(self.outcomes),
            "finished": len(done),
            "unfinished": len(self.unfinished),
            "deadlines_missed": sum(
                1
                for o in self.outcomes
                if o.deadline_s is not None and (o.finish_s is None or o.finish_s > o.deadline_s)
            ),
            "decisions": len(self.decisions),
            "decision_mean_s": float(np.mean(secs)) if secs else 0.0,
            "decision_p50_s": _pct(secs, 50),
            "decision_p99_s": _pct(secs, 99),
            "decision_max_s": max(secs, default=0.0),
            "allocation_p99_s": _pct(alloc, 99),
            "allocation_max_s": max(alloc, default=0.0),
            "pricing_total_s": float(sum(pricing)),
            "submit_pricing_total_s": float(sum(x[0] for x in self.submissions)),
            "submit_pricing_max_s": max((x[0] for x in self.submissions), default=0.0),
            "submit_planner_calls": int(sum(x[1] for x in self.submissions)),
            "max_active_jobs": max((d[2] for d in self.decisions), default=0),
            "truncated": self.truncated,
        }


def simulate(
    jobs: JobSet,
    cluster: Cluster,
    policy: Policy,
    *,
    pricer: Pricer | None = None,
    graphs: Mapping[str, OpGraph] | None = None,
    base_dir: str | Path | None = None,
    max_decisions: int | None = None,
    on_decision: Callable[[Decision], None] | None = None,
    observe: Callable[[Scheduler, Decision], None] | None = None,
) -> SimulationResult:
    """Replay ``jobs`` on ``cluster`` under ``policy`` (see the module docstring).

    Args:
        pricer: share one between runs on the same cluster to price each shape once.
        graphs: the job set's graphs, when already built (else built from the job set's sources, relative
            to ``base_dir``).
        max_decisions: stop after this many decisions (for decision-time measurements at scale).
        on_decision: called after each decision (progress display).
        observe: called after each decision with the scheduler (to inspect its state: allocations, waits).

    Raises:
        SchedulerError: a job has neither ``run_steps`` nor ``total_steps``; the policy misbehaves.
    """
    missing = [j.id for j in jobs.jobs if j.run_samples is None]
    if missing:
        raise SchedulerError(
            f"{len(missing)} job(s) have neither run_steps nor total_steps, so a simulation cannot know when "
            f"they end: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    g = dict(graphs) if graphs is not None else jobs.load_graphs(base_dir)
    # The scheduler's state keeps the graphs' sources; file paths are made absolute so that a saved state
    # reloads from anywhere.
    sources = {
        k: GraphSource("file", {"file": str((Path(base_dir or ".") / src.spec["file"]).resolve())})
        if src.kind == "file"
        else src
        for k, src in jobs.graphs.items()
    }
    sched = Scheduler(
        cluster,
        policy,
        pricer=pricer if pricer is not None else Pricer(cluster),
        graphs=g,
        sources=sources,
    )
    order = sorted(range(len(jobs.jobs)), key=lambda i: (jobs.jobs[i].arrival_s, i))
    run = {j.id: float(j.run_samples) for j in jobs.jobs if j.run_samples is not None}
    nxt = 0
    decisions: list[tuple[float, float, int]] = []
    truncated = False
    limit = 50 * len(jobs.jobs) + 10_000
    if order:
        sched.advance(jobs.jobs[order[0]].arrival_s)
    for _ in range(limit):
        now = sched.now
        done_at: dict[str, float] = {}
        for rec in sched.jobs.values():
            pl = rec.placement
            if not rec.running or pl is None:
                continue
            left = max(run[rec.id] - rec.samples_done, 0.0)
            done_at[rec.id] = max(now, pl.progress_from_s) + left / pl.throughput_samples_s
        t_done = min(done_at.values(), default=math.inf)
        t_arr = jobs.jobs[order[nxt]].arrival_s if nxt < len(order) else math.inf
        tick = sched.next_tick()
        t_tick = tick if tick is not None and tick > now + _EPS else math.inf
        t = min(t_done, t_arr, t_tick)
        if math.isinf(t):
            break
        sched.advance(t)
        triggers: list[str] = []
        for jid, td in sorted(done_at.items(), key=lambda kv: (kv[1], kv[0])):
            if td <= t + _EPS:
                sched.finish(jid, t, decide=False)
                triggers.append(f"finish {jid}")
        while nxt < len(order) and jobs.jobs[order[nxt]].arrival_s <= t + _EPS:
            job = jobs.jobs[order[nxt]]
            sched.submit(job, t, decide=False)
            triggers.append(f"arrival {job.id}")
            nxt += 1
        t0 = time.perf_counter()
        d = sched.decide(t, ", ".join(triggers[:3]) + (" ..." if len(triggers) > 3 else "") or "tick")
        decisions.append((time.perf_counter() - t0, d.pricing_seconds, d.active_jobs))
        if on_decision is not None:
            on_decision(d)
        if observe is not None:
            observe(sched, d)
        if max_decisions is not None and len(decisions) >= max_decisions:
            truncated = True
            break
        if nxt >= len(order) and not any(r.active for r in sched.jobs.values()):
            break
    else:
        raise SchedulerError(
            f"the simulation did not end within {limit} steps (a policy that never settles?)"
        )
    reasons = {w.job_id: w.reason for w in sched.allocation().waiting}
    outcomes = []
    unfinished = []
    for j in jobs.jobs:
        book = sched.jobs.get(j.id)
        if book is None:
            outcomes.append(JobOutcome(j.id, j.priority, j.arrival_s, None, None, 0.0, 0.0, 0, j.deadline_s))
            unfinished.append((j.id, "not submitted before the run stopped"))
            continue
        wait = book.total_wait_s + book.current_wait(sched.now)
        longest = max(book.longest_wait_s, book.current_wait(sched.now))
        outcomes.append(
            JobOutcome(
                j.id,
                j.priority,
                book.submitted_s,
                book.first_start_s,
                book.finish_s if book.status == "finished" else None,
                wait,
                longest,
                book.preemptions,
                j.deadline_s,
            )
        )
        if book.status != "finished":
            unfinished.append((j.id, reasons.get(j.id, book.status)))
    return SimulationResult(
        cluster=cluster.name,
        trace=jobs.name,
        policy=policy.name,
        num_devices=cluster.num_devices,
        outcomes=tuple(outcomes),
        unfinished=tuple(unfinished),
        busy_device_s=sched.busy_device_s,
        decisions=tuple(decisions),
        submissions=tuple((p.seconds, p.planner_calls) for p in sched.pricings),
        truncated=truncated,
        scheduler=sched,
    )
