"""Prompt logprobs through the openai client: `echo` + `logprobs` on /v1/completions (OpenAI's
legacy shape, what lm-eval style harnesses score with) and vLLM's `prompt_logprobs`, end to end
against transformers (+ peft) on the server's own model; the refusals in-process over the fake engine."""

from __future__ import annotations

import json

import openai
import pytest
import torch

from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME

# Long enough to fill whole KV blocks (16 tokens each), so a repeat has cached blocks to skip.
PROMPT = ("Hello world! The quick brown fox jumps over the lazy dog. Quiver serves many LoRA adapters "
          "from one base model on one GPU.")
ADAPTER = ADAPTER_NAMES[1]
TOL = 1e-3


@pytest.fixture(scope="module")
def reference(server_model_dir, server_adapters, live):
    """(model name) -> per prompt position after the first: (logprob of the token there, top-5 ids)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([live.engine.tokenizer.encode(PROMPT)])
    base = AutoModelForCausalLM.from_pretrained(server_model_dir, dtype=torch.float32).eval()
    out = {}
    for name, model in ((MODEL_NAME, base), (ADAPTER, None)):
        if model is None:
            model = PeftModel.from_pretrained(base, server_adapters[ADAPTER]).eval()
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1).tolist()
        out[name] = (chosen, logprobs.topk(5, dim=-1).indices.tolist())
    return out


def _complete(client, **kwargs):
    kwargs.setdefault("model", MODEL_NAME)
    kwargs.setdefault("prompt", PROMPT)
    return client.completions.create(**kwargs)


def _offsets(tokens: list[str], start: int = 0) -> list[int]:
    offsets = []
    for token in tokens:
        offsets.append(start)
        start += len(token)
    return offsets


@pytest.mark.parametrize("model", [MODEL_NAME, ADAPTER])
def test_echo_with_max_tokens_0_scores_the_prompt_like_transformers(live, client, reference, model):
    response = _complete(client, model=model, echo=True, logprobs=3, max_tokens=0)
    [choice] = response.choices
    prompt_ids = live.engine.tokenizer.encode(PROMPT)
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(prompt_ids) and response.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(prompt_ids)
    assert "".join(lp.tokens) == PROMPT
    assert lp.text_offset == _offsets(lp.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    chosen, top_ids = reference[model]
    assert lp.token_logprobs[1:] == pytest.approx(chosen, abs=TOL)
    decode = live.engine.token_str
    for position, top in enumerate(lp.top_logprobs[1:]):
        assert list(top) == [decode(t) for t in top_ids[position][:3]]
        assert max(top.values()) >= lp.token_logprobs[position + 1] - TOL


def test_echo_with_generation_puts_the_prompt_first_and_leaves_the_completion_as_it_was(client):
    kwargs = dict(temperature=0, max_tokens=6, extra_body={"ignore_eos": True})
    plain = _complete(client, logprobs=2, **kwargs).choices[0]
    echoed = _complete(client, logprobs=2, echo=True, **kwargs).choices[0]
    scored = _complete(client, logprobs=2, echo=True, max_tokens=0).choices[0].logprobs
    n = len(scored.tokens)
    lp = echoed.logprobs
    assert echoed.text == PROMPT + plain.text
    assert "".join(lp.tokens) == PROMPT + "".join(plain.logprobs.tokens)
    assert lp.tokens[:n] == scored.tokens and lp.token_logprobs[:n] == scored.token_logprobs
    assert lp.top_logprobs[:n] == scored.top_logprobs and lp.text_offset[:n] == scored.text_offset
    assert lp.tokens[n:] == plain.logprobs.tokens and lp.token_logprobs[n:] == plain.logprobs.token_logprobs
    assert lp.top_logprobs[n:] == plain.logprobs.top_logprobs
    assert lp.text_offset[n:] == [len(PROMPT) + o for o in plain.logprobs.text_offset]


def test_a_repeated_prompt_is_scored_whole_with_prefix_caching_on(live, client):
    assert live.engine._core.config.enable_prefix_caching
    first = _complete(client, echo=True, logprobs=1, max_tokens=0).choices[0].logprobs
    hits = live.engine._core.scheduler.block_manager.num_cache_hits
    again = _complete(client, echo=True, logprobs=1, max_tokens=0).choices[0].logprobs
    assert again.token_logprobs == first.token_logprobs and again.top_logprobs == first.top_logprobs
    # What the scoring requests computed is cached for everyone else.
    _complete(client, max_tokens=1)
    assert live.engine._core.scheduler.block_manager.num_cache_hits > hits


def test_streamed_echo_carries_the_prompt_logprobs_first(live, client):
    kwargs = dict(echo=True, logprobs=2, temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    whole = _complete(client, **kwargs).choices[0]
    chunks = list(_complete(client, stream=True, **kwargs))
    first = chunks[0].choices[0]
    assert first.text == PROMPT and first.logprobs.token_logprobs[0] is None
    tokens = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    offsets = [o for c in chunks for ch in c.choices if ch.logprobs for o in ch.logprobs.text_offset]
    assert "".join(ch.text for c in chunks for ch in c.choices) == whole.text
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset


def test_vllm_prompt_logprobs_on_completions(live, client, reference):
    response = _complete(client, model=ADAPTER, max_tokens=2, extra_body={"prompt_logprobs": 2})
    [choice] = response.choices
    assert choice.logprobs is None  # `logprobs` was not asked for
    entries = choice.model_extra["prompt_logprobs"]
    prompt_ids = live.engine.tokenizer.encode(PROMPT)
    assert len(entries) == len(prompt_ids) and entries[0] is None
    chosen, top_ids = reference[ADAPTER]
    for position, entry in enumerate(entries[1:]):
        token_id = prompt_ids[position + 1]
        own = entry[str(token_id)]
        assert own["logprob"] == pytest.approx(chosen[position], abs=TOL)
        assert own["rank"] >= 1 and own["decoded_token"] == live.engine.token_str(token_id)
        assert set(entry) == {str(token_id), *(str(t) for t in top_ids[position][:2])}
        for rank, top_id in enumerate(top_ids[position][:2], start=1):
            if top_id != token_id:
                assert entry[str(top_id)]["rank"] == rank
        assert (own["rank"] == 1) == (top_ids[position][0] == token_id)


def test_vllm_prompt_logprobs_on_chat_completions(live, client):
    messages = [{"role": "user", "content": PROMPT}]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2, n=2,
                                              extra_body={"prompt_logprobs": 0})
    entries = response.model_extra["prompt_logprobs"]
    assert len(entries) == response.usage.prompt_tokens and entries[0] is None
    assert all(len(entry) == 1 and next(iter(entry.values()))["logprob"] <= 0 for entry in entries[1:])
    plain = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2)
    assert "prompt_logprobs" not in (plain.model_extra or {})


@pytest.mark.parametrize(("route", "body", "param"), [
    ("completions", {"logprobs": 6, "echo": True}, "logprobs"),
    ("completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("completions", {"prompt_logprobs": -1}, "prompt_logprobs"),
    ("completions", {"prompt_logprobs": True}, "prompt_logprobs"),
    ("completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("chat", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("chat", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
])
def test_bad_prompt_logprobs_are_400s_naming_the_field(fake, route, body, param):
    client = fake.client()
    with pytest.raises(openai.BadRequestError) as caught:
        if route == "chat":
            client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=1, stream=body.pop("stream", False), extra_body=body)
        else:
            logprobs = body.pop("logprobs", None)
            _complete(client, max_tokens=1, logprobs=logprobs, echo=body.pop("echo", False),
                      stream=body.pop("stream", False), extra_body=body)
    error = json.loads(caught.value.response.text)["error"]
    assert caught.value.status_code == 400 and error["param"] == param


def test_max_logprobs_caps_prompt_logprobs(fake):
    client = fake.client()
    fake.state.max_logprobs = 2
    with pytest.raises(openai.BadRequestError) as caught:
        _complete(client, max_tokens=1, extra_body={"prompt_logprobs": 3})
    assert json.loads(caught.value.response.text)["error"]["param"] == "prompt_logprobs"
    scored = _complete(client, max_tokens=0, echo=True, logprobs=2).choices[0].logprobs
    assert all(len(top) == 2 for top in scored.top_logprobs[1:])
