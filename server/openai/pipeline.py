"""The generation pipeline every surface shares, between a planned request and its rendering.

A route plans its request (validated body → prompt ids, one `SamplingParams` per choice), then
`run` starts the engine requests and waits until the response status is known; the route only
renders what comes out: a JSON body from `collect`, or SSE chunks from `server.openai.streaming`.
SeekrFlow's chat renders the same run in its SDK's shape (`server.seekrflow.chat`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request

from engine.sampling_params import SamplingParams
from server.http import off_loop
from server.http.errors import APIError, from_engine_error
from server.openai import protocol
from server.openai.generation import (
    MAX_UNREAD_ENTRIES,
    ChoiceRequest,
    ClientDisconnected,
    MergedGeneration,
    unless_disconnected,
)
from server.openai.metered import MeteredEngine
from server.openai.protocol import ChoiceState, ResponseMeta
from server.openai.schemas import ResponseFormat
from server.openai.streaming import failed_delta_error
from server.openai.structured import StructuredOutputs
from server.state import ServerState

T = TypeVar("T")

# Answer to a client that left: nobody reads it, but the log shows what happened.
CLIENT_CLOSED = 499


@dataclass
class Run:
    """A started generation and what its rendering needs."""

    gen: MergedGeneration
    meta: ResponseMeta


async def prepared(request: Request, prepare: Callable[..., T], *args: Any) -> T:
    """`prepare(*args)`, on a worker thread when the body is large (decoding, templating and
    tokenizing megabytes would stall every other request on the event loop)."""
    if off_loop.is_large(await request.body()):  # the body is cached: no second read
        return await off_loop.run_off_loop(prepare, *args)
    return prepare(*args)


def terminal_ids(engine: Any, params: SamplingParams) -> set[int]:
    """Token ids that end a choice without adding text (EOS unless ignored, stop token ids)."""
    ids = set() if params.ignore_eos else set(engine.eos_token_ids)
    return ids | set(params.stop_token_ids)


def structured_outputs(state: ServerState, engine: Any) -> StructuredOutputs:
    """The server's grammar compiler, built on first use (it reads the whole vocabulary)."""
    if state.structured is None:
        state.structured = StructuredOutputs(engine.tokenizer, set(engine.eos_token_ids))
    return state.structured


async def format_grammar(state: ServerState, engine: Any, response_format: ResponseFormat | None) -> str | None:
    """The grammar text a `response_format` asks for (None: free text), checked off the event loop."""
    schema = StructuredOutputs.schema_of(response_format)
    if schema is None:
        return None
    return await asyncio.to_thread(structured_outputs(state, engine).grammar_of, schema)


async def run(request: Request, state: ServerState, choices: Sequence[ChoiceRequest], meta: ResponseMeta,
              stream: bool) -> Run:
    """Start the engine requests and wait until the response status is known (errors become statuses).

    A stream starts at the first delta of any choice: what fails a request (its adapter, the
    queue limit, the prompt) fails it before any choice runs, while its last choices may wait
    for its first ones to finish (more choices than --max-num-seqs) and the client must not.
    The engine is called through `MeteredEngine`: the server's limits first, its metrics around it.
    Raises ClientDisconnected when the client left first.
    """
    engine = MeteredEngine(state.require_engine(), state.limits, state.metrics)
    gen = MergedGeneration(engine, list(choices), max_unread=MAX_UNREAD_ENTRIES if stream else None)
    gen.start()
    try:
        await unless_disconnected(request, gen.first_deltas(every_choice=not stream))
    except BaseException as exc:
        await gen.aclose()
        if isinstance(exc, ClientDisconnected | APIError | asyncio.CancelledError):
            raise
        if isinstance(exc, Exception):
            raise from_engine_error(exc, meta.model) from None
        raise
    return Run(gen, meta)


def new_meta(completion_id: str, model: str, engine: Any, params: Sequence[SamplingParams], prompt_tokens: int,
             **options: Any) -> ResponseMeta:
    """The response's fixed facts; `options` as `ResponseMeta` takes them."""
    return ResponseMeta(completion_id, protocol.now(), model, engine, len(params), prompt_tokens,
                        terminal_ids=[terminal_ids(engine, p) for p in params], **options)


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


async def collect(request: Request, started: Run) -> list[ChoiceState] | None:
    """Every choice whole, or None when the client left first; the generation is closed after."""
    try:
        return await unless_disconnected(request, _collect(started.gen, started.meta.num_choices))
    except ClientDisconnected:
        return None
    finally:
        await started.gen.aclose()
