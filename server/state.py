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
from collections.abc import Awaitable, Callable
from typing import Any

from server.http.errors import APIError, model_not_found, not_ready
from server.limits import MAX_TOP_LOGPROBS, Limits

logger = logging.getLogger(__name__)

EngineFactory = Callable[[], Any]
ReadySteps = Callable[[Any], Awaitable[None]]


class ServerState:
    def __init__(self, engine: Any | None = None, *, engine_factory: EngineFactory | None = None) -> None:
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

    def resolve_model(self, requested: str | None) -> str | None:
        """The adapter a `model` field names, None for the base; 404 for anything else."""
        engine = self.require_engine()
        if not requested or requested == engine.model_name:
            return None
        if engine.has_adapter(requested):
            return requested
        raise model_not_found(requested)
