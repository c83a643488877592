"""Candidate enumeration: the (data-parallel degree, microbatch count, schedule) combinations the search
gives one integer program each, and the device groups a degree offers.

A candidate fixes the replica count ``dp`` shared by every stage, the microbatch count ``M`` and the
schedule; ``global_batch = dp * M * microbatch_size``. Its device groups are ``dp`` same-kind devices on one
host (:func:`device_groups`): the integer program chooses one group per stage among them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distplan.cluster import Cluster, Link

from .ilp import GroupType

__all__ = [
    "MAX_MICROBATCH_CANDIDATES",
    "Candidate",
    "DeviceGroups",
    "candidate_dp",
    "candidate_microbatches",
    "data_parallel_degrees",
    "device_groups",
]

#: At most this many microbatch counts per data-parallel degree (spread geometrically).
MAX_MICROBATCH_CANDIDATES = 6


@dataclass(frozen=True, slots=True)
class Candidate:
    """One integer program of the search: ``dp`` replicas, ``microbatches`` per iteration of
    ``microbatch_size`` samples per replica, under ``schedule`` (``1f1b`` or ``gpipe``)."""

    dp: int
    microbatches: int
    microbatch_size: int
    schedule: str


@dataclass(frozen=True, slots=True)
class DeviceGroups:
    """The group types of one data-parallel degree, with the devices behind each group.

    Attributes:
        types: the integer program's group types (``GroupType.cap_kib`` and ``ar_latency`` left 0 here; the
            problem builder fills them in); ``types[i].link`` indexes :attr:`links`.
        kinds: device kind names; ``GroupType.kind`` indexes them.
        devices: per type, its groups of device indices, in hand-out order.
        links: the distinct links (hosts' own links and the network).
        net_link: index of the inter-host network in :attr:`links`.
    """

    types: tuple[GroupType, ...]
    kinds: tuple[str, ...]
    devices: tuple[tuple[tuple[int, ...], ...], ...]
    links: tuple[Link, ...]
    net_link: int


def data_parallel_degrees(global_batch: int, most: int, microbatches: int | None = None) -> list[int]:
    """Degrees ``1..most`` that divide ``global_batch`` and, when the microbatch count is fixed, the samples
    of one microbatch over all replicas (``global_batch / microbatches``)."""
    per = global_batch // microbatches if microbatches else global_batch
    return [d for d in range(1, most + 1) if per % d == 0 and global_batch % d == 0]


def candidate_dp(cluster: Cluster, global_batch: int, microbatches: int | None = None) -> list[int]:
    """Data-parallel degrees worth a model: divide the batch and fit in some host's same-kind devices."""
    most = 0
    for h in cluster.hosts:
        for k in set(h.devices):
            most = max(most, h.devices.count(k))
    return data_parallel_degrees(global_batch, most, microbatches)


def candidate_microbatches(per_replica: int, *, max_stages: int, fixed: int | None = None) -> list[int]:
    """Microbatch counts to try for ``per_replica`` samples per iteration: divisors of it, at most
    :data:`MAX_MICROBATCH_CANDIDATES`, favouring counts near and above the possible stage count."""
    if fixed is not None:
        return [fixed] if per_replica % fixed == 0 else []
    divs = [m for m in range(1, per_replica + 1) if per_replica % m == 0]
    if len(divs) <= MAX_MICROBATCH_CANDIDATES:
        return divs
    # Keep 1, the largest, and a geometric spread that includes counts around 1x-4x the stage count.
    keep = {divs[0], divs[-1]}
    for target in (max_stages, 2 * max_stages, 4 * max_stages):
        keep.add(min(divs, key=lambda m, t=target: (abs(math.log(m / t)), m)))  # type: ignore[misc]
    i = 0
    while len(keep) < MAX_MICROBATCH_CANDIDATES and i < len(divs):
        step = max(1, len(divs) // MAX_MICROBATCH_CANDIDATES)
        keep.add(divs[i])
        i += step
    return sorted(keep)[:MAX_MICROBATCH_CANDIDATES] if len(keep) > MAX_MICROBATCH_CANDIDATES else sorted(keep)


def device_groups(cluster: Cluster, dp: int) -> DeviceGroups:
    """The groups of ``dp`` same-kind devices each host offers (devices in index order), one group type per
    (host, kind); hosts with fewer than ``dp`` devices of a kind offer none of it."""
    devs = cluster.devices()
    kinds = tuple(sorted({d.kind for d in devs}))
    links: list[Link] = []

    def link_index(lk: Link) -> int:
        if lk not in links:
            links.append(lk)
        return links.index(lk)

    net = link_index(cluster.network)
    types: list[GroupType] = []
    devices: list[tuple[tuple[int, ...], ...]] = []
    ar_classes: dict[tuple[int, int], int] = {}
    for hi, h in enumerate(cluster.hosts):
        lk = link_index(h.link)
        for k in kinds:
            ids = [d.index for d in devs if d.host_index == hi and d.kind == k]
            n = len(ids) // dp
            if n == 0:
                continue
            ki = kinds.index(k)
            ac = ar_classes.setdefault((ki, lk), len(ar_classes))
            types.append(GroupType(host=hi, kind=ki, count=n, cap_kib=0, ar_class=ac, ar_latency=0, link=lk))
            devices.append(tuple(tuple(ids[i * dp : (i + 1) * dp]) for i in range(n)))
    return DeviceGroups(tuple(types), kinds, tuple(devices), tuple(links), net)
