"""Every error comes back in the OpenAI envelope with the right status (400, never 422 or 500)."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from engine.outputs import RequestDelta
from server.app import create_app
from server.state import ServerState
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME, LiveServer
from tests.server.helpers import MESSAGES, sse_events

CHAT = "/v1/chat/completions"


def _assert_envelope(response: httpx.Response, status: int, param: str | None = "", code: str | None = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param != "":
        assert error["param"] == param
    if code != "":
        assert error["code"] == code
    return error


@pytest.fixture(scope="module")
def http(live):
    with live.http() as client:
        yield client


def test_malformed_json_and_non_object_bodies(http):
    for raw in (b"{not json", b"", b"[1, 2]", b"\xff\xfe", b'"text"'):
        response = http.post(CHAT, content=raw, headers={"content-type": "application/json"})
        _assert_envelope(response, 400, code="invalid_json")


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"logit_bias": ["x"]}, "logit_bias"),
        ({"seed": "abc"}, "seed"),
        ({"seed": 10**30}, "seed"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ],
)
def test_validation_failures_are_400_naming_the_field(http, patch, param):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    error = _assert_envelope(http.post(CHAT, json=body), 400)
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("key", ["abc", "-1", "99999", "1.5"])
def test_bad_logit_bias_key_is_400_naming_it(http, key):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2, "logit_bias": {key: 5}}
    error = _assert_envelope(http.post(CHAT, json=body), 400, param="logit_bias")
    assert repr(key) in error["message"]


def test_context_length_exceeded(http, live):
    too_long = "fox " * (live.engine.max_model_len * 2)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": too_long}], "max_tokens": 2}
    _assert_envelope(http.post(CHAT, json=body), 400, code="context_length_exceeded")
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": live.engine.max_model_len}
    _assert_envelope(http.post(CHAT, json=body), 400, code="context_length_exceeded")
    body = {"model": MODEL_NAME, "prompt": too_long, "max_tokens": 2}
    _assert_envelope(http.post("/v1/completions", json=body), 400, code="context_length_exceeded")


def test_completions_specific_validation(http):
    base = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    for patch, param in [({"logprobs": 6}, "logprobs"), ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"),
                         ({"prompt": [10**9]}, "prompt"), ({"prompt": ""}, "prompt"), ({"best_of": 3}, "best_of"),
                         ({"suffix": "x"}, "suffix"), ({"stream_options": {"include_usage": True}},
                                                       "stream_options")]:
        error = _assert_envelope(http.post("/v1/completions", json={**base, **patch}), 400)
        assert error["param"] == param, (patch, error)


def test_unknown_model_is_404_naming_it(http):
    for path, body in [(CHAT, {"messages": MESSAGES}), ("/v1/completions", {"prompt": "hi"})]:
        for stream in (False, True):
            response = http.post(path, json={"model": "no-such-lora", "stream": stream, **body})
            error = _assert_envelope(response, 404, param="model", code="model_not_found")
            assert "no-such-lora" in error["message"]
    _assert_envelope(http.get("/v1/models/no-such-lora"), 404, code="model_not_found")


def test_unknown_route_and_wrong_method(http):
    _assert_envelope(http.get("/v1/nothing"), 404)
    _assert_envelope(http.get(CHAT), 405)


def test_openai_client_raises_the_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="missing", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, logprobs=True, top_logprobs=30)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, stream_options={"include_usage": True})


def test_overload_is_429_with_retry_after(start_server):
    live = start_server(max_num_seqs=1, max_waiting=1)
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
    stop = threading.Event()

    def hold_a_stream() -> None:
        with live.http() as http, http.stream("POST", CHAT, json=body) as response:
            for _ in response.iter_lines():
                if stop.is_set():
                    break

    holders = [threading.Thread(target=hold_a_stream, daemon=True) for _ in range(2)]
    for holder in holders:
        holder.start()
    try:
        deadline = time.monotonic() + 10
        while live.engine.stats()["num_streams"] < 2:  # one running, one queued: the engine is full
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with live.http() as http:
            response = http.post(CHAT, json={**body, "stream": False, "max_tokens": 2})
            _assert_envelope(response, 429, code="overloaded")
            assert int(response.headers["retry-after"]) >= 1
            response = http.post(CHAT, json={**body, "max_tokens": 2})  # streamed: still a status, not an event
            _assert_envelope(response, 429, code="overloaded")
        with pytest.raises(openai.RateLimitError):
            live.client().chat.completions.create(model=ADAPTER_NAMES[0], messages=MESSAGES, max_tokens=2)
    finally:
        stop.set()
        for holder in holders:
            holder.join(10)


def test_not_ready_is_503_until_the_model_loads(server_model_dir):
    from engine.async_engine import AsyncEngine
    from tests.server.conftest import engine_config

    release = threading.Event()

    def slow_factory() -> Any:
        release.wait(30)
        return AsyncEngine(engine_config(server_model_dir), served_model_name=MODEL_NAME)

    live = LiveServer(create_app(ServerState(engine_factory=slow_factory))).start()
    try:
        with live.http() as http:
            assert http.get("/health").status_code == 200
            _assert_envelope(http.get("/ready"), 503)
            response = http.post(CHAT, json={"model": MODEL_NAME, "messages": MESSAGES})
            _assert_envelope(response, 503)
            assert "retry-after" in response.headers
            _assert_envelope(http.get("/v1/models"), 503)
            release.set()
            deadline = time.monotonic() + 30
            while http.get("/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            response = http.post(CHAT, json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2})
            assert response.status_code == 200
    finally:
        release.set()
        live.stop()


def test_api_key_is_401_without_it(start_server):
    live = start_server(api_key="sesame")
    with live.http() as http:
        _assert_envelope(http.get("/v1/models"), 401, code="invalid_api_key")
        _assert_envelope(http.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert http.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert http.get("/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        live.client().models.list()  # sends api_key "x"
    good = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="sesame", max_retries=0)
    assert good.models.list().data[0].id == MODEL_NAME


class _FailsMidStream:
    """The real engine, except that every request fails after its first two deltas."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, request_id: str, *args: Any, **kwargs: Any) -> Any:
        count = 0
        async with contextlib.aclosing(self._engine.generate(request_id, *args, **kwargs)) as deltas:
            async for delta in deltas:
                if count == 2 and not delta.finished:
                    yield RequestDelta(request_id=request_id, finish_reason="error", error="device fell over")
                    return
                count += 1
                yield delta


def test_mid_stream_error_is_an_error_event_then_done(server_model_dir):
    from engine.async_engine import AsyncEngine
    from tests.server.conftest import engine_config

    engine = AsyncEngine(engine_config(server_model_dir), served_model_name=MODEL_NAME)
    live = LiveServer(create_app(ServerState(_FailsMidStream(engine)))).start()
    try:
        body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 50, "stream": True, "ignore_eos": True}
        with live.http() as http:
            events = sse_events(http, CHAT, body)
            assert events[-1] == "[DONE]"
            error = events[-2]["error"]
            assert set(error) == {"message", "type", "param", "code"} and "device fell over" in error["message"]
            assert events[0]["choices"][0]["delta"]["role"] == "assistant"
            events = sse_events(http, "/v1/completions", {**body, "prompt": "hi"})
            assert events[-1] == "[DONE]" and "error" in events[-2]
            response = http.post(CHAT, json={**body, "stream": False})
            _assert_envelope(response, 500)
        with pytest.raises(openai.APIError, match="device fell over"):
            for _ in live.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=50,
                                                           stream=True, extra_body={"ignore_eos": True}):
                pass
        assert live.engine.stats()["num_requests"] == 0 or _settles(live)
    finally:
        live.stop()


def _settles(live: LiveServer, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if live.engine.stats()["num_requests"] == 0:
            return True
        time.sleep(0.02)
    return False


def test_a_bad_adapter_fails_only_the_requests_naming_it(start_server, server_adapters, tmp_path):
    good = ADAPTER_NAMES[0]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text('{"r": 8')
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((server_adapters[good] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    bad = {"missing": tmp_path / "nowhere", "corrupt": corrupt, "pickled": pickled}
    live = start_server(adapters={good: server_adapters[good], **bad})
    with live.http() as http:
        for name in bad:
            for stream in (False, True):
                body = {"model": name, "messages": MESSAGES, "max_tokens": 2, "stream": stream}
                error = _assert_envelope(http.post(CHAT, json=body), 400, param="model")
                assert name in error["message"]
        for name in (good, MODEL_NAME):
            response = http.post(CHAT, json={"model": name, "messages": MESSAGES, "max_tokens": 2})
            assert response.status_code == 200 and response.json()["model"] == name
