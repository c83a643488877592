"""Bad input through the real server: each is a 4xx with a JSON error body whose message names the problem."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from service_harness import wait_done

# Multi-process: the real server runs uvicorn plus its worker processes.
pytestmark = pytest.mark.slow

MIXED = "a100x4-t4x4"


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


def _error(r: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["type"] and err["message"]
    for n in needles:
        assert n in err["message"], (n, err["message"])
    return err


def _graph(nodes: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    g: dict[str, Any] = {
        "schema_version": 1,
        "name": "g",
        "nodes": nodes,
        "outputs": [nodes[-1]["name"]],
        "param_bytes": 0,
    }
    g.update(over)
    return g


def _node(name: str, inputs: list[str], **over: Any) -> dict[str, Any]:
    n: dict[str, Any] = {
        "name": name,
        "op": "call_function",
        "target": "aten.mm",
        "inputs": inputs,
        "outputs": [{"shape": [4, 4], "dtype": "float32", "nbytes": 64}],
        "fwd_flops": 128,
        "bwd_flops": 256,
    }
    n.update(over)
    return n


def test_malformed_json(client: httpx.Client) -> None:
    r = client.post(
        "/v1/plans", content=b'{"model": {"builtin": ', headers={"content-type": "application/json"}
    )
    err = _error(r, 400, "not valid JSON")
    assert err["type"] == "MalformedJSON"


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"global_batch": "sixteen"}, "global_batch"),
        ({"global_batch": "16"}, "global_batch"),  # strict: a string is not an integer
        ({"batch": -1}, "batch"),
        ({"schedule": "zigzag"}, "schedule"),
        ({"time_limit_s": 10_000}, "time_limit_s"),
        ({"model": {"builtin": "gpt-tiny", "oops": 1}}, "oops"),
        ({"global_bach": 8}, "global_bach"),
    ],
)
def test_wrong_types_and_fields(client: httpx.Client, over: dict[str, Any], needle: str) -> None:
    body = _body(**over)
    err = _error(client.post("/v1/plans", json=body), 422, needle)
    assert err["type"] == "RequestValidationError"


def test_model_must_have_one_form(client: httpx.Client) -> None:
    for model in ({}, {"builtin": "gpt-tiny", "graph": {}}, "gpt-tiny"):
        _error(
            client.post("/v1/plans", json=_body(model=model)),
            422,
            "exactly one of 'builtin', 'hf_config' or 'graph'",
        )


def test_unparseable_nesting_is_400(client: httpx.Client) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    err = _error(client.post("/v1/plans", content=deep, headers={"content-type": "application/json"}), 400)
    assert err["type"] in ("BadRequest", "MalformedJSON")


def test_body_must_be_an_object(client: httpx.Client) -> None:
    _error(client.post("/v1/plans", json=[1, 2, 3]), 422)
    _error(client.post("/v1/plans", content=b"", headers={"content-type": "application/json"}), 422)


def test_unknown_preset_and_paths_are_not_read(client: httpx.Client) -> None:
    err = _error(client.post("/v1/plans", json=_body(cluster="nope-cluster")), 422, "nope-cluster", MIXED)
    assert err["type"] == "ProfileError"
    # A cluster string is a preset name only: never a file on the server.
    _error(client.post("/v1/plans", json=_body(cluster="/etc/passwd")), 422, "unknown cluster preset")
    _error(
        client.post("/v1/plans", json=_body(cluster="../device_profiles/clusters/h100x8.yaml")),
        422,
        "unknown",
    )


def test_bad_inline_cluster(client: httpx.Client) -> None:
    cluster = {
        "name": "c",
        "hosts": [
            {"name": "h", "devices": [{"kind": "tpu-v9", "count": 2}], "link": {"bandwidth_gbyte_s": 10}}
        ],
    }
    _error(client.post("/v1/plans", json=_body(cluster=cluster)), 422, "tpu-v9")
    huge = {
        "name": "c",
        "hosts": [
            {
                "name": "h",
                "devices": [{"kind": "t4-16g", "count": 4096}],
                "link": {"bandwidth_gbyte_s": 10},
                "repeat": 1024,
            }
        ],
        "network": {"bandwidth_gbit_s": 10},
    }
    _error(client.post("/v1/plans", json=_body(cluster=huge)), 422, "4096")


def test_inline_cluster_figures_out_of_range(client: httpx.Client) -> None:
    host = {"name": "h", "devices": [{"kind": "t4-16g", "count": 2}], "link": {"bandwidth_gbyte_s": 1e-300}}
    _error(
        client.post("/v1/plans", json=_body(cluster={"name": "c", "hosts": [host]})),
        422,
        "link bandwidth",
        "range",
    )
    kind = {"name": "k", "memory_bytes": 1, "memory_bandwidth_gbyte_s": 100, "peak_tflops": {"fp32": 10}}
    host = {"name": "h", "devices": [{"kind": "k", "count": 2}], "link": {"bandwidth_gbyte_s": 10}}
    cluster = {"name": "c", "kinds": [kind], "hosts": [host]}
    _error(client.post("/v1/plans", json=_body(cluster=cluster)), 422, "memory", "'k'")


def test_huge_body_is_413(client: httpx.Client) -> None:
    big = b'{"pad": "' + b"x" * (3 * 2**20) + b'"}'
    err = _error(
        client.post("/v1/plans", content=big, headers={"content-type": "application/json"}), 413, "limit"
    )
    assert err["type"] == "PayloadTooLarge"

    def chunks() -> Any:  # no Content-Length: counted as it arrives
        for _ in range(64):
            yield b"x" * 65536

    _error(client.post("/v1/plans", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_graph_with_cycle(client: httpx.Client) -> None:
    g = _graph([_node("a", ["b"]), _node("b", ["a"])])
    err = _error(client.post("/v1/plans", json=_body(model={"graph": g})), 422, "'a'", "cycle")
    assert err["type"] == "GraphError"


def test_graph_with_negative_sizes(client: httpx.Client) -> None:
    g = _graph([_node("a", [], fwd_flops=-3), _node("b", ["a"])])
    _error(client.post("/v1/plans", json=_body(model={"graph": g})), 422, "fwd_flops", "-3")
    g = _graph([_node("a", [], outputs=[{"shape": [4, -4], "dtype": "float32", "nbytes": 64}])])
    _error(client.post("/v1/plans", json=_body(model={"graph": g})), 422, "shape", "-4")


def test_graph_too_many_nodes(client: httpx.Client) -> None:
    nodes = [_node(f"n{i}", [f"n{i - 1}"] if i else []) for i in range(5001)]
    _error(client.post("/v1/plans", json=_body(model={"graph": _graph(nodes)})), 422, "5001", "5000")


def test_hf_config_unknown_model_type(client: httpx.Client) -> None:
    err = _error(
        client.post(
            "/v1/plans",
            json=_body(model={"hf_config": {"model_type": "definitely-not-a-model", "n_layer": 2}}),
        ),
        422,
        "definitely-not-a-model",
    )
    assert err["type"] == "ModelSpecError"
    _error(client.post("/v1/plans", json=_body(model={"hf_config": {"n_layer": 2}})), 422, "model_type")


def test_hf_config_remote_code_refused(client: httpx.Client) -> None:
    cfg = {"model_type": "llama", "auto_map": {"AutoModel": "evil.modeling:Model"}}
    _error(client.post("/v1/plans", json=_body(model={"hf_config": cfg})), 422, "auto_map", "remote code")
    cfg = {"model_type": "llama", "num_hidden_layers": 10**6}
    _error(client.post("/v1/plans", json=_body(model={"hf_config": cfg})), 422, "num_hidden_layers")


def test_layer_counts_are_capped(client: httpx.Client) -> None:
    # Tracing time grows with depth: a billion layers must not reach a worker.
    _error(
        client.post("/v1/plans", json=_body(model={"builtin": "gpt-tiny", "config": {"n_layer": 10**9}})),
        422,
        "n_layer",
        "512",
    )


def test_hf_errors_name_the_field_not_a_server_path(client: httpx.Client) -> None:
    cfg = {
        "model_type": "llama",
        "hidden_size": 66,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "vocab_size": 64,
    }
    r = client.post("/v1/plans", json=_body(model={"hf_config": cfg}))
    if r.status_code == 202:
        err = wait_done(client, f"/v1/plans/{r.json()['id']}")["error"]
    else:
        err = _error(r, 422, "hidden size")
    assert (
        err["type"] == "ModelSpecError"
        and err["message"].startswith("hf_config")
        and "/tmp" not in err["message"]
    )


def test_code_paths_are_refused(client: httpx.Client) -> None:
    for spec in ("os:system", "distplan.tracer.zoo:resolve_model", "../../x"):
        _error(client.post("/v1/plans", json=_body(model={"builtin": spec})), 422, "code path")
    _error(client.post("/v1/plans", json=_body(model={"builtin": "gpt-huge-9000"})), 422, "gpt-tiny")


def test_batch_arithmetic(client: httpx.Client) -> None:
    _error(client.post("/v1/plans", json=_body(global_batch=8, microbatches=3)), 422, "divisible", "3")
    _error(client.post("/v1/plans", json=_body(global_batch=8, microbatches=16)), 422, "microbatches")


def test_infeasible_model_names_the_shortfall(client: httpx.Client) -> None:
    tiny = {
        "name": "two-t4",
        "hosts": [
            {"name": "h", "devices": [{"kind": "t4-16g", "count": 2}], "link": {"bandwidth_gbyte_s": 16}}
        ],
    }
    r = client.post(
        "/v1/plans", json=_body(model={"builtin": "llama-7b"}, seq=128, cluster=tiny, global_batch=8)
    )
    if r.status_code == 202:  # tracing took longer than the short wait: the failure is on the plan
        done = wait_done(client, f"/v1/plans/{r.json()['id']}", timeout_s=180)
        assert done["status"] == "failed"
        err = done["error"]
        assert err["status"] == 422
    else:
        err = _error(r, 422)
        assert err["plan_id"]
    assert err["type"] == "InfeasiblePlanError", err
    assert "GiB" in err["message"], err["message"]


def test_not_found_and_conflicts(client: httpx.Client) -> None:
    _error(client.get("/v1/plans/0123abcd"), 404, "0123abcd")
    _error(client.get("/v1/jobs/0123abcd"), 404)
    _error(client.delete("/v1/jobs/0123abcd"), 404)
    _error(client.get("/v1/validations/0123abcd"), 404)
    _error(client.post("/v1/plans/0123abcd/validations"), 404)
    _error(client.get("/v1/clusters/nope"), 404, "nope")
    _error(client.get("/v1/nothing-here"), 404)
    _error(client.put("/v1/plans"), 405)
    _error(client.get("/v1/plans/NOT-HEX"), 422)


def test_validation_needs_a_buildable_model(client: httpx.Client) -> None:
    g = _graph([_node("a", [], param_bytes=1024), _node("b", ["a"])], param_bytes=1024)
    r = client.post("/v1/plans", json=_body(model={"graph": g}, cluster="cpu-local", global_batch=4))
    assert r.status_code in (201, 202), r.text
    done = wait_done(client, f"/v1/plans/{r.json()['id']}")
    assert done["status"] == "done", done
    _error(client.post(f"/v1/plans/{done['id']}/validations", json={}), 422, "uploaded graph")
    _error(client.post(f"/v1/plans/{done['id']}/validations", json={"steps": 0}), 422, "steps")
    # Finished jobs cannot be cancelled.
    _error(client.delete(f"/v1/jobs/{done['job_id']}"), 409, "already ended")


def test_encoder_decoder_config_is_told_what_the_service_takes(client: httpx.Client) -> None:
    # The tracer takes decoder-only and encoder models; its advice for others (a code factory) is not
    # something a REST client can send, so the service's answer points to a traced graph instead.
    cfg = {"model_type": "t5", "d_model": 32, "num_layers": 1, "num_heads": 2, "d_kv": 16, "vocab_size": 64}
    r = client.post("/v1/plans", json=_body(model={"hf_config": cfg}))
    if r.status_code == 202:
        err = wait_done(client, f"/v1/plans/{r.json()['id']}")["error"]
        assert err["status"] == 422
    else:
        err = _error(r, 422)
    assert err["type"] == "ModelSpecError" and "encoder-decoder" in err["message"], err
    assert '{"model": {"graph": ...}}' in err["message"] and "package.module:function" not in err["message"]
