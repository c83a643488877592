"""The request's limits on the plan space hold with the baselines on too: a baseline layout (what users do by
hand: no recomputation, no sharding) is priced and reported, but the plan is one the request allows (no torch)."""

from __future__ import annotations

from distplan.planner import plan
from distplan.planner.synthetic import synthetic_transformer


def test_forced_recomputation_and_no_tensor_parallelism_hold_with_baselines_on() -> None:
    g = synthetic_transformer(layers=2, hidden=512, heads=8, seq=256, vocab=1000)
    kw = {"cluster": "a100x4-t4x4", "global_batch": 16, "time_limit_s": 10}
    free = plan(g, **kw)
    # Without the limit, the plan avoids recomputation (it only costs time when memory is plentiful) ...
    assert all(s.recompute == "none" for s in free.stages), free.layout
    forced = plan(g, **kw, recompute=("full",), tensor_parallel=False, shard=("none",))
    # ... with it, every stage recomputes, none splits or shards, whatever the baselines are.
    assert all((s.recompute, s.tp, s.shard) == ("full", 1, "none") for s in forced.stages), forced.layout
    assert forced.baselines and any(v is not None for v in forced.baselines.values())
    assert forced.predictions.iteration_time_s > free.predictions.iteration_time_s
