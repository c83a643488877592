"""The FastAPI application factory.

    from distplan.service.app import create_app
    from distplan.service.settings import Settings
    app = create_app(Settings(db="plans.db", workers=2))     # then: uvicorn.run(app)

or from the shell: ``distplan serve --port 8000 --db plans.db``. OpenAPI docs are at ``/docs``.

On startup the app reads its catalogue (built-in models, Hugging Face model types: what requests are
checked against, without torch), opens the database, marks jobs a previous server left unfinished as failed
(``Interrupted``), and starts the worker processes without waiting for them. From then on every route
answers: ``/healthz`` (liveness) is 200, requests are checked at once and valid work is queued (202);
``/readyz`` (readiness) answers 200 once a worker has warmed up and queued work runs. On shutdown it fails
what is still queued and stops the workers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from distplan.service.cache import CachedReads, ResponseCache
from distplan.service.catalog import load_catalog
from distplan.service.errors import install_error_handlers
from distplan.service.jobs import JobManager
from distplan.service.middleware import BodySizeLimit
from distplan.service.routes import router
from distplan.service.schedule_manager import ScheduleManager
from distplan.service.schedule_routes import router as schedule_router
from distplan.service.schedule_store import ScheduleStore
from distplan.service.settings import Settings
from distplan.service.store import Store

__all__ = ["create_app"]

log = logging.getLogger("distplan.service")

_DESCRIPTION = """
Plan how to split a PyTorch model into pipeline stages over a (mixed) GPU cluster, and check the plan's
numerics.

1. `POST /v1/plans` with a model (`{"builtin": "gpt-tiny"}`, `{"hf_config": {...config.json...}}` or
   `{"graph": {...}}`), the example input size (`batch`, `seq`), a `cluster` (preset name or inline) and
   the `global_batch`. The answer carries the plan's `id` and `status`.
2. Poll `GET /v1/plans/{id}` until `status` is `done` (or `failed`, with an `error`).
3. Read `GET /v1/plans/{id}/launcher` (entry point + torchrun commands), `/timeline` (Perfetto JSON) and
   `/report` (HTML).
4. `POST /v1/plans/{id}/validations`, then poll `GET /v1/validations/{vid}` for the numerics report.

Every error is a JSON body `{"error": {"type": ..., "message": ...}}`. The same request always maps to the
same plan id and is solved once.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service app; state (database, workers, cache) is created on startup and lives on
    ``app.state``."""
    settings = settings or Settings()
    cache = ResponseCache(settings.cache_entries)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        catalog = load_catalog()
        store = Store(settings.db)
        interrupted = store.recover()
        if interrupted:
            log.warning("marked %d job(s) interrupted by the previous shutdown as failed", interrupted)
        jobs = JobManager(store, settings, catalog)
        jobs.start()
        # Schedulers: restored from the database; jobs a previous server left being priced are settled.
        sstore = ScheduleStore(settings.db)
        schedules = ScheduleManager(store, sstore, jobs, settings, catalog)
        for sid, jid, service_job in schedules.start():
            schedules.watch(sid, jid, service_job)
        app.state.settings = settings
        app.state.catalog = catalog
        app.state.store = store
        app.state.jobs = jobs
        app.state.schedules = schedules
        try:
            yield
        finally:
            schedules.stop()
            jobs.stop()
            sstore.close()
            store.close()

    app = FastAPI(
        title="distplan",
        version="0.1.0",
        description=_DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {
                "name": "plans",
                "description": "Plan a model on a cluster; read the plan and what it produced.",
            },
            {"name": "validations", "description": "Check a plan's numerics on CPU/gloo."},
            {"name": "jobs", "description": "The work behind plans and validations; cancel it."},
            {
                "name": "schedulers",
                "description": "Many training jobs on one cluster: submit, cancel, report progress; read the "
                "allocation (devices and plan of each running job, why the others wait), the event log, and "
                "manifests (Kubernetes, Slurm) of running jobs. State survives restarts.",
            },
            {"name": "catalogue", "description": "Cluster presets, device kinds, built-in models."},
            {
                "name": "health",
                "description": "`/healthz`: liveness (the process answers). `/readyz`: readiness (a worker "
                "has warmed up; work submitted before is queued, not refused).",
            },
        ],
    )
    app.state.cache = cache
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(schedule_router)
    # Added last = outermost: the body limit first, then cached reads, then FastAPI.
    app.add_middleware(CachedReads, cache=cache)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
