"""GET routes: /v1/models, /health, /ready, /openapi.json; in-process over the fake engine."""

from __future__ import annotations

import pytest

from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME


@pytest.fixture
def client(fake):
    return fake.client()


def test_models_list_base_first_then_adapters(client):
    models = client.models.list()
    assert models.object == "list"
    ids = [m.id for m in models.data]
    assert ids[0] == MODEL_NAME and sorted(ids[1:]) == sorted(ADAPTER_NAMES)
    base, *adapters = models.data
    assert base.object == "model" and base.owned_by and isinstance(base.created, int)
    assert base.root == MODEL_NAME and base.parent is None
    for adapter in adapters:
        assert adapter.parent == MODEL_NAME and adapter.root == MODEL_NAME


def test_retrieve_model(client):
    assert client.models.retrieve(ADAPTER_NAMES[2]).parent == MODEL_NAME
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_health_and_ready(fake):
    with fake.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready")
        assert ready.status_code == 200 and ready.json()["model"] == MODEL_NAME


def test_openapi_document_describes_the_routes(fake):
    with fake.http() as http:
        document = http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready"} <= set(paths)
    schemas = document["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert {"messages", "temperature", "top_logprobs", "response_format", "stream_options"} <= set(chat["properties"])
    assert "messages" in chat["required"]
    assert "prompt" in schemas["CompletionRequest"]["required"]
    ref = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ChatCompletionRequest"
    _assert_refs_resolve(document, document)


def _assert_refs_resolve(node, document) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = document
            for part in ref.removeprefix("#/").split("/"):
                target = target[part]
        for value in node.values():
            _assert_refs_resolve(value, document)
    elif isinstance(node, list):
        for value in node:
            _assert_refs_resolve(value, document)


def test_health_fails_when_the_engine_thread_has_died(fake):
    with fake.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        fake.engine.died = "WorkerDiedError: tensor-parallel worker 1 exited"
        dead = http.get("/health")
    assert dead.status_code == 503 and "worker 1" in dead.json()["reason"]
