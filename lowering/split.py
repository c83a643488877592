"""Cut a captured ``fx.GraphModule`` into pipeline stage modules at a plan's node positions.

The planner decides the cuts as positions of the traced :class:`~distplan.graph.OpGraph`; here they become
one ``fx.GraphModule`` per stage. Each stage module takes, as positional tensors, exactly the values that
cross the cut in front of it and returns exactly the values that cross the cut behind it, so a stage only
ever talks to its neighbours (what ``torch.distributed.pipelining.PipelineStage`` supports).

[Note: stage boundaries]
- *Relay*: a value made in stage ``i`` and used in stage ``j > i + 1`` (a skip connection, rotary cos/sin,
  the model inputs) is an output of ``i``, an input and an output of every stage in between, and an input
  of ``j``. Pipelining cannot route a value past a stage ("skip connections not supported"), so the
  intermediate stages pass it along.
- *Contiguous*: every stage output goes through ``.contiguous()`` (a no-op on contiguous tensors) because
  gloo cannot send a strided view.
- *Contiguous gradients*: each received value goes through an identity whose backward makes the gradient
  contiguous, since autograd may produce strided gradients (of a ``transpose``, ``expand``, ...) and the
  pipeline sends them back as they are.
- *In-place on received values*: the pipeline hands a stage its received tensors as autograd leaves, which
  an in-place op (``relu_``, ``add_``, ``mul_``, ``ReLU(inplace=True)``) may not modify, and an identity
  that returns a view of its input may not be modified in place either ("a view created inside a custom
  Function"). So that identity returns a *detached alias*: same storage, no copy, not a view in
  autograd's sense and not a leaf, with the identity as its gradient function. The stage's ops may modify
  it in place as the single-device model modifies the value it was given; autograd records those ops on
  top of the identity as usual. Nothing else reads the leaf (every use in the stage goes through the
  alias), so writing to the shared storage cannot corrupt a saved value.
- *Every received value gets a gradient*: a stage that reads a received float only through non-differentiable
  ops (``size``, comparisons) would send back no gradient for it, and the sender's backward then fails
  ("grad can be implicitly created only for scalar outputs"). The first float output is tied to every
  received float by an identity whose backward adds a zero gradient (an expanded scalar, no memory) for each.
- *Pass-through*: a relayed input is returned through ``aten.alias`` so it has its own autograd node and the
  gradient that arrives for it flows back to the input (returning the input object itself would make the
  output a leaf of this stage and lose the gradient).
- *Multi-output nodes*: a node that returns a tuple (``split``, ``max.dim``, ...) never crosses a cut as a
  tuple: the elements that later stages read through ``getitem`` cross one by one.
- *Non-tensor values* (Python ints from ``size()`` under ``fx`` tracing, ...) that cross a cut are baked in
  as constants of the consuming stage, taken from an example run at the microbatch shape; anything else
  is a :class:`~distplan.errors.LoweringError` naming the node.
- *Parameters* never cross a cut: each stage copies the ``get_attr`` nodes it uses, so it owns the same
  ``Parameter`` objects under the same attribute paths as the captured module (``GraphModule(root, graph)``
  copies exactly the referenced attributes). A parameter used by several stages (tied embeddings) is
  held by each of them; the runtime sums its gradient across them (see ``distplan.lowering.runtime``).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from distplan.errors import LoweringError
from distplan.lowering.outputs import graph_output_node

__all__ = ["StageModule", "Value", "split_graph", "stage_parameters"]


@dataclass(frozen=True, slots=True, order=True)
class Value:
    """A value that crosses a cut: node ``node``'s output, or element ``index`` of it for multi-output nodes."""

    position: int
    node: str
    index: int | None = None

    def __str__(self) -> str:
        return self.node if self.index is None else f"{self.node}[{self.index}]"


@dataclass(frozen=True, slots=True)
class StageModule:
    """One stage of the split program.

    Attributes:
        index: the stage number.
        module: the stage as a ``GraphModule``; ``module(*inputs)`` returns ``outputs`` (a tuple, or the
            model's output tensor on the last stage).
        inputs / outputs: the values crossing the cut in front of / behind the stage, in argument order.
        nodes: names of the captured graph's nodes the stage computes.
        input_examples / output_examples: ``meta`` tensors with the shape, dtype and ``requires_grad`` of
            each input and output at the captured (microbatch) shape, or ``None`` where unknown. They let
            ``PipelineStage`` skip its metadata inference, which runs the stage on uninitialised tensors and
            fails on data-dependent ops (``index`` with garbage indices in HF attention masks).

    The stage module keeps the captured module's attribute layout, so its parameter names are the captured
    module's (see :func:`stage_parameters`).
    """

    index: int
    module: fx.GraphModule
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    nodes: tuple[str, ...]
    input_examples: tuple[torch.Tensor, ...] | None = None
    output_examples: tuple[torch.Tensor, ...] | None = None


def _example(val: Any, *, grad: bool) -> torch.Tensor | None:
    """A ``meta`` tensor like ``val``; float tensors that cross a cut carry gradients (see the anchor)."""
    if not isinstance(val, torch.Tensor):
        return None
    t = torch.empty(tuple(int(d) for d in val.shape), dtype=val.dtype, device="meta")
    return t.requires_grad_(grad and t.is_floating_point())


def _is_getitem(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int)


def _is_constant(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device, torch.Size)):
        return not isinstance(v, torch.SymInt)
    if isinstance(v, (tuple, list)):
        return all(_is_constant(x) for x in v)
    return False


def _alias(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.alias.default(x)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (see [Note: stage boundaries])."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        # A detached alias rather than `view_as`: in-place ops may modify it (see [Note: stage boundaries]).
        return x.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _Anchor(torch.autograd.Function):
    """``out`` unchanged; in backward, a zero gradient for each of ``inputs`` (see [Note: stage boundaries])."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.metas = [(i.shape, i.dtype, i.device) for i in inputs]
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        zeros = [
            torch.zeros((), dtype=dt, device=dev).expand(shape) if need else None
            for (shape, dt, dev), need in zip(ctx.metas, ctx.needs_input_grad[1:], strict=True)
        ]
        return (grad, *zeros)


def _anchor(out: Any, *inputs: Any) -> Any:
    if isinstance(out, torch.Tensor) and out.is_floating_point() and any(i.requires_grad for i in inputs):
        return _Anchor.apply(out, *inputs)
    return out


def _contiguous_grad(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.requires_grad:
        return _ContiguousGrad.apply(x)
    return x


def split_graph(
    gm: fx.GraphModule,
    *,
    stage_nodes: Sequence[Sequence[str]],
    example_values: Mapping[str, Any] | None = None,
    constant_inputs: Mapping[str, Any] | None = None,
    output: str | None = None,
) -> list[StageModule]:
    """Split ``gm`` into stages (see [Note: stage boundaries]).

    Args:
        gm: the captured model (``torch.export``'s ``ep.module()`` or an ``fx.symbolic_trace`` result).
        stage_nodes: for each stage, the names of the nodes it computes (``get_attr`` and ``output`` nodes
            excluded; placeholders always go to stage 0, which receives the model inputs).
        example_values: node name -> value at the microbatch shape, used to bake non-tensor values that
            cross a cut; ``node.meta["val"]`` is used when present.
        constant_inputs: placeholder name -> the non-tensor value the model is always called with
            (flags such as ``use_cache=False``); baked into the stages instead of being received.
        output: which of the model's outputs the last stage returns, the one the loss reads (see [Note:
            output selector] in ``distplan.lowering.outputs``); ``None`` for the default rule.

    Returns:
        One :class:`StageModule` per stage.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        >>> s0, s1 = split_graph(gm, stage_nodes=[["input_1", "_0"], ["_1"]])
        >>> [str(v) for v in s0.outputs], [str(v) for v in s1.inputs]
        (['_0'], ['_0'])
    """
    num_stages = len(stage_nodes)
    constant_inputs = dict(constant_inputs or {})
    if num_stages < 1:
        raise LoweringError("a split needs at least one stage")
    graph_nodes = list(gm.graph.nodes)
    position = {n.name: i for i, n in enumerate(graph_nodes)}
    by_name = {n.name: n for n in graph_nodes}
    stage_of: dict[str, int] = {}
    for s, names in enumerate(stage_nodes):
        for name in names:
            node = by_name.get(name)
            if node is None:
                raise LoweringError(
                    f"stage {s} lists node {name!r}, which is not in the captured graph "
                    f"({len(graph_nodes)} nodes); the plan was made for another model or trace"
                )
            if node.op in ("get_attr", "output"):
                continue
            if name in stage_of:
                raise LoweringError(f"node {name!r} is placed in stages {stage_of[name]} and {s}")
            stage_of[name] = 0 if node.op == "placeholder" else s
    missing = [n.name for n in graph_nodes if n.op not in ("get_attr", "output") and n.name not in stage_of]
    if missing:
        raise LoweringError(
            f"{len(missing)} nodes of the captured graph are in no stage (first: {missing[:5]}); "
            "the plan's stages must cover the whole graph"
        )
    # A node's stage may not precede the stage of a node it reads (stages are contiguous ranges of a
    # topological order, so this only fails for a plan made for another graph).
    for n in graph_nodes:
        if n.name not in stage_of:
            continue
        for a in n.all_input_nodes:
            if a.name in stage_of and stage_of[a.name] > stage_of[n.name]:
                raise LoweringError(
                    f"node {n.name!r} (stage {stage_of[n.name]}) reads {a.name!r} from a later stage "
                    f"{stage_of[a.name]}"
                )

    def value_of(node: fx.Node) -> Any:
        if "val" in node.meta:
            return node.meta["val"]
        if example_values is not None and node.name in example_values:
            return example_values[node.name]
        return None

    def element_value(v: Value) -> Any:
        val = value_of(by_name[v.node])
        if v.index is not None:
            return val[v.index] if isinstance(val, (tuple, list)) else None
        return val

    last = num_stages - 1
    model_output = graph_output_node(gm, output)
    if model_output.name not in stage_of:
        raise LoweringError(
            f"the selected output {model_output.name!r} is not computed by any stage (a parameter or a "
            "constant); select a computed output"
        )

    # Which values cross which cuts: value -> last stage that needs it.
    need_until: dict[Value, int] = {}
    constants: dict[tuple[int, str], Any] = {}  # (consumer stage, node) -> baked constant
    for n in graph_nodes:
        if n.name not in stage_of or n.name in constant_inputs:
            continue
        s = stage_of[n.name]
        for u in n.users:
            if u.op == "output" and n is not model_output:
                continue  # an output the loss does not read: the last stage does not return it
            su = last if u.op == "output" else stage_of.get(u.name)
            if su is None or su <= s:
                continue
            if _is_getitem(u) and u.op != "output":
                v = Value(position[n.name], n.name, u.args[1])  # type: ignore[arg-type]
                # The getitem itself runs in stage su; its element crosses the cuts s+1..su.
                need_until[v] = max(need_until.get(v, -1), su)
                continue
            val = value_of(n)
            if isinstance(val, torch.Tensor) or val is None:
                # None: no example value known (fx without example run); assume a tensor.
                v = Value(position[n.name], n.name)
                need_until[v] = max(need_until.get(v, -1), su)
            elif _is_constant(val):
                constants[(su, n.name)] = val
            elif isinstance(val, (tuple, list)):
                raise LoweringError(
                    f"node {n.name!r} returns a {type(val).__name__} that node {u.name!r} in stage {su} reads "
                    f"whole across a cut; only elements read through getitem can cross a cut"
                )
            else:
                raise LoweringError(
                    f"node {n.name!r} (stage {s}) produces a {type(val).__name__}, which cannot be sent to "
                    f"stage {su}; move the cut so this value stays inside one stage"
                )

    stage_inputs: list[list[Value]] = [[] for _ in range(num_stages)]
    stage_outputs: list[list[Value]] = [[] for _ in range(num_stages)]
    for v, until in sorted(need_until.items()):
        producer = stage_of[v.node]
        stage_outputs[producer].append(v)
        for s in range(producer + 1, until + 1):
            stage_inputs[s].append(v)
            if s < until:
                stage_outputs[s].append(v)

    stages = []
    for s in range(num_stages):
        g = fx.Graph()
        env: dict[Any, fx.Node] = {}

        def lookup(a: fx.Node, s: int = s, g: fx.Graph = g, env: dict[Any, fx.Node] = env) -> fx.Node:
            if a.name in env:
                return env[a.name]
            if a.name in constant_inputs:
                return constant_inputs[a.name]  # type: ignore[no-any-return]
            if a.op == "get_attr":
                c = g.node_copy(a)
                env[a.name] = c
                return c
            key = (s, a.name)
            if key in constants:
                return constants[key]  # type: ignore[no-any-return]
            raise LoweringError(f"stage {s}: value {a.name!r} is neither computed in the stage nor received")

        for v in stage_inputs[s]:
            ph = g.placeholder(_safe(str(v)))
            src = by_name[v.node]
            if v.index is None:
                ph.meta = dict(src.meta)
            elif isinstance(src.meta.get("val"), (tuple, list)):
                ph.meta["val"] = src.meta["val"][v.index]
            # The gradient this stage sends back for a received value must be contiguous (gloo).
            node = _with_meta(g.call_function(_contiguous_grad, (ph,)), ph)
            env[v if v.index is not None else v.node] = node
        names = []
        for n in graph_nodes:
            if stage_of.get(n.name) != s:
                continue
            names.append(n.name)
            if n.name in constant_inputs:
                continue
            if _is_getitem(n):
                src = n.args[0]
                assert isinstance(src, fx.Node)
                key = Value(position[src.name], src.name, n.args[1])  # type: ignore[arg-type]
                if key in env:  # the element was received
                    env[n.name] = env[key]
                    continue
            env[n.name] = g.node_copy(n, lookup)
        received = [env[v if v.index is not None else v.node] for v in stage_inputs[s]]
        received = [n for n in received if _maybe_float(n)]
        outs = []
        for v in stage_outputs[s]:
            if v.index is not None:
                node = env.get(v)
                if node is None:  # produced here: pick the element
                    node = g.call_function(operator.getitem, (env[v.node], v.index))
            else:
                node = env[v.node]
            outs.append(_as_output(g, node, relayed=v in stage_inputs[s]))
        if s == last:
            outs = [lookup(model_output)]
        if received:
            for i, o in enumerate(outs):
                if _maybe_float(o):
                    outs[i] = _with_meta(g.call_function(_anchor, (o, *received)), o)
                    break
        if s == last:
            g.output(outs[0])
        else:
            g.output(tuple(outs))
        g.lint()
        module = fx.GraphModule(gm, g, class_name=f"Stage{s}")
        in_ex = [_example(element_value(v), grad=s > 0) for v in stage_inputs[s]]
        out_vals = [model_output] if s == last else None
        out_ex = (
            [_example(value_of(model_output), grad=True)]
            if out_vals is not None
            else [_example(element_value(v), grad=True) for v in stage_outputs[s]]
        )
        stages.append(
            StageModule(
                index=s,
                module=module,
                inputs=tuple(stage_inputs[s]),
                outputs=tuple(stage_outputs[s]),
                nodes=tuple(names),
                input_examples=None if any(x is None for x in in_ex) else tuple(in_ex),  # type: ignore[arg-type]
                output_examples=None if any(x is None for x in out_ex) else tuple(out_ex),  # type: ignore[arg-type]
            )
        )
    return stages


def _as_output(g: fx.Graph, node: fx.Node, *, relayed: bool) -> fx.Node:
    """Wrap a stage output (see [Note: stage boundaries]): alias a relayed input, make it contiguous."""
    val = node.meta.get("val")
    if val is not None and not isinstance(val, torch.Tensor):
        raise LoweringError(f"stage output {node.name!r} is a {type(val).__name__}, not a tensor")
    if relayed:
        node = _with_meta(g.call_function(_alias, (node,)), node)
    return _with_meta(g.call_method("contiguous", (node,)), node)


def _maybe_float(n: fx.Node) -> bool:
    val = n.meta.get("val")
    return not isinstance(val, torch.Tensor) or val.is_floating_point()


def _with_meta(new: fx.Node, like: fx.Node) -> fx.Node:
    new.meta = dict(like.meta)
    return new


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def stage_parameters(stage: StageModule) -> dict[str, nn.Parameter]:
    """The parameters a stage module holds, by their attribute path (== the captured module's path)."""
    return dict(stage.module.named_parameters(remove_duplicate=False))
