"""What tensor parallelism, recomputation and sharding change in a stage, read from the graph (no torch).

A stage runs with a :class:`StageConfig`: ``dp`` replicas of ``tp`` tensor-parallel ranks, a recomputation
mode and a sharding level (see [Note: stages and replicas] in ``distplan.plan``). :class:`ParallelFacts`
holds, per graph node, what the cost model needs to price a configuration:

- *tensor parallelism* (the tracer's annotation, [Note: tensor-parallel regions] in
  ``distplan.tensor_parallel``): which nodes a region of degree ``t`` splits (their FLOPs and memory traffic
  divide by ``t``), the parameter and activation bytes the split removes, and the collectives it implies.
  The lowering splits a region when all its nodes are in the stage and ``t`` is one of its degrees (and
  runs every other region whole, ``distplan.lowering.stages.stage_regions``); the planner never cuts inside
  a region (:meth:`ParallelFacts.forbidden_cuts`), so a stage of degree ``t`` splits exactly the regions it
  covers whose degrees contain ``t``, and a per-node price adds up over any stage.
- *selective recomputation* (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", section 5): the attention cores, found by the same patterns as the lowering
  (``distplan.lowering.recompute.attention_core_regions``), from the graph's op names and edges: a fused
  scaled-dot-product-attention op, or a softmax fed by a product of two activations through elementwise ops
  and feeding a product with another activation. Their forward runs again in the backward; what they keep
  for the backward beyond their inputs (the probabilities, the dropout mask, a fused kernel's statistics) is
  not kept.

Parameters read by several stages (tied weights, ``OpGraph.shared_params``) are priced whole on every
tensor-parallel rank and never sharded: the lowering keeps them out of FSDP2 (``distplan.lowering.sharding``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distplan.attention_ops import ELEMENTWISE, MATMUL, SDPA, SOFTMAX
from distplan.errors import PlanError
from distplan.graph import OpGraph
from distplan.plan import RECOMPUTE, SHARD

__all__ = ["ParallelFacts", "StageConfig", "TensorParallelCollective", "attention_cores", "forbidden_cuts"]


@dataclass(frozen=True, slots=True, order=True)
class StageConfig:
    """How a stage runs on its ``dp * tp`` devices (see [Note: stages and replicas] in ``distplan.plan``).

    Attributes:
        dp: data-parallel replicas; each computes ``b / dp`` rows of every microbatch of ``b`` rows.
        tp: tensor-parallel ranks per replica (one host).
        recompute: activation recomputation (``none``, ``selective``, ``full``).
        shard: what is sharded over the ``dp`` replicas (``none``, ``optimizer``, ``optimizer+gradients``,
            ``full``: ZeRO-1/2/3, Rajbhandari et al. 2020).

    Raises:
        PlanError: a degree below 1, an unknown mode, or sharding with one replica (nothing to shard over;
            the lowering would run it as ``none``).
    """

    dp: int = 1
    tp: int = 1
    recompute: str = "none"
    shard: str = "none"

    def __post_init__(self) -> None:
        if self.dp < 1 or self.tp < 1:
            raise PlanError(f"dp and tp must be >= 1, got dp={self.dp}, tp={self.tp}")
        if self.recompute not in RECOMPUTE:
            raise PlanError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        if self.shard not in SHARD:
            raise PlanError(f"shard must be one of {', '.join(SHARD)}, got {self.shard!r}")
        if self.shard != "none" and self.dp == 1:
            raise PlanError(f"shard {self.shard!r} needs dp > 1 (one replica has nothing to shard over)")

    @property
    def devices(self) -> int:
        """Devices the stage takes: ``dp * tp``."""
        return self.dp * self.tp

    def text(self) -> str:
        """Short form for notes: ``dp2tp4 rc=full sh=optimizer`` (options only where not the default)."""
        out = f"dp{self.dp}tp{self.tp}"
        if self.recompute != "none":
            out += f" rc={self.recompute}"
        if self.shard != "none":
            out += f" sh={self.shard}"
        return out


@dataclass(frozen=True, slots=True)
class TensorParallelCollective:
    """One collective a split region runs per microbatch: at node ``position``, in ``phase``
    (``forward``/``backward``), ``op`` (``all-reduce``, ``all-gather``, ``reduce-scatter``) over the
    tensor-parallel group of a region whose degrees are ``degrees``; payload ``fixed + rows * per_sample``
    bytes as traced, scaled to the compute dtype where ``scaled`` (loss statistics stay fp32)."""

    region: int
    position: int
    phase: str
    op: str
    per_sample: float
    fixed: float
    degrees: tuple[int, ...]
    scaled: bool = True


def _op_name(target: str) -> str:
    """The bare op name of a traced target: ``aten.softmax.int`` -> ``softmax``, ``_operator.getitem`` ->
    ``getitem``, ``torch.matmul`` -> ``matmul``."""
    parts = target.split(".")
    if parts[0] == "aten" and len(parts) >= 2:
        return parts[1]
    return parts[-1]


def attention_cores(graph: OpGraph) -> list[tuple[int, ...]]:
    """The attention cores of ``graph`` (see the module docstring): sorted node positions per core, in graph
    order, no node in two cores."""
    nodes = graph.nodes
    index = graph.index()
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        for x in n.inputs:
            if x in index:
                users[index[x]].append(i)
    names = [_op_name(n.target) if n.op != "placeholder" else "" for n in nodes]

    def product_of_activations(i: int, other_than: int | None = None) -> bool:
        ins = [index[x] for x in nodes[i].inputs if x in index and index[x] != other_than]
        # A product of activations reads no parameter (the graph lists parameters apart from inputs).
        need = 1 if other_than is not None else 2
        return not nodes[i].params and len(ins) >= need

    def back(i: int, limit: int = 12) -> int | None:
        cur: int | None = i
        for _ in range(limit):
            if cur is None:
                return None
            if names[cur] in MATMUL:
                return cur if product_of_activations(cur) else None
            if names[cur] not in ELEMENTWISE or not nodes[cur].inputs:
                return None
            cur = index.get(nodes[cur].inputs[0])
        return None

    def forward(i: int, limit: int = 12) -> int | None:
        cur = i
        for _ in range(limit):
            us = users[cur]
            prods = [u for u in us if names[u] in MATMUL]
            if prods:
                p = prods[0]
                return p if product_of_activations(p, other_than=cur) else None
            nxt = [u for u in us if names[u] in ELEMENTWISE]
            if len(nxt) != 1:
                return None
            cur = nxt[0]
        return None

    cores: list[tuple[int, ...]] = []
    taken: set[int] = set()
    for i, n in enumerate(nodes):
        if i in taken:
            continue
        region: set[int]
        if names[i] in SDPA:
            region = {i} | {u for u in users[i] if names[u] == "getitem"}
        elif names[i] in SOFTMAX:
            src = index.get(n.inputs[0]) if n.inputs else None
            qk = back(src) if src is not None else None
            pv = forward(i)
            if qk is None or pv is None:
                continue
            region = _between(qk, pv, users, [[index[x] for x in m.inputs if x in index] for m in nodes])
        else:
            continue
        if region & taken:
            continue
        taken |= region
        cores.append(tuple(sorted(region)))
    return cores


def forbidden_cuts(graph: OpGraph) -> set[int]:
    """Cut positions strictly inside a tensor-parallel region (its split and whole nodes) or an attention
    core (a cut at ``p`` separates nodes ``p - 1`` and ``p``): the lowering splits a region only when a stage
    holds all of it, and recomputes a core only when a stage holds all of it, so the planner never cuts
    there."""
    index = graph.index()
    spans = []
    ann = graph.tensor_parallel
    for r in ann.regions if ann is not None else ():
        pos = [index[x] for x in (*r.nodes, *r.whole_nodes) if x in index]
        if pos:
            spans.append((min(pos), max(pos)))
    spans += [(c[0], c[-1]) for c in attention_cores(graph)]
    out: set[int] = set()
    for a, e in spans:
        out.update(range(a + 1, e + 1))
    return out


def _between(a: int, b: int, users: Sequence[Sequence[int]], inputs: Sequence[Sequence[int]]) -> set[int]:
    """Positions on a path from ``a`` to ``b`` (both included)."""
    down: set[int] = set()
    stack = [a]
    while stack:
        x = stack.pop()
        if x in down or x > b:
            continue
        down.add(x)
        stack.extend(users[x])
    up: set[int] = set()
    stack = [b]
    while stack:
        x = stack.pop()
        if x in up or x < a:
            continue
        up.add(x)
        stack.extend(inputs[x])
    return (down & up) | {a, b}


class ParallelFacts:
    """Per-node facts of one graph for pricing :class:`StageConfig` s (see the module docstring).

    Per-sample figures are at the traced parameter dtype; the cost model scales them to the compute dtype.

    Attributes:
        split_region: per node, the index of the region it is a split node of (-1: none).
        degrees: per region, its valid tensor-parallel degrees.
        collectives: every collective of every region (Megatron's form).
        param_split: per region, ``(position, bytes)`` of each parameter it splits, charged where
            ``param_prefix`` charges it (the parameter's first reader); shared parameters excluded.
        act_split: per region, ``(position, per-sample activation bytes that divide by t)``.
        grad_reduce: per region, ``(position, bytes)`` of replicated parameters whose gradient the
            tensor-parallel group sums once per step.
        cores: the attention cores (positions).
        core_saved: per node, the per-sample activation bytes selective recomputation does not keep.
        in_core: per node, whether it is in an attention core (its forward runs again under ``selective``).
        tp_degrees: every degree > 1 some region allows, ascending.
    """

    def __init__(self, graph: OpGraph, *, shared_names: set[str]) -> None:
        nodes = graph.nodes
        n = len(nodes)
        index = graph.index()
        tb = float(graph.meta.get("batch", 1) or 1)
        ann = graph.tensor_parallel
        regions = ann.regions if ann is not None else ()
        self.split_region = np.full(n, -1, dtype=np.int64)
        self.degrees: tuple[tuple[int, ...], ...] = tuple(r.degrees for r in regions)
        self.spans: list[tuple[int, int]] = []
        self.collectives: list[TensorParallelCollective] = []
        self.param_split: list[list[tuple[int, float]]] = []
        self.act_split: list[tuple[int, float]] = []
        self.grad_reduce: list[list[tuple[int, float]]] = []
        first_reader: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for name in node.params:
                first_reader.setdefault(name, i)
        sizes = graph.param_sizes
        for ri, r in enumerate(regions):
            pos = [index[x] for x in r.nodes if x in index]
            whole = [index[x] for x in r.whole_nodes if x in index]
            if not pos:
                self.spans.append((0, 0))
                self.param_split.append([])
                self.act_split.append((0, 0.0))
                self.grad_reduce.append([])
                continue
            for p in pos:
                self.split_region[p] = ri
            self.spans.append((min(pos + whole), max(pos + whole)))
            for c in r.collectives:
                at = index.get(c.node)
                if at is None:
                    continue
                # The gradient of the region's input is summed where the region runs (its input may be
                # computed by the stage before).
                at = max(at, min(pos))
                # Payloads are traced per sample at the activation dtype; loss statistics are fp32 always.
                self.collectives.append(
                    TensorParallelCollective(
                        ri,
                        at,
                        c.phase,
                        c.op,
                        float(c.bytes_per_sample),
                        float(c.fixed_bytes),
                        r.degrees,
                        c.reason != "loss-statistics",
                    )
                )
            splits = []
            reduce = []
            for ps in r.params:
                if ps.name in shared_names or ps.name not in first_reader:
                    continue
                # A parameter not in the graph's size table is private to the node carrying its bytes.
                nbytes = float(sizes.get(ps.name, ps.nbytes) if sizes else ps.nbytes)
                if ps.split:
                    splits.append((first_reader[ps.name], nbytes))
                elif ps.grad_reduce:
                    reduce.append((first_reader[ps.name], nbytes))
            self.param_split.append(splits)
            self.grad_reduce.append(reduce)
            self.act_split.append((min(pos), r.split_activation_bytes / tb))
        self.tp_degrees = tuple(sorted({t for d in self.degrees for t in d if t > 1}))
        # Attention cores: forward again under selective recomputation; the activations inside them beyond
        # their inputs and outputs are not kept.
        self.cores = attention_cores(graph)
        self.in_core = np.zeros(n, dtype=bool)
        self.core_saved = np.zeros(n, dtype=np.float64)
        for core in self.cores:
            members = set(core)
            for p in core:
                self.in_core[p] = True
            if len(core) == 1 or all(_op_name(nodes[p].target) in (*SDPA, "getitem") for p in core):
                # A fused kernel: what it saves beyond the tensors it reads and returns (its statistics).
                head = core[0]
                node = nodes[head]
                reads = sum(nodes[index[x]].output_bytes for x in node.inputs if x in index)
                self.core_saved[head] = max(0.0, node.activation_bytes - reads - node.output_bytes) / tb
                continue
            # Written out: the first product saves the core's inputs (kept by the checkpoint too); the nodes
            # after it save what only the core reads (probabilities, dropout masks).
            for p in core[1:-1]:
                self.core_saved[p] = nodes[p].activation_bytes / tb
            last = nodes[core[-1]]
            kept_inputs = sum(
                nodes[index[x]].output_bytes for x in last.inputs if x in index and index[x] not in members
            )
            self.core_saved[core[-1]] = max(0.0, last.activation_bytes - kept_inputs) / tb
        self.core_extent = [(c[0], c[-1]) for c in self.cores]

    def forbidden_cuts(self) -> set[int]:
        """Cut positions strictly inside a tensor-parallel region or an attention core (see
        :func:`forbidden_cuts`)."""
        out: set[int] = set()
        for a, e in [*self.spans, *self.core_extent]:
            out.update(range(a + 1, e + 1))
        return out

    def split_factor(self, tp: int) -> np.ndarray:
        """Per node, the share of its work one of ``tp`` ranks does: ``1 / tp`` for split nodes of regions
        allowing ``tp``, 1 elsewhere."""
        out = np.ones(len(self.split_region), dtype=np.float64)
        if tp == 1:
            return out
        for ri, degs in enumerate(self.degrees):
            if tp in degs:
                out[self.split_region == ri] = 1.0 / tp
        return out

    def splits(self, ri: int, tp: int) -> bool:
        """Whether region ``ri`` is split at degree ``tp``."""
        return tp > 1 and tp in self.degrees[ri]
