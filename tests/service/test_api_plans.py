"""The plan workflow through the real server: catalogue, plan (built-in and HF config) on a mixed preset,
poll, read plan / launcher / timeline / report, the same request again, a validation to a passing report."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from service_harness import wait_done

from distplan.plan import Plan
from distplan.profiles import preset_cluster

# Multi-process: the real server runs uvicorn plus its worker processes.
pytestmark = pytest.mark.slow

MIXED = "a100x4-t4x4"
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}


def _plan_until_done(client: httpx.Client, body: dict[str, Any]) -> tuple[httpx.Response, dict[str, Any]]:
    r = client.post("/v1/plans", json=body)
    assert r.status_code in (201, 202), r.text
    first = r.json()
    assert first["id"] and first["status"] in ("queued", "running", "done")
    assert r.headers["location"] == f"/v1/plans/{first['id']}"
    if r.status_code == 202:
        # Poll the job, as a client given only the job URL would.
        job_url = first["links"]["job"]
        deadline = time.monotonic() + 180
        while client.get(job_url).json()["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        job = client.get(job_url).json()
        assert job["kind"] == "plan" and job["subject_id"] == first["id"], job
    done = wait_done(client, f"/v1/plans/{first['id']}")
    assert done["status"] == "done", done
    return r, done


def test_health_and_catalogue(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["workers_ready"] == ready["workers"] == 2
    assert ready["queue_limit"] == 2

    clusters = {c["name"]: c for c in client.get("/v1/clusters").json()}
    assert MIXED in clusters and clusters[MIXED]["num_devices"] == preset_cluster(MIXED).num_devices
    one = client.get(f"/v1/clusters/{MIXED}").json()
    assert one["kinds"] == preset_cluster(MIXED).kind_counts()
    assert len(one["cluster"]["hosts"]) == 2

    kinds = client.get("/v1/device-kinds").json()
    assert {"a100-sxm-80g", "t4-16g"} <= {k["name"] for k in kinds}
    models = {m["name"] for m in client.get("/v1/models").json()}
    assert {"gpt-tiny", "llama-7b"} <= models

    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = client.get("/openapi.json").json()
    assert "/v1/plans" in spec["paths"] and "/v1/validations/{validation_id}" in spec["paths"]


def test_plan_builtin_model_on_mixed_cluster(client: httpx.Client) -> None:
    body = {"model": {"builtin": "gpt-tiny"}, "batch": 2, "seq": 32, "cluster": MIXED, "global_batch": 16}
    _, done = _plan_until_done(client, body)
    plan = Plan.from_dict(done["plan"])
    plan.check()
    assert done["layout"] == plan.layout
    assert done["predictions"]["iteration_time_s"] > 0
    assert done["solver"]["status"] in ("OPTIMAL", "FEASIBLE")
    assert isinstance(done["baselines"], dict) and done["baselines"]
    assert done["request"]["cluster"]["name"] == MIXED and done["request"]["model"] == {
        "builtin": "gpt-tiny",
        "config": {},
    }

    # The same request again: same id, no second solve.
    again = client.post("/v1/plans", json=body)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == done["id"] and again.json()["job_id"] == done["job_id"]
    assert again.json()["attempts"] == 1
    # The same request with keys in another order and the preset given inline is still the same plan.
    inline = dict(reversed(list(body.items())))
    inline["cluster"] = client.get(f"/v1/clusters/{MIXED}").json()["cluster"]
    assert client.post("/v1/plans", json=inline).json()["id"] == done["id"]

    launcher = client.get(f"/v1/plans/{done['id']}/launcher")
    assert launcher.status_code == 200, launcher.text
    lj = launcher.json()
    assert lj["plan_id"] == done["id"] and lj["model_spec"] == "gpt-tiny"
    assert any(name.endswith(".py") for name in lj["files"]), list(lj["files"])
    assert lj["commands"] and all("torchrun" in c for c in lj["commands"])
    assert len(lj["commands"]) == len({r["host"] for r in done["plan"]["rank_map"]})
    assert "plan.json" in lj["files"] and lj["local_command"].startswith("torchrun")

    timeline = client.get(f"/v1/plans/{done['id']}/timeline")
    assert timeline.status_code == 200
    events = timeline.json()["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and {e["cat"] for e in spans} >= {"fwd", "bwd"}

    report = client.get(f"/v1/plans/{done['id']}/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "<html" in report.text.lower() and plan.layout.split()[0] in report.text
    # The page draws the stored simulated timeline: one row per device the plan uses.
    assert report.text.count('class="tl-row"') == len(plan.devices_used)


def test_plan_hf_config_on_mixed_cluster(client: httpx.Client) -> None:
    body = {"model": {"hf_config": TINY_LLAMA}, "batch": 1, "seq": 64, "cluster": MIXED, "global_batch": 8}
    _, done = _plan_until_done(client, body)
    plan = Plan.from_dict(done["plan"])
    plan.check()
    assert plan.graph.name  # traced from the config
    assert done["request"]["model"]["hf_config"]["model_type"] == "llama"
    lj = client.get(f"/v1/plans/{done['id']}/launcher").json()
    assert lj["model_spec"] == "config.json" and '"llama"' in lj["files"]["config.json"]


def test_validation_to_passing_report(client: httpx.Client) -> None:
    body = {"model": {"builtin": "mlp-tiny"}, "batch": 4, "cluster": "cpu-local", "global_batch": 8}
    _, done = _plan_until_done(client, body)
    r = client.post(f"/v1/plans/{done['id']}/validations", json={"steps": 1})
    assert r.status_code == 202, r.text
    v = r.json()
    assert v["plan_id"] == done["id"] and r.headers["location"] == f"/v1/validations/{v['id']}"
    final = wait_done(client, f"/v1/validations/{v['id']}", timeout_s=240)
    assert final["status"] == "done", final
    report = final["report"]
    assert report["passed"] is True, report
    assert report["max_abs_error"] <= 1e-4
    listed = client.get(f"/v1/plans/{done['id']}/validations").json()
    assert [x["id"] for x in listed] == [v["id"]]
    # Asking again is the same validation, not a second run.
    again = client.post(f"/v1/plans/{done['id']}/validations", json={"steps": 1})
    assert again.status_code == 200 and again.json()["id"] == v["id"] and again.json()["attempts"] == 1


def test_validation_of_a_large_model_is_width_reduced(client: httpx.Client) -> None:
    # "mlp" has 269M parameters (1 GiB): too big to run 4 full copies here, so it is validated at
    # reduced width, with the same layers, cut positions and splits, and the report says so.
    body = {
        "model": {"builtin": "mlp"},
        "batch": 4,
        "cluster": "cpu-local",
        "global_batch": 8,
        "microbatches": 4,
    }
    _, done = _plan_until_done(client, body)
    # Split over the four devices one way or another (stages, tensor- or data-parallel groups).
    assert (
        len(done["plan"]["rank_map"]) == 4
        and len(done["plan"]["stages"]) + done["plan"]["stages"][0]["tp"] > 2
    )
    r = client.post(f"/v1/plans/{done['id']}/validations")
    assert r.status_code == 202, r.text
    final = wait_done(client, f"/v1/validations/{r.json()['id']}", timeout_s=300)
    assert final["status"] == "done", final
    report = final["report"]
    assert report["passed"] is True and report["width_reduced"] is True, report
    assert report["ranks"] == len(done["plan"]["rank_map"])


def test_solver_time_limit_is_capped_by_the_server(client: httpx.Client) -> None:
    # The test server caps solves at 10 s: a request for 3000 s is planned (and identified) as 10 s.
    body = {"model": {"builtin": "gpt-tiny"}, "batch": 1, "seq": 8, "cluster": MIXED, "global_batch": 2}
    _, capped = _plan_until_done(client, {**body, "time_limit_s": 3000})
    assert capped["request"]["time_limit_s"] == 10
    assert capped["plan"]["request"]["time_limit_s"] == 10
    assert capped["solver"]["seconds"] <= 10 + 1
    same = client.post("/v1/plans", json={**body, "time_limit_s": 10})
    assert same.status_code == 200 and same.json()["id"] == capped["id"]


def test_the_request_narrows_the_plan_space_over_rest(client: httpx.Client) -> None:
    body = {"model": {"builtin": "gpt-tiny"}, "batch": 1, "seq": 8, "cluster": MIXED, "global_batch": 8}
    _, done = _plan_until_done(
        client, {**body, "tensor_parallel": False, "recompute": ["full"], "shard": ["none"]}
    )
    stages = done["plan"]["stages"]
    assert all((s["tp"], s["recompute"], s["shard"]) == (1, "full", "none") for s in stages), done["layout"]
    assert done["request"]["recompute"] == ["full"] and done["request"]["tensor_parallel"] is False
    bad = client.post("/v1/plans", json={**body, "recompute": ["sometimes"]})
    assert bad.status_code == 422 and "recompute" in bad.text, bad.text
    empty = client.post("/v1/plans", json={**body, "shard": []})
    assert empty.status_code == 422 and "shard" in empty.text, empty.text
