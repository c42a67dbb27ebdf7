"""Real answers of the tiny model's server validate against the schemas /openapi.json gives for them:
chat and legacy completions (whole, streamed, with logprobs, echo, `n`, usage, a forced tool call),
SeekrFlow's chat, the Responses API, models, adapters, and the error envelope.

The fuzz tests (`test_schemathesis.py`) check every success they provoke the same way; these make
sure the generation routes' successes, which random bodies rarely reach, are checked too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import ValidationError

from engine.async_engine import AsyncEngine
from server.app import create_app
from server.state import ServerState
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME, LiveServer, engine_config
from tests.server.spec_check import check_answer, sse_data

HELLO = [{"role": "user", "content": "Hello"}]
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {  # short calls: a few tokens
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def document(fuzz_live: LiveServer) -> dict[str, Any]:
    with fuzz_live.http() as http:
        return http.get("/openapi.json").json()


def _checked(live: LiveServer, document: dict[str, Any], method: str, path: str, template: str | None = None,
             **request: Any) -> Any:
    """The answer, after checking it against the document (`template`: the documented path)."""
    with live.http() as http:
        answer = http.request(method, path, **request)
    check_answer(document, method, template or path, answer.status_code, answer.headers["content-type"], answer.text)
    return answer


CHAT_BODIES = {
    "plain": {"messages": HELLO, "max_tokens": 3},
    "logprobs-n": {"messages": HELLO, "max_tokens": 3, "n": 2, "logprobs": True, "top_logprobs": 2},
    "adapter": {"model": ADAPTER_NAMES[0], "messages": HELLO, "max_tokens": 2, "seed": 1},
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body", CHAT_BODIES.values(), ids=CHAT_BODIES.keys())
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/inference/chat/completions"])
def test_chat_answers_are_documented(fuzz_live: LiveServer, document: dict[str, Any], path: str,
                                     body: dict[str, Any], stream: bool) -> None:
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    answer = _checked(fuzz_live, document, "POST", path, json={"model": MODEL_NAME, **body, **extra})
    assert answer.status_code == 200, answer.text
    if stream:
        assert sse_data(answer.text) and answer.text.rstrip().endswith("data: [DONE]")


COMPLETION_BODIES = {
    "plain": {"prompt": "Hello", "max_tokens": 3},
    "echo-logprobs": {"prompt": ["Hello", "Hi"], "max_tokens": 2, "echo": True, "logprobs": 2},
    "token-ids": {"prompt": [1, 2, 3], "max_tokens": 2, "n": 2},
}


@pytest.fixture(scope="module")
def long_live(tiny_model_factory: Callable[..., Path]) -> Iterator[LiveServer]:
    """A tiny model with a context long enough for the tools' prompt (the fuzzed one has 24 tokens)."""
    model_dir = tiny_model_factory("llama", max_position_embeddings=2048)
    engine = AsyncEngine(engine_config(model_dir, max_model_len=2048), served_model_name=MODEL_NAME)
    server = LiveServer(create_app(ServerState(engine))).start()
    yield server
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_answers_are_documented(long_live: LiveServer, stream: bool) -> None:
    live = long_live
    with live.http() as http:
        document = http.get("/openapi.json").json()
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    answer = _checked(live, document, "POST", "/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": HELLO, "max_tokens": 300, "seed": 1, "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "weather"}}, **extra})
    assert answer.status_code == 200, answer.text
    assert "tool_calls" in answer.text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body", COMPLETION_BODIES.values(), ids=COMPLETION_BODIES.keys())
def test_completion_answers_are_documented(fuzz_live: LiveServer, document: dict[str, Any], body: dict[str, Any],
                                           stream: bool) -> None:
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    answer = _checked(fuzz_live, document, "POST", "/v1/completions", json={"model": MODEL_NAME, **body, **extra})
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("stream", [False, True])
def test_response_answers_are_documented(fuzz_live: LiveServer, document: dict[str, Any], stream: bool) -> None:
    answer = _checked(fuzz_live, document, "POST", "/v1/responses",
                      json={"model": MODEL_NAME, "input": "Hello", "max_output_tokens": 3, "stream": stream})
    assert answer.status_code == 200, answer.text
    if not stream:
        response_id = answer.json()["id"]
        template = "/v1/responses/{response_id}"
        assert _checked(fuzz_live, document, "GET", f"/v1/responses/{response_id}", template).status_code == 200
        assert _checked(fuzz_live, document, "GET", f"/v1/responses/{response_id}/input_items",
                        template + "/input_items").status_code == 200


@pytest.mark.parametrize(("path", "template"), [
    ("/v1/models", None), (f"/v1/models/{ADAPTER_NAMES[1]}", "/v1/models/{model}"), ("/v1/adapters", None),
    (f"/v1/adapters/{ADAPTER_NAMES[1]}", "/v1/adapters/{name}"), ("/v1/flow/models", None), ("/health", None),
    ("/ready", None), ("/version", None),
])
def test_read_answers_are_documented(fuzz_live: LiveServer, document: dict[str, Any], path: str,
                                     template: str | None) -> None:
    assert _checked(fuzz_live, document, "GET", path, template).status_code == 200


def test_errors_are_the_documented_envelope(fuzz_live: LiveServer, document: dict[str, Any]) -> None:
    answer = _checked(fuzz_live, document, "POST", "/v1/chat/completions",
                      json={"model": "no-such-model", "messages": HELLO})
    assert answer.status_code == 404


def test_a_body_unlike_its_schema_is_caught(fuzz_live: LiveServer, document: dict[str, Any]) -> None:
    answer = _checked(fuzz_live, document, "POST", "/v1/chat/completions",
                      json={"model": MODEL_NAME, "messages": HELLO, "max_tokens": 2})
    body = answer.json()
    body["choices"][0]["message"]["content"] = 7
    with pytest.raises(ValidationError):
        check_answer(document, "POST", "/v1/chat/completions", 200, "application/json", json.dumps(body))
    del body["usage"]
    with pytest.raises(ValidationError):
        check_answer(document, "POST", "/v1/chat/completions", 200, "application/json", json.dumps(body))
