"""Which output of a model the loss reads: the ``output=`` selector.

[Note: output selector]
A model may return one tensor or a structure of them: a dict, a tuple or list, a ``NamedTuple``, a
dataclass, a Hugging Face ``ModelOutput``, nested in any way. A pipeline's last stage hands ONE tensor to the
loss, so the lowering must know which. ``output`` is a path of keys, indices and field names joined by dots:
``"logits"``, ``"0"``, ``"1.aux"``, ``"hidden.0"``. Each component is looked up, in this order, as a mapping
key, as a position (digits: a tuple/list index, or the n-th entry of a mapping or dataclass), then as a
field name (dataclasses, ``NamedTuple``s). ``None`` (the default) takes the ``logits`` entry when the output
has one at its top level, else the first tensor in traversal order (mapping insertion order, sequence
order, dataclass field order; ``None`` entries skipped), so a model returning ``{"logits": ..., "aux": ...}``
or ``(logits, aux_loss)`` needs no selector. A model that returns one tensor takes no selector.

The same rule applies to the three forms the structure takes: the eager output (tensor leaves), the
captured graph's output under ``torch.export`` (the flat output list plus its pytree spec) and under
``torch.fx`` (the returned structure of graph nodes, a dataclass being a node that constructs it), so the
reference run and the last pipeline stage read the same tensor. The other outputs are not computed into
the loss; nodes that only feed them still run (they are in the plan) and their results are dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from distplan.errors import LoweringError

__all__ = [
    "describe",
    "graph_output",
    "graph_output_node",
    "graph_output_structure",
    "resolve_output",
    "select_output",
]

_MISSING = object()


class _Fields(dict):  # type: ignore[type-arg]
    """A dataclass built inside an ``fx`` graph, as a dict of its fields that keeps the class name."""

    type_name = "dataclass"


def _children(obj: Any) -> list[tuple[str, Any]] | None:
    """``[(component, child), ...]`` of a container, in traversal order; ``None`` for a leaf."""
    if isinstance(obj, Mapping):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    return None


def _step(obj: Any, comp: str) -> Any:
    """One component of a path (see [Note: output selector]); ``_MISSING`` when absent."""
    if isinstance(obj, Mapping):
        if comp in obj:
            return obj[comp]
        if comp.lstrip("-").isdigit() and int(comp) in obj:
            return obj[int(comp)]
    if comp.isdigit():
        kids = _children(obj)
        if kids is not None:
            kids = [kv for kv in kids if kv[1] is not None]
            return kids[int(comp)][1] if int(comp) < len(kids) else _MISSING
    if not isinstance(obj, Mapping) and _children(obj) is not None and hasattr(obj, comp):
        return getattr(obj, comp)
    return _MISSING


def describe(obj: Any, leaf: Callable[[Any], str] | None = None) -> str:
    """A short description of an output structure for error messages (``a dict with entries ['logits',
    'aux']``); ``leaf`` describes leaves of captured structures (graph values)."""
    if leaf is not None and _children(obj) is None:
        return leaf(obj)
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, fx.Node):
        return f"graph value {obj.name!r}"
    kids = _children(obj)
    if kids is None:
        return f"a {type(obj).__name__}"
    name = obj.type_name if isinstance(obj, _Fields) else type(obj).__name__
    if isinstance(obj, Mapping) or dataclasses.is_dataclass(obj):
        return f"a {name} with entries {[k for k, v in kids if v is not None]}"
    return f"a {name} of {len(kids)} entries"


def resolve_output(
    structure: Any,
    path: str | None,
    *,
    is_tensor: Callable[[Any], bool],
    leaf: Callable[[Any], str] | None = None,
) -> tuple[Any, str | None]:
    """The leaf of ``structure`` that ``path`` selects, and the path actually used (see [Note: output selector]).

    Args:
        structure: the model's output, or its captured form (leaves are then graph nodes or flat indices).
        path: the selector, or ``None`` for the default rule.
        is_tensor: whether a leaf is a tensor (the default rule skips other leaves).
        leaf: describes a leaf in error messages (default: by its Python type).

    Returns:
        ``(leaf, path)``; ``path`` is ``None`` when the output is one tensor.

    Raises:
        LoweringError: the path names nothing, or selects a non-tensor, or the output holds no tensor.
    """
    if _children(structure) is None:
        if path:
            raise LoweringError(
                f"output selector {path!r} given, but the model returns {describe(structure, leaf)}, not a "
                "structure of outputs; drop the selector"
            )
        if not is_tensor(structure):
            raise LoweringError(
                f"the model returns {describe(structure, leaf)}, not a tensor the loss can read"
            )
        return structure, None
    if path is None:
        top = _step(structure, "logits")
        if top is not _MISSING and _children(top) is None and is_tensor(top):
            return top, "logits"
        found = _first_tensor(structure, (), is_tensor)
        if found is None:
            raise LoweringError(
                f"the model returns {describe(structure, leaf)}, which holds no tensor for the loss"
            )
        return found[1], ".".join(found[0])
    node = structure
    done: list[str] = []
    for comp in path.split("."):
        nxt = _step(node, comp) if comp else _MISSING
        if nxt is _MISSING:
            where = f"output.{'.'.join(done)}" if done else "the output"
            raise LoweringError(
                f"output selector {path!r}: {where} is {describe(node, leaf)}, which has no entry {comp!r}"
            )
        node, done = nxt, [*done, comp]
    if _children(node) is not None:
        raise LoweringError(
            f"output selector {path!r} selects {describe(node, leaf)}, not one tensor; extend the path "
            f"(e.g. {path}.{(_children(node) or [('0', None)])[0][0]})"
        )
    if not is_tensor(node):
        raise LoweringError(f"output selector {path!r} selects {describe(node, leaf)}, not a tensor")
    return node, path


def _first_tensor(
    obj: Any, prefix: tuple[str, ...], is_tensor: Callable[[Any], bool]
) -> tuple[tuple[str, ...], Any] | None:
    kids = _children(obj)
    if kids is None:
        return (prefix, obj) if obj is not None and is_tensor(obj) else None
    for comp, child in kids:
        if child is None:
            continue
        found = _first_tensor(child, (*prefix, comp), is_tensor)
        if found is not None:
            return found
    return None


def select_output(output: Any, path: str | None) -> torch.Tensor:
    """The tensor of an eager model output that the loss reads (see [Note: output selector])."""
    leaf, _ = resolve_output(output, path, is_tensor=lambda v: isinstance(v, torch.Tensor))
    return leaf  # type: ignore[no-any-return]


def graph_output_structure(gm: fx.GraphModule) -> tuple[Any, list[Any]]:
    """The captured graph's output as a structure, and the flat list of what its leaves refer to.

    Under ``torch.export`` the output node returns a flat tuple and the module's pytree codegen rebuilds
    the structure; the structure returned here has integer leaves indexing the flat list. Under ``fx`` the
    output node holds the structure itself; a dataclass the model builds is a node calling the dataclass
    type, expanded here into a dict of its fields. Leaves of the returned structure index the flat list.
    """
    out = next(n for n in gm.graph.nodes if n.op == "output")
    info = getattr(getattr(gm.graph, "_codegen", None), "pytree_info", None)
    spec = getattr(info, "out_spec", None)
    if spec is not None:
        flat = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
        return pytree.tree_unflatten(list(range(len(flat))), spec), flat
    flat_fx: list[Any] = []

    def expand(a: Any) -> Any:
        is_call = isinstance(a, fx.Node) and a.op == "call_function"
        if is_call and isinstance(a.target, type) and dataclasses.is_dataclass(a.target):
            fields = _Fields((k, expand(v)) for k, v in a.kwargs.items())
            fields.type_name = a.target.__name__
            return fields
        if isinstance(a, Mapping):
            return {k: expand(v) for k, v in a.items()}
        if isinstance(a, tuple) and hasattr(a, "_fields"):  # NamedTuple: keep the field names
            return {f: expand(v) for f, v in zip(a._fields, a, strict=True)}
        if isinstance(a, (tuple, list)):
            return [expand(v) for v in a]
        flat_fx.append(a)
        return len(flat_fx) - 1

    return expand(out.args[0]), flat_fx


def graph_output_node(gm: fx.GraphModule, path: str | None) -> fx.Node:
    """The graph node holding the output the loss reads (see [Note: output selector]).

    Raises:
        LoweringError: as :func:`resolve_output`, naming what the model returns.
    """
    return graph_output(gm, path)[0]


def graph_output(gm: fx.GraphModule, path: str | None) -> tuple[fx.Node, str | None]:
    """:func:`graph_output_node` and the path used (the default rule's choice spelt out; ``None`` when the
    model returns one tensor)."""
    structure, flat = graph_output_structure(gm)

    def is_tensor(i: Any) -> bool:
        v = flat[i] if isinstance(i, int) and 0 <= i < len(flat) else None
        if not isinstance(v, fx.Node):
            return False
        val = v.meta.get("val")
        return val is None or isinstance(val, torch.Tensor)

    def leaf(i: Any) -> str:
        v = flat[i] if isinstance(i, int) and 0 <= i < len(flat) else i
        return describe(v) if isinstance(v, fx.Node) else f"the constant {v!r}"

    found, used = resolve_output(structure, path, is_tensor=is_tensor, leaf=leaf)
    node = flat[found]
    assert isinstance(node, fx.Node)
    return node, used
