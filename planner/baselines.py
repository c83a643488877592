"""What users do today, priced by the same cost model as the planner.

- ``equal_layers``: the same number of transformer layers per stage, stages on the devices in rank order
  (``torch.distributed.pipelining`` / torchtitan style); the first stage also gets the embedding, the last
  the head and loss.
- ``param_balanced``: cuts at layer boundaries that balance parameter bytes (``split_into_equal_size``).
- ``homogeneous_dp``: the optimal pipeline for a cluster of identical devices (PipeDream-style: min-max
  partition for every stage count and replication degree), planned as if every device were the
  cluster's most common kind, then run on the real devices in rank order.
- ``data_parallel``: one stage replicated over all devices of one kind (the best kind), gradient
  accumulation over microbatches; None when the model does not fit a device.
- ``grid``: what a Megatron-LM / torchtitan user sets by hand: a uniform ``(pp, dp, tp)`` grid with equal
  layers per stage on the fastest ``pp * dp * tp`` devices (tensor-parallel groups inside a host,
  Megatron's rank order: ``tp`` fastest, then ``dp``, then ``pp``), the same recomputation and sharding
  (distributed optimizer) on every stage, switched on only when memory needs it; the best of the grid.

Each baseline tries every data-parallel degree and microbatch count the planner tries and keeps its best
that fits in memory (so they are strong baselines), or is None when nothing fits.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distplan.cluster import Device
from distplan.graph import OpGraph
from distplan.plan import Plan, SolverReport
from distplan.request import PlanRequest, as_request

from .candidates import Candidate, PlanSpace, candidate_microbatches, data_parallel_degrees
from .coarsen import coarsen, layer_starts
from .cost import CostModel, inflight_microbatches
from .evaluate import StageSpec, build_plan, layout_cost
from .parallelism import StageConfig

__all__ = ["BASELINES", "BaselineLayout", "baseline_layouts", "baselines"]

BASELINES = ("equal_layers", "param_balanced", "homogeneous_dp", "data_parallel", "grid")


@dataclass(frozen=True, slots=True)
class BaselineLayout:
    """A baseline's best layout and its predicted iteration time."""

    stages: tuple[StageSpec, ...]
    candidate: Candidate
    iteration_time_s: float


def _rank_groups(devs: Sequence[Device], dp: int) -> list[tuple[int, ...]] | None:
    """Consecutive groups of ``dp`` devices in rank (index) order; None if a group mixes kinds."""
    n = len(devs) // dp
    out = []
    for i in range(n):
        g = tuple(d.index for d in devs[i * dp : (i + 1) * dp])
        if len({devs[x].kind for x in g}) != 1:
            return None
        out.append(g)
    return out


def _fits(cost: CostModel, costs: Sequence, stages: Sequence[StageSpec]) -> bool:
    devs = cost.devices
    for c, st in zip(costs, stages, strict=True):
        if c.memory_bytes > cost.cluster.kinds[devs[st.devices[0]].kind].usable_memory_bytes:
            return False
    return True


def _best_over_microbatches(
    cost: CostModel,
    bounds: Sequence[int],
    groups: Sequence[tuple[int, ...]],
    *,
    global_batch: int,
    microbatches: int | None,
    schedule: str,
) -> BaselineLayout | None:
    dp = len(groups[0])
    stages = tuple(StageSpec(a, e, g) for a, e, g in zip(bounds, bounds[1:], groups, strict=False))
    per = global_batch // dp
    best: BaselineLayout | None = None
    for m in candidate_microbatches(per, max_stages=len(stages), fixed=microbatches):
        cand = Candidate(m, dp * (per // m), schedule)
        costs, total, _ = layout_cost(
            cost, stages, schedule=schedule, microbatches=m, microbatch=cand.microbatch
        )
        if (
            math.isfinite(total)
            and _fits(cost, costs, stages)
            and (best is None or total < best.iteration_time_s)
        ):
            best = BaselineLayout(stages, cand, total)
    return best


def _layer_cut_points(graph: OpGraph) -> list[int]:
    starts = layer_starts(graph)
    if starts:
        return starts
    return list(coarsen(graph).bounds[1:-1])


def _by_layer_count(points: Sequence[int], num_stages: int, n: int) -> list[int] | None:
    layers = len(points)
    if num_stages > layers:
        return None
    sizes = [layers // num_stages + (1 if i < layers % num_stages else 0) for i in range(num_stages)]
    bounds, acc = [0], 0
    for sz in sizes[:-1]:
        acc += sz
        bounds.append(points[acc])
    bounds.append(n)
    return bounds if all(a < b for a, b in itertools.pairwise(bounds)) else None


def _by_params(cost: CostModel, points: Sequence[int], num_stages: int, n: int) -> list[int] | None:
    cands = [p for p in points if 0 < p < n]
    if num_stages - 1 > len(cands):
        return None
    total = float(cost.param_prefix[-1])
    pp = cost.param_prefix
    bounds = [0]
    for k in range(1, num_stages):
        target = total * k / num_stages
        left = [p for p in cands if p > bounds[-1]]
        need_after = num_stages - 1 - k  # cut points still to place after this one
        usable = left[: len(left) - need_after] if need_after else left
        if not usable:
            return None
        bounds.append(min(usable, key=lambda p: (abs(float(pp[p]) - target), p)))
    bounds.append(n)
    return bounds if all(a < b for a, b in itertools.pairwise(bounds)) else None


def _pipeline_baseline(
    cost: CostModel, graph: OpGraph, how: str, *, global_batch: int, microbatches: int | None, schedule: str
) -> BaselineLayout | None:
    devs = cost.devices
    points = _layer_cut_points(graph)
    n = len(graph.nodes)
    best: BaselineLayout | None = None
    for dp in data_parallel_degrees(global_batch, len(devs), microbatches):
        groups = _rank_groups(devs, dp)
        if not groups:
            continue
        num = min(len(groups), len(points) + 1)
        bounds = (
            _by_layer_count(points, num, n) if how == "equal_layers" else _by_params(cost, points, num, n)
        )
        if bounds is None:
            continue
        res = _best_over_microbatches(
            cost,
            bounds,
            groups[:num],
            global_batch=global_batch,
            microbatches=microbatches,
            schedule=schedule,
        )
        if res is not None and (best is None or res.iteration_time_s < best.iteration_time_s):
            best = res
    return best


def _minmax_partition(prefix: np.ndarray, room: np.ndarray, cap: float, num: int) -> list[int] | None:
    """Boundaries (block indices) splitting into at most ``num`` parts, minimising the largest part's time,
    each part's memory within ``cap`` (binary search on the bottleneck + greedy fill)."""
    nb = len(prefix) - 1
    pre, rm = prefix.tolist(), room.tolist()  # (bisect on lists: far cheaper than numpy on scalars)

    def fill(limit: float) -> list[int] | None:
        out, a = [0], 0
        for _ in range(num):
            if a == nb:
                break
            e_t = bisect.bisect_right(pre, pre[a] + limit) - 1
            e_m = bisect.bisect_right(rm, rm[a] + cap) - 1
            e = min(e_t, e_m, nb)
            if e <= a:
                return None
            out.append(e)
            a = e
        return out if a == nb else None

    lo, hi = 0.0, float(prefix[-1])
    if fill(hi) is None:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        if fill(mid) is not None:
            hi = mid
        else:
            lo = mid
    return fill(hi)


def _homogeneous(
    cost: CostModel, graph: OpGraph, *, global_batch: int, microbatches: int | None, schedule: str
) -> BaselineLayout | None:
    devs = cost.devices
    counts = cost.cluster.kind_counts()
    ref = min(counts, key=lambda k: (-counts[k], k))
    cap = cost.cluster.kinds[ref].usable_memory_bytes
    blocks = coarsen(graph)
    bounds_arr = np.array(blocks.bounds)
    options: list[tuple[float, BaselineLayout]] = []
    for dp in data_parallel_degrees(global_batch, len(devs), microbatches):
        groups = _rank_groups(devs, dp)
        if not groups:
            continue
        per = global_batch // dp
        for m in candidate_microbatches(per, max_stages=len(groups), fixed=microbatches):
            b = per // m
            f, bw = cost.time_prefix(ref, b)
            pre = (f + bw)[bounds_arr]
            num = min(len(groups), blocks.num_blocks)
            while num >= 1:
                # Memory for the assumed device: stage 0 holds the most microbatches, use it for all.
                v = m if schedule == "gpipe" else min(num, m)
                room = np.array(
                    [cost.state_bytes(float(cost.param_prefix[p])) for p in blocks.bounds]
                ) + v * (cost.act_prefix_max[bounds_arr] * b)
                cut = _minmax_partition(pre, room, cap, num)
                if cut is not None:
                    stage_t = np.diff(pre[cut])
                    assumed = float(pre[-1] + (m - 1) * stage_t.max())
                    pos = [blocks.bounds[j] for j in cut]
                    stages = tuple(StageSpec(a, e, g) for a, e, g in zip(pos, pos[1:], groups, strict=False))
                    costs, total, _ = layout_cost(
                        cost, stages, schedule=schedule, microbatches=m, microbatch=b * dp
                    )
                    if math.isfinite(total) and _fits(cost, costs, stages):
                        options.append(
                            (assumed, BaselineLayout(stages, Candidate(m, b * dp, schedule), total))
                        )
                num //= 2
    if not options:
        return None
    # The homogeneous planner picks by its own (assumed) prediction; ties by the real one.
    return min(options, key=lambda o: (o[0], o[1].iteration_time_s))[1]


def _data_parallel(
    cost: CostModel, graph: OpGraph, *, global_batch: int, microbatches: int | None, schedule: str
) -> BaselineLayout | None:
    devs = cost.devices
    n = len(graph.nodes)
    best: BaselineLayout | None = None
    for kind in sorted(cost.cluster.kinds):
        ids = [d.index for d in devs if d.kind == kind]
        options = data_parallel_degrees(global_batch, len(ids), microbatches)
        if not options:
            continue
        dp = max(options)
        res = _best_over_microbatches(
            cost,
            [0, n],
            [tuple(ids[:dp])],
            global_batch=global_batch,
            microbatches=microbatches,
            schedule=schedule,
        )
        if res is not None and (best is None or res.iteration_time_s < best.iteration_time_s):
            best = res
    return best


def _kind_speed(cost: CostModel) -> dict[str, float]:
    """Each kind's effective peak at the plan's precision (what a user ranks devices by)."""
    return {name: k.flops(cost.precision) * k.efficiency for name, k in cost.cluster.kinds.items()}


def _grid(
    cost: CostModel,
    graph: OpGraph,
    *,
    global_batch: int,
    microbatches: int | None,
    schedule: str,
    space: PlanSpace,
) -> BaselineLayout | None:
    devs = cost.devices
    speed = _kind_speed(cost)
    # The fastest devices first (host-major within a kind, as a user lists them).
    order = sorted(devs, key=lambda d: (-speed[d.kind], d.kind, d.host_index, d.local_index))
    points = _layer_cut_points(graph)
    n = len(graph.nodes)
    layers = len(points)
    host_size = max(len(h.devices) for h in cost.cluster.hosts)
    tps = [1] + ([t for t in cost.parallel.tp_degrees if t <= host_size] if space.tensor_parallel else [])
    # Memory-saving knobs in the order a user turns them on (each only if the previous does not fit).
    knobs = [
        (rc, sh)
        for rc in ("none", "selective", "full")
        for sh in ("none", "optimizer")
        if rc in space.recompute and sh in space.shard
    ]
    best: BaselineLayout | None = None
    for pp in range(1, layers + 2):
        if layers % pp and pp != 1:
            continue  # equal layers per stage
        bounds = [0, n] if pp == 1 else _by_layer_count(points, pp, n)
        if bounds is None:
            continue
        for tp in tps:
            for dp in data_parallel_degrees(global_batch, len(devs) // (pp * tp), microbatches):
                size = dp * tp
                chosen = order[: pp * size]
                if len(chosen) < pp * size:
                    continue
                groups = [tuple(d.index for d in chosen[s * size : (s + 1) * size]) for s in range(pp)]
                ok = all(len({devs[i].kind for i in g}) == 1 for g in groups) and all(
                    len({devs[i].host_index for i in g[r * tp : (r + 1) * tp]}) == 1
                    for g in groups
                    for r in range(dp)
                )
                if not ok:
                    continue
                per = global_batch // dp
                for m in candidate_microbatches(per, max_stages=pp, fixed=microbatches):
                    if schedule == "1f1b" and pp > m:
                        continue
                    cand = Candidate(m, dp * (per // m), schedule)
                    rows = per // m
                    for rc, sh in knobs:
                        if sh != "none" and dp == 1:
                            continue
                        cfg = StageConfig(dp, tp, rc, sh)
                        # Memory first (cheap): the user turns knobs on until the grid fits.
                        if not all(
                            cost.stage_memory(
                                a,
                                e,
                                microbatch=rows,
                                inflight=inflight_microbatches(
                                    schedule, stage=i, num_stages=pp, microbatches=m
                                ),
                                kind=devs[g[0]].kind,
                                config=cfg,
                            )
                            <= cost.cluster.kinds[devs[g[0]].kind].usable_memory_bytes
                            for i, (a, e, g) in enumerate(zip(bounds, bounds[1:], groups, strict=False))
                        ):
                            continue
                        stages = tuple(
                            StageSpec(a, e, g, tp, rc, sh)
                            for a, e, g in zip(bounds, bounds[1:], groups, strict=False)
                        )
                        costs, total, _ = layout_cost(
                            cost, stages, schedule=schedule, microbatches=m, microbatch=cand.microbatch
                        )
                        if math.isfinite(total) and _fits(cost, costs, stages):
                            if best is None or total < best.iteration_time_s:
                                best = BaselineLayout(stages, cand, total)
                            break
    return best


def baseline_layouts(
    graph: OpGraph,
    cost: CostModel,
    *,
    global_batch: int,
    microbatches: int | None = None,
    schedule: str | None = None,
    stop: Callable[[], bool] | None = None,
    space: PlanSpace | None = None,
) -> dict[str, BaselineLayout | None]:
    """Every baseline's best layout under ``cost`` (None where it does not fit). ``stop`` is asked before
    each baseline; once it answers True the remaining ones are left out of the result (the planner's time
    limit, see ``distplan.planner.search.Budget``). ``space``: what the request lets a stage be (the grid
    uses no tensor parallelism, recomputation or sharding it forbids)."""
    sched = schedule or "1f1b"
    kw = {"global_batch": global_batch, "microbatches": microbatches, "schedule": sched}
    makers: dict[str, Callable[[], BaselineLayout | None]] = {
        "equal_layers": lambda: _pipeline_baseline(cost, graph, "equal_layers", **kw),  # type: ignore[arg-type]
        "param_balanced": lambda: _pipeline_baseline(cost, graph, "param_balanced", **kw),  # type: ignore[arg-type]
        "homogeneous_dp": lambda: _homogeneous(cost, graph, **kw),  # type: ignore[arg-type]
        "data_parallel": lambda: _data_parallel(cost, graph, **kw),  # type: ignore[arg-type]
        "grid": lambda: _grid(cost, graph, space=space or PlanSpace(), **kw),  # type: ignore[arg-type]
    }
    out: dict[str, BaselineLayout | None] = {}
    for name, make in makers.items():
        if stop is not None and stop():
            break
        out[name] = make()
    return out


def baselines(graph: OpGraph, request: PlanRequest | None = None, /, **fields: Any) -> dict[str, Plan | None]:
    """Each baseline as a checked :class:`Plan` (None where it does not fit the cluster's memory), for
    ``request`` (or a :class:`PlanRequest` built from keyword ``fields``, as :func:`distplan.planner.plan`)."""
    req = as_request(request, **fields)
    cost = CostModel(
        graph, req.cluster, dtype=req.dtype, optimizer=req.optimizer, matmul_precision=req.matmul_precision
    )
    out: dict[str, Plan | None] = {}
    for name, b in baseline_layouts(
        graph,
        cost,
        global_batch=req.global_batch,
        microbatches=req.microbatches,
        schedule=req.schedule,
        space=PlanSpace.of(req),
    ).items():
        if b is None:
            out[name] = None
            continue
        cand = b.candidate
        out[name] = build_plan(
            graph,
            cost,
            req,
            b.stages,
            schedule=cand.schedule,
            microbatches=cand.microbatches,
            microbatch=cand.microbatch,
            solver=SolverReport(solver=name, status="BASELINE", objective_s=b.iteration_time_s),
        )
    return out
