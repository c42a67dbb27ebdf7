"""The async bridge: the step loop runs on its own thread, callers await token deltas.

Every mutation of the engine core happens on the engine thread; callers post commands
to an inbox and get results through futures. Deltas reach each request's asyncio queue
with one `call_soon_threadsafe` per step. Adapter weights are read by a small loader pool;
a request for an adapter not yet in host memory waits for that load before it is queued,
without holding up anyone else.

Adapter identity is resolved here, on the event loop: a request takes a reference on its
adapter's name (adapters/registry.py) and hands the engine thread only that reference, whose
residency the core keeps (engine/adapter_manager.py). Nothing on the event loop reads the disk
for a request: a name not registered yet is looked for under the adapter root on a worker thread.
This side is what the API-server process keeps once the engine core runs in a process of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from adapters.config import AdapterConfig
from adapters.registry import AdapterEntry, AdapterRef
from adapters.sources import (
    AdapterSource,
    scan_root,
    source_from_operator,
    source_from_request,
    validate_name,
)
from engine import adapter_names
from engine.adapter_manager import AdapterLease
from engine.config import EngineConfig
from engine.errors import EngineDeadError, EngineOverloadedError, UnknownAdapterError
from engine.llm_engine import LLMEngine
from engine.logits_processor import LogitsProcessor
from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams
from engine.state_view import engine_state
from engine.token_text import TokenText
from engine.tp_driver import WorkerDiedError

log = logging.getLogger(__name__)

_Command = tuple[Callable[[LLMEngine], Any], concurrent.futures.Future | None]


class AsyncEngine:
    """Owns an `LLMEngine` and the thread that steps it."""

    def __init__(
        self,
        config: EngineConfig,
        adapters: Mapping[str, Path | str] | None = None,
        served_model_name: str | None = None,
        adapter_config: AdapterConfig | None = None,
    ) -> None:
        if served_model_name and not config.served_model_name:
            config = dataclasses.replace(config, served_model_name=served_model_name)
        self.config = config
        self._core = LLMEngine(config, adapters, adapter_config)
        self.adapter_config = self._core.adapter_config
        self._loader = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.adapter_config.load_workers, thread_name_prefix="quiver-adapter-load"
        )
        self._core.adapters.use_executor(
            submit=self._loader.submit, post=lambda fn: self._post(lambda core: fn(), None)
        )
        self._adapters = self._core.identity  # names and refcounts: used from the event loop
        self._adapters.on_retired = lambda adapter_id: self._post(lambda core: core.adapters.forget(adapter_id), None)
        self.model_name = served_model_name or _default_name(config.model)
        self.tokenizer = self._core.tokenizer
        self.max_model_len = self._core.max_model_len
        self.eos_token_ids = set(self._core.eos_token_ids)
        self._token_text = TokenText(self.tokenizer)
        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue[RequestDelta]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._stats: dict[str, int] = self._core.stats()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="quiver-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, 30)
            self._thread = None
        self._loader.shutdown(wait=False, cancel_futures=True)
        if thread is None or not thread.is_alive():  # nothing will apply a load result any more
            self._core.adapters.abandon(EngineDeadError("the engine was shut down"))
        await asyncio.to_thread(self._core.close)  # tensor-parallel workers, if any

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def failure(self) -> str | None:
        """Why the engine thread stopped, if it died (None while healthy or not started)."""
        if self._dead is not None:
            return f"{type(self._dead).__name__}: {self._dead}"
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return "the engine thread exited"
        return None

    # ----------------------------------------------------------------- adapters
    def adapter_names(self) -> list[str]:
        return self._adapters.servable_names()

    def has_adapter(self, name: str) -> bool:
        """Whether `name` is registered (memory only) or else found under the adapter root, which
        reads the disk: for a name that is not registered, callers on the event loop should prefer
        `find_adapter`."""
        return self._adapters.has(name) or self._adapters.find(name) is not None

    def is_registered(self, name: str) -> bool:
        """Whether `name` is registered: memory only, never the disk."""
        return self._adapters.has(name)

    async def find_adapter(self, name: str) -> bool:
        """`has_adapter` without reading the disk on the event loop: a name not registered is looked
        for under the adapter root on a worker thread (and registered when found there)."""
        return self._adapters.has(name) or await asyncio.to_thread(self._adapters.discover, name) is not None

    async def add_adapter(self, name: str, path: Path | str) -> int:
        """Register an operator-named directory or hub id and load it; AdapterFailedError if invalid."""
        source = await asyncio.to_thread(source_from_operator, path)
        return (await self._registered(name, source)).adapter_id

    async def register_adapter(self, name: str, source: str) -> dict[str, Any]:
        """Register a client-given source (`hf://org/repo[@rev]` or a directory under the adapter
        root) and load it to host memory; AdapterFailedError if invalid (it stays listed as failed)."""
        validate_name(name)
        parsed = await asyncio.to_thread(source_from_request, source, self.adapter_config.adapter_root)
        entry = await self._registered(name, parsed)
        return await self._info(entry)

    async def _registered(self, name: str, source: AdapterSource) -> AdapterEntry:
        entry = self._adapters.register(name, source)
        done = await self.call(lambda core: core.adapters.load(entry.ref))
        await asyncio.wrap_future(done)
        return entry

    async def list_adapters(self) -> list[dict[str, Any]]:
        """Every registered adapter's info; directories added to the adapter root since are picked up."""
        self._adapters.add_discovered(await asyncio.to_thread(scan_root, self.adapter_config.adapter_root))
        entries = sorted(self._adapters.live(), key=lambda e: e.name)
        return await self.call(lambda core: core.adapter_infos(entries))

    async def adapter_info(self, name: str) -> dict[str, Any]:
        return await self._info(await self._named(name))

    async def promote_adapter(self, name: str) -> dict[str, Any]:
        """Load to a GPU slot and pin; waits for the slot. PinLimitError when no slot may be pinned."""
        entry = await self._named(name, serving=True)
        done = await self.call(lambda core: core.adapters.promote(entry.ref))
        await asyncio.wrap_future(done)
        return await self._info(entry)

    async def demote_adapter(self, name: str) -> dict[str, Any]:
        entry = await self._named(name)
        await self.call(lambda core: core.adapters.demote(entry.adapter_id))
        return await self._info(entry)

    async def delete_adapter(self, name: str) -> dict[str, Any]:
        """Unregister now; in-flight requests finish first. Returns how many were in flight."""
        await self._named(name)  # registers a root adapter first, so that it is not rediscovered
        entry = self._adapters.unname(name)
        if entry is None:
            raise UnknownAdapterError(name)
        in_flight = entry.refcount
        await self.call(lambda core: core.adapters.unpin(entry.adapter_id, UnknownAdapterError(name)))
        return {"id": name, "object": "adapter", "deleted": True, "in_flight": in_flight}

    async def _named(self, name: str, serving: bool = False) -> AdapterEntry:
        """The live adapter `name`; one under the adapter root is registered first (off the loop)."""
        if not self._adapters.has(name):
            await asyncio.to_thread(self._adapters.discover, name)
        return adapter_names.named(self._adapters, name, serving=serving)

    async def _acquire(self, name: str) -> AdapterRef:
        if not self._adapters.has(name):
            await asyncio.to_thread(self._adapters.discover, name)
        return adapter_names.acquire(self._adapters, name)

    async def _info(self, entry: AdapterEntry) -> dict[str, Any]:
        return (await self.call(lambda core: core.adapter_infos([entry])))[0]

    # ---------------------------------------------------------------- requests
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        grammar: str | None = None,
    ) -> AsyncIterator[RequestDelta]:
        """Yield deltas until the one with a finish_reason; closing early aborts the request.

        `grammar`: llguidance grammar text constraining the output (engine/grammar.py), given as
        data and compiled here on a worker thread."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped: {self._dead}")
        if len(self._streams) >= self.config.max_waiting + self.config.max_num_seqs:
            raise EngineOverloadedError(
                f"the server is at capacity ({len(self._streams)} requests in flight); retry later"
            )
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue[RequestDelta] = asyncio.Queue()
        self._streams[request_id] = stream
        finished = False
        ref: AdapterRef | None = None
        lease: AdapterLease | None = None
        logits_processor: LogitsProcessor | None = None
        try:
            if grammar is not None:
                logits_processor = await asyncio.to_thread(self._core.grammars.processor, grammar)
            if adapter:
                ref = await self._acquire(adapter)
                lease = AdapterLease(ref)
                await self.call(lambda core: core.adapters.hold(lease))
                await asyncio.wrap_future(lease.ready)  # the host load, off the engine thread
            await self.call(
                lambda core: core.add_request(
                    request_id, prompt_token_ids, params, adapter, logits_processor, lease=lease
                )
            )
            while True:
                delta = await stream.get()
                if delta.finished:
                    finished = True
                    if ref is not None:  # the core is done with it: its count drops before the last delta
                        self._adapters.release(ref)
                        ref = None
                yield delta
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if lease is not None:  # a no-op once the request took the hold over
                self._post(lambda core: core.adapters.release(lease), None)
            if not finished:
                self.abort(request_id)
            if ref is not None:  # after the abort: a deleted adapter's residency goes after its request
                self._adapters.release(ref)

    def abort(self, request_id: str) -> None:
        """Thread-safe and idempotent; frees the request's KV blocks at the next step boundary."""
        self._post(lambda core: core.abort(request_id), None)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(core)` on the engine thread and return its result (or raise its error)."""
        if self._thread is None:
            raise EngineDeadError("the engine is not started")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._post(fn, future)
        return await asyncio.wrap_future(future)

    async def engine_state(self) -> dict[str, Any]:
        """Plain data on the scheduler queues, adapters, slots and device memory (engine/state_view.py),
        read on the engine thread between two steps."""
        return await self.call(engine_state)

    def stats(self) -> dict[str, int]:
        """A snapshot taken after the last step (no lock on the hot path)."""
        return dict(self._stats, num_streams=len(self._streams))

    def adapter_refcounts(self) -> dict[str, int]:
        return self._adapters.refcounts()

    def adapter_counters(self) -> dict[str, int]:
        """Registry totals (loads, evictions, residency) as of the last step."""
        return {k: v for k, v in self._stats.items() if k.startswith("adapter")}

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_text.token_bytes(token_id)

    def token_str(self, token_id: int) -> str:
        return self._token_text.token_str(token_id)

    # ------------------------------------------------------------ engine thread
    def _post(self, fn: Callable[[LLMEngine], Any], future: concurrent.futures.Future | None) -> None:
        self._inbox.put((fn, future))
        self._wake.set()

    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException as exc:  # noqa: BLE001 - record why, so health and callers can say it
            log.exception("the engine thread stopped")
            self._dead = exc
            raise

    def _loop_forever(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self._core.has_unfinished():
                self._stats = self._core.stats()
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                deltas = self._core.step()
            except WorkerDiedError as exc:
                # A lost tensor-parallel rank cannot be recovered in-process: fail what is in
                # flight, then stop so /health reports it and the orchestrator restarts us.
                self._deliver(self._fail_all(exc))
                raise
            except Exception as exc:  # noqa: BLE001 - any failure must reach the callers
                log.exception("engine step failed; failing the in-flight requests")
                deltas = self._fail_all(exc)
            self._stats = self._core.stats()
            if deltas:
                self._deliver(deltas)
        self._drain_inbox()

    def _drain_inbox(self) -> None:
        while True:
            try:
                fn, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if future is not None and not future.set_running_or_notify_cancel():
                # The caller was cancelled (client gone) before the command ran: skip it, as an
                # executor would; setting a result on the cancelled future would raise here.
                continue
            try:
                result = fn(self._core)
            except Exception as exc:  # noqa: BLE001 - returned to the caller
                if future is not None:
                    future.set_exception(exc)
                else:
                    log.exception("engine command failed")
            else:
                if future is not None:
                    future.set_result(result)

    def _fail_all(self, exc: Exception) -> list[RequestDelta]:
        failed = []
        for request_id in list(self._core.request_ids()):
            self._core.abort(request_id)
            failed.append(RequestDelta(request_id=request_id, finish_reason="error", error=str(exc)))
        return failed

    def _deliver(self, deltas: list[RequestDelta]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            loop.call_soon_threadsafe(self._dispatch, deltas)

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.put_nowait(delta)


def _default_name(model: str) -> str:
    path = Path(model)
    return path.name if path.exists() else model
