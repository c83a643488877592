"""Find what of a captured graph can be split over a tensor-parallel group, from the graph alone.

:func:`find_tensor_parallel` reads a captured ``fx.GraphModule`` (with the annotated :class:`OpGraph` for
shapes, FLOPs and activation bytes) and returns a :class:`~distplan.tensor_parallel.TensorParallelAnnotation`:
the regions of [Note: tensor-parallel regions] in ``distplan.tensor_parallel``. Nothing here looks at model,
module or parameter *names*; the regions follow from the ops, their arguments and the shapes.

[Note: finding tensor-parallel regions]
Every matmul with a parameter as its weight (``linear``, ``mm``/``addmm``/``matmul`` with a weight or its
transpose, batched and grouped expert matmuls, an ``nn.Linear`` call) is a *candidate* column-parallel
matmul. Candidates are tried in graph order. Trying one assumes its output features are split (a *split
value*: which dimension, its size, the sizes ``t`` must divide) and propagates that forward, op by op, with a
table of rules in the spirit of DTensor's sharding propagation:

* elementwise ops (``torch.Tag.pointwise``, casts, dropout) keep the split; an operand that broadcasts over
  the split dimension is fine; one that does not must be split too: a parameter is split with it, a value
  that needs no gradient (a mask, a rotary table) is sliced locally, and any other value is *required* to be
  split: the search walks back from it to the candidates producing it and adds them to the region
  (so q, k and v join at attention, gate and up at their product);
* reshapes move the split to the output dimension that starts at the same flat offset (so ``hidden`` ->
  ``(heads, head_dim)`` splits the heads and ``t`` must divide the head count; kv heads expanded for
  grouped-query attention keep their split); transposes and permutes carry it; slicing or splitting along
  the split dimension is allowed at block boundaries: the first time it happens the producing matmul is
  re-tried as a *fused* projection with those blocks (``ParamSplit.pieces``);
* reductions, softmax and norms are fine over other dimensions and stop the region over the split one;
* attention (``scaled_dot_product_attention``, or two matmuls of split values) needs q, k and v split on
  the same (head) dimension;
* a matmul with a parameter weight that contracts the split dimension is a row-parallel exit: its output is a
  partial sum. A split value reaching the graph output ends an ``output`` region when the loss is a
  cross-entropy over that (last) dimension.

Any other use of a split value (an op without a rule, a reduction over it, a value leaving the region
unsplit) rejects the candidate and everything it pulled in, which then stay replicated: the search only
claims what it can prove, so a model with no such structure gets no regions. ``aten.embedding`` with a
parameter table is an ``embedding`` region on its own.

Collectives are placed where they move the fewest bytes: the forward all-reduce of a row-parallel output may
move past ops that are linear in it (views, casts, gathers of rows, sums over other dimensions, products
with values that need no gradient; a mixture-of-experts combine), and the backward all-reduce of the input's
gradient may move back the same way (the experts' token gather), stopping at a value with other users
outside the region or at a parameter. Ops passed so run whole on every device (``whole_nodes``).

Graphs captured with ``torch.fx`` (the fallback when export fails) hold Python functions rather than aten
ops; only their ``nn.Linear``/``nn.Embedding`` calls and aten-like ops are understood, so they may get
fewer regions than the same model exported.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from distplan.graph import OpGraph, OpNode
from distplan.tensor_parallel import (
    Collective,
    ParamSplit,
    RegionKind,
    TensorParallelAnnotation,
    TensorParallelRegion,
    divisors,
)

__all__ = ["OutputLoss", "find_tensor_parallel"]

OutputLoss = Literal["cross-entropy"]

# Ops that only look at a value (export's metadata checks, shape queries): they never stop a region.
_PASSIVE = {
    "_assert_tensor_metadata",
    "_assert_scalar",
    "sym_size",
    "sym_numel",
    "sym_stride",
    "_assert_async",
}
# Same-shape ops outside torch's pointwise tag.
_SAME_SHAPE = {
    "to",
    "_to_copy",
    "dropout",
    "feature_dropout",
    "alpha_dropout",
    "contiguous",
    "alias",
    "detach",
    "clone",
    "lift_fresh_copy",
    "type_as",
    "_softmax_backward_data",
}
_RESHAPES = {
    "view",
    "reshape",
    "_unsafe_view",
    "unsqueeze",
    "squeeze",
    "flatten",
    "unflatten",
    "view_as",
    "reshape_as",
}
_EXPANDS = {"expand", "expand_as", "broadcast_to"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax", "cumsum", "cumprod"}
_REDUCTIONS = {
    "sum",
    "mean",
    "amax",
    "amin",
    "var",
    "std",
    "logsumexp",
    "norm",
    "linalg_vector_norm",
    "prod",
}
_NORMS = {"layer_norm", "rms_norm"}
_SPLITS = {"split", "split_with_sizes", "chunk", "unsafe_split", "unsafe_chunk", "tensor_split"}
_GROUPED = {"_grouped_mm", "transformers::grouped_mm_fallback"}
# Most equal pieces a split value may be made of by merging outer dimensions into it (batch x heads).
_MAX_PIECES = 1 << 16
# Ops linear in their first operand, with no other operand that needs a gradient: a partial sum (or a
# partial gradient) may pass through them, and be reduced after (before) them.
_LINEAR_VIEWS = (
    _RESHAPES | _EXPANDS | {"transpose", "permute", "t", "to", "_to_copy", "contiguous", "alias", "clone"}
)
_LINEAR_GATHERS = {"index", "index_select", "gather", "select", "slice", "narrow"}
_LINEAR_REDUCTIONS = {"sum", "mean"}


class _Fail(Exception):
    """The candidate region cannot be split: the message says why (kept for :func:`find_tensor_parallel`'s
    ``rejected``)."""


class _Need(Exception):
    """An operand must be split for the region to hold; the search looks for the candidates producing it."""

    def __init__(self, node: fx.Node, why: str, *, local_ok: bool = False) -> None:
        super().__init__(why)
        self.node = node
        self.local_ok = local_ok


class _Pieces(Exception):
    """A split value is cut along its split dimension: re-try its producing matmuls as fused projections."""

    def __init__(self, origins: frozenset[fx.Node], bounds: tuple[int, ...]) -> None:
        super().__init__(f"cut at {bounds}")
        self.origins = origins
        self.bounds = bounds


@dataclass(frozen=True)
class _Split:
    """A value split along ``dim`` (size ``size``) into blocks; ``t`` must divide ``atoms``.

    ``pieces``: block sizes of a fused value (each split ``t`` ways), empty for one block. ``origins``: the
    column matmuls whose output features this dimension *is* (same coordinates), for re-trying them as
    fused; empty once a reshape or a cut changed the coordinates.
    """

    dim: int
    size: int
    atoms: int
    pieces: tuple[int, ...] = ()
    origins: frozenset[fx.Node] = frozenset()


@dataclass(frozen=True)
class _ParamMatmul:
    """A matmul whose weight is a parameter: ``x`` contracted along its last dimension with the weight's
    ``w_in`` dimension; the output's last dimension is the weight's ``w_out`` dimension (param coordinates)."""

    x: fx.Node
    weight: str
    w_shape: tuple[int, ...]
    w_in: int
    w_out: int
    bias: str | None
    grouped: bool  # a 3-D stacked weight: experts


@dataclass
class _Component:
    """A region being grown from its column matmuls (``origins`` -> their fused pieces)."""

    origins: dict[fx.Node, tuple[int, ...]]
    state: dict[fx.Node, Any] = field(default_factory=dict)  # node -> _Split | list[_Split | None]
    split_nodes: set[fx.Node] = field(default_factory=set)
    exits: list[fx.Node] = field(default_factory=list)  # row-parallel matmuls (partial outputs)
    exit_bias: set[fx.Node] = field(default_factory=set)  # exits whose output includes a bias
    outputs: list[fx.Node] = field(default_factory=list)  # split values that are graph outputs
    params: dict[str, ParamSplit] = field(default_factory=dict)
    sizes: set[int] = field(default_factory=set)
    attention: bool = False
    grouped: bool = False
    # Whole operands each device slices locally (key/value heads shared by all query heads when there are
    # fewer of them than devices); their gradients are all-reduced like a region input's.
    local: set[fx.Node] = field(default_factory=set)


def find_tensor_parallel(
    gm: fx.GraphModule,
    graph: OpGraph,
    module: nn.Module,
    *,
    batch: int | None = None,
    output_loss: OutputLoss | None = None,
    rejected: dict[str, str] | None = None,
) -> TensorParallelAnnotation:
    """The tensor-parallel regions of a captured graph (see [Note: finding tensor-parallel regions]).

    Args:
        gm: the captured graph (``Capture.gm``), whose get_attr targets are ``module``'s FQNs.
        graph: ``gm`` annotated (``graph_from_capture``): node names, output shapes, FLOPs, activation bytes
            and parameter names (a tied parameter under the one name ``graph`` uses).
        module: the model ``gm`` was captured from (its parameters tell parameters from buffers).
        batch: the batch size traced (collective bytes are divided by it); default: the first dimension of
            the first tensor input, else 1.
        output_loss: ``"cross-entropy"`` when the model's output feeds a cross-entropy over its last
            dimension (causal LMs): the last matmul may then be split over the vocabulary.
        rejected: if given, filled with candidate matmul node -> why it could not start a region.

    Returns:
        The annotation, its regions ordered by their first node. Raises nothing for models without
        structure: they get no regions.
    """
    finder = _Finder(gm, graph, module, batch=batch, output_loss=output_loss)
    annotation = finder.run()
    if rejected is not None:
        rejected.update(finder.rejected)
    return annotation


class _Finder:
    def __init__(
        self,
        gm: fx.GraphModule,
        graph: OpGraph,
        module: nn.Module,
        *,
        batch: int | None,
        output_loss: OutputLoss | None,
    ) -> None:
        self.gm = gm
        self.graph = graph
        self.output_loss = output_loss
        self.opnode: dict[str, OpNode] = {n.name: n for n in graph.nodes}
        self.pos: dict[fx.Node, int] = {}
        self.fx_nodes: list[fx.Node] = []
        for n in gm.graph.nodes:
            if n.name in self.opnode:
                self.pos[n] = len(self.fx_nodes)
                self.fx_nodes.append(n)
        self.output_node = next((n for n in gm.graph.nodes if n.op == "output"), None)
        self.graph_outputs: set[fx.Node] = (
            set(self.output_node.all_input_nodes) if self.output_node is not None else set()
        )
        self._params_by_name(module)
        # A value needs a gradient when it is floating and computed from a trainable parameter (routing
        # indices computed from a router's logits do not).
        from_param = self._flags(lambda n: self._param_of(n) is not None, placeholder=False)
        self.needs_grad = {n: v and self._floating(n) for n, v in from_param.items()}
        self.from_input = self._flags(lambda n: False, placeholder=True)
        self.batch = batch or self._batch()
        self.taken: set[fx.Node] = set()  # nodes of accepted regions (split or whole)
        self.splits: dict[str, tuple[int | None, tuple[int, ...]]] = {}  # parameter -> (dim, pieces) split
        self.failed: set[fx.Node] = set()
        self.rejected: dict[str, str] = {}
        self.regions: list[TensorParallelRegion] = []
        self._pm_cache: dict[fx.Node, _ParamMatmul | None] = {}

    # ------------------------------------------------------------------ graph facts
    def _params_by_name(self, module: nn.Module) -> None:
        named = dict(module.named_parameters(remove_duplicate=False))
        canonical = set(self.graph.param_sizes or ())
        for n in self.graph.nodes:
            canonical.update(n.params)
        by_id: dict[int, str] = {}
        for name, p in named.items():
            if name in canonical:
                by_id.setdefault(id(p), name)
        self.param_tensor: dict[str, torch.Tensor] = {}
        self.param_name: dict[str, str] = {}  # any FQN of a trainable parameter -> the graph's name
        for name, p in named.items():
            if p.requires_grad:
                graph_name = by_id.get(id(p), name)
                self.param_name[name] = graph_name
                self.param_tensor[graph_name] = p

    def _param_of(self, n: Any) -> str | None:
        """The graph name of the trainable parameter ``n`` reads (a get_attr node), else None."""
        if isinstance(n, fx.Node) and n.op == "get_attr":
            return self.param_name.get(str(n.target))
        return None

    def _flags(self, leaf: Callable[[fx.Node], bool], *, placeholder: bool) -> dict[fx.Node, bool]:
        out: dict[fx.Node, bool] = {}
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                out[n] = placeholder
            elif n.op == "get_attr":
                out[n] = leaf(n)
            else:
                out[n] = any(out.get(m, False) for m in n.all_input_nodes)
        return out

    def _floating(self, n: fx.Node) -> bool:
        if n.op == "get_attr":
            t = _fetch(self.gm, str(n.target))
            return isinstance(t, torch.Tensor) and (t.dtype.is_floating_point or t.dtype.is_complex)
        op = self.opnode.get(n.name)
        if op is None:
            return True  # unknown: assume it may need a gradient
        return any(t.dtype.startswith(("float", "bfloat", "complex")) for t in op.outputs)

    def _batch(self) -> int:
        for n in self.fx_nodes:
            if n.op == "placeholder":
                outs = self.opnode[n.name].outputs
                if outs and outs[0].shape:
                    return max(1, outs[0].shape[0])
        return 1

    def shape(self, n: Any) -> tuple[int, ...] | None:
        """Shape of the single tensor ``n`` produces (None for several outputs or none)."""
        if not isinstance(n, fx.Node):
            return None
        if n.op == "get_attr":
            t = _fetch(self.gm, str(n.target))
            return tuple(t.shape) if isinstance(t, torch.Tensor) else None
        op = self.opnode.get(n.name)
        if op is None or len(op.outputs) != 1:
            return None
        return op.outputs[0].shape

    def nbytes(self, n: fx.Node) -> int:
        return sum(t.nbytes for t in self.opnode[n.name].outputs)

    def users(self, n: fx.Node) -> list[fx.Node]:
        """Users of ``n`` that compute something (not export's metadata checks)."""
        return [u for u in n.users if u.op == "output" or _opname(u) not in _PASSIVE]

    # ------------------------------------------------------------------ matmuls with parameter weights
    def param_view(self, n: Any) -> tuple[str, tuple[int, ...]] | None:
        """``(param name, perm)`` when ``n`` is a trainable parameter or a transpose/permute of one:
        ``perm[i]`` is the parameter dimension that dimension ``i`` of ``n`` is."""
        name = self._param_of(n)
        if name is not None:
            return name, tuple(range(self.param_tensor[name].dim()))
        if not isinstance(n, fx.Node) or n.op != "call_function":
            return None
        op = _opname(n)
        if op not in ("t", "numpy_T", "transpose", "permute", "alias", "detach"):
            return None
        args = _bind(n)
        inner = self.param_view(args.get("self"))
        if inner is None:
            return None
        name, perm = inner
        nd = len(perm)
        if op in ("t", "numpy_T"):
            new = list(reversed(perm)) if op == "numpy_T" or nd == 2 else list(perm)
        elif op == "transpose":
            d0, d1 = _dim(args["dim0"], nd), _dim(args["dim1"], nd)
            new = list(perm)
            new[d0], new[d1] = new[d1], new[d0]
        elif op == "permute":
            new = [perm[_dim(d, nd)] for d in args["dims"]]
        else:
            new = list(perm)
        return name, tuple(new)

    def param_matmul(self, n: fx.Node) -> _ParamMatmul | None:
        """``n`` as a matmul of an activation with a parameter weight, or None (memoised)."""
        if n not in self._pm_cache:
            self._pm_cache[n] = self._param_matmul(n)
        return self._pm_cache[n]

    def _param_matmul(self, n: fx.Node) -> _ParamMatmul | None:
        if n.op == "call_module":
            sub = self.gm.get_submodule(str(n.target))
            if isinstance(sub, nn.Linear) and n.args and isinstance(n.args[0], fx.Node):
                w = self.param_name.get(f"{n.target}.weight")
                if w is None:
                    return None
                b = self.param_name.get(f"{n.target}.bias") if sub.bias is not None else None
                return _ParamMatmul(n.args[0], w, tuple(sub.weight.shape), 1, 0, b, False)
            return None
        if n.op != "call_function":
            return None
        op = _opname(n)
        args = _bind(n)
        if op == "linear":
            x, wv, bias = args.get("input"), self.param_view(args.get("weight")), args.get("bias")
            if not isinstance(x, fx.Node) or wv is None or len(wv[1]) != 2:
                return None
            return self._pm(x, wv, 1, 0, bias, grouped=False)
        if op in ("mm", "addmm", "matmul", "bmm", "baddbmm"):
            key_x, key_w = {
                "mm": ("self", "mat2"),
                "addmm": ("mat1", "mat2"),
                "matmul": ("self", "other"),
                "bmm": ("self", "mat2"),
                "baddbmm": ("batch1", "batch2"),
            }[op]
            x, wv = args.get(key_x), self.param_view(args.get(key_w))
            bias = args.get("self") if op in ("addmm", "baddbmm") else None
            if not isinstance(x, fx.Node) or wv is None or self.param_view(x) is not None:
                return None
            nd = len(wv[1])
            xs = self.shape(x)
            if nd == 2 and op in ("mm", "addmm", "matmul"):
                return self._pm(x, wv, 0, 1, bias, grouped=False)
            if nd == 3 and xs is not None and len(xs) == 3 and op in ("bmm", "baddbmm", "matmul"):
                return self._pm(x, wv, 1, 2, bias, grouped=True)
            return None
        if op in _GROUPED:
            x = args.get("self", args.get("input"))
            wv = self.param_view(args.get("mat2", args.get("weight")))
            xs = self.shape(x)
            if not isinstance(x, fx.Node) or wv is None or len(wv[1]) != 3 or xs is None or len(xs) != 2:
                return None
            return self._pm(x, wv, 1, 2, args.get("bias"), grouped=True)
        return None

    def _pm(
        self, x: fx.Node, wv: tuple[str, tuple[int, ...]], vin: int, vout: int, bias: Any, *, grouped: bool
    ) -> _ParamMatmul | None:
        name, perm = wv
        bname = None
        if bias is not None:
            bname = self._param_of(bias)
            if bname is None:  # a bias that is not a parameter: not a plain layer
                return None
        return _ParamMatmul(
            x, name, tuple(self.param_tensor[name].shape), perm[vin], perm[vout], bname, grouped
        )

    # ------------------------------------------------------------------ search
    def run(self) -> TensorParallelAnnotation:
        for n in self.fx_nodes:
            if n in self.taken or n in self.failed:
                continue
            if _opname(n) == "embedding" or (
                n.op == "call_module" and isinstance(self.gm.get_submodule(str(n.target)), nn.Embedding)
            ):
                self._embedding(n)
                continue
            if self.param_matmul(n) is not None:
                self._grow(n)
        first = {n.name: i for n, i in self.pos.items()}
        self.regions.sort(key=lambda r: first[r.nodes[0]])
        return TensorParallelAnnotation(regions=tuple(self.regions), batch=self.batch)

    def _grow(self, seed: fx.Node) -> None:
        origins: dict[fx.Node, tuple[int, ...]] = {seed: ()}
        local: set[fx.Node] = set()
        # Operands attention asked to be split, with the matmuls pulled in for them: if the region then
        # fails, the last one is taken back and that operand is sliced locally instead (key/value heads of
        # multi-query attention, fewer than any degree > 1).
        pulled: list[tuple[fx.Node, list[fx.Node]]] = []
        seen_fail = ""
        for _ in range(64):
            try:
                comp = self._propagate(origins, local)
                self._accept(comp)
                return
            except _Need as need:
                found = self._producers(need.node, origins)
                if found:
                    if need.local_ok:
                        pulled.append((need.node, found))
                    for f in found:
                        origins[f] = ()
                    continue
                if need.local_ok:
                    local.add(need.node)
                    continue
                seen_fail = seen_fail or f"{need} and no column matmul produces it"
            except _Pieces as cut:
                for o in cut.origins:
                    origins[o] = _blocks(cut.bounds)  # the bounds hold the old edges too
                continue
            except _Fail as e:
                seen_fail = seen_fail or str(e)
            except (AssertionError, KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
                # An op configuration the rules did not foresee: the annotation is an option for the
                # planner, so the candidate stays replicated (and says why) rather than the trace failing.
                seen_fail = seen_fail or f"no rule for this case ({type(e).__name__}: {e})"
                break
            if not pulled:
                break
            operand, found = pulled.pop()
            for f in found:
                origins.pop(f, None)
            local.add(operand)
        self._reject(origins, seen_fail or "the search did not settle")

    def _reject(self, origins: Iterable[fx.Node], why: str) -> None:
        for o in origins:
            self.failed.add(o)
            self.rejected[o.name] = why

    def _producers(self, start: fx.Node, origins: Mapping[fx.Node, Any]) -> list[fx.Node]:
        """Candidate column matmuls whose outputs ``start`` is computed from, not passing through other
        candidates or accepted regions."""
        found: list[fx.Node] = []
        seen: set[fx.Node] = set()
        stack = [start]
        while stack:
            n = stack.pop()
            if n in seen or n.op in ("placeholder", "get_attr"):
                continue
            seen.add(n)
            if n in self.taken or n in self.failed:
                continue
            if self.param_matmul(n) is not None:
                if n not in origins:
                    found.append(n)
                continue
            stack.extend(n.all_input_nodes)
        return sorted(found, key=self.pos.__getitem__)

    def _propagate(self, origins: Mapping[fx.Node, tuple[int, ...]], local: set[fx.Node]) -> _Component:
        comp = _Component(origins=dict(origins), local=set(local))
        heap: list[int] = []
        for o, pieces in origins.items():
            pm = self.param_matmul(o)
            assert pm is not None
            out = self.shape(o)
            n_out = pm.w_shape[pm.w_out]
            if out is None or out[-1] != n_out:
                raise _Fail(f"{o.name}: output features {out} do not match its weight {pm.w_shape}")
            atoms = math.gcd(*pieces) if pieces else n_out
            comp.sizes.update(pieces or (n_out,))
            comp.state[o] = _Split(
                len(out) - 1, n_out, atoms, pieces if len(pieces) > 1 else (), frozenset({o})
            )
            comp.split_nodes.add(o)
            comp.grouped |= pm.grouped
            self._add_param(
                comp,
                ParamSplit(pm.weight, pm.w_shape, self._pbytes(pm.weight), "column", pm.w_out, _p(pieces)),
            )
            if pm.bias is not None:
                bs = tuple(self.param_tensor[pm.bias].shape)
                self._add_param(
                    comp, ParamSplit(pm.bias, bs, self._pbytes(pm.bias), "column", len(bs) - 1, _p(pieces))
                )
            heapq.heappush(heap, self.pos[o])
        # Each node is visited once, in graph order, after every input it reads: its split inputs are known.
        queued: set[fx.Node] = set(origins)
        while heap:
            n = self.fx_nodes[heapq.heappop(heap)]
            if n not in comp.origins:
                self._apply(comp, n)
            if n not in comp.state:
                continue
            if n in self.graph_outputs:
                comp.outputs.append(n)
            for u in n.users:
                if u.op == "output" or u in queued:
                    continue
                if u in comp.origins:
                    raise _Fail(f"{u.name}: a column matmul whose input {n.name} is split")
                queued.add(u)
                heapq.heappush(heap, self.pos[u])
        if not comp.exits and not comp.outputs:
            raise _Fail("the split values never reach a row-parallel matmul")
        for o in comp.outputs:
            s = comp.state[o]
            shape = self.shape(o)
            if self.output_loss != "cross-entropy":
                raise _Fail(f"split value {o.name} is a model output (the loss would need it whole)")
            if not isinstance(s, _Split) or shape is None or s.dim != len(shape) - 1 or s.pieces:
                raise _Fail(f"model output {o.name} is split along a dimension the loss does not reduce")
        return comp

    def _pbytes(self, name: str) -> int:
        sizes = self.graph.param_sizes
        if sizes is not None and name in sizes:
            return sizes[name]
        t = self.param_tensor[name]
        return t.numel() * t.element_size()

    def _add_param(self, comp: _Component, p: ParamSplit) -> None:
        prev = comp.params.get(p.name)
        if prev is None or (not prev.split and p.split):
            comp.params[p.name] = p
        elif p.split and (prev.dim, prev.pieces) != (p.dim, p.pieces):
            raise _Fail(f"parameter {p.name} would be split along dims {prev.dim} and {p.dim}")

    # ------------------------------------------------------------------ rules
    def _apply(self, comp: _Component, n: fx.Node) -> None:
        """Apply the rule of ``n``'s op to its split inputs: set ``comp.state[n]`` (split output), record an
        exit, or raise :class:`_Fail` / :class:`_Need` / :class:`_Pieces`."""
        op = _opname(n)
        comp.split_nodes.add(n)
        if op in _PASSIVE:
            return
        pm = self.param_matmul(n)
        if pm is not None:
            self._param_matmul_rule(comp, n, pm)
            return
        if n.op != "call_function" or not op:
            raise _Fail(f"{n.name}: {n.op} {n.target} on a split value has no rule")
        if op == "getitem":
            src, i = n.args[0], n.args[1]
            s = comp.state.get(src)  # type: ignore[arg-type]
            if isinstance(s, list) and isinstance(i, int) and 0 <= i < len(s) and s[i] is not None:
                comp.state[n] = s[i]
                return
            raise _Fail(f"{n.name}: takes item {i} of {getattr(src, 'name', src)}, which is not split")
        args = _bind(n)
        target = n.target
        if op in _SAME_SHAPE or (
            isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
        ):
            self._pointwise(comp, n, args, op)
        elif op in _RESHAPES:
            self._reshape(comp, n, args)
        elif op in _EXPANDS:
            s, xs, out = self._one(comp, n, args), self.shape(args["self"]), self.shape(n)
            assert xs is not None and out is not None
            d = s.dim + len(out) - len(xs)
            if out[d] != s.size:
                raise _Fail(f"{n.name}: expands the split dimension")
            comp.state[n] = _Split(d, s.size, s.atoms, s.pieces, s.origins)
        elif op in ("transpose", "permute", "t", "numpy_T", "swapaxes", "movedim"):
            self._permute(comp, n, args, op)
        elif op in ("select", "slice", "narrow", "index_select"):
            self._select(comp, n, args, op)
        elif op in _SPLITS or op == "unbind":
            self._split(comp, n, args, op)
        elif op in ("cat", "stack"):
            self._cat(comp, n, args, op)
        elif op == "index":
            self._index(comp, n, args)
        elif op in _SOFTMAX:
            s = self._one(comp, n, args)
            nd = len(self.shape(args["self"]) or ())
            if _dim(args["dim"], nd) == s.dim:
                raise _Fail(f"{n.name}: {op} over the split dimension")
            comp.state[n] = s
        elif op in _REDUCTIONS:
            self._reduce(comp, n, args, op)
        elif op in _NORMS:
            s = self._one(comp, n, args, key="input")
            nd = len(self.shape(args["input"]) or ())
            if s.dim >= nd - len(args["normalized_shape"]):
                raise _Fail(f"{n.name}: {op} normalises over the split dimension")
            comp.state[n] = s
        elif op == "scaled_dot_product_attention":
            self._attention(comp, n, args)
        elif op in ("matmul", "bmm", "mm", "baddbmm"):
            self._activation_matmul(comp, n, args, op)
        elif op == "repeat_interleave":
            s = self._one(comp, n, args)
            out, dim = self.shape(n), args.get("dim")
            if out is None or dim is None or _dim(dim, len(out)) != s.dim or s.pieces:
                raise _Fail(f"{n.name}: repeat_interleave of a split value along another dimension")
            comp.state[n] = _Split(s.dim, out[s.dim], s.atoms)
        else:
            raise _Fail(f"{n.name}: {op} on a split value has no rule")

    def _split_args(self, comp: _Component, n: fx.Node) -> list[fx.Node]:
        return [m for m in n.all_input_nodes if m in comp.state]

    def _one(self, comp: _Component, n: fx.Node, args: Mapping[str, Any], key: str = "self") -> _Split:
        x = args.get(key)
        s = comp.state.get(x) if isinstance(x, fx.Node) else None
        others = [m for m in self._split_args(comp, n) if m is not x]
        if not isinstance(s, _Split) or others:
            raise _Fail(f"{n.name}: {_opname(n)} with a split value as an operand it has no rule for")
        return s

    def _pointwise(self, comp: _Component, n: fx.Node, args: Mapping[str, Any], op: str) -> None:
        out = self.shape(n)
        if out is None:
            raise _Fail(f"{n.name}: {op} of a split value has no single output")
        # type_as reads only the dtype of `other`.
        tensors = [
            v for k, v in args.items() if isinstance(v, fx.Node) and not (op == "type_as" and k == "other")
        ]
        split: _Split | None = None
        origins: set[fx.Node] = set()
        for v in tensors:
            s = comp.state.get(v)
            if s is None:
                continue
            if not isinstance(s, _Split):
                raise _Fail(f"{n.name}: {op} of a list")
            vs = self.shape(v)
            assert vs is not None
            d = s.dim + len(out) - len(vs)
            cand = _Split(d, s.size, s.atoms, s.pieces)
            if split is None:
                split = cand
            elif (split.dim, split.size, split.pieces) != (cand.dim, cand.size, cand.pieces):
                raise _Fail(f"{n.name}: {op} of values split differently")
            else:
                split = _Split(d, s.size, math.gcd(split.atoms, s.atoms), s.pieces)
            origins.add(v)
        assert split is not None
        for v in tensors:
            if v in comp.state:
                continue
            self._whole_operand(comp, n, v, split, len(out))
        # Coordinates stay the origins' only if every split operand had them.
        common = frozenset.intersection(*(comp.state[v].origins for v in origins))
        comp.state[n] = _Split(split.dim, split.size, split.atoms, split.pieces, common)

    def _whole_operand(
        self, comp: _Component, n: fx.Node, v: fx.Node, s: _Split, out_nd: int, *, skip: int | None = None
    ) -> None:
        """An operand of ``n`` that is not split, next to split ones (split along output dim ``s.dim``;
        ``skip``: an output dimension the operand lacks, stack's new one)."""
        vs = self.shape(v)
        if vs is None:
            raise _Fail(f"{n.name}: operand {v.name} has no single tensor shape")
        d = s.dim - 1 if skip is not None and skip < s.dim else s.dim
        i = d - (out_nd - len(vs))
        if i < 0 or vs[i] == 1:
            return  # broadcast over the split dimension: whole on every device
        if vs[i] != s.size:
            raise _Fail(
                f"{n.name}: operand {v.name} has size {vs[i]} along the split dimension of size {s.size}"
            )
        pv = self.param_view(v)
        if pv is not None:
            name, perm = pv
            shape = tuple(self.param_tensor[name].shape)
            self._add_param(
                comp, ParamSplit(name, shape, self._pbytes(name), "elementwise", perm[i], s.pieces)
            )
            return
        if not self.needs_grad[v]:
            return  # a mask or table that needs no gradient: each device slices its part
        if v in comp.local:
            return  # sliced locally; its gradient is all-reduced (see _grow)
        raise _Need(v, f"{n.name}: operand {v.name} would have to be split too")

    def _reshape(self, comp: _Component, n: fx.Node, args: Mapping[str, Any]) -> None:
        """A reshape moves the split to the output dimension starting at the same flat offset (the blocks
        stay contiguous, so ``t`` must divide that dimension too). Merging outer dimensions into the split one
        (``(batch, heads) -> batch * heads``) makes it a fused value of equal pieces; splitting such a value
        back into ``(pieces, ...)`` undoes it."""
        s = self._one(comp, n, args)
        xs, out = self.shape(args["self"]), self.shape(n)
        if xs is None or out is None:
            raise _Fail(f"{n.name}: reshape without shapes")
        if s.pieces and len(set(s.pieces)) != 1:  # a fused value of unequal blocks: only where unchanged
            comp.state[n] = _Split(_same_dim(xs, out, s.dim), s.size, s.atoms, s.pieces, s.origins)
            return
        outer, inner = math.prod(xs[: s.dim]), math.prod(xs[s.dim + 1 :])
        k = len(s.pieces) or 1
        size_now = s.size  # the extent the split applies to (a piece, once pieces are separated)
        pre = 1
        for e, size in enumerate(out):
            if size == 1:
                continue
            if pre == outer:
                if k == len(s.pieces or (0,)) and size == s.size and math.prod(out[e + 1 :]) == inner:
                    comp.state[n] = _Split(e, size, s.atoms, s.pieces, s.origins)
                    return
                if k > 1:  # (k pieces) -> (k, piece, ...): the split moves to the piece's part
                    if size != k:
                        raise _Fail(f"{n.name}: reshape cuts through the pieces of a split value")
                    outer, size_now, k = outer * k, size_now // k, 1
                    pre *= size
                    continue
                atoms = math.gcd(s.atoms, size)
                comp.sizes.add(atoms)
                comp.state[n] = _Split(e, size, atoms)
                return
            if pre < outer < pre * size:
                merged = outer // pre
                if outer % pre or size != merged * size_now or math.prod(out[e + 1 :]) != inner:
                    raise _Fail(f"{n.name}: reshape merges the split dimension with part of another")
                if merged * k > _MAX_PIECES:
                    raise _Fail(f"{n.name}: reshape merges the split dimension with {merged} rows")
                comp.state[n] = _Split(e, size, s.atoms, (size_now // k,) * (merged * k))
                return
            if pre > outer:
                break
            pre *= size
        raise _Fail(f"{n.name}: reshape merges the split dimension into an outer one")

    def _permute(self, comp: _Component, n: fx.Node, args: Mapping[str, Any], op: str) -> None:
        s = self._one(comp, n, args)
        nd = len(self.shape(args["self"]) or ())
        perm = list(range(nd))
        if op in ("t", "numpy_T"):
            perm = list(reversed(perm)) if op == "numpy_T" or nd == 2 else perm
        elif op in ("transpose", "swapaxes"):
            a = _dim(args.get("dim0", args.get("axis0")), nd)
            b = _dim(args.get("dim1", args.get("axis1")), nd)
            perm[a], perm[b] = perm[b], perm[a]
        elif op == "permute":
            perm = [_dim(d, nd) for d in args["dims"]]
        else:  # movedim
            src, dst = args["source"], args["destination"]
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            rest = [d for d in range(nd) if d not in [_dim(x, nd) for x in src]]
            perm = [-1] * nd
            for a, b in zip(src, dst, strict=True):
                perm[_dim(b, nd)] = _dim(a, nd)
            it = iter(rest)
            perm = [p if p >= 0 else next(it) for p in perm]
        comp.state[n] = _Split(perm.index(s.dim), s.size, s.atoms, s.pieces, s.origins)

    def _select(self, comp: _Component, n: fx.Node, args: Mapping[str, Any], op: str) -> None:
        s = self._one(comp, n, args)
        xs = self.shape(args["self"])
        assert xs is not None
        nd = len(xs)
        dim = _dim(args.get("dim", 0), nd)
        if dim != s.dim:
            d = s.dim - 1 if op == "select" and dim < s.dim else s.dim
            comp.state[n] = _Split(d, s.size, s.atoms, s.pieces, s.origins)
            return
        if op in ("select", "index_select"):
            raise _Fail(f"{n.name}: {op} along the split dimension")
        if op == "narrow":
            start, end, step = args["start"], args["start"] + args["length"], 1
        else:
            start, end, step = args.get("start"), args.get("end"), args.get("step", 1)
        if step != 1 or not all(isinstance(v, int | None) for v in (start, end)):
            raise _Fail(f"{n.name}: strided or symbolic slice along the split dimension")
        lo, hi, _ = slice(start, end).indices(s.size)
        comp.state[n] = self._cut(s, (lo, hi), n)[0]

    def _cut(self, s: _Split, bounds: Sequence[int], n: fx.Node) -> list[_Split]:
        """The parts of split value ``s`` between consecutive ``bounds`` along its split dimension; each
        part must be whole blocks (else the producing matmuls are re-tried as fused, or it fails)."""
        blocks = s.pieces or (s.size,)
        edges = [0]
        for b in blocks:
            edges.append(edges[-1] + b)
        if not set(bounds) <= set(edges):
            if s.origins:
                raise _Pieces(s.origins, tuple(sorted(set(bounds) | set(edges))))
            raise _Fail(f"{n.name}: cuts a split value where its blocks do not end")
        parts = []
        for lo, hi in itertools.pairwise(bounds):
            inside = tuple(blocks[edges.index(lo) : edges.index(hi)])
            atoms = math.gcd(*inside)
            parts.append(_Split(s.dim, hi - lo, atoms, inside if len(inside) > 1 else ()))
        return parts

    def _split(self, comp: _Component, n: fx.Node, args: Mapping[str, Any], op: str) -> None:
        s = self._one(comp, n, args)
        xs = self.shape(args["self"])
        outs = self.opnode[n.name].outputs
        assert xs is not None
        dim = _dim(args.get("dim", 0), len(xs))
        if op == "unbind":
            if dim == s.dim:
                raise _Fail(f"{n.name}: unbind along the split dimension")
            d = s.dim - 1 if dim < s.dim else s.dim
            comp.state[n] = [_Split(d, s.size, s.atoms, s.pieces, s.origins) for _ in outs]
            return
        if dim != s.dim:
            comp.state[n] = [_Split(s.dim, s.size, s.atoms, s.pieces, s.origins) for _ in outs]
            return
        bounds = [0]
        for t in outs:
            bounds.append(bounds[-1] + t.shape[dim])
        if bounds[-1] != s.size:
            raise _Fail(f"{n.name}: split parts do not cover the split dimension")
        parts = self._cut(s, bounds, n)
        comp.sizes.update(p.size for p in parts)
        comp.state[n] = list(parts)

    def _cat(self, comp: _Component, n: fx.Node, args: Mapping[str, Any], op: str) -> None:
        out = self.shape(n)
        assert out is not None
        dim = _dim(args.get("dim", 0), len(out))
        tensors = [t for t in args["tensors"] if isinstance(t, fx.Node)]
        states = [comp.state.get(t) for t in tensors]
        split = next(s for s in states if s is not None)
        if not isinstance(split, _Split):
            raise _Fail(f"{n.name}: {op} of a list")
        # stack inserts `dim` in the output: the split dimension moves past it when it is not after.
        d = split.dim + 1 if op == "stack" and dim <= split.dim else split.dim
        if d == dim:
            raise _Fail(f"{n.name}: {op} along the split dimension")
        split = _Split(d, split.size, split.atoms, split.pieces)
        for t, s in zip(tensors, states, strict=True):
            if s is None:
                self._whole_operand(
                    comp, n, t, split, len(out) - (op == "stack"), skip=dim if op == "stack" else None
                )
            elif (
                not isinstance(s, _Split)
                or (s.size, s.pieces) != (split.size, split.pieces)
                or (s.dim + (op == "stack" and dim <= s.dim) != d)
            ):
                raise _Fail(f"{n.name}: {op} of values split differently")
        comp.state[n] = split

    def _index(self, comp: _Component, n: fx.Node, args: Mapping[str, Any]) -> None:
        """Advanced indexing of a split value by whole index tensors along other dimensions."""
        s = self._one(comp, n, args)
        indices = list(args["indices"])
        used = [i for i, x in enumerate(indices) if x is not None]
        if s.dim in used or any(self.needs_grad.get(x, True) for x in indices if isinstance(x, fx.Node)):
            raise _Fail(f"{n.name}: index along the split dimension")
        if all(i > s.dim for i in used):
            comp.state[n] = _Split(s.dim, s.size, s.atoms, s.pieces, s.origins)
            return
        xs, out = self.shape(args["self"]), self.shape(n)
        if xs is None or out is None or used != list(range(used[0], used[-1] + 1)) or used[-1] > s.dim:
            raise _Fail(f"{n.name}: index with separated index tensors before the split dimension")
        d = s.dim + len(out) - len(xs)
        if out[d] != s.size:
            raise _Fail(f"{n.name}: index moves the split dimension")
        comp.state[n] = _Split(d, s.size, s.atoms, s.pieces)

    def _reduce(self, comp: _Component, n: fx.Node, args: Mapping[str, Any], op: str) -> None:
        s = self._one(comp, n, args)
        xs = self.shape(args["self"])
        assert xs is not None
        dims = args.get("dim")
        if dims is None or dims == []:
            raise _Fail(f"{n.name}: {op} over every dimension of a split value")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [_dim(d, len(xs)) for d in dims]
        if s.dim in dims:
            raise _Fail(f"{n.name}: {op} over the split dimension")
        keep = bool(args.get("keepdim", False))
        d = s.dim if keep else s.dim - sum(1 for x in dims if x < s.dim)
        comp.state[n] = _Split(d, s.size, s.atoms, s.pieces, s.origins)

    def _attention(self, comp: _Component, n: fx.Node, args: Mapping[str, Any]) -> None:
        q, k, v = args["query"], args["key"], args["value"]
        qs = self.shape(q)
        assert qs is not None
        states = {}
        for x in (q, k, v):
            s = comp.state.get(x)
            if s is None and x in comp.local:
                continue
            if s is None:
                raise _Need(
                    x, f"{n.name}: attention of split and whole values ({x.name} whole)", local_ok=True
                )
            if not isinstance(s, _Split) or s.pieces:
                raise _Fail(f"{n.name}: attention input {x.name} is not split by heads")
            states[x] = s
        if q not in states:
            raise _Fail(f"{n.name}: attention with whole queries")
        dims = {s.dim - len(self.shape(x) or ()) for x, s in states.items()}
        if len(dims) != 1 or dims.pop() >= -2:
            raise _Fail(f"{n.name}: attention inputs split along a sequence or feature dimension")
        if not args.get("enable_gqa") and len({s.size for s in states.values()}) != 1:
            raise _Fail(f"{n.name}: attention inputs split into different head counts")
        mask = args.get("attn_mask")
        sq = states[q]
        for x in (k, v):
            if x in comp.local:
                self._local_operand(n, x, sq, len(qs))
        if isinstance(mask, fx.Node):
            if mask in comp.state:
                self._same(n, comp.state[mask], sq)
            else:
                self._whole_operand(comp, n, mask, sq, len(qs))
        comp.attention = True
        atoms = math.gcd(*(s.atoms for s in states.values()))
        comp.state[n] = _Split(sq.dim, sq.size, atoms)

    def _local_operand(self, n: fx.Node, v: fx.Node, s: _Split, out_nd: int) -> None:
        vs = self.shape(v)
        i = s.dim - (out_nd - len(vs or ()))
        if vs is None or i < 0 or vs[i] not in (1, s.size):
            raise _Fail(f"{n.name}: whole operand {v.name} does not match the split heads")

    def _same(self, n: fx.Node, a: Any, b: _Split) -> None:
        if not isinstance(a, _Split) or (a.dim, a.size) != (b.dim, b.size):
            raise _Fail(f"{n.name}: operands split differently")

    def _activation_matmul(self, comp: _Component, n: fx.Node, args: Mapping[str, Any], op: str) -> None:
        if op == "baddbmm":
            a, b = args["batch1"], args["batch2"]
            c = args.get("self")
            if isinstance(c, fx.Node) and c in comp.state:
                raise _Fail(f"{n.name}: baddbmm adding a split value")
        else:
            a, b, c = args["self"], args.get("other", args.get("mat2")), None
        sa, sb = comp.state.get(a), comp.state.get(b)
        ash, bsh, out = self.shape(a), self.shape(b), self.shape(n)
        if ash is None or bsh is None or out is None or len(ash) < 2 or len(bsh) < 2:
            raise _Fail(f"{n.name}: {op} of a split value with a vector")
        if (sa is not None and not isinstance(sa, _Split)) or (sb is not None and not isinstance(sb, _Split)):
            raise _Fail(f"{n.name}: {op} of a list")
        # Batch dimensions, right-aligned to the output's.
        a_batch = sa is not None and sa.dim < len(ash) - 2
        b_batch = sb is not None and sb.dim < len(bsh) - 2
        if a_batch or b_batch:
            ref, ref_shape = (sa, ash) if a_batch else (sb, bsh)
            assert ref is not None
            d = ref.dim + len(out) - len(ref_shape)
            for x, s, shp in ((a, sa, ash), (b, sb, bsh)):
                if s is None:
                    i = d - (len(out) - len(shp))
                    if i >= 0 and shp[i] != 1 and x not in comp.local:
                        raise _Need(
                            x, f"{n.name}: {op} of split and whole values ({x.name} whole)", local_ok=True
                        )
                elif s.dim + len(out) - len(shp) != d or (s.size, s.pieces) != (ref.size, ref.pieces):
                    raise _Fail(f"{n.name}: {op} of values split differently")
            if isinstance(c, fx.Node):
                self._whole_operand(comp, n, c, _Split(d, ref.size, ref.atoms, ref.pieces), len(out))
            comp.attention = True
            atoms = math.gcd(*(s.atoms for s in (sa, sb) if s is not None))
            comp.state[n] = _Split(d, ref.size, atoms, ref.pieces)
            return
        raise _Fail(f"{n.name}: {op} contracting or transposing a split value")

    def _param_matmul_rule(self, comp: _Component, n: fx.Node, pm: _ParamMatmul) -> None:
        s = comp.state.get(pm.x)
        others = [m for m in self._split_args(comp, n) if m is not pm.x]
        if not isinstance(s, _Split) or others:
            raise _Fail(f"{n.name}: matmul with a split value as an operand it has no rule for")
        xs = self.shape(pm.x)
        assert xs is not None
        comp.grouped |= pm.grouped
        if s.dim == len(xs) - 1:  # contracts the split features: row-parallel
            if s.size != pm.w_shape[pm.w_in]:
                raise _Fail(
                    f"{n.name}: contracts {s.size} split features with a weight of shape {pm.w_shape}"
                )
            self._add_param(
                comp, ParamSplit(pm.weight, pm.w_shape, self._pbytes(pm.weight), "row", pm.w_in, s.pieces)
            )
            if pm.bias is not None:
                bs = tuple(self.param_tensor[pm.bias].shape)
                self._add_param(comp, ParamSplit(pm.bias, bs, self._pbytes(pm.bias), "replicated"))
                comp.exit_bias.add(n)
            comp.exits.append(n)
            return
        if pm.grouped:
            raise _Fail(f"{n.name}: grouped matmul of values split along the tokens")
        # Split along a dimension the matmul maps row by row (heads): the output keeps it.
        comp.state[n] = _Split(s.dim, s.size, s.atoms, s.pieces)

    # ------------------------------------------------------------------ accepted regions
    def _accept(self, comp: _Component) -> None:
        nodes = set(comp.split_nodes)
        # Parameters read by split nodes and not split: whole, with a partial gradient per device.
        for n in nodes:
            for m in n.all_input_nodes:
                name = self._param_of(m)
                if name is not None and name not in comp.params:
                    shape = tuple(self.param_tensor[name].shape)
                    comp.params[name] = ParamSplit(
                        name, shape, self._pbytes(name), "replicated", grad_reduce=n not in comp.origins
                    )
            if n.op == "call_module":
                for local, _ in self.gm.get_submodule(str(n.target)).named_parameters():
                    name = self.param_name.get(f"{n.target}.{local}")
                    if name is not None and name not in comp.params:
                        shape = tuple(self.param_tensor[name].shape)
                        comp.params[name] = ParamSplit(
                            name, shape, self._pbytes(name), "replicated", grad_reduce=True
                        )
        whole: list[fx.Node] = []
        collectives: list[Collective] = []
        # Backward: the gradient of each region input is a partial sum on every device.
        inputs: dict[fx.Node, None] = {}
        for o in comp.origins:
            pm = self.param_matmul(o)
            assert pm is not None
            inputs.setdefault(pm.x)
        for v in sorted(comp.local, key=self.pos.__getitem__):
            inputs.setdefault(v)
        reduced: set[fx.Node] = set()
        for x in inputs:
            point, chain = self._entry_point(x, nodes | set(whole))
            whole.extend(chain)
            if point not in reduced:
                reduced.add(point)
                collectives.append(self._collective("backward", "input-gradient", point))
        # Forward: each row-parallel output is a partial sum.
        for e in comp.exits:
            point, chain = self._exit_point(e, biased=e in comp.exit_bias)
            whole.extend(chain)
            collectives.append(self._collective("forward", "partial-output", point))
        for o in comp.outputs:
            collectives.append(self._loss_collective(o, comp.state[o]))
        kind: RegionKind = (
            "output"
            if comp.outputs
            else "attention"
            if comp.attention
            else "experts"
            if comp.grouped
            else "mlp"
        )
        self._finish(kind, nodes, whole, comp.params, comp.sizes, collectives, comp.origins)

    def _finish(
        self,
        kind: RegionKind,
        nodes: set[fx.Node],
        whole: list[fx.Node],
        params: Mapping[str, ParamSplit],
        sizes: set[int],
        collectives: list[Collective],
        whole_input_nodes: Iterable[fx.Node],
    ) -> None:
        order = sorted(nodes, key=self.pos.__getitem__)
        whole_order = sorted(set(whole) - nodes, key=self.pos.__getitem__)
        # A tied parameter (an embedding reused as the output projection) has one split for every region
        # that reads it: a region that would split it another way stays replicated.
        for p in params.values():
            prev = self.splits.get(p.name) if p.split else None
            if prev is not None and prev != (p.dim, p.pieces):
                self.rejected[order[0].name] = (
                    f"parameter {p.name!r} is shared with an earlier region that splits it along dim {prev[0]}, "
                    f"and this region would split it along dim {p.dim}"
                )
                self.failed.update(nodes)
                return
        for p in params.values():
            if p.split:
                self.splits[p.name] = (p.dim, p.pieces)
        ops = [self.opnode[n.name] for n in order]
        wops = [self.opnode[n.name] for n in whole_order]
        keep_whole = set(whole_input_nodes)
        sizes = {s for s in sizes if s > 0}
        region = TensorParallelRegion(
            kind=kind,
            nodes=tuple(n.name for n in order),
            whole_nodes=tuple(n.name for n in whole_order),
            params=tuple(sorted(params.values(), key=lambda p: p.name)),
            split_sizes=tuple(sorted(sizes)),
            degrees=divisors(math.gcd(*sizes)),
            collectives=tuple(collectives),
            fwd_flops=sum(o.fwd_flops for o in ops),
            bwd_flops=sum(o.bwd_flops for o in ops),
            whole_fwd_flops=sum(o.fwd_flops for o in wops),
            whole_bwd_flops=sum(o.bwd_flops for o in wops),
            # A column matmul keeps its (whole) input for the backward; everything else a split node
            # keeps is split.
            split_activation_bytes=sum(
                o.activation_bytes for n, o in zip(order, ops, strict=True) if n not in keep_whole
            ),
            whole_activation_bytes=sum(
                o.activation_bytes for n, o in zip(order, ops, strict=True) if n in keep_whole
            )
            + sum(o.activation_bytes for o in wops),
        )
        self.regions.append(region)
        self.taken.update(nodes)
        self.taken.update(whole_order)

    def _per_sample(self, n: fx.Node) -> bool:
        """Whether ``n``'s size grows with the batch: computed from the inputs, or batch-first (a position
        embedding looked up with ids expanded to the batch). A value that is neither (``wpe(arange(seq))``)
        is the same for any batch."""
        shape = self.shape(n)
        return self.from_input[n] or bool(shape and shape[0] == self.batch)

    def _collective(self, phase: Literal["forward", "backward"], reason: Any, n: fx.Node) -> Collective:
        b = self.nbytes(n)
        if self._per_sample(n) and b % self.batch == 0:
            return Collective("all-reduce", phase, reason, n.name, b // self.batch)
        return Collective("all-reduce", phase, reason, n.name, 0, b)

    def _loss_collective(self, n: fx.Node, s: _Split) -> Collective:
        shape = self.shape(n)
        assert shape is not None
        tokens = math.prod(shape) // shape[s.dim]
        # Vocab-parallel cross-entropy: per token, the max logit, the sum of exponentials and the target's
        # logit are all-reduced in fp32 (Megatron's vocab_parallel_cross_entropy).
        b = 3 * 4 * tokens
        if b % self.batch == 0:
            return Collective("all-reduce", "forward", "loss-statistics", n.name, b // self.batch)
        return Collective("all-reduce", "forward", "loss-statistics", n.name, 0, b)

    def _linear_step(self, n: fx.Node, src: fx.Node) -> bool:
        """Whether ``n`` is linear in its operand ``src`` with no other operand needing a gradient (a
        partial sum, or a partial gradient, may pass through it)."""
        if n.op != "call_function":
            return False
        op = _opname(n)
        args = _bind(n)
        others = [m for m in n.all_input_nodes if m is not src]
        if op in _LINEAR_VIEWS or op in _LINEAR_REDUCTIONS or op in _LINEAR_GATHERS:
            return args.get("self") is src and not any(self.needs_grad[m] for m in others)
        if op in ("mul", "div", "neg"):
            first = args.get("self") is src
            return (
                (op != "div" or first) and src not in others and not any(self.needs_grad[m] for m in others)
            )
        return False

    def _exit_point(self, e: fx.Node, *, biased: bool) -> tuple[fx.Node, list[fx.Node]]:
        """Where to all-reduce the partial output of row matmul ``e``: the value with the fewest bytes along
        the chain of ops linear in it (see [Note: finding tensor-parallel regions]); and the ops before it."""
        chain = [e]
        if not biased:  # a bias is added to the partial sum: reduce right there
            cur = e
            while True:
                users = self.users(cur)
                if len(users) != 1 or cur in self.graph_outputs:
                    break
                u = users[0]
                if u.op == "output" or u in self.taken or not self._linear_step(u, cur):
                    break
                chain.append(u)
                cur = u
        best = min(range(len(chain)), key=lambda i: (self.nbytes(chain[i]), i))
        return chain[best], chain[1 : best + 1]

    def _entry_point(self, x: fx.Node, region: set[fx.Node]) -> tuple[fx.Node, list[fx.Node]]:
        """Where to all-reduce the partial gradient of region input ``x``: moving back through ops linear in
        their input while the region (and the ops passed) are a value's only users; and the ops passed."""
        chain = [x]
        inside = set(region)
        cur = x
        while cur.op == "call_function":
            if any(u not in inside for u in self.users(cur)) or cur in self.graph_outputs:
                break
            src = _bind(cur).get("self")
            if not isinstance(src, fx.Node) or src.op in ("placeholder", "get_attr") or src in self.taken:
                break
            if not self._linear_step(cur, src):
                break
            inside.add(cur)
            chain.append(src)
            cur = src
        best = min(range(len(chain)), key=lambda i: (self.nbytes(chain[i]), i))
        return chain[best], chain[:best]

    def _embedding(self, n: fx.Node) -> None:
        if n.op == "call_module":
            name = self.param_name.get(f"{n.target}.weight")
        else:
            name = self._param_of(_bind(n).get("weight"))
        if name is None:
            return
        shape = tuple(self.param_tensor[name].shape)
        if len(shape) != 2:
            return
        params = {name: ParamSplit(name, shape, self._pbytes(name), "vocab", 0)}
        point, chain = self._exit_point(n, biased=False)
        coll = [self._collective("forward", "partial-output", point)]
        self._finish("embedding", {n}, chain, params, {shape[0]}, coll, ())


# ---------------------------------------------------------------------------------------------- helpers
def _opname(n: fx.Node) -> str:
    """``linear`` for ``aten.linear.default``, ``ns::name`` for other namespaces, ``getitem``; else ""."""
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        ns, _, name = t._schema.name.partition("::")
        return name if ns == "aten" else f"{ns}::{name}"
    if t is operator.getitem:
        return "getitem"
    return ""


def _bind(n: fx.Node) -> dict[str, Any]:
    """``n``'s arguments by schema name, defaults filled in (aten and custom ops); empty otherwise."""
    t = n.target
    if not isinstance(t, torch._ops.OpOverload):
        return {}
    out: dict[str, Any] = {}
    for i, a in enumerate(t._schema.arguments):
        if i < len(n.args) and not a.kwarg_only:
            out[a.name] = n.args[i]
        elif a.name in n.kwargs:
            out[a.name] = n.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _dim(d: Any, nd: int) -> int:
    if not isinstance(d, int):
        raise _Fail(f"symbolic dimension {d!r}")
    return d + nd if d < 0 else d


def _same_dim(xs: Sequence[int], out: Sequence[int], d: int) -> int:
    """The output dimension of a reshape that is input dimension ``d`` unchanged (same size, same flat
    offset and extent), else 0 with ``out`` failing the caller's check."""
    outer, inner = math.prod(xs[:d]), math.prod(xs[d + 1 :])
    pre = 1
    for e, size in enumerate(out):
        if pre == outer and size == xs[d] and math.prod(out[e + 1 :]) == inner:
            return e
        pre *= size
    raise _Fail(f"reshape of a fused split value from {tuple(xs)} to {tuple(out)}")


def _p(pieces: tuple[int, ...]) -> tuple[int, ...]:
    return pieces if len(pieces) > 1 else ()


def _blocks(bounds: Iterable[int]) -> tuple[int, ...]:
    """Block sizes between consecutive edges ``bounds`` (both ends included)."""
    edges = sorted(set(bounds))
    return tuple(b - a for a, b in itertools.pairwise(edges) if b > a)


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
