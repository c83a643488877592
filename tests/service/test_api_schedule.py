"""Schedulers through the real server: a cluster's scheduler registered, jobs submitted (priced in the worker
pool, then admitted without a planner call in the decision), a high-priority arrival preempting a running
job, progress and completion reported, the allocation (devices and plan; why the others wait), the event
log, manifests, and bad input answered 4xx naming the field."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import yaml
from service_harness import ServerProcess

from distplan.profiles import device_kinds

# Multi-process: the real server runs uvicorn plus its worker processes.
pytestmark = pytest.mark.slow

#: One host of two A100s: two jobs that want both devices contend.
TWO_A100 = {
    "name": "two-a100",
    "kinds": [device_kinds()["a100-sxm-80g"].to_dict()],
    "hosts": [
        {
            "name": "node-a",
            "devices": [{"kind": "a100-sxm-80g", "count": 2}],
            "link": {"bandwidth_gbyte_s": 300, "latency_us": 5},
        }
    ],
    "network": {"bandwidth_gbit_s": 100, "latency_us": 20},
}


def _job(jid: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": jid,
        "model": {"builtin": "gpt-tiny"},
        "batch": 1,
        "seq": 16,
        "global_batch": 8,
        "min_devices": 1,
        "max_devices": 2,
        "total_steps": 100_000,
    }
    body.update(over)
    return body


def wait_admitted(c: httpx.Client, url: str, timeout_s: float = 240.0) -> dict[str, Any]:
    """Poll a scheduled job until it is no longer being priced."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = c.get(url)
        assert r.status_code == 200, r.text
        if r.json()["status"] != "pricing":
            return dict(r.json())
        assert time.monotonic() < deadline, f"{url} still pricing after {timeout_s} s"
        time.sleep(0.3)


def _error(r: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    for n in needles:
        assert n in err["message"], (n, err["message"])
    return dict(err)


def test_jobs_are_priced_admitted_preempted_and_reported(server: ServerProcess) -> None:
    with server.client() as c:
        r = c.post("/v1/schedulers", json={"name": "pair", "cluster": TWO_A100, "restart_overhead_s": 1.0})
        assert r.status_code == 201, r.text
        sched = r.json()
        assert (sched["cluster"], sched["num_devices"], sched["policy"]) == ("two-a100", 2, "distplan")
        base = sched["links"]["self"]
        assert c.get("/v1/schedulers").status_code == 200
        assert base in {s["links"]["self"] for s in c.get("/v1/schedulers").json()}

        low = c.post(f"{base}/jobs", json=_job("low", priority="low"), params={"wait_s": 30})
        assert low.status_code in (201, 202), low.text
        lo = wait_admitted(c, low.headers["location"])
        assert lo["status"] == "running" and lo["placement"]["devices"]
        # Priced in the worker pool at submission: the admission itself made no planner call.
        assert lo["pricing"]["planner_calls"] > 0 and lo["pricing"]["planner_calls_at_admission"] == 0

        # A high-priority job that needs both devices: the low one is stopped for it.
        high = c.post(
            f"{base}/jobs", json=_job("high", priority="high", min_devices=2), params={"wait_s": 30}
        )
        assert high.status_code in (201, 202), high.text
        hi = wait_admitted(c, high.headers["location"])
        assert hi["status"] == "running" and sorted(hi["placement"]["devices"]) == [0, 1]
        assert hi["pricing"]["planner_calls_at_admission"] == 0

        alloc = c.get(f"{base}/allocation").json()
        (run,) = alloc["running"]
        assert run["job_id"] == "high" and sorted(run["devices"]) == [0, 1]
        assert {s["devices"][0] for s in run["plan"]["stages"]} <= {0, 1}
        job_plan = c.get(f"{base}/jobs/high/plan").json()
        # One id for one plan: the allocation's, the job's and the plan's own (its manifest runs it).
        assert run["layout"] == job_plan["layout"] and run["plan_id"] == run["plan"]["id"] == job_plan["id"]
        assert c.get(f"{base}/jobs/high").json()["placement"]["plan_id"] == run["plan_id"]
        assert isinstance(run["shape_plan_id"], str) and run["shape_plan_id"]
        (waiting,) = alloc["waiting"]
        assert waiting["job_id"] == "low" and "held by jobs at its level" in waiting["reason"]
        assert c.get(f"{base}/jobs/low").json()["wait_reason"] == waiting["reason"]

        # An executor reports progress, then completion: the low job resumes.
        prog = c.post(f"{base}/jobs/high/progress", json={"steps_done": 25})
        assert prog.status_code == 200 and prog.json()["samples_done"] == 25 * 8
        assert c.post(f"{base}/jobs/high/finish").json()["status"] == "finished"
        resumed = c.get(f"{base}/jobs/low").json()
        assert resumed["status"] == "running" and resumed["preemptions"] == 1

        manifest = c.get(f"{base}/jobs/low/manifest", params={"format": "k8s"})
        assert manifest.status_code == 200
        _svc, job = yaml.safe_load_all(manifest.text)
        script = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
        assert "--model gpt-tiny" in script and "--resume /checkpoints/low" in script
        assert c.get(f"{base}/jobs/low/manifest", params={"format": "slurm"}).text.startswith("#!/bin/bash")

        cancelled = c.delete(f"{base}/jobs/low")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

        events = c.get(f"{base}/events").json()["events"]
        kinds = [(e["kind"], e["job_id"]) for e in events]
        assert kinds[:2] == [("arrival", "low"), ("start", "low")]
        for k in (("preempt", "low"), ("finish", "high"), ("cancel", "low")):
            assert k in kinds
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        tail = c.get(f"{base}/events", params={"after": 3, "limit": 2}).json()
        assert [e["seq"] for e in tail["events"]] == [4, 5] and tail["next_after"] == 5
        counts = c.get(base).json()["jobs"]
        assert counts == {"finished": 1, "cancelled": 1}


def test_a_job_whose_pricing_fails_is_rejected_with_the_reason(server: ServerProcess) -> None:
    with server.client() as c:
        base = c.post("/v1/schedulers", json={"cluster": TWO_A100}).json()["links"]["self"]
        # 7 is not a multiple of 2 heads: the worker cannot build the model.
        body = _job("odd", model={"builtin": "gpt-tiny", "config": {"n_embd": 7, "n_head": 2}})
        r = c.post(f"{base}/jobs", json=body, params={"wait_s": 60})
        if r.status_code == 202:
            r2 = wait_admitted(c, r.headers["location"])
            assert r2["status"] == "rejected" and r2["error"]["message"]
        else:
            err = _error(r, 422)
            assert "could not be priced" in err["message"]
        assert c.get(f"{base}/jobs/odd").json()["status"] == "rejected"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"cluster": "no-such-preset"}, 422, "unknown cluster preset"),
        ({"cluster": "a100x4-t4x4", "policy": "best"}, 422, "policy"),
        (
            {"cluster": "a100x4-t4x4", "policy_params": {"objective": "speed"}},
            422,
            "objective must be one of",
        ),
        ({"cluster": "a100x4-t4x4", "policy_params": {"colour": 1}}, 422, "colour"),
        (
            {"cluster": "a100x4-t4x4", "policy": "las", "policy_params": {"thresholds": "x"}},
            422,
            "thresholds",
        ),
        ({"cluster": "a100x4-t4x4", "pricing_time_limit_s": 0}, 422, "pricing_time_limit_s"),
        ({"cluster": "a100x4-t4x4", "extra": 1}, 422, "extra"),
    ],
)
def test_bad_scheduler_is_named(
    server: ServerProcess, body: dict[str, Any], status: int, needle: str
) -> None:
    with server.client() as c:
        _error(c.post("/v1/schedulers", json=body), status, needle)


def test_bad_jobs_and_events_are_named(server: ServerProcess) -> None:
    with server.client() as c:
        base = c.post("/v1/schedulers", json={"cluster": TWO_A100}).json()["links"]["self"]
        _error(c.get("/v1/schedulers/abc123"), 404, "no scheduler with id")
        _error(c.post("/v1/schedulers/abc123/jobs", json=_job("x")), 404, "no scheduler")
        _error(
            c.post(f"{base}/jobs", json=_job("x", min_devices=3, max_devices=2)),
            422,
            "min_devices 3 is above max_devices 2",
        )
        _error(
            c.post(f"{base}/jobs", json=_job("x", min_devices=4, max_devices=4)),
            422,
            "min_devices: 4 is more than",
        )
        _error(c.post(f"{base}/jobs", json=_job("x", priority="urgent")), 422, "priority")
        _error(c.post(f"{base}/jobs", json=_job("x", global_batch=0)), 422, "global_batch")
        _error(
            c.post(f"{base}/jobs", json=_job("x", model={"builtin": "nope"})), 422, "unknown built-in model"
        )
        _error(c.post(f"{base}/jobs", json=_job("bad id!")), 422, "id")
        _error(c.get(f"{base}/jobs/ghost"), 404, "has no job 'ghost'")
        _error(c.post(f"{base}/jobs/ghost/finish"), 404, "has no job 'ghost'")
        # A job the scheduler has: events that do not fit its state are conflicts.
        first = c.post(f"{base}/jobs", json=_job("one", min_devices=2), params={"wait_s": 60})
        wait_admitted(c, first.headers["location"])
        _error(c.post(f"{base}/jobs", json=_job("one")), 409, "already has a job 'one'")
        second = c.post(f"{base}/jobs", json=_job("two", min_devices=2), params={"wait_s": 60})
        assert wait_admitted(c, second.headers["location"])["status"] == "waiting"
        _error(c.post(f"{base}/jobs/two/finish"), 409, "job 'two' is waiting; only a running job can finish")
        _error(c.get(f"{base}/jobs/two/plan"), 409, "only a running job has a plan")
        _error(
            c.post(f"{base}/jobs/one/progress", json={"steps_done": 1, "samples_done": 8.0}),
            422,
            "exactly one",
        )
        _error(c.post(f"{base}/jobs/one/progress", json={"steps_done": -1}), 422, "steps_done")
        _error(c.get(f"{base}/jobs/one/manifest", params={"format": "xml"}), 422, "format")
        _error(c.get(f"{base}/events", params={"after": -1}), 422, "after")
        assert c.delete(f"{base}/jobs/one").json()["status"] == "cancelled"
        _error(c.delete(f"{base}/jobs/one"), 409, "job 'one' is cancelled")
        # The API documents the routes.
        paths = c.get("/openapi.json").json()["paths"]
        for p in (
            "/v1/schedulers",
            "/v1/schedulers/{scheduler_id}/jobs",
            "/v1/schedulers/{scheduler_id}/allocation",
            "/v1/schedulers/{scheduler_id}/events",
            "/v1/schedulers/{scheduler_id}/jobs/{job_id}/progress",
        ):
            assert p in paths, p
