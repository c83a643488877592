"""The distplan policy on small real cases (the planner prices every shape): priced preemption, co-location
only where memory fits, ageing against starvation, and plans addressed to the cluster's devices."""

from __future__ import annotations

from scheduler_helpers import TINY, job, make_cluster

from distplan.scheduler import (
    DistplanPolicy,
    GraphSource,
    JobSet,
    JobSpec,
    Pricer,
    RestartModel,
    Scheduler,
    StrictPriorityPolicy,
    make_policy,
    simulate,
)
from distplan.scheduler.shapes import Shape, pools_of


def _steps(pricer: Pricer, spec: JobSpec, graph, seconds: float) -> int:
    """Steps that take ``seconds`` on one device of the cluster's first pool."""
    pool = pools_of(pricer.cluster)[0]
    thr = pricer.price(spec, graph, pool, Shape(pool.index, 1, 1)).throughput_samples_s
    return max(1, round(seconds * thr / spec.global_batch))


def test_high_priority_arrival_preempts_the_job_cheapest_to_restart(graphs) -> None:
    cluster = make_cluster("two-a100", per_host=2)
    # Checkpoints go over a slow 1 MB/s link: the big job's restart costs minutes, the small one's seconds.
    pricer = Pricer(cluster, restart=RestartModel(restart_overhead_s=5.0, storage_bandwidth_bytes_s=1e6))
    g = {"small": graphs["tiny"], "big": graphs["fat"]}
    small = job("small-low", "small", priority="low")
    big = job("big-low", "big", priority="low")
    # Equal remaining work in seconds, so the two differ only in what a restart costs them.
    small = JobSpec(**{**small.to_dict(), "total_steps": _steps(pricer, small, g["small"], 3600)})
    big = JobSpec(**{**big.to_dict(), "total_steps": _steps(pricer, big, g["big"], 3600)})
    high = job("urgent", "small", priority="high", arrival_s=100.0)
    assert pricer.restart_s(big, g["big"], 1, 1) > 10 * pricer.restart_s(small, g["small"], 1, 1)

    def run(policy):
        s = Scheduler(cluster, policy, pricer=pricer, graphs=g)
        s.submit(small, 0.0)
        s.submit(big, 10.0)
        before = {r.id: r.placement.devices for r in s.jobs.values() if r.placement}
        s.submit(high, 100.0)
        s.allocation().check(cluster.num_devices)
        return s, before

    s, before = run(DistplanPolicy(colocation=False))
    assert s.record("urgent").running
    assert s.record("big-low").running and s.record("big-low").placement.devices == before["big-low"]
    assert s.record("small-low").status == "waiting"
    assert [e.job_id for e in s.events if e.kind == "preempt"] == ["small-low"]
    # Naive preemption stops the most recently started low job -- the expensive one.
    naive, _ = run(StrictPriorityPolicy())
    assert naive.record("urgent").running and naive.record("big-low").status == "waiting"


def _memory(graphs) -> int:
    c = make_cluster("probe", per_host=1)
    pool = pools_of(c)[0]
    return Pricer(c).price(job("probe", "fat"), graphs["fat"], pool, Shape(pool.index, 1, 1)).memory_bytes


def test_colocation_only_when_memory_fits(graphs) -> None:
    mem = _memory(graphs)
    g = {"fat": graphs["fat"]}
    a, b = job("a", "fat"), job("b", "fat", arrival_s=1.0)
    outcome = {}
    for label, capacity in (("fits two", 2.5 * mem), ("fits one", 1.5 * mem)):
        cluster = make_cluster(
            label.replace(" ", "-"), per_host=1, memory_bytes=int(capacity), memory_reserved_bytes=0
        )
        s = Scheduler(cluster, DistplanPolicy(), graphs=g)
        s.submit(a)
        s.submit(b)
        alloc = s.allocation()
        alloc.check(cluster.num_devices)
        outcome[label] = (
            {p.job_id: p.colocated_with for p in alloc.running},
            [w.job_id for w in alloc.waiting],
        )
    assert outcome["fits two"] == ({"a": ("b",), "b": ("a",)}, [])
    running, waiting = outcome["fits one"]
    assert len(running) == 1 and len(waiting) == 1 and list(running.values()) == [()]


def _stream(pricer: Pricer, graph) -> JobSet:
    """A long low-priority job, then normal jobs back to back on one device for about two hours."""
    low = JobSpec("long-low", "tiny", 8, priority="low", total_steps=1)
    low = JobSpec(**{**low.to_dict(), "total_steps": _steps(pricer, low, graph, 1500.0)})
    short = _steps(pricer, JobSpec("x", "tiny", 8), graph, 300.0)
    jobs = [low] + [
        JobSpec(f"n{i:02d}", "tiny", 8, priority="normal", arrival_s=10.0 + 250.0 * i, total_steps=short)
        for i in range(30)
    ]
    return JobSet("stream", {"tiny": GraphSource("synthetic", dict(TINY))}, tuple(jobs))


def test_ageing_bounds_the_wait_of_a_low_priority_job(graphs) -> None:
    cluster = make_cluster("one-a100", per_host=1)
    pricer = Pricer(cluster)
    trace = _stream(pricer, graphs["tiny"])
    g = {"tiny": graphs["tiny"]}
    bound = 900.0
    aged = simulate(
        trace, cluster, DistplanPolicy(colocation=False, ageing_bound_s=bound), pricer=pricer, graphs=g
    )
    never = simulate(
        trace, cluster, DistplanPolicy(colocation=False, ageing_bound_s=1e9), pricer=pricer, graphs=g
    )
    low = {
        r.policy + str(i): next(o for o in r.outcomes if o.id == "long-low")
        for i, r in enumerate((aged, never))
    }
    with_ageing, without = low["distplan0"], low["distplan1"]
    assert aged.metrics()["finished"] == len(trace.jobs)
    # Preempted by the first normal job, it waits exactly the bound, then outranks every normal job.
    assert bound - 1 <= with_ageing.longest_wait_s <= bound + 1e-6
    assert any(e.kind == "age" and e.job_id == "long-low" for e in aged.scheduler.events)
    # Without ageing the stream of normal work starves it for much longer.
    assert without.longest_wait_s > 3 * bound


def test_running_job_plan_is_addressed_to_the_cluster(graphs) -> None:
    cluster = make_cluster("two-hosts", per_host=4, hosts=2)
    s = Scheduler(cluster, make_policy("distplan"), graphs={"tiny": graphs["tiny"]})
    s.submit(job("filler", min_devices=4, max_devices=4))
    s.submit(job("j", min_devices=2, max_devices=2, arrival_s=1.0))
    for jid in ("filler", "j"):
        pl = s.allocation().placement(jid)
        assert pl is not None
        plan = s.plan(jid)
        plan.check(graphs["tiny"], cluster)
        assert set(plan.devices_used) <= set(pl.devices)
        assert plan.layout == pl.layout
