"""The planner's public entry point: :func:`plan`, from a graph and a request to a checked plan."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from distplan.errors import PlanError
from distplan.graph import OpGraph
from distplan.plan import Plan
from distplan.request import PlanRequest, as_request

from .baselines import baseline_layouts
from .candidates import PlanSpace
from .cost import CostModel
from .evaluate import build_plan
from .ilp import SolverProgress
from .search import Budget, ExtraLayout, search

__all__ = ["plan"]


def plan(
    graph: OpGraph,
    request: PlanRequest | None = None,
    /,
    *,
    progress: Callable[[SolverProgress], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    **fields: Any,
) -> Plan:
    """The fastest plan the search finds for ``graph`` under ``request`` (checked, deterministic).

    ``request`` is the :class:`~distplan.request.PlanRequest` a door built (see [Note: the request spine]
    in ``distplan.request``); from Python, its fields may be given as keywords instead
    (``plan(graph, cluster="a100x4-t4x4", global_batch=64)``).

    Decides the stages (contiguous node ranges at block boundaries) and, per stage, its devices (of one kind
    on one host), data- and tensor-parallel degree, recomputation and sharding, together with the microbatch
    count and, unless given, the schedule (1F1B or GPipe), minimising the cost model's iteration time under
    every device's memory (see ``distplan.planner.search``). The request may narrow the per-stage choices
    (``tensor_parallel``, ``recompute``, ``shard``).

    The plan's ``solver`` report carries status, objective, bound, gap and seconds; ``baselines`` maps
    each baseline's name to its predicted iteration time (None where it does not fit).

    ``request.time_limit_s`` bounds the whole call's wall time (baselines, warm starts, bounds, integer
    programs); the answer is decided by deterministic work limits sized well inside it, so the same request
    gives the same plan and report on a quiet or a busy machine. Only if the machine is so slow that the
    limit is reached does the search stop early, and the report's notes say so (see [Note: determinism]).
    ``progress``: called with the solver's progress. ``clock``: the wall clock the limit is measured on
    (tests script it). A cluster with calibrations (``distplan profile``) is priced with its measured
    figures; ``request.matmul_precision`` is priced here and set by the lowering.

    Raises:
        PlanError: an invalid request (naming the field) or an empty graph.
        InfeasiblePlanError: no layout fits (naming the memory that is short, and by how much).

        >>> from distplan.planner.synthetic import synthetic_transformer
        >>> g = synthetic_transformer(layers=4, hidden=512, heads=8, seq=256, vocab=1000)
        >>> p = plan(g, cluster="a100x4-t4x4", global_batch=8, time_limit_s=2)
        >>> p.check(g)
    """
    req = as_request(request, **fields)
    budget = Budget(req.time_limit_s, clock=clock)
    if not graph.nodes:
        raise PlanError(f"graph {graph.name!r} has no nodes")
    c = req.cluster
    global_batch, microbatches, schedule = req.global_batch, req.microbatches, req.schedule
    cost = CostModel(
        graph, c, dtype=req.dtype, optimizer=req.optimizer, matmul_precision=req.matmul_precision
    )
    base = (
        baseline_layouts(
            graph,
            cost,
            global_batch=global_batch,
            microbatches=microbatches,
            schedule=schedule,
            stop=lambda: budget.expired("the baselines"),
            space=PlanSpace.of(req),
        )
        if req.baselines
        else {}
    )
    # A baseline is priced and reported whatever the request allows, but the plan may only be one inside
    # the request's space (a user who forces recomputation gets it).
    space = PlanSpace.of(req)
    extra = [
        ExtraLayout(name, b.stages, b.candidate)
        for name, b in base.items()
        if b is not None and all(space.admits(s.dp, s.tp, s.recompute, s.shard) for s in b.stages)
    ]
    res = search(
        graph,
        cost,
        global_batch=global_batch,
        microbatches=microbatches,
        schedule=schedule,
        time_limit_s=req.time_limit_s,
        workers=req.workers,
        progress=progress,
        extra=extra,
        budget=budget,
        space=PlanSpace.of(req),
    )
    cand = res.candidate
    return build_plan(
        graph,
        cost,
        req,
        res.stages,
        schedule=cand.schedule,
        microbatches=cand.microbatches,
        microbatch=cand.microbatch,
        solver=res.report,
        baselines={name: (None if b is None else b.iteration_time_s) for name, b in base.items()},
    )
