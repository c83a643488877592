"""Fixtures of the scheduler tests: tiny synthetic graphs (no torch)."""

from __future__ import annotations

from typing import Any

import pytest
from scheduler_helpers import FAT, TINY

from distplan.scheduler import GraphSource


@pytest.fixture(scope="session")
def sources() -> dict[str, GraphSource]:
    return {"tiny": GraphSource("synthetic", dict(TINY)), "fat": GraphSource("synthetic", dict(FAT))}


@pytest.fixture(scope="session")
def graphs(sources: dict[str, GraphSource]) -> dict[str, Any]:
    return {k: v.load() for k, v in sources.items()}
