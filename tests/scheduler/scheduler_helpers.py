"""Small clusters, tiny synthetic graphs and job helpers for the scheduler tests (no torch)."""

from __future__ import annotations

from typing import Any

from distplan.cluster import Cluster
from distplan.profiles import device_kinds
from distplan.scheduler import JobSpec

#: A two-layer transformer small enough that the planner prices a shape in well under a second.
TINY = {"layers": 2, "hidden": 64, "heads": 4, "seq": 16, "vocab": 100}
#: Many parameters, almost no activations: its memory is its training state, whatever the microbatching.
FAT = {"layers": 1, "hidden": 256, "heads": 4, "seq": 4, "vocab": 50000}


def make_cluster(
    name: str, *, per_host: int = 2, hosts: int = 1, kind: str = "a100-sxm-80g", **kind_overrides: Any
) -> Cluster:
    """One pool: ``hosts`` hosts of ``per_host`` devices of ``kind`` (optionally a copy of it with other
    figures, e.g. ``memory_bytes``)."""
    kinds = device_kinds()
    k = kinds[kind].to_dict()
    if kind_overrides:
        k.update(kind_overrides, name=f"{kind}-test")
    return Cluster.from_dict(
        {
            "name": name,
            "kinds": [k],
            "hosts": [
                {
                    "name": "h",
                    "repeat": hosts,
                    "devices": [{"kind": k["name"], "count": per_host}],
                    "link": {"bandwidth_gbyte_s": 300, "latency_us": 5},
                }
            ],
            "network": {"bandwidth_gbit_s": 100, "latency_us": 20},
        },
        catalogue=kinds,
    )


def job(jid: str, graph: str = "tiny", **kw: Any) -> JobSpec:
    kw.setdefault("global_batch", 8)
    kw.setdefault("total_steps", 1000)
    return JobSpec(id=jid, graph=graph, **kw)
