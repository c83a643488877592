"""FastAPI dependencies, as ``Annotated`` aliases the routes declare (``store: StoreDep``).

Everything lives on ``app.state`` (set by :func:`distplan.service.app.create_app`), so two apps in one
process (as in the tests) never share state.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from distplan.service.cache import ResponseCache
from distplan.service.errors import NotReadyError
from distplan.service.jobs import JobManager
from distplan.service.settings import Settings
from distplan.service.store import Store

__all__ = ["CacheDep", "CatalogDep", "JobsDep", "SettingsDep", "StoreDep"]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_store(request: Request) -> Store:
    return request.app.state.store  # type: ignore[no-any-return]


def get_jobs(request: Request) -> JobManager:
    return request.app.state.jobs  # type: ignore[no-any-return]


def get_cache(request: Request) -> ResponseCache:
    return request.app.state.cache  # type: ignore[no-any-return]


def get_catalog(request: Request) -> dict[str, Any]:
    """The built-in models and HF model types, reported by the workers once they have started."""
    jobs: JobManager = request.app.state.jobs
    cat = jobs.catalog
    if cat is None:
        settings: Settings = request.app.state.settings
        raise NotReadyError(
            "the worker processes are still starting (they load torch and the tracer); retry shortly",
            retry_after_s=settings.retry_after_s,
        )
    return cat


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
CacheDep = Annotated[ResponseCache, Depends(get_cache)]
CatalogDep = Annotated[dict[str, Any], Depends(get_catalog)]
