"""Request limits: body size (413), prompt tokens and the max_tokens ceiling (400), concurrency (429);
in-process over the fake engine."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.http.errors import APIError
from server.limits import Limits, budget
from server.state import ServerState
from tests.eventually import eventually
from tests.server.conftest import MODEL_NAME, InProcessApp

LIMITS = Limits(max_request_bytes=4096, max_prompt_tokens=40, max_tokens=8, max_concurrent_requests=1)


@pytest.fixture
def live(fake_app: Callable[..., InProcessApp]) -> InProcessApp:
    return fake_app(limits=LIMITS)


def _chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "lora-0", "messages": [{"role": "user", "content": content}], "ignore_eos": True, **extra}


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_a_body_over_the_limit_is_refused_with_413(live: InProcessApp) -> None:
    big = _chat("word " * 1000)  # > 4096 bytes
    with live.http() as http:
        error = _error(http.post("/v1/chat/completions", json=big), 413)
        assert error["code"] == "request_too_large" and "4096" in error["message"]
        # Without a Content-Length the body is counted as it arrives.
        chunks = (b'{"model": "lora-0", "messages": [{"role": "user", "content": "' + b"x" * 1000 for _ in range(5))
        assert _error(http.post("/v1/chat/completions", content=chunks), 413)["code"] == "request_too_large"
        assert http.post("/v1/chat/completions", json=_chat(max_tokens=2)).status_code == 200


def test_a_prompt_over_the_limit_is_refused(live: InProcessApp) -> None:
    with live.http() as http:
        error = _error(http.post("/v1/chat/completions", json=_chat("hello world " * 20, max_tokens=2)), 400)
        assert error["code"] == "prompt_too_long" and "at most 40 prompt tokens" in error["message"]
        error = _error(http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hello world " * 20}), 400)
        assert error["code"] == "prompt_too_long"
        assert http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hello"}).status_code == 200


@pytest.mark.parametrize(("path", "field"), [("/v1/chat/completions", "max_tokens"),
                                             ("/v1/chat/completions", "max_completion_tokens"),
                                             ("/v1/completions", "max_tokens")])
def test_max_tokens_over_the_ceiling_is_refused(live: InProcessApp, path: str, field: str) -> None:
    body = _chat(**{field: 9}) if "chat" in path else {"model": MODEL_NAME, "prompt": "hi", field: 9}
    with live.http() as http:
        error = _error(http.post(path, json=body), 400)
        assert error["param"] == field and error["code"] == "max_tokens_exceeded" and "at most 8" in error["message"]
        body[field] = 8
        answer = http.post(path, json=body | {"ignore_eos": True})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("value", ["999", 999.0, 9.0, True, "8"])
@pytest.mark.parametrize(("path", "field"), [("/v1/chat/completions", "max_tokens"),
                                             ("/v1/chat/completions", "max_completion_tokens"),
                                             ("/v1/completions", "max_tokens")])
def test_a_max_tokens_that_is_not_an_integer_is_refused_not_capped(live: InProcessApp, path: str, field: str,
                                                                   value: Any) -> None:
    body = _chat(**{field: value}) if "chat" in path else {"model": MODEL_NAME, "prompt": "hi", field: value}
    with live.http() as http:
        error = _error(http.post(path, json=body), 400)
    assert error["param"] == field and "integer" in error["message"], error


def test_an_omitted_max_tokens_is_capped_to_the_ceiling(live: InProcessApp) -> None:
    with live.http() as http:
        answer = http.post("/v1/chat/completions", json=_chat()).json()
        assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["finish_reason"] == "length"
        assert live.engine.requests[-1].params.max_tokens == 8
        # min_tokens beyond the ceiling cannot be met.
        error = _error(http.post("/v1/chat/completions", json=_chat(min_tokens=20)), 400)
        assert "min_tokens" in error["message"]


def _in_flight(http: httpx.Client) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "quiver_http_requests_in_flight" and sample.labels["route"] == "/v1/chat/completions":
                return sample.value
    return 0.0


def test_requests_over_the_concurrency_limit_get_429_with_retry_after(live: InProcessApp) -> None:
    outcome: list[httpx.Response] = []

    def send_held() -> None:
        with live.http() as http:
            outcome.append(http.post("/v1/chat/completions", json=_chat(max_tokens=2)))

    live.engine.gate.clear()  # the first request stays in flight until it opens
    holder = threading.Thread(target=send_held)
    holder.start()
    try:
        with live.http() as http:
            eventually(lambda: _in_flight(http) == 1, 10, "the held request occupies the one slot")
            refused = http.post("/v1/chat/completions", json=_chat(max_tokens=1))
            error = _error(refused, 429)
            assert refused.headers["retry-after"] == "1"
            assert error["type"] == "rate_limit_error" and error["code"] == "too_many_concurrent_requests"
            assert http.get("/v1/models").status_code == 200  # only generation routes are limited
            live.engine.gate.set()
            holder.join(20)
            assert outcome[0].status_code == 200, outcome[0].text
            assert http.post("/v1/chat/completions", json=_chat(max_tokens=1)).status_code == 200
    finally:
        live.engine.gate.set()
        holder.join(20)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        Limits(max_tokens=-1)
    with pytest.raises(ValueError, match="max_concurrent_requests"):
        Limits(max_concurrent_requests=True)  # type: ignore[arg-type]


def test_the_body_limit_also_holds_without_a_ceiling_reading_the_body_first() -> None:
    def never_loads() -> Any:  # no lifespan runs: the body is refused before the engine is needed
        raise AssertionError("not called")

    app = create_app(ServerState(engine_factory=never_loads), limits=Limits(max_request_bytes=100))

    async def post(content: Any) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
            return await client.post("/v1/chat/completions", content=content)

    async def chunked() -> Any:
        for _ in range(3):
            yield b"x" * 60

    assert _error(asyncio.run(post(b"x" * 101)), 413)["code"] == "request_too_large"
    assert _error(asyncio.run(post(chunked())), 413)["code"] == "request_too_large"
    assert asyncio.run(post(b"{}")).status_code == 400  # under the limit: the route's own validation


# ---- server/limits.py itself ---------------------------------------------------------------------


def test_the_ceiling_refuses_only_integers_above_it_and_caps_an_omitted_budget() -> None:
    limits = Limits(max_tokens=8)
    refused = limits.over_ceiling("max_completion_tokens", 9)
    assert refused is not None and refused.param == "max_completion_tokens" and refused.code == "max_tokens_exceeded"
    assert limits.over_ceiling("max_tokens", 8) is None
    assert limits.over_ceiling("max_tokens", True) is None and limits.over_ceiling("max_tokens", "9") is None
    assert limits.capped(200) == 8 and limits.capped(3) == 3
    assert Limits().over_ceiling("max_tokens", 10**9) is None and Limits().capped(200) == 200  # 0: no ceiling


def test_the_prompt_limit_refuses_only_prompts_longer_than_it() -> None:
    Limits(max_prompt_tokens=4).check_prompt(4)
    Limits().check_prompt(10**6)
    with pytest.raises(APIError) as refused:
        Limits(max_prompt_tokens=4).check_prompt(5)
    assert refused.value.status == 400 and refused.value.code == "prompt_too_long"


def test_the_budget_is_the_rest_of_the_context_and_zero_only_scores_a_prompt_that_fits() -> None:
    assert budget(None, 10, 32, "messages") == 22
    assert budget(0, 32, 32, "prompt") == 0  # scoring a prompt that fills the context exactly
    for wanted, prompt_len, param in ((1, 32, "prompt"), (None, 32, "prompt"), (23, 10, "max_tokens")):
        with pytest.raises(APIError) as refused:
            budget(wanted, prompt_len, 32, "prompt")
        assert refused.value.code == "context_length_exceeded" and refused.value.param == param
