"""A plan: how a traced model is split into pipeline stages and placed on a cluster's devices.

The planner (``distplan.planner``) decides it; the lowering (``distplan.lowering``) applies it. Both sides
and the service exchange it as JSON (``to_dict``/``from_dict``, with ``schema_version``). A plan records the
request it answers (:class:`~distplan.request.PlanRequest`) and the graph it was made for
(:class:`~distplan.request.GraphRef`).

[Note: stages and replicas]
Each stage has its own device kind, data-parallel degree ``dp`` and tensor-parallel degree ``tp``; its
``devices`` are ``dp * tp`` devices of that kind, replica-major: ``devices[r * tp + t]`` runs tensor-parallel
rank ``t`` of replica ``r``. The plan's ``microbatch_size`` is the number of samples in one microbatch
over all replicas of a stage; replica ``r`` of stage ``s`` takes rows ``[r * b_s, (r + 1) * b_s)`` of every
microbatch, ``b_s = microbatch_size / dp_s`` (:meth:`Plan.replica_microbatch`). Between two stages of
different ``dp`` the microbatch is re-partitioned. ``global_batch = num_microbatches * microbatch_size``.
A stage also says whether it recomputes activations (:data:`RECOMPUTE`) and how it shards state over its
replicas (:data:`SHARD`).

[Note: rank order]
Ranks are numbered host-major: the used devices sorted by (host index, local index) get ranks 0..W-1. This
is the order ``torchrun --nnodes H --node-rank h --nproc-per-node n`` gives, so one launcher line per host
works. A rank's stage, replica and tensor-parallel rank come from the rank map (:meth:`Plan.ranks`).

[Note: compact layout]
``Plan.layout`` is a short text form that parses back with :func:`parse_layout`::

    1f1b m8x4 | 0:812@0,1 | 812:1603@8,9,10,11 tp2 rc=full sh=optimizer

schedule, ``m<microbatches>x<microbatch size>`` (over all replicas of a stage), then each stage as ``start:end@device,device,...``
(global device indices, replica-major) followed by its options where they are not the default: ``tp<n>``
(``dp`` is the device count over ``tp``), ``rc=<recompute>``, ``sh=<shard>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from distplan._serde import (
    canonical_hash,
    get_float,
    get_int,
    get_list,
    get_map,
    get_str,
    load_json,
    read_json_file,
)
from distplan.cluster import Cluster
from distplan.errors import PlanError
from distplan.request import (
    DTYPES,
    MATMUL_PRECISIONS,
    OPTIMIZERS,
    RECOMPUTE,
    SHARD,
    GraphRef,
    PlanRequest,
    check_precision,
)
from distplan.units import format_bytes

__all__ = [
    "DTYPES",
    "MATMUL_PRECISIONS",
    "OPTIMIZERS",
    "PLAN_SCHEMA_VERSION",
    "RECOMPUTE",
    "SCHEDULES",
    "SHARD",
    "GraphRef",
    "Layout",
    "LayoutStage",
    "Plan",
    "PlanRequest",
    "Predictions",
    "RankAssignment",
    "SolverReport",
    "Stage",
    "StageMemory",
    "build_rank_map",
    "check_precision",
    "parse_layout",
]

PLAN_SCHEMA_VERSION = 2
Schedule = Literal["gpipe", "1f1b", "interleaved-1f1b"]
SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved-1f1b")
_E = PlanError


def _recompute(v: Any, path: str) -> str:
    # Schema 1 stored a flag: on meant the whole stage's forward was recomputed.
    if isinstance(v, bool):
        return "full" if v else "none"
    if not isinstance(v, str):
        raise _E(f"{path}.recompute: expected one of {', '.join(RECOMPUTE)}, got {v!r}")
    return v


@dataclass(frozen=True, slots=True)
class StageMemory:
    """Predicted peak memory of one device of a stage, by what holds it (bytes), and what recomputation and
    sharding removed from it (see ``distplan.planner.cost`` for the formulas and their sources).

    Attributes:
        parameters: weights (the low-precision copies under mixed precision; under sharding, the gathered
            weights plus this device's shard).
        gradients: gradients.
        optimizer: optimizer state (under mixed precision with the fp32 master weights); ``1 / dp`` of it
            under sharding.
        activations: what the schedule's in-flight microbatches keep for the backward, and what
            recomputation holds while it runs.
        recompute_saved: activation bytes the stage's recomputation does not keep (0 without).
        shard_saved: state bytes the stage's sharding does not keep (0 without).
    """

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    recompute_saved: int = 0
    shard_saved: int = 0

    def __post_init__(self) -> None:
        for f in ("parameters", "gradients", "optimizer", "activations", "recompute_saved", "shard_saved"):
            if getattr(self, f) < 0:
                raise _E(f"stage memory: {f} must be >= 0, got {getattr(self, f)}")

    @property
    def total(self) -> int:
        """Parameters + gradients + optimizer state + activations."""
        return self.parameters + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "recompute_saved": self.recompute_saved,
            "shard_saved": self.shard_saved,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str) -> StageMemory:
        m = get_map(d, path, _E)
        return cls(**{f: get_int(m, f, path, _E, 0, minimum=0) for f in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class Stage:
    """One pipeline stage.

    Attributes:
        index: stage number, 0-based, in pipeline order.
        start / end: the half-open range of graph node positions it covers (see ``OpGraph``).
        devices: global device indices running it, ``dp * tp`` of them, replica-major (see [Note: stages and
            replicas]).
        kind: the device kind of those devices (a stage's devices are all one kind).
        dp / tp: the stage's own data- and tensor-parallel degree.
        recompute: activation recomputation (:data:`RECOMPUTE`).
        shard: what is sharded over the stage's ``dp`` replicas (:data:`SHARD`).
        start_node / modules: the first node's name, and the module FQNs the stage covers (for humans).
        fwd_time_s / bwd_time_s: predicted time of one microbatch's forward / backward on one replica
            (recomputation included in the backward).
        send_time_s: predicted time to send one microbatch's activations to the next stage (0 for the last).
        grad_send_time_s: predicted time for the next stage to send the gradients of those activations back
            (0 for the last; differs from ``send_time_s`` where the two stages' tensor-parallel degrees
            differ, since every tensor-parallel rank receives its own copy).
        allreduce_time_s: predicted gradient all-reduce time among the replicas once per iteration.
        optimizer_time_s: predicted time of one rank's optimizer step once per iteration (0 in plans made
            before it was recorded).
        memory_bytes: predicted peak memory per device.
        param_bytes: parameter bytes the stage holds (per replica), copies of shared parameters included.
        shared_param_bytes: the part of ``param_bytes`` that other stages hold too (a tied embedding and
            output projection; see [Note: shared parameters] in ``distplan.graph``).
        tied_allreduce_time_s: predicted time to sum the gradients of those shared parameters with the other
            stages holding them, once per iteration (before the data-parallel all-reduce).
        memory: ``memory_bytes`` by what holds it, and what recomputation and sharding removed (None in
            plans made without the breakdown).
    """

    index: int
    start: int
    end: int
    devices: tuple[int, ...]
    kind: str
    dp: int = 1
    tp: int = 1
    recompute: str = "none"
    shard: str = "none"
    start_node: str = ""
    modules: tuple[str, ...] = ()
    fwd_time_s: float = 0.0
    bwd_time_s: float = 0.0
    send_time_s: float = 0.0
    allreduce_time_s: float = 0.0
    memory_bytes: int = 0
    param_bytes: int = 0
    shared_param_bytes: int = 0
    tied_allreduce_time_s: float = 0.0
    grad_send_time_s: float = 0.0
    optimizer_time_s: float = 0.0
    memory: StageMemory | None = None

    def __post_init__(self) -> None:
        p = f"stage {self.index}"
        if self.index < 0:
            raise _E(f"{p}: index must be >= 0")
        if not 0 <= self.start < self.end:
            raise _E(f"{p}: node range [{self.start}, {self.end}) is empty or negative")
        if self.dp < 1 or self.tp < 1:
            raise _E(f"{p}: dp and tp must be >= 1, got dp={self.dp}, tp={self.tp}")
        if len(self.devices) != self.dp * self.tp:
            raise _E(f"{p}: has {len(self.devices)} devices but dp*tp = {self.dp * self.tp}")
        if len(set(self.devices)) != len(self.devices):
            raise _E(f"{p}: lists a device twice: {list(self.devices)}")
        if self.recompute not in RECOMPUTE:
            raise _E(f"{p}: recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        if self.shard not in SHARD:
            raise _E(f"{p}: shard must be one of {', '.join(SHARD)}, got {self.shard!r}")
        for f in (
            "fwd_time_s",
            "bwd_time_s",
            "send_time_s",
            "grad_send_time_s",
            "optimizer_time_s",
            "allreduce_time_s",
            "tied_allreduce_time_s",
        ):
            if getattr(self, f) < 0:
                raise _E(f"{p}: {f} must be >= 0, got {getattr(self, f)}")
        if not 0 <= self.shared_param_bytes <= max(self.param_bytes, 0):
            raise _E(
                f"{p}: shared_param_bytes must be between 0 and param_bytes={self.param_bytes}, "
                f"got {self.shared_param_bytes}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "start": self.start,
            "end": self.end,
            "devices": list(self.devices),
            "kind": self.kind,
            "dp": self.dp,
            "tp": self.tp,
            "recompute": self.recompute,
            "shard": self.shard,
            "start_node": self.start_node,
            "modules": list(self.modules),
            "fwd_time_s": self.fwd_time_s,
            "bwd_time_s": self.bwd_time_s,
            "send_time_s": self.send_time_s,
            "allreduce_time_s": self.allreduce_time_s,
            "memory_bytes": self.memory_bytes,
            "param_bytes": self.param_bytes,
            "shared_param_bytes": self.shared_param_bytes,
            "tied_allreduce_time_s": self.tied_allreduce_time_s,
            "grad_send_time_s": self.grad_send_time_s,
            "optimizer_time_s": self.optimizer_time_s,
            "memory": None if self.memory is None else self.memory.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any, path: str) -> Stage:
        m = get_map(d, path, _E)
        devices = get_list(m, "devices", path, _E)
        for i, v in enumerate(devices):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _E(f"{path}.devices[{i}]: expected a device index >= 0, got {v!r}")
        modules = get_list(m, "modules", path, _E, [])
        return cls(
            index=get_int(m, "index", path, _E),
            start=get_int(m, "start", path, _E),
            end=get_int(m, "end", path, _E),
            devices=tuple(devices),
            kind=get_str(m, "kind", path, _E),
            dp=get_int(m, "dp", path, _E, 1, minimum=1),
            tp=get_int(m, "tp", path, _E, 1, minimum=1),
            recompute=_recompute(m.get("recompute", "none"), path),
            shard=get_str(m, "shard", path, _E, "none"),
            start_node=get_str(m, "start_node", path, _E, ""),
            modules=tuple(str(x) for x in modules),
            fwd_time_s=get_float(m, "fwd_time_s", path, _E, 0.0),
            bwd_time_s=get_float(m, "bwd_time_s", path, _E, 0.0),
            send_time_s=get_float(m, "send_time_s", path, _E, 0.0),
            allreduce_time_s=get_float(m, "allreduce_time_s", path, _E, 0.0),
            memory_bytes=get_int(m, "memory_bytes", path, _E, 0),
            param_bytes=get_int(m, "param_bytes", path, _E, 0),
            shared_param_bytes=get_int(m, "shared_param_bytes", path, _E, 0),
            tied_allreduce_time_s=get_float(m, "tied_allreduce_time_s", path, _E, 0.0),
            # Plans made before the two directions were priced apart sent gradients as fast as activations.
            grad_send_time_s=get_float(
                m, "grad_send_time_s", path, _E, get_float(m, "send_time_s", path, _E, 0.0)
            ),
            optimizer_time_s=get_float(m, "optimizer_time_s", path, _E, 0.0),
            memory=None
            if m.get("memory") is None
            else StageMemory.from_dict(m.get("memory"), f"{path}.memory"),
        )


@dataclass(frozen=True, slots=True)
class RankAssignment:
    """Where one rank runs and what it does (see [Note: rank order]).

    Attributes:
        rank: the global rank (host-major).
        device / host_index / host / local_rank: the device it drives, its host and its index there.
        stage / replica / tp_rank: the stage it runs, which data-parallel replica of it, and its rank in that
            replica's tensor-parallel group (0 when ``tp == 1``).
    """

    rank: int
    device: int
    host_index: int
    host: str
    local_rank: int
    stage: int
    replica: int
    tp_rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "device": self.device,
            "host_index": self.host_index,
            "host": self.host,
            "local_rank": self.local_rank,
            "stage": self.stage,
            "replica": self.replica,
            "tp_rank": self.tp_rank,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str) -> RankAssignment:
        m = get_map(d, path, _E)
        return cls(
            rank=get_int(m, "rank", path, _E),
            device=get_int(m, "device", path, _E),
            host_index=get_int(m, "host_index", path, _E),
            host=get_str(m, "host", path, _E),
            local_rank=get_int(m, "local_rank", path, _E),
            stage=get_int(m, "stage", path, _E),
            replica=get_int(m, "replica", path, _E),
            tp_rank=get_int(m, "tp_rank", path, _E, 0, minimum=0),
        )


@dataclass(frozen=True, slots=True)
class Predictions:
    """What the cost model predicts for one training iteration.

    Attributes:
        iteration_time_s / throughput_samples_s / bubble_fraction: the iteration.
        device_memory_bytes: predicted peak memory per device index.
        matmul_precision: the precision matmuls were priced at (and the lowering runs them at).
        figures: where the figures came from, per device kind and link: ``calibrated (...)`` with what was
            measured and its source, or ``datasheet`` (see ``Cluster.calibration_report``).
    """

    iteration_time_s: float = 0.0
    throughput_samples_s: float = 0.0
    bubble_fraction: float = 0.0
    device_memory_bytes: Mapping[int, int] = field(default_factory=dict)
    matmul_precision: str = ""
    figures: Mapping[str, str] = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        """Whether any figure was measured rather than taken from a datasheet."""
        return any(v != "datasheet" for v in self.figures.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "iteration_time_s": self.iteration_time_s,
            "throughput_samples_s": self.throughput_samples_s,
            "bubble_fraction": self.bubble_fraction,
            "device_memory_bytes": {str(k): v for k, v in sorted(self.device_memory_bytes.items())},
            "matmul_precision": self.matmul_precision,
            "figures": dict(self.figures),
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "plan.predictions") -> Predictions:
        m = get_map(d, path, _E)
        mem = get_map(m.get("device_memory_bytes", {}), f"{path}.device_memory_bytes", _E)
        parsed: dict[int, int] = {}
        for k, v in mem.items():
            try:
                parsed[int(k)] = int(v)
            except (TypeError, ValueError):
                raise _E(f"{path}.device_memory_bytes: bad entry {k!r}: {v!r}") from None
        return cls(
            iteration_time_s=get_float(m, "iteration_time_s", path, _E, 0.0),
            throughput_samples_s=get_float(m, "throughput_samples_s", path, _E, 0.0),
            bubble_fraction=get_float(m, "bubble_fraction", path, _E, 0.0),
            device_memory_bytes=parsed,
            matmul_precision=get_str(m, "matmul_precision", path, _E, ""),
            figures={str(k): str(v) for k, v in get_map(m.get("figures", {}), f"{path}.figures", _E).items()},
        )


@dataclass(frozen=True, slots=True)
class SolverReport:
    """How the plan was found: solver status, objective and best bound (seconds), gap, wall time."""

    solver: str = "none"
    status: str = "NOT_SOLVED"
    objective_s: float = 0.0
    bound_s: float = 0.0
    gap: float = 0.0
    seconds: float = 0.0
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "solver": self.solver,
            "status": self.status,
            "objective_s": self.objective_s,
            "bound_s": self.bound_s,
            "gap": self.gap,
            "seconds": self.seconds,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "plan.solver") -> SolverReport:
        m = get_map(d, path, _E)
        return cls(
            solver=get_str(m, "solver", path, _E, "none"),
            status=get_str(m, "status", path, _E, "NOT_SOLVED"),
            objective_s=get_float(m, "objective_s", path, _E, 0.0),
            bound_s=get_float(m, "bound_s", path, _E, 0.0),
            gap=get_float(m, "gap", path, _E, 0.0),
            seconds=get_float(m, "seconds", path, _E, 0.0),
            notes=tuple(str(x) for x in get_list(m, "notes", path, _E, [])),
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """A complete, self-contained plan (see the module docstring and its notes).

    Attributes:
        request: what was asked for.
        graph: the traced graph the plan was made for.
        stages: the pipeline stages, in order.
        num_microbatches: microbatches per iteration (``M``).
        microbatch_size: samples in one microbatch over all replicas of a stage (``b``, the "global
            microbatch"); ``M * b`` is the global batch; one replica of stage ``s`` processes
            :meth:`replica_microbatch` of them (see [Note: stages and replicas]).
        schedule: the pipeline schedule (:data:`SCHEDULES`).
        rank_map: one entry per rank (see [Note: rank order]).
        predictions / solver / baselines: what the cost model predicts, how the plan was found, and the
            baselines' predicted iteration times in seconds (None where one does not fit).
    """

    request: PlanRequest
    graph: GraphRef
    stages: tuple[Stage, ...]
    num_microbatches: int
    microbatch_size: int
    schedule: str
    rank_map: tuple[RankAssignment, ...]
    predictions: Predictions = field(default_factory=Predictions)
    solver: SolverReport = field(default_factory=SolverReport)
    baselines: Mapping[str, float | None] = field(default_factory=dict)
    schema_version: int = PLAN_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != PLAN_SCHEMA_VERSION:
            raise _E(
                f"plan schema_version {self.schema_version} is not supported (this distplan reads {PLAN_SCHEMA_VERSION})"
            )
        if self.schedule not in SCHEDULES:
            raise _E(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.stages:
            raise _E("a plan needs at least one stage")
        if self.num_microbatches < 1 or self.microbatch_size < 1:
            raise _E(
                f"num_microbatches and microbatch_size must be >= 1, got {self.num_microbatches}, "
                f"{self.microbatch_size}"
            )

    # ------------------------------------------------------------------ derived
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def world_size(self) -> int:
        return len(self.rank_map)

    @property
    def uniform_dp(self) -> bool:
        """Whether every stage has the same data-parallel degree and no tensor parallelism."""
        return all(s.dp == self.stages[0].dp and s.tp == 1 for s in self.stages)

    @property
    def dp(self) -> int:
        """The data-parallel degree of a plan whose stages share one (and have ``tp == 1``).

        Raises:
            PlanError: the stages have different degrees (use each stage's ``dp``).
        """
        if not self.uniform_dp:
            raise _E(
                "this plan's stages have their own degrees "
                f"({', '.join(f'dp{s.dp}tp{s.tp}' for s in self.stages)}); use each stage's dp and tp"
            )
        return self.stages[0].dp

    def replica_microbatch(self, stage: int) -> int:
        """Samples of each microbatch that one replica of stage ``stage`` processes (``b / dp_s``)."""
        return self.microbatch_size // self.stages[stage].dp

    @property
    def devices_used(self) -> tuple[int, ...]:
        return tuple(sorted(r.device for r in self.rank_map))

    @property
    def id(self) -> str:
        """Content address of the plan's request and graph: equal requests for one graph give equal ids."""
        return canonical_hash({"graph": self.graph.to_dict(), "request": self.request.to_dict()})

    @property
    def layout(self) -> str:
        """The compact text form (see [Note: compact layout])."""
        parts = [f"{self.schedule} m{self.num_microbatches}x{self.microbatch_size}"]
        for s in self.stages:
            text = f"{s.start}:{s.end}@{','.join(str(d) for d in s.devices)}"
            if s.tp != 1:
                text += f" tp{s.tp}"
            if s.recompute != "none":
                text += f" rc={s.recompute}"
            if s.shard != "none":
                text += f" sh={s.shard}"
            parts.append(text)
        return " | ".join(parts)

    def stage_of_rank(self, rank: int) -> RankAssignment:
        for r in self.rank_map:
            if r.rank == rank:
                return r
        raise _E(f"rank {rank} is out of range of the plan's world size {self.world_size}")

    def ranks(self, stage: int) -> tuple[tuple[int, ...], ...]:
        """``ranks(s)[replica][tp_rank]`` = the rank running that part of stage ``s``."""
        s = self.stages[stage]
        out = [[-1] * s.tp for _ in range(s.dp)]
        for r in self.rank_map:
            if r.stage == stage:
                out[r.replica][r.tp_rank] = r.rank
        return tuple(tuple(row) for row in out)

    def mesh(self) -> list[list[int]]:
        """``mesh[stage][replica] = rank`` for plans without tensor parallelism (the stages' pipeline x
        data ranks; stages may have different ``dp``). Raises :class:`PlanError` when a stage has ``tp > 1``
        (use :meth:`ranks`)."""
        if any(s.tp != 1 for s in self.stages):
            raise _E("mesh() is for plans without tensor parallelism; use ranks(stage)")
        return [[row[0] for row in self.ranks(i)] for i in range(len(self.stages))]

    # ------------------------------------------------------------------ checks
    def check(self, graph: Any | None = None, cluster: Cluster | None = None) -> None:
        """Verify the plan: stages contiguous and ordered over the whole graph, devices of the stage's kind
        and used once, ``dp * tp`` devices per stage, each ``dp`` dividing the global microbatch, batch
        arithmetic, rank map consistent, memory within capacity; when ``graph`` (an ``OpGraph``) is given,
        that the plan belongs to it and counts every copy of a shared parameter. Raises :class:`PlanError`."""
        cluster = cluster or self.request.cluster
        devices = cluster.devices()
        if graph is not None:
            if graph.structure_hash != self.graph.structure_hash:
                raise _E(
                    f"plan is for graph {self.graph.name!r} (structure {self.graph.structure_hash[:12]}) "
                    f"but was given graph {graph.name!r} (structure {graph.structure_hash[:12]})"
                )
            n = len(graph.nodes)
            if self.stages[-1].end != n:
                raise _E(f"last stage ends at node {self.stages[-1].end} but the graph has {n} nodes")
        pos = 0
        seen: dict[int, int] = {}
        for i, s in enumerate(self.stages):
            if s.index != i:
                raise _E(f"stage {i} carries index {s.index}")
            if s.start != pos:
                raise _E(f"stage {i} starts at node {s.start}, expected {pos} (stages must be contiguous)")
            pos = s.end
            if self.microbatch_size % s.dp:
                raise _E(
                    f"stage {i} has dp {s.dp}, which does not divide the global microbatch of "
                    f"{self.microbatch_size} samples (remainder {self.microbatch_size % s.dp})"
                )
            for d in s.devices:
                if not 0 <= d < len(devices):
                    raise _E(f"stage {i} uses device {d}, but the cluster has {len(devices)} devices")
                if devices[d].kind != s.kind:
                    raise _E(f"stage {i} is of kind {s.kind!r} but device {d} is a {devices[d].kind!r}")
                if d in seen and self.schedule != "interleaved-1f1b":
                    raise _E(f"device {d} is used by stages {seen[d]} and {i}")
                seen[d] = i
            if s.kind not in cluster.kinds:
                raise _E(f"stage {i} is of kind {s.kind!r}, which the cluster does not have")
            cap = cluster.kinds[s.kind].usable_memory_bytes
            if s.memory_bytes > cap:
                raise _E(
                    f"stage {i} needs {format_bytes(s.memory_bytes)} per device but a {s.kind} has "
                    f"{format_bytes(cap)} usable ({format_bytes(s.memory_bytes - cap)} short)"
                )
        if graph is not None:
            self._check_shared_params(graph)
        if self.schedule == "1f1b" and self.num_microbatches < len(self.stages):
            raise _E(
                f"1f1b needs at least as many microbatches as stages: {self.num_microbatches} microbatches, "
                f"{len(self.stages)} stages (use more microbatches, fewer stages, or gpipe)"
            )
        want = self.num_microbatches * self.microbatch_size
        if want != self.request.global_batch:
            raise _E(
                f"{self.num_microbatches} microbatches x {self.microbatch_size} samples = {want}, "
                f"but global_batch is {self.request.global_batch}"
            )
        expected = build_rank_map(cluster, [s.devices for s in self.stages], tp=[s.tp for s in self.stages])
        if tuple(self.rank_map) != expected:
            raise _E(
                "rank map does not match the stages' devices in host-major order (see [Note: rank order])"
            )

    def _check_shared_params(self, graph: Any) -> None:
        # A parameter read in several stages is held by each of them (see [Note: shared parameters] in
        # distplan.graph); a plan that does not count those copies was made without them (an older planner,
        # or a hand-edited file) and may not fit its devices.
        for sp in graph.shared_params():
            holders = [s for s in self.stages if any(s.start <= p < s.end for p in sp.positions)]
            if len(holders) < 2:
                continue
            for s in holders:
                if s.shared_param_bytes < sp.nbytes:
                    raise _E(
                        f"stage {s.index} holds a copy of {', '.join(sp.names)} ({format_bytes(sp.nbytes)}, also "
                        f"held by stages {', '.join(str(h.index) for h in holders if h is not s)}) but the plan "
                        f"counts {format_bytes(s.shared_param_bytes)} of shared parameters there; re-plan with "
                        "this distplan"
                    )

    # ------------------------------------------------------------------ serde
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "id": self.id,
            "layout": self.layout,
            "graph": self.graph.to_dict(),
            "request": self.request.to_dict(),
            "schedule": self.schedule,
            "num_microbatches": self.num_microbatches,
            "microbatch_size": self.microbatch_size,
            "stages": [s.to_dict() for s in self.stages],
            "rank_map": [r.to_dict() for r in self.rank_map],
            "predictions": self.predictions.to_dict(),
            "solver": self.solver.to_dict(),
            "baselines": dict(self.baselines),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        """Read :meth:`to_dict`'s JSON; schema 1 files (one ``dp`` for all stages, the graph inside the
        request, the microbatch per replica) are read too. Raises :class:`PlanError` naming the field."""
        m = get_map(d, "plan", _E)
        version = get_int(m, "schema_version", "plan", _E)
        if version not in (1, PLAN_SCHEMA_VERSION):
            raise _E(
                f"plan.schema_version: {version} is not supported (this distplan reads 1 and "
                f"{PLAN_SCHEMA_VERSION}); re-plan with this version"
            )
        baselines = get_map(m.get("baselines", {}), "plan.baselines", _E)
        for k, v in baselines.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise _E(f"plan.baselines.{k}: expected a number or null, got {v!r}")
        stages = tuple(
            Stage.from_dict(s, f"plan.stages[{i}]") for i, s in enumerate(get_list(m, "stages", "plan", _E))
        )
        if version == 1:
            old = get_map(m.get("request"), "plan.request", _E)
            graph = GraphRef(
                name=get_str(old, "graph_name", "plan.request", _E),
                content_hash=get_str(old, "graph_hash", "plan.request", _E),
                structure_hash=get_str(old, "structure_hash", "plan.request", _E),
                trace_batch=get_int(old, "trace_batch", "plan.request", _E, 1, minimum=1),
            )
            request = PlanRequest.from_dict(
                {
                    k: v
                    for k, v in old.items()
                    if k not in ("graph_name", "graph_hash", "structure_hash", "trace_batch")
                },
                "plan.request",
            )
            dp = stages[0].dp if stages else 1
            global_microbatch = get_int(m, "microbatch_size", "plan", _E, minimum=1) * dp
        else:
            graph = GraphRef.from_dict(m.get("graph"))
            request = PlanRequest.from_dict(m.get("request"), "plan.request")
            global_microbatch = get_int(m, "microbatch_size", "plan", _E, minimum=1)
        return cls(
            request=request,
            graph=graph,
            stages=stages,
            num_microbatches=get_int(m, "num_microbatches", "plan", _E, minimum=1),
            microbatch_size=global_microbatch,
            schedule=get_str(m, "schedule", "plan", _E),
            rank_map=tuple(
                RankAssignment.from_dict(r, f"plan.rank_map[{i}]")
                for i, r in enumerate(get_list(m, "rank_map", "plan", _E))
            ),
            predictions=Predictions.from_dict(m.get("predictions", {})),
            solver=SolverReport.from_dict(m.get("solver", {})),
            baselines={str(k): (None if v is None else float(v)) for k, v in baselines.items()},
        )

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(load_json(text, PlanError, "plan"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        data = read_json_file(p, PlanError, "plan")
        try:
            return cls.from_dict(data)
        except PlanError as e:
            raise PlanError(f"{p}: {e}") from e

    def with_baselines(self, baselines: Mapping[str, float | None]) -> Plan:
        return replace(self, baselines=dict(baselines))


def build_rank_map(
    cluster: Cluster, stage_devices: Sequence[Sequence[int]], *, tp: Sequence[int] | None = None
) -> tuple[RankAssignment, ...]:
    """Ranks for the given stages' devices, host-major (see [Note: rank order]).

    ``stage_devices[s]`` lists stage ``s``'s devices replica-major (see [Note: stages and replicas]) and
    ``tp[s]`` its tensor-parallel degree (1 for every stage when None): ``stage_devices[s][r * tp + t]`` runs
    tensor-parallel rank ``t`` of replica ``r``. Under ``interleaved-1f1b`` a device may appear in several
    stages; it gets one rank, assigned for its first stage. Raises :class:`PlanError` for a device index out
    of range or a device count that is not a multiple of the stage's ``tp``.
    """
    devices = cluster.devices()
    degrees = list(tp) if tp is not None else [1] * len(stage_devices)
    if len(degrees) != len(stage_devices):
        raise _E(f"{len(stage_devices)} stages but {len(degrees)} tensor-parallel degrees")
    owner: dict[int, tuple[int, int, int]] = {}
    for s, devs in enumerate(stage_devices):
        t_deg = degrees[s]
        if t_deg < 1 or len(devs) % t_deg:
            raise _E(f"stage {s} has {len(devs)} devices, not a multiple of its tp degree {t_deg}")
        for i, d in enumerate(devs):
            if not 0 <= d < len(devices):
                raise _E(f"stage {s} uses device {d}, but the cluster has {len(devices)} devices")
            owner.setdefault(d, (s, i // t_deg, i % t_deg))
    used = sorted(owner, key=lambda d: (devices[d].host_index, devices[d].local_index))
    local_counts: dict[int, int] = {}
    out = []
    for rank, d in enumerate(used):
        dev = devices[d]
        local = local_counts.get(dev.host_index, 0)
        local_counts[dev.host_index] = local + 1
        s, r, t = owner[d]
        out.append(RankAssignment(rank, d, dev.host_index, dev.host, local, s, r, t))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class LayoutStage:
    """One stage of a parsed layout: node positions ``[start, end)``, its devices (replica-major), its
    tensor-parallel degree, recomputation and sharding."""

    start: int
    end: int
    devices: tuple[int, ...]
    tp: int = 1
    recompute: str = "none"
    shard: str = "none"

    @property
    def dp(self) -> int:
        return len(self.devices) // self.tp


@dataclass(frozen=True, slots=True)
class Layout:
    """A parsed compact layout (see [Note: compact layout])."""

    schedule: str
    num_microbatches: int
    microbatch_size: int
    stages: tuple[LayoutStage, ...]


def parse_layout(text: str) -> Layout:
    """Parse a compact layout (see [Note: compact layout]). Raises :class:`PlanError` naming what is wrong."""
    parts = [p.strip() for p in text.split("|")]
    head = parts[0].split()
    if len(head) != 2 or not head[1].startswith("m") or "x" not in head[1]:
        raise _E(f"layout {text!r}: expected '<schedule> m<microbatches>x<size> | start:end@devices | ...'")
    schedule = head[0]
    if schedule not in SCHEDULES:
        raise _E(f"layout {text!r}: unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    try:
        m_str, b_str = head[1][1:].split("x", 1)
        m, b = int(m_str), int(b_str)
        stages = []
        for p in parts[1:]:
            words = p.split()
            if not words:
                raise ValueError("an empty stage")
            rng, devs = words[0].split("@", 1)
            a, z = rng.split(":", 1)
            opts: dict[str, Any] = {}
            for w in words[1:]:
                if w.startswith("tp") and w[2:].isdigit():
                    opts["tp"] = int(w[2:])
                elif w.startswith("rc=") and w[3:] in RECOMPUTE:
                    opts["recompute"] = w[3:]
                elif w.startswith("sh=") and w[3:] in SHARD:
                    opts["shard"] = w[3:]
                else:
                    raise ValueError(
                        f"unknown stage option {w!r} (tp<n>, rc=<{'|'.join(RECOMPUTE)}>, sh=<...>)"
                    )
            stages.append(LayoutStage(int(a), int(z), tuple(int(x) for x in devs.split(",")), **opts))
    except ValueError as e:
        raise _E(f"layout {text!r}: cannot parse ({e})") from None
    if not stages:
        raise _E(f"layout {text!r}: lists no stages")
    return Layout(schedule, m, b, tuple(stages))
