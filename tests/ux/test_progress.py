"""The shared progress line: what it says for solver and validation events, and that it is quiet when
output is for machines (``--json``) or not a terminal."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest

from distplan.progress import ProgressLine, describe, progress_wanted


@dataclass(frozen=True)
class SolverLike:
    solutions: int
    objective_s: float
    bound_s: float
    gap: float
    elapsed_s: float


def test_describe_solver_event() -> None:
    line = describe(SolverLike(solutions=3, objective_s=0.212, bound_s=0.198, gap=0.066, elapsed_s=3.21))
    assert line == "3 solutions · best 212 ms · bound 198 ms · gap 6.6% · 3.2 s"
    assert describe(SolverLike(3, 0.212, 0.198, 0.066, 3.21), elapsed=False).endswith("gap 6.6%")


def test_describe_mapping_string_and_unknown_fields() -> None:
    assert describe({"phase": "running ranks", "rank": 2, "ranks": 4, "seconds": 1.5}) == (
        "running ranks · rank 2/4 · 1.5 s"
    )
    assert describe("tracing gpt2") == "tracing gpt2"
    assert describe({"message": "x", "speed": 1.23456}) == "x · speed=1.235"
    assert describe(None) == ""


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_wanted_only_on_a_terminal_and_never_for_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTPLAN_PROGRESS", raising=False)
    assert progress_wanted(stream=FakeTTY())
    assert not progress_wanted(stream=io.StringIO())
    assert not progress_wanted(json_out=True, stream=FakeTTY())
    monkeypatch.setenv("DISTPLAN_PROGRESS", "0")
    assert not progress_wanted(stream=FakeTTY())


def test_progress_line_is_silent_when_disabled(capfd: pytest.CaptureFixture[str]) -> None:
    with ProgressLine("solving", json_out=True) as show:
        show(SolverLike(1, 1.0, 0.5, 0.5, 0.1))
        show.set_title("validating")
        show({"phase": "ranks", "rank": 1, "ranks": 2})
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert show.last == "ranks · rank 1/2"  # still tracked, just not drawn
