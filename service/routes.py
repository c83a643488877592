"""The REST routes (``/v1/...``, ``/healthz``, ``/readyz``).

Routes are thin: check the body (pydantic + ``distplan.service.specs``), hand work to the
:class:`~distplan.service.jobs.JobManager`, read results from the :class:`~distplan.service.store.Store`.
Errors are raised as ``DistplanError`` subclasses and turned into JSON answers in one place
(``distplan.service.errors``). Bodies of finished plans are cached as bytes by path (``ResponseCache``);
later reads of them are answered before routing (``CachedReads``).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Body, Path, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from distplan._serde import canonical_hash
from distplan.calibration import Calibration
from distplan.profiles import device_kinds, list_presets, preset_cluster
from distplan.service.deps import CacheDep, CatalogDep, JobsDep, SettingsDep, StoreDep
from distplan.service.errors import ConflictError, ErrorKind, JobFailure, NotFoundError, http_status
from distplan.service.models import (
    CalibrationPublic,
    ClusterPublic,
    ClusterSummary,
    DeviceKindPublic,
    ErrorBody,
    Health,
    JobPublic,
    LauncherPublic,
    ModelInfoPublic,
    PlanCreate,
    PlanPublic,
    Readiness,
    ValidationCreate,
    ValidationPublic,
)
from distplan.service.specs import plan_spec, validation_spec
from distplan.service.store import JobRecord, SubjectRecord

__all__ = ["router"]

router = APIRouter()


def _id() -> Any:
    """A fresh path-parameter spec per route (FastAPI binds one to one parameter name)."""
    return Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$", description="A resource id (hex).")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why}
    for code, why in (
        (400, "Malformed JSON."),
        (404, "No such resource."),
        (409, "The resource is not in a state that allows this."),
        (413, "Request body too large."),
        (422, "The request is well-formed but wrong: the message names the field or the missing budget."),
        (429, "The job queue is full; retry after `Retry-After` seconds."),
        (
            503,
            "The work was cut off (the server restarted, or a worker process died); send the request again.",
        ),
    )
}


def _json(data: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(data).encode(), status_code=status_code, media_type="application/json", headers=headers
    )


def _error(rec: SubjectRecord | JobRecord) -> dict[str, Any] | None:
    if rec.error_type is None:
        return None
    return {
        "type": rec.error_type,
        "message": rec.error_message or "",
        "status": http_status(rec.error_kind),
    }


def _plan_links(plan_id: str, job_id: str | None) -> dict[str, str]:
    base = f"/v1/plans/{plan_id}"
    links = {
        "self": base,
        "launcher": f"{base}/launcher",
        "timeline": f"{base}/timeline",
        "report": f"{base}/report",
        "validations": f"{base}/validations",
    }
    if job_id:
        links["job"] = f"/v1/jobs/{job_id}"
    return links


def _plan_public(rec: SubjectRecord, store: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rec.id,
        "status": rec.status,
        "job_id": rec.job_id,
        "attempts": rec.attempts,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
        "error": _error(rec),
        "request": rec.request,
        "plan": None,
        "layout": None,
        "predictions": None,
        "solver": None,
        "baselines": None,
        "links": _plan_links(rec.id, rec.job_id),
    }
    if rec.status == "done":
        text = store.artifact(rec.id, "plan")
        if text is not None:
            plan = json.loads(text)
            out.update(
                plan=plan,
                layout=plan.get("layout"),
                predictions=plan.get("predictions"),
                solver=plan.get("solver"),
                baselines=plan.get("baselines"),
            )
    return out


def _validation_public(rec: SubjectRecord, store: Any) -> dict[str, Any]:
    report = None
    if rec.status == "done":
        text = store.artifact(rec.id, "report")
        report = json.loads(text) if text is not None else None
    links = {"self": f"/v1/validations/{rec.id}", "plan": f"/v1/plans/{rec.parent_id}"}
    if rec.job_id:
        links["job"] = f"/v1/jobs/{rec.job_id}"
    return {
        "id": rec.id,
        "plan_id": rec.parent_id,
        "status": rec.status,
        "job_id": rec.job_id,
        "attempts": rec.attempts,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
        "error": _error(rec),
        "request": rec.request,
        "report": report,
        "links": links,
    }


def _job_public(job: JobRecord) -> dict[str, Any]:
    # A pricing (kind "price") has no resource of its own: the scheduled jobs it prices link to it.
    subject = {"plan": f"/v1/plans/{job.subject_id}", "validation": f"/v1/validations/{job.subject_id}"}.get(
        job.kind, f"/v1/jobs/{job.id}"
    )
    return {
        "id": job.id,
        "kind": job.kind,
        "subject_id": job.subject_id,
        "status": job.status,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "error": _error(job),
        "links": {"self": f"/v1/jobs/{job.id}", "subject": subject},
    }


def _require_plan(store: Any, plan_id: str) -> SubjectRecord:
    rec = store.get("plan", plan_id)
    if rec is None:
        raise NotFoundError(f"no plan with id {plan_id!r}")
    return rec


def _require_done(rec: SubjectRecord, what: str) -> None:
    if rec.status == "failed":
        raise ConflictError(f"plan {rec.id} failed ({rec.error_type}: {rec.error_message}); it has no {what}")
    if rec.status != "done":
        raise ConflictError(f"plan {rec.id} is {rec.status}; its {what} is available once it is done")


# ---------------------------------------------------------------------------------------------- health
@router.get(
    "/healthz",
    response_model=Health,
    tags=["health"],
    summary="Liveness: the server process answers.",
    description=(
        "`200` as soon as the HTTP server runs, whatever its workers are doing: a liveness probe (restart the "
        "instance when it fails). From then on the whole API answers: requests are checked at once, and "
        "valid work is accepted (`202`) and queued even while the workers still start."
    ),
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    tags=["health"],
    summary="Readiness: a worker process has warmed up, so queued work runs now (503 until then).",
    description=(
        "A readiness probe: `200` once at least one worker process has loaded torch and the tracer, `503` "
        "before (the body says how many workers are ready and how many jobs wait). Use it to route traffic "
        "to warm instances; it is not a precondition for requests: `POST /v1/plans` is checked and answered "
        "(`4xx`, or `202` queued) during the warm-up too."
    ),
    responses={503: {"model": Readiness, "description": "No worker has warmed up yet."}},
)
async def readyz(jobs: JobsDep) -> Response:
    stats = jobs.stats()
    ready = jobs.ready
    return _json({"ready": ready, **stats}, 200 if ready else 503)


# ---------------------------------------------------------------------------------------------- catalogue
@router.get(
    "/v1/clusters", response_model=list[ClusterSummary], tags=["catalogue"], summary="Cluster presets."
)
async def list_clusters() -> list[dict[str, Any]]:
    out = []
    for name in list_presets():
        c = preset_cluster(name)
        out.append(
            {
                "name": name,
                "description": c.description,
                "num_devices": c.num_devices,
                "num_hosts": len(c.hosts),
                "kinds": c.kind_counts(),
            }
        )
    return out


@router.get(
    "/v1/clusters/{name}",
    response_model=ClusterPublic,
    tags=["catalogue"],
    summary="One cluster preset in full.",
    responses={404: _ERRORS[404]},
)
async def get_cluster(name: str = Path(max_length=128)) -> dict[str, Any]:
    if name not in list_presets():
        raise NotFoundError(f"unknown cluster preset {name[:80]!r}; presets: {', '.join(list_presets())}")
    c = preset_cluster(name)
    return {
        "name": name,
        "description": c.description,
        "num_devices": c.num_devices,
        "num_hosts": len(c.hosts),
        "kinds": c.kind_counts(),
        "cluster": c.to_dict(),
    }


@router.get(
    "/v1/device-kinds",
    response_model=list[DeviceKindPublic],
    tags=["catalogue"],
    summary="Device-kind catalogue.",
)
async def list_device_kinds() -> list[dict[str, Any]]:
    return [k.to_dict() for k in device_kinds().values()]


@router.get(
    "/v1/models",
    response_model=list[ModelInfoPublic],
    tags=["catalogue"],
    summary='Built-in models (use as `{"builtin": name}`).',
)
async def list_models(catalog: CatalogDep) -> list[dict[str, Any]]:
    return [dict(m) for m in catalog.models]


# ---------------------------------------------------------------------------------------------- calibrations
def _calibration_public(cid: str, data: dict[str, Any]) -> dict[str, Any]:
    cal = Calibration.from_dict(data)
    return {
        "id": cid,
        "kind": cal.kind,
        "summary": cal.summary(),
        "calibration": data,
        "links": {"self": f"/v1/calibrations/{cid}"},
    }


@router.post(
    "/v1/calibrations",
    response_model=CalibrationPublic,
    status_code=status.HTTP_201_CREATED,
    tags=["calibrations"],
    summary="Upload a calibration file (what `distplan profile` wrote).",
    description=(
        "Checks the calibration (a malformed one is a `422` naming the field) and stores it by content: "
        "`201` when new, `200` when the same calibration was uploaded before. Name its `id` in the "
        "`calibrations` list of an inline cluster (`POST /v1/plans`) to plan with its measured figures; "
        "the device part applies to the device kind it names, the link part to the links it measured."
    ),
    responses={200: {"model": CalibrationPublic, "description": "Uploaded before."}, 422: _ERRORS[422]},
)
async def create_calibration(store: StoreDep, body: dict[str, Any] = Body(...)) -> Response:
    cal = Calibration.from_dict(body)
    data = cal.to_dict()
    cid = canonical_hash(data)
    known = await run_in_threadpool(store.artifact, cid, "calibration")
    if known is None:
        await run_in_threadpool(store.put_artifact, cid, "calibration", json.dumps(data))
    return _json(_calibration_public(cid, data), 200 if known is not None else 201)


@router.get(
    "/v1/calibrations/{calibration_id}",
    response_model=CalibrationPublic,
    tags=["calibrations"],
    summary="An uploaded calibration.",
    responses={404: _ERRORS[404]},
)
async def get_calibration(store: StoreDep, calibration_id: str = _id()) -> Response:
    text = await run_in_threadpool(store.artifact, calibration_id, "calibration")
    if text is None:
        raise NotFoundError(
            f"no uploaded calibration with id {calibration_id!r} (POST it to /v1/calibrations)"
        )
    return _json(_calibration_public(calibration_id, json.loads(text)))


# ---------------------------------------------------------------------------------------------- plans
@router.post(
    "/v1/plans",
    response_model=PlanPublic,
    status_code=status.HTTP_201_CREATED,
    tags=["plans"],
    summary="Plan a model on a cluster.",
    description=(
        "Checks the request at once (a bad one is a `4xx` naming the problem, whatever the workers are "
        "doing), then queues it: a worker process traces and plans it. Answers `201` with the plan when it "
        "is done within the server's short wait, `202` with the job's URL otherwise (poll `GET /v1/plans/{id}` "
        "or `GET /v1/jobs/{job_id}`), also while the workers still start (the job runs when one is ready), "
        "`200` when the same request was planned before (the id is the content address of the request: no "
        "second solve). A plan that fails within the wait is answered with its error (e.g. "
        "`422 InfeasiblePlanError` naming the memory that is short)."
    ),
    responses={
        200: {"model": PlanPublic, "description": "Planned before."},
        202: {"model": PlanPublic, "description": "Queued or running."},
        **{k: v for k, v in _ERRORS.items() if k != 404},
    },
)
async def create_plan(
    body: PlanCreate,
    settings: SettingsDep,
    store: StoreDep,
    jobs: JobsDep,
    catalog: CatalogDep,
    wait_s: float | None = Query(
        None,
        ge=0,
        le=60,
        description="How long to wait for the result before answering 202 (default: the server's short wait; "
        "0 answers at once).",
    ),
) -> Response:
    def uploaded(cid: str) -> dict[str, Any] | None:
        text = store.artifact(cid, "calibration")
        return None if text is None else dict(json.loads(text))

    spec = await run_in_threadpool(plan_spec, body, settings=settings, catalog=catalog, calibration=uploaded)
    payload = {
        "request": spec.request,
        "graph": spec.graph,
        "max_graph_nodes": settings.max_graph_nodes,
    }
    artifacts = {"graph": spec.graph_json} if spec.graph_json is not None else None
    rec, job = await run_in_threadpool(
        jobs.submit,
        "plan",
        spec.id,
        spec.request,
        payload,
        timeout_s=settings.plan_job_timeout_s,
        artifacts=artifacts,
    )
    if rec.status in ("queued", "running") and rec.job_id is not None:
        await jobs.wait(rec.job_id, settings.short_wait_s if wait_s is None else wait_s)
        rec = _require_plan(store, spec.id)
    headers = {"Location": f"/v1/plans/{rec.id}"}
    if rec.status == "failed":
        raise JobFailure(
            rec.error_type or "Error",
            rec.error_message or "",
            kind=rec.error_kind or ErrorKind.INTERNAL,
            plan_id=rec.id,
        )
    code = 202 if rec.status != "done" else (201 if job is not None else 200)
    return _json(_plan_public(rec, store), code, headers)


@router.get(
    "/v1/plans/{plan_id}",
    response_model=PlanPublic,
    tags=["plans"],
    summary="A plan: status, and once done the plan, predictions, solver report and baselines.",
    responses={404: _ERRORS[404]},
)
async def get_plan(store: StoreDep, cache: CacheDep, plan_id: str = _id()) -> Response:
    rec = _require_plan(store, plan_id)
    data = await run_in_threadpool(_plan_public, rec, store)
    body = json.dumps(data).encode()
    if rec.status == "done":
        cache.put(f"/v1/plans/{plan_id}", body)
    return Response(body, media_type="application/json")


@router.get(
    "/v1/plans/{plan_id}/launcher",
    response_model=LauncherPublic,
    tags=["plans"],
    summary="The emitted entry point, plan.json and torchrun command per host.",
    responses={404: _ERRORS[404], 409: _ERRORS[409], 422: _ERRORS[422]},
)
async def get_launcher(store: StoreDep, plan_id: str = _id()) -> Response:
    data = json.loads(_done_artifact(store, plan_id, "launcher"))
    if "error" in data:
        err = data["error"]
        # Launchers stored before error kinds were recorded carry none: they were all 422.
        kind = err.get("kind", ErrorKind.UNPROCESSABLE.value)
        raise JobFailure(err["type"], f"plan {plan_id} has no launcher: {err['message']}", kind=kind)
    return _json({"plan_id": plan_id, **data})


@router.get(
    "/v1/plans/{plan_id}/timeline",
    tags=["plans"],
    summary="The simulated iteration as Chrome-trace / Perfetto JSON (open in ui.perfetto.dev).",
    responses={
        200: {"content": {"application/json": {"schema": {"type": "object"}}}},
        404: _ERRORS[404],
        409: _ERRORS[409],
    },
)
async def get_timeline(store: StoreDep, cache: CacheDep, plan_id: str = _id()) -> Response:
    body = _done_artifact(store, plan_id, "timeline").encode()
    cache.put(f"/v1/plans/{plan_id}/timeline", body)
    return Response(body, media_type="application/json")


@router.get(
    "/v1/plans/{plan_id}/report",
    response_class=HTMLResponse,
    tags=["plans"],
    summary="A self-contained HTML report of the plan.",
    responses={404: _ERRORS[404], 409: _ERRORS[409]},
)
async def get_report(store: StoreDep, cache: CacheDep, plan_id: str = _id()) -> Response:
    rec = _require_plan(store, plan_id)
    _require_done(rec, "report")
    body = (await run_in_threadpool(_render_report, store, plan_id)).encode()
    cache.put(f"/v1/plans/{plan_id}/report", body, "text/html; charset=utf-8")
    return HTMLResponse(body)


def _done_artifact(store: Any, plan_id: str, name: str) -> str:
    """A finished plan's stored artifact (404 for an unknown plan or a missing artifact, 409 if not done)."""
    _require_done(_require_plan(store, plan_id), name)
    text = store.artifact(plan_id, name)
    if text is None:
        raise NotFoundError(f"plan {plan_id} has no {name} stored")
    return str(text)


def _render_report(store: Any, plan_id: str) -> str:
    from distplan.graph import OpGraph
    from distplan.plan import Plan
    from distplan.presentation.report import render_report
    from distplan.timeline import Timeline

    plan = Plan.from_json(store.artifact(plan_id, "plan"))
    graph_text = store.artifact(plan_id, "graph")
    timeline_text = store.artifact(plan_id, "timeline")
    graph = OpGraph.from_json(graph_text) if graph_text else None
    timeline = Timeline.from_chrome_trace(json.loads(timeline_text)) if timeline_text else None
    return render_report(plan, graph=graph, timeline=timeline)


# ---------------------------------------------------------------------------------------------- validations
@router.post(
    "/v1/plans/{plan_id}/validations",
    response_model=ValidationPublic,
    status_code=status.HTTP_202_ACCEPTED,
    tags=["validations"],
    summary="Validate a plan's numerics on CPU/gloo against a single-process run.",
    description=(
        "Runs the lowered plan for `steps` training steps, one process per rank on this server's CPU, and "
        "compares loss and every gradient with a single-process run. Models too large for the server are "
        "validated on a width-reduced copy (same layers, same cut points); the report says so. Answers `202` "
        "with the validation's URL, or `200` when the same validation exists."
    ),
    responses={200: {"model": ValidationPublic, "description": "Validated before."}, **_ERRORS},
)
async def create_validation(
    settings: SettingsDep,
    store: StoreDep,
    jobs: JobsDep,
    plan_id: str = _id(),
    body: ValidationCreate | None = Body(None),
) -> Response:
    rec = _require_plan(store, plan_id)
    _require_done(rec, "validation")
    spec = validation_spec(plan_id, rec.request, body or ValidationCreate(), settings=settings)
    plan_text = store.artifact(plan_id, "plan")
    if plan_text is None:
        raise NotFoundError(f"plan {plan_id} has no plan stored")
    payload = {
        "plan": json.loads(plan_text),
        "model": rec.request["model"],
        "batch": rec.request["batch"],
        "seq": rec.request["seq"],
        "steps": spec.request["steps"],
        "timeout_s": spec.request["timeout_s"],
    }
    vrec, job = await run_in_threadpool(
        jobs.submit,
        "validation",
        spec.id,
        spec.request,
        payload,
        timeout_s=spec.request["timeout_s"] + 30.0,
        parent_id=plan_id,
    )
    code = 202 if job is not None or vrec.status in ("queued", "running") else 200
    return _json(_validation_public(vrec, store), code, {"Location": f"/v1/validations/{vrec.id}"})


@router.get(
    "/v1/plans/{plan_id}/validations",
    response_model=list[ValidationPublic],
    tags=["validations"],
    summary="The validations of a plan.",
    responses={404: _ERRORS[404]},
)
async def list_validations(store: StoreDep, plan_id: str = _id()) -> Response:
    _require_plan(store, plan_id)
    return _json([_validation_public(v, store) for v in store.list_validations(plan_id)])


@router.get(
    "/v1/validations/{validation_id}",
    response_model=ValidationPublic,
    tags=["validations"],
    summary="A validation and, once done, its numerics report.",
    responses={404: _ERRORS[404]},
)
async def get_validation(store: StoreDep, validation_id: str = _id()) -> Response:
    rec = store.get("validation", validation_id)
    if rec is None:
        raise NotFoundError(f"no validation with id {validation_id!r}")
    return _json(_validation_public(rec, store))


# ---------------------------------------------------------------------------------------------- jobs
@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobPublic,
    tags=["jobs"],
    summary="A job's state.",
    responses={404: _ERRORS[404]},
)
async def get_job(store: StoreDep, job_id: str = _id()) -> Response:
    job = store.job(job_id)
    if job is None:
        raise NotFoundError(f"no job with id {job_id!r}")
    return _json(_job_public(job))


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobPublic,
    tags=["jobs"],
    summary="Cancel a queued or running job (a running one is stopped).",
    description="Answers the job after it has stopped (`status: failed`, error `Cancelled`). Retrying the same "
    "plan or validation request later runs it again.",
    responses={404: _ERRORS[404], 409: _ERRORS[409]},
)
async def cancel_job(jobs: JobsDep, job_id: str = _id()) -> JSONResponse:
    await run_in_threadpool(jobs.cancel, job_id)
    job = await jobs.wait(job_id, 10.0)
    assert job is not None
    return JSONResponse(_job_public(job))
