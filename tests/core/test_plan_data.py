import dataclasses

import pytest

from distplan.errors import PlanError
from distplan.plan import (
    GraphRef,
    Layout,
    LayoutStage,
    Plan,
    PlanRequest,
    Stage,
    build_rank_map,
    parse_layout,
)
from distplan.profiles import load_cluster

GRAPH = GraphRef("g", "h" * 32, "s" * 32)


def make_plan(devs0=(8, 9), devs1=(0, 1), *, global_batch=16, mb=4) -> Plan:
    c = load_cluster("a100x8-v100x8")
    req = PlanRequest(c, global_batch=global_batch)
    stages = (
        Stage(0, 0, 10, devs0, c.devices()[devs0[0]].kind, dp=len(devs0), memory_bytes=2**30),
        Stage(1, 10, 20, devs1, c.devices()[devs1[0]].kind, dp=len(devs1), memory_bytes=2**30),
    )
    ranks = build_rank_map(c, [s.devices for s in stages])
    return Plan(req, GRAPH, stages, mb, global_batch // mb, "1f1b", ranks)


def test_rank_map_is_host_major() -> None:
    p = make_plan()
    # devices 0,1 (a100 host 0) get ranks 0,1 although they run stage 1
    assert [(r.rank, r.device, r.stage, r.replica, r.local_rank) for r in p.rank_map] == [
        (0, 0, 1, 0, 0),
        (1, 1, 1, 1, 1),
        (2, 8, 0, 0, 0),
        (3, 9, 0, 1, 1),
    ]
    assert p.mesh() == [[2, 3], [0, 1]]
    p.check()


def test_plan_round_trip_and_layout() -> None:
    p = make_plan()
    assert Plan.from_json(p.to_json()) == p
    assert p.layout == "1f1b m4x4 | 0:10@8,9 | 10:20@0,1"
    assert parse_layout(p.layout) == Layout(
        "1f1b", 4, 4, (LayoutStage(0, 10, (8, 9)), LayoutStage(10, 20, (0, 1)))
    )
    assert make_plan().id == p.id


def test_check_rejects_bad_plans() -> None:
    with pytest.raises(PlanError, match="device 8 is used by stages 0 and 1"):
        make_plan((8, 9), (8, 10)).check()
    with pytest.raises(PlanError, match="4 microbatches x 2 samples = 8, but global_batch is 10"):
        make_plan(global_batch=10).check()
    with pytest.raises(PlanError, match="not divisible into 3 microbatches"):
        PlanRequest(load_cluster("h100x8"), global_batch=16, microbatches=3)
    d = make_plan().to_dict()
    d["schema_version"] = 7
    with pytest.raises(PlanError, match="schema_version: 7 is not supported"):
        Plan.from_dict(d)


def test_timeline_reads_back_from_its_chrome_trace(tmp_path) -> None:
    from distplan.timeline import Timeline, TimelineEvent

    tl = Timeline(
        events=(
            TimelineEvent(8, 0, "fwd", 0, 0.0, 0.5),
            TimelineEvent(8, 0, "send", 0, 0.5, 0.625),
            TimelineEvent(0, 1, "fwd", 0, 0.625, 1.0),
            TimelineEvent(0, 1, "allreduce", -1, 1.0, 1.25),
        ),
        devices=(8, 0),
        labels=("v100-node:0 stage 0", "a100-node:0 stage 1"),
        iteration_time_s=1.25,
        bubble_fraction=0.3,
    )
    assert Timeline.from_chrome_trace(tl.to_chrome_trace()) == tl
    f = tmp_path / "tl.json"
    f.write_text(tl.to_chrome_trace_json())
    assert Timeline.load(f) == tl
    f.write_text('{"traceEvents": [], "otherData": {}}')
    with pytest.raises(PlanError, match=r"tl\.json: timeline\.otherData\.devices: missing required field"):
        Timeline.load(f)


def test_memory_messages_show_small_budgets_in_a_readable_unit() -> None:
    c = load_cluster(
        {
            "name": "tiny",
            "kinds": [
                {
                    "name": "tiny-cpu",
                    "memory_gib": 0.00002,
                    "memory_reserved_gib": 0,
                    "memory_bandwidth_gbyte_s": 20,
                    "peak_tflops": {"fp32": 0.16},
                }
            ],
            "hosts": [
                {"name": "h", "devices": [{"kind": "tiny-cpu", "count": 2}], "link": {"bandwidth_gbyte_s": 5}}
            ],
        }
    )
    req = PlanRequest(c, global_batch=2)
    stages = (
        Stage(0, 0, 10, (0,), "tiny-cpu", memory_bytes=30_000),
        Stage(1, 10, 20, (1,), "tiny-cpu", memory_bytes=1_000),
    )
    p = Plan(req, GRAPH, stages, 2, 1, "gpipe", build_rank_map(c, [s.devices for s in stages]))
    with pytest.raises(
        PlanError,
        match=r"stage 0 needs 29.3 KiB per device but a tiny-cpu has 21 KiB usable \(8.33 KiB short\)",
    ):
        p.check()


def test_stage_shared_parameter_fields_round_trip_and_are_checked() -> None:
    p = make_plan()
    s0 = dataclasses.replace(p.stages[0], param_bytes=100, shared_param_bytes=40, tied_allreduce_time_s=0.5)
    q = dataclasses.replace(p, stages=(s0, p.stages[1]))
    assert Plan.from_json(q.to_json()) == q
    with pytest.raises(
        PlanError, match="stage 0: shared_param_bytes must be between 0 and param_bytes=100, got 140"
    ):
        dataclasses.replace(s0, shared_param_bytes=140)
    with pytest.raises(PlanError, match="stage 0: tied_allreduce_time_s must be >= 0"):
        dataclasses.replace(s0, tied_allreduce_time_s=-1.0)
    # Plans written before these fields read back with none shared.
    d = p.to_dict()
    for st in d["stages"]:
        del st["shared_param_bytes"], st["tied_allreduce_time_s"]
    assert Plan.from_dict(d) == p
