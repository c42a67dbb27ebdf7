"""The one SSE loop (server/openai/streaming.py) over the fake engine: chunks in the order a client
expects (the role first, content, the finish, the usage, then [DONE]), an error after the start as an
error event followed by [DONE], the tokens used reported however the stream ends, and the terminal
token's logprob kept without its text."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams
from server.http.errors import APIError
from server.openai import pipeline
from server.openai.generation import ChoiceRequest, MergedGeneration
from server.openai.streaming import (
    ChatChunks,
    CompletionChunks,
    error_event,
    failed_delta_error,
    stream_events,
)
from tests.server.fake_engine import FakeEngine, answer_of

PROMPT = [5, 6, 7]


def _events(engine: FakeEngine, render: Any, choices: int = 1, *, read: int | None = None,
            done: list[int] | None = None, **params: Any) -> list[Any]:
    """The decoded `data:` payloads of one stream (the first `read` of them, then the client leaves)."""

    async def run() -> list[Any]:
        sampling = SamplingParams(**{"max_tokens": 200, **params})
        gen = MergedGeneration(engine, [ChoiceRequest(i, f"r{i}", list(PROMPT), sampling) for i in range(choices)])
        gen.start()

        async def on_done(tokens: int) -> None:
            (done if done is not None else []).append(tokens)

        events = stream_events(gen, render, on_done)
        out: list[Any] = []
        async for item in events:
            out.append(item["data"] if item["data"] == "[DONE]" else json.loads(item["data"]))
            if read is not None and len(out) == read:
                break
        await events.aclose()
        return out

    return asyncio.run(run())


def _meta(engine: FakeEngine, choices: int = 1, **options: Any) -> Any:
    params = [SamplingParams()] * choices
    return pipeline.new_meta("chatcmpl-1", "tiny-base", engine, params, len(PROMPT), **options)


def _content(events: list[Any], index: int = 0) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1]
                   if c["choices"] and c["choices"][0]["index"] == index)


def test_a_chat_stream_opens_with_the_role_then_content_then_the_finish_then_done() -> None:
    engine = FakeEngine()
    events = _events(engine, ChatChunks(_meta(engine)))
    first, *middle, finish, done = events
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert done == "[DONE]" and _content(events) == answer_of(None)
    assert {c["id"] for c in events[:-1]} == {"chatcmpl-1"} and all("usage" not in c for c in events[:-1])


def test_every_choice_gets_its_own_opening_and_finish() -> None:
    engine = FakeEngine()
    events = _events(engine, ChatChunks(_meta(engine, 3)), choices=3)
    for index in range(3):
        mine = [c["choices"][0] for c in events[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant" and [m["finish_reason"] for m in mine][-1] == "stop"
        assert sum("role" in m["delta"] for m in mine) == 1
        assert _content(events, index) == answer_of(None)


def test_with_tools_offered_the_opening_content_is_null() -> None:
    from server.openai.tool_parsers import parser_named

    engine = FakeEngine()
    parser = parser_named("hermes")
    events = _events(engine, ChatChunks(_meta(engine), [parser.stream()]))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert _content(events) == answer_of(None)


def test_the_usage_chunk_closes_the_stream_when_asked_for() -> None:
    engine = FakeEngine()
    events = _events(engine, ChatChunks(_meta(engine, include_usage=True)), max_tokens=4, ignore_eos=True)
    *chunks, usage, done = events
    assert all(c["usage"] is None for c in chunks)
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                                         "total_tokens": 7}


def test_the_terminal_token_keeps_its_logprob_but_shows_no_text() -> None:
    engine = FakeEngine()
    events = _events(engine, ChatChunks(_meta(engine, top_logprobs=1)), top_logprobs=1)
    entries = [e for c in events[:-1] if c["choices"] and c["choices"][0]["logprobs"]
               for e in c["choices"][0]["logprobs"]["content"]]
    assert entries[-1]["token"] == "" and entries[-1]["bytes"] == [] and entries[-1]["logprob"] < 0
    assert bytes(b for e in entries for b in e["bytes"]).decode() == answer_of(None)


def test_an_error_after_the_start_is_an_error_event_then_done() -> None:
    engine = FakeEngine()
    engine.fail_after = 2
    done: list[int] = []
    events = _events(engine, ChatChunks(_meta(engine)), done=done)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_error"
    assert engine.fail_message in events[-2]["error"]["message"] and done == [2]


def test_the_tokens_used_are_reported_when_the_client_leaves_and_its_requests_are_aborted() -> None:
    engine = FakeEngine()
    done: list[int] = []
    events = _events(engine, ChatChunks(_meta(engine)), read=3, done=done, ignore_eos=True)
    assert len(events) == 3 and done and done[0] >= 2
    assert "r0" in engine.aborted


def test_a_completion_stream_echoes_the_prompt_first() -> None:
    engine = FakeEngine()
    render = CompletionChunks(_meta(engine, echo_texts=["Echo: "]))
    events = _events(engine, render)
    assert events[0]["choices"][0]["text"] == "Echo: " and events[0]["object"] == "text_completion"
    text = "".join(c["choices"][0]["text"] for c in events[1:-1])
    assert text == answer_of(None) and events[-2]["choices"][0]["finish_reason"] == "stop"


def test_failed_deltas_map_to_the_errors_a_client_sees(caplog: pytest.LogCaptureFixture) -> None:
    aborted = failed_delta_error(RequestDelta("r", finish_reason="abort"))
    assert (aborted.status, aborted.code) == (503, "aborted")
    failed = failed_delta_error(RequestDelta("r", finish_reason="error", error="kernel fault"))
    assert (failed.status, failed.code, failed.message) == (500, "engine_error", "kernel fault")
    assert json.loads(error_event(APIError(400, "bad", code="x"))["data"])["error"]["code"] == "x"
    with caplog.at_level(logging.ERROR, logger="server.openai.streaming"):
        hidden = json.loads(error_event(RuntimeError("secret detail"))["data"])["error"]
    assert hidden["code"] == "internal_error" and "secret" not in hidden["message"]
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)  # logged, not sent
