"""Running the n engine requests of one API request and merging their deltas.

Each choice is one `engine.generate` iterator pumped by its own task into a shared queue,
so a slow choice never delays the others. Closing the generation (client gone, error, or
done) aborts every engine request it started and closes their iterators, which frees
their KV blocks.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from engine.logits_processor import LogitsProcessor
from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams

T = TypeVar("T")

_CLOSE_TIMEOUT_S = 5.0


@dataclass
class ChoiceRequest:
    index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    logits_processor: LogitsProcessor | None = None


class ClientDisconnected(Exception):
    """The client went away before the answer was ready."""


class MergedGeneration:
    """`async for index, delta in gen` over all choices; `first_deltas()` surfaces early errors."""

    def __init__(self, engine: Any, choices: list[ChoiceRequest]) -> None:
        self._engine = engine
        self._choices = choices
        self._queue: asyncio.Queue[tuple[int, RequestDelta | BaseException]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: list[tuple[int, RequestDelta]] = []
        self._unfinished = {c.index for c in choices}
        self._closed = False

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump(choice)) for choice in self._choices]

    async def _pump(self, choice: ChoiceRequest) -> None:
        stream: Any = None
        try:
            stream = self._engine.generate(
                choice.request_id, choice.prompt_token_ids, choice.params,
                adapter=choice.adapter, logits_processor=choice.logits_processor,
            )
            if inspect.isawaitable(stream):
                stream = await stream
            async for delta in stream:
                self._queue.put_nowait((choice.index, delta))
                if delta.finished:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._queue.put_nowait((choice.index, exc))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def first_deltas(self) -> None:
        """Wait until every choice produced a delta; re-raise what the engine raised first.

        The engine raises (unknown adapter, overload, too long) before the first delta, so
        after this returns the response status can no longer change.
        """
        seen: set[int] = set()
        while len(seen) < len(self._choices):
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            seen.add(index)
            self._pending.append((index, item))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestDelta]]:
        for index, delta in self._pending:
            if delta.finished:
                self._unfinished.discard(index)
            yield index, delta
        self._pending.clear()
        while self._unfinished:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self._unfinished.discard(index)
            yield index, item

    async def aclose(self) -> None:
        """Abort what is still running and wait (bounded, shielded) for the iterators to close."""
        if self._closed:
            return
        self._closed = True
        for choice in self._choices:
            if choice.index in self._unfinished:
                self._engine.abort(choice.request_id)
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
