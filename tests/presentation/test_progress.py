"""The shared progress line: what it says for solver and validation events, and that it is quiet when
output is for machines (``--json``) or not a terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from distplan.presentation.progress import ProgressLine, describe, progress_wanted


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


@pytest.mark.timeout(200)
def test_demo_shows_progress_on_a_terminal_and_not_in_a_pipe(tmp_path: Path) -> None:
    """Through a real pseudo-terminal, ``distplan demo`` draws its progress line on stderr; through a pipe
    stderr stays empty."""
    (tmp_path / "c.yaml").write_text(
        "name: two\nhosts:\n  - name: h\n    devices: [{kind: cpu-epyc-2core, count: 2}]\n"
        "    link: {bandwidth_gbyte_s: 5}\n"
    )
    cmd = [sys.executable, "-m", "distplan.cli", "demo", "--model", "gpt-tiny", "--seq", "32",
           "--global-batch", "4", "--cluster", "c.yaml", "--no-validate"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DISTPLAN_PROGRESS"}
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        chunks: list[bytes] = []
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        out = proc.communicate(timeout=180)[0].decode()
    finally:
        os.close(master)
    assert proc.returncode == 0, out
    shown = b"".join(chunks).decode(errors="replace")
    # Each phase retitles the line; a phase shorter than a refresh (planning a tiny model) may not be drawn.
    assert "tracing gpt-tiny" in shown, shown[-2000:]
    assert "planning on two" in shown or "simulating one iteration" in shown, shown[-2000:]
    assert "Plan: " in out and "Plan: " not in shown  # results on stdout, progress on stderr

    piped = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
