"""Apply a graph's tensor-parallel annotation to a captured ``GraphModule`` with DTensor.

The tracer says which parameters a tensor-parallel group splits and how
(:class:`~distplan.tensor_parallel.TensorParallelAnnotation`, [Note: tensor-parallel regions]); this module
places them: each parameter becomes a DTensor on a 1-D tensor-parallel :class:`DeviceMesh`, ``Shard(dim)``
where a chosen region splits it and ``Replicate()`` elsewhere. Run the graph on ``Replicate()`` inputs under
``torch.distributed.tensor.experimental.implicit_replication()`` (constants the graph makes are plain
tensors) and DTensor's sharding propagation carries out the split: a column matmul's output comes out
``Shard(-1)``, the graph's reshapes keep global sizes, and the row matmul's ``Partial`` output is all-reduced
where it meets a replicated value -- Megatron's collectives, placed by DTensor.

Recipe (measured on gloo, see the numeric test in ``tests/tracer/test_tensor_parallel_numeric.py``)::

    cap = capture(model, args)                                 # the CPU model, eager attention on CPU
    graph = graph_from_capture(cap, model, args, name="m", meta={"kind": "causal-lm", "batch": b})
    mesh = init_device_mesh("cpu", (t,))                      # graph.tensor_parallel: the annotation
    applied = apply_tensor_parallel(cap.gm, graph.tensor_parallel, mesh)  # strip, place, reduce
    with implicit_replication():
        out = cap.gm(*replicate_inputs(args, mesh))

Two traps: export's ``aten._assert_tensor_metadata`` nodes have no DTensor sharding rule
(:func:`strip_metadata_asserts` removes them), and on the CPU ``scaled_dot_product_attention``'s flash kernel
has no DTensor strategy either (its decomposition is very slow): capture CPU models with eager attention.
Fused projections (``ParamSplit.pieces``) are placed ``Shard(dim)``: exact, but DTensor then re-lays the
fused output out at the graph's split (an all-gather the annotation does not price); an efficient lowering
splits the fused matmul into one per piece first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from distplan.errors import LoweringError
from distplan.tensor_parallel import ParamSplit, TensorParallelAnnotation

__all__ = [
    "TensorParallelApplied",
    "apply_tensor_parallel",
    "reduce_partial_outputs",
    "replicate_inputs",
    "shard_parameters",
    "strip_metadata_asserts",
]


@dataclass(frozen=True, slots=True)
class TensorParallelApplied:
    """What :func:`shard_parameters` did.

    Attributes:
        degree: the tensor-parallel degree (the mesh's size).
        regions: indices (into ``annotation.regions``) of the regions split.
        placements: every parameter FQN of the module -> ``"Shard(d)"`` or ``"Replicate()"``.
    """

    degree: int
    regions: tuple[int, ...]
    placements: Mapping[str, str]


def strip_metadata_asserts(gm: fx.GraphModule) -> int:
    """Erase export's ``aten._assert_tensor_metadata`` nodes (DTensor has no sharding rule for them; they
    only check dtypes and devices). Returns how many were erased."""
    target = torch.ops.aten._assert_tensor_metadata.default
    erased = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is target and not n.users:
            gm.graph.erase_node(n)
            erased += 1
    if erased:
        gm.recompile()
    return erased


def shard_parameters(
    module: nn.Module,
    annotation: TensorParallelAnnotation,
    mesh: DeviceMesh,
    *,
    regions: Iterable[int] | None = None,
) -> TensorParallelApplied:
    """Turn ``module``'s parameters into DTensors on the 1-D ``mesh``, in place.

    Args:
        module: the captured graph module (or the model it was captured from): parameter FQNs as in the
            annotation; a tied parameter (one tensor under several names) stays one DTensor.
        annotation: the graph's tensor-parallel regions.
        mesh: a 1-D device mesh of the tensor-parallel group; its size is the degree ``t``.
        regions: indices of the regions to split; default: every region whose degrees include ``t``.
            The others run replicated, which is always correct (see [Note: tensor-parallel regions]).

    Returns:
        A :class:`TensorParallelApplied` naming each parameter's placement.

    Raises:
        LoweringError: the mesh is not 1-D, a chosen region does not allow degree ``t`` (naming it and its
            valid degrees), a region index is out of range, or an annotated parameter is not in ``module``
            or has another shape.
    """
    if mesh.ndim != 1:
        raise LoweringError(f"shard_parameters needs a 1-D tensor-parallel mesh, got {mesh.ndim} dimensions")
    t = mesh.size()
    n_regions = len(annotation.regions)
    if regions is None:
        chosen = tuple(i for i, r in enumerate(annotation.regions) if t in r.degrees)
    else:
        chosen = tuple(sorted(set(regions)))
        for i in chosen:
            if not 0 <= i < n_regions:
                raise LoweringError(
                    f"region index {i} is out of range of the annotation's {n_regions} regions"
                )
            r = annotation.regions[i]
            if t not in r.degrees:
                raise LoweringError(
                    f"region {i} ({r.kind} at {r.nodes[0]!r}) cannot be split {t} ways: its split sizes "
                    f"{r.split_sizes} allow degrees {r.degrees}"
                )
    splits: dict[str, ParamSplit] = {}
    for i in chosen:
        for ps in annotation.regions[i].params:
            if ps.split:
                splits.setdefault(ps.name, ps)
    named = list(module.named_parameters(remove_duplicate=False))
    known = {name for name, _ in named}
    missing = sorted(set(splits) - known)
    if missing:
        raise LoweringError(
            f"the annotation splits parameters the module does not have: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    # One placement per tensor: a tied parameter takes the split of whichever of its names is split.
    by_tensor: dict[int, ParamSplit | None] = {}
    for name, p in named:
        s = splits.get(name)
        if s is not None and tuple(p.shape) != s.shape:
            raise LoweringError(
                f"parameter {name!r} has shape {tuple(p.shape)}, the annotation says {s.shape}"
            )
        if by_tensor.get(id(p)) is None:
            by_tensor[id(p)] = s
    made: dict[int, nn.Parameter] = {}
    placements: dict[str, str] = {}
    for name, p in named:
        split = by_tensor[id(p)]
        placement: Placement = (
            Shard(split.dim) if split is not None and split.dim is not None else Replicate()
        )
        placements[name] = repr(placement)
        new = made.get(id(p))
        if new is None:
            data = p.detach()
            new = nn.Parameter(distribute_tensor(data, mesh, [placement]), requires_grad=p.requires_grad)
            made[id(p)] = new
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, leaf, new)
    return TensorParallelApplied(degree=t, regions=chosen, placements=placements)


def apply_tensor_parallel(
    gm: fx.GraphModule,
    annotation: TensorParallelAnnotation,
    mesh: DeviceMesh,
    *,
    regions: Iterable[int] | None = None,
) -> TensorParallelApplied:
    """Everything the recipe in this module's docstring does to ``gm``, in place: strip the metadata
    asserts, place the parameters (:func:`shard_parameters`) and reduce the partial outputs where the
    annotation puts them (:func:`reduce_partial_outputs`). Errors as :func:`shard_parameters`."""
    strip_metadata_asserts(gm)
    applied = shard_parameters(gm, annotation, mesh, regions=regions)
    reduce_partial_outputs(gm, annotation, applied.regions)
    return applied


def reduce_partial_outputs(
    gm: fx.GraphModule, annotation: TensorParallelAnnotation, regions: Iterable[int]
) -> int:
    """Make the forward all-reduce of each chosen region happen at its annotated node: a call that
    redistributes a ``Partial`` DTensor to ``Replicate()`` is inserted after the node of every
    ``partial-output`` collective, and the node's users read that instead.

    DTensor would otherwise keep the partial sum until some op needs it whole; that is correct, but a
    vocab-parallel lookup's pending sum (``_MaskPartial``) read by two ops fails on its second reduction
    (torch 2.13), and the annotation's placement is the one priced. Returns how many calls were inserted.

    Raises:
        LoweringError: a collective names a node ``gm`` does not have.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    inserted = 0
    for i in regions:
        for c in annotation.regions[i].collectives:
            if c.phase != "forward" or c.reason != "partial-output":
                continue
            node = nodes.get(c.node)
            if node is None:
                raise LoweringError(f"region {i}: collective node {c.node!r} is not in the graph module")
            with gm.graph.inserting_after(node):
                reduced = gm.graph.call_function(_replicate, (node,))
            reduced.meta = dict(node.meta)
            node.replace_all_uses_with(reduced, delete_user_cb=lambda u, r=reduced: u is not r)
            inserted += 1
    if inserted:
        gm.recompile()
    return inserted


def _replicate(x: Any) -> Any:
    """``x`` all-reduced to ``Replicate()`` when it is a DTensor holding a partial sum.

    Its gradient is made whole before it flows back through the reduction: the backward of a reduction
    turns a whole gradient into the input's placement, but a vocab-parallel lookup's placement
    (``_MaskPartial``) cannot be reached from a pending partial sum (the gradient a later row-parallel
    layer leaves)."""
    if not isinstance(x, DTensor) or not any(p.is_partial() for p in x.placements):
        return x
    y = x.redistribute(x.device_mesh, [Replicate()] * x.device_mesh.ndim)
    if y.requires_grad:
        y.register_hook(_whole_gradient)
    return y


def _whole_gradient(g: Any) -> Any:
    if isinstance(g, DTensor) and any(not p.is_replicate() for p in g.placements):
        return g.redistribute(g.device_mesh, [Replicate()] * g.device_mesh.ndim)
    return g


def replicate_inputs(values: Any, mesh: DeviceMesh) -> Any:
    """``values`` (a tensor or a tuple/list/dict of them, nested) with every tensor made a ``Replicate()``
    DTensor on ``mesh`` (each rank passes the same whole tensor)."""
    if isinstance(values, torch.Tensor) and not isinstance(values, DTensor):
        return DTensor.from_local(values, mesh, [Replicate()], run_check=False)
    if isinstance(values, tuple | list):
        return type(values)(replicate_inputs(v, mesh) for v in values)
    if isinstance(values, dict):
        return {k: replicate_inputs(v, mesh) for k, v in values.items()}
    return values
