"""A plan: how a traced model is split into pipeline stages and placed on a cluster's devices.

The planner (``distplan.planner``) decides it; the lowering (``distplan.lowering``) applies it. Both sides
and the service exchange it as JSON (``to_dict``/``from_dict``, with ``schema_version``).

[Note: rank order]
Ranks are numbered host-major: the used devices sorted by (host index, local index) get ranks 0..W-1. This
is the order ``torchrun --nnodes H --node-rank h --nproc-per-node n`` gives, so one launcher line per host
works. A rank's stage and replica come from the rank map; the lowering builds its (pipeline x data)
``DeviceMesh`` from it, ``mesh[stage][replica] = rank``.

[Note: compact layout]
``Plan.layout`` is a short text form that parses back with :func:`parse_layout`::

    1f1b m8x2 | 0:812@0,1 | 812:1603@8,9

schedule, ``m<microbatches>x<microbatch size per replica>``, then each stage as
``start:end@device,device,...`` (global device indices; one device per data-parallel replica).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from distplan._serde import (
    canonical_hash,
    get_bool,
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
from distplan.units import format_bytes

__all__ = [
    "MATMUL_PRECISIONS",
    "PLAN_SCHEMA_VERSION",
    "SCHEDULES",
    "Plan",
    "PlanRequest",
    "Predictions",
    "RankAssignment",
    "SolverReport",
    "Stage",
    "build_rank_map",
    "check_precision",
    "parse_layout",
]

PLAN_SCHEMA_VERSION = 1
Schedule = Literal["gpipe", "1f1b", "interleaved-1f1b"]
SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved-1f1b")
DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
_E = PlanError


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """What was asked for.

    Attributes:
        graph_name / graph_hash / structure_hash: the traced graph the plan is for (see ``OpGraph``).
        trace_batch: the batch size the graph was traced at (costs scale per sample from it).
        cluster: the cluster, in full (a plan is self-contained).
        global_batch: samples per training iteration, over all replicas and microbatches.
        dtype: compute dtype; ``bf16``/``fp16`` mean mixed precision with fp32 master weights.
        matmul_precision: how matrix multiplies run (``fp32`` strict, ``tf32`` on fp32 tensors, ``bf16`` /
            ``fp16`` under autocast); None for the dtype's own (fp32 -> ``fp32``, bf16 -> ``bf16``, ...).
            The cost model prices it and the lowering sets it (:attr:`precision`).
        optimizer: optimizer whose state is counted in memory.
        microbatches / schedule: fixed by the user, or ``None`` for the planner to choose.
        time_limit_s: wall-clock limit of the whole planning call, in seconds (the planner sizes its
            deterministic work well inside it; see [Note: determinism] in ``distplan.planner.search``).
    """

    graph_name: str
    graph_hash: str
    structure_hash: str
    cluster: Cluster
    global_batch: int
    trace_batch: int = 1
    dtype: str = "fp32"
    optimizer: str = "adam"
    microbatches: int | None = None
    schedule: str | None = None
    time_limit_s: float = 10.0
    matmul_precision: str | None = None

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise _E(f"global_batch must be >= 1, got {self.global_batch}")
        if self.trace_batch < 1:
            raise _E(f"trace_batch must be >= 1, got {self.trace_batch}")
        if self.dtype not in DTYPES:
            raise _E(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise _E(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.microbatches is not None and not 1 <= self.microbatches <= self.global_batch:
            raise _E(
                f"microbatches must be between 1 and global_batch={self.global_batch}, got {self.microbatches}"
            )
        if self.microbatches is not None and self.global_batch % self.microbatches:
            raise _E(
                f"global_batch {self.global_batch} is not divisible into {self.microbatches} microbatches "
                f"(remainder {self.global_batch % self.microbatches})"
            )
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise _E(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.time_limit_s > 0:
            raise _E(f"time_limit_s must be > 0, got {self.time_limit_s}")
        check_precision(self.dtype, self.matmul_precision)

    @property
    def precision(self) -> str:
        """The matmul precision the plan runs at (``matmul_precision`` or the dtype's own)."""
        return self.matmul_precision or self.dtype

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph_name": self.graph_name,
            "graph_hash": self.graph_hash,
            "structure_hash": self.structure_hash,
            "trace_batch": self.trace_batch,
            "cluster": self.cluster.to_dict(),
            "global_batch": self.global_batch,
            "dtype": self.dtype,
            "optimizer": self.optimizer,
            "microbatches": self.microbatches,
            "schedule": self.schedule,
            "time_limit_s": self.time_limit_s,
            # Written only when asked for, so plans of the dtype's own precision keep their ids.
            **({} if self.matmul_precision is None else {"matmul_precision": self.matmul_precision}),
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "plan.request") -> PlanRequest:
        m = get_map(d, path, _E)
        mb = m.get("microbatches")
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int)):
            raise _E(f"{path}.microbatches: expected an integer or null, got {mb!r}")
        sched = m.get("schedule")
        if sched is not None and not isinstance(sched, str):
            raise _E(f"{path}.schedule: expected a string or null, got {sched!r}")
        return cls(
            graph_name=get_str(m, "graph_name", path, _E),
            graph_hash=get_str(m, "graph_hash", path, _E),
            structure_hash=get_str(m, "structure_hash", path, _E),
            trace_batch=get_int(m, "trace_batch", path, _E, 1, minimum=1),
            cluster=Cluster.from_dict(m.get("cluster"), path=f"{path}.cluster"),
            global_batch=get_int(m, "global_batch", path, _E, minimum=1),
            dtype=get_str(m, "dtype", path, _E, "fp32"),
            optimizer=get_str(m, "optimizer", path, _E, "adam"),
            microbatches=mb,
            schedule=sched,
            time_limit_s=get_float(m, "time_limit_s", path, _E, 10.0, positive=True),
            matmul_precision=None
            if m.get("matmul_precision") is None
            else get_str(m, "matmul_precision", path, _E),
        )


#: Matrix-multiply precisions a plan may name (see ``PlanRequest.matmul_precision``).
MATMUL_PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")


def check_precision(dtype: str, matmul_precision: str | None) -> None:
    """Raise :class:`PlanError` unless ``matmul_precision`` can run with ``dtype``: fp32 tensors multiply in
    fp32 or TF32; bf16/fp16 mixed precision multiplies in that dtype (autocast)."""
    if matmul_precision is None:
        return
    if matmul_precision not in MATMUL_PRECISIONS:
        raise _E(f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {matmul_precision!r}")
    allowed = ("fp32", "tf32") if dtype == "fp32" else (dtype,)
    if matmul_precision not in allowed:
        raise _E(
            f"matmul_precision {matmul_precision!r} does not go with dtype {dtype!r} (it allows "
            f"{' or '.join(allowed)})"
        )


@dataclass(frozen=True, slots=True)
class Stage:
    """One pipeline stage.

    Attributes:
        index: stage number, 0-based, in pipeline order.
        start / end: the half-open range of graph node positions it covers (see ``OpGraph``).
        devices: global device indices running it, one per data-parallel replica (``len == dp * tp``).
        kind: the device kind of those devices (a stage's devices are all one kind).
        dp / tp: data- and tensor-parallel degree.
        recompute: activation recomputation on.
        start_node / modules: the first node's name, and the module FQNs the stage covers (for humans).
        fwd_time_s / bwd_time_s: predicted time of one microbatch's forward / backward on one replica.
        send_time_s: predicted time to send one microbatch's activations to the next stage (0 for the last).
        allreduce_time_s: predicted gradient all-reduce time among the replicas once per iteration.
        memory_bytes: predicted peak memory per device.
        param_bytes: parameter bytes the stage holds (per replica), copies of shared parameters included.
        shared_param_bytes: the part of ``param_bytes`` that other stages hold too (a tied embedding and
            output projection; see [Note: shared parameters] in ``distplan.graph``).
        tied_allreduce_time_s: predicted time to sum the gradients of those shared parameters with the other
            stages holding them, once per iteration (before the data-parallel all-reduce).
    """

    index: int
    start: int
    end: int
    devices: tuple[int, ...]
    kind: str
    dp: int = 1
    tp: int = 1
    recompute: bool = False
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
        for f in ("fwd_time_s", "bwd_time_s", "send_time_s", "allreduce_time_s", "tied_allreduce_time_s"):
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
            recompute=get_bool(m, "recompute", path, _E, False),
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
        )


@dataclass(frozen=True, slots=True)
class RankAssignment:
    """Where one rank runs and what it does (see [Note: rank order])."""

    rank: int
    device: int
    host_index: int
    host: str
    local_rank: int
    stage: int
    replica: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "device": self.device,
            "host_index": self.host_index,
            "host": self.host,
            "local_rank": self.local_rank,
            "stage": self.stage,
            "replica": self.replica,
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
    """A complete, self-contained plan (see module docstring)."""

    request: PlanRequest
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
                f"num_microbatches and microbatch_size must be >= 1, got {self.num_microbatches}, {self.microbatch_size}"
            )

    # ------------------------------------------------------------------ derived
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def world_size(self) -> int:
        return len(self.rank_map)

    @property
    def dp(self) -> int:
        """The data-parallel degree shared by all stages (see ``check``)."""
        return self.stages[0].dp

    @property
    def devices_used(self) -> tuple[int, ...]:
        return tuple(sorted(r.device for r in self.rank_map))

    @property
    def id(self) -> str:
        """Content address of the plan's request: equal requests give equal ids."""
        return canonical_hash(self.request.to_dict())

    @property
    def layout(self) -> str:
        """The compact text form (see [Note: compact layout])."""
        parts = [f"{self.schedule} m{self.num_microbatches}x{self.microbatch_size}"]
        for s in self.stages:
            parts.append(f"{s.start}:{s.end}@{','.join(str(d) for d in s.devices)}")
        return " | ".join(parts)

    def stage_of_rank(self, rank: int) -> RankAssignment:
        for r in self.rank_map:
            if r.rank == rank:
                return r
        raise _E(f"rank {rank} is out of range of the plan's world size {self.world_size}")

    def mesh(self) -> list[list[int]]:
        """``mesh[stage][replica] = rank`` for the stages' pipeline x data DeviceMesh."""
        out = [[-1] * s.dp for s in self.stages]
        for r in self.rank_map:
            out[r.stage][r.replica] = r.rank
        return out

    # ------------------------------------------------------------------ checks
    def check(self, graph: Any | None = None, cluster: Cluster | None = None) -> None:
        """Verify the plan: stages contiguous and ordered over the whole graph, every device used once,
        one data-parallel degree, batch arithmetic, rank map consistent, memory within capacity; when
        ``graph`` (an ``OpGraph``) is given, that the plan belongs to it. Raises :class:`PlanError`."""
        cluster = cluster or self.request.cluster
        devices = cluster.devices()
        if graph is not None:
            if graph.structure_hash != self.request.structure_hash:
                raise _E(
                    f"plan is for graph {self.request.graph_name!r} (structure {self.request.structure_hash[:12]}) "
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
            if s.dp != self.dp:
                raise _E(
                    f"stage {i} has dp={s.dp} but stage 0 has dp={self.dp}; all stages share one dp degree"
                )
            for d in s.devices:
                if not 0 <= d < len(devices):
                    raise _E(f"stage {i} uses device {d}, but the cluster has {len(devices)} devices")
                if devices[d].kind != s.kind:
                    raise _E(f"stage {i} is of kind {s.kind!r} but device {d} is a {devices[d].kind!r}")
                if d in seen and self.schedule != "interleaved-1f1b":
                    raise _E(f"device {d} is used by stages {seen[d]} and {i}")
                seen[d] = i
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
        want = self.num_microbatches * self.microbatch_size * self.dp
        if want != self.request.global_batch:
            raise _E(
                f"{self.num_microbatches} microbatches x {self.microbatch_size} samples x dp {self.dp} = {want}, "
                f"but global_batch is {self.request.global_batch}"
            )
        expected = build_rank_map(cluster, [s.devices for s in self.stages])
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
        m = get_map(d, "plan", _E)
        version = get_int(m, "schema_version", "plan", _E)
        if version != PLAN_SCHEMA_VERSION:
            raise _E(
                f"plan.schema_version: {version} is not supported (this distplan reads {PLAN_SCHEMA_VERSION}); "
                "re-plan with this version"
            )
        baselines = get_map(m.get("baselines", {}), "plan.baselines", _E)
        for k, v in baselines.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise _E(f"plan.baselines.{k}: expected a number or null, got {v!r}")
        return cls(
            request=PlanRequest.from_dict(m.get("request")),
            stages=tuple(
                Stage.from_dict(s, f"plan.stages[{i}]")
                for i, s in enumerate(get_list(m, "stages", "plan", _E))
            ),
            num_microbatches=get_int(m, "num_microbatches", "plan", _E, minimum=1),
            microbatch_size=get_int(m, "microbatch_size", "plan", _E, minimum=1),
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


def build_rank_map(cluster: Cluster, stage_devices: Sequence[Sequence[int]]) -> tuple[RankAssignment, ...]:
    """Ranks for the given stages' devices, host-major (see [Note: rank order]).

    ``stage_devices[s][r]`` is the device of replica ``r`` of stage ``s``. Under ``interleaved-1f1b`` a
    device may appear in several stages; it gets one rank, assigned for its first stage.
    """
    devices = cluster.devices()
    owner: dict[int, tuple[int, int]] = {}
    for s, devs in enumerate(stage_devices):
        for r, d in enumerate(devs):
            if not 0 <= d < len(devices):
                raise _E(f"stage {s} uses device {d}, but the cluster has {len(devices)} devices")
            owner.setdefault(d, (s, r))
    used = sorted(owner, key=lambda d: (devices[d].host_index, devices[d].local_index))
    local_counts: dict[int, int] = {}
    out = []
    for rank, d in enumerate(used):
        dev = devices[d]
        local = local_counts.get(dev.host_index, 0)
        local_counts[dev.host_index] = local + 1
        s, r = owner[d]
        out.append(RankAssignment(rank, d, dev.host_index, dev.host, local, s, r))
    return tuple(out)


def parse_layout(text: str) -> tuple[str, int, int, list[tuple[int, int, tuple[int, ...]]]]:
    """Parse a compact layout (see [Note: compact layout]) into
    ``(schedule, num_microbatches, microbatch_size, [(start, end, devices), ...])``."""
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
            rng, devs = p.split("@", 1)
            a, z = rng.split(":", 1)
            stages.append((int(a), int(z), tuple(int(x) for x in devs.split(","))))
    except ValueError as e:
        raise _E(f"layout {text!r}: cannot parse ({e})") from None
    if not stages:
        raise _E(f"layout {text!r}: lists no stages")
    return schedule, m, b, stages
