"""Requests generated from /openapi.json (valid and invalid ones): never a 5xx, every 4xx the error envelope.

One server mounts every route `quiver serve` does (OpenAI, adapter admin, files and fine-tuning,
`/v1/flow`). Valid requests sometimes get the ids of things that exist (adapters, a file, a job,
a project, a deployment) in place of random ones, so the handlers' work past "not found" is
exercised too. The strategies come from schemathesis; hypothesis drives them directly because
schemathesis' own pytest plugin does not support this pytest version.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from adapters.config import AdapterConfig  # noqa: E402
from server import routes_openai  # noqa: E402
from server.app import create_app  # noqa: E402
from server.openapi import build_openapi  # noqa: E402
from server.routes_adapters import adapter_routes  # noqa: E402
from server.state import ServerState  # noqa: E402
from server.wiring import stateful_routes  # noqa: E402
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME, LiveServer, engine_config  # noqa: E402

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
GENERATION_EXAMPLES = 30  # the OpenAI generation routes, where most of the validation lives
EXAMPLES = 10
ROOT_ADAPTERS = ["root-a", "root-b"]  # sources the register route can find under the adapter root
UNDESCRIBED = {"GET /openapi.json", "GET /metrics"}
TRAINING_LINE = json.dumps({"messages": [{"role": "user", "content": "Hello"},
                                         {"role": "assistant", "content": "Hi there."}]})


@dataclass
class Known:
    """Ids of things that exist on the fuzzed server, by path parameter name."""

    path: dict[str, list[Any]]
    file_id: str
    project_id: int
    job_id: str


@pytest.fixture(scope="module")
def fuzz_live(server_model_dir: Path, server_adapters: dict[str, Path],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from engine.async_engine import AsyncEngine

    root = tmp_path_factory.mktemp("adapter-root")
    for name, source in zip(ROOT_ADAPTERS, ADAPTER_NAMES[:2], strict=True):
        shutil.copytree(server_adapters[source], root / name)
    # A short context keeps the valid requests hypothesis generates (n up to 128) cheap.
    engine = AsyncEngine(engine_config(server_model_dir, max_model_len=24, max_num_seqs=64),
                         adapters=server_adapters, served_model_name=MODEL_NAME,
                         adapter_config=AdapterConfig(adapter_root=root))
    state = ServerState(engine)
    # Jobs the fuzzer manages to create fail at once instead of training on the shared CPU.
    routes = stateful_routes(state, adapter_routes(state), jobs_dir=tmp_path_factory.mktemp("jobs"),
                             base_model=str(server_model_dir), model_name=MODEL_NAME,
                             python=shutil.which("false") or "false", poll_interval=0.05)
    live = LiveServer(create_app(state, extra_routes=routes)).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def known(fuzz_live: LiveServer) -> Known:
    with fuzz_live.http() as http:
        upload = http.post("/v1/files", data={"purpose": "fine-tune"},
                           files={"file": ("train.jsonl", (TRAINING_LINE + "\n") * 2)})
        file_id = upload.raise_for_status().json()["id"]
        job = http.post("/v1/fine_tuning/jobs", json={"model": MODEL_NAME, "training_file": file_id})
        job_id = job.raise_for_status().json()["id"]
        project = http.post("/v1/flow/projects", json={"name": "fuzzed", "description": "made for the fuzzer"})
        project_id = project.raise_for_status().json()["id"]
        deployment = http.post("/v1/flow/deployments", json={
            "name": "fuzzed base", "description": "the base model", "model_type": "Base Model",
            "model_id": MODEL_NAME})
        deployment_id = deployment.raise_for_status().json()["id"]
    names = [*ADAPTER_NAMES[:3], ROOT_ADAPTERS[0]]
    return Known(path={"name": names, "model": [MODEL_NAME, *names], "file_id": [file_id], "job_id": [job_id],
                       "project_id": [project_id], "deployment_id": [deployment_id]},
                 file_id=file_id, project_id=project_id, job_id=job_id)


@pytest.fixture(scope="module")
def operations(fuzz_live: LiveServer) -> dict[str, Any]:
    schema = schemathesis.openapi.from_url(f"{fuzz_live.base_url}/openapi.json")
    return {result.ok().label: result.ok() for result in schema.get_all_operations()}


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


def _fill_bodies(label: str, body: dict[str, Any], known: Known, draw: Callable[[Any], Any]) -> None:
    """Point a valid body at things that exist, so the handler goes past its look-ups."""
    if label in ("POST /v1/files", "PUT /v1/flow/files", "POST /v1/flow/files"):
        body["file" if "file" in body else "files"] = TRAINING_LINE.encode() + b"\n"
    elif label == "POST /v1/adapters":
        body["source"] = draw(st.sampled_from(ROOT_ADAPTERS))
    elif label == "POST /v1/fine_tuning/jobs":
        body.update(model=MODEL_NAME, training_file=known.file_id)
    elif label == "POST /v1/flow/fine-tune":
        body["project_id"] = known.project_id
        if isinstance(body.get("training_config"), dict):
            body["training_config"].update(model=MODEL_NAME, training_files=[known.file_id])
    elif label == "POST /v1/flow/deployments":
        body["model_id"] = draw(st.sampled_from([MODEL_NAME, ADAPTER_NAMES[0], known.job_id]))


@st.composite
def _cases(draw: Callable[[Any], Any], operation: Any, mode: GenerationMode, known: Known) -> Any:
    case = draw(operation.as_strategy(generation_mode=mode))
    if mode is POSITIVE and draw(st.booleans()):
        for key in list(case.path_parameters or {}):
            if key in known.path:
                case.path_parameters[key] = draw(st.sampled_from(known.path[key]))
        if isinstance(case.body, dict):
            _fill_bodies(operation.label, case.body, known, draw)
    return case


GENERATION = ["POST /v1/chat/completions", "POST /v1/completions", "POST /v1/inference/chat/completions"]
BOTH, VALID = (POSITIVE, NEGATIVE), (POSITIVE,)  # VALID: nothing to make invalid (any string is a valid id)
# In order: deleting adapters comes after the routes that use them.
OPENAI = {"GET /health": VALID, "GET /ready": VALID, "GET /v1/models": VALID, "GET /v1/models/{model}": VALID, **dict.fromkeys(GENERATION, BOTH)}
ADMIN = {"GET /v1/adapters": VALID, "POST /v1/adapters": BOTH, "GET /v1/adapters/{name}": BOTH,
         "POST /v1/adapters/{name}/promote": BOTH, "POST /v1/adapters/{name}/demote": BOTH,
         "DELETE /v1/adapters/{name}": BOTH}
FINE_TUNING = {"POST /v1/files": BOTH, "GET /v1/files": VALID, "GET /v1/files/{file_id}": VALID,
               "POST /v1/fine_tuning/jobs": BOTH, "GET /v1/fine_tuning/jobs": BOTH,
               "GET /v1/fine_tuning/jobs/{job_id}": VALID, "GET /v1/fine_tuning/jobs/{job_id}/events": BOTH,
               "GET /v1/fine_tuning/jobs/{job_id}/checkpoints": BOTH, "POST /v1/fine_tuning/jobs/{job_id}/cancel": VALID}
FLOW = {"POST /v1/flow/projects": BOTH, "GET /v1/flow/projects": BOTH, "GET /v1/flow/projects/{project_id}": BOTH,
        "PUT /v1/flow/files": BOTH, "POST /v1/flow/files": BOTH, "GET /v1/flow/files": BOTH,
        "GET /v1/flow/files/{file_id}": VALID, "POST /v1/flow/fine-tune": BOTH, "GET /v1/flow/fine-tunes": VALID,
        "GET /v1/flow/fine-tunes/{job_id}": VALID, "GET /v1/flow/fine-tunes/{job_id}/events": VALID,
        "PUT /v1/flow/fine-tunes/{job_id}/cancel": VALID, "POST /v1/flow/fine-tunes/{job_id}/cancel": VALID,
        "POST /v1/flow/deployments": BOTH, "GET /v1/flow/deployments": BOTH,
        "GET /v1/flow/deployments/{deployment_id}": VALID, "PUT /v1/flow/deployments/{deployment_id}/promote": VALID,
        "POST /v1/flow/deployments/{deployment_id}/promote": VALID,
        "PUT /v1/flow/deployments/{deployment_id}/demote": VALID,
        "POST /v1/flow/deployments/{deployment_id}/demote": VALID, "GET /v1/flow/models": VALID}
CASES = [(label, mode) for group in (OPENAI, ADMIN, FINE_TUNING, FLOW) for label, modes in group.items()
         for mode in modes]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_no_server_errors(operations: dict[str, Any], fuzz_live: LiveServer, known: Known, label: str,
                          mode: GenerationMode) -> None:
    operation = operations[label]

    @given(case=_cases(operation, mode, known))
    @settings(max_examples=GENERATION_EXAMPLES if label in GENERATION else EXAMPLES, deadline=None,
              derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        response = case.call(base_url=fuzz_live.base_url, timeout=30)
        assert response.status_code < 500, (case.path_parameters, case.query, case.body, response.text)
        if response.status_code >= 400:
            assert response.status_code != 422
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, response.text
            assert isinstance(error["message"], str) and isinstance(error["type"], str), response.text

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

