"""POST /v1/chat/completions against the real engine on a tiny model, through the openai client."""

from __future__ import annotations

import pytest

from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME
from tests.server.helpers import MESSAGES, joined_stream, logprob_bytes, sse_events


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


def test_model_echoes_the_adapter_and_empty_model_means_base(live, client):
    assert _chat(client, model=ADAPTER_NAMES[0], max_tokens=2).model == ADAPTER_NAMES[0]
    with live.http() as http:
        body = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}).json()
        assert body["model"] == MODEL_NAME
        body = http.post("/v1/chat/completions", json={"model": "", "messages": MESSAGES, "max_tokens": 2}).json()
        assert body["model"] == MODEL_NAME


def test_raw_stream_shape(live):
    body = {"model": ADAPTER_NAMES[1], "messages": MESSAGES, "max_tokens": 6, "temperature": 0,
            "stream": True}
    with live.http() as http:
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


def test_include_usage(live, client):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with live.http() as http:
        events = sse_events(http, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["id"] == chunks[0]["id"]
    reference = _chat(client, max_tokens=5, temperature=0).usage
    assert usage_chunk["usage"] == reference.model_dump(include={"prompt_tokens", "completion_tokens",
                                                                 "total_tokens"})


@pytest.mark.parametrize("model", [MODEL_NAME, *ADAPTER_NAMES[:3]])
def test_stream_equals_non_stream_and_adapters_differ(client, model):
    kwargs = dict(model=model, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3)
    full = _chat(client, **kwargs)
    chunks = list(_chat(client, stream=True, **kwargs))
    assert joined_stream(chunks)[0] == full.choices[0].message.content
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in full.choices[0].logprobs.content]
    assert len(streamed) == full.usage.completion_tokens
    finals = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finals == [full.choices[0].finish_reason]
    if model != MODEL_NAME:
        base = _chat(client, model=MODEL_NAME, max_tokens=24, temperature=0)
        assert base.choices[0].message.content != full.choices[0].message.content


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
    # The model is random: its bytes may not be valid UTF-8, which the text shows as U+FFFD
    # (and an incomplete character cut off by the length limit is dropped).
    decoded = logprob_bytes(content).decode("utf-8", errors="replace")
    assert decoded.rstrip("\ufffd") == choice.message.content.rstrip("\ufffd")
    assert choice.logprobs.refusal is None


def test_top_logprobs_zero_gives_empty_lists_and_no_logprobs_gives_null(client):
    response = _chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=0)
    assert all(entry.top_logprobs == [] for entry in response.choices[0].logprobs.content)
    assert _chat(client, max_tokens=4, logprobs=False).choices[0].logprobs is None


def test_n_choices_stream_and_seeds(live, client):
    kwargs = dict(max_tokens=8, temperature=1.0, seed=11)
    full = _chat(client, n=3, **kwargs)
    assert [c.index for c in full.choices] == [0, 1, 2]
    singles = [_chat(client, n=1, max_tokens=8, temperature=1.0, seed=11 + i).choices[0].message.content
               for i in range(3)]
    assert [c.message.content for c in full.choices] == singles
    assert len(set(singles)) > 1
    assert full.usage.completion_tokens == sum(
        _chat(client, max_tokens=8, temperature=1.0, seed=11 + i).usage.completion_tokens for i in range(3))

    body = {"model": MODEL_NAME, "messages": MESSAGES, "n": 3, "stream": True, **kwargs}
    with live.http() as http:
        events = sse_events(http, "/v1/chat/completions", body)
    chunks = events[:-1]
    for index in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert sum("role" in ch["delta"] for ch in mine) == 1 and mine[0]["delta"].get("role") == "assistant"
        assert [ch["finish_reason"] for ch in mine if ch["finish_reason"]] == [full.choices[index].finish_reason]
        assert mine[-1]["delta"] == {}
        assert "".join(ch["delta"].get("content", "") for ch in mine) == singles[index]


def test_same_seed_same_output(client):
    a = _chat(client, max_tokens=12, temperature=1.3, seed=7).choices[0].message.content
    b = _chat(client, max_tokens=12, temperature=1.3, seed=7).choices[0].message.content
    c = _chat(client, max_tokens=12, temperature=1.3, seed=8).choices[0].message.content
    assert a == b and a != c


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


def test_max_completion_tokens_wins_and_default_is_rest_of_context(live, client):
    response = _chat(client, max_tokens=3, max_completion_tokens=6, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 6 and response.choices[0].finish_reason == "length"
    response = _chat(client, temperature=0, extra_body={"ignore_eos": True})
    assert response.usage.total_tokens == live.engine.max_model_len
    assert response.choices[0].finish_reason == "length"


def test_content_parts_extra_fields_and_user(client):
    plain = _chat(client, max_tokens=10, temperature=0).choices[0].message.content
    text = MESSAGES[0]["content"]
    parts = [{"type": "text", "text": text[:10]}, {"type": "text", "text": text[10:]}]
    response = _chat(client, messages=[{"role": "user", "content": parts}], max_tokens=10, temperature=0,
                     user="someone", extra_body={"some_future_field": {"x": 1}, "top_k": 5})
    assert response.choices[0].message.content == plain


def test_logit_bias_forces_a_token(live, client):
    tokenizer = live.engine.tokenizer
    token_id = tokenizer.convert_tokens_to_ids("over")
    assert isinstance(token_id, int)
    response = _chat(client, max_tokens=5, temperature=1.0, logit_bias={str(token_id): 100},
                     extra_body={"ignore_eos": True})
    assert response.choices[0].message.content == "over" * 5


def test_penalties_and_sampling_knobs_change_the_output(client):
    plain = _chat(client, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    plain_text = plain.choices[0].message.content
    for knobs in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 3.0,
                                                                                        "ignore_eos": True}}):
        knobs.setdefault("extra_body", {"ignore_eos": True})
        changed = _chat(client, max_tokens=30, temperature=0, **knobs).choices[0].message.content
        assert changed != plain_text, knobs
    # top_k=1 is greedy whatever the temperature; a tiny top_p too.
    for extra in ({"top_k": 1}, {}):
        kwargs = {"top_p": 1e-6} if not extra else {}
        sampled = _chat(client, max_tokens=30, temperature=2.0, seed=3, extra_body={"ignore_eos": True, **extra},
                        **kwargs)
        assert sampled.choices[0].message.content == plain_text


def test_eos_ends_the_choice_without_its_text(live, client):
    eos = next(iter(live.engine.eos_token_ids))
    kwargs = dict(max_tokens=20, temperature=0, logprobs=True, logit_bias={str(eos): 100},
                  extra_body={"min_tokens": 3})
    full = _chat(client, **kwargs)
    choice = full.choices[0]
    assert choice.finish_reason == "stop" and full.usage.completion_tokens == 4
    assert "<|im_end|>" not in choice.message.content and choice.message.content
    content = choice.logprobs.content
    assert len(content) == 4 and content[-1].token == "" and content[-1].bytes == []
    assert logprob_bytes(content).decode("utf-8", errors="replace") == choice.message.content
    chunks = list(_chat(client, stream=True, **kwargs))
    assert joined_stream(chunks)[0] == choice.message.content
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
