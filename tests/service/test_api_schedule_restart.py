"""A restart of the real server keeps schedulers, jobs, allocations and the event log; a job whose pricing
the shutdown cut off is priced again and admitted after the restart; the scheduler goes on deciding."""

from __future__ import annotations

import pytest
from service_harness import ServerProcess
from test_api_schedule import TWO_A100, _job, wait_admitted

# Multi-process: the real server runs uvicorn plus its worker processes.
pytestmark = pytest.mark.slow


def test_restart_keeps_jobs_allocations_and_events(server: ServerProcess) -> None:
    with server.client() as c:
        base = c.post("/v1/schedulers", json={"name": "kept", "cluster": TWO_A100}).json()["links"]["self"]
        for jid, over in (("a", {"priority": "low"}), ("b", {"priority": "high"})):
            r = c.post(f"{base}/jobs", json=_job(jid, **over), params={"wait_s": 30})
            assert r.status_code in (201, 202), r.text
            wait_admitted(c, r.headers["location"])
        c.post(f"{base}/jobs/a/progress", json={"steps_done": 7})
        before = c.get(f"{base}/allocation").json()
        events = c.get(f"{base}/events").json()["events"]
        jobs = {j["id"]: j for j in c.get(f"{base}/jobs").json()}
        assert {p["job_id"] for p in before["running"]} == {"a", "b"}
        # Submitted just before the shutdown: a model not priced yet, so its pricing is cut off. It needs
        # both devices, one of which a high-priority job holds: it will wait, and change no placement.
        late = c.post(
            f"{base}/jobs",
            json=_job("late", model={"builtin": "gpt2-tiny"}, seq=8, priority="low", min_devices=2),
            params={"wait_s": 0},
        )
        assert late.status_code == 202 and late.json()["status"] == "pricing"
    assert server.stop() == 0
    server.start()
    with server.client() as c:
        after = c.get(f"{base}/allocation").json()
        # The running jobs, their devices and plans are those answered before the restart.
        assert sorted(after["running"], key=lambda p: p["job_id"]) == sorted(
            before["running"], key=lambda p: p["job_id"]
        )
        assert c.get(f"{base}/events").json()["events"][: len(events)] == events
        again = {j["id"]: j for j in c.get(f"{base}/jobs").json()}
        for jid in ("a", "b"):
            assert again[jid]["placement"] == jobs[jid]["placement"]
            assert again[jid]["status"] == "running"
        assert again["a"]["steps_done"] >= 7
        # The cut-off pricing ran again; the job is admitted and the scheduler decided about it.
        late_job = wait_admitted(c, f"{base}/jobs/late")
        assert late_job["status"] in ("waiting", "running")
        kinds = [(e["kind"], e["job_id"]) for e in c.get(f"{base}/events").json()["events"]]
        assert ("arrival", "late") in kinds
        # It goes on: a completion frees devices for the others.
        assert c.post(f"{base}/jobs/b/finish").json()["status"] == "finished"
        statuses = {j["id"]: j["status"] for j in c.get(f"{base}/jobs").json()}
        assert statuses["b"] == "finished" and "running" in (statuses["a"], statuses["late"])
    server.wait_up(ready=True)
