"""Bad values stop at validation: a 400 naming the field, never a 500, and never a failed engine step.

Every number that reaches a tensor or an integer conversion is bounded, types are strict where
OpenAI's are (no `"999"` for an int, no `"yes"` for a bool), and a body that is not text (UTF-8
surrogates, raw or escaped) or holds NaN/infinity is refused before any route reads it.

The refusals are checked in-process over the fake engine; values at the bounds, and a stream that
bad requests must spare, go to the real engine and its sampler.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.admin.adapters import adapter_routes
from server.app import create_app
from server.state import ServerState
from tests.server.conftest import MODEL_NAME, InProcessApp, LiveServer, engine_config
from tests.server.helpers import MESSAGES

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ADAPTERS = "/v1/adapters"


@pytest.fixture(scope="module")
def live(server_model_dir: Path, server_adapters: dict[str, Path]) -> Iterator[LiveServer]:
    from engine.async_engine import AsyncEngine

    engine = AsyncEngine(engine_config(server_model_dir), adapters=server_adapters, served_model_name=MODEL_NAME)
    state = ServerState(engine)
    server = LiveServer(create_app(state, extra_routes=adapter_routes(state))).start()
    yield server
    server.stop()


@pytest.fixture
def http(fake_app: Callable[..., InProcessApp]) -> Iterator[httpx.Client]:
    with fake_app(routes=adapter_routes).http() as client:
        yield client


@pytest.fixture(scope="module")
def live_http(live: LiveServer) -> Iterator[httpx.Client]:
    with live.http() as client:
        yield client


def _error(response: httpx.Response, param: str | None = "") -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param != "":  # a list entry is named by its index: `stop_token_ids.0`
        assert error["param"] == param or (param and error["param"].startswith(param + ".")), error
    return error


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2, **fields}


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2, **fields}


# (field patch, the param the 400 must name), for both generation routes.
SHARED_INVALID = [
    ({"top_k": 2**63}, "top_k"),
    ({"top_k": 2**31}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 5.0}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"seed": True}, "seed"),
    ({"max_tokens": "999"}, "max_tokens"),
    ({"max_tokens": 999.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"n": True}, "n"),
    ({"n": "2"}, "n"),
    ({"n": 2.0}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"temperature": True}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"top_p": "1"}, "top_p"),
    ({"presence_penalty": False}, "presence_penalty"),
    ({"repetition_penalty": "1.1"}, "repetition_penalty"),
    ({"min_tokens": "1"}, "min_tokens"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"logit_bias": {"5": "1"}}, "logit_bias"),
    ({"logit_bias": {"5": True}}, "logit_bias"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"logit_bias": {str(2**63): 1}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"stop": ["x" * 1025]}, "stop"),
    ({"stop": "x" * 1025}, "stop"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [2**63]}, "stop_token_ids"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ({"stop_token_ids": [1] * 1025}, "stop_token_ids"),
]
CHAT_INVALID = [
    ({"logprobs": 1}, "logprobs"),
    ({"logprobs": "true"}, "logprobs"),
    ({"logprobs": True, "top_logprobs": True}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 2.0}, "top_logprobs"),
    ({"max_completion_tokens": "5"}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
]
COMPLETION_INVALID = [
    ({"prompt": [True]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [2**63]}, "prompt"),
    ({"prompt": [[1, 2], [3, -5]]}, "prompt"),
    ({"prompt": [1.0]}, "prompt"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": 2.0}, "logprobs"),
    ({"echo": "yes"}, "echo"),
    ({"best_of": "1"}, "best_of"),
]


@pytest.mark.parametrize(("patch", "param"), SHARED_INVALID + CHAT_INVALID, ids=repr)
def test_chat_refuses_out_of_bound_and_wrongly_typed_values_naming_the_field(http, patch, param):
    _error(http.post(CHAT, json=_chat(**patch)), param)


@pytest.mark.parametrize(("patch", "param"), SHARED_INVALID + COMPLETION_INVALID, ids=repr)
def test_completions_refuse_out_of_bound_and_wrongly_typed_values_naming_the_field(http, patch, param):
    _error(http.post(COMPLETIONS, json=_completion(**patch)), param)


@pytest.mark.parametrize("patch", [
    {"temperature": 1, "top_p": 1, "presence_penalty": 0, "repetition_penalty": 1},  # ints for floats
    {"top_k": 100_000},  # beyond the vocabulary: keeps everything
    {"top_k": 2**31 - 1},
    {"top_k": -1},
    {"seed": -5},
    {"seed": 2**63 - 1 - 128, "n": 2},
    {"logit_bias": {"5": -100, "6": 100.0}},
    {"stop": ["x" * 1024]},
    {"temperature": None, "n": None, "stream": None},  # null means the default
], ids=repr)
def test_legitimate_values_at_the_bounds_are_served_by_the_real_sampler(live_http, patch):
    for path, body in ((CHAT, _chat(**patch)), (COMPLETIONS, _completion(**patch))):
        response = live_http.post(path, json=body)
        assert response.status_code == 200, (path, response.text)
        assert all(choice["finish_reason"] in ("length", "stop") for choice in response.json()["choices"])


SURROGATE_BODIES = {
    "raw_bytes_in_content": (CHAT, b'{"messages": [{"role": "user", "content": "a\xed\xa0\x80b"}], "max_tokens": 2}'),
    "raw_low_surrogate_in_key": (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "\xed\xb0\x80": 1}'),
    "escape_in_content": (CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'),
    "raw_bytes_in_prompt": (COMPLETIONS, b'{"prompt": "\xed\xa0\x80", "max_tokens": 2}'),
    "escape_in_prompt": (COMPLETIONS, b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
    "raw_bytes_in_adapter_name": (ADAPTERS, b'{"name": "x\xed\xa0\x80", "source": "/nowhere"}'),
    "escape_in_adapter_source": (ADAPTERS, b'{"name": "fine", "source": "\\ud800"}'),
}


@pytest.mark.parametrize("case", sorted(SURROGATE_BODIES))
def test_surrogates_in_a_body_are_400_on_every_route(http, case):
    path, body = SURROGATE_BODIES[case]
    error = _error(http.post(path, content=body, headers={"content-type": "application/json"}), None)
    assert error["code"] == "invalid_json"
    assert http.post(CHAT, json=_chat()).status_code == 200


def test_a_paired_surrogate_escape_is_text_and_served(http):
    body = b'{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "max_tokens": 2}'
    assert http.post(CHAT, content=body, headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_400(http, number):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": ' + number + b"}"
    error = _error(http.post(CHAT, content=body, headers={"content-type": "application/json"}), None)
    assert error["code"] == "invalid_json" and "finite" in error["message"]


VICTIM_TOKENS = 200


def _victim_stream(live: LiveServer, started: threading.Event, result: dict[str, Any]) -> None:
    body = _chat(max_tokens=VICTIM_TOKENS, ignore_eos=True, temperature=0, stream=True)
    with live.http() as client, client.stream("POST", CHAT, json=body) as response:
        result["status"] = response.status_code
        events = []
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(line[len("data:"):].strip())
                started.set()
        result["events"] = events
    started.set()


def test_huge_top_k_and_other_bad_values_are_400_and_spare_the_concurrent_stream(live, live_http):
    http = live_http
    started, result = threading.Event(), {}
    victim = threading.Thread(target=_victim_stream, args=(live, started, result), daemon=True)
    victim.start()
    assert started.wait(30), "the victim stream sent nothing"
    # Unbounded, this top_k reached the sampler's int64 tensor and failed the whole step, victim included.
    _error(http.post(CHAT, json=_chat(top_k=2**63, max_tokens=4)), "top_k")
    assert victim.is_alive(), "the victim finished before the bad request could reach its step"
    bad = [
        (CHAT, _chat(seed=2**64)),
        (CHAT, _chat(max_tokens="999")),
        (CHAT, _chat(stream="yes")),
        (COMPLETIONS, _completion(prompt=[2**63])),
        (COMPLETIONS, _completion(logit_bias={"5": 1e308, "6": 1})),
    ]
    for path, body in bad:
        _error(http.post(path, json=body))
    raw = b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}], "max_tokens": 2}'
    _error(http.post(CHAT, content=raw, headers={"content-type": "application/json"}))
    victim.join(60)
    assert not victim.is_alive(), "the victim stream did not finish"
    assert result["status"] == 200 and result["events"][-1] == "[DONE]"
    chunks = [json.loads(e) for e in result["events"][:-1]]
    assert not any("error" in chunk for chunk in chunks), [c for c in chunks if "error" in c]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    assert finish == ["length"]


def test_every_invalid_request_of_the_soak_is_a_4xx_in_the_envelope(http):
    from load_tests.chaos import invalid_requests

    for case in invalid_requests(MODEL_NAME):
        response = http.post(case.path, content=case.body, headers={"content-type": case.content_type})
        assert 400 <= response.status_code < 500, (case.kind, response.status_code, response.text[:200])
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, case.kind
