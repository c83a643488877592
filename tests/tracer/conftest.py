"""Shared fixtures for the tracer tests: traced tiny models (cached per session) and factory modules."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from distplan.graph import OpGraph

_cache: dict[tuple[str, int, int, str], OpGraph] = {}


@pytest.fixture(scope="session")
def traced() -> Callable[..., OpGraph]:
    """``traced(name, batch=1, seq=32, device="meta")``: a traced zoo model, traced once per session."""
    from distplan.tracer import trace

    def get(name: str, *, batch: int = 1, seq: int = 32, device: str = "meta") -> OpGraph:
        key = (name, batch, seq, device)
        if key not in _cache:
            _cache[key] = trace(name, batch=batch, seq=seq, device=device)
        return _cache[key]

    return get


FACTORIES = '''
import torch
from torch import nn


class Untraceable(nn.Module):
    """Branches on a tensor's value: neither torch.export nor torch.fx can trace that."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.inner(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def untraceable():
    return Untraceable(), (torch.randn(2, 8),)


def wrong_shape():
    # the module wants 16 features; the example gives 12
    return nn.Sequential(nn.Linear(16, 4), nn.ReLU()), (torch.randn(2, 12),)


def plain_mlp():
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def with_example_inputs():
    return nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU())


with_example_inputs.example_inputs = lambda batch, seq: (torch.randn(batch, 3, seq),)


def raises():
    raise RuntimeError("factory exploded on purpose")


def not_a_module():
    return 42
'''


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module ``tracer_test_factories`` importable in this process and its subprocesses; returns its folder."""
    (tmp_path / "tracer_test_factories.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return str(tmp_path)
