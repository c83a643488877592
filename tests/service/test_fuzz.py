"""Schemathesis against the app's own OpenAPI schema, on the real server: no 5xx, every error a JSON body
with a type and a message, and 2xx bodies conform to the schema."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance
from service_harness import ServerProcess

from distplan.service.app import create_app
from distplan.service.settings import Settings

# Multi-process: the real server runs uvicorn plus its worker processes.
pytestmark = pytest.mark.slow

# The schema comes from the app object (building it starts nothing); requests go to the live server.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())

# Generating examples is the slow part (the plan body is deeply nested), not the server; with 8 per
# operation (plus schemathesis' own coverage examples) the fuzzing takes ~25 s on 2 busy cores.
MAX_EXAMPLES = 8


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_fuzz(case: schemathesis.Case, server: ServerProcess) -> None:
    response = case.call(base_url=server.url, timeout=60)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
    if response.status_code >= 400:
        content_type = (response.headers.get("content-type") or [""])[0]
        assert content_type.startswith("application/json"), (response.status_code, response.text)
        err = response.json()["error"]
        assert isinstance(err["type"], str) and err["type"]
        assert isinstance(err["message"], str) and err["message"]
    # The server stays healthy after whatever it was sent.
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
