"""Request models and the checks that turn them into SamplingParams."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.http.errors import APIError, from_validation_error
from server.limits import budget
from server.openai.params import build_sampling_params, parse_logit_bias
from server.openai.schemas import FIELD_NAMES, ChatCompletionRequest, CompletionRequest


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
    error = from_validation_error(info.value, FIELD_NAMES)
    assert error.status == 400 and error.param == "stop"


def test_logit_bias_and_context_checks():
    assert parse_logit_bias({"3": 1.5}, vocab_size=10) == {3: 1.5}
    for bad in ({"x": 1}, {"10": 1}, {"-1": 1}, {"1": 101}):
        with pytest.raises(APIError) as info:
            parse_logit_bias(bad, vocab_size=10)
        assert info.value.status == 400 and info.value.param == "logit_bias"
    assert budget(None, 10, 32, "messages") == 22
    assert budget(5, 10, 32, "messages") == 5
    for wanted, prompt_len in ((23, 10), (None, 32)):
        with pytest.raises(APIError) as info:
            budget(wanted, prompt_len, 32, "messages")
        assert info.value.code == "context_length_exceeded"


def test_seed_per_choice():
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user"}], "seed": 40})
    seeds = [build_sampling_params(req, max_tokens=4, top_logprobs=None, vocab_size=10, choice_index=i).seed
             for i in range(3)]
    assert seeds == [40, 41, 42]
    unseeded = ChatCompletionRequest.model_validate({"messages": [{"role": "user"}]})
    assert build_sampling_params(unseeded, max_tokens=4, top_logprobs=None, vocab_size=10, choice_index=2).seed is None


def _chat_body(**fields):
    return {"messages": [{"role": "user", "content": "x"}], **fields}


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", "999"), ("max_tokens", 999.0), ("max_tokens", True), ("n", True), ("stream", "yes"),
    ("stream", 1), ("logprobs", 1), ("top_k", 2**63), ("top_k", 2**31), ("seed", 2**64), ("seed", False),
    ("temperature", True), ("temperature", "1"), ("logit_bias", {"1": "2"}), ("stop_token_ids", [False]),
])
def test_strict_types_and_bounds_are_400s_naming_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(_chat_body(**{field: value}))
    error = from_validation_error(info.value, FIELD_NAMES)
    assert error.status == 400 and (error.param == field or error.param.startswith(field + ".")), error.param


def test_a_float_field_still_takes_an_integer():
    req = ChatCompletionRequest.model_validate(_chat_body(temperature=1, top_p=1, presence_penalty=-2,
                                                          logit_bias={"3": 5}))
    assert (req.temperature, req.top_p, req.presence_penalty, req.logit_bias) == (1.0, 1.0, -2.0, {"3": 5.0})
    assert isinstance(req.temperature, float)


def test_every_bounded_value_builds_engine_parameters():
    """What validation lets through, the engine's own checks accept: nothing fails later."""
    req = CompletionRequest.model_validate({"prompt": "x", "top_k": 2**31 - 1, "seed": 2**63 - 1 - 128, "n": 128,
                                            "logit_bias": {"9": 100}, "stop_token_ids": [0, 9]})
    params = [build_sampling_params(req, max_tokens=4, top_logprobs=5, vocab_size=10, choice_index=i)
              for i in range(req.n)]
    assert params[-1].seed == 2**63 - 1 - 128 + 127 and params[0].top_k == 2**31 - 1


def test_logit_bias_key_beyond_int64_is_400():
    with pytest.raises(APIError) as info:
        parse_logit_bias({str(2**64): 1}, vocab_size=10)
    assert info.value.param == "logit_bias"
