"""Run a plan inside a ``torchrun`` process: :func:`lower` builds this rank's stages and returns a
:class:`Runner` whose :meth:`Runner.step` trains one global batch.

[Note: process groups]
Ranks come from the plan's rank map (host-major, see [Note: rank order] in ``distplan.plan``). For every
data-parallel replica ``r`` the *pipeline group* holds the ranks running the stages of replica ``r``, in
pipeline order: group rank ``p`` runs stage ``p`` (and, under interleaved 1F1B, stages ``p + P``,
``p + 2P``, ...). ``torch.distributed.pipelining`` finds a stage's neighbours by group rank, but
``new_group`` sorts its ranks, and host-major rank order need not be pipeline order (a plan may put stage 0
on the second host), so the pipeline groups are made unsorted (``_new_group_with_tag(sort_ranks=False)``).
The data-parallel groups are the ``dp`` dimension of a ``DeviceMesh`` of shape ``(pipeline position,
replica)`` built from the same map; after the schedule's last backward, each rank averages its gradients
over its data-parallel group in one coalesced all-reduce (what DDP does, but once per iteration instead of
per microbatch, and without DDP's hooks, which pipelining's per-microbatch backward would fire each time). Parameters shared by several stages (tied embeddings) get one more group
per replica: the ranks holding a copy, which sum their gradients (Megatron's embedding group).

[Note: rank translation]
The plan's ranks are host-major. A static rendezvous (``--node-rank``) gives exactly those ranks, but a
``c10d`` rendezvous numbers the hosts in the order they join. So the launcher tells each process its host
(``--host-index``), the process derives its plan rank from (host, ``LOCAL_RANK``), and all processes gather
the table plan rank -> torch rank once; every group is built from translated ranks.

[Note: batch slicing]
:meth:`Runner.step` takes the *global* batch (``plan.request.global_batch`` samples, the same on every rank,
as a single-device run would see it) and replica ``r`` keeps samples ``[r * L, (r + 1) * L)`` with
``L = num_microbatches * microbatch_size``; it also accepts just those ``L`` samples. The schedule splits
them into ``num_microbatches`` microbatches along dimension 0. The loss is a mean per microbatch, the
schedule divides gradients by the number of microbatches and the replicas average theirs, so loss and
gradients equal those of the single-device model on the concatenated global batch.
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
from distplan.lowering.init import tensor_slots
from distplan.lowering.materialize import materialize
from distplan.lowering.split import StageModule, split_graph
from distplan.lowering.timing import RegionClock, StepTimes, step_times, timed_p2p_waits, timed_stage_class
from distplan.plan import Plan

if TYPE_CHECKING:
    from distplan.lowering.checkpoint import CheckpointInfo

__all__ = ["RankInfo", "Runner", "lower", "plan_layout"]


@dataclass(frozen=True, slots=True)
class PlanLayout:
    """Where each stage replica runs, derived from the plan (see [Note: process groups]).

    Attributes:
        stage_ranks: ``stage_ranks[stage][replica] = rank``.
        positions: ``P``, the pipeline length in ranks (``== num_stages`` unless interleaved).
        pipeline_ranks: ``pipeline_ranks[replica][p]`` = the rank at pipeline position ``p``.
    """

    stage_ranks: tuple[tuple[int, ...], ...]
    positions: int
    pipeline_ranks: tuple[tuple[int, ...], ...]

    @property
    def dp(self) -> int:
        return len(self.pipeline_ranks)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s, reps in enumerate(self.stage_ranks) if rank in reps)

    def replica_of(self, rank: int) -> int:
        for r, ranks in enumerate(self.pipeline_ranks):
            if rank in ranks:
                return r
        raise LoweringError(f"rank {rank} runs no stage of the plan")


def plan_layout(plan: Plan) -> PlanLayout:
    """Derive the stage -> rank layout from the plan's rank map; raise :class:`LoweringError` if the
    torch schedules cannot run it."""
    if plan.schedule == "1f1b" and plan.num_microbatches < plan.num_stages:
        raise LoweringError(
            f"1F1B needs at least as many microbatches as stages (torch.distributed.pipelining's Schedule1F1B), "
            f"but the plan has {plan.num_microbatches} microbatches for {plan.num_stages} stages "
            f"({plan.num_stages - plan.num_microbatches} short); re-plan with --microbatches >= "
            f"{plan.num_stages} or the gpipe schedule"
        )
    rank_of_device = {r.device: r.rank for r in plan.rank_map}
    stage_ranks = []
    for s in plan.stages:
        if s.tp != 1:
            raise LoweringError(
                f"stage {s.index} has tensor-parallel degree {s.tp}; lowering supports tp=1 only"
            )
        try:
            stage_ranks.append(tuple(rank_of_device[d] for d in s.devices))
        except KeyError as e:
            raise LoweringError(
                f"stage {s.index} uses device {e.args[0]}, which has no rank in the plan's rank map"
            ) from None
    dp = len(stage_ranks[0])
    if any(len(r) != dp for r in stage_ranks):
        raise LoweringError(
            f"all stages must have the same data-parallel degree; got {[len(r) for r in stage_ranks]}"
        )
    first = [reps[0] for reps in stage_ranks]
    positions = len(dict.fromkeys(first))
    if plan.schedule != "interleaved-1f1b" and positions != len(stage_ranks):
        raise LoweringError(
            f"schedule {plan.schedule!r} needs one rank per stage but stages share ranks: {first}"
        )
    if len(stage_ranks) % positions:
        raise LoweringError(
            f"interleaved 1F1B needs the {len(stage_ranks)} stages to be a multiple of the {positions} pipeline ranks"
        )
    for si, reps in enumerate(stage_ranks):
        for r, rank in enumerate(reps):
            if rank != stage_ranks[si % positions][r]:
                raise LoweringError(
                    f"stage {si} (replica {r}) runs on rank {rank}, but interleaved 1F1B places stage {si} on the "
                    f"rank of stage {si % positions} (rank {stage_ranks[si % positions][r]}): stages must loop "
                    f"over the pipeline ranks in order"
                )
    pipeline_ranks = tuple(tuple(stage_ranks[p][r] for p in range(positions)) for r in range(dp))
    return PlanLayout(tuple(stage_ranks), positions, pipeline_ranks)


@dataclass(frozen=True, slots=True)
class RankInfo:
    """What this process does.

    Attributes:
        rank / world_size / local_rank: from the launcher.
        stages: the stage indices this rank runs (one, or several under interleaved 1F1B).
        replica: the data-parallel replica it belongs to.
        pipeline_ranks: the ranks of its pipeline, in pipeline order.
        dp_ranks: the ranks holding the same stages in the other replicas (itself included).
        device: the torch device it computes on; backend: ``gloo`` or ``nccl``.
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
        schedule: Any,
        captured: CapturedModel,
        source: ModelSource,
        canonical: dict[int, str],
        optimizer: torch.optim.Optimizer | None,
        dp_group: Any,
        tied_groups: list[tuple[Any, list[str]]],
        mesh: Any,
        clock: RegionClock | None = None,
    ) -> None:
        self.plan = plan
        self.rank_info = info
        self.stages = stages
        self.schedule = schedule
        self.captured = captured
        self.source = source
        self.optimizer = optimizer
        self.mesh = mesh
        self._canonical = canonical
        self._dp_group = dp_group
        self._tied_groups = tied_groups
        self._local_batch = plan.num_microbatches * plan.microbatch_size
        self._device = torch.device(info.device)
        self._buffer_names = {id(b): n for n, b in source.module.named_buffers()}
        self._clock = clock or RegionClock(self._device)
        self._p2p_seen = False

    # ------------------------------------------------------------------ parameters
    def stage_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters by their FQN in the original model (tied weights under their first name)."""
        out: dict[str, nn.Parameter] = {}
        for st in self.stages:
            for p in st.module.parameters():
                out.setdefault(self._canonical[id(p)], p)
        return out

    def stage_buffers(self) -> dict[str, torch.Tensor]:
        """This rank's buffers (running statistics, counters, ...) by their FQN in the original model."""
        out: dict[str, torch.Tensor] = {}
        for st in self.stages:
            for b in st.module.buffers():
                name = self._buffer_names.get(id(b))
                if name is not None:
                    out.setdefault(name, b)
        return out

    def gradients(self) -> dict[str, torch.Tensor]:
        """The gradients of :meth:`stage_parameters` after :meth:`step` (zeros where a parameter got none)."""
        return {
            k: (p.grad if p.grad is not None else torch.zeros_like(p))
            for k, p in self.stage_parameters().items()
        }

    # ------------------------------------------------------------------ training
    def zero_grad(self) -> None:
        for p in self.stage_parameters().values():
            p.grad = None

    def _local(self, x: Any, what: str) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        n = x.shape[0] if x.dim() else 0
        if n == self._local_batch:
            return x.to(self._device)
        if n == self.plan.request.global_batch:
            r = self.rank_info.replica
            return x[r * self._local_batch : (r + 1) * self._local_batch].to(self._device)
        raise LoweringError(
            f"{what} has {n} samples along dimension 0; expected the global batch ({self.plan.request.global_batch}) "
            f"or this replica's share ({self._local_batch} = {self.plan.num_microbatches} microbatches x "
            f"{self.plan.microbatch_size})"
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
        last = self.plan.num_stages - 1
        holds_last = last in self.rank_info.stages
        args: list[torch.Tensor] = []
        if self.rank_info.is_first:
            if inputs is None:
                raise LoweringError(f"rank {self.rank_info.rank} runs stage 0 and needs the inputs")
            tup = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            args = self.captured.flatten(tuple(tup), self._call_kwargs(kwargs))
            args = [
                self._local(a, f"input {name!r}") if batched else _to(a, self._device)
                for a, name, batched in zip(
                    args, self.captured.input_names, self.captured.batched, strict=True
                )
            ]
        kw: dict[str, Any] = {}
        losses: list[torch.Tensor] = []
        if holds_last:
            if targets is None:
                raise LoweringError(f"rank {self.rank_info.rank} runs the last stage and needs the targets")
            kw = {"target": self._local(targets, "the target"), "losses": losses}
        with timed_p2p_waits(self._clock) as self._p2p_seen:
            self.schedule.step(*args, **kw)
        with self._clock.region("allreduce"):
            self._sync_gradients()
        if not holds_last:
            return None
        loss = torch.stack([x.detach().float() for x in losses]).mean()
        if self.rank_info.world_size > 1 and len(self.rank_info.dp_ranks) > 1:
            dist.all_reduce(loss, group=self._dp_group)
            loss /= len(self.rank_info.dp_ranks)
        return float(loss.item())

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

    def _sync_gradients(self) -> None:
        params = self.stage_parameters()
        for p in params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # Tied copies first: each copy then holds the full gradient, and the dp average keeps it so.
        for group, names in self._tied_groups:
            _all_reduce_coalesced([params[n].grad for n in names], group)  # type: ignore[misc]
        dp = len(self.rank_info.dp_ranks)
        if dp > 1:
            grads = [p.grad for p in params.values()]
            _all_reduce_coalesced(grads, self._dp_group)  # type: ignore[arg-type]
            for g in grads:
                g.div_(dp)  # type: ignore[union-attr]

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


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _all_reduce_coalesced(tensors: Sequence[torch.Tensor], group: Any) -> None:
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


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
            ``plan.request.structure_hash`` and the node names; ``check_graph=False`` skips that.
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
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=torch_rank, world_size=world, timeout=timeout)
    tr = _rank_translation(rank, world, dev)

    # ---- the model, captured at one microbatch
    mb = plan.microbatch_size
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
    replica = layout.replica_of(rank)
    pp_group = None
    for r, ranks in enumerate(layout.pipeline_ranks):
        g = dist.distributed_c10d._new_group_with_tag(
            [tr[x] for x in ranks], timeout=timeout, sort_ranks=False
        )
        if r == replica:
            pp_group = g
    from torch.distributed.device_mesh import DeviceMesh

    mesh_ranks = torch.tensor(
        [[tr[layout.pipeline_ranks[r][p]] for r in range(layout.dp)] for p in range(layout.positions)]
    )
    mesh = DeviceMesh(dev.type, mesh_ranks, mesh_dim_names=("pp", "dp"))
    dp_group = mesh.get_group("dp")
    dp_ranks = tuple(layout.stage_ranks[my_stages[0]])
    tied_sets: dict[tuple[int, ...], list[str]] = {}
    for name in sorted(holders):
        stages_holding = holders[name]
        if len(stages_holding) < 2:
            continue
        for r in range(layout.dp):
            ranks_r = tuple(sorted({layout.stage_ranks[s][r] for s in stages_holding}))
            if len(ranks_r) > 1:
                tied_sets.setdefault(ranks_r, []).append(name)
    tied_groups: list[tuple[Any, list[str]]] = []
    for ranks_r, names in sorted(tied_sets.items()):
        g = dist.new_group(sorted(tr[x] for x in ranks_r), timeout=timeout)
        if rank in ranks_r:
            tied_groups.append((g, names))

    # ---- this rank's stages, timed per microbatch (see [Note: how regions are timed] in lowering.timing)
    stage_cls = timed_stage_class()
    clock = RegionClock(dev)
    mine = [all_stages[s] for s in my_stages]
    pstages = []
    for st in mine:
        st.module.to(dev)
        static: dict[str, Any] = {}
        if st.input_examples is not None and st.output_examples is not None:
            static = {"input_args": st.input_examples, "output_args": st.output_examples}
        ps = stage_cls(st.module, st.index, plan.num_stages, dev, group=pp_group, **static)
        ps.clock = clock
        pstages.append(ps)
    if layout.dp > 1:
        # Replicas start from replica 0's weights, as DDP does.
        src = tr[layout.stage_ranks[my_stages[0]][0]]
        for st in mine:
            for t in list(st.module.parameters()) + list(st.module.buffers()):
                dist.broadcast(t.data, src=src, group=dp_group)
    loss_fn = source.loss

    def timed_loss(*a: Any, **k: Any) -> torch.Tensor:
        with clock.region("loss"):
            return loss_fn(*a, **k)

    schedule = _make_schedule(plan, pstages, timed_loss, batched=captured.batched)

    params = list(dict.fromkeys(p for st in mine for p in st.module.parameters()))
    name = None if callable(optimizer) else (optimizer or plan.request.optimizer)
    if name is not None and name not in ("sgd", "adam", "adamw"):
        raise LoweringError(f"unknown optimizer {name!r}; use sgd, adam or adamw, or pass a factory")
    opt: torch.optim.Optimizer | None = None
    if params:  # a stage of parameter-free ops (a cut between two reshapes) has nothing to update
        opt = optimizer(params) if callable(optimizer) else _make_optimizer(str(name), params, lr)
    info = RankInfo(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        stages=my_stages,
        replica=replica,
        pipeline_ranks=layout.pipeline_ranks[replica],
        dp_ranks=dp_ranks,
        device=str(dev),
        backend=backend,
    )
    return Runner(
        plan=plan,
        info=info,
        stages=mine,
        schedule=schedule,
        captured=captured,
        source=source,
        canonical=canonical,
        optimizer=opt,
        dp_group=dp_group,
        tied_groups=tied_groups,
        mesh=mesh,
        clock=clock,
    )


def _make_schedule(
    plan: Plan, stages: list[Any], loss: Callable[..., torch.Tensor], *, batched: Sequence[bool]
) -> Any:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    from torch.distributed.pipelining.microbatch import TensorChunkSpec, _Replicate

    m = plan.num_microbatches
    # Inputs without a batch dimension reach every microbatch whole ([Note: keyword inputs]); torch's own
    # spec for "the same value for every microbatch" is _Replicate.
    spec: Any = tuple(TensorChunkSpec(0) if b else _Replicate() for b in batched)
    if plan.schedule == "gpipe":
        return ScheduleGPipe(stages[0], n_microbatches=m, loss_fn=loss, args_chunk_spec=spec)
    if plan.schedule == "1f1b":
        return Schedule1F1B(stages[0], n_microbatches=m, loss_fn=loss, args_chunk_spec=spec)
    if plan.schedule == "interleaved-1f1b":
        try:
            return ScheduleInterleaved1F1B(stages, n_microbatches=m, loss_fn=loss, args_chunk_spec=spec)
        except ValueError as e:
            raise LoweringError(f"interleaved 1F1B cannot run this plan: {e}") from e
    raise LoweringError(f"unknown schedule {plan.schedule!r}")
