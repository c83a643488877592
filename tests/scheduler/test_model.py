"""The scheduler's data: jobs and traces read back exactly and reject bad input by name; the generator is
seeded; a scheduler's state survives a JSON round trip and goes on deciding the same way."""

from __future__ import annotations

import json
import re

import pytest
from scheduler_helpers import TINY, job, make_cluster

from distplan.profiles import load_cluster
from distplan.scheduler import (
    CATALOGUE,
    Allocation,
    GraphSource,
    JobSet,
    JobSpec,
    Placement,
    Pricer,
    Scheduler,
    SchedulerError,
    generate_trace,
    make_policy,
)
from distplan.scheduler.pricing import Price


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"id": "bad id!"}, "job id must be"),
        ({"global_batch": 0}, "global_batch must be an integer >= 1, got 0"),
        ({"dtype": "int8"}, "dtype must be one of fp32, bf16, fp16, got 'int8'"),
        ({"priority": "urgent"}, "priority must be one of high, normal, low"),
        ({"min_devices": 8, "max_devices": 2}, "min_devices 8 is above max_devices 2 (by 6)"),
        ({"arrival_s": -1.0}, "arrival_s must be a finite number >= 0"),
        ({"arrival_s": 10.0, "deadline_s": 4.0}, "deadline_s 4 is not after arrival_s 10 (by 6 s)"),
        ({"total_steps": 0}, "total_steps must be an integer >= 1 or null"),
    ],
)
def test_bad_job_is_named(fields, message) -> None:
    base = {"id": "j", "graph": "g", "global_batch": 8}
    with pytest.raises(SchedulerError, match=re.escape(message)):
        JobSpec(**{**base, **fields})


def test_job_set_reads_back_exactly_and_checks_references(tmp_path, graphs) -> None:
    graphs["tiny"].save(tmp_path / "tiny.json")
    js = JobSet(
        "mixed-sources",
        {
            "syn": GraphSource("synthetic", dict(TINY)),
            "file": GraphSource("file", {"file": "tiny.json"}),
            "inline": GraphSource("graph", {"graph": graphs["tiny"].to_dict()}),
        },
        (
            job("a", "syn", priority="high", deadline_s=100.0),
            job("b", "file", total_steps=None, run_steps=7),
            job("c", "inline", arrival_s=3.5),
        ),
        seed=3,
    )
    path = tmp_path / "jobs.json"
    js.save(path)
    back = JobSet.load(path)
    assert back == js
    loaded = back.load_graphs(tmp_path)
    assert {k: g.content_hash for k, g in loaded.items()} == dict.fromkeys(
        loaded, graphs["tiny"].content_hash
    )
    # total_samples stands for whole steps only
    d = js.to_dict()
    d["jobs"][0] = {**d["jobs"][0], "total_steps": None, "total_samples": 80}
    assert JobSet.from_dict(d).jobs[0].total_steps == 10
    d["jobs"][0]["total_samples"] = 81
    with pytest.raises(SchedulerError, match="81 is not a whole number of steps of global_batch 8"):
        JobSet.from_dict(d)
    d = js.to_dict()
    d["jobs"][1]["graph"] = "nope"
    with pytest.raises(SchedulerError, match="unknown graph 'nope'"):
        JobSet.from_dict(d)
    d = js.to_dict()
    d["jobs"][2]["id"] = "a"
    with pytest.raises(SchedulerError, match="duplicate job id 'a'"):
        JobSet.from_dict(d)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SchedulerError, match=r"broken\.json"):
        JobSet.load(tmp_path / "broken.json")


def test_trace_generator_is_seeded_and_follows_its_parameters() -> None:
    cluster = load_cluster("a100x8-v100x8")
    a = generate_trace(60, cluster, seed=4, catalogue=CATALOGUE[:3])
    b = generate_trace(60, cluster, seed=4, catalogue=CATALOGUE[:3])
    c = generate_trace(60, cluster, seed=5, catalogue=CATALOGUE[:3])
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    assert JobSet.from_json(a.to_json()) == a
    arrivals = [j.arrival_s for j in a.jobs]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    assert {j.priority for j in a.jobs} == {"high", "normal", "low"}
    assert all(j.max_devices <= 8 and j.run_steps for j in a.jobs)  # the largest pool holds 8
    assert any(j.total_steps is None for j in a.jobs) and any(j.total_steps for j in a.jobs)
    with pytest.raises(SchedulerError, match="num_jobs must be between 1 and 100000"):
        generate_trace(0, cluster)


def test_allocation_check_finds_a_device_used_twice() -> None:
    def pl(jid: str, devices: tuple[int, ...], co: tuple[str, ...] = ()) -> Placement:
        return Placement(jid, devices, "k", "p", "1f1b m1x1 | 0:1@0", 1.0, 1.0, 0.0, 0.0, co)

    Allocation(0.0, (pl("a", (0,), ("b",)), pl("b", (0,), ("a",)))).check(2)
    with pytest.raises(SchedulerError, match="device 1 is used by jobs 'a' and 'b'"):
        Allocation(0.0, (pl("a", (0, 1)), pl("b", (1,)))).check(2)
    with pytest.raises(SchedulerError, match="uses device 5, but the cluster has 2 devices"):
        Allocation(0.0, (pl("a", (5,)),)).check(2)
    alloc = Allocation(0.0, (pl("a", (0,)),))
    assert Allocation.from_dict(json.loads(json.dumps(alloc.to_dict()))) == alloc


def test_price_reads_back_with_its_plan(graphs) -> None:
    c = make_cluster("one", per_host=1)
    pricer = Pricer(c)
    from distplan.scheduler.shapes import Shape, pools_of

    pool = pools_of(c)[0]
    price = pricer.price(job("j"), graphs["tiny"], pool, Shape(0, 1, 1))
    assert price.feasible and price.plan is not None
    assert Price.from_dict(json.loads(json.dumps(price.to_dict()))) == price


def test_price_cache_file_is_reused_and_stale_entries_are_planned_again(tmp_path, graphs) -> None:
    from distplan.scheduler.shapes import Shape, pools_of

    c = make_cluster("one", per_host=1)
    pool = pools_of(c)[0]
    path = tmp_path / "prices.json"
    first = Pricer(c, cache_path=path)
    price = first.price(job("j"), graphs["tiny"], pool, Shape(0, 1, 1))
    first.save()
    again = Pricer(c, cache_path=path)
    assert again.price(job("j"), graphs["tiny"], pool, Shape(0, 1, 1)) == price
    assert (again.calls, again.hits) == (0, 1)
    doc = json.loads(path.read_text())
    (key,) = doc["prices"]
    doc["prices"][key]["plan"]["stages"] = "not stages"  # written by another distplan, say
    path.write_text(json.dumps(doc))
    assert len(Pricer(c, cache_path=path)) == 0
    path.write_text(json.dumps({**doc, "plan_schema_version": -1}))
    assert len(Pricer(c, cache_path=path)) == 0
    path.write_text("{")
    with pytest.raises(SchedulerError, match="cannot be read"):
        Pricer(c, cache_path=path)


def test_state_round_trip_continues_identically(graphs, sources) -> None:
    cluster = make_cluster("two-hosts", per_host=2, hosts=2)
    pricer = Pricer(cluster)
    jobs = [
        job("a", max_devices=4, total_steps=400),
        job("b", priority="high", arrival_s=5.0),
        job("c", priority="low", max_devices=2, arrival_s=6.0),
        job("d", arrival_s=7.0),
        job("e", priority="high", max_devices=2, arrival_s=9.0),
    ]

    def fresh() -> Scheduler:
        return Scheduler(cluster, make_policy("distplan"), pricer=pricer, graphs=graphs, sources=sources)

    s = fresh()
    for j in jobs[:3]:
        s.submit(j)
    saved = json.dumps(s.to_dict())
    restored = Scheduler.from_dict(json.loads(saved), pricer=pricer)
    assert json.loads(json.dumps(restored.to_dict())) == json.loads(saved)
    for sched in (s, restored):
        for j in jobs[3:]:
            sched.submit(j)
        sched.finish("b", 50.0)
        sched.tick(60.0)
    assert restored.allocation() == s.allocation()
    assert [e.to_dict() for e in restored.events] == [e.to_dict() for e in s.events]
    with pytest.raises(SchedulerError, match="schema_version 99 is not supported"):
        Scheduler.from_dict({**json.loads(saved), "schema_version": 99})


def test_scheduler_refuses_inconsistent_events(graphs) -> None:
    s = Scheduler(make_cluster("one", per_host=1), make_policy("fifo"), graphs=graphs)
    s.submit(job("a"))
    with pytest.raises(SchedulerError, match="job 'a' was already submitted"):
        s.submit(job("a"))
    with pytest.raises(SchedulerError, match="graph 'other' is unknown"):
        s.submit(job("b", "other"))
    with pytest.raises(SchedulerError, match="time runs forwards"):
        s.tick(-1.0)
    with pytest.raises(SchedulerError, match="no job 'zzz'"):
        s.finish("zzz", 1.0)
    s.submit(job("w", arrival_s=1.0))
    with pytest.raises(SchedulerError, match="job 'w' is waiting, it cannot finish"):
        s.finish("w", 2.0)
    with pytest.raises(SchedulerError, match="unknown policy 'best'"):
        make_policy("best")
