"""Annotate a captured fx graph with sizes, FLOPs and memory, producing a plain-data :class:`OpGraph`.

Every node is run on the ``meta`` device (shapes only, no memory, no arithmetic), each op in isolation:

* **forward FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` around the op, with the formulas of
  :mod:`distplan.tracer.flops` for the matmul-class ops torch has none for (grouped expert matmuls among
  them). On ``meta`` tensors ``scaled_dot_product_attention`` decomposes into matmuls that the counter sees
  (on CPU tensors it would dispatch to a flash kernel that counts 0). A node of a matmul-class op left at 0
  FLOPs with non-empty operands, or of a custom op with matrix operands and no formula, is listed in
  ``graph.meta["uncounted_flops"]`` (op -> nodes) with the reason.
* **backward FLOPs**: the op is re-run with autograd on (inputs that require grad in training become leaf
  tensors: parameters, and activations derived from them) and ``torch.autograd.grad`` of its outputs is
  counted. This is exactly the op's share of a whole-model backward: the gradient accumulation adds that
  join branches are not FLOPs in the counter's model either.
* **activation bytes**: the tensors autograd saves for that backward, recorded with
  ``torch.autograd.graph.saved_tensors_hooks`` and measured by storage (a saved view holds its whole base),
  excluding parameters and buffers (they are held anyway). A storage saved by several ops (a layer norm's
  output read by the q, k and v projections) is charged once, to the first node that saves it, so the sum
  over nodes is the memory one microbatch keeps for backward. Attention is the one exception: the meta
  device saves what the *math* kernel saves (the ``seq x seq`` score matrix) while GPUs run flash /
  memory-efficient kernels that keep ``q, k, v``, the output and a log-sum-exp per row, so that is what is
  counted.
* **bytes moved**: bytes of the distinct input tensors (activations and parameters) plus the outputs; views
  and ``getitem`` move nothing.

Ops with the same target and input signature give the same numbers, so results are memoised: a 32-layer
model costs about as much as a 2-layer one after the first block.

[Note: data-dependent sizes]
Ops whose output size depends on values (``nonzero``, ``torch.where(mask)``, boolean indexing, ``unique``,
``.item()``/``.tolist()``) cannot run on ``meta``: mixture-of-experts layers that loop over experts and
gather each expert's tokens are the usual case (export records their sizes as unbacked symbols ``u0``...).
Such a node is evaluated on the CPU instead, on values computed on demand for the nodes it depends on:
integer and boolean tensors (routing indices, masks, counts) are computed exactly from their inputs; a
floating tensor computed from the model's weights or floating activations of a ``meta`` model (router
logits, probabilities) is replaced by standard-normal samples (seeded: the graph is deterministic), and real
weights and inputs are used as they are. For top-k routing this is uniform random routing: every token still
goes to exactly k experts, so the experts' total FLOPs are exact and only their split between experts is a
sample. The nodes evaluated so are counted in ``graph.meta["sampled_nodes"]``.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from distplan.errors import TraceError
from distplan.graph import OpGraph, OpNode, TensorMeta
from distplan.tracer.capture import Capture, TorchFailure
from distplan.tracer.flops import flop_counter, uncounted_reason
from distplan.tracer.tensor_parallel import find_tensor_parallel

__all__ = ["graph_from_capture"]

_SDPA_TARGETS = {
    "aten.scaled_dot_product_attention.default",
    "torch._C._nn.scaled_dot_product_attention",
}


def graph_from_capture(
    cap: Capture,
    module: nn.Module,
    example_args: tuple[Any, ...],
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    name: str,
    meta: Mapping[str, Any] | None = None,
) -> OpGraph:
    """Turn a :class:`Capture` of ``module`` into an annotated, linted :class:`OpGraph`.

    Node conventions: one :class:`OpNode` per fx node except ``get_attr`` and ``output``, in graph order;
    parameters and buffers are not nodes but are listed (FQN) in ``params`` of the nodes reading them; the
    first reader of a parameter carries its bytes in ``param_bytes`` (tied weights once). A parameter known
    under several names (tied weights) is listed under the first name a node reads it by, and
    ``OpGraph.param_sizes`` gives every parameter's bytes under that name, so the planner can charge each
    stage that reads it (see [Note: shared parameters] in ``distplan.graph``).

    ``OpGraph.tensor_parallel`` says what a tensor-parallel group can split
    (:func:`~distplan.tracer.tensor_parallel.find_tensor_parallel`); ``meta["kind"] == "causal-lm"`` (the
    output feeds a cross-entropy) lets the last matmul be split over the vocabulary, ``meta["batch"]`` is the
    batch its per-sample figures divide by.
    """
    ann = _Annotator(cap, module)
    nodes, outputs, fallbacks = ann.run(example_args, dict(example_kwargs or {}))
    unique = ann.unique_params
    num_params = sum(p.numel() for p in unique.values())
    param_bytes = sum(_nbytes(p) for p in unique.values())
    dtypes = [str(p.dtype).removeprefix("torch.") for p in unique.values()]
    param_dtype = max(set(dtypes), key=dtypes.count) if dtypes else "float32"
    graph_meta: dict[str, Any] = {"method": cap.method, "capture_seconds": round(cap.seconds, 4)}
    if fallbacks:
        graph_meta["shape_only_nodes"] = len(fallbacks)
    if ann.sampled_nodes:
        graph_meta["sampled_nodes"] = len(ann.sampled_nodes)
    if ann.uncounted:
        graph_meta["uncounted_flops"] = {
            target: {"nodes": len(names), "first": names[0], "reason": ann.uncounted_reasons[target]}
            for target, names in ann.uncounted.items()
        }
    if cap.export_error:
        graph_meta["export_error"] = cap.export_error
    graph_meta.update(meta or {})
    g = OpGraph(
        name=name,
        nodes=tuple(nodes),
        outputs=tuple(outputs),
        num_params=num_params,
        param_bytes=param_bytes,
        param_dtype=param_dtype,
        meta=graph_meta,
        param_sizes={ann.param_names[pid]: _nbytes(p) for pid, p in unique.items()},
    )
    g.lint()
    batch = graph_meta.get("batch")
    tp = find_tensor_parallel(
        cap.gm,
        g,
        module,
        batch=batch if isinstance(batch, int) and batch > 0 else None,
        output_loss="cross-entropy" if graph_meta.get("kind") == "causal-lm" else None,
    )
    g = dataclasses.replace(g, tensor_parallel=tp)
    tp.lint(g)
    return g


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _to_meta(t: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    m = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")
    if requires_grad and (t.dtype.is_floating_point or t.dtype.is_complex):
        m.requires_grad_(True)
    return m


def _target_name(node: fx.Node, gm: fx.GraphModule) -> str:
    t = node.target
    if node.op == "call_module":
        sub = gm.get_submodule(str(t))
        return f"{type(sub).__module__}.{type(sub).__qualname__}"
    if node.op in ("call_method", "placeholder", "get_attr"):
        return str(t)
    if isinstance(t, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(t)
    try:
        return fx.node._get_qualified_name(t)  # type: ignore[arg-type]
    except Exception:  # builtins without a qualified name
        return getattr(t, "__name__", repr(t))


_AT_SUFFIX = re.compile(r"@\d+$")


def _owner(node: fx.Node, cap: Capture) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # export names the second call of a module `blocks.0@1`; the module is the same.
    return _AT_SUFFIX.sub("", str(path))


def _is_free(node: fx.Node) -> bool:
    t = node.target
    if t is operator.getitem:
        return True
    if isinstance(t, torch._ops.OpOverload):
        return bool(t.is_view)
    return False


def _storage(t: torch.Tensor) -> int:
    """Identity of a tensor's storage: views and ``detach()`` share it (also on the meta device)."""
    return int(t.untyped_storage()._cdata)


@dataclass
class _OpCost:
    """What one op costs, for one input signature (memoised).

    ``saved_inputs`` / ``saved_outputs`` index the op's flattened inputs / tensor outputs that autograd
    keeps; they are charged to the first node that saves their storage. ``internal_bytes`` are tensors the
    op creates and saves besides its outputs (e.g. layer norm's mean and rstd).
    """

    fwd: int = 0
    bwd: int = 0
    internal_bytes: int = 0
    saved_inputs: tuple[int, ...] = ()
    saved_outputs: tuple[int, ...] = ()
    rg_flags: tuple[bool, ...] = ()


class _Annotator:
    def __init__(self, cap: Capture, module: nn.Module) -> None:
        self.cap = cap
        self.gm = cap.gm
        self.module = module
        # FQN -> tensor for every name (tied weights appear under several names).
        self.params: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
        self.buffers: dict[str, torch.Tensor] = dict(module.named_buffers(remove_duplicate=False))
        self.unique_params: dict[int, torch.Tensor] = {id(p): p for p in module.parameters()}
        self.meta_of: dict[int, torch.Tensor] = {}  # id(original tensor) -> its meta stand-in
        self.param_meta_ids: set[int] = set()
        self.param_meta_storages: set[int] = set()
        self.assigned: set[int] = set()  # ids of original parameters whose bytes a node carries
        # id of each parameter -> the one name the graph lists it under (the first a node reads it by).
        self.param_names: dict[int, str] = {}
        self.memo: dict[Any, _OpCost] = {}
        self.charged: set[int] = set()  # storages some node's activation_bytes already counts
        # [Note: data-dependent sizes]: CPU values of nodes, computed only when a node needs them.
        self.env: dict[fx.Node, Any] = {}
        self.attr_fqn: dict[fx.Node, str] = {}
        self.inputs: dict[fx.Node, Any] = {}  # placeholder -> the example input as given
        self.concrete: dict[fx.Node, tuple[Any, bool]] = {}  # node -> (value, derived from weights)
        self.weighty_flags: dict[fx.Node, bool] = {}
        self.concrete_budget = _CONCRETE_BUDGET
        self.gen = torch.Generator().manual_seed(0)
        self.sampled_nodes: list[str] = []
        self.uncounted: dict[str, list[str]] = {}
        self.uncounted_reasons: dict[str, str] = {}

    # ------------------------------------------------------------------ inputs
    def _placeholder_values(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        phs = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if self.cap.method == "export":
            # Placeholders follow the exported input spec: (args, kwargs) leaves, kwargs in its key order.
            spec = getattr(self.gm, "_in_spec", None)
            keys = (
                getattr(spec.child(1), "context", None)
                if spec is not None and spec.num_children == 2
                else None
            )
            if isinstance(keys, list) and set(keys) == set(kwargs):
                kwargs = {k: kwargs[k] for k in keys}
            flat, _ = tree_flatten((args, kwargs))
            if len(flat) != len(phs):
                raise TraceError(
                    f"the exported graph has {len(phs)} inputs but the example inputs flatten to {len(flat)}"
                )
            return flat
        try:
            bound = inspect.signature(self.module.forward).bind(*args, **kwargs)
        except TypeError as e:
            raise TraceError(f"example inputs do not match {type(self.module).__name__}.forward: {e}") from e
        bound.apply_defaults()
        values = list(bound.arguments.values())
        if len(values) != len(phs):
            raise TraceError(f"the fx graph has {len(phs)} inputs but forward binds {len(values)} arguments")
        return values

    def _meta_attr(self, fqn: str, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        orig = self.params.get(fqn, self.buffers.get(fqn, value))
        key = id(orig)
        m = self.meta_of.get(key)
        if m is None:
            is_param = isinstance(orig, nn.Parameter) and orig.requires_grad
            m = _to_meta(orig, requires_grad=is_param)
            self.meta_of[key] = m
            if is_param:
                self.param_meta_ids.add(id(m))
            # Parameters and buffers live with their stage anyway: saving them costs no activation memory.
            self.param_meta_storages.add(_storage(m))
        return m

    # ------------------------------------------------------------------ main loop
    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[OpNode], list[str], list[str]]:
        with torch.device("meta"):  # ops that create tensors without naming a device
            return self._run(args, kwargs)

    def _run(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[OpNode], list[str], list[str]]:
        values = iter(self._placeholder_values(args, kwargs))
        env = self.env
        attr_fqn = self.attr_fqn
        nodes: list[OpNode] = []
        outputs: list[str] = []
        fallbacks: list[str] = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                v = next(values)
                self.inputs[node] = v
                env[node] = tree_map(lambda x: _to_meta(x) if isinstance(x, torch.Tensor) else x, v)
                nodes.append(
                    OpNode(
                        name=node.name,
                        op="placeholder",
                        target=str(node.target),
                        module="",
                        outputs=_metas(env[node]),
                    )
                )
                continue
            if node.op == "get_attr":
                fqn = str(node.target)
                env[node] = self._meta_attr(fqn, _fetch_attr(self.gm, fqn))
                attr_fqn[node] = fqn
                continue
            if node.op == "output":
                outputs = _unique([n.name for n in node.all_input_nodes if n.op != "get_attr"])
                continue
            nodes.append(self._call_node(node, env, attr_fqn, fallbacks))
        self._assign_unused(nodes)
        return nodes, outputs, fallbacks

    def _call_node(
        self, node: fx.Node, env: dict[fx.Node, Any], attr_fqn: dict[fx.Node, str], fallbacks: list[str]
    ) -> OpNode:
        # Devices baked into the graph (`arange(..., device=cpu)`, `x.to(cpu)`) become meta too.
        args = tree_map(_meta_device, fx.node.map_arg(node.args, lambda n: env[n]))
        kwargs = tree_map(_meta_device, fx.node.map_arg(node.kwargs, lambda n: env[n]))
        read: list[str] = [attr_fqn[n] for n in node.all_input_nodes if n in attr_fqn]
        fn: Callable[..., Any]
        key_extra: Any
        if node.op == "call_module":
            sub = self.gm.get_submodule(str(node.target))
            prefix = str(node.target)
            local = {
                **dict(sub.named_parameters(remove_duplicate=False)),
                **dict(sub.named_buffers(remove_duplicate=False)),
            }
            metas = {k: self._meta_attr(f"{prefix}.{k}", v) for k, v in local.items()}
            read += [f"{prefix}.{k}" for k in local]
            sub_module = sub

            def fn(*a: Any, **k: Any) -> Any:
                return torch.func.functional_call(sub_module, metas, a, k)

            # Same class, same parameter shapes and same extra_repr -> same numbers (the memo key).
            key_extra = (
                type(sub).__qualname__,
                sub.extra_repr(),
                tuple((k, tuple(v.shape), str(v.dtype)) for k, v in local.items()),
            )
            fn_args = (args, kwargs, tuple(metas.values()))
        elif node.op == "call_method":
            method = str(node.target)

            def fn(*a: Any, **k: Any) -> Any:
                return getattr(a[0], method)(*a[1:], **k)

            key_extra = ("method", method)
            fn_args = (args, kwargs, ())
        else:
            target = node.target
            assert callable(target)
            fn = target
            key_extra = ("fn", _target_name(node, self.gm))
            fn_args = (args, kwargs, ())
        target_name = _target_name(node, self.gm)
        try:
            out, cost = self._run_op(fn, fn_args, key_extra, sdpa=target_name in _SDPA_TARGETS)
            fwd, bwd = cost.fwd, cost.bwd
            flat_in, _ = tree_flatten((args, kwargs))
            outs = _tensor_leaves(out)
            act = cost.internal_bytes
            act += sum(self._charge(flat_in[i]) for i in cost.saved_inputs)
            act += sum(self._charge(outs[j]) for j in cost.saved_outputs)
        except Exception as e:
            val = node.meta.get("val")
            concrete = None
            if node.op != "call_module" and (val is None or _has_unbacked(val)):
                concrete = self._run_concrete(node, fn, args, kwargs)
            if concrete is not None:
                out, fwd = concrete
                bwd = act = 0
                self.sampled_nodes.append(node.name)
            elif val is None or _has_unbacked(val):
                raise TraceError(
                    _op_failure(node, target_name, args, kwargs, e, _owner(node, self.cap), self.cap)
                ) from TorchFailure.of(e)
            else:
                # The op cannot run on meta tensors: keep the shapes export recorded, and the FLOPs of a
                # formula where the counter has one (it needs shapes only).
                out = tree_map(lambda x: _to_meta(x) if isinstance(x, torch.Tensor) else x, val)
                fwd = _formula_flops(node.target, args, kwargs, out)
                bwd = act = 0
                fallbacks.append(node.name)
        env[node] = out
        in_tensors = _unique_tensors((args, kwargs))
        reason = uncounted_reason(
            target_name,
            node.target,
            int(fwd),
            [*in_tensors, *(t for t in fn_args[2] if isinstance(t, torch.Tensor))],
        )
        if reason is not None:
            self.uncounted.setdefault(target_name, []).append(node.name)
            self.uncounted_reasons.setdefault(target_name, reason)
        out_bytes = sum(t.nbytes for t in _metas(out))
        # Views and asserts (`_assert_tensor_metadata`, no output) move no data.
        moved = (
            0
            if _is_free(node) or not _tensor_leaves(out)
            else sum(_nbytes(t) for t in in_tensors) + out_bytes
        )
        if node.op == "call_module":
            moved += sum(_nbytes(t) for t in fn_args[2] if isinstance(t, torch.Tensor))
        read = _unique([self._param_name(fqn) for fqn in read])
        pbytes = 0
        for fqn in read:
            p = self.params.get(fqn)
            if p is not None and id(p) in self.unique_params and id(p) not in self.assigned:
                self.assigned.add(id(p))
                pbytes += _nbytes(p)
        return OpNode(
            name=node.name,
            op=node.op,
            target=target_name,
            module=_owner(node, self.cap),
            inputs=tuple(_unique([n.name for n in node.all_input_nodes if n.op != "get_attr"])),
            outputs=_metas(out),
            fwd_flops=int(fwd),
            bwd_flops=int(bwd),
            bytes_moved=int(moved),
            param_bytes=pbytes,
            params=tuple(read),
            activation_bytes=int(act),
        )

    def _param_name(self, fqn: str) -> str:
        # Tied weights are one tensor under several names (`lm_head.weight` is `embed_tokens.weight`): list
        # it under one, so every reader of it can be found by that name.
        p = self.params.get(fqn)
        if p is None or id(p) not in self.unique_params:
            return fqn
        return self.param_names.setdefault(id(p), fqn)

    def _assign_unused(self, nodes: list[OpNode]) -> None:
        # A parameter no op reads still occupies memory (and the optimizer state): give its bytes to the
        # first node of its owning module, or the first op, so node param_bytes sum to the model's.
        for pid, p in self.unique_params.items():
            if pid in self.assigned:
                continue
            fqn = next(k for k, v in self.params.items() if v is p)
            self.param_names.setdefault(pid, fqn)
            owner = fqn.rsplit(".", 1)[0] if "." in fqn else ""
            idx = next(
                (
                    i
                    for i, n in enumerate(nodes)
                    if n.op != "placeholder" and owner and n.module.startswith(owner)
                ),
                next((i for i, n in enumerate(nodes) if n.op != "placeholder"), 0),
            )
            n = nodes[idx]
            nodes[idx] = OpNode(
                **{**{f: getattr(n, f) for f in n.__slots__}, "param_bytes": n.param_bytes + _nbytes(p)}
            )  # type: ignore[attr-defined]
            self.assigned.add(pid)

    # ------------------------------------------------------------------ one op
    def _run_op(
        self, fn: Callable[..., Any], fn_args: tuple[Any, Any, tuple[Any, ...]], key_extra: Any, *, sdpa: bool
    ) -> tuple[Any, _OpCost]:
        args, kwargs, extra_tensors = fn_args
        flat, spec = tree_flatten((args, kwargs))
        key = self._key(flat, extra_tensors, key_extra)
        hit = self.memo.get(key)
        if hit is not None:
            with torch.no_grad():
                out = fn(*args, **kwargs)
            return _with_grad_flags(out, hit.rg_flags), hit
        needs_grad = any(isinstance(x, torch.Tensor) and x.requires_grad for x in (*flat, *extra_tensors))
        if not needs_grad:
            with torch.no_grad(), flop_counter() as fc:
                out = fn(*args, **kwargs)
            cost = _OpCost(fwd=fc.get_total_flops(), rg_flags=tuple(False for _ in _tensor_leaves(out)))
            self.memo[key] = cost
            return _with_grad_flags(out, cost.rg_flags), cost
        # Leaves for autograd: parameters as they are (so their saved views can be recognised and left
        # out), activations through a clone (in-place ops may write to them).
        leaves: list[torch.Tensor] = []
        param_storages: set[int] = set()
        input_storages: dict[int, int] = {}  # storage of what the op received -> index in `flat`
        new_flat = []
        for i, x in enumerate(flat):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                leaf = x.detach().requires_grad_(True)
                leaves.append(leaf)
                if id(x) in self.param_meta_ids:
                    param_storages.add(_storage(leaf))
                    new_flat.append(leaf)
                    continue
                x2 = leaf.clone()
                input_storages.setdefault(_storage(x2), i)
                new_flat.append(x2)
            else:
                if isinstance(x, torch.Tensor):
                    input_storages.setdefault(_storage(x), i)
                new_flat.append(x)
        for t in extra_tensors:  # parameters of a call_module (fx fallback) are read inside fn
            if isinstance(t, torch.Tensor) and t.requires_grad:
                param_storages.add(_storage(t))
                leaves.append(t)
        a2, k2 = tree_unflatten(new_flat, spec)
        saved: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t)
            return t

        with (
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            flop_counter() as fc,
        ):
            out = fn(*a2, **k2)
        fwd = fc.get_total_flops()
        outs = _tensor_leaves(out)
        rg_flags = tuple(bool(o.requires_grad) for o in outs)
        grad_outs = [o for o in outs if o.requires_grad]
        cost = _OpCost(fwd=fwd, rg_flags=rg_flags)
        if grad_outs:
            with flop_counter() as fc2:
                torch.autograd.grad(
                    grad_outs,
                    leaves,
                    grad_outputs=[torch.empty_like(o) for o in grad_outs],
                    allow_unused=True,
                )
            cost.bwd = fc2.get_total_flops()
            if sdpa:
                # Flash / memory-efficient kernels keep q, k, v, the output and a float32 log-sum-exp per
                # (batch, head, query) row; not the seq x seq scores the meta (math) path saves.
                cost.saved_inputs = tuple(i for i in (0, 1, 2) if isinstance(flat[i], torch.Tensor))
                cost.saved_outputs = (0,)
                cost.internal_bytes = outs[0].numel() // outs[0].shape[-1] * 4
            else:
                out_storages = {_storage(o): j for j, o in enumerate(outs)}
                ins: set[int] = set()
                outs_saved: set[int] = set()
                seen: set[int] = set()
                for t in saved:
                    if not isinstance(t, torch.Tensor):
                        continue
                    st = _storage(t)
                    if st in param_storages or st in seen:
                        continue
                    seen.add(st)
                    if st in input_storages:
                        ins.add(input_storages[st])
                    elif st in out_storages:
                        outs_saved.add(out_storages[st])
                    else:
                        cost.internal_bytes += t.untyped_storage().nbytes()
                cost.saved_inputs = tuple(sorted(ins))
                cost.saved_outputs = tuple(sorted(outs_saved))
        self.memo[key] = cost
        with torch.no_grad():
            plain = tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, out)
        return _with_grad_flags(plain, rg_flags), cost

    # ------------------------------------------------------------------ data-dependent sizes
    def _run_concrete(
        self, node: fx.Node, fn: Callable[..., Any], args: Any, kwargs: Any
    ) -> tuple[Any, int] | None:
        """Run ``node`` on CPU values ([Note: data-dependent sizes]): its output as ``meta`` tensors and its
        forward FLOPs, or ``None`` when its inputs cannot be had within the budget or the op fails on them
        too (the caller then reports the meta failure)."""
        try:
            value, fwd = self._evaluate(node, count_flops=True)
        except Exception:
            return None
        rg = any(isinstance(x, torch.Tensor) and x.requires_grad for x in tree_flatten((args, kwargs))[0])
        out = tree_map(lambda x: _to_meta(x, requires_grad=rg) if isinstance(x, torch.Tensor) else x, value)
        return out, fwd

    def _weighty(self, node: fx.Node) -> bool:
        """Whether ``node``'s floating output derives from a ``meta`` model's weights or floating
        activations through floating ops (then only a sample of it can be had)."""
        hit = self.concrete.get(node)
        if hit is not None:
            return hit[1]
        flags = self.weighty_flags
        for n in self.gm.graph.nodes:  # topological order; flags filled once per node
            if n in flags:
                if n is node:
                    break
                continue
            if n not in self.env:
                break
            floating = _has_float(self.env[n])
            if n.op == "placeholder":
                flags[n] = floating and not _all_real(self.inputs[n])
            elif n.op == "get_attr":
                flags[n] = floating and not _all_real(self._original_attr(n))
            else:
                flags[n] = floating and any(flags.get(m, False) for m in n.all_input_nodes)
            if n is node:
                break
        return flags.get(node, False)

    def _original_attr(self, node: fx.Node) -> Any:
        fqn = self.attr_fqn[node]
        return self.params.get(fqn, self.buffers.get(fqn, _fetch_attr(self.gm, fqn)))

    def _evaluate(self, target: fx.Node, *, count_flops: bool = False) -> tuple[Any, int]:
        """CPU value of ``target``: the nodes it needs are found walking back from it (stopping at sampled
        and already known values), then evaluated in graph order. Returns the value and, with
        ``count_flops``, the FLOPs of ``target`` itself."""
        needed: set[fx.Node] = set()
        stack = [target]
        while stack:
            n = stack.pop()
            if n in needed or n in self.concrete:
                continue
            needed.add(n)
            if n is not target and (n.op in ("placeholder", "get_attr") or self._sampled(n)):
                continue
            stack.extend(n.all_input_nodes)
        fwd = 0
        for n in self.gm.graph.nodes:  # graph order is a topological order
            if n not in needed:
                continue
            weighty = self._weighty(n)
            if n.op == "placeholder":
                v = self.inputs[n]
                value = _detached(v) if not weighty and _all_real(v) else self._sample(self.env[n])
            elif n.op == "get_attr":
                orig = self._original_attr(n)
                value = _detached(orig) if not weighty and _all_real(orig) else self._sample(self.env[n])
            elif n is not target and self._sampled(n):
                value = self._sample(self.env[n])
            else:
                a = fx.node.map_arg(n.args, lambda m: self.concrete[m][0])
                k = fx.node.map_arg(n.kwargs, lambda m: self.concrete[m][0])
                a, k = tree_map(_cpu_device, (a, k))
                with torch.device("cpu"), torch.no_grad(), flop_counter() as fc:
                    value = self._cpu_fn(n)(*a, **k)
                if n is target and count_flops:
                    fwd = fc.get_total_flops()
                self._spend(value)
            self.concrete[n] = (value, weighty)
        return self.concrete[target][0], fwd

    def _sampled(self, node: fx.Node) -> bool:
        """A node whose value is sampled rather than computed: all its outputs are floating and derive from
        a meta model's weights (router logits, probabilities, hidden states)."""
        return node in self.env and self._weighty(node) and _all_float(self.env[node])

    def _cpu_fn(self, node: fx.Node) -> Callable[..., Any]:
        if node.op == "call_module":
            sub = self.gm.get_submodule(str(node.target))
            if any(t.device.type == "meta" for t in [*sub.parameters(), *sub.buffers()]):
                raise TraceError(f"module {node.target!r} has no weights to evaluate")
            return sub
        if node.op == "call_method":
            method = str(node.target)
            return lambda *a, **k: getattr(a[0], method)(*a[1:], **k)
        assert callable(node.target)
        return node.target

    def _sample(self, meta: Any) -> Any:
        """Standard-normal floats, zero integers and booleans, shaped like ``meta``."""

        def one(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            if t.dtype.is_floating_point:
                v = torch.randn(tuple(t.shape), generator=self.gen, dtype=t.dtype, device=_CPU)
            else:
                v = torch.zeros(tuple(t.shape), dtype=t.dtype, device=_CPU)
            self._spend(v)
            return v

        return tree_map(one, meta)

    def _spend(self, value: Any) -> None:
        self.concrete_budget -= sum(t.numel() for t in _tensor_leaves(value))
        if self.concrete_budget < 0:
            raise TraceError("data-dependent sizes need more CPU values than the budget allows")

    def _charge(self, t: Any) -> int:
        """Bytes of ``t``'s storage the first time any node saves it (later savers share it), else 0."""
        if not isinstance(t, torch.Tensor):
            return 0
        st = _storage(t)
        if st in self.charged or st in self.param_meta_storages:
            return 0
        self.charged.add(st)
        return int(t.untyped_storage().nbytes())

    def _key(self, flat: list[Any], extra: tuple[Any, ...], key_extra: Any) -> Any:
        first_seen: dict[int, int] = {}
        parts: list[Any] = [key_extra]
        for i, x in enumerate(flat):
            if isinstance(x, torch.Tensor):
                alias = first_seen.setdefault(_storage(x), i)
                parts.append(
                    (
                        "T",
                        tuple(x.shape),
                        tuple(x.stride()),
                        x.dtype,
                        x.requires_grad,
                        id(x) in self.param_meta_ids,
                        alias,
                    )
                )
            else:
                parts.append(repr(x))
        parts.append(tuple(x.requires_grad for x in extra if isinstance(x, torch.Tensor)))
        return tuple(parts)


_META = torch.device("meta")
_CPU = torch.device("cpu")
# Elements of CPU values [Note: data-dependent sizes] may create for one graph (~1 GiB of float32).
_CONCRETE_BUDGET = 1 << 28


def _cpu_device(x: Any) -> Any:
    return _CPU if isinstance(x, torch.device) else x


def _has_float(v: Any) -> bool:
    return any(t.dtype.is_floating_point or t.dtype.is_complex for t in _tensor_leaves(v))


def _all_float(v: Any) -> bool:
    leaves = _tensor_leaves(v)
    return bool(leaves) and all(t.dtype.is_floating_point or t.dtype.is_complex for t in leaves)


def _all_real(v: Any) -> bool:
    """No meta tensor in ``v`` (real values to compute with)."""
    return all(t.device.type != "meta" for t in _tensor_leaves(v))


def _detached(v: Any) -> Any:
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, v)


def _has_unbacked(v: Any) -> bool:
    """Whether export recorded ``v`` with a data-dependent size (an unbacked symbol such as ``u0``)."""
    for x in tree_flatten(v)[0]:
        if isinstance(x, torch.SymInt | torch.SymFloat | torch.SymBool):
            return True
        if isinstance(x, torch.Tensor) and any(not isinstance(s, int) for s in x.shape):
            return True
    return False


def _formula_flops(target: Any, args: Any, kwargs: Any, out: Any) -> int:
    """Forward FLOPs of an op from its shapes alone, where the counter has a formula for it (0 otherwise)."""
    if not isinstance(target, torch._ops.OpOverload):
        return 0
    formula = flop_counter().flop_registry.get(target.overloadpacket)
    if formula is None:
        return 0
    try:
        return int(formula(*args, out_val=out, **kwargs))
    except Exception:  # a formula that does not fit the recorded arguments: count nothing rather than fail
        return 0


def _meta_device(x: Any) -> Any:
    return _META if isinstance(x, torch.device) else x


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _tensor_leaves(v: Any) -> list[torch.Tensor]:
    flat, _ = tree_flatten(v)
    return [x for x in flat if isinstance(x, torch.Tensor)]


def _with_grad_flags(out: Any, flags: tuple[bool, ...]) -> Any:
    """Detached meta outputs whose ``requires_grad`` says whether training differentiates through them."""
    flat, spec = tree_flatten(out)
    it = iter(flags)
    res = []
    for x in flat:
        if isinstance(x, torch.Tensor):
            rg = next(it, False)
            y = x.detach()
            if rg and (y.dtype.is_floating_point or y.dtype.is_complex):
                y.requires_grad_(True)
            res.append(y)
        else:
            res.append(x)
    return tree_unflatten(res, spec)


def _metas(v: Any) -> tuple[TensorMeta, ...]:
    return tuple(
        TensorMeta(
            shape=tuple(int(s) for s in t.shape), dtype=str(t.dtype).removeprefix("torch."), nbytes=_nbytes(t)
        )
        for t in _tensor_leaves(v)
    )


def _unique(xs: list[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def _unique_tensors(v: Any) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in _tensor_leaves(v):
        seen.setdefault(id(t), t)
    return list(seen.values())


def _describe_value(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
    if isinstance(v, list | tuple):
        return "(" + ", ".join(_describe_value(x) for x in v) + ")"
    return repr(v)


def _op_failure(
    node: fx.Node, target: str, args: Any, kwargs: Any, e: BaseException, owner: str, cap: Capture
) -> str:
    shown = ", ".join(_describe_value(a) for a in args)
    where = f" in module {owner!r}" if owner else ""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    msg = (
        f"the model fails on its example inputs at op {target} (node {node.name!r}){where}, "
        f"which got ({shown}): {type(e).__name__}: {first[:300]} -- check the example inputs' shapes"
    )
    if "more than 1 value per channel" in str(e):
        # PyTorch's batch-statistics check: one sample per channel has no variance to normalise by.
        msg += (
            "; a batch-statistics layer (BatchNorm in training mode) needs more than one sample per channel: "
            "trace with a batch of at least 2 (--batch 2)"
        )
    if cap.export_error:
        msg += f"; before that, {cap.export_error}"
    return msg
