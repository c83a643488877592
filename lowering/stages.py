"""Assemble one rank's stage programs: tensor parallelism, recomputation and sharding applied to the
captured stage graph, in that order, on the stage's own ``(dp, tp)`` device mesh.

[Note: tensor parallelism on a stage]
Design choice: DTensor on the captured stage graph, not sharded local parameters with hand-inserted
collectives. The tracer's annotation says which parameters a region splits and along which dimension
(``distplan.tensor_parallel``); ``distplan.lowering.tensor_parallel.apply_tensor_parallel`` turns those
parameters into ``Shard(dim)`` DTensors on the stage's tensor-parallel mesh and everything else into
``Replicate()``; :class:`TensorParallelStage` gives the graph its inputs as ``Replicate()`` DTensors, runs it
(forward and, through :attr:`StageProgram.context`, backward and any recomputation) under
``implicit_replication`` and returns whole tensors (``full_tensor``: the all-reduce of a partial sum or the
all-gather of a split output). Why:

- *exact by construction*: DTensor's sharding propagation inserts whatever collective a placement needs, so
  a region cut by a pipeline boundary, a fused projection or an annotation that misses a pattern costs
  communication, never correctness; hand-inserted collectives would have to rewrite every hard-coded
  reshape of the graph (heads x head_dim) to local sizes and get each case right;
- *no new graph surgery*: DTensor keeps global shapes, so the captured graph runs unchanged;
- it composes with FSDP2 (2-D parameters) and with non-reentrant checkpointing.

Its costs: per-op dispatch overhead (negligible against GPU kernels, noticeable on CPU), and on the CPU
``scaled_dot_product_attention`` dispatches to a flash kernel DTensor has no rule for (its fallback did not
finish one forward of a 2-layer model in 60 s); a tensor-parallel stage on the CPU therefore runs attention
through :func:`sdpa_math` (the same formula, softmax(QK^T * scale + mask) V, with DTensor rules for every
op) -- the node keeps its name and position, so the plan's cuts still apply. On CUDA the fused kernels have
DTensor rules and stay. Regions are split only when all their nodes are in the stage and the stage's
degree divides them (:func:`stage_regions`); the rest runs replicated, which is always correct. A stage
whose graph has no splittable region runs replicated on each of its tensor-parallel ranks (the planner
gives such a stage ``tp = 1``; the lowering still runs ``tp > 1``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from distplan.errors import LoweringError
from distplan.lowering.executor import StageProgram
from distplan.lowering.parallel import ParallelLayout, StageSpec
from distplan.lowering.recompute import apply_recompute
from distplan.lowering.sharding import ShardedStage, apply_sharding, full_tensor
from distplan.lowering.split import StageModule

__all__ = ["BuiltStage", "TensorParallelStage", "build_stage", "sdpa_math", "stage_regions"]


def sdpa_math(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` written out (the reference formula of its documentation), for
    DTensor on the CPU (see [Note: tensor parallelism on a stage]). Same arguments; dropout as
    ``torch.nn.functional.dropout`` on the attention weights."""
    n_q, n_k = query.shape[-2], key.shape[-2]
    s = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * s
    if is_causal:
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p)
    return torch.matmul(weights, value)


_SDPA_TARGETS: tuple[Any, ...] = (
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.nn.functional.scaled_dot_product_attention,
)


def use_sdpa_math(gm: fx.GraphModule) -> int:
    """Point every ``scaled_dot_product_attention`` node of ``gm`` at :func:`sdpa_math` (in place; names and
    positions unchanged). Returns how many nodes changed."""
    n_changed = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _SDPA_TARGETS:
            n.target = sdpa_math
            n_changed += 1
    if n_changed:
        gm.recompile()
    return n_changed


class TensorParallelStage(nn.Module):
    """A stage graph whose parameters are DTensors on ``mesh``: plain whole tensors in, plain whole tensors
    out (see [Note: tensor parallelism on a stage]). Run it (and its backward) under :func:`dtensor_context`.
    """

    def __init__(self, inner: nn.Module, mesh: Any) -> None:
        super().__init__()
        self.inner = inner
        self.mesh = mesh

    def forward(self, *args: Any) -> Any:
        from torch.distributed.tensor import DTensor, Replicate

        ins = [
            DTensor.from_local(a, self.mesh, [Replicate()], run_check=False)
            if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a
            for a in args
        ]
        out = self.inner(*ins)
        if isinstance(out, tuple):
            return tuple(_whole(o) for o in out)
        return _whole(out)


def _whole(x: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


@contextlib.contextmanager
def dtensor_context() -> Iterator[None]:
    """``implicit_replication``: plain tensors the graph makes (masks, position tables) count as replicated
    DTensors, in the forward and in the backward."""
    from torch.distributed.tensor.experimental import implicit_replication

    with implicit_replication():
        yield


def stage_regions(annotation: Any, nodes: Sequence[str], tp: int) -> tuple[int, ...]:
    """Indices of the annotation's regions a stage of degree ``tp`` splits: every node (split or whole) in
    the stage, and ``tp`` one of the region's degrees."""
    if annotation is None:
        return ()
    mine = set(nodes)
    return tuple(
        i
        for i, r in enumerate(annotation.regions)
        if tp in r.degrees and set(r.nodes) <= mine and set(r.whole_nodes) <= mine
    )


@dataclass
class BuiltStage:
    """One of this rank's stages, ready to run.

    Attributes:
        spec: the stage's layout entry; replica / tp_rank: this rank's place in it.
        module: the module the executor calls (wrappers included; FSDP2 applied to it when sharded).
        program: what the executor needs (:class:`~distplan.lowering.executor.StageProgram`).
        names: parameter path in ``module`` -> canonical FQN of the original model.
        sharded: the FSDP2 knobs (``sharded.module is None`` when not sharded).
        recomputed: regions recomputed (1 for ``full``; attention cores for ``selective``).
        tensor_parallel: regions split over the tensor-parallel group (``None``: not tensor-parallel).
        dp_group / tp_group: this rank's process groups in the stage (``None`` when of size 1).
    """

    spec: StageSpec
    replica: int
    tp_rank: int
    module: nn.Module
    program: StageProgram
    names: dict[str, str]
    sharded: ShardedStage
    recomputed: int = 0
    tensor_parallel: tuple[int, ...] | None = None
    dp_group: Any = None
    tp_group: Any = None
    tied: set[str] = field(default_factory=set)

    def applied(self) -> dict[str, Any]:
        """What was applied to this stage on this rank (for reports and tests): its degrees and options,
        the tensor-parallel regions split, the regions recomputed, whether FSDP2 shards it."""
        return {
            "stage": self.spec.index,
            "dp": self.spec.dp,
            "tp": self.spec.tp,
            "replica": self.replica,
            "tp_rank": self.tp_rank,
            "recompute": self.spec.recompute,
            "recomputed_regions": self.recomputed,
            "shard": self.spec.shard,
            "fsdp": self.sharded.module is not None,
            "tp_regions": None if self.tensor_parallel is None else len(self.tensor_parallel),
        }

    def parameters(self) -> dict[str, nn.Parameter]:
        """This stage's parameters by canonical name (the live tensors: DTensors when split or sharded)."""
        out: dict[str, nn.Parameter] = {}
        for path, p in self.module.named_parameters(remove_duplicate=False):
            out.setdefault(self.names[path], p)
        return out


def _canonical_names(module: nn.Module, by_path: dict[str, str]) -> dict[str, str]:
    """Path in the (wrapped) ``module`` -> canonical name: the longest dotted suffix of the path that is a
    path of the captured stage (wrappers only add leading components)."""
    out: dict[str, str] = {}
    for path, _ in module.named_parameters(remove_duplicate=False):
        parts = path.split(".")
        for i in range(len(parts)):
            cand = ".".join(parts[i:])
            if cand in by_path:
                out[path] = by_path[cand]
                break
        else:
            raise LoweringError(f"parameter {path!r} of a stage module has no name in the model")
    return out


def build_stage(
    stage: StageModule,
    layout: ParallelLayout,
    rank: int,
    *,
    names: dict[str, str],
    tied: set[str],
    mesh: Any,
    device: torch.device,
    annotation: Any,
) -> BuiltStage:
    """Tensor parallelism, recomputation and sharding for one of this rank's stages (in place on
    ``stage.module``, whose parameters already hold this rank's values on ``device``).

    Args:
        stage: the split stage (captured at the chunk shape).
        layout: the plan's layout; ``rank`` this process's plan rank.
        names: parameter path in ``stage.module`` -> canonical FQN.
        tied: canonical names of parameters several stages hold (left out of FSDP2).
        mesh: the stage's ``(dp, tp)`` DeviceMesh (``None`` when the stage has one rank).
        device: where the stage computes.
        annotation: the graph's ``TensorParallelAnnotation`` (needed when ``tp > 1``).

    Raises:
        LoweringError: the stage has no example values for its inputs or outputs, or the annotation does not
            fit the stage module.
    """
    spec = layout.stages[stage.index]
    pl = layout.placement(rank, stage.index)
    if stage.input_examples is None or stage.output_examples is None:
        raise LoweringError(
            f"stage {stage.index}: the shapes of the values crossing its cuts are unknown (no example values); "
            "the executor needs them to receive"
        )
    gm = stage.module
    context: Callable[[], Any] = contextlib.nullcontext
    tp_regions: tuple[int, ...] | None = None
    if spec.tp > 1:
        tp_regions = stage_regions(annotation, stage.nodes, spec.tp)
        if tp_regions:
            from distplan.lowering.tensor_parallel import apply_tensor_parallel

            if device.type == "cpu":
                use_sdpa_math(gm)
            apply_tensor_parallel(gm, annotation, mesh["tp"], regions=tp_regions)
            context = dtensor_context
    recomputed_module, recomputed = apply_recompute(gm, spec.recompute)
    module: nn.Module = recomputed_module
    if tp_regions:
        module = TensorParallelStage(module, mesh["tp"])
    by_path = dict(names)
    name_of = _canonical_names(module, by_path)
    ignored = {p for path, p in module.named_parameters(remove_duplicate=False) if name_of[path] in tied}
    sharded = apply_sharding(
        module,
        spec.shard,
        dp_mesh=mesh["dp"] if mesh is not None else None,
        dp=spec.dp,
        ignored=ignored,
        microbatches=layout.num_microbatches,
    )
    name_of = _canonical_names(module, by_path)

    def run(*xs: Any) -> Any:
        with context():
            return module(*xs)

    def before_backward(last_chunk: bool) -> None:
        sharded.before_backward(last_chunk)

    program = StageProgram(
        index=stage.index,
        module=run,
        inputs=tuple((tuple(t.shape), t.dtype) for t in stage.input_examples),
        outputs=tuple((tuple(t.shape), t.dtype) for t in stage.output_examples),
        before_backward=before_backward,
        context=context,
    )
    return BuiltStage(
        spec=spec,
        replica=pl.replica,
        tp_rank=pl.tp_rank,
        module=module,
        program=program,
        names=name_of,
        sharded=sharded,
        recomputed=recomputed,
        tensor_parallel=tp_regions,
        tied={n for n in name_of.values() if n in tied},
    )


def whole_gradient(p: torch.Tensor) -> torch.Tensor:
    """``p.grad`` made whole (zeros when it has none); a collective over the parameter's mesh."""
    g = p.grad if p.grad is not None else torch.zeros_like(p)
    return full_tensor(g)
