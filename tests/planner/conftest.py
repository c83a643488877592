"""Shared fixtures: small clusters for exhaustive checks, synthetic graphs (no torch)."""

from __future__ import annotations

import pytest

from distplan.planner.synthetic import synthetic_transformer


@pytest.fixture(scope="session")
def small_transformer():
    return synthetic_transformer(layers=4, hidden=512, heads=8, seq=256, vocab=1000)


@pytest.fixture(scope="session")
def gpt2_xl():
    return synthetic_transformer("gpt2-xl", seq=1024)
