"""What a user asks the planner for: :class:`PlanRequest`, the one request every door builds.

[Note: the request spine]
Each front door builds one :class:`PlanRequest` from its own syntax and passes it, as is, to
``distplan.planner.plan(graph, request)``:

- Python: ``distplan.plan(graph, cluster=..., global_batch=...)`` builds it from keywords (or takes one);
- CLI: ``distplan plan`` builds it from its options (``distplan.planner.cli``);
- REST: ``POST /v1/plans`` builds it from the body (``distplan.service.specs``), stores ``to_dict()`` with
  the job and the worker reads it back with ``from_dict``.

The request checks itself when it is made (``__post_init__``), against the one table of accepted ranges
(:mod:`distplan.limits`), so a value is accepted or refused the same way at every door, and a request the
planner cannot plan is refused there, before anything is queued. Errors name the field by its canonical
name (``PlanError.field``); each door says it in its own syntax. The plan records the request it answers
(``Plan.request``) beside the graph it was made for (:class:`GraphRef`, ``Plan.graph``).

The plan-space options (tensor parallelism, recomputation, sharding) are fields of this object too; their
defaults search everything the lowering runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distplan._serde import get_bool, get_float, get_int, get_map, get_str
from distplan.cluster import Cluster
from distplan.errors import PlanError
from distplan.limits import REQUEST_RANGES, check_cluster_figures

__all__ = [
    "DTYPES",
    "MATMUL_PRECISIONS",
    "OPTIMIZERS",
    "PLANNER_SCHEDULES",
    "RECOMPUTE",
    "SHARD",
    "GraphRef",
    "PlanRequest",
    "as_request",
    "check_precision",
]

DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
#: Schedules the planner decides between (a plan may also be written by hand for ``interleaved-1f1b``,
#: which the lowering runs; see ``distplan.plan.SCHEDULES``).
PLANNER_SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b")
#: Matrix-multiply precisions a plan may name (see ``PlanRequest.matmul_precision``).
MATMUL_PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")
#: Activation recomputation of a stage: keep every activation; recompute the attention scores/softmax path
#: (Korthikanti et al. 2022, "selective"); keep only the stage's inputs and recompute its forward ("full").
RECOMPUTE: tuple[str, ...] = ("none", "selective", "full")
#: Sharding over a stage's data-parallel replicas: ZeRO stages 1/2/3 (Rajbhandari et al. 2020) ``optimizer``,
#: ``optimizer+gradients``, ``full`` (parameters too, FSDP).
SHARD: tuple[str, ...] = ("none", "optimizer", "optimizer+gradients", "full")
_E = PlanError


def check_precision(dtype: str, matmul_precision: str | None) -> None:
    """Raise :class:`PlanError` unless ``matmul_precision`` can run with ``dtype``: fp32 tensors multiply in
    fp32 or TF32; bf16/fp16 mixed precision multiplies in that dtype (autocast)."""
    if matmul_precision is None:
        return
    if matmul_precision not in MATMUL_PRECISIONS:
        raise _E(
            f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {matmul_precision!r}",
            field="matmul_precision",
        )
    allowed = ("fp32", "tf32") if dtype == "fp32" else (dtype,)
    if matmul_precision not in allowed:
        raise _E(
            f"matmul_precision {matmul_precision!r} does not go with dtype {dtype!r} (it allows "
            f"{' or '.join(allowed)})",
            field="matmul_precision",
        )


def _choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise _E(f"{field} must be one of {', '.join(choices)}, got {value!r}", field=field)


def _choices(field: str, value: object, choices: tuple[str, ...]) -> tuple[str, ...]:
    """``value`` (a non-empty list of ``choices``) as a tuple in the order of ``choices``."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value:
        raise _E(
            f"{field} must be a non-empty list of {', '.join(choices)}, got {value!r}",
            field=field,
        )
    for v in value:
        _choice(field, v, choices)
    return tuple(c for c in choices if c in value)


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """A plan request: the cluster, the training batch and the planner's settings (see [Note: the request
    spine]). Frozen and self-checking: an invalid request cannot be made.

    Attributes:
        cluster: the cluster, in full (a plan is self-contained).
        global_batch: samples per training iteration, over all replicas and microbatches.
        dtype: compute dtype; ``bf16``/``fp16`` mean mixed precision with fp32 master weights.
        optimizer: optimizer whose state is counted in memory (``adam``, ``adamw``: 2 fp32 states per
            parameter; ``sgd``: 1, momentum).
        microbatches: fix the microbatch count (it must divide ``global_batch``), or None for the planner.
        schedule: fix the pipeline schedule (:data:`PLANNER_SCHEDULES`), or None for the planner.
        time_limit_s: wall-clock limit of the whole planning call, in seconds (the planner sizes its
            deterministic work well inside it; see [Note: determinism] in ``distplan.planner.search``).
        workers: CP-SAT worker threads (the answer does not depend on it; see [Note: determinism]).
        matmul_precision: how matrix multiplies run (``fp32`` strict, ``tf32`` on fp32 tensors, ``bf16`` /
            ``fp16`` under autocast); None for the dtype's own. The cost model prices it and the lowering
            sets it (:attr:`precision`).
        baselines: also price the baselines (what users do by hand) and record them in the plan.
        tensor_parallel: let a stage split over a tensor-parallel group of one host (``tp > 1``) where the
            graph has splittable regions; False keeps ``tp = 1`` everywhere.
        recompute: the recomputation modes a stage may use (:data:`RECOMPUTE`; the planner chooses per stage
            among them); ``("none",)`` turns recomputation off, ``("full",)`` forces it.
        shard: the sharding levels a stage with ``dp > 1`` may use (:data:`SHARD`); a stage with one replica
            never shards. ``("none",)`` turns sharding off.

    Raises:
        PlanError: a field outside :data:`distplan.limits.REQUEST_RANGES`, an unknown choice, a microbatch
            count that does not divide the batch, a cluster figure outside
            :data:`distplan.limits.FIGURE_RANGES`; ``PlanError.field`` names the field.
    """

    cluster: Cluster
    global_batch: int
    dtype: str = "fp32"
    optimizer: str = "adam"
    microbatches: int | None = None
    schedule: str | None = None
    time_limit_s: float = 10.0
    workers: int = 2
    matmul_precision: str | None = None
    baselines: bool = True
    tensor_parallel: bool = True
    recompute: tuple[str, ...] = RECOMPUTE
    shard: tuple[str, ...] = SHARD

    def __post_init__(self) -> None:
        if not isinstance(self.cluster, Cluster):
            raise _E(f"cluster must be a Cluster, got {type(self.cluster).__name__}", field="cluster")
        REQUEST_RANGES["global_batch"].check("global_batch", self.global_batch)
        _choice("dtype", self.dtype, DTYPES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.microbatches is not None:
            REQUEST_RANGES["microbatches"].check("microbatches", self.microbatches)
            if self.microbatches > self.global_batch:
                raise _E(
                    f"microbatches {self.microbatches} is more than global_batch {self.global_batch}",
                    field="microbatches",
                )
            if self.global_batch % self.microbatches:
                raise _E(
                    f"global_batch {self.global_batch} is not divisible into {self.microbatches} microbatches "
                    f"(remainder {self.global_batch % self.microbatches})",
                    field="microbatches",
                )
        if self.schedule is not None:
            _choice("schedule", self.schedule, PLANNER_SCHEDULES)
        REQUEST_RANGES["time_limit_s"].check("time_limit_s", self.time_limit_s)
        REQUEST_RANGES["workers"].check("workers", self.workers)
        check_precision(self.dtype, self.matmul_precision)
        if not isinstance(self.baselines, bool):
            raise _E(f"baselines must be true or false, got {self.baselines!r}", field="baselines")
        if not isinstance(self.tensor_parallel, bool):
            raise _E(
                f"tensor_parallel must be true or false, got {self.tensor_parallel!r}",
                field="tensor_parallel",
            )
        # Lists from JSON or keywords become canonical tuples (frozen: set through object).
        object.__setattr__(self, "recompute", _choices("recompute", self.recompute, RECOMPUTE))
        object.__setattr__(self, "shard", _choices("shard", self.shard, SHARD))
        if self.cluster.num_devices < 1:
            raise _E(f"cluster {self.cluster.name!r} has no devices", field="cluster")
        try:
            check_cluster_figures(self.cluster, dtype=self.dtype)
        except PlanError as e:
            raise _E(str(e), field="cluster") from None

    @property
    def precision(self) -> str:
        """The matmul precision the plan runs at (``matmul_precision`` or the dtype's own)."""
        return self.matmul_precision or self.dtype

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON; :meth:`from_dict` reads it back to an equal request."""
        return {
            "cluster": self.cluster.to_dict(),
            "global_batch": self.global_batch,
            "dtype": self.dtype,
            "optimizer": self.optimizer,
            "microbatches": self.microbatches,
            "schedule": self.schedule,
            "time_limit_s": self.time_limit_s,
            "workers": self.workers,
            "matmul_precision": self.matmul_precision,
            "baselines": self.baselines,
            "tensor_parallel": self.tensor_parallel,
            "recompute": list(self.recompute),
            "shard": list(self.shard),
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "request") -> PlanRequest:
        """Read :meth:`to_dict`'s JSON (``path`` prefixes error messages). Raises :class:`PlanError`."""
        m = get_map(d, path, _E)
        for key in ("microbatches", "schedule", "matmul_precision"):
            v = m.get(key)
            want = int if key == "microbatches" else str
            if v is not None and (isinstance(v, bool) or not isinstance(v, want)):
                kind = "an integer" if want is int else "a string"
                raise _E(f"{path}.{key}: expected {kind} or null, got {v!r}", field=key)
        return cls(
            cluster=Cluster.from_dict(m.get("cluster"), path=f"{path}.cluster"),
            global_batch=get_int(m, "global_batch", path, _E),
            dtype=get_str(m, "dtype", path, _E, "fp32"),
            optimizer=get_str(m, "optimizer", path, _E, "adam"),
            microbatches=m.get("microbatches"),
            schedule=m.get("schedule"),
            time_limit_s=get_float(m, "time_limit_s", path, _E, 10.0),
            workers=get_int(m, "workers", path, _E, 2),
            matmul_precision=m.get("matmul_precision"),
            baselines=get_bool(m, "baselines", path, _E, True),
            tensor_parallel=get_bool(m, "tensor_parallel", path, _E, True),
            # (PlanRequest checks these lists and names the field.)
            recompute=m.get("recompute", RECOMPUTE),
            shard=m.get("shard", SHARD),
        )


@dataclass(frozen=True, slots=True)
class GraphRef:
    """The traced graph a plan was made for (see ``OpGraph``): enough to check that a plan belongs to a
    model without holding the graph.

    Attributes:
        name: the graph's name.
        content_hash / structure_hash: ``OpGraph.content_hash`` (every figure) and ``structure_hash`` (the
            nodes and their wiring: what the lowering re-traces and compares).
        trace_batch: the batch size the graph was traced at (costs scale per sample from it).
    """

    name: str
    content_hash: str
    structure_hash: str
    trace_batch: int = 1

    def __post_init__(self) -> None:
        if self.trace_batch < 1:
            raise _E(f"graph trace_batch must be >= 1, got {self.trace_batch}")

    @classmethod
    def of(cls, graph: Any) -> GraphRef:
        """The reference of an ``OpGraph``."""
        return cls(
            name=graph.name,
            content_hash=graph.content_hash,
            structure_hash=graph.structure_hash,
            trace_batch=int(graph.meta.get("batch", 1)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "content_hash": self.content_hash,
            "structure_hash": self.structure_hash,
            "trace_batch": self.trace_batch,
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "plan.graph") -> GraphRef:
        m = get_map(d, path, _E)
        return cls(
            name=get_str(m, "name", path, _E),
            content_hash=get_str(m, "content_hash", path, _E),
            structure_hash=get_str(m, "structure_hash", path, _E),
            trace_batch=get_int(m, "trace_batch", path, _E, 1, minimum=1),
        )


def as_request(request: PlanRequest | None = None, /, **fields: Any) -> PlanRequest:
    """The Python door of the request spine: ``request`` as given, or a :class:`PlanRequest` built from
    keyword ``fields`` (``cluster`` may be a preset name, a YAML/JSON path, a dict or a ``Cluster``).

    Raises:
        PlanError: both a request and fields, an unknown field (named, with the known ones), or any check
            of :class:`PlanRequest`.
    """
    if request is not None:
        if not isinstance(request, PlanRequest):
            raise _E(f"expected a PlanRequest, got {type(request).__name__}")
        if fields:
            raise _E(f"give a PlanRequest or keyword fields, not both (got {', '.join(sorted(fields))})")
        return request
    known = set(PlanRequest.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise _E(
            f"unknown plan request field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
            field=unknown[0],
        )
    if "cluster" not in fields or "global_batch" not in fields:
        missing = [f for f in ("cluster", "global_batch") if f not in fields]
        raise _E(f"a plan request needs {' and '.join(missing)}", field=missing[0])
    from distplan.profiles import load_cluster

    return PlanRequest(**{**fields, "cluster": load_cluster(fields["cluster"])})
