"""Jobs through the real server: cancelling a running job kills its worker; a full queue answers 429."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from service_harness import ServerProcess

# Multi-process: the real server runs uvicorn plus its worker processes.
pytestmark = pytest.mark.slow


def _slow_body(global_batch: int) -> dict[str, object]:
    # Tracing a 7B Llama takes seconds here: long enough to be seen running and to be cancelled.
    return {
        "model": {"builtin": "llama-7b"},
        "batch": 1,
        "seq": 512,
        "cluster": "h100x8",
        "global_batch": global_batch,
    }


def _wait_status(
    client: httpx.Client, url: str, wanted: set[str], timeout_s: float = 120
) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(url).json()
        if body["status"] in wanted:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def test_cancel_running_job(server: ServerProcess, client: httpx.Client) -> None:
    r = client.post("/v1/plans", params={"wait_s": 0}, json=_slow_body(8))
    assert r.status_code == 202, r.text
    plan = r.json()
    job_url = plan["links"]["job"]
    _wait_status(client, job_url, {"running"})
    t0 = time.monotonic()
    cancelled = client.delete(job_url)
    assert cancelled.status_code == 200, cancelled.text
    job = cancelled.json()
    assert job["status"] == "failed" and job["error"]["type"] == "Cancelled"
    assert time.monotonic() - t0 < 10
    after = client.get(f"/v1/plans/{plan['id']}").json()
    assert after["status"] == "failed" and after["error"]["type"] == "Cancelled"
    # The killed worker is replaced; the same request then runs again (a cancellation is retryable).
    server.wait_up(ready=True)
    again = client.post("/v1/plans", params={"wait_s": 0}, json=_slow_body(8))
    assert again.status_code == 202 and again.json()["attempts"] == 2 and again.json()["id"] == plan["id"]
    assert client.delete(again.json()["links"]["job"]).json()["error"]["type"] == "Cancelled"
    server.wait_up(ready=True)


def test_full_queue_answers_429(server: ServerProcess, client: httpx.Client) -> None:
    # 2 workers + queue_limit 2: four distinct slow requests are accepted, the fifth is refused.
    bodies = [_slow_body(gb) for gb in (16, 32, 64, 128, 256)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: client.post("/v1/plans", params={"wait_s": 0}, json=b), bodies))
    codes = sorted(a.status_code for a in answers)
    assert codes == [202, 202, 202, 202, 429], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["retry-after"]) > 0
    err = refused.json()["error"]
    assert err["type"] == "QueueFullError" and "queue is full" in err["message"]
    # No request lost: every accepted one is a distinct plan with its own job.
    accepted = [a.json() for a in answers if a.status_code == 202]
    assert len({a["id"] for a in accepted}) == 4 and len({a["job_id"] for a in accepted}) == 4
    for a in accepted:
        r = client.delete(a["links"]["job"])
        assert r.status_code in (200, 409), r.text
        assert client.get(f"/v1/plans/{a['id']}").json()["status"] in ("failed", "done")
    server.wait_up(ready=True)
