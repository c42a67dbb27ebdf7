"""POST /v1/chat/completions through the openai client, in-process over the fake engine: shapes,
streams, usage, logprobs, stop strings and budgets. How the real sampler answers the sampling
parameters is end to end, in test_sampling_e2e.py."""

from __future__ import annotations

import pytest

from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME
from tests.server.fake_engine import answer_of
from tests.server.helpers import MESSAGES, joined_stream, logprob_bytes, sse_events


@pytest.fixture
def client(fake):
    return fake.client()


def _chat(client, **kwargs):
    kwargs.setdefault("model", MODEL_NAME)
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(**kwargs)


def test_non_streaming_shape(client):
    response = _chat(client, max_tokens=8, temperature=0)
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert isinstance(response.created, int) and response.created > 0
    assert response.model == MODEL_NAME
    [choice] = response.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 0 and 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_model_echoes_the_adapter_and_empty_model_means_base(fake, client):
    answer = _chat(client, model=ADAPTER_NAMES[0], max_tokens=100)
    assert answer.model == ADAPTER_NAMES[0] and answer.choices[0].message.content == answer_of(ADAPTER_NAMES[0])
    assert fake.engine.requests[-1].adapter == ADAPTER_NAMES[0]
    with fake.http() as http:
        body = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}).json()
        assert body["model"] == MODEL_NAME
        body = http.post("/v1/chat/completions", json={"model": "", "messages": MESSAGES, "max_tokens": 2}).json()
        assert body["model"] == MODEL_NAME
    assert [r.adapter for r in fake.engine.requests[-2:]] == [None, None]


def test_raw_stream_shape(fake):
    body = {"model": ADAPTER_NAMES[1], "messages": MESSAGES, "max_tokens": 6, "temperature": 0,
            "stream": True}
    with fake.http() as http:
        events = sse_events(http, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == ADAPTER_NAMES[1] for c in chunks)
    assert all("usage" not in c for c in chunks)
    first, *middle, last = [c["choices"][0] for c in chunks]
    assert first["delta"] == {"role": "assistant", "content": ""} and first["finish_reason"] is None
    for choice in middle:
        assert set(choice["delta"]) == {"content"} and choice["finish_reason"] is None
    assert last["delta"] == {} and last["finish_reason"] in ("stop", "length")


def test_include_usage(fake, client):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with fake.http() as http:
        events = sse_events(http, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["id"] == chunks[0]["id"]
    reference = _chat(client, max_tokens=5, temperature=0).usage
    assert usage_chunk["usage"] == reference.model_dump(include={"prompt_tokens", "completion_tokens",
                                                                 "total_tokens"})


def test_logprobs_shape_and_bytes(client):
    response = _chat(client, max_tokens=16, temperature=0, logprobs=True, top_logprobs=4)
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert isinstance(entry.token, str) and entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 4
        assert all(isinstance(b, int) and 0 <= b < 256 for b in entry.bytes)
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and entry.logprob <= tops[0] + 1e-5
    assert logprob_bytes(content).decode("utf-8") == choice.message.content
    assert choice.logprobs.refusal is None


def test_top_logprobs_zero_gives_empty_lists_and_no_logprobs_gives_null(client):
    response = _chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=0)
    assert all(entry.top_logprobs == [] for entry in response.choices[0].logprobs.content)
    assert _chat(client, max_tokens=4, logprobs=False).choices[0].logprobs is None


def _greedy_text(client, model=MODEL_NAME):
    response = _chat(client, model=model, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    return response.choices[0].message.content


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_strings_truncate_and_never_leak(client, as_list):
    text = _greedy_text(client)
    stop = text[10:13]
    expected = text[: text.index(stop)]
    stop_arg = [stop, "\x00never"] if as_list else stop
    full = _chat(client, max_tokens=40, temperature=0, stop=stop_arg, extra_body={"ignore_eos": True})
    assert full.choices[0].message.content == expected
    assert full.choices[0].finish_reason == "stop"
    # No stream_options: stop works on a plain stream, and no delta carries any of the stop string.
    chunks = list(_chat(client, max_tokens=40, temperature=0, stop=stop_arg, stream=True,
                        extra_body={"ignore_eos": True}))
    assert joined_stream(chunks)[0] == expected
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["stop"]


def test_max_completion_tokens_wins_and_default_is_rest_of_context(fake, client):
    response = _chat(client, max_tokens=3, max_completion_tokens=6, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 6 and response.choices[0].finish_reason == "length"
    response = _chat(client, temperature=0, extra_body={"ignore_eos": True})
    assert response.usage.total_tokens == fake.engine.max_model_len
    assert fake.engine.requests[-1].params.max_tokens == response.usage.completion_tokens
    assert response.choices[0].finish_reason == "length"


def test_content_parts_extra_fields_and_user(fake, client):
    _chat(client, max_tokens=10, temperature=0)
    text = MESSAGES[0]["content"]
    parts = [{"type": "text", "text": text[:10]}, {"type": "text", "text": text[10:]}]
    _chat(client, messages=[{"role": "user", "content": parts}], max_tokens=10, temperature=0,
          user="someone", extra_body={"some_future_field": {"x": 1}, "top_k": 5})
    plain, joined = fake.engine.requests[-2:]
    assert joined.prompt_token_ids == plain.prompt_token_ids and joined.params.top_k == 5


def test_eos_ends_the_choice_without_its_text(fake, client):
    kwargs = dict(max_tokens=200, temperature=0, logprobs=True)
    full = _chat(client, **kwargs)
    choice = full.choices[0]
    eos = fake.engine.tokenizer.eos_token
    assert choice.finish_reason == "stop" and choice.message.content == answer_of(None)
    assert eos not in choice.message.content
    content = choice.logprobs.content
    assert full.usage.completion_tokens == len(content) and content[-1].token == "" and content[-1].bytes == []
    assert logprob_bytes(content).decode("utf-8") == choice.message.content
    chunks = list(_chat(client, stream=True, **kwargs))
    assert joined_stream(chunks)[0] == choice.message.content
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
