"""The README tells the truth: its main command runs as written and says what it promises, its cluster
YAML loads, and every ``distplan`` command it mentions exists."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from distplan import cli
from distplan.profiles import load_cluster

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _setup_block() -> list[str]:
    """The lines of the first ``bash`` block under "Set-up: two commands"."""
    section = README.split("## Set-up: two commands", 1)
    assert len(section) == 2, "README lost its 'Set-up: two commands' section"
    m = re.search(r"```bash\n(.*?)```", section[1], re.S)
    assert m, "no bash block under 'Set-up: two commands'"
    return [ln.strip() for ln in m.group(1).strip().splitlines() if ln.strip()]


def main_command() -> str:
    """The main job exactly as the README writes it: the part of set-up command 1 that runs distplan."""
    lines = _setup_block()
    assert len(lines) == 2, f"the set-up block should hold two commands, found {len(lines)}"
    parts = [p.strip() for p in lines[0].split("&&")]
    runs = [p for p in parts if re.search(r"(^|/)distplan\s", p + " ")]
    assert len(runs) == 1, f"set-up command 1 should run distplan once: {lines[0]}"
    return runs[0]


def test_setup_commands_are_install_plus_main_job_then_tests() -> None:
    first, second = _setup_block()
    assert "pip install" in first and "-c constraints.txt" in first and "'.[dev]'" in first
    assert main_command() == ".venv/bin/distplan demo"
    assert second == ".venv/bin/python -m pytest -q"
    # CI runs the same two commands (.ci/run); keep them in step.
    ci = (ROOT / ".ci" / "run").read_text()
    assert first in ci and second in ci


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_readme_main_command_runs_as_written() -> None:
    argv = shlex.split(main_command())
    exe = ROOT / argv[0]
    if not exe.exists():
        # A checkout whose venv lives elsewhere: the same entry point of the interpreter running the tests.
        exe = Path(sys.executable).parent / "distplan"
    assert exe.exists(), exe
    r = subprocess.run([str(exe), *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=280)
    out = r.stdout
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{out}\nstderr:\n{r.stderr[-3000:]}"
    # A plan: its table with at least two stages.
    m = re.search(r"Plan: (\d+) stages x dp (\d+) on (\d+) of (\d+) devices", out)
    assert m, out
    assert int(m.group(1)) * int(m.group(2)) == int(m.group(3)) and int(m.group(1)) >= 2, out
    # A predicted iteration time and a real speed-up over the equal split.
    assert re.search(r"Predicted iteration time: [\d.]+ (ms|s)", out), out
    sp = re.search(r"Speed-up over equal split: ([\d.]+)x", out)
    assert sp and float(sp.group(1)) > 1.0, out
    # A passing validation of the lowered plan, with its numbers.
    v = re.search(r"Validation: PASSED .*max abs error ([\d.e+-]+)", out)
    assert v and float(v.group(1)) < 1e-3, out
    assert "Traceback" not in r.stderr


def test_readme_cluster_yaml_loads(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", README, re.S)
    assert blocks, "the README should show a cluster YAML"
    for i, text in enumerate(blocks):
        f = tmp_path / f"cluster{i}.yaml"
        f.write_text(text)
        c = load_cluster(f)
        assert c.num_devices >= 2
        assert len(c.kind_counts()) >= 2, "the example should be a mixed cluster"


def test_every_command_the_readme_mentions_exists() -> None:
    import typer

    names = set(typer.main.get_command(cli.app).commands)  # type: ignore[attr-defined]
    code = re.findall(r"```[a-z]*\n(.*?)```", README, re.S) + re.findall(r"`([^`\n]+)`", README)
    mentioned = {m for c in code for m in re.findall(r"(?:^|[\s/])distplan ([a-z][a-z-]+)", c)}
    assert mentioned, "the README tours no commands"
    assert mentioned <= names, f"README mentions unknown commands: {sorted(mentioned - names)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _distplan_exe() -> Path:
    exe = Path(sys.executable).parent / "distplan"
    assert exe.exists(), exe
    return exe


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_rest_examples_work_against_distplan_serve(tmp_path: Path) -> None:
    """The REST section's curl lines, run as written (port changed) against a real ``distplan serve``."""
    section = README.split("## REST API", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block in the REST section"
    lines = block.group(1).splitlines()
    assert lines[0].startswith("distplan serve --port 8000 &"), lines[0]
    port = _free_port()
    script = "\n".join(lines[1:]).replace("localhost:8000", f"127.0.0.1:{port}")
    assert "curl" in script and "$ID" in script and "$VID" in script
    script += '\necho\necho "ids: $ID $VID"\n'
    server = subprocess.Popen(
        [str(_distplan_exe()), "serve", "--port", str(port), "--db", str(tmp_path / "service.db")],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # the README's block waits for /readyz itself; this only waits for the port to open
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "distplan serve did not start within 60 s"
                time.sleep(0.5)
        r = subprocess.run(
            ["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=540
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        m = re.search(r"ids: ([0-9a-f]+) ([0-9a-f]+)", r.stdout)
        assert m, r.stdout[-2000:]
        plan_id, validation_id = m.groups()
        plan = httpx.get(f"http://127.0.0.1:{port}/v1/plans/{plan_id}", timeout=10).json()
        assert plan["status"] == "done" and plan["layout"].count("|") >= 2, plan.get("error")
        validation = httpx.get(f"http://127.0.0.1:{port}/v1/validations/{validation_id}", timeout=10).json()
        assert validation["status"] == "done", validation.get("error")
        assert validation["report"]["passed"] is True
        assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")
        assert "traceEvents" in json.loads((tmp_path / "timeline.json").read_text())
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
