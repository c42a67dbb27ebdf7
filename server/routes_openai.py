"""The OpenAI routes: chat completions, legacy completions, models."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.sampling_params import SamplingParams
from server import off_loop, protocol
from server.admission import check_choices, check_raw_prompt, prompt_count
from server.chat import apply_chat_template, chat_template_of, check_fits_untokenized
from server.errors import APIError, bad_request, from_engine_error, parse_json_body
from server.generation import (
    MAX_UNREAD_ENTRIES,
    ChoiceRequest,
    ClientDisconnected,
    MergedGeneration,
    unless_disconnected,
)
from server.params import (
    build_sampling_params,
    check_chat_request,
    check_completion_request,
    resolve_max_tokens,
)
from server.protocol import ChoiceState, ResponseMeta
from server.schemas import ChatCompletionRequest, CompletionRequest, PromptInput
from server.state import ServerState
from server.streaming import chat_events, completion_events, failed_delta_error, sse_response
from server.structured import StructuredOutputs
from server.tools import ToolPlan, apply_to_completion, forced_call_processors, parser_for, plan_tools
from server.unsupported import check_logprobs_cap, refuse_unsupported_chat, refuse_unsupported_completion

T = TypeVar("T")

# Answer to a client that left: nobody reads it, but the log shows what happened.
_CLIENT_CLOSED = 499


def _state(request: Request) -> ServerState:
    return request.app.state.quiver


async def _start(request: Request, gen: MergedGeneration, model: str, stream: bool) -> None:
    """Start the engine requests and wait until the response status is known (errors become statuses).

    A stream starts at the first delta of any choice: what fails a request (its adapter, the
    queue limit, the prompt) fails it before any choice runs, while its last choices may wait
    for its first ones to finish (more choices than --max-num-seqs) and the client must not.
    """
    gen.start()
    try:
        await unless_disconnected(request, gen.first_deltas(every_choice=not stream))
    except BaseException as exc:
        await gen.aclose()
        if isinstance(exc, ClientDisconnected | APIError | asyncio.CancelledError):
            raise
        if isinstance(exc, Exception):
            raise from_engine_error(exc, model) from None
        raise


async def _collect(gen: MergedGeneration, num_choices: int) -> list[ChoiceState]:
    states = [ChoiceState(index=i) for i in range(num_choices)]
    async for index, delta in gen:
        if delta.finish_reason in ("error", "abort"):
            raise failed_delta_error(delta)
        state = states[index]
        state.text += delta.text
        state.token_ids.extend(delta.token_ids)
        state.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            state.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            state.finish_reason = delta.finish_reason
    return states


async def _finish_unstreamed(request: Request, gen: MergedGeneration, num_choices: int) -> list[ChoiceState] | None:
    try:
        return await unless_disconnected(request, _collect(gen, num_choices))
    except ClientDisconnected:
        return None
    finally:
        await gen.aclose()


def _terminal_ids(engine: Any, params: SamplingParams) -> set[int]:
    """Token ids that end a choice without adding text (EOS unless ignored, stop token ids)."""
    ids = set() if params.ignore_eos else set(engine.eos_token_ids)
    return ids | set(params.stop_token_ids)


def _structured(state: ServerState, engine: Any) -> StructuredOutputs:
    if state.structured is None:
        state.structured = StructuredOutputs(engine.tokenizer, set(engine.eos_token_ids))
    return state.structured


async def _prepared(request: Request, prepare: Callable[..., T], *args: Any) -> T:
    """`prepare(*args)`, on a worker thread when the body is large (decoding, templating and
    tokenizing megabytes would stall every other request on the event loop)."""
    if off_loop.is_large(await request.body()):  # the body is cached: no second read
        return await off_loop.run_off_loop(prepare, *args)
    return prepare(*args)


@dataclass
class _ChatPlan:
    req: ChatCompletionRequest
    adapter: str | None
    model: str
    prompt_ids: list[int]
    top_logprobs: int | None
    params: list[SamplingParams]
    tools: ToolPlan


def _plan_chat(state: ServerState, body: dict[str, Any]) -> _ChatPlan:
    refuse_unsupported_chat(body)
    req = ChatCompletionRequest.model_validate(body)
    check_chat_request(req)
    check_logprobs_cap(req.top_logprobs, state.max_logprobs, "top_logprobs")
    check_logprobs_cap(req.prompt_logprobs, state.max_logprobs, "prompt_logprobs")
    check_logprobs_cap(req.prompt_logprobs, state.max_logprobs, "prompt_logprobs")
    engine = state.require_engine()
    adapter = state.resolve_model(req.model)
    check_choices(engine, 1, req.n)
    tools = plan_tools(req, parser_for(state.tool_call_parser, chat_template_of(engine.tokenizer)))
    prompt_ids = apply_chat_template(engine.tokenizer, req.messages, engine.max_model_len, tools)
    max_tokens = resolve_max_tokens(req.wanted_max_tokens(), len(prompt_ids), engine.max_model_len, "messages")
    top_logprobs = req.wanted_top_logprobs()
    vocab_size = len(engine.tokenizer)
    params = [build_sampling_params(req, max_tokens=max_tokens, top_logprobs=top_logprobs, vocab_size=vocab_size,
                                    choice_index=i, prompt_logprobs=req.prompt_logprobs if i == 0 else None)
              for i in range(req.n)]  # the choices share the prompt: the first scores it
    return _ChatPlan(req, adapter, req.model or engine.model_name, prompt_ids, top_logprobs, params, tools)


async def chat_completions(request: Request) -> Response:
    state = _state(request)
    plan = await _prepared(request, _plan_chat, state, await parse_json_body(request))
    req, model, prompt_ids, top_logprobs, params = plan.req, plan.model, plan.prompt_ids, plan.top_logprobs, plan.params
    engine = state.require_engine()
    processors: list[Any] = [None] * req.n
    schema = StructuredOutputs.schema_of(req.response_format)
    if schema is not None:
        processors = await asyncio.to_thread(_structured(state, engine).processors, schema, req.n)
    tool_grammar = plan.tools.grammar()
    if tool_grammar is not None:
        processors = await asyncio.to_thread(forced_call_processors, _structured(state, engine), tool_grammar, req.n)

    completion_id = protocol.new_id("chatcmpl")
    gen = MergedGeneration(engine, [
        ChoiceRequest(i, f"{completion_id}-{i}", prompt_ids, params[i], plan.adapter, processors[i])
        for i in range(req.n)
    ], max_unread=MAX_UNREAD_ENTRIES if req.stream else None)
    meta = ResponseMeta(completion_id, protocol.now(), model, engine, req.n, len(prompt_ids),
                        top_logprobs=top_logprobs, include_usage=req.include_usage(),
                        terminal_ids=[_terminal_ids(engine, p) for p in params])
    try:
        await _start(request, gen, model, req.stream)
    except ClientDisconnected:
        return Response(status_code=_CLIENT_CLOSED)
    if req.stream:
        return sse_response(chat_events(gen, meta, plan.tools.stream_parsers(req.n)))
    states = await _finish_unstreamed(request, gen, req.n)
    if states is None:
        return Response(status_code=_CLIENT_CLOSED)
    return JSONResponse(apply_to_completion(protocol.chat_completion(
        meta.completion_id, meta.created, model, states, engine, top_logprobs is not None, len(prompt_ids),
        meta.terminal_ids), plan.tools))


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


def _plan_completion(state: ServerState, body: dict[str, Any]) -> _CompletionPlan:
    if state.ready and state.engine is not None:
        check_raw_prompt(body.get("prompt"), state.engine.max_model_len)
    refuse_unsupported_completion(body)
    req = CompletionRequest.model_validate(body)
    check_completion_request(req)
    check_logprobs_cap(req.logprobs, state.max_logprobs, "logprobs")
    check_logprobs_cap(req.prompt_logprobs, state.max_logprobs, "prompt_logprobs")
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
            max_tokens = resolve_max_tokens(req.max_tokens, len(ids), engine.max_model_len, "prompt")
            choices += [(ids, build_sampling_params(req, max_tokens=max_tokens, top_logprobs=req.logprobs,
                                                    vocab_size=vocab_size, choice_index=i, prompt_logprobs=scored))
                        for i in range(req.n)]
    return _CompletionPlan(req, adapter, req.model or engine.model_name, prompts, choices)


async def completions(request: Request) -> Response:
    state = _state(request)
    plan = await _prepared(request, _plan_completion, state, await parse_json_body(request))
    req, model, prompts = plan.req, plan.model, plan.prompts
    engine = state.require_engine()
    top_logprobs = req.logprobs
    completion_id = protocol.new_id("cmpl")
    created = protocol.now()
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    echo_texts = [text if req.echo else "" for _, text in prompts for _ in range(req.n)]
    num_choices = len(prompts) * req.n

    if not plan.choices:
        # max_tokens 0 and no prompt logprobs: only meaningful with echo, the answer is the prompt itself.
        choices = [protocol.completion_choice(i, echo_texts[i], None, "length") for i in range(num_choices)]
        return JSONResponse(protocol.completion_body(completion_id, created, model, choices,
                                                     protocol.usage(prompt_tokens, 0)))

    choice_requests = [ChoiceRequest(index, f"{completion_id}-{index}", ids, params, plan.adapter)
                       for index, (ids, params) in enumerate(plan.choices)]
    gen = MergedGeneration(engine, choice_requests, max_unread=MAX_UNREAD_ENTRIES if req.stream else None)
    meta = ResponseMeta(completion_id, created, model, engine, num_choices, prompt_tokens,
                        top_logprobs=top_logprobs, include_usage=req.include_usage(), echo_texts=echo_texts,
                        terminal_ids=[_terminal_ids(engine, c.params) for c in choice_requests],
                        echo_prompt_ids=[c.prompt_token_ids for c in choice_requests]
                        if req.echo and top_logprobs is not None else [])
    try:
        await _start(request, gen, model, req.stream)
    except ClientDisconnected:
        return Response(status_code=_CLIENT_CLOSED)
    if req.stream:
        return sse_response(completion_events(gen, meta))
    states = await _finish_unstreamed(request, gen, num_choices)
    if states is None:
        return Response(status_code=_CLIENT_CLOSED)
    choices = []
    for state in states:
        echo = echo_texts[state.index]
        logprobs = None
        if top_logprobs is not None:
            hide = protocol.hides_last_token(state.token_ids, state.finish_reason, meta.terminal_ids[state.index])
            logprobs = protocol.completion_logprobs(state.logprobs, engine, len(echo), hide)
            if meta.echo_prompt_ids and state.prompt_logprobs is not None:  # the prompt's tokens come first
                prompt_part = protocol.echo_logprobs(meta.echo_prompt_ids[state.index], state.prompt_logprobs, engine)
                logprobs = protocol.joined_logprobs(prompt_part, logprobs)
        choice = protocol.completion_choice(state.index, echo + state.text, logprobs, state.finish_reason)
        if req.prompt_logprobs is not None and state.prompt_logprobs is not None:
            choice["prompt_logprobs"] = protocol.prompt_logprobs(state.prompt_logprobs, engine)
        choices.append(choice)
    usage = protocol.usage(prompt_tokens, sum(len(s.token_ids) for s in states))
    return JSONResponse(protocol.completion_body(completion_id, created, model, choices, usage))


async def list_models(request: Request) -> Response:
    state = _state(request)
    engine = state.require_engine()
    base = engine.model_name
    data = [protocol.model_card(base, state.created, base, None)]
    data += [protocol.model_card(name, state.created, base, base) for name in engine.adapter_names()]
    return JSONResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    state = _state(request)
    engine = state.require_engine()
    name = request.path_params["model"]
    base = engine.model_name
    state.resolve_model(name)  # 404 for unknown names
    parent = None if name == base else base
    return JSONResponse(protocol.model_card(name, state.created, base, parent))


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
]
