"""The in-graph cost fit of ``distplan.profiler.reference`` (least squares, coefficients kept >= 0)."""

from __future__ import annotations

import pytest

from distplan.profiler.reference import _fit


def test_fit_recovers_per_node_and_per_byte_costs() -> None:
    per_node, per_byte = 9e-6, 1.5e-10
    runs = [(120.0, 3e6), (120.0, 12e6), (80.0, 9e6), (80.0, 36e6)]
    rows = [(n, x, per_node * n + per_byte * x) for n, x in runs]
    a, c = _fit(rows)
    assert a == pytest.approx(per_node) and c == pytest.approx(per_byte)


def test_fit_keeps_coefficients_non_negative() -> None:
    # Gaps that fall with the bytes would need a negative per-byte cost: it is dropped, nodes alone fit.
    rows = [(100.0, 1e6, 1e-3), (100.0, 4e6, 0.9e-3), (50.0, 1e6, 0.5e-3)]
    a, c = _fit(rows)
    assert c == 0.0 and a > 0
    assert _fit([(100.0, 1e6, -1e-3), (50.0, 2e6, -2e-3)]) == (0.0, 0.0)
