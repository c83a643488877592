"""What of a traced graph can be split over a tensor-parallel group, as plain data (no torch).

The tracer finds the regions (``distplan.tracer.tensor_parallel``), the graph carries them
(:attr:`OpGraph.tensor_parallel <distplan.graph.OpGraph>`), the planner prices a stage at degree ``t`` from
them and the lowering places the parameters by FQN (``distplan.lowering.tensor_parallel``).

[Note: tensor-parallel regions]
A *region* is a set of graph nodes that a group of ``t`` devices can share so that every value entering and
leaving it is whole (replicated) on each device, the scheme of Megatron-LM (Shoeybi et al. 2019, section 3):

* **column-parallel** matmuls split their weight along its output features (an ``nn.Linear`` weight
  ``[out, in]`` along dim 0, DTensor ``Shard(0)``; a ``Conv1D``/``x @ W`` weight ``[in, out]`` along dim 1;
  their bias along dim 0), so each device computes ``out / t`` of the features from the whole input;
* the ops between them and the row-parallel matmuls work on the split features as they are: elementwise ops,
  and per-head ops once a reshape turns the features into ``(heads, head_dim)`` (attention: each device
  runs ``heads / t`` heads; grouped-query attention splits the key/value heads the same way, so ``t`` must
  divide the kv heads too; where the key/value heads cannot be split (a single one, multi-query
  attention), their projections stay whole and each device slices its query heads' share of them, and
  their gradient, a partial sum, is all-reduced like the region input's);
* **row-parallel** matmuls contract the split features (weight split along its input features: ``Shard(1)``
  for ``[out, in]``), so each device holds a *partial sum* of the output; one **all-reduce** (forward) makes
  it whole. Their bias is not split: it is added once, after the sum;
* in the backward, the gradient of the region's input is a partial sum on each device too (each saw only its
  features): one **all-reduce** of that gradient (Megatron's ``f``; the forward one is ``g``).
* **embedding** regions split a lookup table by rows (the vocabulary): each device looks up the ids in its
  rows and contributes zeros elsewhere, one forward all-reduce; the ids need no gradient.
* **output** regions split the last matmul over the vocabulary when the model's output feeds a cross-entropy
  over its last dimension: the loss is then computed vocab-parallel (all-reduces of each token's max logit,
  sum of exponentials and target logit: ``3 x tokens x 4`` bytes, fp32) instead of gathering the logits.
* Mixture-of-experts layers: the router, top-k and the gather/scatter of tokens stay replicated; each
  expert's matmul pair is split along the expert width like an MLP (the stacked ``[experts, ...]`` weights
  keep their expert dimension whole: expert parallelism is another axis, not this one).
* Everything else stays replicated: norms, residual adds, rotary tables, routers, and every parameter no
  region splits. A replicated parameter that a region applies to split values (a per-head norm's weight)
  gets a partial gradient on each device: :attr:`ParamSplit.grad_reduce` says it is summed over the group
  after the backward (bytes: the parameter's, once per step).

Regions are options, not obligations. Both ends of a region are whole, so a stage with ``t`` devices may
split any subset of its regions whose :attr:`TensorParallelRegion.degrees` contain ``t`` and run the rest
replicated (each device computes them whole): the result is the same. To price a region split ``t`` ways
(``m`` samples per microbatch): compute ``fwd_flops / t`` and ``bwd_flops / t`` plus its ``whole_nodes`` in
full; memory ``split_param_bytes / t + whole_param_bytes`` (and their gradients and optimizer state), and
``split_activation_bytes / t + whole_activation_bytes`` per traced batch of activations; communication,
per :class:`Collective`, ``nbytes(m)`` moved by a ring all-reduce as ``2 (t - 1) / t * nbytes(m)`` per
device (an all-gather or reduce-scatter: ``(t - 1) / t * nbytes(m)``). :meth:`TensorParallelRegion.cost`
does this arithmetic. The *sequence-parallel* variant (Korthikanti et al. 2022) replaces each forward
all-reduce by a reduce-scatter and each backward one by an all-gather in the forward plus a reduce-scatter in
the backward (:meth:`TensorParallelRegion.sequence_parallel_collectives`): the same bytes, and the whole ops
between regions (norms, dropout, residual adds) then run on ``seq / t`` tokens each.

Fused projections: a single matmul producing several blocks that the graph then splits apart (GPT-2's
``c_attn`` makes q, k and v; Phi-3's ``gate_up_proj``) is split block by block: :attr:`ParamSplit.pieces`
lists the block sizes along the split dimension and each device holds part ``r`` of *every* block. A
parameter read by several regions (a tied embedding and output projection) has the same split in each.
A pipeline cut inside a region's extent (between its first and last node, :meth:`TensorParallelRegion.span`)
would cross split or partial values: cut outside, or run that region replicated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from distplan._serde import get_bool, get_int, get_list, get_map, get_str
from distplan.errors import GraphError

if TYPE_CHECKING:
    from distplan.graph import OpGraph

__all__ = [
    "TP_SCHEMA_VERSION",
    "Collective",
    "CollectiveOp",
    "CollectiveReason",
    "ParamRole",
    "ParamSplit",
    "RegionCost",
    "RegionKind",
    "TensorParallelAnnotation",
    "TensorParallelRegion",
    "divisors",
]

TP_SCHEMA_VERSION = 1

RegionKind = Literal["mlp", "attention", "experts", "embedding", "output"]
ParamRole = Literal["column", "row", "vocab", "elementwise", "replicated"]
CollectiveOp = Literal["all-reduce", "all-gather", "reduce-scatter"]
CollectiveReason = Literal["partial-output", "input-gradient", "loss-statistics"]
Phase = Literal["forward", "backward"]


def divisors(n: int) -> tuple[int, ...]:
    """The positive divisors of ``n >= 1``, ascending (``divisors(12) == (1, 2, 3, 4, 6, 12)``)."""
    if n < 1:
        raise ValueError(f"divisors() needs a positive integer, got {n}")
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return tuple(sorted(set(small + [n // d for d in small])))


@dataclass(frozen=True, slots=True)
class ParamSplit:
    """How one parameter is laid out over a tensor-parallel group of degree ``t``.

    Attributes:
        name: the parameter's FQN, as the graph's ``OpNode.params`` list it (a tied parameter under the one
            name the graph uses).
        shape: its full shape.
        nbytes: its full size in bytes.
        role: ``column`` (output features of a column-parallel matmul, or its bias), ``row`` (input features
            of a row-parallel matmul), ``vocab`` (rows of an embedding table), ``elementwise`` (a parameter
            applied elementwise to split values, split with them) or ``replicated`` (whole on every device:
            a row-parallel bias, a norm's weight inside a region).
        dim: the dimension split ``t`` ways (DTensor ``Shard(dim)``); None when replicated.
        pieces: for a fused parameter, the sizes of the blocks along ``dim`` (summing to ``shape[dim]``); each
            block is split ``t`` ways and device ``r`` holds part ``r`` of every block. Empty: ``dim`` is
            split as one block.
        grad_reduce: a replicated parameter whose gradient is a partial sum on each device (it is applied to
            split values); the group all-reduces it after the backward.
    """

    name: str
    shape: tuple[int, ...]
    nbytes: int
    role: ParamRole
    dim: int | None = None
    pieces: tuple[int, ...] = ()
    grad_reduce: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise GraphError("ParamSplit.name must not be empty")
        if self.role not in get_args(ParamRole):
            raise GraphError(f"parameter {self.name!r}: unknown role {self.role!r}")
        if self.nbytes < 0:
            raise GraphError(f"parameter {self.name!r}: nbytes must be >= 0, got {self.nbytes}")
        if (self.dim is None) != (self.role == "replicated"):
            raise GraphError(
                f"parameter {self.name!r}: role {self.role!r} with dim {self.dim} (only 'replicated' has no dim)"
            )
        if self.dim is not None:
            if not 0 <= self.dim < len(self.shape):
                raise GraphError(
                    f"parameter {self.name!r}: split dim {self.dim} is out of range of shape {self.shape}"
                )
            if self.pieces and (sum(self.pieces) != self.shape[self.dim] or any(p <= 0 for p in self.pieces)):
                raise GraphError(
                    f"parameter {self.name!r}: pieces {self.pieces} must be positive and sum to "
                    f"shape[{self.dim}] = {self.shape[self.dim]}"
                )
        elif self.pieces:
            raise GraphError(f"parameter {self.name!r}: a replicated parameter has no pieces")
        if self.grad_reduce and self.dim is not None:
            raise GraphError(f"parameter {self.name!r}: only a replicated parameter has grad_reduce")

    @property
    def split(self) -> bool:
        """Whether the parameter is divided among the devices."""
        return self.dim is not None

    def local_shape(self, t: int) -> tuple[int, ...]:
        """The shape each of ``t`` devices holds (``t`` must divide the split size or every piece)."""
        if self.dim is None:
            return self.shape
        blocks = self.pieces or (self.shape[self.dim],)
        bad = [b for b in blocks if b % t]
        if bad:
            raise ValueError(f"parameter {self.name!r}: {t} does not divide the split size(s) {bad}")
        out = list(self.shape)
        out[self.dim] //= t
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "role": self.role,
            "dim": self.dim,
            "pieces": list(self.pieces),
            "grad_reduce": self.grad_reduce,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "param") -> ParamSplit:
        m = get_map(d, path, GraphError)
        dim = m.get("dim")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise GraphError(f"{path}.dim: expected an integer or null, got {dim!r}")
        role = get_str(m, "role", path, GraphError)
        if role not in get_args(ParamRole):
            raise GraphError(f"{path}.role: expected one of {', '.join(get_args(ParamRole))}, got {role!r}")
        return cls(
            name=get_str(m, "name", path, GraphError),
            shape=_ints(get_list(m, "shape", path, GraphError), f"{path}.shape"),
            nbytes=get_int(m, "nbytes", path, GraphError),
            role=role,  # type: ignore[arg-type]
            dim=dim,
            pieces=_ints(get_list(m, "pieces", path, GraphError, []), f"{path}.pieces"),
            grad_reduce=get_bool(m, "grad_reduce", path, GraphError, False),
        )


@dataclass(frozen=True, slots=True)
class Collective:
    """One collective over the tensor-parallel group that splitting a region implies.

    Attributes:
        op: ``all-reduce`` (Megatron's form; the sequence-parallel variant derives the others).
        phase: ``forward`` or ``backward``.
        reason: ``partial-output`` (forward: sum the devices' partial results of a row-parallel matmul or a
            vocab-parallel lookup, after ``node``), ``input-gradient`` (backward: sum the devices' partial
            gradients of the region's input ``node``, the gradient flowing into it from the region's side,
            before the gradients of its other users join), ``loss-statistics`` (forward: vocab-parallel
            cross-entropy's per-token max, sum of exponentials and target logit, fp32).
        node: the graph node whose value (or gradient) is reduced.
        bytes_per_sample: payload bytes per sample of the microbatch.
        fixed_bytes: payload bytes independent of the microbatch size (a value with no batch dimension, such
            as a position embedding's lookup).
    """

    op: CollectiveOp
    phase: Phase
    reason: CollectiveReason
    node: str
    bytes_per_sample: int
    fixed_bytes: int = 0

    def __post_init__(self) -> None:
        if self.op not in get_args(CollectiveOp):
            raise GraphError(f"collective at {self.node!r}: unknown op {self.op!r}")
        if self.phase not in ("forward", "backward"):
            raise GraphError(
                f"collective at {self.node!r}: phase must be forward or backward, got {self.phase!r}"
            )
        if self.reason not in get_args(CollectiveReason):
            raise GraphError(f"collective at {self.node!r}: unknown reason {self.reason!r}")
        if self.bytes_per_sample < 0 or self.fixed_bytes < 0:
            raise GraphError(
                f"collective at {self.node!r}: bytes must be >= 0, got {self.bytes_per_sample} per sample "
                f"and {self.fixed_bytes} fixed"
            )

    def nbytes(self, microbatch: int) -> int:
        """Payload bytes for a microbatch of ``microbatch`` samples."""
        return self.fixed_bytes + microbatch * self.bytes_per_sample

    def bytes_per_device(self, microbatch: int, t: int) -> float:
        """Bytes each of ``t`` devices sends with a ring algorithm: ``2 (t - 1) / t`` of the payload for an
        all-reduce, ``(t - 1) / t`` for an all-gather or reduce-scatter (0 when ``t == 1``)."""
        factor = 2.0 if self.op == "all-reduce" else 1.0
        return factor * (t - 1) / t * self.nbytes(microbatch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "phase": self.phase,
            "reason": self.reason,
            "node": self.node,
            "bytes_per_sample": self.bytes_per_sample,
            "fixed_bytes": self.fixed_bytes,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "collective") -> Collective:
        m = get_map(d, path, GraphError)
        values: dict[str, str] = {}
        for key, allowed in (
            ("op", get_args(CollectiveOp)),
            ("phase", ("forward", "backward")),
            ("reason", get_args(CollectiveReason)),
        ):
            v = get_str(m, key, path, GraphError)
            if v not in allowed:
                raise GraphError(f"{path}.{key}: expected one of {', '.join(allowed)}, got {v!r}")
            values[key] = v
        return cls(
            op=values["op"],  # type: ignore[arg-type]
            phase=values["phase"],  # type: ignore[arg-type]
            reason=values["reason"],  # type: ignore[arg-type]
            node=get_str(m, "node", path, GraphError),
            bytes_per_sample=get_int(m, "bytes_per_sample", path, GraphError),
            fixed_bytes=get_int(m, "fixed_bytes", path, GraphError, 0),
        )


@dataclass(frozen=True, slots=True)
class RegionCost:
    """What one device of a group of ``t`` spends on a region (see [Note: tensor-parallel regions]).

    Attributes:
        t: the degree.
        fwd_flops / bwd_flops: FLOPs per device at the traced batch (the split nodes' share plus the whole
            nodes).
        param_bytes: parameter bytes held per device (as traced, ``param_dtype``).
        activation_bytes: activation bytes kept for the backward per device, at the traced batch.
        collective_bytes: bytes each device sends per microbatch of ``microbatch`` samples, summed over the
            region's collectives (ring algorithm), forward and backward.
        grad_reduce_bytes: bytes of replicated parameters' gradients all-reduced over the group once per
            step (payload; ring: ``2 (t - 1) / t`` of it per device).
    """

    t: int
    fwd_flops: float
    bwd_flops: float
    param_bytes: float
    activation_bytes: float
    collective_bytes: float
    grad_reduce_bytes: int


@dataclass(frozen=True, slots=True)
class TensorParallelRegion:
    """One region that a tensor-parallel group can split (see [Note: tensor-parallel regions]).

    Attributes:
        kind: ``mlp`` (a matmul pair), ``attention`` (split by heads), ``experts`` (each expert's matmul pair
            split along the expert width), ``embedding`` (a table split by rows) or ``output`` (the last
            matmul split over the vocabulary, with a vocab-parallel cross-entropy). Descriptive only: the
            rest of the fields say everything a planner or lowering needs.
        nodes: the nodes whose work divides by ``t`` (the column- and row-parallel matmuls and every op on
            split values), in graph order.
        whole_nodes: nodes inside the region's extent that every device runs whole: ops between the region's
            input and its column matmuls on the replicated side of the backward all-reduce, and ops after a
            row matmul on partial sums before the forward all-reduce. In graph order.
        params: every parameter the region's nodes read, with its split (replicated ones included).
        split_sizes: the sizes ``t`` must divide (heads, kv heads, feature widths, vocabulary, the pieces
            of fused projections), ascending.
        degrees: the valid degrees: the divisors of the greatest common divisor of ``split_sizes``.
        collectives: what splitting implies, Megatron's form (all-reduces).
        fwd_flops / bwd_flops: sums over ``nodes`` (these divide by ``t``).
        whole_fwd_flops / whole_bwd_flops: sums over ``whole_nodes`` (these do not).
        split_activation_bytes: activation bytes of ``nodes`` that divide by ``t``.
        whole_activation_bytes: activation bytes of the region that do not (a column matmul keeps its whole
            input; ``whole_nodes`` keep whole values).
    """

    kind: RegionKind
    nodes: tuple[str, ...]
    params: tuple[ParamSplit, ...]
    split_sizes: tuple[int, ...]
    degrees: tuple[int, ...]
    collectives: tuple[Collective, ...]
    whole_nodes: tuple[str, ...] = ()
    fwd_flops: int = 0
    bwd_flops: int = 0
    whole_fwd_flops: int = 0
    whole_bwd_flops: int = 0
    split_activation_bytes: int = 0
    whole_activation_bytes: int = 0

    def __post_init__(self) -> None:
        label = self.nodes[0] if self.nodes else "?"
        if self.kind not in get_args(RegionKind):
            raise GraphError(f"region at {label!r}: unknown kind {self.kind!r}")
        if not self.nodes:
            raise GraphError("a tensor-parallel region needs at least one node")
        if not self.split_sizes or any(s < 1 for s in self.split_sizes):
            raise GraphError(f"region at {label!r}: split_sizes must be positive, got {self.split_sizes}")
        expected = divisors(math.gcd(*self.split_sizes))
        if self.degrees != expected:
            raise GraphError(
                f"region at {label!r}: degrees {self.degrees} are not the divisors {expected} of the greatest "
                f"common divisor of split_sizes {self.split_sizes}"
            )
        for f in (
            "fwd_flops",
            "bwd_flops",
            "whole_fwd_flops",
            "whole_bwd_flops",
            "split_activation_bytes",
            "whole_activation_bytes",
        ):
            v = getattr(self, f)
            if v < 0:
                raise GraphError(f"region at {label!r}: {f} must be >= 0, got {v}")
        names = [p.name for p in self.params]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise GraphError(f"region at {label!r}: parameters listed twice: {', '.join(dup)}")
        both = sorted(set(self.nodes) & set(self.whole_nodes))
        if both:
            raise GraphError(f"region at {label!r}: nodes both split and whole: {', '.join(both)}")

    @property
    def split_param_bytes(self) -> int:
        """Bytes of the parameters divided among the devices."""
        return sum(p.nbytes for p in self.params if p.split)

    @property
    def whole_param_bytes(self) -> int:
        """Bytes of the region's replicated parameters (each device holds them whole)."""
        return sum(p.nbytes for p in self.params if not p.split)

    @property
    def grad_reduce_bytes(self) -> int:
        """Bytes of the replicated parameters whose gradients the group all-reduces once per step."""
        return sum(p.nbytes for p in self.params if p.grad_reduce)

    def span(self, index: Mapping[str, int]) -> tuple[int, int]:
        """``(first, last)`` positions of the region's nodes (split and whole) in a graph, given its
        name -> position map (:meth:`OpGraph.index`). A pipeline cut at ``p`` with ``first < p <= last``
        crosses the region."""
        pos = [index[n] for n in (*self.nodes, *self.whole_nodes)]
        return min(pos), max(pos)

    def sequence_parallel_collectives(self) -> tuple[Collective, ...]:
        """The collectives of the sequence-parallel variant (Korthikanti et al. 2022): a forward all-reduce
        of partial outputs becomes a reduce-scatter (and an all-gather of its gradient in the backward); a
        backward all-reduce of the input's gradient becomes an all-gather of the input in the forward and a
        reduce-scatter of its gradient in the backward. Loss statistics stay all-reduces. Same bytes."""
        out: list[Collective] = []
        for c in self.collectives:
            size = (c.node, c.bytes_per_sample, c.fixed_bytes)
            if c.reason == "partial-output":
                out.append(Collective("reduce-scatter", "forward", c.reason, *size))
                out.append(Collective("all-gather", "backward", c.reason, *size))
            elif c.reason == "input-gradient":
                out.append(Collective("all-gather", "forward", c.reason, *size))
                out.append(Collective("reduce-scatter", "backward", c.reason, *size))
            else:
                out.append(c)
        return tuple(out)

    def cost(self, t: int, *, microbatch: int = 1, sequence_parallel: bool = False) -> RegionCost:
        """Per-device compute, memory and communication of the region split ``t`` ways (see
        [Note: tensor-parallel regions]). ``t = 1`` gives the unsplit region with no communication.

        Raises:
            ValueError: ``t`` is not one of :attr:`degrees`, or ``microbatch < 1``.
        """
        if t not in self.degrees:
            raise ValueError(
                f"degree {t} is not valid for the {self.kind} region at {self.nodes[0]!r}: its split sizes "
                f"{self.split_sizes} allow {self.degrees}"
            )
        if microbatch < 1:
            raise ValueError(f"microbatch must be >= 1, got {microbatch}")
        colls = self.sequence_parallel_collectives() if sequence_parallel else self.collectives
        return RegionCost(
            t=t,
            fwd_flops=self.fwd_flops / t + self.whole_fwd_flops,
            bwd_flops=self.bwd_flops / t + self.whole_bwd_flops,
            param_bytes=self.split_param_bytes / t + self.whole_param_bytes,
            activation_bytes=self.split_activation_bytes / t + self.whole_activation_bytes,
            collective_bytes=sum(c.bytes_per_device(microbatch, t) for c in colls),
            grad_reduce_bytes=self.grad_reduce_bytes if t > 1 else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "nodes": list(self.nodes),
            "whole_nodes": list(self.whole_nodes),
            "params": [p.to_dict() for p in self.params],
            "split_sizes": list(self.split_sizes),
            "degrees": list(self.degrees),
            "collectives": [c.to_dict() for c in self.collectives],
            "fwd_flops": self.fwd_flops,
            "bwd_flops": self.bwd_flops,
            "whole_fwd_flops": self.whole_fwd_flops,
            "whole_bwd_flops": self.whole_bwd_flops,
            "split_activation_bytes": self.split_activation_bytes,
            "whole_activation_bytes": self.whole_activation_bytes,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "region") -> TensorParallelRegion:
        m = get_map(d, path, GraphError)
        kind = get_str(m, "kind", path, GraphError)
        if kind not in get_args(RegionKind):
            raise GraphError(f"{path}.kind: expected one of {', '.join(get_args(RegionKind))}, got {kind!r}")
        return cls(
            kind=kind,  # type: ignore[arg-type]
            nodes=_strs(get_list(m, "nodes", path, GraphError), f"{path}.nodes"),
            whole_nodes=_strs(get_list(m, "whole_nodes", path, GraphError, []), f"{path}.whole_nodes"),
            params=tuple(
                ParamSplit.from_dict(p, f"{path}.params[{i}]")
                for i, p in enumerate(get_list(m, "params", path, GraphError))
            ),
            split_sizes=_ints(get_list(m, "split_sizes", path, GraphError), f"{path}.split_sizes"),
            degrees=_ints(get_list(m, "degrees", path, GraphError), f"{path}.degrees"),
            collectives=tuple(
                Collective.from_dict(c, f"{path}.collectives[{i}]")
                for i, c in enumerate(get_list(m, "collectives", path, GraphError))
            ),
            fwd_flops=get_int(m, "fwd_flops", path, GraphError, 0),
            bwd_flops=get_int(m, "bwd_flops", path, GraphError, 0),
            whole_fwd_flops=get_int(m, "whole_fwd_flops", path, GraphError, 0),
            whole_bwd_flops=get_int(m, "whole_bwd_flops", path, GraphError, 0),
            split_activation_bytes=get_int(m, "split_activation_bytes", path, GraphError, 0),
            whole_activation_bytes=get_int(m, "whole_activation_bytes", path, GraphError, 0),
        )


@dataclass(frozen=True, slots=True)
class TensorParallelAnnotation:
    """The tensor-parallel regions of a graph (see [Note: tensor-parallel regions]).

    Attributes:
        regions: the regions, ordered by their first node; no node is in two regions. Empty for a model with
            no such structure (it runs with ``t = 1`` only, or replicated on a tensor-parallel group).
        batch: the batch size the graph was traced at (per-node FLOPs and activation bytes are for it;
            collectives are given per sample).
    """

    regions: tuple[TensorParallelRegion, ...] = ()
    batch: int = 1
    schema_version: int = TP_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != TP_SCHEMA_VERSION:
            raise GraphError(
                f"tensor_parallel schema_version {self.schema_version} is not supported "
                f"(this distplan reads {TP_SCHEMA_VERSION})"
            )
        if self.batch < 1:
            raise GraphError(f"tensor_parallel.batch must be >= 1, got {self.batch}")

    def param_splits(self) -> dict[str, ParamSplit]:
        """Every parameter some region splits -> its split (the same in every region reading it)."""
        out: dict[str, ParamSplit] = {}
        for r in self.regions:
            for p in r.params:
                if p.split:
                    out.setdefault(p.name, p)
        return out

    def region_of(self) -> dict[str, int]:
        """Node name -> index of the region holding it (split or whole), for nodes in a region."""
        return {n: i for i, r in enumerate(self.regions) for n in (*r.nodes, *r.whole_nodes)}

    def lint(self, graph: OpGraph) -> None:
        """Check the annotation against ``graph``; raise :class:`GraphError` naming what is wrong.

        Checks: every node and collective names a node of the graph; no node is in two regions; each
        region's FLOPs are the sums over its nodes; each region lists every trainable parameter its nodes
        read (when the graph has ``param_sizes``) with that parameter's size; a parameter split by several
        regions is split the same way in each.
        """
        index = graph.index()
        owner: dict[str, int] = {}
        splits: dict[str, tuple[int, ParamSplit]] = {}
        for i, r in enumerate(self.regions):
            where = f"tensor_parallel.regions[{i}] ({r.kind} at {r.nodes[0]!r})"
            for n in (*r.nodes, *r.whole_nodes):
                if n not in index:
                    raise GraphError(f"{where}: node {n!r} is not in the graph")
                if n in owner and owner[n] != i:
                    raise GraphError(f"{where}: node {n!r} is also in region {owner[n]}")
                owner[n] = i
            for c in r.collectives:
                if c.node not in index:
                    raise GraphError(f"{where}: collective node {c.node!r} is not in the graph")
            nodes = [graph.nodes[index[n]] for n in r.nodes]
            whole = [graph.nodes[index[n]] for n in r.whole_nodes]
            for f, group in (("fwd_flops", nodes), ("bwd_flops", nodes)):
                total = sum(getattr(n, f) for n in group)
                if total != getattr(r, f):
                    raise GraphError(f"{where}: {f} is {getattr(r, f)} but its nodes sum to {total}")
            for f, src in (("whole_fwd_flops", "fwd_flops"), ("whole_bwd_flops", "bwd_flops")):
                total = sum(getattr(n, src) for n in whole)
                if total != getattr(r, f):
                    raise GraphError(f"{where}: {f} is {getattr(r, f)} but its whole nodes sum to {total}")
            listed = {p.name: p for p in r.params}
            if graph.param_sizes is not None:
                for node in (*nodes, *whole):
                    for name in node.params:
                        if name in graph.param_sizes and name not in listed:
                            raise GraphError(
                                f"{where}: node {node.name!r} reads parameter {name!r}, not listed"
                            )
                for p in r.params:
                    size = graph.param_sizes.get(p.name)
                    if size is not None and size != p.nbytes:
                        raise GraphError(
                            f"{where}: parameter {p.name!r} has {p.nbytes} bytes here, {size} in the graph"
                        )
            for p in r.params:
                if not p.split:
                    continue
                prev = splits.get(p.name)
                if prev is not None and (prev[1].dim, prev[1].pieces) != (p.dim, p.pieces):
                    raise GraphError(
                        f"{where}: parameter {p.name!r} is split along dim {p.dim} (pieces {p.pieces}) but "
                        f"region {prev[0]} splits it along dim {prev[1].dim} (pieces {prev[1].pieces})"
                    )
                splits.setdefault(p.name, (i, p))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "batch": self.batch,
            "regions": [r.to_dict() for r in self.regions],
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "tensor_parallel") -> TensorParallelAnnotation:
        m = get_map(d, path, GraphError)
        version = get_int(m, "schema_version", path, GraphError)
        if version != TP_SCHEMA_VERSION:
            raise GraphError(
                f"{path}.schema_version: {version} is not supported (this distplan reads {TP_SCHEMA_VERSION})"
            )
        return cls(
            regions=tuple(
                TensorParallelRegion.from_dict(r, f"{path}.regions[{i}]")
                for i, r in enumerate(get_list(m, "regions", path, GraphError))
            ),
            batch=get_int(m, "batch", path, GraphError, 1, minimum=1),
        )


def _ints(values: Iterable[Any], path: str) -> tuple[int, ...]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int):
            raise GraphError(f"{path}[{i}]: expected an integer, got {v!r}")
        out.append(v)
    return tuple(out)


def _strs(values: Sequence[Any], path: str) -> tuple[str, ...]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise GraphError(f"{path}[{i}]: expected a string, got {v!r}")
    return tuple(values)
