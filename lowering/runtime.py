"""Run a plan inside a ``torchrun`` process: :func:`lower` builds this rank's stages and returns a
:class:`Runner` whose :meth:`Runner.step` trains one global batch.

[Note: process groups]
Ranks come from the plan's rank map (host-major, see [Note: rank order] in ``distplan.plan``); where each
stage, replica and tensor-parallel rank runs, how the microbatch is cut into chunks between stages of
different data-parallel degree and in which order each rank works is ``distplan.lowering.parallel``
([Note: chunks], [Note: schedule order]), and the schedule runs on distplan's own executor
(``distplan.lowering.executor``, [Note: why our own executor]), whose transfers use the default group.
Every stage has a ``DeviceMesh`` of shape ``(dp, tp)`` built from the same map (every rank creates every
stage's mesh, in stage order): its ``tp`` groups run the stage's tensor parallelism (``distplan.lowering.
stages``), its ``dp`` groups sum gradients or shard them (``distplan.lowering.sharding``). Parameters
several stages hold (tied embeddings) get one more group: every rank holding a copy, which sum their
gradients (Megatron's embedding group).

[Note: rank translation]
The plan's ranks are host-major. A static rendezvous (``--node-rank``) gives exactly those ranks, but a
``c10d`` rendezvous numbers the hosts in the order they join. So the launcher tells each process its host
(``--host-index``), the process derives its plan rank from (host, ``LOCAL_RANK``), and all processes gather
the table plan rank -> torch rank once; every group is built from translated ranks.

[Note: batch slicing]
:meth:`Runner.step` takes the *global* batch (``plan.request.global_batch = M * b`` samples, the same on every
rank, as a single-device run would see it): microbatch ``k`` is rows ``[k b, (k+1) b)`` and chunk ``c`` of it
rows ``[k b + c g, k b + (c+1) g)`` (see [Note: chunks]); each rank takes the chunks its replica of stage 0
computes (inputs) and of the last stage (targets). It also accepts just those rows, in that order. Every
chunk's loss is a mean over its rows, scaled by ``1 / (M L)`` before its backward, and replicas sum their
gradients, so loss and gradients equal those of the single-device model on the whole global batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from distplan.errors import LoweringError
from distplan.graph import OpGraph
from distplan.host_memory import keep_freed_memory
from distplan.lowering._model import (
    CapturedModel,
    ModelSource,
    as_meta,
    capture_model,
    check_node_names,
    check_plan_graph,
    on_meta,
    resolve_source,
)
from distplan.lowering.batching import check_kwargs
from distplan.lowering.effects import preserved_state
from distplan.lowering.executor import PipelineExecutor
from distplan.lowering.init import tensor_slots
from distplan.lowering.materialize import materialize
from distplan.lowering.parallel import ParallelLayout, layout_of
from distplan.lowering.precision import autocast_for, set_matmul_precision
from distplan.lowering.sharding import coalesced_all_reduce, full_tensor, match_grad_placements, sync_tied
from distplan.lowering.split import StageModule, split_graph
from distplan.lowering.stages import BuiltStage, build_stage
from distplan.lowering.timing import RegionClock, StepTimes, step_times
from distplan.plan import Plan

if TYPE_CHECKING:
    from distplan.lowering.checkpoint import CheckpointInfo

__all__ = ["RankInfo", "Runner", "lower", "plan_layout"]


def plan_layout(plan: Plan) -> ParallelLayout:
    """The plan's :class:`~distplan.lowering.parallel.ParallelLayout` (stages, replicas, tensor-parallel
    ranks, chunks, schedule order); raise :class:`LoweringError` for a plan the lowering cannot run."""
    if plan.schedule == "1f1b" and plan.num_microbatches < plan.num_stages:
        # The executor could run it, but Plan.check and the planner's cost model (1F1B's warm-up) assume it.
        raise LoweringError(
            f"1F1B needs at least as many microbatches as stages, but the plan has {plan.num_microbatches} "
            f"microbatches for {plan.num_stages} stages ({plan.num_stages - plan.num_microbatches} short); "
            f"re-plan with --microbatches >= {plan.num_stages} or the gpipe schedule"
        )
    if plan.schedule == "interleaved-1f1b":
        rank_of_device = {r.device: r.rank for r in plan.rank_map}
        groups = [tuple(rank_of_device.get(d, -1) for d in s.devices) for s in plan.stages]
        positions = len(dict.fromkeys(groups))
        if len(groups) % positions:
            raise LoweringError(
                f"interleaved 1F1B needs the {len(groups)} stages to be a multiple of the {positions} pipeline "
                "device groups"
            )
        for i, g in enumerate(groups):
            if g != groups[i % positions]:
                raise LoweringError(
                    f"stage {i} runs on ranks {list(g)}, but interleaved 1F1B places stage {i} on the ranks of "
                    f"stage {i % positions} ({list(groups[i % positions])}): stages must loop over the pipeline "
                    "ranks in order"
                )
    layout = layout_of(plan)
    return layout


@dataclass(frozen=True, slots=True)
class RankInfo:
    """What this process does.

    Attributes:
        rank / world_size / local_rank: from the launcher.
        stages: the stage indices this rank runs (one, or several under interleaved 1F1B).
        replica: its data-parallel replica in its (first) stage.
        pipeline_ranks: the ranks that compute this rank's first chunk, one per pipeline position.
        dp_ranks: the ranks of its (first) stage with its tensor-parallel rank, one per replica (itself
            included): its data-parallel group.
        device: the torch device it computes on; backend: ``gloo`` or ``nccl``.
        tp_rank / tp_ranks: its tensor-parallel rank and its replica's tensor-parallel group.
    """

    rank: int
    world_size: int
    local_rank: int
    stages: tuple[int, ...]
    replica: int
    pipeline_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    device: str
    backend: str
    tp_rank: int = 0
    tp_ranks: tuple[int, ...] = ()

    @property
    def is_first(self) -> bool:
        return 0 in self.stages

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "local_rank": self.local_rank,
            "stages": list(self.stages),
            "replica": self.replica,
            "pipeline_ranks": list(self.pipeline_ranks),
            "dp_ranks": list(self.dp_ranks),
            "device": self.device,
            "backend": self.backend,
            "tp_rank": self.tp_rank,
            "tp_ranks": list(self.tp_ranks),
        }


def _make_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise LoweringError(f"unknown optimizer {name!r}; use sgd, adam or adamw, or pass a factory")


class Runner:
    """This rank's part of a lowered plan (made by :func:`lower`).

    ``step(inputs, targets)`` runs one training iteration's forward and backward over all microbatches,
    synchronises gradients (data-parallel replicas and tied parameters) and returns the loss on ranks that
    run the last stage (``None`` elsewhere); ``optimizer_step()`` then applies the update; ``step_times()``
    says what that iteration took on this rank (``distplan.lowering.timing``), to set beside the plan's
    predictions.
    """

    def __init__(
        self,
        *,
        plan: Plan,
        info: RankInfo,
        stages: list[StageModule],
        built: list[BuiltStage],
        layout: ParallelLayout,
        executor: PipelineExecutor,
        captured: CapturedModel,
        source: ModelSource,
        optimizer: torch.optim.Optimizer | None,
        tied_groups: list[tuple[Any, list[str]]],
        loss_group: Any = None,
        clock: RegionClock | None = None,
    ) -> None:
        self.plan = plan
        self.rank_info = info
        self.stages = stages
        self.built = built
        self.layout = layout
        self.executor = executor
        self.captured = captured
        self.source = source
        self.optimizer = optimizer
        self._tied_groups = tied_groups
        self._loss_group = loss_group
        self._device = torch.device(info.device)
        self._buffer_names = {id(b): n for n, b in source.module.named_buffers()}
        self._clock = clock or RegionClock(self._device)
        self._p2p_seen = True

    # ------------------------------------------------------------------ parameters
    def stage_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters by their FQN in the original model (tied weights under their first name):
        the live tensors, ``DTensor`` s where tensor parallelism or sharding splits them."""
        out: dict[str, nn.Parameter] = {}
        for b in self.built:
            for k, p in b.parameters().items():
                out.setdefault(k, p)
        return out

    def applied(self) -> list[dict[str, Any]]:
        """Per stage of this rank, what the lowering applied (``BuiltStage.applied``)."""
        return [b.applied() for b in self.built]

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """:meth:`stage_parameters` made whole (a collective over each split parameter's mesh: every rank of
        a stage calls it together)."""
        return {k: full_tensor(p.detach()) for k, p in self.stage_parameters().items()}

    def stage_buffers(self) -> dict[str, torch.Tensor]:
        """This rank's buffers (running statistics, counters, ...) by their FQN in the original model."""
        out: dict[str, torch.Tensor] = {}
        for b in self.built:
            for t in b.module.buffers():
                name = self._buffer_names.get(id(t))
                if name is not None:
                    out.setdefault(name, t)
        return out

    def gradients(self) -> dict[str, torch.Tensor]:
        """The whole gradients of :meth:`stage_parameters` after :meth:`step` (zeros where a parameter got
        none); a collective for split parameters, as :meth:`full_parameters`."""
        return {
            k: full_tensor(p.grad if p.grad is not None else torch.zeros_like(p))
            for k, p in self.stage_parameters().items()
        }

    # ------------------------------------------------------------------ training
    def zero_grad(self) -> None:
        for p in self.stage_parameters().values():
            p.grad = None

    def _chunks(self, x: Any, stage: int, what: str) -> Callable[[int, int], Any]:
        """``(k, c) ->`` rows of chunk ``c`` of microbatch ``k`` of ``x``, given the global batch or the
        rows of this rank's replica of ``stage`` (see [Note: batch slicing])."""
        lay = self.layout
        g, b = lay.chunk_rows, lay.microbatch
        replica = lay.placement(self.rank_info.rank, stage).replica
        mine = lay.chunks_of(stage, replica)
        n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else 0
        local = lay.num_microbatches * len(mine) * g
        if n == self.plan.request.global_batch:
            return lambda k, c: x[k * b + c * g : k * b + (c + 1) * g].to(self._device)
        if n == local:
            per = len(mine)
            return lambda k, c: x[(k * per + c - mine.start) * g : (k * per + c - mine.start + 1) * g].to(
                self._device
            )
        raise LoweringError(
            f"{what} has {n} samples along dimension 0; expected the global batch ({self.plan.request.global_batch}) "
            f"or this rank's share of stage {stage} ({local} = {lay.num_microbatches} microbatches x {len(mine)} "
            f"chunk(s) of {g})"
        )

    def step(
        self, inputs: Any = None, targets: Any = None, kwargs: dict[str, Any] | None = None
    ) -> float | None:
        """One iteration: forward and backward of every microbatch, gradient synchronisation.

        Args:
            inputs: the positional model inputs (a tensor or a tuple, like the single-device call) of the
                global batch or of this replica's share (see [Note: batch slicing]); read on ranks running
                stage 0.
            targets: the targets, sliced the same way; read on ranks running the last stage.
            kwargs: the keyword inputs of the call, ``None`` for the example call's. Tensors with a batch
                dimension are sliced and cut into microbatches with ``inputs``; the rest reach every
                microbatch unchanged (see [Note: keyword inputs] in ``distplan.lowering.batching``).

        Returns:
            The loss averaged over microbatches and replicas on ranks running the last stage, else ``None``.

        Raises:
            LoweringError: inputs or targets missing on a rank that needs them, a batch of the wrong size, a
                keyword input with a batch dimension left out, unknown keyword names.
        """
        self._clock.reset()
        with self._clock.region("step"):
            return self._step(inputs, targets, kwargs)

    def _step(self, inputs: Any, targets: Any, kwargs: dict[str, Any] | None) -> float | None:
        self.zero_grad()
        for b in self.built:
            b.sharded.reset()
        last = self.plan.num_stages - 1
        holds_last = last in self.rank_info.stages
        stage0: Callable[[int, int], list[Any]] | None = None
        if self.rank_info.is_first:
            if inputs is None:
                raise LoweringError(f"rank {self.rank_info.rank} runs stage 0 and needs the inputs")
            tup = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            flat = self.captured.flatten(tuple(tup), self._call_kwargs(kwargs))
            parts = [
                self._chunks(a, 0, f"input {name!r}") if batched else (lambda k, c, a=a: _to(a, self._device))
                for a, name, batched in zip(
                    flat, self.captured.input_names, self.captured.batched, strict=True
                )
            ]

            def stage0(k: int, c: int) -> list[Any]:
                return [f(k, c) for f in parts]

        target_of: Callable[[int, int], Any] | None = None
        if holds_last:
            if targets is None:
                raise LoweringError(f"rank {self.rank_info.rank} runs the last stage and needs the targets")
            target_of = self._chunks(targets, last, "the target")
        losses = self.executor.run(stage0, target_of)
        total = torch.stack([x.detach().float() for x in losses]).sum() if holds_last else None
        with self._clock.region("allreduce"):
            summed = self._sync_gradients(loss=total)
        if total is None:
            return None
        if self._loss_group is not None and not summed:
            dist.all_reduce(total, group=self._loss_group)
        lay = self.layout
        return float(total.item()) / (lay.num_microbatches * lay.chunks)

    def _call_kwargs(self, kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """The keyword inputs of this step: the given ones, else the example call's when none of those
        has a batch dimension."""
        layout = self.source.layout
        assert layout is not None
        if kwargs is None:
            if layout.batched:
                raise LoweringError(
                    f"the model takes keyword input(s) {list(layout.batched)} with a batch dimension; pass them "
                    "for the batch: step(inputs, targets, kwargs={...})"
                )
            return dict(self.source.example_kwargs)
        check_kwargs(kwargs, layout)
        # The example call's order: the capture flattens keyword inputs in the order it saw them.
        return {k: kwargs[k] for k in layout.kwarg_flags}

    def _sync_gradients(self, loss: torch.Tensor | None = None) -> bool:
        """Sum gradients over each stage's replicas and over the holders of tied parameters (see [Note:
        sharding levels] in ``distplan.lowering.sharding``).

        ``loss``: this rank's summed loss (ranks of the last stage). Where the last stage's replicas sum
        their gradients in one all-reduce here, the loss rides in the same buffer (summed in place), which
        saves the collective the step would otherwise spend on it (0.7-1.4 ms a step over gloo on a
        2-core host). Returns whether it did.
        """
        summed = False
        for b in self.built:
            params = b.parameters()
            for p in params.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if b.sharded.module is not None:
                continue  # FSDP2 reduce-scattered them during the backward
            match_grad_placements(list(params.values()))
            if b.dp_group is not None:
                grads = [_local_grad(p) for k, p in params.items() if k not in b.tied]
                if loss is not None and not summed and b.dp_group is self._loss_group:
                    grads.append(loss)
                    summed = True
                coalesced_all_reduce(grads, b.dp_group)
        if self._tied_groups:
            copies: dict[str, list[nn.Parameter]] = {}
            for b in self.built:
                for k, p in b.parameters().items():
                    have = copies.setdefault(k, [])
                    if k in b.tied and all(p is not q for q in have):
                        have.append(p)
            contribute = self.rank_info.tp_rank == 0
            for group, names in self._tied_groups:
                sync_tied([copies[n] for n in names], group=group, contribute=contribute)
        return summed

    def optimizer_step(self) -> None:
        """Apply the optimizer to this rank's parameters (after :meth:`step`); nothing when it holds none."""
        if self.optimizer is not None:
            with self._clock.region("optimizer"):
                self.optimizer.step()

    def step_times(self) -> StepTimes:
        """What the last iteration took on this rank (:class:`~distplan.lowering.timing.StepTimes`): the
        forward and backward of every microbatch per stage, loss, transfer waits, all-reduces, optimizer
        and the whole iteration, :meth:`step` through :meth:`optimizer_step`. On CUDA this waits for the
        GPU to finish the iteration."""
        return step_times(
            self._clock.read(),
            rank=self.rank_info.rank,
            stages=self.rank_info.stages,
            p2p_seen=self._p2p_seen,
        )

    def train_step(
        self, inputs: Any = None, targets: Any = None, kwargs: dict[str, Any] | None = None
    ) -> float | None:
        """:meth:`step` then :meth:`optimizer_step`; returns the loss as :meth:`step` does."""
        loss = self.step(inputs, targets, kwargs)
        self.optimizer_step()
        return loss

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, *, step: int | None = None) -> None:
        """Save this rank's weights and optimizer state into the ``torch.distributed.checkpoint`` folder
        ``path``; every rank calls it (see [Note: saving and resuming] in ``distplan.lowering.checkpoint``).
        ``step``: training steps done so far, returned by :meth:`load`."""
        from distplan.lowering.checkpoint import save

        save(self, path, step=step)

    def load(self, path: str | Path) -> CheckpointInfo:
        """Resume from a folder written by :meth:`save`, under this plan even if it was saved under another
        (other stages, replicas or world size: DCP reshards by parameter name); every rank calls it.
        Returns what was saved with it (``.step``). Raises ``LoweringError`` naming the tensors this rank
        needs that the checkpoint lacks."""
        from distplan.lowering.checkpoint import load

        return load(self, path)


def _under_autocast(fn: Callable[..., Any], precision: str, device: torch.device) -> Callable[..., Any]:
    """``fn`` run under the plan's autocast (its backward follows the forward's casts, outside it)."""

    def run(*args: Any) -> Any:
        with autocast_for(precision, device):
            return fn(*args)

    return run


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _local_grad(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``p.grad`` (the local shard of a tensor-parallel ``DTensor`` gradient)."""
    from torch.distributed.tensor import DTensor

    g = p.grad
    assert g is not None
    return g._local_tensor if isinstance(g, DTensor) else g


def _env_int(name: str) -> int:
    v = os.environ.get(name)
    if v is None:
        raise LoweringError(
            f"environment variable {name} is not set: run under torchrun (or set RANK, WORLD_SIZE, LOCAL_RANK, "
            "MASTER_ADDR and MASTER_PORT)"
        )
    try:
        return int(v)
    except ValueError:
        raise LoweringError(f"environment variable {name}={v!r} is not an integer") from None


def _plan_rank(plan: Plan, torch_rank: int, local_rank: int, host_index: int | None) -> int:
    """This process's rank in the plan (see [Note: rank translation])."""
    if host_index is None:
        return torch_rank
    for r in plan.rank_map:
        if r.host_index == host_index and r.local_rank == local_rank:
            return r.rank
    hosts = sorted({r.host_index for r in plan.rank_map})
    raise LoweringError(
        f"the plan has no rank for host index {host_index}, local rank {local_rank} (hosts used: {hosts}; "
        f"ranks per host: {[sum(1 for r in plan.rank_map if r.host_index == h) for h in hosts]})"
    )


def _rank_translation(rank: int, world: int, dev: torch.device) -> list[int]:
    """``tr[plan rank] = torch rank``, gathered from every process."""
    mine = torch.tensor([rank], dtype=torch.int64, device=dev)
    got = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(got, mine)
    plan_ranks = [int(t.item()) for t in got]
    if sorted(plan_ranks) != list(range(world)):
        raise LoweringError(
            f"processes claim plan ranks {plan_ranks}; each rank of the plan must appear once"
        )
    tr = [0] * world
    for torch_rank, pr in enumerate(plan_ranks):
        tr[pr] = torch_rank
    return tr


def lower(
    plan: Plan,
    model: Any,
    *,
    example_inputs: Sequence[Any] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    seq: int | None = None,
    graph: OpGraph | None = None,
    check_graph: bool = True,
    optimizer: str | Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    lr: float = 1e-3,
    device: str | None = None,
    timeout_s: float = 300.0,
    seed: int = 0,
    eval_mode: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    checkpoint: str | Path | None = None,
    init: str = "auto",
    host_index: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    output: str | None = None,
    matmul_precision: str | None = None,
) -> Runner:
    """Build this rank's part of ``plan`` (call inside a ``torchrun`` process, once per rank).

    Args:
        plan: the plan; the launch must have ``plan.world_size`` processes.
        model: a spec string (as for ``distplan trace``; built on ``meta``), a ``ModelBundle``, or an
            ``nn.Module`` together with ``example_inputs`` (one microbatch) and ``loss_fn``. A module may be
            built on ``meta`` (``with torch.device("meta")``) or with values; either way only this rank's
            stage tensors are given values on its device (see [Note: materialisation] in
            ``distplan.lowering.materialize``). Replicas of a stage are also synchronised from replica 0.
        seq: sequence length for spec strings (the tracer's default when ``None``).
        graph: the traced ``OpGraph`` the plan was made from; when ``None`` and ``check_graph``, this rank's
            capture is annotated into one (the tracer's ``graph_from_capture``) to check
            ``plan.graph.structure_hash`` and the node names; ``check_graph=False`` skips that.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, a factory ``params -> Optimizer``, or ``None`` for the
            plan's optimizer; ``lr`` its learning rate.
        device: ``"cpu"`` or ``"cuda"``; default CUDA (NCCL) when available, else CPU (gloo).
        timeout_s: timeout of every collective and of process-group creation.
        eval_mode: capture and run the model in eval mode (no dropout), as the validation does.
        state_dict: weights by parameter name (the model's ``state_dict`` keys); each rank takes its own.
        checkpoint: pretrained weights to load by parameter name, each rank reading only its tensors: a
            Hugging Face folder (``model.safetensors`` or sharded with ``model.safetensors.index.json``) or
            a ``torch.distributed.checkpoint`` folder (see [Note: checkpoint formats] in
            ``distplan.lowering.checkpoint``). To resume training (optimizer state too), use
            :meth:`Runner.load` instead.
        init: where tensors not loaded get their values: ``"auto"`` (the module's own where it has values,
            else the reproducible initialisation of [Note: reproducible initialisation] in
            ``distplan.lowering.init``, drawn from ``seed``), ``"reproducible"`` (always that
            initialisation: the same values whatever the plan) or ``"module"`` (the module's own).
        host_index: the cluster host index this process runs on (as in the plan's rank map; also read from
            ``DISTPLAN_HOST_INDEX``); with it the plan rank is that host's rank for ``LOCAL_RANK``, whatever
            global rank the rendezvous gave (see [Note: rank translation]). Without it, ``RANK`` is the plan
            rank.
        config_overrides: config fields replaced when building a model from a spec string.
        example_kwargs: keyword inputs of a plain module's example call (one microbatch).
        output: which output the loss reads when the model returns a dict, tuple, dataclass or
            ``ModelOutput`` (see [Note: output selector] in ``distplan.lowering.outputs``); ``None`` takes
            ``logits`` or the first tensor.
        matmul_precision: run matmuls at this precision instead of the plan's (``PlanRequest.precision``;
            see ``distplan.lowering.precision``); the validation compares in ``fp32``.

    The set-up (example batches, capture, annotation) runs the model's forward with its state put back
    afterwards: ``lower`` leaves the module's buffers as it found them. ``runner.source.module`` then holds
    this rank's tensors (the very objects its stages train) and ``meta`` tensors elsewhere when the model
    was built on ``meta``.

    Returns:
        A :class:`Runner`.

    Example (in ``train.py``, launched by ``torchrun --standalone --nproc-per-node 2 train.py``)::

        plan = distplan.Plan.load("plan.json")
        runner = distplan.lower(plan, "gpt-tiny")
        batch = runner.source.sample(plan.request.global_batch, seed=step)
        loss = runner.train_step(batch.args, batch.target, batch.kwargs)
    """
    torch_rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world != plan.world_size:
        raise LoweringError(
            f"launched with {world} processes but the plan needs {plan.world_size} (one per rank)"
        )
    layout = plan_layout(plan)
    if host_index is None and os.environ.get("DISTPLAN_HOST_INDEX"):
        host_index = _env_int("DISTPLAN_HOST_INDEX")
    rank = _plan_rank(plan, torch_rank, local_rank, host_index)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
        keep_freed_memory()  # see [Note: freed memory on CPU ranks] in distplan.host_memory
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=torch_rank, world_size=world, timeout=timeout)
    tr = _rank_translation(rank, world, dev)

    # ---- the model, captured at one chunk of a microbatch (see [Note: chunks] in lowering.parallel)
    mb = layout.chunk_rows
    source = resolve_source(
        model,
        batch=mb,
        seq=seq,
        seed=seed,
        example_inputs=example_inputs,
        loss_fn=loss_fn,
        config_overrides=config_overrides,
        example_kwargs=example_kwargs,
        output=output,
        device="meta",  # a spec string: only this rank's tensors ever get memory (below)
    )
    if eval_mode:
        # Before tracing and capturing: the mode can change the graph (dropout nodes).
        source.module.eval()
    with preserved_state(source.module):  # set-up never changes the user's module
        if source.make_batch is not None:
            ex = source.sample(mb, seed=seed)
            ex_args, ex_kwargs = ex.args, ex.kwargs
        else:
            ex_args, ex_kwargs = source.example_args, source.example_kwargs
        if on_meta(source.module):
            ex_args, ex_kwargs = as_meta(ex_args), as_meta(ex_kwargs)
        captured = capture_model(source, ex_args, ex_kwargs)
        if graph is None and check_graph:
            graph = captured.graph()
        if graph is not None:
            check_plan_graph(plan, graph)
        check_node_names(plan, captured.node_names, graph)
        stage_nodes = [captured.node_names[s.start : s.end] for s in plan.stages]
        all_stages = split_graph(
            captured.gm,
            stage_nodes=stage_nodes,
            constant_inputs=captured.constant_inputs,
            example_values=captured.values(),
            output=source.output,
        )

    # ---- this rank's tensors, and only those, get values on its device (see [Note: materialisation])
    slots = tensor_slots(source.module)
    materialize(
        source.module,
        [all_stages[s].module for s in layout.stages_of(rank)],
        device=dev,
        seed=seed,
        init=init,
        checkpoint=checkpoint,
        state_dict=state_dict,
        rebuild=source.rebuild,
    )

    # ---- which parameters each stage holds, by original FQN
    canonical: dict[int, str] = {}
    for name, p in source.module.named_parameters():
        canonical.setdefault(id(p), name)
    alias = {a: sl.name for sl in slots.values() for a in sl.aliases}
    for name, p in captured.gm.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), alias.get(name, name))
    holders: dict[str, list[int]] = {}
    for st in all_stages:
        for p in st.module.parameters():
            holders.setdefault(canonical[id(p)], []).append(st.index)

    # ---- process groups (see [Note: process groups]); every rank creates every group, in the same order
    my_stages = layout.stages_of(rank)
    if not my_stages:
        raise LoweringError(f"rank {rank} runs no stage of the plan")
    from torch.distributed.device_mesh import DeviceMesh

    meshes: dict[int, Any] = {}
    for spec in layout.stages:
        grid = torch.tensor([[tr[x] for x in rep] for rep in spec.ranks], dtype=torch.int64)
        m = DeviceMesh(dev.type, grid, mesh_dim_names=("dp", "tp"))
        if spec.index in my_stages:
            meshes[spec.index] = m
    tied_sets: dict[tuple[int, ...], list[str]] = {}
    for name in sorted(holders):
        stages_holding = sorted(set(holders[name]))
        if len(stages_holding) < 2:
            continue
        ranks_all = tuple(sorted({x for s in stages_holding for x in layout.stages[s].all_ranks}))
        tied_sets.setdefault(ranks_all, []).append(name)
    tied_groups: list[tuple[Any, list[str]]] = []
    for ranks_all, names in sorted(tied_sets.items()):
        g = dist.new_group(sorted(tr[x] for x in ranks_all), timeout=timeout) if len(ranks_all) > 1 else None
        if rank in ranks_all:
            tied_groups.append((g, names))
    tied = {n for names in tied_sets.values() for n in names}

    # ---- replicas start from replica 0's weights, as DDP does (before any parameter is split)
    for s in my_stages:
        spec = layout.stages[s]
        if spec.dp > 1:
            t = layout.placement(rank, s).tp_rank
            group = meshes[s]["dp"].get_group()
            for x in list(all_stages[s].module.parameters()) + list(all_stages[s].module.buffers()):
                dist.broadcast(x.data, src=tr[spec.ranks[0][t]], group=group)

    # ---- this rank's stages: tensor parallelism, recomputation, sharding (see lowering.stages)
    annotation = None
    if any(layout.stages[s].tp > 1 for s in my_stages):
        annotation = (graph if graph is not None else captured.graph()).tensor_parallel
    mine = [all_stages[s] for s in my_stages]
    built: list[BuiltStage] = []
    for st in mine:
        st.module.to(dev)
        path_names = {
            path: canonical[id(p)] for path, p in st.module.named_parameters(remove_duplicate=False)
        }
        b = build_stage(
            st,
            layout,
            rank,
            names=path_names,
            tied=tied,
            mesh=meshes[st.index],
            device=dev,
            annotation=annotation,
        )
        if b.spec.dp > 1:
            b.dp_group = meshes[st.index]["dp"].get_group()
        if b.spec.tp > 1:
            b.tp_group = meshes[st.index]["tp"].get_group()
        built.append(b)

    # Matmuls run at the precision the plan was priced at (see distplan.lowering.precision).
    precision = matmul_precision or plan.request.precision
    set_matmul_precision(precision)
    loss = source.loss
    if precision in ("bf16", "fp16"):
        for b in built:
            b.program.module = _under_autocast(b.program.module, precision, dev)
        loss = _under_autocast(loss, precision, dev)
    clock = RegionClock(dev)
    executor = PipelineExecutor(
        layout,
        rank,
        tr,
        {b.spec.index: b.program for b in built},
        dev,
        loss,
        region=clock.region,
    )
    # NCCL makes a communicator per pair of ranks on first use, blocking both: do it in one agreed order.
    executor.warm_up_links()

    params = list(dict.fromkeys(p for b in built for p in b.parameters().values()))
    name = None if callable(optimizer) else (optimizer or plan.request.optimizer)
    if name is not None and name not in ("sgd", "adam", "adamw"):
        raise LoweringError(f"unknown optimizer {name!r}; use sgd, adam or adamw, or pass a factory")
    opt: torch.optim.Optimizer | None = None
    if params:  # a stage of parameter-free ops (a cut between two reshapes) has nothing to update
        opt = optimizer(params) if callable(optimizer) else _make_optimizer(str(name), params, lr)
    first = built[0]
    last = layout.num_stages - 1
    loss_group = None
    for b in built:
        if b.spec.index == last and b.spec.dp > 1:
            loss_group = b.dp_group
    info = RankInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        stages=my_stages,
        replica=first.replica,
        pipeline_ranks=layout.pipeline_ranks[layout.chunks_of(first.spec.index, first.replica).start],
        dp_ranks=first.spec.dp_group(first.tp_rank),
        device=str(dev),
        backend=backend,
        tp_rank=first.tp_rank,
        tp_ranks=first.spec.ranks[first.replica],
    )
    return Runner(
        plan=plan,
        info=info,
        stages=mine,
        built=built,
        layout=layout,
        executor=executor,
        captured=captured,
        source=source,
        optimizer=opt,
        tied_groups=tied_groups,
        loss_group=loss_group,
        clock=clock,
    )
