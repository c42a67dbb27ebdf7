"""What the app holds between requests: the engine (once loaded) and whether it is ready.

The engine may be handed over ready-made (tests) or built by a factory in a worker thread
after the server starts listening, so that `/health` answers at once and `/ready` turns
200 only when the model is loaded. When the engine starts and stops, and what runs once it
is up, is `server.lifespan`'s business: this holder only starts and stops the engine when told.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from server.http.errors import APIError, model_not_found, not_ready
from server.limits import MAX_TOP_LOGPROBS, Limits

if TYPE_CHECKING:  # types only: holding the engine needs neither torch nor the engine's modules
    from pathlib import Path

    from engine.outputs import RequestDelta
    from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineClient(Protocol):
    """What the server calls on an engine: `engine.async_engine.AsyncEngine`, and the tests'
    `FakeEngine` (tests/server/test_fake_engine.py holds both to these signatures)."""

    model_name: str
    tokenizer: Any  # a transformers tokenizer: chat template, encode, decode, len
    max_model_len: int
    eos_token_ids: set[int]
    config: Any  # read: model, max_num_seqs, max_waiting (and torch_device where there is one)

    @property
    def failure(self) -> str | None: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 adapter: str | None = None, grammar: str | None = None,
                 ) -> AsyncIterator[RequestDelta]: ...

    def abort(self, request_id: str) -> None: ...

    async def engine_state(self) -> dict[str, Any]: ...

    def stats(self) -> dict[str, int]: ...

    def token_str(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def adapter_names(self) -> list[str]: ...

    def has_adapter(self, name: str) -> bool: ...

    def is_registered(self, name: str) -> bool: ...

    async def find_adapter(self, name: str) -> bool: ...

    async def add_adapter(self, name: str, path: Path | str) -> int: ...

    async def register_adapter(self, name: str, source: str) -> dict[str, Any]: ...

    async def adapter_info(self, name: str) -> dict[str, Any]: ...

    async def list_adapters(self) -> list[dict[str, Any]]: ...

    async def promote_adapter(self, name: str) -> dict[str, Any]: ...

    async def demote_adapter(self, name: str) -> dict[str, Any]: ...

    async def delete_adapter(self, name: str) -> dict[str, Any]: ...


EngineFactory = Callable[[], EngineClient]
ReadySteps = Callable[[EngineClient], Awaitable[None]]


class ServerState:
    def __init__(self, engine: EngineClient | None = None, *, engine_factory: EngineFactory | None = None) -> None:
        if (engine is None) == (engine_factory is None):
            raise ValueError("give exactly one of engine and engine_factory")
        self.engine = engine
        self._factory = engine_factory
        self._load_task: asyncio.Task[None] | None = None
        self.ready = False
        self.load_error: str | None = None
        self.created = int(time.time())
        self.structured: Any = None  # server.openai.structured.StructuredOutputs, built on first use
        self.max_logprobs = MAX_TOP_LOGPROBS  # --max-logprobs: most alternatives per token a request gets
        self.tool_call_parser: str | None = None  # --tool-call-parser; None: the chat template decides
        self.limits = Limits()  # what every generation is held to (create_app sets the app's)
        self.metrics: Any = None  # server.http.metrics.Metrics every generation reports to (None: none)

    async def start_engine(self, ready_steps: ReadySteps) -> None:
        """Start the given engine, or begin building one in the background.

        `ready_steps(engine)` is awaited once the engine runs; `/ready` turns 200 after it returns.
        With a given engine that happens before this returns; with a factory, later, and a
        factory that fails leaves `load_error` for `/ready` and the requests to report.
        """
        if self.engine is not None:
            await self.engine.start()
            await self._ready(self.engine, ready_steps)
        else:
            self._load_task = asyncio.create_task(self._load(ready_steps))

    async def _ready(self, engine: Any, ready_steps: ReadySteps) -> None:
        await ready_steps(engine)
        self.ready = True

    async def _load(self, ready_steps: ReadySteps) -> None:
        assert self._factory is not None
        try:
            engine = await asyncio.to_thread(self._factory)
            await engine.start()
        except Exception as exc:
            logger.exception("loading the model failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self.engine = engine
        await self._ready(engine, ready_steps)
        logger.info("model %s ready (adapters: %s)", engine.model_name, ", ".join(engine.adapter_names()) or "none")

    def stop_serving(self) -> None:
        """`/ready` and every request answer 503 from now on; a load under way is given up."""
        self.ready = False
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()

    async def stop_engine(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()

    def require_engine(self) -> Any:
        """The engine, or a 503 while it loads (or after it failed to load)."""
        if not self.ready or self.engine is None:
            if self.load_error is not None:
                raise APIError(503, f"The model failed to load: {self.load_error}", code="model_load_failed")
            raise not_ready()
        return self.engine

    async def discover(self, requested: object) -> None:
        """Register `requested` if it names an adapter copied into the adapter root since it was
        last read (the lookup reads the disk, on a worker thread). Call before `resolve_model`."""
        engine = self.engine
        if engine is None or not isinstance(requested, str) or not requested or requested == engine.model_name:
            return
        if not engine.is_registered(requested):
            await engine.find_adapter(requested)

    async def discover_in(self, body: object) -> None:
        """`discover` for the `model` field of a parsed JSON body, if it has one."""
        await self.discover(body.get("model") if isinstance(body, dict) else None)

    def resolve_model(self, requested: str | None) -> str | None:
        """The adapter a `model` field names, None for the base; 404 for anything else. Reads
        memory only: an adapter new under the root is registered by `discover` first."""
        engine = self.require_engine()
        if not requested or requested == engine.model_name:
            return None
        if engine.is_registered(requested):
            return requested
        raise model_not_found(requested)
