"""Restarts: plans survive a restart of the server; a job cut off by a crash is failed with a reason at the
next start (never left running), its worker processes do not outlive the server, and retrying runs it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from service_harness import ServerProcess, wait_done

# Multi-process: the real server runs uvicorn plus its worker processes.
pytestmark = pytest.mark.slow

MIXED = "a100x4-t4x4"


def _children(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces: the fields after its closing parenthesis are fixed.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


def test_restart_reads_the_same_plan_back(server: ServerProcess) -> None:
    body = {"model": {"builtin": "gpt-tiny"}, "batch": 1, "seq": 16, "cluster": MIXED, "global_batch": 4}
    with server.client() as c:
        r = c.post("/v1/plans", json=body)
        assert r.status_code in (201, 202), r.text
        done = wait_done(c, f"/v1/plans/{r.json()['id']}")
        assert done["status"] == "done", done
    assert server.stop() == 0
    server.start()
    with server.client() as c:
        back = c.get(f"/v1/plans/{done['id']}")
        assert back.status_code == 200
        assert back.json()["plan"] == done["plan"] and back.json()["status"] == "done"
        again = c.post("/v1/plans", json=body)
        assert again.status_code == 200 and again.json()["attempts"] == 1
        assert c.get(f"/v1/plans/{done['id']}/timeline").status_code == 200


def test_job_cut_off_by_a_crash_is_failed_at_next_start(server: ServerProcess) -> None:
    body = {
        "model": {"builtin": "llama-13b"},
        "batch": 1,
        "seq": 256,
        "cluster": "h100x8",
        "global_batch": 24,
    }
    with server.client() as c:
        r = c.post("/v1/plans", params={"wait_s": 0}, json=body)
        assert r.status_code == 202, r.text
        plan_id, job_url = r.json()["id"], r.json()["links"]["job"]
        deadline = time.monotonic() + 60
        while c.get(job_url).json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert server.proc is not None
    workers = _children(server.proc.pid)
    assert len(workers) >= 2, workers
    server.proc.send_signal(signal.SIGKILL)  # a crash: no shutdown code runs
    server.proc.wait(timeout=10)
    # The workers notice their parent is gone and take their process groups down with them.
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in workers):
        assert time.monotonic() < deadline, [p for p in workers if _alive(p)]
        time.sleep(0.2)

    server.start()
    with server.client() as c:
        rec = c.get(f"/v1/plans/{plan_id}").json()
        assert rec["status"] == "failed", rec
        assert rec["error"]["type"] == "Interrupted" and "restarted" in rec["error"]["message"]
        assert c.get(job_url).json()["status"] == "failed"
        # Retrying runs it again (attempt 2); cancel it so it does not load the machine.
        again = c.post("/v1/plans", params={"wait_s": 0}, json=body)
        assert again.status_code == 202 and again.json()["attempts"] == 2
        assert c.delete(again.json()["links"]["job"]).status_code == 200
    server.wait_up(ready=True)
