"""Fine-tuning jobs inside `quiver serve`: what they train becomes a servable adapter.

The job manager reports adapters from its monitor thread (`ft-<job-id>` when a job succeeds,
`ft-<job-id>:ckpt-<step>` per checkpoint, removals when checkpoints rotate out); the engine
lives on the event loop and may still be loading when the first report comes. Reports that
arrive before the engine is ready are kept and registered, together with everything finished
jobs left on disk, once it is; later ones are posted to the loop and waited for, so a job only
succeeds after its adapter can serve.

A finished job with a validation file is evaluated here too (`JobManager`'s `evaluate`): the
server does not know the address it is reached at (a proxy, a port of 0), so the evaluation
runs in-process, the real openai client sending its requests straight into the OpenAI routes
of this app (httpx's ASGI transport) on the server's loop: the same requests, parameters and
scoring as `quiver eval`, with no network and no API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import UnknownAdapterError
from server.state import ServerState
from server.store import Store
from training.evaluate import EvalCase
from training.jobs import JobManager

logger = logging.getLogger(__name__)

# Registering reads the adapter from disk; minutes mean the loop is wedged, not busy.
_REGISTER_TIMEOUT_S = 300.0
_EVAL_TIMEOUT_S = 1800.0
_EVAL_MAX_TOKENS = 512
_IN_PROCESS_URL = "http://quiver.in-process"


class JobBridge:
    """Ties a `JobManager` to the server's lifetime (`server.lifespan` calls `start`, `engine_ready`
    and `stop`) and its adapters to the engine."""

    def __init__(self, state: ServerState, root: Path, *, base_model: str, model_name: str,
                 store: Store | None = None, **manager_options: Any) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: Any = None  # set once the engine is ready
        self._early: dict[str, Path] = {}  # reported before the engine was ready
        self._state = state
        manager_options.setdefault("evaluate", self._evaluate)
        self.manager = JobManager(root, base_model=base_model, model_name=model_name,
                                  on_adapter_ready=self._adapter_ready, on_adapter_removed=self._adapter_removed,
                                  **manager_options)

    # ------------------------------------------------------------------ server lifetime (event loop)
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.manager.start()

    async def engine_ready(self, engine: Any) -> None:
        """Register what finished jobs left and what was reported while the engine loaded."""
        with self._lock:
            self._engine = engine
            early, self._early = self._early, {}
        found = {**await asyncio.to_thread(self.manager.servable_adapters), **early}
        deleted = {r.name for r in await asyncio.to_thread(self._store.adapters) if r.deleted} if self._store else set()
        for name, path in found.items():
            if name in deleted or engine.has_adapter(name):
                continue
            try:
                await engine.add_adapter(name, path)
            except Exception as exc:  # one broken adapter must not keep the others from serving
                logger.warning("could not register fine-tuned adapter %s from %s: %s", name, path, exc)

    async def stop(self) -> None:
        # In a thread: closing waits for the monitor, which may be waiting on this loop.
        await asyncio.to_thread(self.manager.close)

    # ------------------------------------------------------------------ the manager's callbacks (monitor thread)
    def _adapter_ready(self, name: str, path: Path) -> None:
        with self._lock:
            engine = self._engine
            if engine is None:
                self._early[name] = path
                return
        if engine.has_adapter(name):  # registered by engine_ready, which saw the job's record first
            return
        self._wait(engine.add_adapter(name, path))

    def _adapter_removed(self, name: str) -> None:
        with self._lock:
            engine = self._engine
            if engine is None:
                self._early.pop(name, None)
                return
        # Unknown: it never registered (it failed to), or an operator deleted it first.
        with contextlib.suppress(UnknownAdapterError):
            self._wait(engine.delete_adapter(name))

    def _evaluate(self, models: Sequence[str], cases: list[EvalCase]) -> dict[str, Any]:
        """The manager's evaluator (its evaluation thread): scores per model, as `quiver eval` reports them."""
        return self._wait(self._evaluate_in_app(list(models), cases), timeout=_EVAL_TIMEOUT_S)

    async def _evaluate_in_app(self, models: list[str], cases: list[EvalCase]) -> dict[str, Any]:
        import httpx
        from openai import AsyncOpenAI
        from starlette.applications import Starlette

        from server.http.errors import EXCEPTION_HANDLERS
        from server.openai import routes as routes_openai
        from training.eval_cli import Sampling, evaluate_models

        app = Starlette(routes=list(routes_openai.routes), exception_handlers=EXCEPTION_HANDLERS)  # type: ignore[arg-type]
        app.state.quiver = self._state
        # Room for the longest expected answer (tokens rarely hold less than a character each), no more.
        longest = max(len(c.expected or "") for c in cases)
        sampling = Sampling(max_tokens=min(_EVAL_MAX_TOKENS, longest + 16), temperature=0.0, concurrency=8)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=_IN_PROCESS_URL,
                                     timeout=_EVAL_TIMEOUT_S) as http, \
                AsyncOpenAI(base_url=f"{_IN_PROCESS_URL}/v1", api_key="in-process", http_client=http,
                            max_retries=0) as client:
            _, scores = await evaluate_models(client, models, cases, sampling)
        return scores

    def _wait(self, work: Any, timeout: float = _REGISTER_TIMEOUT_S) -> Any:
        assert self._loop is not None  # the engine is only set after start ran on the loop
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)
