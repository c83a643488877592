"""Request and response bodies of the REST API (pydantic, used at the edge only).

Layered like the FastAPI full-stack template: ``*Base`` holds the fields a client sends and reads back,
``*Create`` is the request body, ``*Public`` the response. Routes convert these to the core dataclasses
(``Cluster``, ``OpGraph``, ``Plan``) through ``distplan.service.specs`` before any work starts; nothing
below the routes sees a pydantic object.

Bounds of request fields come from the one table of accepted ranges (``distplan.limits``), which
``PlanRequest`` checks again for every door. Request models are strict (``"8"`` is not an integer) and reject unknown fields, so a typo in a field name
is a 422 that names it rather than a silently ignored option.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from distplan.limits import REQUEST_RANGES as _R

__all__ = [
    "BuiltinModel",
    "CalibrationPublic",
    "ClusterPublic",
    "ClusterSummary",
    "DeviceKindPublic",
    "ErrorBody",
    "ErrorInfo",
    "GraphModel",
    "HFConfigModel",
    "Health",
    "JobPublic",
    "LauncherPublic",
    "ModelInfoPublic",
    "ModelSpec",
    "PlanBase",
    "PlanCreate",
    "PlanPublic",
    "Readiness",
    "ValidationCreate",
    "ValidationPublic",
]

Status = Literal["queued", "running", "done", "failed"]
Scalar = int | float | bool | str


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---------------------------------------------------------------------------------------------- errors
class ErrorInfo(BaseModel):
    """What went wrong: the error class and a message that names the problem."""

    type: str = Field(description="Error class, e.g. `InfeasiblePlanError`, `RequestValidationError`.")
    message: str = Field(description="What is wrong and by how much.")
    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorInfo


# ---------------------------------------------------------------------------------------------- models
class BuiltinModel(_Request):
    """A model of the built-in zoo (see `GET /v1/models`), with optional config overrides."""

    builtin: str = Field(min_length=1, max_length=64, description="Built-in model name, e.g. `gpt-tiny`.")
    config: dict[str, Scalar] = Field(
        default_factory=dict,
        max_length=64,
        description='Overrides of the model\'s config fields, e.g. `{"n_layer": 4}`.',
    )


class HFConfigModel(_Request):
    """A Hugging Face model given by its `config.json` contents; built from the config with random weights.
    Remote code is never run: configs with `auto_map` are rejected."""

    hf_config: dict[str, Any] = Field(description="The contents of a Hugging Face `config.json`.")


class GraphModel(_Request):
    """A graph traced by the client (`distplan trace --json`); planned as is, but cannot be validated."""

    graph: dict[str, Any] = Field(description="An OpGraph JSON document (schema_version 1).")


def _model_kind(value: Any) -> str | None:
    """Which model form a request uses, by its key (so errors speak of that form only)."""
    if isinstance(value, dict):
        kinds = [k for k in ("builtin", "hf_config", "graph") if k in value]
        return kinds[0] if len(kinds) == 1 else None
    if isinstance(value, BaseModel):
        return {BuiltinModel: "builtin", HFConfigModel: "hf_config", GraphModel: "graph"}.get(type(value))
    return None


ModelSpec = Annotated[
    Annotated[BuiltinModel, Tag("builtin")]
    | Annotated[HFConfigModel, Tag("hf_config")]
    | Annotated[GraphModel, Tag("graph")],
    Discriminator(
        _model_kind,
        custom_error_type="model_form",
        custom_error_message="model must be an object with exactly one of 'builtin', 'hf_config' or 'graph'",
    ),
]


# ---------------------------------------------------------------------------------------------- plans
class PlanBase(_Request):
    """What to plan: a model, its example input size, a cluster and the training batch."""

    model: ModelSpec = Field(description="`{builtin, config}`, `{hf_config}` or `{graph}`.")
    batch: int = Field(
        1,
        ge=_R["batch"].low,
        le=_R["batch"].high,
        description="Batch size of the example input the model is traced at.",
    )
    seq: int = Field(
        128,
        ge=_R["seq"].low,
        le=_R["seq"].high,
        description="Sequence length of the example input (token models).",
    )
    cluster: str | dict[str, Any] = Field(
        description="A preset name (see `GET /v1/clusters`) or an inline cluster (same schema as the YAML presets; "
        "its `calibrations` list holds ids of calibrations uploaded to `POST /v1/calibrations`, or their contents)."
    )
    global_batch: int = Field(
        ge=_R["global_batch"].low,
        le=_R["global_batch"].high,
        description="Samples per training iteration, over all replicas.",
    )
    microbatches: int | None = Field(
        None,
        ge=_R["microbatches"].low,
        le=_R["microbatches"].high,
        description="Fix the number of microbatches.",
    )
    schedule: Literal["gpipe", "1f1b"] | None = Field(
        None, description="Fix the schedule (default: the planner chooses)."
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Compute dtype (bf16/fp16: mixed precision)."
    )
    matmul_precision: Literal["fp32", "tf32", "bf16", "fp16"] | None = Field(
        None,
        description="How matmuls run (`tf32`: fp32 tensors on TF32 tensor cores); default the dtype's own. Priced "
        "by the planner and set by the lowering.",
    )
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        "adam", description="Optimizer whose state is counted."
    )
    time_limit_s: float | None = Field(
        None,
        gt=_R["time_limit_s"].low,
        le=_R["time_limit_s"].high,
        description="Wall-clock limit of the planning in seconds (clamped to the server's cap).",
    )
    tensor_parallel: bool = Field(
        True,
        description="Let a stage split over a tensor-parallel group inside one host (`false`: tp 1 everywhere).",
    )
    recompute: list[Literal["none", "selective", "full"]] | None = Field(
        None,
        min_length=1,
        description="Activation recomputation modes a stage may use (default all: the planner chooses per stage).",
    )
    shard: list[Literal["none", "optimizer", "optimizer+gradients", "full"]] | None = Field(
        None,
        min_length=1,
        description="Sharding levels over a stage's data-parallel replicas (ZeRO-1/2/3) a stage may use (default all).",
    )


class PlanCreate(PlanBase):
    """Body of `POST /v1/plans`."""


class PlanPublic(BaseModel):
    """A stored plan: its state and, once done, the plan with predictions, solver report and baselines."""

    id: str = Field(description="Content address of the canonical request: the same request, the same id.")
    status: Status
    job_id: str | None = Field(None, description="The job producing (or that produced) the plan.")
    attempts: int = Field(
        description="How many jobs ran for this plan (1 unless a retryable failure was retried)."
    )
    created_at: float
    updated_at: float
    error: ErrorInfo | None = None
    request: dict[str, Any] = Field(description="The canonical request (uploaded graphs by content hash).")
    plan: dict[str, Any] | None = Field(None, description="The plan (distplan Plan JSON), when done.")
    layout: str | None = Field(None, description="Compact text form of the plan.")
    predictions: dict[str, Any] | None = None
    solver: dict[str, Any] | None = None
    baselines: dict[str, float | None] | None = None
    links: dict[str, str] = Field(default_factory=dict)


class LauncherPublic(BaseModel):
    """The emitted program: files (entry point, plan.json, ...) and the torchrun command per host."""

    plan_id: str
    model_spec: str = Field(description="The model spec the entry point builds the model from.")
    files: dict[str, str] = Field(description="File name -> contents (plan.json, train.py, launch.sh, ...).")
    commands: list[str] = Field(description="The torchrun command per host, in node-rank order.")
    local_command: str = Field("", description="All ranks on one machine, on CPU (a smoke test).")


# ---------------------------------------------------------------------------------------------- jobs
class JobPublic(BaseModel):
    """One attempt at producing a plan or validation."""

    id: str
    kind: Literal["plan", "validation", "price"]
    subject_id: str = Field(description="The plan, validation or pricing (of a scheduled job) it produces.")
    status: Status
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: ErrorInfo | None = None
    links: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- validations
class ValidationCreate(_Request):
    """Body of `POST /v1/plans/{id}/validations` (optional)."""

    steps: int = Field(1, ge=1, le=8, description="Training steps to compare against the single-process run.")
    timeout_s: float | None = Field(
        None, gt=0, le=24 * 3600, description="Time limit of the run (clamped to the server's limit)."
    )


class ValidationPublic(BaseModel):
    """A validation of a plan's numerics on CPU/gloo, and its report once done."""

    id: str
    plan_id: str
    status: Status
    job_id: str | None = None
    attempts: int
    created_at: float
    updated_at: float
    error: ErrorInfo | None = None
    request: dict[str, Any]
    report: dict[str, Any] | None = Field(
        None, description="The numerics report (`passed`, `max_abs_error`, ...)."
    )
    links: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- calibrations
class CalibrationPublic(BaseModel):
    """An uploaded calibration (what `distplan profile` wrote), stored by content."""

    id: str = Field(
        description="Content address of the calibration: name it in an inline cluster's `calibrations` list."
    )
    kind: str = Field(description="The device kind its device part applies to.")
    summary: dict[str, Any] = Field(description="Headline figures (TFLOP/s, GB/s, overheads, link latency).")
    calibration: dict[str, Any] = Field(description="The calibration, as stored (distplan Calibration JSON).")
    links: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- catalogue
class ClusterSummary(BaseModel):
    name: str
    description: str
    num_devices: int
    num_hosts: int
    kinds: dict[str, int] = Field(description="Device count per device kind.")


class ClusterPublic(ClusterSummary):
    cluster: dict[str, Any] = Field(description="The full cluster (SI units); usable as an inline `cluster`.")


class DeviceKindPublic(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class ModelInfoPublic(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    family: str = ""
    description: str = ""
    params: int | None = None


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    workers: int
    workers_ready: int
    queued: int
    running: int
    queue_limit: int
