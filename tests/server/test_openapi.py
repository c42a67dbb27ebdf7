"""The OpenAPI document is written from the route table, so it lists exactly what the app mounts; the
middleware and the adapter journal take their paths from the same table; every answer is a model.

These tests build the app `quiver serve` builds without an engine (no request here needs one);
`test_openapi_answers.py` checks real answers against the document.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from server.admin.adapters import adapter_routes
from server.admin.journal import journaled, journaled_routes
from server.app import create_app
from server.http.middleware import BodySizeLimit, ConcurrencyLimit, MaxTokensCeiling, RequestContextMiddleware
from server.http.routing import ApiRoute, Operation, Param, flagged_paths
from server.limits import Limits
from server.openai import routes as routes_openai
from server.openapi import build_openapi, components
from server.state import ServerState
from server.store import Store
from server.wiring import build_stateful

GENERATION = {"/v1/chat/completions", "/v1/completions", "/v1/inference/chat/completions", "/v1/responses"}
UPLOADS = {"/v1/files", "/v1/flow/files"}
QUIET = {"/health", "/ready", "/metrics"}
# No JSON API: the document itself, the Prometheus text, the console's pages.
UNDOCUMENTED = {"GET /openapi.json", "GET /metrics", "GET /ui", "GET /ui/", "GET /ui/{name}"}
JOURNALED = {"POST /v1/adapters": "register", "DELETE /v1/adapters/{name}": "delete",
             "POST /v1/adapters/{name}/promote": "pin", "POST /v1/adapters/{name}/demote": "unpin"}
MAIN_ANSWERS = ["ChatCompletion", "ChatCompletionChunk", "Completion", "CompletionChunk", "ModelList", "Model",
                "Error", "Adapter", "AdapterList", "AdapterDeleted", "FineTuningJob", "FineTuningJobList",
                "FileObject", "Response", "FlowFineTune", "FlowDeployment"]


def _never_loads() -> Any:
    raise RuntimeError("these tests need no engine")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Starlette]:
    """The app `quiver serve` builds (every surface), with every limit on so that every middleware is in."""
    state = ServerState(engine_factory=_never_loads)
    stateful = build_stateful(state, adapter_routes(state), jobs_dir=tmp_path_factory.mktemp("jobs"),
                              base_model="base", model_name="tiny-base")
    yield create_app(state, stateful=stateful, limits=Limits(max_request_bytes=1 << 20, max_tokens=64,
                                                             max_concurrent_requests=4))
    stateful.store.close()


@pytest.fixture(scope="module")
def document(app: Starlette) -> dict[str, Any]:
    return TestClient(app).get("/openapi.json").json()


def _operations(routes: list[Any]) -> set[str]:
    return {f"{method} {route.path_format}" for route in routes if isinstance(route, Route)
            for method in route.methods - {"HEAD"}}


def test_the_document_lists_exactly_what_the_app_mounts(app: Starlette, document: dict[str, Any]) -> None:
    described = {f"{method.upper()} {path}" for path, ops in document["paths"].items() for method in ops}
    assert described == _operations(app.routes) - UNDOCUMENTED
    assert _operations(app.routes) >= UNDOCUMENTED


def test_every_route_of_the_app_is_in_the_table(app: Starlette) -> None:
    assert [route.path for route in app.routes if not isinstance(route, ApiRoute)] == []


def test_given_routes_only_those_are_described(app: Starlette) -> None:
    assert set(build_openapi(routes_openai.routes)["paths"]) == {
        "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}"}
    admin = [r for r in app.routes if r.path.startswith("/v1/adapters") and "DELETE" not in r.methods]
    described = build_openapi(admin)["paths"]
    assert {path: set(ops) for path, ops in described.items()} == {
        "/v1/adapters": {"get", "post"}, "/v1/adapters/{name}": {"get"}, "/v1/adapters/{name}/promote": {"post"},
        "/v1/adapters/{name}/demote": {"post"}}


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    return document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]


def test_every_success_answer_is_a_model(document: dict[str, Any]) -> None:
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                for media_type, content in answer["content"].items():
                    model = _resolve(document, content["schema"])
                    assert model["type"] == "object" and model["properties"], (method, path, status, media_type)


@pytest.mark.parametrize("name", MAIN_ANSWERS)
def test_main_answers_name_their_fields(document: dict[str, Any], name: str) -> None:
    model = document["components"]["schemas"][name]
    assert set(model["required"]) <= set(model["properties"]) and len(model["required"]) >= 1


@pytest.mark.parametrize(("path", "chunk"), [("/v1/chat/completions", "ChatCompletionChunk"),
                                             ("/v1/completions", "CompletionChunk"),
                                             ("/v1/inference/chat/completions", "ChatCompletionChunk"),
                                             ("/v1/responses", "ResponseStreamEvent")])
def test_streaming_routes_document_their_events(document: dict[str, Any], path: str, chunk: str) -> None:
    content = document["paths"][path]["post"]["responses"]["200"]["content"]
    assert content["text/event-stream"]["schema"] == {"$ref": f"#/components/schemas/{chunk}"}
    assert "application/json" in content


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
    missing = {ref for ref in refs if ref.rsplit("/", 1)[1] not in document["components"]["schemas"]}
    assert refs and missing == set()


def _middleware(app: Starlette, cls: type) -> dict[str, Any]:
    [found] = [m.kwargs for m in app.user_middleware if m.cls is cls]
    return found


def test_the_middleware_watches_the_flagged_routes(app: Starlette) -> None:
    assert flagged_paths(app.routes, "generation") == GENERATION
    assert flagged_paths(app.routes, "upload") == UPLOADS
    assert flagged_paths(app.routes, "quiet") == QUIET
    assert _middleware(app, ConcurrencyLimit)["paths"] == GENERATION
    assert _middleware(app, MaxTokensCeiling)["paths"] == GENERATION
    assert _middleware(app, BodySizeLimit)["exempt"] == UPLOADS
    assert _middleware(app, RequestContextMiddleware)["quiet"] == QUIET


def test_the_generation_ceiling_applies_on_every_generation_route(app: Starlette) -> None:
    http = TestClient(app)
    for path in sorted(GENERATION):
        answer = http.post(path, json={"model": "tiny-base", "max_tokens": 65})
        assert answer.status_code == 400, (path, answer.text)
        assert answer.json()["error"]["code"] == "max_tokens_exceeded", (path, answer.text)
    answer = http.post("/tokenize", json={"model": "tiny-base", "prompt": "hi", "max_tokens": 65})
    assert answer.status_code == 503  # not a generation route: the ceiling does not look at it


def test_the_journal_records_the_adapter_changes_the_table_flags(app: Starlette) -> None:
    recorded = {f"{route.declared_methods[0]} {route.path}": route.operation.journal
                for route in journaled_routes(app.routes)}
    assert recorded == JOURNALED
    state = ServerState(engine_factory=_never_loads)
    plain = {route.path_format + route.declared_methods[0]: route.endpoint for route in adapter_routes(state)}
    for route in journaled_routes(app.routes):  # wrapped, so that a success is written to the store
        assert route.endpoint.__qualname__ != plain[route.path_format + route.declared_methods[0]].__qualname__


def test_the_journal_refuses_a_change_it_cannot_record(tmp_path: Path) -> None:
    async def endpoint(request: Any) -> Any:
        raise AssertionError("never called")

    route = ApiRoute("/v1/adapters/{name}/rename", endpoint, Operation("Rename", "Adapters", journal="rename"),
                     methods=["POST"])
    store = Store(tmp_path / "state.sqlite3")
    try:
        with pytest.raises(ValueError, match="rename"):
            journaled([route], store)
    finally:
        store.close()


async def _endpoint(request: Any) -> Any:
    raise AssertionError("never called")


def test_a_route_refuses_a_path_parameter_its_path_lacks() -> None:
    with pytest.raises(ValueError, match="job_id"):
        ApiRoute("/v1/jobs", _endpoint, Operation("Jobs", "Fine-tuning", params=(Param("job_id", where="path"),)),
                 methods=["GET"])
    with pytest.raises(ValueError, match="after"):
        ApiRoute("/v1/jobs/{after}", _endpoint, Operation("Jobs", "Fine-tuning", params=(Param("after"),)),
                 methods=["GET"])


def test_flagged_routes_must_have_fixed_paths() -> None:
    route = ApiRoute("/v1/run/{name}", _endpoint, Operation("Run", "OpenAI", generation=True), methods=["POST"])
    with pytest.raises(ValueError, match="path parameters"):
        flagged_paths([route], "generation")


def test_two_models_cannot_share_a_schema_name() -> None:
    class First(BaseModel, title="Thing"):
        a: int

    class Second(BaseModel, title="Thing"):
        b: str

    with pytest.raises(ValueError, match="Thing"):
        components([First, Second])


def test_path_parameters_take_their_convertors_types(document: dict[str, Any]) -> None:
    [project_id] = document["paths"]["/v1/flow/projects/{project_id}"]["get"]["parameters"]
    assert project_id["in"] == "path" and project_id["schema"]["type"] == "integer"
    [model] = document["paths"]["/v1/models/{model}"]["get"]["parameters"]
    assert model == {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
