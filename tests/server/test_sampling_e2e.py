"""End to end on the real engine and a tiny model: the sampling parameters of a chat completion reach
the sampler. Greedy streams equal greedy answers, adapters change them, seeds give each choice its own
reproducible sample, and logit_bias, penalties, top_k, top_p and min_tokens do what they say. (Shapes,
streams and errors are tested in-process over the fake engine, in test_chat_completions.py.)"""

from __future__ import annotations

import pytest

from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME
from tests.server.helpers import MESSAGES, joined_stream, logprob_bytes, sse_events


def _chat(client, **kwargs):
    kwargs.setdefault("model", MODEL_NAME)
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(**kwargs)


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


def test_logit_bias_on_the_eos_ends_the_choice_after_min_tokens_without_its_text(live, client):
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
