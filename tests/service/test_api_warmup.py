"""The API answers while its workers warm up: bad requests get their 4xx, valid ones are queued (202) and run
once a worker is ready.

The server's one worker runs a real ``DISTPLAN_WORKER_INIT`` hook (``warmup_hook.wait_for_release``) that
holds its warm-up until the test creates a file, so "during the warm-up" is a fact the test controls and
checks (``/readyz`` is 503 before and after the requests), not a race against this machine's speed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_harness import ServerProcess, wait_done

# Multi-process: the real server runs uvicorn plus its worker process.
pytestmark = pytest.mark.slow

MIXED = "a100x4-t4x4"
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 128,
}


def _body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"builtin": "gpt-tiny"},
        "batch": 1,
        "seq": 16,
        "cluster": MIXED,
        "global_batch": 8,
    }
    body.update(over)
    return body


def _node(name: str, inputs: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "op": "call_function",
        "target": "aten.mm",
        "inputs": inputs,
        "outputs": [{"shape": [4, 4], "dtype": "float32", "nbytes": 64}],
        "fwd_flops": 128,
        "bwd_flops": 256,
    }


_CYCLE = {
    "schema_version": 1,
    "name": "g",
    "nodes": [_node("a", ["b"]), _node("b", ["a"])],
    "outputs": ["b"],
    "param_bytes": 0,
}

# (what is wrong, request body (dict) or raw bytes, status, error type, words the message must hold)
BAD_REQUESTS: list[tuple[str, Any, int, str, tuple[str, ...]]] = [
    ("malformed JSON", b'{"model": {"builtin": ', 400, "MalformedJSON", ("not valid JSON",)),
    ("string for an integer", _body(global_batch="16"), 422, "RequestValidationError", ("global_batch",)),
    ("misspelt field", _body(global_bach=8), 422, "RequestValidationError", ("global_bach",)),
    ("negative batch", _body(batch=-1), 422, "RequestValidationError", ("batch",)),
    (
        "two model forms",
        _body(model={"builtin": "gpt-tiny", "graph": {}}),
        422,
        "RequestValidationError",
        ("exactly one of",),
    ),
    ("unknown preset", _body(cluster="nope-cluster"), 422, "ProfileError", ("nope-cluster", MIXED)),
    (
        "unknown built-in model",
        _body(model={"builtin": "gpt-huge-9000"}),
        422,
        "ModelSpecError",
        ("gpt-huge-9000", "gpt-tiny", "llama-7b"),
    ),
    ("code path as a model", _body(model={"builtin": "os:system"}), 422, "ModelSpecError", ("code path",)),
    (
        "unknown model_type",
        _body(model={"hf_config": {"model_type": "definitely-not-a-model"}}),
        422,
        "ModelSpecError",
        ("definitely-not-a-model", "not a model type"),
    ),
    (
        "misspelt model_type",
        _body(model={"hf_config": {"model_type": "lamma"}}),
        422,
        "ModelSpecError",
        ("'lamma'", "llama"),
    ),
    (
        "remote code",
        _body(model={"hf_config": {"model_type": "llama", "auto_map": {"AutoModel": "x:Y"}}}),
        422,
        "ModelSpecError",
        ("auto_map", "remote code"),
    ),
    ("cyclic graph", _body(model={"graph": _CYCLE}), 422, "GraphError", ("cycle", "'a'")),
    ("microbatches not dividing", _body(microbatches=3), 422, "PlanError", ("divisible", "3")),
    (
        "too many layers",
        _body(model={"builtin": "gpt-tiny", "config": {"n_layer": 10**9}}),
        422,
        "ModelSpecError",
        ("n_layer", "512"),
    ),
]


@pytest.fixture(scope="module")
def cold_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    folder = tmp_path_factory.mktemp("warmup")
    release = folder / "release"
    here = str(Path(__file__).parent)
    srv = ServerProcess(
        folder / "plans.db",
        folder / "server.log",
        workers=1,
        env={
            "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p),
            "DISTPLAN_TEST_RELEASE_FILE": str(release),
        },
        worker_init="warmup_hook:wait_for_release",
        short_wait_s=0,
        default_time_limit_s=5,
    )
    srv.start(wait_ready=False)  # /healthz answers: the worker is still held in its warm-up
    yield srv, release
    release.touch()
    if srv.proc is not None and srv.proc.poll() is None:
        srv.stop()


def _not_ready(client: httpx.Client) -> None:
    r = client.get("/readyz")
    assert r.status_code == 503, r.text
    assert r.json()["workers_ready"] == 0 and r.json()["workers"] == 1


def test_bad_requests_during_warmup_get_their_4xx(cold_server: tuple[ServerProcess, Path]) -> None:
    srv, _ = cold_server
    with srv.client() as c:
        _not_ready(c)
        assert c.get("/healthz").json() == {"status": "ok"}
        for what, body, status, etype, needles in BAD_REQUESTS:
            if isinstance(body, bytes):
                r = c.post("/v1/plans", content=body, headers={"content-type": "application/json"})
            else:
                r = c.post("/v1/plans", json=body)
            assert r.status_code == status, (what, r.status_code, r.text)
            err = r.json()["error"]
            assert err["type"] == etype, (what, err)
            for needle in needles:
                assert needle in err["message"], (what, needle, err["message"])
        for url in ("/v1/plans/0123abcd", "/v1/jobs/0123abcd"):
            assert c.get(url).status_code == 404
        assert c.post("/v1/plans/0123abcd/validations", json={}).status_code == 404
        # The catalogue is the API's own: listed during the warm-up.
        models = c.get("/v1/models")
        assert models.status_code == 200 and {"gpt-tiny", "llama-7b"} <= {m["name"] for m in models.json()}
        _not_ready(c)  # every answer above came while the worker was still warming up


def test_valid_requests_during_warmup_are_queued_then_run(cold_server: tuple[ServerProcess, Path]) -> None:
    srv, release = cold_server
    bodies = [_body(), _body(model={"hf_config": TINY_LLAMA}, global_batch=4)]
    with srv.client() as c:
        _not_ready(c)
        accepted = []
        for body in bodies:
            r = c.post("/v1/plans", json=body)
            assert r.status_code == 202, r.text
            assert r.json()["status"] == "queued" and r.headers["location"] == f"/v1/plans/{r.json()['id']}"
            accepted.append(r.json())
        for a in accepted:  # nothing runs before a worker is ready
            assert c.get(a["links"]["job"]).json()["status"] == "queued"
        # The same request again while it waits: the same plan, no second job.
        again = c.post("/v1/plans", json=bodies[0])
        assert again.status_code == 202 and again.json()["job_id"] == accepted[0]["job_id"]
        _not_ready(c)

        release.touch()
        for a in accepted:
            done = wait_done(c, f"/v1/plans/{a['id']}", timeout_s=240)
            assert done["status"] == "done", done
            assert done["plan"]["stages"] and done["attempts"] == 1
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["workers_ready"] == 1
