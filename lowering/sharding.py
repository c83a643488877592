"""Gradient synchronisation and sharding over a stage's data-parallel replicas (ZeRO-1/2/3, Rajbhandari et
al. 2020), with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

[Note: sharding levels]
Every level computes the same update as one device; they differ in what each replica keeps.

============================  ===========================================================================
``none``                      each replica holds parameters, gradients and optimizer state whole; after the
                              schedule's last backward the replicas *sum* their gradients in one coalesced
                              all-reduce per tensor-parallel rank (what DDP does, once per iteration: DDP's
                              per-backward hooks would fire once per microbatch and chunk).
``optimizer`` (ZeRO-1)        ``fully_shard(reshard_after_forward=False)``; gradients accumulate whole over
                              the microbatches (``set_requires_gradient_sync(False)``) and are
                              reduce-scattered once, after the last backward; each replica keeps and
                              updates ``1/dp`` of the optimizer state (and of the parameters between
                              iterations; they are all-gathered once, before the first forward).
``optimizer+gradients``       as ``optimizer``, but gradients are reduce-scattered after every microbatch's
(ZeRO-2)                      backward, so a replica never holds more than one microbatch's whole gradient
                              besides its ``1/dp`` accumulated shard.
``full`` (ZeRO-3)             ``fully_shard(reshard_after_forward=True)``: parameters are gathered before each
                              forward and each backward and freed after; gradients as ``optimizer+gradients``.
============================  ===========================================================================

Why FSDP2 for all three: it runs on the captured stage module as it is (its hooks wrap ``forward``), it
composes with tensor parallelism (a stage's 2-D ``(dp, tp)`` mesh: FSDP2 shards the tensor-parallel
``DTensor`` parameters further over ``dp``), with non-reentrant recomputation, and with the pipeline's many
forwards before a backward, on gloo and on NCCL alike. ``ZeroRedundancyOptimizer`` was tried for ZeRO-1 and
refused: it partitions whole parameters and broadcasts them from their owner, and ``c10d.broadcast_`` has
no DTensor sharding strategy, so it cannot hold the parameters of a tensor-parallel stage.

Reductions are sums (``set_force_sum_reduction_for_comms`` and a divide factor of 1; gloo also lacks the
``PREMUL_SUM`` FSDP2 uses to average): the executor already scales each chunk's loss by ``1 / (M * L)``
(see ``distplan.lowering.executor``). With ``dp == 1`` there is nothing to shard over and a stage runs as
``none``. Parameters held by several stages (tied embeddings) stay out of FSDP2 (``ignored_params``): their
gradients are summed over every rank holding them (:func:`sync_tied`), so they are not sharded at any level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distplan.errors import LoweringError

__all__ = ["ShardedStage", "apply_sharding", "coalesced_all_reduce", "full_tensor", "sync_tied"]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly ``DTensor``) tensor; a collective over its mesh when sharded."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly ``DTensor``) tensor."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class ShardedStage:
    """The FSDP2 knobs of one stage per backward (see [Note: sharding levels]).

    Args:
        module: the stage module after ``fully_shard`` (or ``None`` when the stage is not sharded).
        level: the sharding level.
        microbatches: backwards of the stage per iteration on this rank (one per microbatch).
    """

    def __init__(self, module: Any, level: str, microbatches: int) -> None:
        self.module = module
        self.level = level
        self.microbatches = microbatches
        self._backwards = 0

    def reset(self) -> None:
        """Before an iteration."""
        self._backwards = 0

    def before_backward(self, last_chunk: bool) -> None:
        """Set FSDP2's knobs before one chunk's backward (``last_chunk``: the last of its microbatch here)."""
        if self.module is None:
            return
        if last_chunk:
            self._backwards += 1
        last_of_step = last_chunk and self._backwards == self.microbatches
        # ZeRO-1 accumulates whole gradients and reduce-scatters once; ZeRO-2/3 after each microbatch.
        sync = last_of_step if self.level == "optimizer" else last_chunk
        self.module.set_requires_gradient_sync(sync)
        self.module.set_is_last_backward(last_of_step)
        # Keep parameters gathered between the microbatches of one iteration except under ZeRO-3.
        self.module.set_reshard_after_backward(self.level == "full" or last_of_step)


def apply_sharding(
    module: nn.Module, level: str, *, dp_mesh: Any, dp: int, ignored: set[nn.Parameter], microbatches: int
) -> ShardedStage:
    """Shard ``module`` over its stage's ``dp`` replicas at ``level`` (see [Note: sharding levels]).

    Args:
        module: the stage module (its parameters plain tensors or tensor-parallel ``DTensor`` s); changed in
            place by ``fully_shard``.
        level: ``none``, ``optimizer``, ``optimizer+gradients`` or ``full``.
        dp_mesh: the stage's 1-D data-parallel ``DeviceMesh`` (a slice of its ``(dp, tp)`` mesh).
        dp: the stage's data-parallel degree.
        ignored: parameters FSDP2 must leave alone (held by several stages).
        microbatches: microbatches per iteration.

    Raises:
        LoweringError: an unknown level.
    """
    if level not in ("none", "optimizer", "optimizer+gradients", "full"):
        raise LoweringError(
            f"unknown sharding level {level!r}; use none, optimizer, optimizer+gradients or full"
        )
    if level == "none" or dp == 1:
        return ShardedStage(None, level, microbatches)
    from torch.distributed.fsdp import fully_shard

    params = {p for p in module.parameters()}
    if not params - ignored:
        return ShardedStage(None, level, microbatches)
    fully_shard(
        module,
        mesh=dp_mesh,
        reshard_after_forward=level == "full",
        ignored_params=set(ignored) & params or None,
    )
    module.set_gradient_divide_factor(1.0)  # type: ignore[operator]
    module.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
    return ShardedStage(module, level, microbatches)


def match_grad_placements(params: Sequence[nn.Parameter]) -> None:
    """Give each ``DTensor`` gradient its parameter's placements (a partial gradient of a replicated
    parameter is summed over the tensor-parallel group here; see ``ParamSplit.grad_reduce``)."""
    from torch.distributed.tensor import DTensor

    for p in params:
        g = p.grad
        if isinstance(p, DTensor) and isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)


def coalesced_all_reduce(tensors: Sequence[torch.Tensor], group: Any) -> None:
    """Sum ``tensors`` over ``group`` in one all-reduce (flattened into one buffer per dtype)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def sync_tied(copies: Sequence[Sequence[nn.Parameter]], *, group: Any, contribute: bool) -> None:
    """Sum the gradients of parameters held by several stages over every copy.

    ``copies[i]`` are this rank's distinct copies of tied parameter ``i`` (one per stage holding it here,
    usually one). Each copy's gradient is made whole (a collective over its tensor-parallel group) and
    this rank's copies are added; one rank per replica (``contribute``: tensor-parallel rank 0) puts the sum
    in, the others zeros, so the all-reduce over ``group`` (every rank holding a copy; ``None`` when they
    are all on this rank) counts every replica once; each copy then keeps its part of the total.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    wholes = []
    for ps in copies:
        total: torch.Tensor | None = None
        for p in ps:
            g = full_tensor(p.grad if p.grad is not None else torch.zeros_like(p)).detach()
            total = g.clone() if total is None else total + g
        assert total is not None
        wholes.append(total if contribute or group is None else torch.zeros_like(total))
    if group is not None:
        coalesced_all_reduce(wholes, group)
    for ps, w in zip(copies, wholes, strict=True):
        for p in ps:
            if isinstance(p, DTensor):
                p.grad = distribute_tensor(w, p.device_mesh, p.placements, src_data_rank=None)
            else:
                p.grad = w.clone() if len(ps) > 1 else w
