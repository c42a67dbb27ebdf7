"""Server-sent events for streamed chat and legacy completions.

`EventSourceResponse` races the event generator against a disconnect listener (and a
ping and a shutdown listener) in one task group: whichever finishes first cancels the
rest, so a client that leaves cancels the generator, whose `finally` aborts the engine
requests at once. An error after the stream started is sent as a `data: {"error": ...}`
event followed by `data: [DONE]`.

`stream_events` is the one loop over a generation's deltas; what a chunk looks like is a
`ChunkRenderer`'s business: chat chunks, legacy completion chunks (here), or SeekrFlow's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import anyio
from sse_starlette import EventSourceResponse

from engine.outputs import RequestDelta
from server.http.errors import APIError
from server.openai import protocol
from server.openai.generation import MergedGeneration
from server.openai.protocol import ResponseMeta
from server.openai.tool_parsers import StreamingToolParser
from server.openai.tools import finish_reason

logger = logging.getLogger(__name__)

DONE = {"data": "[DONE]"}


def event(body: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)}


def failed_delta_error(delta: RequestDelta) -> APIError:
    """The error a delta that ended in "error" or "abort" stands for."""
    if delta.finish_reason == "abort":
        return APIError(503, "The request was aborted by the server.", code="aborted")
    return APIError(500, delta.error or "The engine failed while generating.", type="server_error",
                    code="engine_error")


def error_event(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, APIError):
        return event(exc.body())
    logger.exception("error while streaming", exc_info=exc)
    return event(APIError(500, "Internal server error while streaming.", type="server_error",
                           code="internal_error").body())


def sse_response(events: AsyncIterator[dict[str, str]]) -> EventSourceResponse:
    return EventSourceResponse(events)


class ChunkRenderer(Protocol):
    """The chunk bodies of one stream, from its start, each delta, and its usage."""

    def opening(self) -> list[dict[str, Any]]: ...

    def delta(self, index: int, delta: RequestDelta, completion_tokens: int) -> list[dict[str, Any]]:
        """completion_tokens: generated so far by every choice, this delta included."""
        ...

    def usage(self, usage: dict[str, int]) -> dict[str, Any] | None:
        """The closing usage chunk, None for none."""
        ...


async def stream_events(gen: MergedGeneration, render: ChunkRenderer,
                        on_done: Callable[[int], Awaitable[None]] | None = None) -> AsyncIterator[dict[str, str]]:
    """The SSE events of `gen` as `render` shapes them; `on_done(completion_tokens)` is awaited when the
    stream ends however it ends (a client that left still used the tokens)."""
    generated = 0
    try:
        for body in render.opening():
            yield event(body)
        async for index, delta in gen:
            if delta.finish_reason in ("error", "abort"):
                raise failed_delta_error(delta)
            generated += len(delta.token_ids)
            for body in render.delta(index, delta, generated):
                yield event(body)
        closing = render.usage({"completion_tokens": generated})
        if closing is not None:
            yield event(closing)
    except Exception as exc:
        yield error_event(exc)
    finally:
        await gen.aclose()
        if on_done is not None:
            with anyio.CancelScope(shield=True):
                await on_done(generated)
    yield DONE


class ChatChunks:
    """Chat completion chunks; tool_parsers (per choice, when the request offered tools) turn calls
    into `tool_calls` deltas instead of `content`."""

    def __init__(self, meta: ResponseMeta, tool_parsers: list[StreamingToolParser] | None = None) -> None:
        self.meta = meta
        self.tool_parsers = tool_parsers

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        meta = self.meta
        return protocol.chat_chunk(meta.completion_id, meta.created, meta.model, choices, meta.include_usage)

    def opening(self) -> list[dict[str, Any]]:
        # With tools offered, content starts as null (as OpenAI's): an answer of only calls has no content.
        first_content = "" if self.tool_parsers is None else None
        return [self._chunk([protocol.chat_chunk_choice(i, {"role": "assistant", "content": first_content})])
                for i in range(self.meta.num_choices)]

    def delta(self, index: int, delta: RequestDelta, completion_tokens: int) -> list[dict[str, Any]]:
        meta, parsers = self.meta, self.tool_parsers
        chunks = []
        text, calls = delta.text, []
        if parsers is not None:
            text, calls = parsers[index].feed(delta.text)
            if delta.finished:
                rest, more = parsers[index].finish()
                text, calls = text + rest, calls + more
        want_logprobs = meta.top_logprobs is not None
        if text or (want_logprobs and delta.logprobs):
            logprobs = None
            if want_logprobs:
                hide = protocol.hides_last_token(delta.token_ids, delta.finish_reason, meta.terminal_ids[index])
                logprobs = protocol.chat_logprobs(delta.logprobs, meta.decoder, hide)
            chunks.append(self._chunk([protocol.chat_chunk_choice(index, {"content": text}, logprobs)]))
        if calls:
            chunks.append(self._chunk([protocol.chat_chunk_choice(index, {"tool_calls": [c.to_dict() for c in calls]})]))
        if delta.finished:
            made_calls = parsers is not None and parsers[index].saw_calls
            reason = finish_reason(delta.finish_reason, made_calls)
            chunks.append(self._chunk([protocol.chat_chunk_choice(index, {}, None, reason)]))
        return chunks

    def usage(self, usage: dict[str, int]) -> dict[str, Any] | None:
        meta = self.meta
        if not meta.include_usage:
            return None
        return protocol.chat_chunk(meta.completion_id, meta.created, meta.model, [], True,
                                   protocol.usage(meta.prompt_tokens, usage["completion_tokens"]))


class CompletionChunks:
    """Legacy completion chunks: echoed prompts first (with their logprobs once they come), then text."""

    def __init__(self, meta: ResponseMeta) -> None:
        self.meta = meta
        self.echo_texts = meta.echo_texts or [""] * meta.num_choices
        self.offsets = [len(text) for text in self.echo_texts]

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        meta = self.meta
        return protocol.completion_body(meta.completion_id, meta.created, meta.model, choices, None,
                                        include_usage_key=meta.include_usage)

    def opening(self) -> list[dict[str, Any]]:
        # With logprobs, each echo waits for its prompt's logprobs.
        return [self._chunk([protocol.completion_choice(index, echo, None, None)])
                for index, echo in enumerate(self.echo_texts) if echo and not self.meta.echo_prompt_ids]

    def delta(self, index: int, delta: RequestDelta, completion_tokens: int) -> list[dict[str, Any]]:
        meta = self.meta
        chunks = []
        if meta.echo_prompt_ids and delta.prompt_logprobs is not None:
            prompt_part = protocol.echo_logprobs(meta.echo_prompt_ids[index], delta.prompt_logprobs, meta.decoder)
            chunks.append(self._chunk([protocol.completion_choice(index, self.echo_texts[index], prompt_part, None)]))
        want_logprobs = meta.top_logprobs is not None
        if delta.text or (want_logprobs and delta.logprobs):
            logprobs = None
            if want_logprobs:
                hide = protocol.hides_last_token(delta.token_ids, delta.finish_reason, meta.terminal_ids[index])
                logprobs = protocol.completion_logprobs(delta.logprobs, meta.decoder, self.offsets[index], hide)
                self.offsets[index] += sum(len(t) for t in logprobs["tokens"])
            chunks.append(self._chunk([protocol.completion_choice(index, delta.text, logprobs, None)]))
        if delta.finished:
            chunks.append(self._chunk([protocol.completion_choice(index, "", None, delta.finish_reason)]))
        return chunks

    def usage(self, usage: dict[str, int]) -> dict[str, Any] | None:
        meta = self.meta
        if not meta.include_usage:
            return None
        return protocol.completion_body(meta.completion_id, meta.created, meta.model, [],
                                        protocol.usage(meta.prompt_tokens, usage["completion_tokens"]))
