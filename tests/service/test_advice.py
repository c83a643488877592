"""Errors the service answers give advice a REST client can follow: the real messages of the tracer and the
lowering, as a worker reports them (``distplan.service.work``), name request fields and what the service
takes, never a ``package.module:function`` factory or a CLI flag it has no field for."""

from __future__ import annotations

import re
from typing import Any

import pytest

from distplan.errors import DistplanError
from distplan.service.advice import SERVICE_MODEL_FORMS, for_rest_client
from distplan.service.errors import ErrorKind, http_status
from distplan.service.work import _error_message, run_plan, run_validation


def _plan_payload(model: dict[str, Any], *, seq: int = 16) -> dict[str, Any]:
    from distplan.profiles import preset_cluster

    return {
        "request": {
            "model": model,
            "batch": 1,
            "seq": seq,
            "cluster": preset_cluster("cpu-local").to_dict(),
            "global_batch": 2,
            "microbatches": None,
            "schedule": None,
            "dtype": "fp32",
            "optimizer": "adam",
            "time_limit_s": 5,
        },
        "graph": None,
        "max_graph_nodes": 50_000,
        "solver_threads": 1,
    }


def _reply(task: str, payload: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(DistplanError) as info:
        (run_plan if task == "plan" else run_validation)(payload)
    reply = _error_message(info.value, task)
    assert reply["ok"] is False and "status" not in reply  # the worker reports a kind, not HTTP
    return reply


def _no_unfollowable_advice(message: str) -> None:
    assert "package.module:function" not in message, message
    assert "/tmp" not in message, message
    for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", message):
        assert "not a setting of this service" in message, (flag, message)


@pytest.mark.parametrize(
    "config",
    [
        # Encoder-decoder architectures (the tracer takes decoder-only and encoder models).
        {"model_type": "t5", "d_model": 32, "num_layers": 1, "num_heads": 2, "d_kv": 16, "vocab_size": 64},
        {"model_type": "bart", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "vocab_size": 64},
        # Not a text model: its forward takes pixel values.
        {
            "model_type": "vit",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 8,
        },
    ],
    ids=lambda c: c["model_type"],
)
def test_models_the_tracer_refuses_point_to_a_traced_graph(config: dict[str, Any]) -> None:
    reply = _reply("plan", _plan_payload({"hf_config": config}))
    assert reply["type"] == "ModelSpecError" and reply["kind"] == ErrorKind.UNPROCESSABLE.value
    message = reply["message"]
    assert message.startswith("hf_config"), message
    assert SERVICE_MODEL_FORMS in message and '{"model": {"graph": ...}}' in message
    _no_unfollowable_advice(message)
    assert http_status(reply["kind"]) == 422


def test_cli_flag_advice_names_the_request_field() -> None:
    # gpt2-tiny learned 512 positions; the tracer's advice is "use --seq 512 or less".
    reply = _reply("plan", _plan_payload({"builtin": "gpt2-tiny"}, seq=1024))
    message = reply["message"]
    assert "use seq 512 or less" in message, message
    _no_unfollowable_advice(message)


def test_server_limit_advice_says_where_the_option_applies() -> None:
    # A validation needing more rank processes than validate() runs here: its advice is a CLI/Python option.
    from distplan.lowering import validate
    from distplan.planner import evaluate
    from distplan.planner.synthetic import random_chain_graph

    # validate() counts the plan's ranks before it builds the model: any two-stage plan shows the advice.
    graph = random_chain_graph(0, nodes=6, scale=1e-3)
    cut = len(graph.nodes) // 2
    plan = evaluate(
        graph,
        cluster="cpu-local",
        layout=f"1f1b m2x1 | 0:{cut}@0 | {cut}:{len(graph.nodes)}@1",
        global_batch=2,
    )
    with pytest.raises(DistplanError) as info:
        validate(plan, "mlp-tiny", max_ranks=1)
    assert "--max-ranks" in str(info.value)  # the library's advice, for its own users
    message = _error_message(info.value, "validation")["message"]
    assert "--max-ranks: not a setting of this service" in message and "distplan validate" in message
    assert "/v1/plans/{id}/launcher" in message
    _no_unfollowable_advice(message)


def test_rewriting_keeps_everything_else() -> None:
    text = "stage 0 needs 4.6 GiB of 2.5 GiB (2.1 GiB short); use gpipe or a larger global batch"
    assert for_rest_client(text) == text
    assert for_rest_client("re-plan with --microbatches >= 4 or --global-batch 64.") == (
        "re-plan with microbatches >= 4 or global_batch 64."
    )
