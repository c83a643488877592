"""Request and response bodies of the scheduler routes (pydantic, at the edge only; see
:mod:`distplan.service.models` for the conventions: strict requests that reject unknown fields, bounds from
one table, ``*Create`` / ``*Public``).

A job names its model exactly as a plan request does (``model``, ``batch``, ``seq``, ``global_batch``,
``dtype``, ``optimizer``) and is checked by the same rules (``distplan.service.specs.plan_spec``); the
scheduling fields are those of ``distplan.scheduler.JobSpec``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from distplan.limits import REQUEST_RANGES as _R
from distplan.service.models import ErrorInfo, ModelSpec, Scalar

__all__ = [
    "AllocationPublic",
    "EventPublic",
    "EventsPublic",
    "FailureReport",
    "PlacementPublic",
    "ProgressReport",
    "ScheduledJobCreate",
    "ScheduledJobPublic",
    "SchedulerCreate",
    "SchedulerPublic",
    "WaitingPublic",
]

PolicyName = Literal["distplan", "fifo", "las", "gavel", "strict-priority"]
Priority = Literal["high", "normal", "low"]
JobStatus = Literal["pricing", "waiting", "running", "finished", "cancelled", "rejected"]
_JOB_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
#: Most devices a job may ask for (``distplan.scheduler.model.MAX_DEVICES``).
_MAX_DEVICES = 65536


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------------------------------------- schedulers
class SchedulerCreate(_Request):
    """Body of `POST /v1/schedulers`: a cluster to schedule jobs on, and how."""

    name: str = Field(
        "scheduler",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$",
        description="A label.",
    )
    cluster: str | dict[str, Any] = Field(
        description="A preset name (see `GET /v1/clusters`) or an inline cluster (as for `POST /v1/plans`)."
    )
    policy: PolicyName = Field(
        "distplan",
        description="`distplan` (joint allocation and plans, priced preemption, co-location), or a baseline: "
        "`fifo`, `las` (Tiresias), `gavel`, `strict-priority`.",
    )
    policy_params: dict[str, Scalar] = Field(
        default_factory=dict,
        max_length=32,
        description='The policy\'s parameters, e.g. `{"objective": "max-min", "ageing_bound_s": 7200}` for '
        "`distplan` (see `distplan.scheduler.DistplanPolicy`).",
    )
    pricing_time_limit_s: float = Field(
        5.0, gt=0, le=600, description="Planner time limit per device-set shape when a job is priced."
    )
    restart_overhead_s: float = Field(
        20.0, ge=0, le=86400, description="Seconds a (re)start costs besides the checkpoint transfer."
    )
    storage_bandwidth_bytes_s: float | None = Field(
        None,
        gt=0,
        le=1e15,
        description="Checkpoint storage bandwidth per host (default: the cluster network).",
    )
    interference: float = Field(0.1, ge=0, le=10, description="Fixed co-location slowdown term.")


class SchedulerPublic(BaseModel):
    """A registered scheduler: its cluster and policy, its clock and job counts."""

    id: str
    name: str
    cluster: str = Field(description="The cluster's name.")
    num_devices: int
    policy: str
    policy_params: dict[str, Any]
    created_at: float
    time_s: float = Field(description="The scheduler's clock (Unix seconds).")
    jobs: dict[str, int] = Field(description="Job count per status.")
    links: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- jobs
class ScheduledJobCreate(_Request):
    """Body of `POST /v1/schedulers/{id}/jobs`: a training job (model as in a plan request) and what it
    asks of the scheduler."""

    id: str | None = Field(
        None, pattern=_JOB_ID, description="The job's id in this scheduler (default: one is made up)."
    )
    name: str = Field("", max_length=256, description="Free text.")
    model: ModelSpec = Field(description="`{builtin, config}`, `{hf_config}` or `{graph}`, as for a plan.")
    batch: int = Field(1, ge=_R["batch"].low, le=_R["batch"].high, description="Example input batch size.")
    seq: int = Field(128, ge=_R["seq"].low, le=_R["seq"].high, description="Example input sequence length.")
    global_batch: int = Field(
        ge=_R["global_batch"].low, le=_R["global_batch"].high, description="Samples per training step."
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Compute dtype.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        "adam", description="Optimizer whose state is counted."
    )
    priority: Priority = Field("normal", description="Priority class.")
    min_devices: int = Field(1, ge=1, le=_MAX_DEVICES, description="Fewest devices the job accepts.")
    max_devices: int | None = Field(
        None, ge=1, le=_MAX_DEVICES, description="Most devices the job accepts (default: min_devices)."
    )
    total_steps: int | None = Field(
        None,
        ge=1,
        le=10**12,
        description="Steps the job runs (default: open-ended; the scheduler estimates).",
    )
    deadline_in_s: float | None = Field(
        None, gt=0, le=10**9, description="Finish within this many seconds of submission (default: none)."
    )


class PlacementPublic(BaseModel):
    """Where a running job runs: its devices and the plan on them."""

    job_id: str
    devices: list[int] = Field(description="Global device indices of the cluster.")
    shape: str = Field(description="The priced device-set shape.")
    plan_id: str = Field(
        description="Id of the plan on these devices (the `plan`'s own `id`, its manifest's)."
    )
    shape_plan_id: str = Field(
        description="Id of the plan priced on the shape (the same stages on canonical devices; the price cache's)."
    )
    layout: str = Field(description="The plan's layout, with the cluster's device indices.")
    throughput_samples_s: float
    iteration_time_s: float
    since_s: float
    progress_from_s: float = Field(description="When it makes progress (after checkpoint load and restart).")
    colocated_with: list[str] = Field(default_factory=list)
    plan: dict[str, Any] | None = Field(None, description="The plan (distplan Plan JSON) on these devices.")


class ScheduledJobPublic(BaseModel):
    """A job of a scheduler: status, where it runs or why it waits, progress."""

    id: str
    scheduler_id: str
    status: JobStatus = Field(
        description="`pricing` (its device-set shapes are being priced in the worker pool), `waiting`, "
        "`running`, `finished`, `cancelled`, or `rejected` (it could not be priced: see `error`)."
    )
    name: str
    priority: Priority
    min_devices: int
    max_devices: int
    global_batch: int
    total_steps: int | None
    submitted_at: float
    model: dict[str, Any] = Field(description="The canonical model (uploaded graphs by content hash).")
    placement: PlacementPublic | None = None
    wait_reason: str | None = None
    samples_done: float = 0.0
    steps_done: float = 0.0
    preemptions: int = 0
    pricing: dict[str, Any] = Field(
        default_factory=dict,
        description="The pricing job (`price_id`, `job_id`) and, once admitted, its planner calls.",
    )
    error: ErrorInfo | None = None
    links: dict[str, str] = Field(default_factory=dict)


class ProgressReport(_Request):
    """Body of `POST .../progress`: what an executor measured; give exactly one of the two."""

    steps_done: int | None = Field(None, ge=0, le=10**12, description="Training steps completed.")
    samples_done: float | None = Field(None, ge=0, le=1e18, description="Samples processed.")


class FailureReport(_Request):
    """Body of `POST .../fail` (optional)."""

    reason: str = Field("", max_length=1000, description="What happened (kept in the event log).")


# ---------------------------------------------------------------------------------------------- allocation
class WaitingPublic(BaseModel):
    job_id: str
    reason: str = Field(description="Why it waits (one sentence naming what it lacks).")
    since_s: float


class AllocationPublic(BaseModel):
    """Who runs where now with which plan, and why the others wait."""

    scheduler_id: str
    time_s: float
    running: list[PlacementPublic]
    waiting: list[WaitingPublic]
    pricing: list[str] = Field(description="Jobs still being priced (not yet seen by the scheduler).")


class EventPublic(BaseModel):
    seq: int = Field(description="Position in the scheduler's log, from 1.")
    time_s: float
    kind: str
    job_id: str
    detail: str
    data: dict[str, Any]


class EventsPublic(BaseModel):
    scheduler_id: str
    events: list[EventPublic]
    next_after: int = Field(description="Pass as `after` to read the events that follow.")
