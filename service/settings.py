"""Service settings, read from the environment (prefix ``DISTPLAN_``) or given by ``distplan serve`` flags.

Every field has a docstring and a bound: a setting out of range fails at startup with pydantic's message
naming the variable, not at the first request.

    DISTPLAN_DB=/var/lib/distplan/plans.db DISTPLAN_WORKERS=4 distplan serve --host 0.0.0.0
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Configuration of one service instance (see the module docstring for how to set it)."""

    model_config = SettingsConfigDict(env_prefix="DISTPLAN_", extra="ignore", frozen=True)

    db: Path = Field(
        Path(".distplan/service.db"), description="SQLite database file (created with its folder)."
    )
    workers: int = Field(2, ge=1, le=64, description="Worker processes running solves and validations.")
    queue_limit: int = Field(
        16, ge=0, le=10_000, description="Jobs that may wait for a worker; one more is answered 429."
    )
    retry_after_s: int = Field(5, ge=1, le=3600, description="Retry-After seconds sent with a 429.")
    max_body_bytes: int = Field(
        8 * 2**20, ge=1024, le=2**30, description="Largest request body accepted; larger is answered 413."
    )
    max_graph_nodes: int = Field(
        50_000, ge=1, le=10_000_000, description="Most nodes an uploaded or traced graph may have."
    )
    max_cluster_devices: int = Field(
        4096, ge=1, le=1_000_000, description="Most devices an inline cluster may have."
    )
    default_time_limit_s: float = Field(
        10.0, gt=0, le=3600, description="Solver time limit when a request gives none."
    )
    solver_time_cap_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Server-side cap on a request's solver time limit (larger is clamped).",
    )
    solver_threads: int = Field(1, ge=1, le=64, description="CP-SAT search workers per solve.")
    plan_job_timeout_s: float = Field(
        600.0,
        gt=0,
        le=24 * 3600,
        description="Hard wall-clock limit of one plan job (tracing + solving + simulation); then it is killed.",
    )
    validation_timeout_s: float = Field(
        600.0,
        gt=0,
        le=24 * 3600,
        description="Hard wall-clock limit of one validation job; then it is killed.",
    )
    short_wait_s: float = Field(
        2.0, ge=0, le=60, description="How long POST /v1/plans waits for the result before answering 202."
    )
    cache_entries: int = Field(512, ge=0, le=1_000_000, description="Finished plan responses kept in memory.")
    worker_init: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        description="A function `package.module:function` each worker process calls once at start, before it "
        "reports ready (e.g. to pre-import model code or set torch's thread count). An operator setting: "
        "nothing a client sends is ever imported. Requests are accepted and queued while it runs.",
    )
    max_layers: int = Field(
        512,
        ge=1,
        le=100_000,
        description="Most layers (num_hidden_layers, n_layer, ...) an hf_config or a built-in config override may ask for.",
    )
