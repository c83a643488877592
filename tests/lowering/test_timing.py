"""The runner's measured times (``distplan.lowering.timing``): real gloo ranks, real pipelining schedule."""

from __future__ import annotations

import statistics

import pytest
from lowering_helpers import cut, layout_plan

from distplan.errors import LoweringError
from distplan.lowering.timing import MeasuredRun, StepTimes, measure, step_times


def test_two_stage_run_records_every_region_on_every_rank() -> None:
    mid = cut("gpt-tiny", 0.5)
    plan = layout_plan("gpt-tiny", f"1f1b m2x1 | 0:{mid}@0 | {mid}:{{n}}@1", global_batch=2)
    run = measure(plan, "gpt-tiny", seq=16, steps=2, warmup=1, max_ranks=2)
    assert len(run.steps) == 2
    for ranks in run.steps:
        assert [t.rank for t in ranks] == [0, 1]
        for t in ranks:
            (stage,) = t.stages
            assert len(t.fwd_s[stage]) == 2 and len(t.bwd_s[stage]) == 2  # one per microbatch
            assert min(t.fwd_s[stage]) > 0 and min(t.bwd_s[stage]) > 0
            assert t.p2p_wait_s is not None and t.p2p_wait_s > 0  # stage 1 receives, stage 0 sends
            assert t.optimizer_s > 0
            # The regions are disjoint parts of the iteration.
            assert t.compute_s + t.p2p_wait_s + t.allreduce_s + t.optimizer_s <= t.iteration_s
        last = ranks[1]
        assert last.loss_s > 0 and ranks[0].loss_s == 0  # the loss runs on the last stage only
    assert run.iteration_s == statistics.median(max(t.iteration_s for t in r) for r in run.steps)
    assert set(run.stage_times()) == {0, 1}
    again = MeasuredRun(
        run.layout, tuple(tuple(StepTimes.from_dict(t.to_dict()) for t in r) for r in run.steps)
    )
    assert again == run


def test_regions_fold_into_step_times() -> None:
    regions = [
        ("fwd:1", 0.5),
        ("loss", 0.25),
        ("fwd:1", 0.5),
        ("p2p", 1.0),
        ("bwd:1", 2.0),
        ("allreduce", 0.125),
        ("step", 5.0),
        ("optimizer", 1.0),
    ]
    t = step_times(regions, rank=3, stages=(1,), p2p_seen=True)
    assert t.fwd_s == {1: (0.5, 0.5)} and t.bwd_s == {1: (2.0,)}
    assert (t.loss_s, t.p2p_wait_s, t.allreduce_s, t.optimizer_s) == (0.25, 1.0, 0.125, 1.0)
    assert t.iteration_s == 6.0 and t.compute_s == 3.25
    assert step_times(regions, rank=3, stages=(1,), p2p_seen=False).p2p_wait_s is None


def test_measure_refuses_more_ranks_than_cores() -> None:
    mid = cut("gpt-tiny", 0.5)
    plan = layout_plan("gpt-tiny", f"1f1b m2x1 | 0:{mid}@0 | {mid}:{{n}}@1", global_batch=2)
    with pytest.raises(LoweringError, match="the plan has 2 ranks but this host runs at most 1"):
        measure(plan, "gpt-tiny", seq=16, max_ranks=1)
