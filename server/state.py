"""What the app holds between requests: the engine (once loaded) and when it became ready.

The engine may be handed over ready-made (tests) or built by a factory in a worker thread
after the server starts listening, so that `/health` answers at once and `/ready` turns
200 only when the model is loaded.
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
StartupHook = Callable[[], Awaitable[None]]
ReadyHook = Callable[[Any], Awaitable[None]]


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
        self._startup_hooks: list[StartupHook] = []
        self._ready_hooks: list[ReadyHook] = []
        self._shutdown_hooks: list[StartupHook] = []

    def add_hooks(self, *, startup: StartupHook | None = None, ready: ReadyHook | None = None,
                  shutdown: StartupHook | None = None) -> None:
        """Work other parts of the server tie to its lifetime (fine-tuning jobs, restored state).

        startup:  awaited when the app starts, before the engine loads.
        ready:    awaited with the started engine, before `/ready` turns 200 (restore adapters here).
        shutdown: awaited, newest first, before the engine shuts down.
        A failing hook is logged; it does not keep the server from starting or stopping.
        """
        if startup is not None:
            self._startup_hooks.append(startup)
        if ready is not None:
            self._ready_hooks.append(ready)
        if shutdown is not None:
            self._shutdown_hooks.append(shutdown)

    async def startup(self) -> None:
        """Start the given engine, or begin loading one in the background."""
        for hook in self._startup_hooks:
            await _run_hook(hook)
        if self.engine is not None:
            await self.engine.start()
            await self._engine_ready(self.engine)
        else:
            self._load_task = asyncio.create_task(self._load())

    async def _engine_ready(self, engine: Any) -> None:
        for hook in self._ready_hooks:
            await _run_hook(hook, engine)
        self.ready = True

    async def _load(self) -> None:
        assert self._factory is not None
        try:
            engine = await asyncio.to_thread(self._factory)
            await engine.start()
        except Exception as exc:
            logger.exception("loading the model failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self.engine = engine
        await self._engine_ready(engine)
        logger.info("model %s ready (adapters: %s)", engine.model_name, ", ".join(engine.adapter_names()) or "none")

    async def shutdown(self) -> None:
        self.ready = False
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        for hook in reversed(self._shutdown_hooks):
            await _run_hook(hook)
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


async def _run_hook(hook: Callable[..., Awaitable[None]], *args: Any) -> None:
    try:
        await hook(*args)
    except Exception:
        logger.exception("server lifetime hook %s failed", getattr(hook, "__qualname__", hook))
