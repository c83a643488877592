"""The scheduler routes (``/v1/schedulers/...``): many training jobs on one cluster, each with its plan.

==================================================  ====================================================
``POST /v1/schedulers``                             register a cluster's scheduler (policy, pricing)
``GET  /v1/schedulers[/{sid}]``                     schedulers: cluster, policy, clock, job counts
``POST /v1/schedulers/{sid}/jobs``                  submit a job (model as for a plan); priced in the
                                                    worker pool, then admitted (201) or pricing (202)
``GET  /v1/schedulers/{sid}/jobs[/{jid}]``          status, devices and plan, or why it waits
``DELETE /v1/schedulers/{sid}/jobs/{jid}``          cancel
``POST /v1/schedulers/{sid}/jobs/{jid}/progress``   an executor's measured progress (steps or samples)
``POST /v1/schedulers/{sid}/jobs/{jid}/finish``     the job completed
``POST /v1/schedulers/{sid}/jobs/{jid}/fail``       the job crashed (it resumes from its checkpoint)
``GET  /v1/schedulers/{sid}/jobs/{jid}/plan``       a running job's plan on its devices (Plan JSON)
``GET  /v1/schedulers/{sid}/jobs/{jid}/manifest``   Kubernetes Indexed Job or Slurm batch script for it
``GET  /v1/schedulers/{sid}/allocation``            running jobs with devices and plans; waiting: why
``GET  /v1/schedulers/{sid}/events``                the event log (``after``, ``limit``)
==================================================  ====================================================

Routes are thin (as in :mod:`~distplan.service.routes`): bodies are checked by pydantic and by the
scheduler's and the plan request's own rules, the work is the
:class:`~distplan.service.schedule_manager.ScheduleManager`'s, and errors are raised as ``DistplanError``
subclasses mapped to statuses in one place (``distplan.service.errors``): a field out of range is a 422
naming it, an unknown scheduler or job a 404, an event that does not fit the job's state (finishing a
waiting job) a 409.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from distplan.service.errors import JobFailure
from distplan.service.models import ErrorBody
from distplan.service.schedule_manager import ScheduleManager
from distplan.service.schedule_models import (
    AllocationPublic,
    EventsPublic,
    FailureReport,
    ProgressReport,
    ScheduledJobCreate,
    ScheduledJobPublic,
    SchedulerCreate,
    SchedulerPublic,
)

__all__ = ["router"]

router = APIRouter(tags=["schedulers"])


def _manager(request: Request) -> ScheduleManager:
    return request.app.state.schedules  # type: ignore[no-any-return]


ManagerDep = Annotated[ScheduleManager, Depends(_manager)]


def _sid() -> Any:
    return Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$", description="A scheduler id (hex).")


def _jid() -> Any:
    return Path(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$",
        description="A job id within the scheduler.",
    )


def _json(data: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(data).encode(), status_code=status_code, media_type="application/json", headers=headers
    )


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why}
    for code, why in (
        (404, "No such scheduler or job."),
        (
            409,
            "The job is not in a state that allows this (e.g. finishing a waiting job), or its id is taken.",
        ),
        (413, "Request body too large."),
        (422, "The request is well-formed but wrong: the message names the field and the value."),
        (429, "The worker queue is full; retry after `Retry-After` seconds."),
    )
}
_E: dict[int | str, dict[str, Any]] = {k: _ERRORS[k] for k in (404, 409, 422)}


# ---------------------------------------------------------------------------------------------- schedulers
@router.post(
    "/v1/schedulers",
    response_model=SchedulerPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Register a cluster's scheduler.",
    description=(
        "A scheduler runs many training jobs on one cluster: at every event (a job submitted, finished, "
        "failed or cancelled, an ageing tick) one integer program chooses every job's devices and plan, "
        "co-location and preemption (policy `distplan`), or a baseline policy decides. Its state lives in the "
        "server's database and survives restarts. The cluster is checked as for a plan (`422` naming the "
        "field), and so are the policy's parameters."
    ),
    responses={422: _ERRORS[422]},
)
async def create_scheduler(body: SchedulerCreate, schedules: ManagerDep) -> Response:
    data = await run_in_threadpool(schedules.create, body)
    return _json(data, 201, {"Location": data["links"]["self"]})


@router.get("/v1/schedulers", response_model=list[SchedulerPublic], summary="Registered schedulers.")
async def list_schedulers(schedules: ManagerDep) -> Response:
    return _json(await run_in_threadpool(schedules.all))


@router.get(
    "/v1/schedulers/{scheduler_id}",
    response_model=SchedulerPublic,
    summary="A scheduler: cluster, policy, clock, job counts.",
    responses={404: _ERRORS[404]},
)
async def get_scheduler(schedules: ManagerDep, scheduler_id: str = _sid()) -> Response:
    live = schedules.get(scheduler_id)
    return _json(await run_in_threadpool(schedules.public, live))


# ---------------------------------------------------------------------------------------------- jobs
@router.post(
    "/v1/schedulers/{scheduler_id}/jobs",
    response_model=ScheduledJobPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Submit a training job.",
    description=(
        "The job names its model as a plan request does and is checked by the same rules (a bad one is a "
        "`4xx` naming the field). Its device-set shapes are then priced by the planner in the worker pool "
        "(tracing the model if needed), so no decision waits for the planner; when the prices are in the "
        "scheduler admits it and decides. Answers `201` once admitted within the wait (`status` `waiting` or "
        "`running`; a model priced before is admitted at once), `202` while it is still being priced (poll "
        "the job), or the pricing's error (e.g. `422` for a model the tracer refuses). `409` if the id is "
        "taken, `429` if the worker queue is full."
    ),
    responses={
        202: {"model": ScheduledJobPublic, "description": "Being priced."},
        **{k: _ERRORS[k] for k in (404, 409, 413, 422, 429)},
    },
)
async def submit_job(
    body: ScheduledJobCreate,
    schedules: ManagerDep,
    request: Request,
    scheduler_id: str = _sid(),
    wait_s: float | None = Query(
        None,
        ge=0,
        le=60,
        description="How long to wait for the pricing before answering 202 (default: the server's short "
        "wait; 0 answers at once).",
    ),
) -> Response:
    data, service_job, admitted = await run_in_threadpool(schedules.submit, scheduler_id, body)
    if service_job is not None and not admitted:
        ev = schedules.watch(scheduler_id, data["id"], service_job)
        wait = request.app.state.settings.short_wait_s if wait_s is None else wait_s
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), wait)
        data = await run_in_threadpool(schedules.job_public, scheduler_id, data["id"])
    headers = {"Location": data["links"]["self"]}
    if data["status"] == "rejected":
        err = data["error"] or {}
        raise JobFailure(
            err.get("type", "Error"),
            f"job {data['id']!r} could not be priced: {err.get('message', '')}",
            kind=schedules.rejection_kind(scheduler_id, data["id"]),
            job_id=data["id"],
        )
    return _json(data, 202 if data["status"] == "pricing" else 201, headers)


@router.get(
    "/v1/schedulers/{scheduler_id}/jobs",
    response_model=list[ScheduledJobPublic],
    summary="A scheduler's jobs, in submission order.",
    responses={404: _ERRORS[404]},
)
async def list_jobs(schedules: ManagerDep, scheduler_id: str = _sid()) -> Response:
    return _json(await run_in_threadpool(schedules.jobs_public, scheduler_id))


@router.get(
    "/v1/schedulers/{scheduler_id}/jobs/{job_id}",
    response_model=ScheduledJobPublic,
    summary="A job: status, devices and plan while running, why it waits.",
    responses={404: _ERRORS[404]},
)
async def get_job(schedules: ManagerDep, scheduler_id: str = _sid(), job_id: str = _jid()) -> Response:
    return _json(await run_in_threadpool(schedules.job_public, scheduler_id, job_id))


@router.delete(
    "/v1/schedulers/{scheduler_id}/jobs/{job_id}",
    response_model=ScheduledJobPublic,
    summary="Cancel a job (pricing, waiting or running); the scheduler decides again.",
    responses=_E,
)
async def cancel_job(schedules: ManagerDep, scheduler_id: str = _sid(), job_id: str = _jid()) -> Response:
    return _json(await run_in_threadpool(schedules.cancel, scheduler_id, job_id))


@router.post(
    "/v1/schedulers/{scheduler_id}/jobs/{job_id}/progress",
    response_model=ScheduledJobPublic,
    summary="Report a job's measured progress (an executor's steps or samples done).",
    description="Replaces the scheduler's estimate (from the plan's predicted throughput); give exactly one "
    "of `steps_done` and `samples_done`.",
    responses=_E,
)
async def report_progress(
    body: ProgressReport, schedules: ManagerDep, scheduler_id: str = _sid(), job_id: str = _jid()
) -> Response:
    return _json(
        await run_in_threadpool(schedules.progress, scheduler_id, job_id, body.steps_done, body.samples_done)
    )


@router.post(
    "/v1/schedulers/{scheduler_id}/jobs/{job_id}/finish",
    response_model=ScheduledJobPublic,
    summary="A running job completed; its devices go to others.",
    responses=_E,
)
async def finish_job(schedules: ManagerDep, scheduler_id: str = _sid(), job_id: str = _jid()) -> Response:
    return _json(await run_in_threadpool(schedules.finish, scheduler_id, job_id))


@router.post(
    "/v1/schedulers/{scheduler_id}/jobs/{job_id}/fail",
    response_model=ScheduledJobPublic,
    summary="A running job crashed; it waits again and resumes from its checkpoint.",
    responses=_E,
)
async def fail_job(
    schedules: ManagerDep,
    scheduler_id: str = _sid(),
    job_id: str = _jid(),
    body: FailureReport | None = Body(None),
) -> Response:
    reason = body.reason if body is not None else ""
    return _json(await run_in_threadpool(schedules.fail, scheduler_id, job_id, reason))


@router.get(
    "/v1/schedulers/{scheduler_id}/jobs/{job_id}/plan",
    summary="A running job's plan on its devices (distplan Plan JSON, the cluster's device indices).",
    responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}, **_E},
)
async def get_job_plan(schedules: ManagerDep, scheduler_id: str = _sid(), job_id: str = _jid()) -> Response:
    plan, _ = await run_in_threadpool(schedules.plan, scheduler_id, job_id)
    return _json(plan.to_dict())


@router.get(
    "/v1/schedulers/{scheduler_id}/jobs/{job_id}/manifest",
    response_class=PlainTextResponse,
    summary="A running job as a Kubernetes Indexed Job (YAML) or a Slurm batch script.",
    description=(
        "The job's devices and plan as a manifest of an existing engine: `k8s` (a headless Service and an "
        "Indexed Job, one pod per host, each running that host's `torchrun` line of the plan) or `slurm` "
        "(an `sbatch` script: one task per node, each running its `torchrun` line). The entry point is the "
        "plan's `train.py` (`GET /v1/plans/...` launchers, or `distplan lower`)."
    ),
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **_E},
)
async def get_job_manifest(
    schedules: ManagerDep,
    scheduler_id: str = _sid(),
    job_id: str = _jid(),
    format: Literal["k8s", "slurm"] = Query("k8s", description="`k8s` or `slurm`."),
    image: str = Query(
        "distplan:latest",
        min_length=1,
        max_length=256,
        pattern=r"^[A-Za-z0-9._/:@-]+$",
        description="Container image (k8s).",
    ),
) -> Response:
    text = await run_in_threadpool(schedules.manifest, scheduler_id, job_id, format, image)
    return PlainTextResponse(text)


# ---------------------------------------------------------------------------------------------- allocation
@router.get(
    "/v1/schedulers/{scheduler_id}/allocation",
    response_model=AllocationPublic,
    summary="Who runs where now, with which plan; why the others wait.",
    responses={404: _ERRORS[404]},
)
async def get_allocation(schedules: ManagerDep, scheduler_id: str = _sid()) -> Response:
    return _json(await run_in_threadpool(schedules.allocation, scheduler_id))


@router.get(
    "/v1/schedulers/{scheduler_id}/events",
    response_model=EventsPublic,
    summary="The scheduler's event log: arrivals, starts, preemptions, moves, finishes, ... with reasons.",
    responses={404: _ERRORS[404]},
)
async def get_events(
    schedules: ManagerDep,
    scheduler_id: str = _sid(),
    after: int = Query(0, ge=0, le=2**62, description="Events after this sequence number."),
    limit: int = Query(1000, ge=1, le=10_000, description="At most this many."),
) -> Response:
    return _json(await run_in_threadpool(schedules.events, scheduler_id, after, limit))
