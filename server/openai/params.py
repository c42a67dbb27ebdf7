"""From a validated request body to the engine's `SamplingParams`.

The checks here need more than one field or knowledge of the model (vocabulary size,
context length); each failure is a 400 naming the parameter.
"""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from server.http.errors import APIError, bad_request
from server.openai.schemas import ChatCompletionRequest, CompletionRequest, _SamplingFields


def check_chat_request(req: ChatCompletionRequest) -> None:
    _check_stream_options(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("`top_logprobs` requires `logprobs` to be true.", param="top_logprobs")
    _check_prompt_logprobs_unstreamed(req)


def check_completion_request(req: CompletionRequest) -> None:
    _check_stream_options(req)
    if req.best_of is not None and (req.best_of != req.n or req.best_of > 1):
        raise bad_request("`best_of` is not supported: the server does not rank candidates; use `n` for several "
                          "completions.", param="best_of", code="unsupported_parameter")
    if req.suffix:
        raise bad_request("`suffix` (text after the completion) is not supported.", param="suffix",
                          code="unsupported_parameter")
    _check_prompt_logprobs_unstreamed(req)


def _check_prompt_logprobs_unstreamed(req: ChatCompletionRequest | CompletionRequest) -> None:
    # As vLLM: its shape has no place in a chunk (`echo` with `logprobs` streams the legacy shape).
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("`prompt_logprobs` is not supported with `stream`; use `echo` with `logprobs` on "
                          "/v1/completions to stream the prompt's logprobs.", param="prompt_logprobs")


def _check_stream_options(req: _SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad_request("`stream_options` is only allowed when `stream` is true.", param="stream_options")


def parse_logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """Token-id keys (as strings, per the OpenAI API) that must exist in the vocabulary."""
    bias: dict[int, float] = {}
    for key, value in (raw or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias key {key!r} is not a token id.", param="logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise bad_request(
                f"logit_bias key {key!r} is not a token id of this model (vocabulary size {vocab_size}).",
                param="logit_bias",
            )
        if not -100.0 <= value <= 100.0:
            raise bad_request(f"logit_bias value for token {key} must be in [-100, 100], got {value}.",
                              param="logit_bias")
        bias[token_id] = float(value)
    return bias


def build_sampling_params(
    req: _SamplingFields,
    *,
    max_tokens: int,
    top_logprobs: int | None,
    vocab_size: int,
    choice_index: int,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """One choice's parameters; choice i of a seeded request uses seed + i."""
    stop_token_ids = list(req.stop_token_ids or [])
    for token_id in stop_token_ids:
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"stop_token_ids entry {token_id} is not a token id of this model.",
                              param="stop_token_ids")
    if req.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens}).",
                          param="min_tokens")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=None if req.seed is None else req.seed + choice_index,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            logit_bias=parse_logit_bias(req.logit_bias, vocab_size),
            stop=req.stop_list(),
            stop_token_ids=stop_token_ids,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            top_logprobs=top_logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except APIError:
        raise
    except ValueError as exc:
        raise bad_request(str(exc)) from None
