"""Errors of the service and their HTTP status codes, in one place.

Every error body the service sends has one shape::

    {"error": {"type": "InfeasiblePlanError", "message": "stage 0 needs 81.2 GiB ... (1.2 GiB short)"}}

plus, where useful, more keys inside ``error`` (``plan_id``, ``retry_after_s``, ``errors`` for request
validation). :func:`status_for` maps an exception to its status code; the worker processes use it too, so a
failure recorded in the database carries the same code the route would have answered.

[Note: error mapping]
``DistplanError`` subclasses are the user's fault (4xx): a malformed request (``PlanError``,
``ProfileError``, ``GraphError``, ``ModelSpecError`` -> 422; the request was well-formed JSON but its content is
wrong), no plan fits (``InfeasiblePlanError`` -> 422, the message names the missing memory), a model that
cannot be traced (``TraceError`` -> 422). The service's own errors: not found -> 404, a conflict with the
resource's state -> 409, a full queue -> 429 with ``Retry-After``, too large -> 413, malformed JSON -> 400.
Anything else is a bug: 500 with a generic message (the traceback goes to the log, not to the client).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distplan.errors import (
    DistplanError,
    GraphError,
    InfeasiblePlanError,
    LoweringError,
    ModelSpecError,
    PlanError,
    ProfileError,
    TraceError,
    ValidationFailedError,
)

__all__ = [
    "ConflictError",
    "JobFailure",
    "NotFoundError",
    "NotReadyError",
    "QueueFullError",
    "ServiceError",
    "error_body",
    "install_error_handlers",
    "status_for",
]

log = logging.getLogger("distplan.service")


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


class NotReadyError(ServiceError):
    """The service cannot answer yet (workers still starting); retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobFailure(ServiceError):
    """A job ended without a result; carries the recorded error type, message and status code."""

    def __init__(self, error_type: str, message: str, *, status_code: int, **extra: Any) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.status_code = status_code
        self.extra = extra


# Most specific first: the first matching class decides (see [Note: error mapping]).
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (NotFoundError, 404),
    (ConflictError, 409),
    (QueueFullError, 429),
    (NotReadyError, 503),
    (InfeasiblePlanError, 422),
    (ModelSpecError, 422),
    (GraphError, 422),
    (ProfileError, 422),
    (PlanError, 422),
    (TraceError, 422),
    (LoweringError, 422),
    (ValidationFailedError, 422),
    (DistplanError, 400),
)


def status_for(exc: BaseException) -> int:
    """The HTTP status code for an exception (500 for anything that is not a ``DistplanError``)."""
    if isinstance(exc, JobFailure):
        return exc.status_code
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return 500


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
        if isinstance(exc, (QueueFullError, NotReadyError)):
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
