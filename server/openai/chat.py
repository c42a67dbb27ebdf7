"""`POST /v1/chat/completions`: plan (validate, template, tokenize, budget), run, render.

`plan_chat` and `start_chat` are the chat pipeline every chat surface shares; SeekrFlow's
chat (`server.seekrflow.chat`) only resolves its `model` its own way and renders the answer
in its SDK's shape.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.sampling_params import SamplingParams
from server.http.errors import parse_json_body
from server.limits import budget
from server.openai import pipeline, protocol
from server.openai.admission import check_choices
from server.openai.chat_template import apply_chat_template, chat_template_of
from server.openai.generation import ChoiceRequest, ClientDisconnected
from server.openai.params import build_sampling_params, check_chat_request
from server.openai.schemas import ChatCompletionRequest, validated
from server.openai.streaming import ChatChunks, sse_response, stream_events
from server.openai.tools import ToolPlan, apply_to_completion, forced_call_grammar, parser_for, plan_tools
from server.openai.unsupported import check_logprobs_cap, refuse_unsupported_chat
from server.state import ServerState


@dataclass
class ChatPlan:
    req: ChatCompletionRequest
    adapter: str | None
    model: str
    prompt_ids: list[int]
    top_logprobs: int | None
    params: list[SamplingParams]
    tools: ToolPlan


def check_chat(state: ServerState, req: ChatCompletionRequest) -> None:
    """400 for what a validated request asks that cannot go together or exceeds the server's caps."""
    check_chat_request(req)
    check_logprobs_cap(req.top_logprobs, state.max_logprobs, "top_logprobs")
    check_logprobs_cap(req.prompt_logprobs, state.max_logprobs, "prompt_logprobs")


def plan_chat(state: ServerState, req: ChatCompletionRequest, adapter: str | None) -> ChatPlan:
    """A checked request's prompt and per-choice parameters; 400 for what cannot run."""
    engine = state.require_engine()
    check_choices(engine, 1, req.n)
    tools = plan_tools(req, parser_for(state.tool_call_parser, chat_template_of(engine.tokenizer)))
    prompt_ids = apply_chat_template(engine.tokenizer, req.messages, engine.max_model_len, tools)
    max_tokens = budget(req.wanted_max_tokens(), len(prompt_ids), engine.max_model_len, "messages")
    top_logprobs = req.wanted_top_logprobs()
    vocab_size = len(engine.tokenizer)
    params = [build_sampling_params(req, max_tokens=max_tokens, top_logprobs=top_logprobs, vocab_size=vocab_size,
                                    choice_index=i, prompt_logprobs=req.prompt_logprobs if i == 0 else None)
              for i in range(req.n)]  # the choices share the prompt: the first scores it
    return ChatPlan(req, adapter, req.model or engine.model_name, prompt_ids, top_logprobs, params, tools)


async def start_chat(request: Request, state: ServerState, plan: ChatPlan) -> pipeline.Run:
    """The plan's engine requests, started (structured outputs and forced tool calls set up first)."""
    req = plan.req
    engine = state.require_engine()
    grammar = await pipeline.format_grammar(state, engine, req.response_format)
    tool_grammar = plan.tools.grammar()
    if tool_grammar is not None:
        structured = pipeline.structured_outputs(state, engine)
        grammar = await asyncio.to_thread(forced_call_grammar, structured, tool_grammar)
    completion_id = protocol.new_id("chatcmpl")
    choices = [ChoiceRequest(i, f"{completion_id}-{i}", plan.prompt_ids, plan.params[i], plan.adapter, grammar)
               for i in range(req.n)]
    meta = pipeline.new_meta(completion_id, plan.model, engine, plan.params, len(plan.prompt_ids),
                             top_logprobs=plan.top_logprobs, include_usage=req.include_usage())
    return await pipeline.run(request, state, choices, meta, req.stream)


def _plan(state: ServerState, body: dict[str, Any]) -> ChatPlan:
    refuse_unsupported_chat(body)
    req = validated(ChatCompletionRequest, body)
    check_chat(state, req)
    return plan_chat(state, req, state.resolve_model(req.model))


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.quiver
    body = await parse_json_body(request)
    await state.discover_in(body)
    plan = await pipeline.prepared(request, _plan, state, body)
    try:
        started = await start_chat(request, state, plan)
    except ClientDisconnected:
        return Response(status_code=pipeline.CLIENT_CLOSED)
    meta = started.meta
    if plan.req.stream:
        return sse_response(stream_events(started.gen, ChatChunks(meta, plan.tools.stream_parsers(plan.req.n))))
    states = await pipeline.collect(request, started)
    if states is None:
        return Response(status_code=pipeline.CLIENT_CLOSED)
    return JSONResponse(apply_to_completion(protocol.chat_completion(
        meta.completion_id, meta.created, meta.model, states, meta.decoder, plan.top_logprobs is not None,
        meta.prompt_tokens, meta.terminal_ids), plan.tools))
