"""distplan.service: the REST API over the whole pipeline (FastAPI + uvicorn, SQLite, worker processes).

Run it::

    distplan serve --port 8000 --db plans.db --workers 2        # docs at http://127.0.0.1:8000/docs

or build the app yourself: ``distplan.service.app.create_app(Settings(...))``.

Resources
---------
==========================================  ========================================================
``POST /v1/plans``                          plan a model on a cluster (``?wait_s=`` how long to wait)
``GET  /v1/plans/{id}``                     status, plan, predictions, solver report, baselines
``GET  /v1/plans/{id}/launcher``            ``train.py``, ``plan.json``, torchrun command per host
``GET  /v1/plans/{id}/timeline``            simulated iteration, Chrome-trace / Perfetto JSON
``GET  /v1/plans/{id}/report``              self-contained HTML report
``POST /v1/plans/{id}/validations``         check the plan's numerics on CPU/gloo (202)
``GET  /v1/plans/{id}/validations``         the plan's validations
``GET  /v1/validations/{id}``               a validation and its report
``GET  /v1/jobs/{id}``, ``DELETE`` ...      the work behind a plan/validation; cancel it
``GET  /v1/clusters[/{name}]``              cluster presets
``GET  /v1/device-kinds``, ``/v1/models``   device-kind catalogue, built-in models
``GET  /healthz``, ``/readyz``              liveness; readiness (a worker has warmed up)
``/v1/schedulers/...``                      many jobs on one cluster: register a scheduler, submit,
                                            cancel, report progress; allocation, events, manifests
                                            (:mod:`~distplan.service.schedule_routes`)
==========================================  ========================================================

A plan request names a model as ``{"builtin": name, "config": {...}}``, ``{"hf_config": {...}}`` (the
contents of a Hugging Face ``config.json``) or ``{"graph": {...}}`` (an OpGraph JSON traced elsewhere), the
example input size (``batch``, ``seq``), a ``cluster`` (preset name or inline cluster), ``global_batch``
and optionally ``microbatches``, ``schedule``, ``dtype``, ``optimizer``, ``time_limit_s``. The plan id is the
hash of the canonical request, so the same request returns the same plan and is solved once. ``POST``
answers ``201`` with the plan if it is done within the short wait, ``202`` with the job's URL otherwise,
``200`` if it was planned before; a plan that fails within the wait is answered with its error.

Status of plans, validations and jobs: ``queued`` -> ``running`` -> ``done`` | ``failed``. A failure keeps
its error (type, message, kind; the HTTP status shown with it is derived from the kind). Failures that a
retry can fix (``Interrupted`` by a restart, ``Cancelled``, ``JobTimeout``, ``WorkerCrashed``) are run
again when the same request is sent again; the others (e.g. ``InfeasiblePlanError``) are final, because
the answer would be the same.

Health: ``/healthz`` is liveness (200 once the HTTP server runs; a probe that restarts the instance when it
fails), ``/readyz`` is readiness (200 once a worker process has warmed up, i.e. loaded torch and the tracer,
which takes seconds; 503 before). The API does not wait for readiness: requests are checked in the API
process itself (:mod:`~distplan.service.catalog`: built-in models, HF model types; presets; graph
structure), so a bad request is a 4xx and a valid one is queued (202) while the workers start.

Errors are ``{"error": {"type": ..., "message": ...}}`` with the status chosen in one place
(``distplan.service.errors``, from the error's kind): 400 malformed JSON, 404 unknown id, 409 wrong state
or cancelled, 413 body too large, 422 wrong content (the message names the field, or the memory that is
short), 429 queue full (with ``Retry-After``), 503 work cut off by a restart or a dead worker (send again).
Messages give advice a REST client can follow (request fields, not CLI flags; a traced graph, never a
code factory: :mod:`~distplan.service.advice`).

Safety: request bodies are size-limited; models come only from the built-in zoo, a config (never remote
code: ``auto_map``/``trust_remote_code`` are refused) or a graph (node count capped before parsing, then
linted); a cluster string is a preset name, never a path; no client string becomes a file name, an import
path or code; nothing is unpickled (workers exchange JSON).

Modules: ``app`` (factory), ``settings`` (``DISTPLAN_*``), ``routes``, ``models`` (pydantic bodies),
``specs`` (request checks, canonical form), ``catalog`` (what requests are checked against), ``store``
(SQLite), ``jobs`` (worker processes), ``work`` (what workers run), ``errors`` (kinds, HTTP statuses),
``advice`` (messages for REST clients), ``middleware`` (body limit), ``cache`` (finished responses),
``deps``, ``cli`` (``distplan serve``); the schedulers: ``schedule_routes``, ``schedule_models``,
``schedule_manager`` (live schedulers, admission, ticks), ``schedule_store`` (their SQLite tables),
``schedule_work`` (pricing in the workers). The HTML report page comes from ``distplan.presentation``.
"""
