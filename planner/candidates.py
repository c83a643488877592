"""Candidate enumeration: the (microbatch count, schedule) combinations the search gives one integer program
each, the device pools a cluster offers and the stage configurations a pool can run.

A candidate fixes the microbatch count ``M``, the microbatch ``b`` (rows over all replicas of a stage;
``global_batch = M * b``) and the schedule. Each stage then takes devices of one *pool* (the devices of one
kind on one host) and runs them as a :class:`~distplan.planner.parallelism.StageConfig`: ``dp`` replicas
(``dp`` divides ``b``) of ``tp`` tensor-parallel ranks, a recomputation mode and a sharding level, as the
request allows (:class:`PlanSpace`). The integer program chooses a pool and a configuration per stage, and
the pools' device counts bound what the stages take together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distplan.cluster import Cluster, Link
from distplan.request import PlanRequest

from .parallelism import StageConfig

__all__ = [
    "MAX_MICROBATCH_CANDIDATES",
    "Candidate",
    "PlanSpace",
    "Pool",
    "Pools",
    "candidate_microbatches",
    "data_parallel_degrees",
    "device_pools",
    "stage_configs",
]

#: At most this many microbatch counts per plan (spread geometrically).
MAX_MICROBATCH_CANDIDATES = 6


@dataclass(frozen=True, slots=True)
class Candidate:
    """One integer program of the search: ``microbatches`` per iteration of ``microbatch`` rows each (over
    all replicas of a stage), under ``schedule`` (``1f1b`` or ``gpipe``)."""

    microbatches: int
    microbatch: int
    schedule: str


@dataclass(frozen=True, slots=True)
class PlanSpace:
    """What a stage may be (from the request): tensor parallelism on or off, the recomputation modes and the
    sharding levels allowed (see :class:`~distplan.request.PlanRequest`)."""

    tensor_parallel: bool = True
    recompute: tuple[str, ...] = ("none", "selective", "full")
    shard: tuple[str, ...] = ("none", "optimizer", "optimizer+gradients", "full")

    @classmethod
    def of(cls, request: PlanRequest) -> PlanSpace:
        return cls(request.tensor_parallel, tuple(request.recompute), tuple(request.shard))

    def admits(self, dp: int, tp: int, recompute: str, shard: str) -> bool:
        """Whether a stage run as ``(dp, tp, recompute, shard)`` is inside this space (a one-replica stage
        never shards, whatever the levels allowed)."""
        return (
            (tp == 1 or self.tensor_parallel)
            and recompute in self.recompute
            and (shard in self.shard or (dp == 1 and shard == "none"))
        )


@dataclass(frozen=True, slots=True)
class Pool:
    """The devices of one kind on one host (global indices, ascending), and the host's link."""

    host: int
    kind: str
    devices: tuple[int, ...]
    link: Link


@dataclass(frozen=True, slots=True)
class Pools:
    """A cluster's pools (host-major, kinds sorted within a host), its kinds (sorted), the distinct links
    (hosts' own and the network) and the network's index among them."""

    pools: tuple[Pool, ...]
    kinds: tuple[str, ...]
    links: tuple[Link, ...]
    net_link: int

    def link_index(self, link: Link) -> int:
        return self.links.index(link)


def data_parallel_degrees(global_batch: int, most: int, microbatches: int | None = None) -> list[int]:
    """Degrees ``1..most`` that divide ``global_batch`` and, when the microbatch count is fixed, the samples
    of one microbatch over all replicas (``global_batch / microbatches``)."""
    per = global_batch // microbatches if microbatches else global_batch
    return [d for d in range(1, most + 1) if per % d == 0 and global_batch % d == 0]


def candidate_microbatches(
    total: int, *, max_stages: int, fixed: int | None = None, typical_stages: int | None = None
) -> list[int]:
    """Microbatch counts to try for ``total`` samples per iteration: divisors of it, at most
    :data:`MAX_MICROBATCH_CANDIDATES`, favouring counts near and above the possible stage count: 1x-4x
    ``max_stages``, then 1x-2x ``typical_stages`` (e.g. the cluster's pools, one stage each) when given,
    then an even geometric spread."""
    if fixed is not None:
        return [fixed] if total % fixed == 0 else []
    divs = [m for m in range(1, total + 1) if total % m == 0]
    if len(divs) <= MAX_MICROBATCH_CANDIDATES:
        return divs
    # Keep 1, the largest, counts around 1x-4x the stage limit and 1x-2x the typical stage count.
    keep = {divs[0], divs[-1]}
    typical = [typical_stages, 2 * typical_stages] if typical_stages else []
    for target in [max_stages, 2 * max_stages, 4 * max_stages, *typical]:
        if len(keep) >= MAX_MICROBATCH_CANDIDATES:
            break
        keep.add(min(divs, key=lambda m, t=target: (abs(math.log(m / t)), m)))  # type: ignore[misc]
    # Then, one at a time, the divisor farthest (in log) from every count kept, the larger on ties (a smaller
    # bubble): an even geometric spread. (Taking the smallest divisors first left 512 samples with 1, 2, 4,
    # 128, 256, 512 and nothing between, where a 70B model on 256 GPUs wants 16-64.)
    while len(keep) < MAX_MICROBATCH_CANDIDATES:
        rest = [m for m in divs if m not in keep]
        if not rest:
            break
        keep.add(max(rest, key=lambda m: (min(abs(math.log(m / k)) for k in keep), m)))
    return sorted(keep)[:MAX_MICROBATCH_CANDIDATES] if len(keep) > MAX_MICROBATCH_CANDIDATES else sorted(keep)


def device_pools(cluster: Cluster) -> Pools:
    """Every (host, kind) with its devices (see :class:`Pool`)."""
    devs = cluster.devices()
    kinds = tuple(sorted({d.kind for d in devs}))
    links: list[Link] = [cluster.network]
    pools: list[Pool] = []
    for hi, h in enumerate(cluster.hosts):
        if h.link not in links:
            links.append(h.link)
        for k in kinds:
            ids = tuple(d.index for d in devs if d.host_index == hi and d.kind == k)
            if ids:
                pools.append(Pool(hi, k, ids, h.link))
    return Pools(tuple(pools), kinds, tuple(links), 0)


def stage_configs(
    *, microbatch: int, devices: int, tp_degrees: tuple[int, ...], space: PlanSpace
) -> list[StageConfig]:
    """The configurations a stage may run on at most ``devices`` devices of one pool with a microbatch of
    ``microbatch`` rows: ``dp`` dividing it, ``tp`` 1 or one of ``tp_degrees`` (the graph's splittable
    degrees; none when the request turns tensor parallelism off), ``dp * tp <= devices``, every allowed
    recomputation mode, and every allowed sharding level where ``dp > 1`` (one replica never shards).
    Sorted (dp, tp, recompute, shard)."""
    tps = [1] + ([t for t in tp_degrees if t > 1] if space.tensor_parallel else [])
    out = []
    for dp in range(1, devices + 1):
        if microbatch % dp:
            continue
        for tp in tps:
            if dp * tp > devices:
                continue
            for rc in space.recompute:
                for sh in space.shard if dp > 1 else ("none",):
                    out.append(StageConfig(dp, tp, rc, sh))
    # A request that allows only sharded levels still runs one-replica stages unsharded (deduplicated).
    return sorted(set(out))
