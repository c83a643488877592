"""Activation recomputation on a stage's own graph: ``full`` and ``selective`` (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models").

[Note: recomputation]
- ``full`` keeps only the *stage's* inputs per microbatch chunk: the whole stage program runs under
  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, so its forward saves nothing but its
  inputs, and the backward of each chunk first re-runs the stage's forward. We recompute per stage rather
  than per block because a stage is the unit the plan prices (its input is the cut value the planner already
  knows, so the activation memory that remains is ``in-flight microbatches x input bytes`` plus one chunk's
  activations during its backward) and because a stage needs no notion of "block" -- the graph has none
  that does not come from module names. The cost is one extra forward of the stage per microbatch.
- ``selective`` recomputes only the attention core, the part Megatron-LM found cheap to recompute and
  expensive to keep (scores ``QK^T``, mask/scale, softmax, dropout and the product with ``V``: activations
  of size ``b * heads * s^2``, against FLOPs a small fraction of the layer). The regions are found in the
  graph, never from names: (a) every fused scaled-dot-product-attention op (``aten.scaled_dot_product_
  attention`` and its kernels, ``F.scaled_dot_product_attention``) is a region by itself; (b) for attention
  written out, every softmax whose input comes, through elementwise ops only (scale, mask add, casts), from a
  matrix product of two activations (no parameter operand) and whose output reaches, through elementwise
  ops only (dropout, casts), a matrix product with another activation: the region is every node on a path
  from the first product to the second. Each region becomes a submodule of the stage run under the same
  non-reentrant checkpoint; values the region reads are its inputs (saved), values read after it are its
  outputs. A region whose outputs are read before all its inputs exist (which a topological order cannot
  produce for the patterns above) is left as it is. A fused kernel never stores the scores (it keeps its
  inputs, output and a per-row log-sum-exp), so recomputing it saves little; the scores are real only in
  attention written out (``attn_implementation="eager"``, or the DTensor form on the CPU), where the
  saving is ``b * heads * s^2`` values per layer and microbatch.

Random ops inside a recomputed region replay the same draws (``checkpoint`` restores the RNG state), so
recomputation never changes the numerics. Parameters keep their objects (only their attribute paths move
under the recomputed submodule), so names, sharding and tensor parallelism apply unchanged.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from distplan.attention_ops import ELEMENTWISE, MATMUL, SDPA, SOFTMAX
from distplan.errors import LoweringError

__all__ = ["Recomputed", "apply_recompute", "attention_core_regions"]


class Recomputed(nn.Module):
    """``inner`` run under non-reentrant activation checkpointing: its forward keeps only its inputs, and
    the backward recomputes it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        return checkpoint(self.inner, *args, use_reentrant=False)


def _op_name(n: fx.Node) -> str:
    """The bare op name of a call node: ``aten.softmax.int`` -> ``softmax``, ``operator.add`` -> ``add``."""
    if n.op == "call_method":
        return str(n.target)
    if n.op != "call_function":
        return ""
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::")[-1]
    if t is operator.getitem:
        return "getitem"
    return str(getattr(t, "__name__", t))


def _tensor_args(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if a.op != "get_attr"]


def _is_activation(n: fx.Node) -> bool:
    """Not a parameter or buffer (``get_attr``) and not computed from them alone."""
    return n.op != "get_attr"


def _back_to_product(n: fx.Node, limit: int = 12) -> fx.Node | None:
    """From a softmax's input, walk back through elementwise ops to a matrix product of two activations."""
    cur: fx.Node | None = n
    for _ in range(limit):
        if cur is None:
            return None
        name = _op_name(cur)
        if name in MATMUL:
            operands = [a for a in cur.args if isinstance(a, fx.Node)]
            if len(operands) >= 2 and all(_is_activation(a) for a in operands[-2:]):
                return cur
            return None
        if name not in ELEMENTWISE:
            return None
        ins = _tensor_args(cur)
        first = cur.args[0] if cur.args and isinstance(cur.args[0], fx.Node) else None
        cur = first if first is not None else (ins[0] if ins else None)
    return None


def _forward_to_product(n: fx.Node, limit: int = 12) -> fx.Node | None:
    """From a softmax, walk forward through elementwise ops to a matrix product with another activation."""
    cur = n
    for _ in range(limit):
        users = [u for u in cur.users if u.op != "output"]
        products = [u for u in users if _op_name(u) in MATMUL]
        if products:
            p = products[0]
            operands = [a for a in p.args if isinstance(a, fx.Node)]
            others = [a for a in operands if a is not cur]
            return p if others and all(_is_activation(a) for a in others) else None
        nxt = [u for u in users if _op_name(u) in ELEMENTWISE]
        if len(nxt) != 1:
            return None
        cur = nxt[0]
    return None


def attention_core_regions(gm: fx.GraphModule) -> list[list[str]]:
    """The attention cores of a graph (see [Note: recomputation]): lists of node names, in graph order."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    regions: list[list[str]] = []
    taken: set[fx.Node] = set()
    for n in nodes:
        if n in taken:
            continue
        name = _op_name(n)
        if name in SDPA:
            region = {n}
            # A kernel variant returns a tuple: its getitems belong to it.
            region |= {u for u in n.users if _op_name(u) == "getitem"}
        elif name in SOFTMAX:
            src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            qk = _back_to_product(src) if src is not None else None
            pv = _forward_to_product(n)
            if qk is None or pv is None:
                continue
            region = _between(qk, pv, pos)
        else:
            continue
        if region & taken:
            continue
        taken |= region
        regions.append([x.name for x in sorted(region, key=pos.__getitem__)])
    return regions


def _between(a: fx.Node, b: fx.Node, pos: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes on a path from ``a`` to ``b`` (both included)."""
    down: set[fx.Node] = set()
    stack = [a]
    while stack:
        x = stack.pop()
        if x in down or pos[x] > pos[b]:
            continue
        down.add(x)
        stack.extend(x.users)
    up: set[fx.Node] = set()
    stack = [b]
    while stack:
        x = stack.pop()
        if x in up or pos[x] < pos[a]:
            continue
        up.add(x)
        stack.extend(x.all_input_nodes)
    return (down & up) | {a, b}


def outline_regions(
    gm: fx.GraphModule, regions: Sequence[Iterable[str]], wrap: Callable[[fx.GraphModule], nn.Module]
) -> tuple[fx.GraphModule, int]:
    """Replace each region (node names) of ``gm`` by one call of ``wrap(region graph)``; returns the new
    module and how many regions were outlined (see [Note: recomputation] for the regions left as they are).

    The region module takes the values the region reads from outside (``get_attr`` nodes are copied in,
    so parameters move under it) and returns, as a tuple, the values read after it.
    """
    nodes = list(gm.graph.nodes)
    pos = {n.name: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    plans: list[tuple[list[fx.Node], list[fx.Node], list[fx.Node], int]] = []
    used: set[str] = set()
    for names in regions:
        members = sorted((by_name[x] for x in names if x in by_name), key=lambda n: pos[n.name])
        mset = set(members)
        if not members or mset & {by_name[u] for u in used}:
            continue
        inputs = list(
            dict.fromkeys(
                a for m in members for a in m.all_input_nodes if a not in mset and a.op != "get_attr"
            )
        )
        outputs = [m for m in members if any(u not in mset for u in m.users)]
        if not outputs:
            continue
        ready = max([pos[a.name] for a in inputs] + [pos[members[0].name]])
        first_use = min(pos[u.name] for m in outputs for u in m.users if u not in mset)
        if first_use <= ready:
            continue  # outputs read before all inputs exist: leave the region as it is
        plans.append((members, inputs, outputs, ready))
        used |= {m.name for m in members}
    if not plans:
        return gm, 0

    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    in_region = {m: i for i, p in enumerate(plans) for m in p[0]}
    emit_after: dict[int, list[int]] = {}
    for i, p in enumerate(plans):
        emit_after.setdefault(p[3], []).append(i)
    attrs: dict[str, Any] = {}
    for i, n in enumerate(nodes):
        if n not in in_region:
            env[n] = new.node_copy(n, lambda a: env[a])
        for ri in emit_after.get(i, []):
            members, inputs, outputs, _ = plans[ri]
            name = f"recompute_{ri}"
            attrs[name] = wrap(
                fx.GraphModule(gm, _region_graph(members, inputs, outputs), class_name=f"Recompute{ri}")
            )
            call = new.call_module(name, tuple(env[a] for a in inputs))
            for j, o in enumerate(outputs):
                g = new.call_function(operator.getitem, (call, j))
                g.meta = dict(o.meta)
                env[o] = g
    for n in list(new.nodes):
        # A parameter read only inside regions now lives under the region module alone.
        if n.op == "get_attr" and not n.users:
            new.erase_node(n)
        elif n.op in ("get_attr", "call_module") and str(n.target) not in attrs:
            attrs[str(n.target)] = _fetch(gm, str(n.target))
    new.lint()
    # The root is a dict of exactly the referenced attributes: ``gm`` itself is left unchanged.
    return fx.GraphModule(attrs, new, class_name=type(gm).__name__), len(plans)


def _fetch(m: nn.Module, path: str) -> Any:
    obj: Any = m
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _region_graph(members: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.Graph:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        ph = g.placeholder(a.name)
        ph.meta = dict(a.meta)
        env[a] = ph

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise LoweringError(
                    f"recompute region reads {a.name!r}, which it neither computes nor receives"
                )
            env[a] = g.node_copy(a)
        return env[a]

    for m in members:
        env[m] = g.node_copy(m, lookup)
    g.output(tuple(env[o] for o in outputs))
    g.lint()
    return g


def apply_recompute(gm: fx.GraphModule, mode: str) -> tuple[nn.Module, int]:
    """The stage program with recomputation ``mode`` applied (see [Note: recomputation]).

    Returns ``(module, regions)``: the module to run (``gm`` itself for ``none``) and how many regions it
    recomputes (1 for ``full``; the attention cores found for ``selective``, possibly 0 for a model without
    attention, which then runs as under ``none``).

    Raises:
        LoweringError: an unknown mode.
    """
    if mode == "none":
        return gm, 0
    if mode == "full":
        return Recomputed(gm), 1
    if mode == "selective":
        return outline_regions(gm, attention_core_regions(gm), Recomputed)
    raise LoweringError(f"unknown recompute mode {mode!r}; use none, selective or full")
