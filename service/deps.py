"""FastAPI dependencies, as ``Annotated`` aliases the routes declare (``store: StoreDep``).

Everything lives on ``app.state`` (set by :func:`distplan.service.app.create_app`), so two apps in one
process (as in the tests) never share state.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from distplan.service.cache import ResponseCache
from distplan.service.catalog import Catalog
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


def get_catalog(request: Request) -> Catalog:
    """The built-in models and HF model types requests are checked against: the API process's own
    (:mod:`distplan.service.catalog`), so checks never wait for a worker."""
    return request.app.state.catalog  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
CacheDep = Annotated[ResponseCache, Depends(get_cache)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
