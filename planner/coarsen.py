"""Fold a graph's nodes into at most ``max_blocks`` contiguous blocks; pipeline cuts fall only between blocks.

[Note: block boundaries]
Every position ``p`` between two nodes is a candidate cut. Candidates are ranked by how *natural* they are:
first by the depth of the module path the two neighbouring nodes share (a cut between
``model.layers.3`` and ``model.layers.4`` shares ``model.layers``, depth 2, and beats a cut inside
``model.layers.3.attn``, depth 4), then by the bytes crossing the cut (cheaper first), then by position. The
best ``max_blocks - 1`` candidates become block boundaries. Leading graph inputs (placeholders) are never
cut off on their own. So transformer layers become blocks first, then their cheapest internal cut points,
as the budget allows; the mapping back to node positions is kept (``Blocks.bounds``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from distplan.graph import OpGraph

from .parallelism import forbidden_cuts

__all__ = ["Blocks", "coarsen", "layer_starts"]


@dataclass(frozen=True, slots=True)
class Blocks:
    """Blocks of a graph: block ``i`` covers node positions ``[bounds[i], bounds[i + 1])``."""

    bounds: tuple[int, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.bounds) < 2 or self.bounds[0] != 0:
            raise ValueError(
                f"block bounds must start at 0 and hold at least 2 positions, got {self.bounds[:4]}"
            )
        if any(a >= b for a, b in zip(self.bounds, self.bounds[1:], strict=False)):
            raise ValueError("block bounds must be strictly increasing")
        if len(self.labels) != len(self.bounds) - 1:
            raise ValueError(f"{len(self.labels)} labels for {len(self.bounds) - 1} blocks")

    @property
    def num_blocks(self) -> int:
        return len(self.bounds) - 1


def _parts(module: str) -> list[str]:
    return module.split(".") if module else []


def _shared_depth(a: str, b: str) -> int:
    pa, pb = _parts(a), _parts(b)
    d = 0
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            break
        d += 1
    return d


def _first_compute(graph: OpGraph) -> int:
    for i, n in enumerate(graph.nodes):
        if n.op != "placeholder":
            return i
    return len(graph.nodes)


def _label(graph: OpGraph, start: int, end: int) -> str:
    mods = [n.module for n in graph.nodes[start:end] if n.module]
    if not mods:
        return graph.nodes[start].name
    common = _parts(mods[0])
    for m in mods[1:]:
        common = common[: _shared_depth(".".join(common), m)]
    if common:
        return ".".join(common)
    first, last = mods[0], mods[-1]
    return first if first == last else f"{first}..{last}"


def coarsen(graph: OpGraph, *, max_blocks: int = 160) -> Blocks:
    """Blocks at the most natural cut positions (see [Note: block boundaries]), never inside a
    tensor-parallel region or an attention core (:func:`~distplan.planner.parallelism.forbidden_cuts`)."""
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
    n = len(graph.nodes)
    cut = graph.cut_costs()
    lo = max(1, _first_compute(graph) + 1)
    skip = forbidden_cuts(graph)
    cands = []
    for p in range(lo, n):
        if p in skip:
            continue
        depth = _shared_depth(graph.nodes[p - 1].module, graph.nodes[p].module)
        cands.append((depth, cut[p], p))
    cands.sort()
    chosen = sorted(p for _, _, p in cands[: max_blocks - 1])
    bounds = (0, *chosen, n)
    labels = tuple(_label(graph, a, b) for a, b in itertools.pairwise(bounds))
    return Blocks(bounds=bounds, labels=labels)


def layer_starts(graph: OpGraph) -> list[int]:
    """Positions where each repeated, numbered layer starts (``model.layers.0``, ``model.layers.1``, ...):
    the module container with the most numbered children wins. Empty if the graph has none."""
    firsts: dict[str, dict[int, int]] = {}
    for i, node in enumerate(graph.nodes):
        parts = _parts(node.module)
        for d in range(1, len(parts)):
            if parts[d].isdigit():
                prefix = ".".join(parts[:d])
                firsts.setdefault(prefix, {}).setdefault(int(parts[d]), i)
    if not firsts:
        return []
    best = max(sorted(firsts), key=lambda k: len(firsts[k]))
    starts = sorted(firsts[best].values())
    return starts if len(starts) >= 2 else []
