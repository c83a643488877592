"""The integer program against exhaustive search on small random graphs and clusters.

Two levels: (1) each candidate's CP-SAT model (``ilp.solve_stage_problem``) reaches exactly the optimum
of its own integer data, enumerated over every partition and every stage option (device pool, data- and
tensor-parallel degree, recomputation, sharding); (2) the whole planner's plan is as fast as the best of
every layout in its scope (stages on devices of one kind on one host, each run any way the request allows,
each device once, every microbatch count and schedule), priced by the float cost model, within the integer
program's rounding. Both levels run on graphs with tensor-parallel regions and an attention core (so
tensor parallelism and selective recomputation are priced) and again with shared parameters (a weight read
in several places, like a tied embedding and output projection: every stage reading it holds a copy and sums
its gradient with the others), and every bound the search uses is checked to stay below the exhaustive
optimum, also on raw random integer data.
"""

from __future__ import annotations

import itertools
import math

import pytest

from distplan.errors import InfeasiblePlanError
from distplan.planner import plan
from distplan.planner.bounds import fill_bound, lower_bound, min_bottleneck, pooled_bound
from distplan.planner.candidates import (
    Candidate,
    PlanSpace,
    candidate_microbatches,
    device_pools,
    stage_configs,
)
from distplan.planner.coarsen import coarsen
from distplan.planner.cost import CostModel
from distplan.planner.evaluate import StageSpec, layout_cost
from distplan.planner.ilp import solve_stage_problem
from distplan.planner.problem import build_problem, cut_times, int_objective, stage_terms
from distplan.planner.synthetic import random_chain_graph, random_cluster
from distplan.request import RECOMPUTE, SHARD

SEEDS = range(24)
#: Graphs with 1-2 shared parameters whose optimum (per candidate) holds one in two stages or more, so the
#: copies and the holders' gradient sum are really priced; the test asserts that it happens.
SHARED_SEEDS = (0, 1, 3, 5, 7, 8, 10, 11, 13, 14, 15, 16)
#: The same for whole plans (level 2).
SHARED_PLAN_SEEDS = (1, 3, 5, 6, 10, 18)
#: What a stage may be, by seed: each part of the plan space alone and together (the brute force
#: enumerates options^stages, so each seed keeps the options few).
SPACES = (
    PlanSpace(True, ("none",), ("none",)),
    PlanSpace(False, RECOMPUTE, ("none",)),
    PlanSpace(False, ("none",), SHARD),
    PlanSpace(True, ("none", "full"), ("none", "optimizer")),
)


def _space(seed: int) -> PlanSpace:
    return SPACES[seed % len(SPACES)]


def _compositions(nb: int, parts: int):
    for cuts in itertools.combinations(range(1, nb), parts - 1):
        bounds = (0, *cuts, nb)
        yield list(itertools.pairwise(bounds))


def _layouts(prob):
    for parts in range(1, min(prob.num_blocks, prob.max_stages) + 1):
        for ranges in _compositions(prob.num_blocks, parts):
            for opts in itertools.product(range(len(prob.options)), repeat=parts):
                yield [(a, e, o) for (a, e), o in zip(ranges, opts, strict=True)]


def _brute_int(prob) -> int | None:
    best = None
    for stages in _layouts(prob):
        val = int_objective(prob, stages)
        if val is not None and (best is None or val < best):
            best = val
    return best


def _brute_bottleneck(prob) -> int | None:
    """The smallest bottleneck over every feasible layout (1F1B: max T_s + cf_s + cb_s; GPipe: max T_s)."""
    best = None
    for stages in _layouts(prob):
        if int_objective(prob, stages) is None:
            continue
        worst = 0
        for s, (a, e, oi) in enumerate(stages):
            t = stage_terms(prob, a, e, oi, 1)
            load = t.fwd + t.bwd
            if prob.schedule == "1f1b" and s + 1 < len(stages):
                load += sum(cut_times(prob, e, oi, stages[s + 1][2]))
            worst = max(worst, load)
        if best is None or worst < best:
            best = worst
    return best


def _holders(prob, stages, k: int) -> int:
    return sum(any(a <= b < e for b in prob.shared[k].blocks) for a, e, _ in stages)


@pytest.mark.parametrize(("seed", "shared"), [(s, 0) for s in SEEDS] + [(s, 1 + s % 2) for s in SHARED_SEEDS])
def test_integer_program_matches_exhaustive_search(seed: int, shared: int) -> None:
    graph = random_chain_graph(seed, nodes=6 + seed % 2, scale=0.4, shared=shared, regions=2)
    cluster = random_cluster(seed)
    cost = CostModel(graph, cluster, dtype="bf16" if seed % 3 == 0 else "fp32")
    blocks = coarsen(graph, max_blocks=8)
    assert blocks.num_blocks <= 8
    global_batch = 4
    checked = split = 0
    for m in candidate_microbatches(global_batch, max_stages=4):
        schedule = "gpipe" if (seed + m) % 4 == 0 else "1f1b"
        prob = build_problem(cost, blocks, Candidate(m, global_batch // m, schedule), _space(seed)).problem
        expected = _brute_int(prob)
        sol = solve_stage_problem(prob, workers=1, deterministic_time=20.0, time_limit_s=60.0)
        t_star = min_bottleneck(prob)
        if expected is None:
            assert sol.status == "INFEASIBLE", m
            continue
        # The bottleneck bound is a bound, and proves infeasibility only where nothing fits.
        assert t_star is not None, m
        assert t_star <= _brute_bottleneck(prob), m
        # The fill relaxation's bound too, whatever incumbent and grid it is given.
        for upper, cells in itertools.product((expected, expected + 1, 2 * expected, 10 * expected), (3, 6)):
            assert fill_bound(prob, t_star, upper, cells=cells) <= expected, (m, upper, cells)
        # The bounds the search reports must be bounds: LP / Lagrangian relaxation <= the true optimum,
        # with or without an incumbent to prune against.
        assert lower_bound(prob) <= expected, m
        assert pooled_bound(prob) <= expected, m
        assert lower_bound(prob, expected) <= expected, m
        assert lower_bound(prob, 3 * expected, prune_at=expected + 1) <= expected, m
        assert sol.status == "OPTIMAL", (m, sol.status)
        assert sol.objective == expected, (m, sol.objective, expected)
        assert int_objective(prob, sol.stages) == expected
        checked += 1
        split += any(_holders(prob, sol.stages, k) > 1 for k in range(len(prob.shared)))
    assert checked >= 1
    if shared:
        assert sum(len(sp.names) for sp in cost.shared) == shared
        assert split >= 1, "no optimum held a shared parameter twice: the seed no longer tests it"


def test_the_optima_use_the_new_plan_space() -> None:
    # Over the seeds, optima split stages over tensor-parallel groups, recompute and shard: the exhaustive
    # comparison above covers each part of the space, not just pipelines of data-parallel groups.
    seen: set[str] = set()
    for seed in SEEDS:
        graph = random_chain_graph(seed, nodes=6 + seed % 2, scale=0.4, regions=2)
        cost = CostModel(graph, random_cluster(seed), dtype="bf16" if seed % 3 == 0 else "fp32")
        blocks = coarsen(graph, max_blocks=8)
        for m in candidate_microbatches(4, max_stages=4):
            schedule = "gpipe" if (seed + m) % 4 == 0 else "1f1b"
            prob = build_problem(cost, blocks, Candidate(m, 4 // m, schedule), _space(seed)).problem
            sol = solve_stage_problem(prob, workers=1, deterministic_time=20.0, time_limit_s=60.0)
            for _, _, oi in sol.stages:
                o = prob.options[oi]
                seen |= {"tp"} if o.tp > 1 else set()
                seen |= {"dp"} if o.dp > 1 else set()
                seen |= {o.recompute, o.shard} - {"none"}
    assert {"tp", "dp", "full", "optimizer"} <= seen, seen


def _scope_layouts(cost, cluster, bounds, microbatch: int, space: PlanSpace):
    """Every layout in the planner's scope: contiguous block ranges, each stage on devices of one pool (one
    kind on one host) run as any configuration the space allows and the microbatch divides, devices used once
    (which devices of a pool does not change the cost)."""
    pools = device_pools(cluster).pools
    options = [
        (pi, cfg)
        for pi, pool in enumerate(pools)
        for cfg in stage_configs(
            microbatch=microbatch, devices=len(pool.devices), tp_degrees=cost.parallel.tp_degrees, space=space
        )
    ]
    nb = len(bounds) - 1
    for parts in range(1, nb + 1):
        for ranges in _compositions(nb, parts):
            for seq in itertools.product(options, repeat=parts):
                taken = [0] * len(pools)
                stages = []
                for (a, e), (pi, cfg) in zip(ranges, seq, strict=True):
                    first = taken[pi]
                    taken[pi] += cfg.devices
                    if taken[pi] > len(pools[pi].devices):
                        break
                    devs = pools[pi].devices[first : first + cfg.devices]
                    stages.append(StageSpec(bounds[a], bounds[e], devs, cfg.tp, cfg.recompute, cfg.shard))
                else:
                    yield stages


@pytest.mark.parametrize(
    ("seed", "shared"), [(100 + s, 0) for s in range(12)] + [(s, 1 + s % 2) for s in SHARED_PLAN_SEEDS]
)
def test_plan_is_as_fast_as_every_layout_in_scope(seed: int, shared: int) -> None:
    graph = random_chain_graph(seed, nodes=6, scale=0.4, shared=shared, regions=2)
    cluster = random_cluster(seed)
    space = _space(seed)
    global_batch = 4
    cost = CostModel(graph, cluster)
    bounds = coarsen(graph, max_blocks=8).bounds
    best = math.inf
    for m, sched in itertools.product(candidate_microbatches(global_batch, max_stages=4), ("1f1b", "gpipe")):
        b = global_batch // m
        for stages in _scope_layouts(cost, cluster, bounds, b, space):
            if sched == "1f1b" and len(stages) > m:
                continue  # not runnable: 1F1B needs microbatches >= stages
            costs, total, _ = layout_cost(cost, stages, schedule=sched, microbatches=m, microbatch=b)
            if total >= best:
                continue
            fits = all(
                c.memory_bytes <= cluster.kinds[cost.devices[s.devices[0]].kind].usable_memory_bytes
                for c, s in zip(costs, stages, strict=True)
            )
            if fits:
                best = total
    kw = {
        "cluster": cluster,
        "global_batch": global_batch,
        "baselines": False,
        "time_limit_s": 20,
        "tensor_parallel": space.tensor_parallel,
        "recompute": space.recompute,
        "shard": space.shard,
    }
    if math.isinf(best):
        with pytest.raises(InfeasiblePlanError):
            plan(graph, **kw)
        return
    p = plan(graph, **kw)
    got = p.predictions.iteration_time_s
    # The program works in integer units of 1e-6 of one microbatch's whole-model time: allow that rounding.
    assert got <= best * (1 + 1e-4), (got, best, p.layout)
    assert got >= best * (1 - 1e-9)
    assert p.solver.status == "OPTIMAL"
    assert p.solver.gap <= 1e-4
    if shared:
        # Every holder carries the copy and the gradient sum; the plan says so per stage.
        holders = [s for s in p.stages if s.shared_param_bytes > 0]
        assert len(holders) >= 2, p.layout
        assert all(s.tied_allreduce_time_s > 0 for s in holders)
        p.check(graph)


def test_1f1b_plans_never_have_more_stages_than_microbatches() -> None:
    # The lowering's 1F1B needs microbatches >= stages: a plan must respect it. Graph 301 on cluster 301
    # needs three stages, and a global batch of 2 allows at most 2 microbatches.
    graph = random_chain_graph(301, nodes=8, scale=2.0)
    cluster = random_cluster(301)
    kw = {"baselines": False, "time_limit_s": 5, "recompute": ("none",), "shard": ("none",)}
    with pytest.raises(InfeasiblePlanError, match="needs at least 3 stages") as e:
        plan(graph, cluster=cluster, global_batch=2, schedule="1f1b", **kw)
    assert "1f1b with global batch 2 allows at most 2 microbatches" in str(e.value)
    assert "use gpipe or a larger global batch" in str(e.value)
    with pytest.raises(InfeasiblePlanError, match="microbatches=2 allows at most 2 microbatches"):
        plan(graph, cluster=cluster, global_batch=4, microbatches=2, schedule="1f1b", **kw)
    p = plan(graph, cluster=cluster, global_batch=2, **kw)
    assert p.num_stages == 3 and p.schedule == "gpipe", p.layout
    p.check(graph)
    p4 = plan(graph, cluster=cluster, global_batch=4, schedule="1f1b", **kw)
    assert p4.num_microbatches >= p4.num_stages >= 3, p4.layout


def _random_problem(seed: int):
    """Raw integer data with rough edges the traced graphs rarely show: cut prices that jump up and down
    along the model, hosts mixing kinds, tight memory, options of several sizes and shapes."""
    import random

    from distplan.planner.ilp import PoolSupply, SharedGroup, StageOption, StageProblem

    rng = random.Random(seed)
    nb = rng.randint(3, 6)
    kinds = rng.randint(1, 3)

    def prefix(lo: int, hi: int) -> tuple[int, ...]:
        out = [0]
        for _ in range(nb):
            out.append(out[-1] + rng.randint(lo, hi))
        return tuple(out)

    hosts = rng.randint(1, 3)
    pools = []
    for h in range(hosts):
        for k in rng.sample(range(kinds), rng.randint(1, kinds)):
            pools.append(PoolSupply(h, k, rng.randint(1, 3), rng.randint(60, 200), 1 + h))
    classes = ((1, 1), (2, 1), (1, 2))
    options = []
    # From a generator of their own, so that the rest of each seed's problem is what it was without them.
    edge_rng = random.Random(10_000 + seed)
    edges = [(edge_rng.choice((0, 0, 2, 9)), edge_rng.choice((0, 1, 5))) for _ in pools]
    n_time = n_mem = n_act = n_ar = 0
    fwd, bwd, mem, act, inp, ar = [], [], [], [], [], []
    for pi, q in enumerate(pools):
        for _ in range(rng.randint(1, 3)):
            ci = rng.randrange(len(classes))
            dp, tp = classes[ci]
            if dp * tp > q.devices:
                dp, tp, ci = 1, 1, 0
            f = prefix(1, 40)
            fwd.append(f)
            bwd.append(tuple(2 * v for v in f))
            mem.append(prefix(5, 40))
            act.append(prefix(1, 20))
            inp.append(tuple(rng.randint(0, 10) for _ in range(nb + 1)))
            ar.append(prefix(0, 5))
            kind = rng.choice(("none", "full", "selective"))
            options.append(
                StageOption(
                    pool=pi,
                    size=dp * tp,
                    dp=dp,
                    tp=tp,
                    time=n_time,
                    state=n_mem,
                    ar=n_ar,
                    comm=ci,
                    act=n_act if kind != "full" else -1,
                    once=n_act if kind == "full" else -1,
                    inputs=len(inp) - 1 if kind == "full" else -1,
                    extra_kib=rng.randint(0, 10) if kind == "selective" else 0,
                    fwd_const=rng.randint(0, 3),
                    bwd_const=rng.randint(0, 3),
                    ar_latency=rng.randint(0, 3),
                    edge_fwd=edges[pi][0],  # the runtime's cost per pipeline boundary: per pool (kind)
                    edge_bwd=edges[pi][1],
                    recompute=kind,
                )
            )
            n_time, n_mem, n_act, n_ar = n_time + 1, n_mem + 1, n_act + 1, n_ar + 1
    links = hosts + 1
    transfers = [tuple(rng.choice((0, 1, 2, 30, 60)) for _ in range(nb + 1)) for _ in range(6)]
    comm_fwd = tuple(
        tuple(tuple(rng.randrange(len(transfers)) for _ in classes) for _ in classes) for _ in range(links)
    )
    comm_bwd = tuple(
        tuple(tuple(rng.randrange(len(transfers)) for _ in classes) for _ in classes) for _ in range(links)
    )
    m = rng.choice((1, 2, 3, 4))
    schedule = rng.choice(("1f1b", "gpipe"))
    total = sum(q.devices for q in pools)
    max_stages = max(1, min(nb, total, m if schedule == "1f1b" else total))
    shared = []
    # Shared parameters (ilp.SharedGroup): copies cost memory and optimizer time; holders sum gradients.
    for _ in range(rng.choice((0, 1, 1, 2))):
        readers = tuple(sorted(rng.sample(range(nb), rng.randint(2, min(3, nb)))))
        per_w = rng.randint(1, 30)
        shared.append(
            SharedGroup(
                blocks=readers,
                mem_kib=rng.randint(1, 60),
                ar=tuple(rng.randint(0, 8) for _ in ar),
                tied=tuple(
                    tuple(0 if w < 2 else per_w * (w - 1) + rng.randint(0, 4) for w in range(total + 1))
                    for _ in range(links)
                ),
            )
        )
    return StageProblem(
        num_blocks=nb,
        max_stages=max_stages,
        microbatches=m,
        schedule=schedule,
        pools=tuple(pools),
        options=tuple(options),
        fwd_prefix=tuple(fwd),
        bwd_prefix=tuple(bwd),
        mem_prefix=tuple(mem),
        act_prefix=tuple(act),
        input_kib=tuple(inp),
        ar_prefix=tuple(ar),
        comm_classes=classes,
        transfers=tuple(transfers),
        comm_fwd=comm_fwd,
        comm_bwd=comm_bwd,
        net_link=0,
        shared=tuple(shared),
    )


@pytest.mark.parametrize("seed", range(40))
def test_bounds_hold_on_raw_integer_data(seed: int) -> None:
    prob = _random_problem(seed)
    expected = _brute_int(prob)
    if expected is not None:
        # The integer program agrees with the exhaustive search on this data too (shared groups included).
        sol = solve_stage_problem(prob, workers=1, deterministic_time=20.0, time_limit_s=60.0)
        assert (sol.status, sol.objective) == ("OPTIMAL", expected)
    t_star = min_bottleneck(prob)
    if expected is None:
        assert lower_bound(prob) >= 0
        return
    assert t_star is not None
    assert t_star <= _brute_bottleneck(prob), (t_star, _brute_bottleneck(prob))
    assert lower_bound(prob) <= expected
    assert pooled_bound(prob) <= expected
    assert lower_bound(prob, expected) <= expected
    assert lower_bound(prob, 2 * expected, prune_at=expected + 1) <= expected
    for upper in (expected, expected + 1, 3 * expected):
        assert fill_bound(prob, t_star, upper) <= expected, upper
