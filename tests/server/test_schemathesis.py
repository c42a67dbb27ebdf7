"""Requests generated from /openapi.json (valid and invalid ones): never a 5xx, every 4xx the error envelope.

One server mounts every route `quiver serve` does (OpenAI, adapter admin, files and fine-tuning,
`/v1/flow`; see `tests.server.fuzzing`). The strategies come from schemathesis; hypothesis drives them directly because
schemathesis' own pytest plugin does not support this pytest version.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from server.openai import routes as routes_openai  # noqa: E402
from server.openapi import build_openapi  # noqa: E402
from tests.server.conftest import MODEL_NAME, LiveServer  # noqa: E402
from tests.server.fuzzing import GENERATION, MODES, Known, assert_not_a_server_error, cases  # noqa: E402

GENERATION_EXAMPLES = 30  # the OpenAI generation routes, where most of the validation lives
EXAMPLES = 10
# The spec itself, the Prometheus text, and the console's static files (a web page, not API: only
# names from a fixed table are served, tests/server/test_console.py).
UNDESCRIBED = {"GET /openapi.json", "GET /metrics", "GET /ui", "GET /ui/", "GET /ui/{name}"}


def _openapi_path(path: str) -> str:
    return re.sub(r"{([^}:]+):[^}]+}", r"{\1}", path)  # Starlette's `{name:convertor}` is OpenAPI's `{name}`


def test_every_mounted_route_is_described(operations: dict[str, Any], fuzz_live: LiveServer) -> None:
    mounted = {f"{method} {_openapi_path(route.path)}" for route in fuzz_live.app.routes
               for method in route.methods - {"HEAD"}}
    assert set(operations) == mounted - UNDESCRIBED


def test_every_described_operation_is_fuzzed(operations: dict[str, Any]) -> None:
    assert {label for label, _ in CASES} == set(operations)


def test_given_routes_only_those_are_described(fuzz_live: LiveServer) -> None:
    openai_only = build_openapi(routes=routes_openai.routes)
    assert set(openai_only["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}"}
    admin = [r for r in fuzz_live.app.routes if r.path.startswith("/v1/adapters") and "DELETE" not in r.methods]
    described = build_openapi(routes=admin)["paths"]
    assert {path: set(ops) for path, ops in described.items()} == {
        "/v1/adapters": {"get", "post"}, "/v1/adapters/{name}": {"get"}, "/v1/adapters/{name}/promote": {"post"},
        "/v1/adapters/{name}/demote": {"post"}}


def test_bodies_are_described_by_the_route_models(fuzz_live: LiveServer) -> None:
    with fuzz_live.http() as http:
        document = http.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    job = schemas["FineTuningJobCreate"]
    assert set(job["required"]) == {"model", "training_file"} and job["additionalProperties"] is False
    flow = schemas["FlowFineTuneCreate"]["properties"]
    assert flow["training_config"] == {"$ref": "#/components/schemas/FlowTrainingConfig"}
    post = document["paths"]["/v1/adapters"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/AdapterCreate"}
    assert set(post["responses"]) == {"201", "400", "409", "503"}
    error = {"$ref": "#/components/schemas/Error"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith("4"):
                    assert response["content"]["application/json"]["schema"] == error, (method, path, status)


CASES = [(label, mode) for label, modes in MODES.items() for mode in modes]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_no_server_errors(operations: dict[str, Any], fuzz_live: LiveServer, known: Known, label: str,
                          mode: GenerationMode) -> None:
    operation = operations[label]

    @given(case=cases(operation, mode, known))
    @settings(max_examples=GENERATION_EXAMPLES if label in GENERATION else EXAMPLES, deadline=None,
              derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        response = case.call(base_url=fuzz_live.base_url, timeout=30)
        assert_not_a_server_error(response.status_code, response.text,
                                  (case.path_parameters, case.query, case.body))

    check()


# hypothesis never generates lone surrogates, but JSON can carry them as `\ud800` escapes; the
# tokenizer, SQLite and the UTF-8 error body itself used to fail on them (a 500, or a dropped connection).
@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "\ud800", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udfffb"}]}),
    ("/v1/inference/chat/completions", {"model": "x\ud800", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/adapters", {"name": "fine", "source": "\udc80"}),
    ("/v1/fine_tuning/jobs", {"model": MODEL_NAME, "training_file": "file-\ud800"}),
    ("/v1/flow/projects", {"name": "\ud800 project", "description": "a project"}),
])
def test_lone_surrogates_are_refused(fuzz_live: LiveServer, path: str, body: dict[str, Any]) -> None:
    with fuzz_live.http() as http:
        response = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"


def test_paired_surrogates_are_text(fuzz_live: LiveServer) -> None:
    with fuzz_live.http() as http:
        response = http.post("/v1/flow/projects", content=json.dumps({"name": "\U0001f3f9 quiver", "description": "arrows and a bow"}),
                             headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "\U0001f3f9 quiver"

