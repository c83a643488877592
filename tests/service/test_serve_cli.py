"""``distplan serve``: its options, and bad settings refused at startup with the variable named."""

from __future__ import annotations

import os
import subprocess
import sys


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distplan.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_serve_help_lists_options() -> None:
    r = _serve("--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--host", "--port", "--db", "--workers"):
        assert opt in r.stdout


def test_bad_settings_are_refused_with_the_variable_named() -> None:
    r = _serve("--port", "0", env={"DISTPLAN_QUEUE_LIMIT": "-3"})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "DISTPLAN_QUEUE_LIMIT" in r.stderr and "Traceback" not in r.stderr
    r = _serve("--workers", "0")
    assert r.returncode == 2 and "--workers" in r.stderr
    # The worker start-up hook is a function spec, never a path or a command line.
    r = _serve("--port", "0", env={"DISTPLAN_WORKER_INIT": "rm -rf /"})
    assert r.returncode == 2 and "DISTPLAN_WORKER_INIT" in r.stderr and "Traceback" not in r.stderr
