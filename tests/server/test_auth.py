"""Bearer keys: the API key for inference, the admin key for adapters and fine-tuning, open probes;
in-process over the fake engine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from starlette.datastructures import Headers

from server.admin.adapters import adapter_routes
from server.app import create_app
from server.http.auth import bearer_token, is_admin_path
from server.state import ServerState
from tests.server.conftest import MODEL_NAME, InProcessApp

API_KEY = "sk-inference-0123456789"
ADMIN_KEY = "sk-admin-9876543210"
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def secured(fake_app: Callable[..., InProcessApp]) -> InProcessApp:
    """Both keys set, with the admin routes mounted."""
    return fake_app(api_key=API_KEY, admin_key=ADMIN_KEY, routes=adapter_routes)


def _auth(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def _assert_401(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    return error


@pytest.mark.parametrize("key", [None, "sk-wrong", API_KEY[:-1], API_KEY + "x", f"{API_KEY} {API_KEY}"])
def test_inference_routes_refuse_a_missing_or_wrong_key(secured: InProcessApp, key: str | None) -> None:
    with secured.http() as http:
        _assert_401(http.post("/v1/chat/completions", json=CHAT, headers=_auth(key)))
        _assert_401(http.get("/v1/models", headers=_auth(key)))


def test_inference_routes_accept_the_api_key_and_the_admin_key(secured: InProcessApp) -> None:
    for key in (API_KEY, ADMIN_KEY):
        assert secured.client(api_key=key).chat.completions.create(**CHAT).choices[0].message.role == "assistant"
    with pytest.raises(openai.AuthenticationError):
        secured.client(api_key="sk-wrong").models.list()
    with secured.http() as http:  # the scheme is case-insensitive
        assert http.get("/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
        assert http.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401


def test_admin_routes_need_the_admin_key(secured: InProcessApp) -> None:
    with secured.http() as http:
        for key in (None, "sk-wrong", API_KEY):
            error = _assert_401(http.get("/v1/adapters", headers=_auth(key)))
            _assert_401(http.post("/v1/adapters/lora-1/promote", headers=_auth(key)))
        assert "admin key" in error["message"]
        listed = http.get("/v1/adapters", headers=_auth(ADMIN_KEY))
        assert listed.status_code == 200 and len(listed.json()["data"]) == 8


def test_probes_and_metrics_stay_open(secured: InProcessApp) -> None:
    with secured.http() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 200
        assert http.get("/openapi.json").status_code == 200
        assert http.get("/metrics").status_code == 200


def _statuses(app: Any, requests: list[tuple[str, str, str | None]]) -> list[int]:
    """Status of each (method, path, key) against `app`, without starting its engine."""

    async def run() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
            return [(await client.request(m, p, headers=_auth(k))).status_code for m, p, k in requests]

    return asyncio.run(run())


def _app(**keys: Any) -> Any:
    def never_loads() -> Any:  # no lifespan runs: routes past auth answer 503 "still loading"
        raise AssertionError("not called")

    state = ServerState(engine_factory=never_loads)
    return create_app(state, extra_routes=adapter_routes(state), **keys)


def test_api_key_alone_guards_admin_routes_too() -> None:
    app = _app(api_key=API_KEY)
    assert _statuses(app, [("GET", "/v1/adapters", None), ("GET", "/v1/adapters", API_KEY),
                           ("GET", "/v1/models", ADMIN_KEY)]) == [401, 503, 401]


def test_admin_key_alone_leaves_inference_open() -> None:
    app = _app(admin_key=ADMIN_KEY)
    assert _statuses(app, [("GET", "/v1/models", None), ("GET", "/v1/adapters", None),
                           ("GET", "/v1/adapters", ADMIN_KEY), ("GET", "/metrics", None)]) == [503, 401, 503, 200]


def test_metrics_can_be_protected() -> None:
    app = _app(api_key=API_KEY, admin_key=ADMIN_KEY, protect_metrics=True)
    assert _statuses(app, [("GET", "/metrics", None), ("GET", "/metrics", "sk-wrong"), ("GET", "/metrics", API_KEY),
                           ("GET", "/metrics", ADMIN_KEY), ("GET", "/health", None)]) == [401, 401, 200, 200, 200]


def test_no_keys_means_no_authentication() -> None:
    assert _statuses(_app(), [("GET", "/v1/models", None), ("GET", "/v1/adapters", None)]) == [503, 503]


def test_bearer_token_parsing_and_admin_paths() -> None:
    assert bearer_token(Headers(headers={"authorization": "Bearer abc"})) == b"abc"
    assert bearer_token(Headers(headers={"authorization": "BEARER  abc "})) == b"abc"
    assert bearer_token(Headers(headers={"authorization": "Bearer "})) is None
    assert bearer_token(Headers(headers={})) is None
    assert bearer_token(Headers(headers={"authorization": "abc"})) == b"abc"  # seekrai's bare key
    assert bearer_token(Headers(headers={"authorization": "Basic abc"})) is None
    assert is_admin_path("/v1/adapters") and is_admin_path("/v1/fine_tuning/jobs/x/cancel")
    assert is_admin_path("/v1/files") and not is_admin_path("/v1/filesystem")
    assert is_admin_path("/v1/flow/deployments/3/promote") and not is_admin_path("/v1/inference/chat/completions")
    assert not is_admin_path("/v1/chat/completions")
