"""Running the n engine requests of one API request and merging their deltas.

Each choice is one `engine.generate` iterator pumped by its own task, so a slow choice never
delays the others, and the engine's per-request queues never hold more than a step's output.
What the reader has not taken yet is kept as one merged delta per choice: a reader that falls
behind (a slow SSE client) gets fewer, larger deltas, never a longer queue. A stream is given a
cap (`MAX_UNREAD_ENTRIES` tokens and logprob alternatives unread); past it the generation fails:
its engine requests are aborted at once and the reader gets the error when it comes back. An
unstreamed answer is held whole anyway, so it has no cap. Closing the
generation (client gone, error, or done) aborts every engine request it started and closes
their iterators, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams
from server.http.errors import APIError

T = TypeVar("T")

_CLOSE_TIMEOUT_S = 5.0
# Tokens plus top-logprob alternatives one generation may hold for a reader that has not taken
# them: tens of MB at most (a token with 20 alternatives is ~2.5 KB of Python objects), and
# tens of seconds of all a fast GPU produces for n=128 before a stalled client is cut off.
MAX_UNREAD_ENTRIES = 2**18


@dataclass
class ChoiceRequest:
    index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    grammar: str | None = None  # llguidance grammar text (response_format, forced tool calls)


class ClientDisconnected(Exception):
    """The client went away before the answer was ready."""


def _entries(delta: RequestDelta) -> int:
    return len(delta.token_ids) + sum(len(entry.top) for entry in delta.logprobs)


def _merge(into: RequestDelta, delta: RequestDelta) -> None:
    into.token_ids.extend(delta.token_ids)
    into.text += delta.text
    into.logprobs.extend(delta.logprobs)
    into.finish_reason, into.error = delta.finish_reason, delta.error
    into.num_output_tokens = delta.num_output_tokens


class MergedGeneration:
    """`async for index, delta in gen` over all choices; `first_deltas()` surfaces early errors."""

    def __init__(self, engine: Any, choices: list[ChoiceRequest], max_unread: int | None = None) -> None:
        self._engine = engine
        self._choices = choices
        self._max_unread = max_unread
        self._tasks: list[asyncio.Task[None]] = []
        self._unread: dict[int, RequestDelta] = {}  # per choice, merged; in the order they became unread
        self.unread_entries = 0
        self._failure: BaseException | None = None
        self._wakeup = asyncio.Event()
        self._started: set[int] = set()
        self._unfinished = {c.index for c in choices}
        self._closed = False

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump(choice)) for choice in self._choices]

    async def _pump(self, choice: ChoiceRequest) -> None:
        stream: Any = None
        try:
            stream = self._engine.generate(
                choice.request_id, choice.prompt_token_ids, choice.params,
                adapter=choice.adapter, grammar=choice.grammar,
            )
            if inspect.isawaitable(stream):
                stream = await stream
            async for delta in stream:
                self._offer(choice.index, delta)
                if delta.finished or self._failure is not None:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(exc)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _offer(self, index: int, delta: RequestDelta) -> None:
        if self._failure is not None:
            return
        self._started.add(index)
        unread = self._unread.get(index)
        if unread is None:  # a copy: merging into it must not touch what the engine handed over
            self._unread[index] = dataclasses.replace(delta, token_ids=list(delta.token_ids),
                                                      logprobs=list(delta.logprobs))
        else:
            _merge(unread, delta)
        self.unread_entries += _entries(delta)
        if self._max_unread is not None and self.unread_entries > self._max_unread:
            self._fail(APIError(
                400, f"The client read the stream too slowly: more than {self._max_unread} tokens and logprobs "
                "were waiting to be sent, so the request was stopped.", code="stream_backlog_exceeded"))
        self._wakeup.set()

    def _fail(self, exc: BaseException) -> None:
        """Keep the first failure for the reader; end what runs now (the reader may be long in coming)."""
        if self._failure is not None:
            return
        self._failure = exc
        self._unread.clear()
        self.unread_entries = 0
        self._abort_unfinished()
        current = asyncio.current_task()
        for task in self._tasks:  # a choice still queued in the engine gets no delta to wake its pump
            if task is not current:
                task.cancel()
        self._wakeup.set()

    def _abort_unfinished(self) -> None:
        for choice in self._choices:
            if choice.index in self._unfinished:
                self._engine.abort(choice.request_id)
        self._unfinished.clear()

    async def _wait(self) -> None:
        while not self._unread and self._failure is None:
            self._wakeup.clear()
            await self._wakeup.wait()

    async def first_deltas(self, every_choice: bool = True) -> None:
        """Wait until every choice (or, every_choice=False, any one) produced a delta; re-raise
        what the engine raised first.

        The engine raises (unknown adapter, overload, too long) before the first delta, so
        after this returns the response status can no longer change.
        """
        wanted = len(self._choices) if every_choice else min(1, len(self._choices))
        while len(self._started) < wanted and self._failure is None:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._failure is not None:
            raise self._failure

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestDelta]]:
        while self._unfinished or self._unread or self._failure is not None:
            await self._wait()
            if self._failure is not None:
                raise self._failure
            index = next(iter(self._unread))
            delta = self._unread.pop(index)
            self.unread_entries -= _entries(delta)
            if delta.finished:
                self._unfinished.discard(index)
            yield index, delta

    async def aclose(self) -> None:
        """Abort what is still running and wait (bounded, shielded) for the iterators to close."""
        if self._closed:
            return
        self._closed = True
        self._abort_unfinished()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            with anyio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> MergedGeneration:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client closes the connection (the body must have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising ClientDisconnected if the client leaves first.

    What `work` raises is re-raised as is (not wrapped in an exception group).
    """
    outcome: list[T] = []
    failure: list[Exception] = []

    async def run_work(scope: anyio.CancelScope) -> None:
        try:
            outcome.append(await work)
        except Exception as exc:
            failure.append(exc)
        scope.cancel()

    async def watch(scope: anyio.CancelScope) -> None:
        await wait_for_disconnect(request)
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(run_work, group.cancel_scope)
        group.start_soon(watch, group.cancel_scope)
    if failure:
        raise failure[0]
    if not outcome:
        raise ClientDisconnected()
    return outcome[0]
