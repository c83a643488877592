"""The per-stage plan space priced and searched: tensor parallelism from the graph's regions, sharding by
the ZeRO memory table, recomputation, transfers between stages of different splits, the request's limits
on the space, and the plan's memory breakdown (no torch)."""

from __future__ import annotations

import math

import pytest

from distplan.errors import InfeasiblePlanError, PlanError
from distplan.plan import Plan, StageMemory
from distplan.planner import evaluate, plan, simulate
from distplan.planner.cost import CostModel, StageConfig, boundary_rows
from distplan.planner.evaluate import StageSpec, boundary_transfer
from distplan.planner.synthetic import synthetic_transformer
from distplan.profiles import load_cluster
from distplan.request import PlanRequest


def _small() -> object:
    return synthetic_transformer(layers=2, hidden=512, heads=8, seq=256, vocab=1000)


def _cluster(*, memory_gib: float = 80, attention: str = "fused", hosts: int = 1, per_host: int = 4) -> dict:
    return {
        "name": "lab",
        "kinds": [
            {
                "name": "gpu",
                "memory_gib": memory_gib,
                "memory_reserved_gib": 0,
                "memory_bandwidth_gbyte_s": 2000,
                "peak_tflops": {"fp32": 20, "bf16": 300},
                "efficiency": 0.5,
                "attention": attention,
            }
        ],
        "hosts": [
            {
                "name": f"h{i}",
                "devices": [{"kind": "gpu", "count": per_host}],
                "link": {"bandwidth_gbyte_s": 100, "latency_us": 5},
            }
            for i in range(hosts)
        ],
        "network": {"bandwidth_gbit_s": 100, "latency_us": 20},
    }


def test_tensor_parallelism_divides_the_regions_and_pays_their_collectives() -> None:
    g = _small()
    c = load_cluster(_cluster())
    cost = CostModel(g, c)
    n = len(g.nodes)
    ann = g.tensor_parallel
    assert ann is not None and ann.regions
    split = sum(r.split_param_bytes for r in ann.regions)
    # One rank of tp 2 holds every split parameter halved and the rest whole.
    held = cost.param_prefix_tp(2)[n] - cost.param_prefix_tp(2)[0]
    assert held == pytest.approx(g.param_bytes - split / 2)
    one, _ = cost.memory_parts(0, n, microbatch=2, inflight=1, kind="gpu", config=StageConfig(1, 1))
    two, _ = cost.memory_parts(0, n, microbatch=2, inflight=1, kind="gpu", config=StageConfig(1, 2))
    assert two.parameters < one.parameters and two.activations < one.activations
    # The regions' split nodes do half their FLOPs (a compute-bound matmul takes half the time).
    f1, _ = cost.compute_time(0, n, "gpu", 2)
    f2, _ = cost.compute_time(0, n, "gpu", 2, tp=2)
    assert 0.45 * f1 < f2 < 0.8 * f1
    # Each region's collectives: ring all-reduces of its payload over the 2 ranks, on the host's link,
    # as the annotation's own arithmetic (RegionCost) says.
    link = c.hosts[0].link
    fwd, bwd = cost.tp_comm_prefix(link, 2, 2)
    payload = sum(r.cost(2, microbatch=2).collective_bytes for r in ann.regions)
    count = sum(len(r.collectives) for r in ann.regions)
    expected = payload / link.bandwidth_bytes_s + count * 2 * link.latency_s
    assert fwd[-1] + bwd[-1] == pytest.approx(expected)
    # Full recomputation runs the forward collectives again in the backward.
    _, bwd_full = cost.tp_comm_prefix(link, 2, 2, "full")
    assert bwd_full[-1] == pytest.approx(bwd[-1] + fwd[-1])


def test_sharding_follows_the_zero_table_for_one_unit_per_stage() -> None:
    g = _small()
    cost = CostModel(g, load_cluster(_cluster()))
    n = len(g.nodes)
    params = g.param_bytes / 4  # fp32 traced parameters
    parts = {
        sh: cost.memory_parts(
            0, n, microbatch=1, inflight=1, kind="gpu", config=StageConfig(4, 1, "none", sh)
        )
        for sh in ("none", "optimizer", "optimizer+gradients", "full")
    }
    none = parts["none"][0]
    z1 = parts["optimizer"][0]
    # fp32 Adam: 4 bytes of weights, 4 of gradients, 8 of optimizer state per parameter.
    assert none.optimizer == pytest.approx(8 * params, rel=1e-6)
    assert z1.optimizer == pytest.approx(8 * params / 4, rel=1e-6)  # ZeRO-1: 1/dp of the states
    assert z1.parameters == pytest.approx(4 * params * (1 + 1 / 4), rel=1e-6)  # gathered + the own shard
    assert z1.gradients == none.gradients
    assert z1.shard_saved == pytest.approx(none.total - z1.total, abs=8)
    # One FSDP2 unit per stage: ZeRO-2/3 still hold the whole gradient while a backward runs.
    for sh in ("optimizer+gradients", "full"):
        assert parts[sh][1] >= parts["optimizer"][1]
    assert none.shard_saved == 0


def test_recomputation_keeps_inputs_or_drops_the_scores_and_runs_the_forward_again() -> None:
    g = _small()
    n = len(g.nodes)
    math_kind = CostModel(g, load_cluster(_cluster(attention="math")))
    cfg = {rc: StageConfig(1, 1, rc) for rc in ("none", "selective", "full")}
    mem = {
        rc: math_kind.memory_parts(0, n, microbatch=2, inflight=3, kind="gpu", config=c)[0]
        for rc, c in cfg.items()
    }
    acts_one = (math_kind.act_prefix_tp("gpu", 1)[n] - math_kind.act_prefix_tp("gpu", 1)[0]) * 2
    assert mem["none"].activations == pytest.approx(3 * acts_one, abs=1)
    # Full: each in-flight microbatch's input (the graph's input here: token ids, nothing kept) and one
    # microbatch's activations while its backward recomputes them.
    assert mem["full"].activations == pytest.approx(acts_one, abs=1)
    assert mem["full"].recompute_saved == pytest.approx(2 * acts_one, abs=2)
    # Selective: a kind without fused attention stores the scores; recomputing the attention cores drops
    # them for the in-flight microbatches.
    scores = 2 * 8 * 256 * 256 * 4 * 2  # samples x heads x seq^2 x fp32, per layer x 2 layers
    assert mem["none"].activations - mem["selective"].activations >= 2 * scores * 0.99
    f, b_none = math_kind.compute_time(0, n, "gpu", 2)
    _, b_full = math_kind.compute_time(0, n, "gpu", 2, recompute="full")
    _, b_sel = math_kind.compute_time(0, n, "gpu", 2, recompute="selective")
    assert b_full == pytest.approx(b_none + f)
    assert b_none < b_sel < b_full


@pytest.mark.parametrize("a", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)])
@pytest.mark.parametrize("b", [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (1, 4)])
def test_transfers_follow_the_lowering_lanes(a: tuple[int, int], b: tuple[int, int]) -> None:
    # The lowering cuts the microbatch into lcm(dp) chunks; forward, receiver rank t gets each of its chunks
    # from sender rank t % tp_a (every tensor-parallel rank gets a whole copy); backward the other way.
    # The busiest device inside a host paces the cut: count the rows each device sends and receives.
    (dpa, tpa), (dpb, tpb) = a, b
    chunks = math.lcm(dpa, dpb)
    rows = 12.0 / chunks  # a microbatch of 12 rows
    load: dict[tuple[str, int, int], float] = {}
    for c in range(chunks):
        ra, rb = c // (chunks // dpa), c // (chunks // dpb)
        for t in range(tpb):
            for dev in (("a", ra, t % tpa), ("b", rb, t)):
                load[dev] = load.get(dev, 0.0) + rows
    fwd, bwd = boundary_rows(StageConfig(dpa, tpa), StageConfig(dpb, tpb), network=False)
    assert max(load.values()) == pytest.approx(12 * fwd)
    load = {}
    for c in range(chunks):
        ra, rb = c // (chunks // dpa), c // (chunks // dpb)
        for t in range(tpa):
            for dev in (("b", rb, t % tpb), ("a", ra, t)):
                load[dev] = load.get(dev, 0.0) + rows
    assert max(load.values()) == pytest.approx(12 * bwd)
    # Between hosts every copy crosses the shared network.
    assert boundary_rows(StageConfig(dpa, tpa), StageConfig(dpb, tpb), network=True) == (tpb, tpa)


def test_boundary_transfer_prices_the_closed_form_on_devices() -> None:
    g = _small()
    c = load_cluster(_cluster(hosts=2, per_host=4))
    cost = CostModel(g, c)
    cut = 20
    # Inside host 0: stage a on devices 0,1 (dp 2), stage b on 2,3 (tp 2).
    a, b = StageSpec(0, cut, (0, 1)), StageSpec(cut, len(g.nodes), (2, 3), tp=2)
    fwd, bwd = boundary_transfer(cost, a, b, microbatch=4)
    rf, rb = boundary_rows(a.config, b.config, network=False)
    assert fwd == pytest.approx(cost.send_time(cut, 4 * rf, link=c.hosts[0].link))
    assert bwd == pytest.approx(cost.send_time(cut, 4 * rb, link=c.hosts[0].link))
    # Across hosts: the network carries every copy.
    b2 = StageSpec(cut, len(g.nodes), (4, 5), tp=2)
    fwd, bwd = boundary_transfer(cost, a, b2, microbatch=4)
    assert fwd == pytest.approx(cost.send_time(cut, 4 * 2, link=c.network))
    assert bwd == pytest.approx(cost.send_time(cut, 4 * 1, link=c.network))


def test_evaluate_prices_and_prints_layouts_of_the_new_space() -> None:
    g = _small()
    n = len(g.nodes)
    layout = f"1f1b m4x4 | 0:20@0,1,2,3 tp2 rc=full sh=optimizer | 20:{n}@4,5,6,7 rc=selective sh=optimizer"
    p = evaluate(g, cluster=_cluster(per_host=8), layout=layout, global_batch=16)
    assert p.layout == layout
    s0, s1 = p.stages
    assert (s0.dp, s0.tp, s0.recompute, s0.shard) == (2, 2, "full", "optimizer")
    assert (s1.dp, s1.tp, s1.recompute, s1.shard) == (4, 1, "selective", "optimizer")
    assert s0.memory is not None and s0.memory.recompute_saved > 0 and s0.memory.shard_saved > 0
    assert s0.grad_send_time_s > 0 and s0.optimizer_time_s > 0
    p.check(g)
    again = Plan.from_json(p.to_json())
    assert again == p and again.stages[0].memory == s0.memory
    rel = simulate(p, g).iteration_time_s / p.predictions.iteration_time_s
    assert 0.8 <= rel <= 1.0 + 1e-9, rel
    with pytest.raises(PlanError, match="shard 'optimizer' needs dp > 1"):
        evaluate(g, cluster=_cluster(), layout=f"1f1b m4x1 | 0:{n}@0 sh=optimizer", global_batch=4)


def test_plans_read_before_the_breakdown_send_gradients_as_fast_as_activations() -> None:
    g = _small()
    p = evaluate(g, cluster=_cluster(), layout=f"gpipe m2x1 | 0:20@0 | 20:{len(g.nodes)}@1", global_batch=2)
    d = p.to_dict()
    for s in d["stages"]:
        s.pop("grad_send_time_s")
        s.pop("memory")
    old = Plan.from_dict(d)
    assert old.stages[0].grad_send_time_s == old.stages[0].send_time_s
    assert old.stages[0].memory is None
    with pytest.raises(PlanError, match="stage memory: activations must be >= 0"):
        StageMemory(activations=-1)


def test_the_request_narrows_the_plan_space() -> None:
    g = _small()
    cluster = _cluster(memory_gib=0.6, hosts=2, per_host=4)
    free = plan(g, cluster=cluster, global_batch=16, time_limit_s=10, baselines=False)
    used = {(s.tp > 1, s.recompute != "none", s.shard != "none") for s in free.stages}
    assert any(any(x) for x in used), free.layout  # memory is short: the plan splits, recomputes or shards
    narrow = plan(
        g,
        cluster=cluster,
        global_batch=16,
        time_limit_s=10,
        baselines=False,
        tensor_parallel=False,
        recompute=("none",),
        shard=("none",),
    )
    assert all((s.tp, s.recompute, s.shard) == (1, "none", "none") for s in narrow.stages), narrow.layout
    assert narrow.predictions.iteration_time_s >= free.predictions.iteration_time_s * (1 - 1e-9)
    forced = plan(g, cluster=cluster, global_batch=16, time_limit_s=10, baselines=False, recompute=("full",))
    assert all(s.recompute == "full" for s in forced.stages), forced.layout
    with pytest.raises(PlanError, match="recompute must be one of none, selective, full"):
        PlanRequest(load_cluster(cluster), 16, recompute=("sometimes",))
    req = PlanRequest(load_cluster(cluster), 16, recompute=["full", "none"], shard=("optimizer",))
    assert req.recompute == ("none", "full") and PlanRequest.from_dict(req.to_dict()) == req


def test_memory_is_a_decision_recomputation_and_sharding_make_a_model_fit_or_run_faster() -> None:
    # Each device holds 30% of the state: no pipeline of whole-state stages fits the activations of its
    # in-flight microbatches without recomputation; with it the plan fits, and says per stage what it
    # removed. With 40%, both fit, and recomputing and sharding buys fewer, wider stages: a faster plan.
    g = synthetic_transformer(layers=4, hidden=1024, heads=16, seq=1024, vocab=8000)
    state = g.param_bytes * 4  # fp32 Adam: 16 bytes per parameter
    off = {"recompute": ("none",), "shard": ("none",)}

    def kw(share: float) -> dict:
        cluster = _cluster(memory_gib=state * share / 2**30, hosts=2, per_host=4)
        return {
            "cluster": cluster,
            "global_batch": 16,
            "time_limit_s": 10,
            "baselines": False,
            "tensor_parallel": False,
        }

    with pytest.raises(InfeasiblePlanError):
        plan(g, **kw(0.3), **off)
    p = plan(g, **kw(0.3))
    p.check(g)
    assert any(s.recompute != "none" for s in p.stages), p.layout
    for s in p.stages:
        assert s.memory is not None and s.memory.total == pytest.approx(s.memory_bytes, abs=8)
        assert (s.memory.recompute_saved > 0) == (s.recompute != "none"), p.layout
        assert (s.memory.shard_saved > 0) == (s.shard != "none"), p.layout
    plain, saving = plan(g, **kw(0.4), **off), plan(g, **kw(0.4))
    assert saving.predictions.iteration_time_s < plain.predictions.iteration_time_s, (
        saving.layout,
        plain.layout,
    )
    assert any(s.shard != "none" or s.recompute != "none" for s in saving.stages)


def test_microbatch_counts_spread_over_the_divisors_and_favour_the_stage_counts() -> None:
    from distplan.planner.candidates import MAX_MICROBATCH_CANDIDATES, candidate_microbatches

    # 512 samples on 32 pools (a 256-GPU cluster): counts near 1-2x the pools are tried, not only the
    # smallest divisors and the largest.
    counts = candidate_microbatches(512, max_stages=160, typical_stages=32)
    assert {32, 64} <= set(counts) and len(counts) == MAX_MICROBATCH_CANDIDATES
    assert all(512 % m == 0 for m in counts) and 1 in counts and 512 in counts
    # Without a typical stage count, the rest spreads evenly in log: no three smallest divisors in a row.
    spread = candidate_microbatches(64, max_stages=16)
    assert spread == sorted(set(spread)) and {1, 16, 32, 64} <= set(spread) and spread[:3] != [1, 2, 4]
    assert candidate_microbatches(12, max_stages=4, fixed=5) == []
