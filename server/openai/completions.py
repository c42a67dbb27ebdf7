"""`POST /v1/completions`: the legacy completions route (prompts as text or token ids, `echo`, `n`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.sampling_params import SamplingParams
from server.http.errors import bad_request, parse_json_body
from server.limits import budget
from server.openai import pipeline, protocol
from server.openai.admission import check_choices, check_raw_prompt, prompt_count
from server.openai.chat_template import check_fits_untokenized
from server.openai.generation import ChoiceRequest, ClientDisconnected
from server.openai.params import build_sampling_params, check_completion_request
from server.openai.protocol import ChoiceState, ResponseMeta
from server.openai.schemas import CompletionRequest, PromptInput, validated
from server.openai.streaming import CompletionChunks, sse_response, stream_events
from server.openai.unsupported import check_logprobs_cap, refuse_unsupported_completion
from server.state import ServerState


def _prompts(engine: Any, prompt: PromptInput) -> list[tuple[list[int], str]]:
    """Each prompt as (token ids, text to echo)."""
    vocab_size = len(engine.tokenizer)
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]  # type: ignore[arg-type]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            check_fits_untokenized(engine.tokenizer, item, engine.max_model_len, "prompt")
            ids, text = list(engine.tokenizer.encode(item, add_special_tokens=True)), item
        else:
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise bad_request(f"Prompt token id {bad[0]} is not a token id of this model.", param="prompt")
            ids, text = list(item), engine.tokenizer.decode(item)
        if not ids:
            raise bad_request(f"Prompt {i} is empty.", param="prompt")
        prompts.append((ids, text))
    return prompts


@dataclass
class _CompletionPlan:
    req: CompletionRequest
    adapter: str | None
    model: str
    prompts: list[tuple[list[int], str]]
    choices: list[tuple[list[int], SamplingParams]]  # per choice: prompt ids and parameters


def _plan(state: ServerState, body: dict[str, Any]) -> _CompletionPlan:
    if state.ready and state.engine is not None:
        check_raw_prompt(body.get("prompt"), state.engine.max_model_len)
    refuse_unsupported_completion(body)
    req = validated(CompletionRequest, body)
    check_completion_request(req)
    check_logprobs_cap(req.logprobs, state.max_logprobs, "logprobs")
    check_logprobs_cap(req.prompt_logprobs, state.max_logprobs, "prompt_logprobs")
    engine = state.require_engine()
    adapter = state.resolve_model(req.model)
    scored = req.wanted_prompt_logprobs()  # max_tokens 0 with it: score the prompt, generate nothing
    check_choices(engine, prompt_count(req.prompt), req.n, queued=req.max_tokens != 0 or scored is not None)
    prompts = _prompts(engine, req.prompt)
    choices = []
    if req.max_tokens != 0 or scored is not None:  # else only meaningful with echo: the answer is the prompt
        vocab_size = len(engine.tokenizer)
        for ids, _ in prompts:
            max_tokens = budget(req.max_tokens, len(ids), engine.max_model_len, "prompt")
            choices += [(ids, build_sampling_params(req, max_tokens=max_tokens, top_logprobs=req.logprobs,
                                                    vocab_size=vocab_size, choice_index=i, prompt_logprobs=scored))
                        for i in range(req.n)]
    return _CompletionPlan(req, adapter, req.model or engine.model_name, prompts, choices)


def _body(req: CompletionRequest, meta: ResponseMeta, states: list[ChoiceState]) -> dict[str, Any]:
    choices = []
    for state in states:
        echo = meta.echo_texts[state.index]
        logprobs = None
        if meta.top_logprobs is not None:
            hide = protocol.hides_last_token(state.token_ids, state.finish_reason, meta.terminal_ids[state.index])
            logprobs = protocol.completion_logprobs(state.logprobs, meta.decoder, len(echo), hide)
            if meta.echo_prompt_ids and state.prompt_logprobs is not None:  # the prompt's tokens come first
                prompt_part = protocol.echo_logprobs(meta.echo_prompt_ids[state.index], state.prompt_logprobs,
                                                     meta.decoder)
                logprobs = protocol.joined_logprobs(prompt_part, logprobs)
        choice = protocol.completion_choice(state.index, echo + state.text, logprobs, state.finish_reason)
        if req.prompt_logprobs is not None and state.prompt_logprobs is not None:
            choice["prompt_logprobs"] = protocol.prompt_logprobs(state.prompt_logprobs, meta.decoder)
        choices.append(choice)
    usage = protocol.usage(meta.prompt_tokens, sum(len(s.token_ids) for s in states))
    return protocol.completion_body(meta.completion_id, meta.created, meta.model, choices, usage)


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.quiver
    body = await parse_json_body(request)
    await state.discover_in(body)
    plan = await pipeline.prepared(request, _plan, state, body)
    req, prompts = plan.req, plan.prompts
    engine = state.require_engine()
    completion_id = protocol.new_id("cmpl")
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    echo_texts = [text if req.echo else "" for _, text in prompts for _ in range(req.n)]

    if not plan.choices:
        # max_tokens 0 and no prompt logprobs: only meaningful with echo, the answer is the prompt itself.
        choices = [protocol.completion_choice(i, text, None, "length") for i, text in enumerate(echo_texts)]
        return JSONResponse(protocol.completion_body(completion_id, protocol.now(), plan.model, choices,
                                                     protocol.usage(prompt_tokens, 0)))

    choice_requests = [ChoiceRequest(index, f"{completion_id}-{index}", ids, params, plan.adapter)
                       for index, (ids, params) in enumerate(plan.choices)]
    echo_prompt_ids = [c.prompt_token_ids for c in choice_requests] if req.echo and req.logprobs is not None else []
    meta = pipeline.new_meta(completion_id, plan.model, engine, [c.params for c in choice_requests], prompt_tokens,
                             top_logprobs=req.logprobs, include_usage=req.include_usage(), echo_texts=echo_texts,
                             echo_prompt_ids=echo_prompt_ids)
    try:
        started = await pipeline.run(request, state, choice_requests, meta, req.stream)
    except ClientDisconnected:
        return Response(status_code=pipeline.CLIENT_CLOSED)
    if req.stream:
        return sse_response(stream_events(started.gen, CompletionChunks(meta)))
    states = await pipeline.collect(request, started)
    if states is None:
        return Response(status_code=pipeline.CLIENT_CLOSED)
    return JSONResponse(_body(req, meta, states))
