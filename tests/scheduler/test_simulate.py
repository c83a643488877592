"""Every policy on the same small trace through the same simulator: jobs finish, allocations are valid at
every decision, runs repeat exactly, and the distplan policy beats FIFO on completion time."""

from __future__ import annotations

import pytest
from scheduler_helpers import make_cluster

from distplan.scheduler import (
    CATALOGUE,
    POLICIES,
    Pricer,
    SchedulerError,
    generate_trace,
    make_policy,
    simulate,
)

CONTRACT = {
    "cluster": str,
    "trace": str,
    "policy": str,
    "avg_jct_s": float,
    "p99_jct_s": float,
    "makespan_s": float,
    "utilisation": float,
    "high_priority_p99_wait_s": float,
    "preemptions": int,
    "max_wait_s": float,
}


@pytest.fixture(scope="module")
def setting():
    cluster = make_cluster("two-by-four", per_host=4, hosts=2)
    pricer = Pricer(cluster)
    # Two small model classes keep the planner's work to a few shapes; a high load makes jobs queue.
    trace = generate_trace(24, cluster, seed=2, load=2.0, catalogue=CATALOGUE[:2], pricer=pricer)
    return cluster, pricer, trace


def _stable(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith(("decision", "allocation", "pricing"))}


@pytest.mark.parametrize("name", POLICIES)
def test_policy_finishes_every_job_with_valid_allocations(setting, name) -> None:
    cluster, pricer, trace = setting
    checked = []

    def check(decision) -> None:
        sched = check.sched  # type: ignore[attr-defined]
        sched.allocation().check(cluster.num_devices)
        checked.append(decision.time_s)

    from distplan.scheduler import core

    real_init = core.Scheduler.__init__

    def spy(self, *a, **kw):  # keep a handle on the simulator's scheduler to check its allocations
        real_init(self, *a, **kw)
        check.sched = self  # type: ignore[attr-defined]

    core.Scheduler.__init__ = spy  # type: ignore[method-assign]
    try:
        res = simulate(trace, cluster, make_policy(name), pricer=pricer, on_decision=check)
    finally:
        core.Scheduler.__init__ = real_init  # type: ignore[method-assign]
    m = res.metrics()
    assert m["finished"] == len(trace.jobs), res.unfinished
    assert len(checked) == m["decisions"] >= len(trace.jobs)
    for k, t in CONTRACT.items():
        assert isinstance(m[k], t), (k, m[k])
    assert m["policy"] == name and 0 < m["utilisation"] <= 1
    assert m["p99_jct_s"] >= m["avg_jct_s"] > 0 and m["makespan_s"] >= max(o.jct_s for o in res.outcomes)
    if name == "fifo":
        assert m["preemptions"] == 0
    again = simulate(trace, cluster, make_policy(name), pricer=pricer)
    assert _stable(again.metrics()) == _stable(m)


def test_distplan_beats_fifo_on_average_completion_time(setting) -> None:
    cluster, pricer, trace = setting
    d = simulate(trace, cluster, make_policy("distplan"), pricer=pricer).metrics()
    f = simulate(trace, cluster, make_policy("fifo"), pricer=pricer).metrics()
    assert d["avg_jct_s"] < f["avg_jct_s"]
    assert d["high_priority_p99_wait_s"] <= f["high_priority_p99_wait_s"]


@pytest.mark.parametrize("objective", ["throughput", "max-min", "finish-time"])
def test_distplan_objective_variants_finish_every_job(setting, objective) -> None:
    cluster, pricer, trace = setting
    res = simulate(trace, cluster, make_policy("distplan", objective=objective), pricer=pricer)
    m = res.metrics()
    assert m["finished"] == len(trace.jobs), res.unfinished
    assert all(d.info.get("statuses") for d in res.scheduler.decisions if d.active_jobs)


def test_simulation_needs_to_know_when_jobs_end(setting) -> None:
    cluster, pricer, trace = setting
    from dataclasses import replace

    open_ended = replace(
        trace, jobs=(replace(trace.jobs[0], total_steps=None, run_steps=None), *trace.jobs[1:])
    )
    with pytest.raises(SchedulerError, match="neither run_steps nor total_steps"):
        simulate(open_ended, cluster, make_policy("fifo"), pricer=pricer)
