"""Errors of the service, their kinds, and the kinds' HTTP status codes, in one place.

Every error body the service sends has one shape::

    {"error": {"type": "InfeasiblePlanError", "message": "stage 0 needs 81.2 GiB ... (1.2 GiB short)"}}

plus, where useful, more keys inside ``error`` (``plan_id``, ``retry_after_s``, ``errors`` for request
validation).

[Note: error mapping]
An error has a *type* (the exception class name, shown to the client) and a *kind* (:class:`ErrorKind`:
what went wrong, in the service's terms). The kind is what the workers report and what the database stores
for a failed job; the HTTP status is derived from the kind here, at the edge (:func:`http_status`), and
nowhere else. So a stored failure is answered with whatever status this table gives today, and a change of
HTTP policy needs no change of the workers or the database.

``DistplanError`` subclasses are the user's fault: a request whose content cannot be planned as asked
(``PlanError``, ``ProfileError``, ``GraphError``, ``ModelSpecError``, ``TraceError``, ``LoweringError``,
``InfeasiblePlanError`` naming the missing memory, ...) is ``unprocessable`` -> 422. The service's own: not
found -> 404, a conflict with the resource's state or a job cancelled by a client -> 409, a full queue ->
429 with ``Retry-After``. A job stopped by the server's time limit -> 422 (the request asks for more than
this server gives). Work cut off by a restart or a dead worker -> 503 (send the request again). Anything
else is a bug: 500 with a generic message (the traceback goes to the log, not to the client). Malformed
JSON (400) and a body over the size limit (413) are answered before any of this, by FastAPI and
:mod:`~distplan.service.middleware`.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distplan.errors import DistplanError

__all__ = [
    "ConflictError",
    "ErrorKind",
    "JobFailure",
    "NotFoundError",
    "QueueFullError",
    "ServiceError",
    "error_body",
    "http_status",
    "install_error_handlers",
    "kind_of",
    "legacy_kind",
    "status_for",
]

log = logging.getLogger("distplan.service")


class ErrorKind(str, Enum):
    """What went wrong, in the service's terms; stored with every failed job (see [Note: error mapping])."""

    MALFORMED = "malformed"
    """A service error of no more specific kind: the request itself is wrong."""
    UNPROCESSABLE = "unprocessable"
    """The request is well-formed but cannot be planned, traced, lowered or validated as asked."""
    NOT_FOUND = "not_found"
    """No such plan, job, validation, cluster preset or model."""
    CONFLICT = "conflict"
    """The request conflicts with the resource's state (e.g. cancelling a finished job)."""
    QUEUE_FULL = "queue_full"
    """The job queue is full; retry later."""
    CANCELLED = "cancelled"
    """A client cancelled the job; sending the request again runs it again."""
    TIMEOUT = "timeout"
    """The job ran past the server's wall-clock limit and was stopped."""
    INTERRUPTED = "interrupted"
    """The server stopped or restarted while the job was queued or running."""
    WORKER_CRASHED = "worker_crashed"
    """The worker process died while running the job (most likely out of memory)."""
    INTERNAL = "internal"
    """A bug in distplan."""

    @property
    def retryable(self) -> bool:
        """Whether running the same request again can give another answer (so a stored failure of this
        kind is re-run when the request comes again, instead of being answered as final)."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ErrorKind.CANCELLED,
        ErrorKind.TIMEOUT,
        ErrorKind.INTERRUPTED,
        ErrorKind.WORKER_CRASHED,
        ErrorKind.INTERNAL,
    }
)

# The one table of HTTP status codes (see [Note: error mapping]).
_HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.MALFORMED: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.CANCELLED: 409,
    ErrorKind.UNPROCESSABLE: 422,
    ErrorKind.TIMEOUT: 422,
    ErrorKind.QUEUE_FULL: 429,
    ErrorKind.INTERNAL: 500,
    ErrorKind.INTERRUPTED: 503,
    ErrorKind.WORKER_CRASHED: 503,
}


def http_status(kind: ErrorKind | str | None) -> int:
    """The HTTP status code of an error kind (an unknown or missing kind is a bug: 500)."""
    try:
        return _HTTP_STATUS[ErrorKind(kind)]
    except ValueError:
        return 500


class ServiceError(DistplanError):
    """An error of the service itself (not of the pipeline it runs)."""


class NotFoundError(ServiceError, LookupError):
    """No such plan, job, validation, cluster preset or model."""


class ConflictError(ServiceError):
    """The request conflicts with the resource's state (e.g. cancelling a finished job)."""


class QueueFullError(ServiceError):
    """The job queue is full; the client should retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobFailure(ServiceError):
    """A job ended without a result; carries the recorded error type, message and kind."""

    def __init__(self, error_type: str, message: str, *, kind: ErrorKind | str, **extra: Any) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.kind = kind
        self.extra = extra


# Most specific first: the first matching class decides. Every other ``DistplanError`` raised by the
# pipeline (model, graph, cluster, plan, trace, lowering, infeasible, ...) is the request's content.
_KIND_OF: tuple[tuple[type[BaseException], ErrorKind], ...] = (
    (NotFoundError, ErrorKind.NOT_FOUND),
    (ConflictError, ErrorKind.CONFLICT),
    (QueueFullError, ErrorKind.QUEUE_FULL),
    (ServiceError, ErrorKind.MALFORMED),
    (DistplanError, ErrorKind.UNPROCESSABLE),
)

# Error types the service records for failures that are not exceptions (jobs.py, store.py), by kind.
_SERVICE_TYPES: dict[str, ErrorKind] = {
    "Cancelled": ErrorKind.CANCELLED,
    "JobTimeout": ErrorKind.TIMEOUT,
    "Interrupted": ErrorKind.INTERRUPTED,
    "WorkerCrashed": ErrorKind.WORKER_CRASHED,
    "InternalError": ErrorKind.INTERNAL,
}


def kind_of(exc: BaseException) -> ErrorKind:
    """The kind of an exception (``internal`` for anything that is not a ``DistplanError``)."""
    if isinstance(exc, JobFailure):
        try:
            return ErrorKind(exc.kind)
        except ValueError:
            return ErrorKind.INTERNAL
    for cls, kind in _KIND_OF:
        if isinstance(exc, cls):
            return kind
    return ErrorKind.INTERNAL


def status_for(exc: BaseException) -> int:
    """The HTTP status code for an exception: :func:`http_status` of :func:`kind_of`."""
    return http_status(kind_of(exc))


def legacy_kind(error_type: str | None, status: int | None) -> ErrorKind:
    """The kind of a failure recorded by a service that stored HTTP status codes (database schema 1): by
    its error type where that names a kind, else the first kind answered with that status."""
    if error_type in _SERVICE_TYPES:
        return _SERVICE_TYPES[error_type]
    for kind, code in _HTTP_STATUS.items():
        if code == status:
            return kind
    return ErrorKind.INTERNAL


def error_body(error_type: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of every error answer."""
    return {"error": {"type": error_type, "message": message, **extra}}


def _describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every exception into ``{"error": {...}}`` with the right status."""

    @app.exception_handler(DistplanError)
    async def _distplan_error(request: Request, exc: DistplanError) -> JSONResponse:
        code = status_for(exc)
        headers = None
        extra: dict[str, Any] = {}
        if isinstance(exc, QueueFullError):
            headers = {"Retry-After": str(exc.retry_after_s)}
            extra["retry_after_s"] = exc.retry_after_s
        if isinstance(exc, JobFailure):
            extra.update(exc.extra)
            name = exc.error_type
        else:
            name = type(exc).__name__
        return JSONResponse(error_body(name, str(exc), **extra), status_code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [dict(e) for e in exc.errors()]
        if any(e.get("type") == "json_invalid" for e in errors):
            ctx = next((e.get("ctx") or {} for e in errors if e.get("type") == "json_invalid"), {})
            why = ctx.get("error", "cannot be parsed")
            return JSONResponse(
                error_body("MalformedJSON", f"request body is not valid JSON: {why}"), status_code=400
            )
        # pydantic's error entries can hold the offending input and exception objects: keep what is JSON.
        slim = [
            {
                "loc": [str(x) for x in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in errors[:20]
        ]
        return JSONResponse(
            error_body("RequestValidationError", _describe_validation_errors(errors), errors=slim),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        name = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge"}.get(
            exc.status_code, "HTTPError"
        )
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            # FastAPI's answer when the JSON parser itself gives up (e.g. nesting deeper than it recurses).
            name, message = (
                "MalformedJSON",
                "request body could not be parsed as JSON (malformed, or nested too deeply)",
            )
        return JSONResponse(
            error_body(name, message),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("InternalError", f"internal error ({type(exc).__name__}); see the server log"),
            status_code=500,
        )
