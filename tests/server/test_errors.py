"""Every error comes back in the OpenAI envelope with the right status (400, never 422 or 500).

In-process over the fake engine, but for broken adapter files, which the real engine's loader reads."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import openai
import pytest

from tests.eventually import eventually
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME, fake_engine
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


@pytest.fixture
def http(fake):
    with fake.http() as client:
        yield client


@pytest.fixture
def client(fake):
    return fake.client()


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


def test_context_length_exceeded(http, fake):
    too_long = "fox " * (fake.engine.max_model_len * 2)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": too_long}], "max_tokens": 2}
    _assert_envelope(http.post(CHAT, json=body), 400, code="context_length_exceeded")
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": fake.engine.max_model_len}
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


def test_overload_is_429_with_retry_after(fake_app):
    engine = fake_engine(max_num_seqs=1, max_waiting=1)
    app = fake_app(engine)
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
    engine.gate.clear()  # the streams below stay in flight until it opens

    def hold_a_stream() -> None:
        with app.http() as http:
            http.post(CHAT, json=body)

    holders = [threading.Thread(target=hold_a_stream, daemon=True) for _ in range(2)]
    for holder in holders:
        holder.start()
    try:
        eventually(lambda: engine.stats()["num_streams"] == 2, 10, "one running and one queued: the engine is full")
        with app.http() as http:
            response = http.post(CHAT, json={**body, "stream": False, "max_tokens": 2})
            _assert_envelope(response, 429, code="overloaded")
            assert int(response.headers["retry-after"]) >= 1
            response = http.post(CHAT, json={**body, "max_tokens": 2})  # streamed: still a status, not an event
            _assert_envelope(response, 429, code="overloaded")
        with pytest.raises(openai.RateLimitError):
            app.client().chat.completions.create(model=ADAPTER_NAMES[0], messages=MESSAGES, max_tokens=2)
    finally:
        engine.gate.set()
        for holder in holders:
            holder.join(10)


def test_not_ready_is_503_until_the_model_loads(fake_app):
    release = threading.Event()

    def slow_factory() -> Any:
        release.wait(30)
        return fake_engine()

    app = fake_app(engine_factory=slow_factory)
    try:
        with app.http() as http:
            assert http.get("/health").status_code == 200
            _assert_envelope(http.get("/ready"), 503)
            response = http.post(CHAT, json={"model": MODEL_NAME, "messages": MESSAGES})
            _assert_envelope(response, 503)
            assert "retry-after" in response.headers
            _assert_envelope(http.get("/v1/models"), 503)
            release.set()
            eventually(lambda: http.get("/ready").status_code == 200, 30, "/ready once the model loaded")
            response = http.post(CHAT, json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2})
            assert response.status_code == 200
    finally:
        release.set()


def test_api_key_is_401_without_it(fake_app):
    app = fake_app(api_key="sesame")
    with app.http() as http:
        _assert_envelope(http.get("/v1/models"), 401, code="invalid_api_key")
        _assert_envelope(http.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert http.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert http.get("/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        app.client().models.list()  # sends api_key "x"
    assert app.client(api_key="sesame").models.list().data[0].id == MODEL_NAME


def test_mid_stream_error_is_an_error_event_then_done(fake):
    fake.engine.fail_after = 2  # every request fails after its first two tokens
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 50, "stream": True, "ignore_eos": True}
    with fake.http() as http:
        events = sse_events(http, CHAT, body)
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert set(error) == {"message", "type", "param", "code"} and fake.engine.fail_message in error["message"]
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        events = sse_events(http, "/v1/completions", {**body, "prompt": "hi"})
        assert events[-1] == "[DONE]" and "error" in events[-2]
        response = http.post(CHAT, json={**body, "stream": False})
        _assert_envelope(response, 500)
    with pytest.raises(openai.APIError, match=fake.engine.fail_message):
        for _ in fake.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=50,
                                                       stream=True, extra_body={"ignore_eos": True}):
            pass
    eventually(lambda: fake.engine.stats()["num_streams"] == 0, 5, "no request left in the engine")


# End to end: the engine's own adapter loader reads the broken files; only the requests naming them fail.
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
