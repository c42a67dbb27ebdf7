"""Server-sent events for streamed chat and legacy completions.

`EventSourceResponse` races the event generator against a disconnect listener (and a
ping and a shutdown listener) in one task group: whichever finishes first cancels the
rest, so a client that leaves cancels the generator, whose `finally` aborts the engine
requests at once. An error after the stream started is sent as a `data: {"error": ...}`
event followed by `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse

from engine.outputs import RequestDelta
from server import protocol
from server.errors import APIError
from server.generation import MergedGeneration
from server.protocol import ChoiceState, ResponseMeta
from server.tool_parsers import StreamingToolParser
from server.tools import finish_reason

logger = logging.getLogger(__name__)

DONE = {"data": "[DONE]"}


def _event(body: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)}


def failed_delta_error(delta: RequestDelta) -> APIError:
    """The error a delta that ended in "error" or "abort" stands for."""
    if delta.finish_reason == "abort":
        return APIError(503, "The request was aborted by the server.", code="aborted")
    return APIError(500, delta.error or "The engine failed while generating.", type="server_error",
                    code="engine_error")


def _error_event(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, APIError):
        return _event(exc.body())
    logger.exception("error while streaming", exc_info=exc)
    return _event(APIError(500, "Internal server error while streaming.", type="server_error",
                           code="internal_error").body())


def sse_response(events: AsyncIterator[dict[str, str]]) -> EventSourceResponse:
    return EventSourceResponse(events)


async def chat_events(
    gen: MergedGeneration, meta: ResponseMeta, tool_parsers: list[StreamingToolParser] | None = None,
) -> AsyncIterator[dict[str, str]]:
    """tool_parsers: per choice, when the request offered tools: calls leave `content` for `tool_calls`."""
    def chunk(choices: list[dict[str, Any]]) -> dict[str, str]:
        return _event(protocol.chat_chunk(meta.completion_id, meta.created, meta.model, choices,
                                          meta.include_usage))

    states = [ChoiceState(index=i) for i in range(meta.num_choices)]
    want_logprobs = meta.top_logprobs is not None
    try:
        # With tools offered, content starts as null (as OpenAI's): an answer of only calls has no content.
        first_content = "" if tool_parsers is None else None
        for state in states:
            yield chunk([protocol.chat_chunk_choice(state.index, {"role": "assistant", "content": first_content})])
        async for index, delta in gen:
            if delta.finish_reason in ("error", "abort"):
                raise failed_delta_error(delta)
            state = states[index]
            state.token_ids.extend(delta.token_ids)
            text, calls = delta.text, []
            if tool_parsers is not None:
                text, calls = tool_parsers[index].feed(delta.text)
                if delta.finished:
                    rest, more = tool_parsers[index].finish()
                    text, calls = text + rest, calls + more
            if text or (want_logprobs and delta.logprobs):
                logprobs = None
                if want_logprobs:
                    hide = protocol.hides_last_token(delta.token_ids, delta.finish_reason, meta.terminal_ids[index])
                    logprobs = protocol.chat_logprobs(delta.logprobs, meta.decoder, hide)
                yield chunk([protocol.chat_chunk_choice(index, {"content": text}, logprobs)])
            if calls:
                yield chunk([protocol.chat_chunk_choice(index, {"tool_calls": [c.to_dict() for c in calls]})])
            if delta.finished:
                made_calls = tool_parsers is not None and tool_parsers[index].saw_calls
                yield chunk([protocol.chat_chunk_choice(index, {}, None, finish_reason(delta.finish_reason,
                                                                                        made_calls))])
        if meta.include_usage:
            usage = protocol.usage(meta.prompt_tokens, sum(len(s.token_ids) for s in states))
            yield _event(protocol.chat_chunk(meta.completion_id, meta.created, meta.model, [], True, usage))
    except Exception as exc:
        yield _error_event(exc)
    finally:
        await gen.aclose()
    yield DONE


async def completion_events(gen: MergedGeneration, meta: ResponseMeta) -> AsyncIterator[dict[str, str]]:
    def chunk(choices: list[dict[str, Any]]) -> dict[str, str]:
        return _event(protocol.completion_body(meta.completion_id, meta.created, meta.model, choices,
                                               None, include_usage_key=meta.include_usage))

    states = [ChoiceState(index=i) for i in range(meta.num_choices)]
    echo_texts = meta.echo_texts or [""] * meta.num_choices
    offsets = [len(text) for text in echo_texts]
    want_logprobs = meta.top_logprobs is not None
    try:
        for index, echo in enumerate(echo_texts):
            if echo and not meta.echo_prompt_ids:  # with logprobs, each echo waits for its prompt's logprobs
                yield chunk([protocol.completion_choice(index, echo, None, None)])
        async for index, delta in gen:
            if delta.finish_reason in ("error", "abort"):
                raise failed_delta_error(delta)
            state = states[index]
            state.token_ids.extend(delta.token_ids)
            if meta.echo_prompt_ids and delta.prompt_logprobs is not None:
                prompt_part = protocol.echo_logprobs(meta.echo_prompt_ids[index], delta.prompt_logprobs, meta.decoder)
                yield chunk([protocol.completion_choice(index, echo_texts[index], prompt_part, None)])
            if delta.text or (want_logprobs and delta.logprobs):
                logprobs = None
                if want_logprobs:
                    hide = protocol.hides_last_token(delta.token_ids, delta.finish_reason, meta.terminal_ids[index])
                    logprobs = protocol.completion_logprobs(delta.logprobs, meta.decoder, offsets[index], hide)
                    offsets[index] += sum(len(t) for t in logprobs["tokens"])
                yield chunk([protocol.completion_choice(index, delta.text, logprobs, None)])
            if delta.finished:
                yield chunk([protocol.completion_choice(index, "", None, delta.finish_reason)])
        if meta.include_usage:
            usage = protocol.usage(meta.prompt_tokens, sum(len(s.token_ids) for s in states))
            yield _event(protocol.completion_body(meta.completion_id, meta.created, meta.model, [], usage))
    except Exception as exc:
        yield _error_event(exc)
    finally:
        await gen.aclose()
    yield DONE
