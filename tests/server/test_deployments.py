"""Deployments as views over the adapter registry, through the `/v1/flow/deployments` routes: promote pins,
demote unpins (not while another promoted deployment shares the adapter), the status follows the registry
(a deleted or broken adapter shows as Failed, with why), a pin that cannot be had is a 409, and the next
server promotes again what was promoted. Also the SDK's chat request rules that need no generation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from engine.errors import AdapterFailedError
from server.admin.adapters import adapter_routes
from server.app import create_app
from server.http.errors import APIError
from server.seekrflow.chat import _to_openai
from server.state import ServerState
from server.wiring import build_stateful
from tests.server.fake_engine import FakeEngine

FLOW = "/v1/flow/deployments"
ADAPTERS = {"bows": "/adapters/bows", "ships": "/adapters/ships", "spare": "/adapters/spare",
            "broken": "/adapters/broken"}


def _client(tmp_path: Path, engine: FakeEngine) -> TestClient:
    state = ServerState(engine)
    stateful = build_stateful(state, adapter_routes(state), jobs_dir=tmp_path / "jobs", base_model="/models/tiny",
                              model_name=engine.model_name)
    return TestClient(create_app(state, stateful=stateful))


@pytest.fixture
def engine() -> FakeEngine:
    engine = FakeEngine({k: v for k, v in ADAPTERS.items() if k != "broken"}, slots=3,
                        broken=frozenset({"/adapters/broken"}))
    with pytest.raises(AdapterFailedError):  # like the real engine, it stays listed, as failed
        asyncio.run(engine.add_adapter("broken", ADAPTERS["broken"]))
    return engine


@pytest.fixture
def http(tmp_path: Path, engine: FakeEngine) -> Iterator[TestClient]:
    with _client(tmp_path, engine) as client:
        yield client


def _create(http: TestClient, model_id: str, model_type: str = "Fine-tuned Run", name: str = "a deployment") -> Any:
    return http.post(FLOW, json={"name": name, "description": "for the tests", "model_type": model_type,
                                 "model_id": model_id, "n_instances": 1})


def _status(http: TestClient, deployment_id: str) -> str:
    return http.get(f"{FLOW}/{deployment_id}").json()["status"]


def test_promote_pins_and_demote_unpins_unless_shared(http: TestClient, engine: FakeEngine) -> None:
    first = _create(http, "bows").json()
    second = _create(http, "bows", name="the same adapter").json()
    assert first["status"] == "Inactive" and first["adapter"] == "bows" and first["memory"] == "4.0 KB"
    promoted = http.put(f"{FLOW}/{first['id']}/promote").json()
    assert promoted["status"] == "Active" and promoted["last_deployed_at"] and engine.pinned() == {"bows"}
    assert http.put(f"{FLOW}/{second['id']}/promote").json()["status"] == "Active"
    assert http.put(f"{FLOW}/{first['id']}/demote").json()["status"] == "Inactive"
    assert engine.pinned() == {"bows"} and _status(http, second["id"]) == "Active"  # still wanted by the other
    assert http.put(f"{FLOW}/{second['id']}/demote").json()["status"] == "Inactive"
    assert engine.pinned() == set()
    listed = http.get(FLOW, params={"skip": 1, "limit": 5}).json()["data"]
    assert [d["id"] for d in listed] == [second["id"]]


def test_what_cannot_be_deployed_or_pinned_is_refused(http: TestClient, engine: FakeEngine) -> None:
    assert _create(http, "nope").status_code == 404
    assert _create(http, "someone-else", model_type="Base Model").status_code == 400
    assert _create(http, "bows", model_type="Full Model").status_code == 400
    assert http.post(FLOW, json={"name": "x", "description": "too short a name", "model_type": "Base Model",
                                 "model_id": "tiny-base", "n_instances": 1}).status_code == 400
    assert http.put(f"{FLOW}/dep-missing/promote").status_code == 404
    base = _create(http, "tiny-base", model_type="Base Model").json()
    assert http.put(f"{FLOW}/{base['id']}/promote").json()["status"] == "Active"  # the base is always loaded
    ids = [_create(http, name).json()["id"] for name in ("bows", "ships", "spare")]
    assert [http.put(f"{FLOW}/{i}/promote").status_code for i in ids] == [200, 200, 409]  # one slot stays free
    assert _status(http, ids[2]) == "Inactive" and engine.pinned() == {"bows", "ships"}


def test_the_status_follows_the_registry(http: TestClient, engine: FakeEngine) -> None:
    broken = _create(http, "broken").json()
    failed = http.put(f"{FLOW}/{broken['id']}/promote").json()
    assert failed["status"] == "Failed" and "cannot load" in failed["error"]
    bows = _create(http, "bows").json()
    http.put(f"{FLOW}/{bows['id']}/promote")
    assert http.post("/v1/adapters/bows/demote").status_code == 200  # the pin taken away over the admin API
    assert _status(http, bows["id"]) == "Inactive"
    http.put(f"{FLOW}/{bows['id']}/promote")
    assert http.delete("/v1/adapters/bows").status_code == 200
    gone = http.get(f"{FLOW}/{bows['id']}").json()
    assert gone["status"] == "Failed" and "no longer registered" in gone["error"]


def test_the_next_server_promotes_again_what_was_promoted(tmp_path: Path, engine: FakeEngine) -> None:
    with _client(tmp_path, engine) as http:
        kept, dropped = (_create(http, name).json()["id"] for name in ("bows", "ships"))
        http.put(f"{FLOW}/{kept}/promote")
        http.put(f"{FLOW}/{dropped}/promote")
        http.put(f"{FLOW}/{dropped}/demote")
    fresh = FakeEngine({k: v for k, v in ADAPTERS.items() if k != "broken"}, slots=3)
    with _client(tmp_path, fresh) as http:
        assert fresh.pinned() == {"bows"}
        assert (_status(http, kept), _status(http, dropped)) == ("Active", "Inactive")
        refused = http.post("/v1/inference/chat/completions",
                            json={"model": dropped, "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 400 and "not active" in refused.json()["error"]["message"]


def test_the_sdk_request_is_read_by_its_own_rules() -> None:
    body = {"model": "m", "messages": [], "top_logprobs": 5, "logprobs": False, "echo": False, "tools": None}
    assert _to_openai(body) == {"model": "m", "messages": [], "top_logprobs": 5, "logprobs": True}
    assert "top_logprobs" not in _to_openai({"top_logprobs": 0, "logprobs": False})  # the SDK's "none"
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert _to_openai({"response_format": {"type": "json_object", "schema": schema}})["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    for key, value in (("echo", True), ("safety_model", "guard"), ("tools", [{"type": "function"}])):
        with pytest.raises(APIError, match=f"`{key}` is not supported"):
            _to_openai({key: value})
