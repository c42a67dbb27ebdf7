"""POST /v1/completions (legacy) through the openai client, in-process over the fake engine: shapes,
prompts as text, ids or lists, n, logprobs, echo and streams."""

from __future__ import annotations

import pytest

from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME
from tests.server.fake_engine import answer_of
from tests.server.helpers import sse_events

PROMPT = "The quick brown fox"


@pytest.fixture
def client(fake):
    return fake.client()


def _complete(client, **kwargs):
    kwargs.setdefault("model", MODEL_NAME)
    kwargs.setdefault("prompt", PROMPT)
    return client.completions.create(**kwargs)


def test_shape_and_usage(fake, client):
    response = _complete(client, max_tokens=6, temperature=0)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.model == MODEL_NAME
    [choice] = response.choices
    assert choice.index == 0 and choice.logprobs is None and choice.finish_reason in ("stop", "length")
    prompt_ids = fake.engine.tokenizer.encode(PROMPT)
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_default_max_tokens_is_sixteen(client):
    response = _complete(client, temperature=0, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 16


def test_token_id_prompt_equals_string_prompt(fake, client):
    ids = fake.engine.tokenizer.encode(PROMPT)
    by_text = _complete(client, max_tokens=8, temperature=0).choices[0].text
    by_ids = _complete(client, prompt=ids, max_tokens=8, temperature=0).choices[0].text
    assert by_ids == by_text
    assert [r.prompt_token_ids for r in fake.engine.requests] == [ids, ids]


def test_list_prompts_and_n_index_choices(fake, client):
    prompts = [PROMPT, "Un café au lait"]
    ids = [fake.engine.tokenizer.encode(p) for p in prompts]
    response = _complete(client, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert sorted(r.prompt_token_ids for r in fake.engine.requests) == sorted([ids[0], ids[0], ids[1], ids[1]])
    by_ids = _complete(client, prompt=ids, max_tokens=6, temperature=0)
    assert [c.index for c in by_ids.choices] == [0, 1]
    assert sorted(r.prompt_token_ids for r in fake.engine.requests[4:]) == sorted(ids)


def test_logprobs_shape(client):
    response = _complete(client, max_tokens=8, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert len(logprobs.text_offset) == 8
    assert all(isinstance(d, dict) and len(d) <= 3 for d in logprobs.top_logprobs)
    assert all(lp <= 0.0 for lp in logprobs.token_logprobs)
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets
    zero = _complete(client, max_tokens=4, temperature=0, logprobs=0).choices[0].logprobs
    assert all(d == {} for d in zero.top_logprobs)


def test_echo(client):
    plain = _complete(client, max_tokens=60, temperature=0).choices[0].text
    assert plain == answer_of(None)
    echoed = _complete(client, max_tokens=60, temperature=0, echo=True).choices[0].text
    assert echoed == PROMPT + plain
    only_prompt = _complete(client, max_tokens=0, echo=True)
    assert only_prompt.choices[0].text == PROMPT and only_prompt.usage.completion_tokens == 0


@pytest.mark.parametrize("model", [MODEL_NAME, ADAPTER_NAMES[2]])
def test_stream_equals_non_stream(fake, client, model):
    kwargs = dict(model=model, max_tokens=12, temperature=0, logprobs=2, echo=False)
    full = _complete(client, **kwargs)
    body = {"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": True}, **kwargs}
    with fake.http() as http:
        events = sse_events(http, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == full.usage.completion_tokens
    choices = [c["choices"][0] for c in chunks]
    assert "".join(ch["text"] for ch in choices) == full.choices[0].text
    assert [ch["finish_reason"] for ch in choices if ch["finish_reason"]] == [full.choices[0].finish_reason]
    streamed_tokens = [t for ch in choices if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    streamed_offsets = [o for ch in choices if ch["logprobs"] for o in ch["logprobs"]["text_offset"]]
    assert streamed_tokens == full.choices[0].logprobs.tokens
    assert streamed_offsets == full.choices[0].logprobs.text_offset


def test_streamed_echo_comes_first(fake):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "echo": True, "stream": True}
    with fake.http() as http:
        events = sse_events(http, "/v1/completions", body)
    assert events[0]["choices"][0]["text"] == PROMPT
