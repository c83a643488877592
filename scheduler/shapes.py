"""Device-set shapes: the candidate device sets a job is priced and allocated on.

[Note: pools, bins and shapes]
A *bin* is the devices of one kind on one host. Bins of the same kind, size and host link form a *pool*:
their devices are interchangeable for the cost model, so a job priced on "4 devices of one bin of pool P"
runs equally fast on any such bin. A *shape* is what a job gets inside one pool: ``per_host`` devices on
each of ``hosts`` bins. Shapes are restricted, as Sia does (Jayaram Subramanya et al., "Sia: Heterogeneity-
aware, goodput-optimized ML-cluster scheduling", SOSP 2023), to

* one bin, a power of two devices: 1, 2, 4, ... up to the pool's *part* (the largest power of two that
  fits a bin), or
* ``m >= 2`` bins, ``part`` devices on each (whole hosts when the bin size is a power of two).

Every piece a shape puts on a bin is then a power of two, so the sizes form a divisible chain, and bin
packing with divisible item sizes is decided by counting (Coffman, Garey and Johnson, "Bin packing with
divisible item sizes", J. Complexity 1987): items fit bins of free capacities ``f_b`` if and only if, for
every size ``p`` of the chain, the items of size ``>= p`` add up to at most ``sum_b p * floor(f_b / p)``;
placing them largest first, in any bin with room, always succeeds. The allocation program uses exactly that
count (``distplan.scheduler.allocate``), and :class:`Placer` places largest first, so the program never
promises a packing that does not exist. A multi-bin shape's pieces are ``part > bin size / 2`` each, so they
land on distinct bins by themselves.

The shape's *key* names everything its price depends on (kind figures, per-host count, host count, host link,
network) and nothing else, so prices are shared between clusters and runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from distplan._serde import canonical_hash
from distplan.cluster import Cluster, Host, Link

from .model import SchedulerError

__all__ = ["Bin", "Placer", "Pool", "Shape", "pools_of", "power_counts"]


def power_counts(limit: int) -> list[int]:
    """Powers of two up to ``limit``: ``power_counts(6) == [1, 2, 4]``."""
    out, c = [], 1
    while c <= limit:
        out.append(c)
        c *= 2
    return out


@dataclass(frozen=True, slots=True)
class Bin:
    """The devices (global indices, ascending) of one kind on one host."""

    host: int
    devices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Shape:
    """``per_host`` devices on each of ``hosts`` bins of pool ``pool`` (see [Note: pools, bins and shapes])."""

    pool: int
    per_host: int
    hosts: int

    @property
    def devices(self) -> int:
        return self.per_host * self.hosts

    @property
    def pieces(self) -> tuple[int, ...]:
        """The sizes it puts on bins (one per host)."""
        return (self.per_host,) * self.hosts


@dataclass(frozen=True, slots=True)
class Pool:
    """Interchangeable bins: same device kind, devices per host and host link.

    Attributes:
        index: position in :func:`pools_of`'s result.
        kind: device kind name.
        bin_size: devices of the kind on each host of the pool.
        link: the hosts' intra-host link.
        network: the cluster's inter-host network.
        bins: the pool's bins in cluster order.
    """

    index: int
    kind: str
    bin_size: int
    link: Link
    network: Link
    bins: tuple[Bin, ...]

    @property
    def part(self) -> int:
        """The largest power of two that fits one bin: a multi-host shape's piece per host."""
        return power_counts(self.bin_size)[-1]

    @property
    def num_devices(self) -> int:
        return self.bin_size * len(self.bins)

    @property
    def label(self) -> str:
        return f"{self.kind} x{self.bin_size} ({len(self.bins)} host{'s' if len(self.bins) > 1 else ''})"

    def shapes(self, lo: int = 1, hi: int | None = None) -> list[Shape]:
        """The pool's shapes with ``lo <= devices <= hi``, smallest first."""
        hi = self.num_devices if hi is None else hi
        out = [Shape(self.index, c, 1) for c in power_counts(self.part) if lo <= c <= hi]
        out += [
            Shape(self.index, self.part, m) for m in range(2, len(self.bins) + 1) if lo <= m * self.part <= hi
        ]
        return out

    def largest_shape(self, at_most: int) -> Shape | None:
        """The largest shape with at most ``at_most`` devices (what a rigid request of that size gets)."""
        shapes = self.shapes(1, at_most)
        return shapes[-1] if shapes else None

    def sub_cluster(self, shape: Shape, source: Cluster) -> Cluster:
        """The cluster a shape amounts to: ``hosts`` hosts of ``per_host`` devices of the kind, with the
        pool's host link and the source cluster's network (what the planner plans the job on)."""
        if shape.pool != self.index:
            raise SchedulerError(f"shape of pool {shape.pool} priced on pool {self.index}")
        hosts = tuple(Host(f"h{i}", (self.kind,) * shape.per_host, self.link) for i in range(shape.hosts))
        return Cluster(
            name=f"{self.kind}-{shape.hosts}x{shape.per_host}",
            kinds={self.kind: source.kinds[self.kind]},
            hosts=hosts,
            network=self.network if shape.hosts > 1 else self.link,
            description=f"{shape.devices} x {self.kind} on {shape.hosts} host(s), part of {source.name}",
        )

    def shape_key(self, shape: Shape, source: Cluster) -> str:
        """A content key of the shape's sub-cluster: equal keys price alike (see module docstring)."""
        sub = self.sub_cluster(shape, source).to_dict()
        sub.pop("name")
        sub.pop("description")
        return f"{self.kind}:{shape.hosts}x{shape.per_host}:{canonical_hash(sub)[:16]}"


def pools_of(cluster: Cluster) -> tuple[Pool, ...]:
    """The cluster's pools, in the order their first host appears (deterministic)."""
    groups: dict[tuple[str, int, Link], list[Bin]] = {}
    by_bin: dict[tuple[int, str], list[int]] = {}
    for d in cluster.devices():
        by_bin.setdefault((d.host_index, d.kind), []).append(d.index)
    for (host, kind), devs in by_bin.items():
        key = (kind, len(devs), cluster.hosts[host].link)
        groups.setdefault(key, []).append(Bin(host, tuple(devs)))
    return tuple(
        Pool(i, kind, size, link, cluster.network, tuple(bins))
        for i, ((kind, size, link), bins) in enumerate(groups.items())
    )


class Placer:
    """Which devices are free, and where a shape goes (largest pieces first; see module docstring).

    Devices are handed out per bin, lowest indices first, preferring a job's previous devices (so a job that
    keeps its shape's bins keeps its devices), then the fullest bin that still fits (best fit, which keeps
    whole bins free for large jobs). ``avoid`` devices are treated as taken for one call.
    """

    def __init__(self, pools: Sequence[Pool], busy: Iterable[int] = ()) -> None:
        self.pools = tuple(pools)
        self._bin_of: dict[int, tuple[int, int]] = {}
        self._free: dict[tuple[int, int], set[int]] = {}
        taken = set(busy)
        for p in self.pools:
            for bi, b in enumerate(p.bins):
                self._free[(p.index, bi)] = {d for d in b.devices if d not in taken}
                for d in b.devices:
                    self._bin_of[d] = (p.index, bi)

    def free_count(self, pool: int, bin_index: int, avoid: Iterable[int] = ()) -> int:
        free = self._free[(pool, bin_index)]
        return len(free.difference(avoid)) if avoid else len(free)

    def free_devices(self) -> int:
        return sum(len(v) for v in self._free.values())

    def is_free(self, devices: Iterable[int]) -> bool:
        return all(d in self._free[self._bin_of[d]] for d in devices)

    def take(self, devices: Iterable[int]) -> None:
        """Mark devices as used (a job that keeps its devices)."""
        for d in devices:
            self._free[self._bin_of[d]].discard(d)

    def release(self, devices: Iterable[int]) -> None:
        """Give devices back (a job the caller decided to stop)."""
        for d in devices:
            self._free[self._bin_of[d]].add(d)

    def fits(self, shape: Shape, avoid: Iterable[int] = ()) -> bool:
        p = self.pools[shape.pool]
        av = set(avoid)
        ok = sum(1 for bi in range(len(p.bins)) if self.free_count(p.index, bi, av) >= shape.per_host)
        return ok >= shape.hosts

    def place(
        self, shape: Shape, prefer: Iterable[int] = (), avoid: Iterable[int] = ()
    ) -> tuple[int, ...] | None:
        """Take devices for ``shape``; None (nothing taken) if it does not fit."""
        p = self.pools[shape.pool]
        pref = set(prefer)
        av = set(avoid)
        free = {bi: self._free[(p.index, bi)] - av for bi in range(len(p.bins))}
        cands = [bi for bi in range(len(p.bins)) if len(free[bi]) >= shape.per_host]
        if len(cands) < shape.hosts:
            return None
        chosen = sorted(cands, key=lambda bi: (-len(pref & free[bi]), len(free[bi]), bi))[: shape.hosts]
        out: list[int] = []
        for bi in sorted(chosen):
            pick = sorted(free[bi], key=lambda d: (d not in pref, d))[: shape.per_host]
            self._free[(p.index, bi)].difference_update(pick)
            out.extend(pick)
        return tuple(sorted(out))
