"""What a worker process runs for the scheduler: price a job's device-set shapes (the ``price`` task).

Run in the service's worker pool (``distplan.service.jobs``), so the planner calls a model's first
submission costs (seconds per shape) never run in the API process or inside a scheduling decision (see
[Note: pricing off the decision path] in ``distplan.scheduler.core``). The payload is made by
``distplan.service.schedule_manager`` from a request it has checked; the model is built or read as for a
plan (:func:`distplan.service.work.build_graph`).
"""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["run_price"]


def run_price(payload: dict[str, Any]) -> dict[str, str]:
    """Trace (or read) the job's graph and price every shape its scheduler's policy will consult
    (``Policy.prepare``) on the scheduler's cluster.

    Returns the artifacts ``prices`` (a ``Pricer.document``), ``graph`` (OpGraph JSON) and ``pricing``
    (planner calls, their seconds, shapes priced, feasible ones).
    """
    from distplan.profiles import load_cluster
    from distplan.scheduler import JobSpec, Pricer, RestartModel, make_policy, pools_of
    from distplan.service.work import build_graph

    request = payload["request"]
    cluster = load_cluster(request["cluster"])
    t0 = time.perf_counter()
    graph = build_graph(request, payload.get("graph"), max_nodes=int(payload["max_graph_nodes"]))
    traced_s = time.perf_counter() - t0
    job = request["job"]
    spec = JobSpec(
        id="priced",
        graph="g",
        global_batch=int(job["global_batch"]),
        dtype=str(job["dtype"]),
        optimizer=str(job["optimizer"]),
        min_devices=int(job["min_devices"]),
        max_devices=int(job["max_devices"]),
    )
    pricing = request["pricing"]
    pricer = Pricer(
        cluster,
        time_limit_s=float(pricing["time_limit_s"]),
        restart=RestartModel.from_dict(pricing["restart"]),
    )
    # The policy's parameters do not change which shapes it prices, only its name does.
    make_policy(str(request["policy"])).prepare(pricer, spec, graph, pools_of(cluster))
    prices = pricer.entries()
    summary = {
        "planner_calls": pricer.calls,
        "planner_s": pricer.seconds,
        "graph_s": traced_s,
        "shapes": len(prices),
        "feasible": sum(p.feasible for p in prices.values()),
    }
    return {
        "prices": json.dumps(pricer.document()),
        "graph": graph.to_json(),
        "pricing": json.dumps(summary),
    }
