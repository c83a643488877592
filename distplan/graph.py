"""The traced model as plain data: :class:`OpGraph` of :class:`OpNode` with :class:`TensorMeta`.

The tracer (``distplan.tracer``) produces it from an ``nn.Module``; the planner reads it without torch.
Nodes are in topological order. Node names are the ``torch.fx`` node names of the traced graph, so the
lowering can find the same cut positions in a re-traced copy of the model.

[Note: cut positions]
A *cut position* ``p`` (``0 <= p <= len(nodes)``) separates ``nodes[:p]`` from ``nodes[p:]``. A pipeline
stage covers a half-open range of positions ``[start, end)``. ``OpGraph.cut_costs()[p]`` is the number of
bytes of every value defined before ``p`` and used at or after ``p`` (skip connections included); graph
outputs count as used at ``len(nodes)``. Parameters are not values here: they live with the stage that
owns them and never cross a cut.

[Note: shared parameters]
A parameter read by several nodes (a tied input embedding and output projection, a layer applied twice) is
held by *every* pipeline stage that runs one of those nodes: each holder keeps its weights, gradient and
optimizer state, and the holders sum their gradients after the backward (the lowering's "embedding group",
see ``distplan.lowering.runtime``). ``OpNode.param_bytes`` charges each parameter once, to its first reader,
so that the nodes sum to the model; ``OpGraph.param_sizes`` gives the size of every named parameter, so the
planner can charge the other holders too (:meth:`OpGraph.shared_params`). Schema 1 graphs and hand-built
graphs may lack the table (``param_sizes`` is None): then a name read at several positions cannot be priced
and the planner says so in its report (:meth:`OpGraph.unsized_shared_names`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distplan._serde import canonical_hash, get_int, get_list, get_map, get_str, load_json, read_json_file
from distplan.errors import GraphError
from distplan.tensor_parallel import TensorParallelAnnotation

__all__ = ["GRAPH_SCHEMA_VERSION", "READABLE_GRAPH_SCHEMAS", "OpGraph", "OpNode", "SharedParam", "TensorMeta"]

#: Version 2 added ``param_sizes`` (see [Note: shared parameters]).
GRAPH_SCHEMA_VERSION = 2
#: Versions :meth:`OpGraph.from_dict` reads; a version 1 document loads with ``param_sizes = None``.
READABLE_GRAPH_SCHEMAS = (1, 2)

DTYPE_BYTES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "complex64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Shape, dtype and size in bytes of one tensor value."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    def __post_init__(self) -> None:
        if any((not isinstance(s, int)) or s < 0 for s in self.shape):
            raise GraphError(f"tensor shape must hold non-negative integers, got {self.shape}")
        if self.nbytes < 0:
            raise GraphError(f"tensor nbytes must be >= 0, got {self.nbytes}")

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: Any, path: str = "tensor") -> TensorMeta:
        m = get_map(d, path, GraphError)
        shape = get_list(m, "shape", path, GraphError)
        for i, s in enumerate(shape):
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise GraphError(f"{path}.shape[{i}]: expected a non-negative integer, got {s!r}")
        return cls(
            shape=tuple(shape),
            dtype=get_str(m, "dtype", path, GraphError),
            nbytes=get_int(m, "nbytes", path, GraphError),
        )


@dataclass(frozen=True, slots=True)
class OpNode:
    """One operation of the traced graph.

    Attributes:
        name: the fx node name (unique in the graph).
        op: the fx opcode: ``placeholder`` (a model input) or ``call_function``/``call_method``/``call_module``.
        target: the operator, e.g. ``aten.mm.default``.
        module: FQN of the innermost ``nn.Module`` that owns the node (``""`` for the root).
        inputs: names of the graph nodes whose outputs this node reads (never parameters).
        outputs: the tensors it produces (several for multi-output ops; empty for non-tensor results).
        fwd_flops / bwd_flops: floating-point operations of its forward and backward.
        bytes_moved: bytes read and written by its forward (inputs, parameters, outputs).
        param_bytes: bytes of the parameters this node is the first user of (tied weights count once).
        params: FQNs of every parameter or buffer this node reads.
        activation_bytes: bytes its backward needs kept from the forward.
    """

    name: str
    op: str
    target: str
    module: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[TensorMeta, ...] = ()
    fwd_flops: int = 0
    bwd_flops: int = 0
    bytes_moved: int = 0
    param_bytes: int = 0
    params: tuple[str, ...] = ()
    activation_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise GraphError("node name must not be empty")
        for f in ("fwd_flops", "bwd_flops", "bytes_moved", "param_bytes", "activation_bytes"):
            v = getattr(self, f)
            if v < 0:
                raise GraphError(f"node {self.name!r}: {f} must be >= 0, got {v}")

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "target": self.target,
            "module": self.module,
            "inputs": list(self.inputs),
            "outputs": [t.to_dict() for t in self.outputs],
            "fwd_flops": self.fwd_flops,
            "bwd_flops": self.bwd_flops,
            "bytes_moved": self.bytes_moved,
            "param_bytes": self.param_bytes,
            "params": list(self.params),
            "activation_bytes": self.activation_bytes,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "node") -> OpNode:
        m = get_map(d, path, GraphError)
        inputs = get_list(m, "inputs", path, GraphError, [])
        params = get_list(m, "params", path, GraphError, [])
        for key, seq in (("inputs", inputs), ("params", params)):
            for i, v in enumerate(seq):
                if not isinstance(v, str):
                    raise GraphError(f"{path}.{key}[{i}]: expected a string, got {v!r}")
        outs = get_list(m, "outputs", path, GraphError, [])
        return cls(
            name=get_str(m, "name", path, GraphError),
            op=get_str(m, "op", path, GraphError),
            target=get_str(m, "target", path, GraphError, ""),
            module=get_str(m, "module", path, GraphError, ""),
            inputs=tuple(inputs),
            outputs=tuple(TensorMeta.from_dict(t, f"{path}.outputs[{i}]") for i, t in enumerate(outs)),
            fwd_flops=get_int(m, "fwd_flops", path, GraphError, 0),
            bwd_flops=get_int(m, "bwd_flops", path, GraphError, 0),
            bytes_moved=get_int(m, "bytes_moved", path, GraphError, 0),
            param_bytes=get_int(m, "param_bytes", path, GraphError, 0),
            params=tuple(params),
            activation_bytes=get_int(m, "activation_bytes", path, GraphError, 0),
        )


@dataclass(frozen=True, slots=True)
class SharedParam:
    """Named parameters read at several node positions (see [Note: shared parameters]).

    Attributes:
        names: FQNs of the parameters (those read at exactly the same positions are grouped).
        nbytes: their bytes together, as traced (``param_dtype``).
        positions: the sorted node positions reading them (at least two); ``positions[0]``, the first
            reader, carries their bytes in ``OpNode.param_bytes``.
    """

    names: tuple[str, ...]
    nbytes: int
    positions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OpGraph:
    """A traced model: nodes in topological order plus totals.

    Attributes:
        name: model name (e.g. ``gpt2-1.5b``).
        nodes: the operations in topological order.
        outputs: names of the nodes whose values are the model's outputs.
        num_params: parameter count (tied weights once).
        param_bytes: parameter bytes (tied weights once); equals the sum of ``node.param_bytes``.
        param_dtype: dtype of the parameters as traced.
        meta: free-form facts about the trace (batch, seq, tracer, model spec, seconds); strings and numbers.
        param_sizes: bytes of each trainable parameter by the FQN the nodes' ``params`` use (a tied parameter
            once, under one name); parameters not listed are private to the node carrying their bytes. None
            when the producer did not record it (schema 1, hand-built graphs). See [Note: shared parameters].
        tensor_parallel: what a tensor-parallel group can split (see [Note: tensor-parallel regions] in
            ``distplan.tensor_parallel``); None when the producer did not look (older graphs, hand-built
            ones), an annotation with no regions when it looked and found none.
    """

    name: str
    nodes: tuple[OpNode, ...]
    outputs: tuple[str, ...] = ()
    num_params: int = 0
    param_bytes: int = 0
    param_dtype: str = "float32"
    meta: Mapping[str, Any] = field(default_factory=dict)
    param_sizes: Mapping[str, int] | None = None
    tensor_parallel: TensorParallelAnnotation | None = None
    schema_version: int = GRAPH_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != GRAPH_SCHEMA_VERSION:
            raise GraphError(
                f"graph schema_version {self.schema_version} is not supported in memory (this distplan builds "
                f"{GRAPH_SCHEMA_VERSION}; older documents are upgraded by from_dict)"
            )
        if self.num_params < 0 or self.param_bytes < 0:
            raise GraphError(
                f"num_params and param_bytes must be >= 0, got {self.num_params}, {self.param_bytes}"
            )

    # ------------------------------------------------------------------ checks
    def lint(self) -> None:
        """Check the graph's invariants; raise :class:`GraphError` naming the offending node."""
        if not self.nodes:
            raise GraphError(f"graph {self.name!r} has no nodes")
        index: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if n.name in index:
                raise GraphError(f"node {i} {n.name!r}: duplicate name (first at node {index[n.name]})")
            for src in n.inputs:
                j = index.get(src)
                if j is None:
                    known = any(m.name == src for m in self.nodes[i + 1 :])
                    why = (
                        "is defined later (cycle or not topologically ordered)" if known else "does not exist"
                    )
                    raise GraphError(f"node {i} {n.name!r}: input {src!r} {why}")
            index[n.name] = i
        for o in self.outputs:
            if o not in index:
                raise GraphError(f"graph output {o!r} is not a node of the graph")
        total = sum(n.param_bytes for n in self.nodes)
        if total != self.param_bytes:
            raise GraphError(
                f"sum of node param_bytes is {total} but the graph declares param_bytes={self.param_bytes}"
            )
        if self.param_sizes is not None:
            self._lint_param_sizes(self.param_sizes)
        if self.tensor_parallel is not None:
            self.tensor_parallel.lint(self)

    def _lint_param_sizes(self, sizes: Mapping[str, int]) -> None:
        # The first reader of a named parameter carries its bytes (see [Note: shared parameters]): the
        # planner prices the other holders on top of the node prefix sums, so a table that disagrees with
        # the nodes would count a parameter twice or not at all.
        for name, b in sizes.items():
            if not name or isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise GraphError(
                    f"param_sizes[{name!r}]: expected a non-empty name and bytes >= 0, got {b!r}"
                )
        first: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for p in n.params:
                if p in sizes:
                    first.setdefault(p, i)
        carried = [0] * len(self.nodes)
        for p, i in first.items():
            carried[i] += sizes[p]
        for i, b in enumerate(carried):
            if b > self.nodes[i].param_bytes:
                names = sorted(p for p, j in first.items() if j == i)
                raise GraphError(
                    f"node {i} {self.nodes[i].name!r} is the first reader of {', '.join(names)} "
                    f"({b} bytes by param_sizes) but carries param_bytes={self.nodes[i].param_bytes} "
                    f"({b - self.nodes[i].param_bytes} bytes missing)"
                )
        listed = sum(sizes.values())
        if listed > self.param_bytes:
            raise GraphError(
                f"param_sizes add up to {listed} bytes, more than the graph's param_bytes={self.param_bytes} "
                f"(by {listed - self.param_bytes})"
            )

    # ------------------------------------------------------------------ derived
    def __len__(self) -> int:
        return len(self.nodes)

    def index(self) -> dict[str, int]:
        """Node name -> position."""
        return {n.name: i for i, n in enumerate(self.nodes)}

    @property
    def fwd_flops(self) -> int:
        return sum(n.fwd_flops for n in self.nodes)

    @property
    def bwd_flops(self) -> int:
        return sum(n.bwd_flops for n in self.nodes)

    @property
    def activation_bytes(self) -> int:
        return sum(n.activation_bytes for n in self.nodes)

    def last_uses(self) -> list[int]:
        """For each node, the position of its last consumer (``len(nodes)`` for graph outputs, -1 if unused)."""
        idx = self.index()
        last = [-1] * len(self.nodes)
        for i, n in enumerate(self.nodes):
            for src in n.inputs:
                j = idx[src]
                if i > last[j]:
                    last[j] = i
        for o in self.outputs:
            last[idx[o]] = len(self.nodes)
        return last

    def cut_costs(self) -> tuple[int, ...]:
        """Bytes crossing a cut at every position ``0..len(nodes)`` (see [Note: cut positions])."""
        n = len(self.nodes)
        diff = [0] * (n + 2)
        for i, last in enumerate(self.last_uses()):
            if last > i:
                b = self.nodes[i].output_bytes
                diff[i + 1] += b
                diff[last + 1] -= b
        out = []
        acc = 0
        for p in range(n + 1):
            acc += diff[p]
            out.append(acc)
        return tuple(out)

    def param_readers(self) -> dict[str, tuple[int, ...]]:
        """Every FQN in some node's ``params`` -> the sorted positions of the nodes reading it."""
        out: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for p in n.params:
                pos = out.setdefault(p, [])
                if not pos or pos[-1] != i:
                    pos.append(i)
        return {p: tuple(v) for p, v in out.items()}

    def shared_params(self) -> tuple[SharedParam, ...]:
        """The named parameters (``param_sizes``) read at two positions or more, grouped by those positions,
        in order of position (see [Note: shared parameters]); empty without a table."""
        if not self.param_sizes:
            return ()
        groups: dict[tuple[int, ...], list[str]] = {}
        for p, pos in self.param_readers().items():
            if p in self.param_sizes and len(pos) > 1:
                groups.setdefault(pos, []).append(p)
        return tuple(
            SharedParam(tuple(sorted(names)), sum(self.param_sizes[n] for n in names), pos)
            for pos, names in sorted(groups.items())
        )

    def unsized_shared_names(self) -> tuple[str, ...]:
        """Names read at two positions or more whose size the graph does not give (only when
        ``param_sizes`` is None): parameters or buffers the planner cannot charge to every holder."""
        if self.param_sizes is not None:
            return ()
        return tuple(sorted(p for p, pos in self.param_readers().items() if len(pos) > 1))

    def crossing_values(self, position: int) -> list[str]:
        """Names of the nodes whose values cross a cut at ``position``."""
        return [self.nodes[i].name for i, last in enumerate(self.last_uses()) if i < position <= last]

    @property
    def structure_hash(self) -> str:
        """Hash of the graph's structure only (names, ops, targets, edges, modules): equal for the same model
        traced at another batch size or width, which is what the lowering checks a plan against."""
        return canonical_hash(
            [[n.name, n.op, n.target, n.module, list(n.inputs)] for n in self.nodes] + [list(self.outputs)]
        )

    @property
    def content_hash(self) -> str:
        """Hash of the whole graph (structure and every size)."""
        return canonical_hash(self.to_dict())

    # ------------------------------------------------------------------ serde
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "num_params": self.num_params,
            "param_bytes": self.param_bytes,
            "param_dtype": self.param_dtype,
            "outputs": list(self.outputs),
            "meta": dict(self.meta),
            **({} if self.param_sizes is None else {"param_sizes": dict(sorted(self.param_sizes.items()))}),
            **({} if self.tensor_parallel is None else {"tensor_parallel": self.tensor_parallel.to_dict()}),
            "nodes": [n.to_dict() for n in self.nodes],
        }

    @classmethod
    def from_dict(cls, d: Any) -> OpGraph:
        m = get_map(d, "graph", GraphError)
        version = get_int(m, "schema_version", "graph", GraphError)
        if version not in READABLE_GRAPH_SCHEMAS:
            raise GraphError(
                f"graph.schema_version: {version} is not supported (this distplan reads "
                f"{' and '.join(str(v) for v in READABLE_GRAPH_SCHEMAS)})"
            )
        sizes: dict[str, int] | None = None
        if version >= 2 and m.get("param_sizes") is not None:
            raw = get_map(m["param_sizes"], "graph.param_sizes", GraphError)
            sizes = {}
            for k, v in raw.items():
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise GraphError(f"graph.param_sizes[{k!r}]: expected an integer >= 0, got {v!r}")
                sizes[str(k)] = v
        nodes = get_list(m, "nodes", "graph", GraphError)
        outputs = get_list(m, "outputs", "graph", GraphError, [])
        for i, o in enumerate(outputs):
            if not isinstance(o, str):
                raise GraphError(f"graph.outputs[{i}]: expected a string, got {o!r}")
        meta = get_map(m.get("meta", {}), "graph.meta", GraphError)
        g = cls(
            name=get_str(m, "name", "graph", GraphError),
            nodes=tuple(OpNode.from_dict(n, f"graph.nodes[{i}]") for i, n in enumerate(nodes)),
            outputs=tuple(outputs),
            num_params=get_int(m, "num_params", "graph", GraphError, 0),
            param_bytes=get_int(m, "param_bytes", "graph", GraphError, 0),
            param_dtype=get_str(m, "param_dtype", "graph", GraphError, "float32"),
            meta=dict(meta),
            param_sizes=sizes,
            tensor_parallel=None
            if m.get("tensor_parallel") is None
            else TensorParallelAnnotation.from_dict(m["tensor_parallel"], "graph.tensor_parallel"),
        )
        g.lint()
        return g

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> OpGraph:
        return cls.from_dict(load_json(text, GraphError, "graph"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> OpGraph:
        p = Path(path)
        data = read_json_file(p, GraphError, "graph")
        try:
            return cls.from_dict(data)
        except GraphError as e:
            raise GraphError(f"{p}: {e}") from e


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name like ``float32`` (``torch.`` prefix allowed)."""
    name = dtype.removeprefix("torch.")
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise GraphError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}") from None


def make_graph(name: str, nodes: Sequence[OpNode], **kw: Any) -> OpGraph:
    """Build and lint a graph whose ``param_bytes`` is the sum of its nodes' (handy in tests)."""
    kw.setdefault("param_bytes", sum(n.param_bytes for n in nodes))
    g = OpGraph(name=name, nodes=tuple(nodes), **kw)
    g.lint()
    return g
