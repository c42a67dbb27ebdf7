"""Requests generated from /openapi.json (valid and invalid ones): never a 5xx, every 4xx the error envelope,
every success the body the document describes.

One server mounts every route `quiver serve` does (OpenAI, adapter admin, files and fine-tuning,
`/v1/flow`; see `tests.server.fuzzing`). The strategies come from schemathesis; hypothesis drives them directly because
schemathesis' own pytest plugin does not support this pytest version. That the document lists exactly
the routes the app mounts is checked without an engine, in `test_openapi.py`.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from tests.server.conftest import MODEL_NAME, LiveServer  # noqa: E402
from tests.server.fuzzing import GENERATION, MODES, Known, assert_not_a_server_error, cases  # noqa: E402
from tests.server.spec_check import check_answer  # noqa: E402

GENERATION_EXAMPLES = 30  # the OpenAI generation routes, where most of the validation lives
EXAMPLES = 10


@pytest.fixture(scope="module")
def document(fuzz_live: LiveServer) -> dict[str, Any]:
    with fuzz_live.http() as http:
        return http.get("/openapi.json").json()


def test_every_described_operation_is_fuzzed(operations: dict[str, Any]) -> None:
    assert {label for label, _ in CASES} == set(operations)


def test_bodies_are_described_by_the_route_models(document: dict[str, Any]) -> None:
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
def test_no_server_errors(operations: dict[str, Any], document: dict[str, Any], fuzz_live: LiveServer, known: Known,
                          label: str, mode: GenerationMode) -> None:
    operation = operations[label]

    @given(case=cases(operation, mode, known))
    @settings(max_examples=GENERATION_EXAMPLES if label in GENERATION else EXAMPLES, deadline=None,
              derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        response = case.call(base_url=fuzz_live.base_url, timeout=30)
        request = (case.path_parameters, case.query, case.body)
        assert_not_a_server_error(response.status_code, response.text, request)
        if response.status_code < 300:
            content_type = response.headers.get("content-type") or [""]  # schemathesis: every value of a header
            check_answer(document, operation.method, operation.path, response.status_code, content_type[0],
                         response.text)

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

