"""Response builders, request models and parameter checks on their own (no server)."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from engine.outputs import TokenLogprob
from server import protocol
from server.chat import CHATML_TEMPLATE, apply_chat_template
from server.errors import APIError, from_validation_error
from server.params import build_sampling_params, parse_logit_bias, resolve_max_tokens
from server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from tests.factories import build_tokenizer


class _Decoder:
    def token_str(self, token_id: int) -> str:
        return f"t{token_id}"

    def token_bytes(self, token_id: int) -> bytes:
        return f"t{token_id}".encode()


def test_infinite_and_nan_logprobs_are_clamped_and_serialize():
    entries = [TokenLogprob(1, -math.inf, [(1, -math.inf), (2, math.nan)]), TokenLogprob(2, -0.5, [])]
    body = protocol.chat_logprobs(entries, _Decoder())
    assert body["content"][0]["logprob"] == protocol.LOGPROB_FLOOR
    assert [t["logprob"] for t in body["content"][0]["top_logprobs"]] == [protocol.LOGPROB_FLOOR] * 2
    assert body["content"][1] == {"token": "t2", "logprob": -0.5, "bytes": list(b"t2"), "top_logprobs": []}
    json.dumps(body, allow_nan=False)
    legacy = protocol.completion_logprobs(entries, _Decoder(), text_offset=0)
    assert legacy["token_logprobs"] == [protocol.LOGPROB_FLOOR, -0.5]
    json.dumps(legacy, allow_nan=False)


def test_terminal_token_keeps_its_logprob_but_no_text():
    entries = [TokenLogprob(5, -0.1, [(5, -0.1)]), TokenLogprob(9, -0.2, [(9, -0.2)])]
    assert protocol.hides_last_token([5, 9], "stop", {9})
    assert not protocol.hides_last_token([5, 9], "length", {9})
    assert not protocol.hides_last_token([5, 8], "stop", {9})
    content = protocol.chat_logprobs(entries, _Decoder(), hide_last=True)["content"]
    assert content[-1]["token"] == "" and content[-1]["bytes"] == [] and content[-1]["logprob"] == -0.2
    legacy = protocol.completion_logprobs(entries, _Decoder(), text_offset=3, hide_last=True)
    assert legacy["tokens"] == ["t5", ""] and legacy["text_offset"] == [3, 5]


def test_usage_and_model_card():
    assert protocol.usage(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    card = protocol.model_card("a", 1, "base", "base")
    assert card == {"id": "a", "object": "model", "created": 1, "owned_by": "quiver", "root": "base",
                    "parent": "base"}


def test_null_means_default_and_extra_fields_are_kept():
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "temperature": None,
                                                "n": None, "future_field": 1})
    assert req.temperature == 1.0 and req.n == 1 and req.model_extra == {"future_field": 1}


def test_max_completion_tokens_wins_and_logprobs_resolution():
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                                "max_completion_tokens": 9, "logprobs": True})
    assert req.wanted_max_tokens() == 9 and req.wanted_top_logprobs() == 0
    assert ChatCompletionRequest.model_validate({"messages": [{"role": "user"}]}).wanted_top_logprobs() is None


def test_stop_list_drops_empty_strings():
    req = CompletionRequest.model_validate({"prompt": "x", "stop": ["", "a"]})
    assert req.stop_list() == ["a"]
    assert CompletionRequest.model_validate({"prompt": "x", "stop": "b"}).stop_list() == ["b"]


def test_validation_error_param_names_the_field_not_the_union_member():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5})
    error = from_validation_error(info.value)
    assert error.status == 400 and error.param == "stop"


def test_logit_bias_and_context_checks():
    assert parse_logit_bias({"3": 1.5}, vocab_size=10) == {3: 1.5}
    for bad in ({"x": 1}, {"10": 1}, {"-1": 1}, {"1": 101}):
        with pytest.raises(APIError) as info:
            parse_logit_bias(bad, vocab_size=10)
        assert info.value.status == 400 and info.value.param == "logit_bias"
    assert resolve_max_tokens(None, 10, 32, "messages") == 22
    assert resolve_max_tokens(5, 10, 32, "messages") == 5
    for wanted, prompt_len in ((23, 10), (None, 32)):
        with pytest.raises(APIError) as info:
            resolve_max_tokens(wanted, prompt_len, 32, "messages")
        assert info.value.code == "context_length_exceeded"


def test_seed_per_choice():
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user"}], "seed": 40})
    seeds = [build_sampling_params(req, max_tokens=4, top_logprobs=None, vocab_size=10, choice_index=i).seed
             for i in range(3)]
    assert seeds == [40, 41, 42]
    unseeded = ChatCompletionRequest.model_validate({"messages": [{"role": "user"}]})
    assert build_sampling_params(unseeded, max_tokens=4, top_logprobs=None, vocab_size=10, choice_index=2).seed is None


def test_chat_template_and_chatml_default():
    tokenizer = build_tokenizer()
    messages = [ChatMessage(role="system", content="Be brief."),
                ChatMessage.model_validate({"role": "user", "content": [{"type": "text", "text": "Hel"},
                                                                        {"type": "text", "text": "lo"}]})]
    ids = apply_chat_template(tokenizer, messages)
    text = tokenizer.decode(ids)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    tokenizer.chat_template = None
    assert apply_chat_template(tokenizer, messages) == ids  # the default is ChatML too
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(APIError) as info:
        apply_chat_template(tokenizer, messages)
    assert info.value.status == 400 and "roles must alternate" in info.value.message
    assert "<|im_start|>" in CHATML_TEMPLATE
