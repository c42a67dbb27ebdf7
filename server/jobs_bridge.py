"""Fine-tuning jobs inside `quiver serve`: what they train becomes a servable adapter.

The job manager reports adapters from its monitor thread (`ft-<job-id>` when a job succeeds,
`ft-<job-id>:ckpt-<step>` per checkpoint, removals when checkpoints rotate out); the engine
lives on the event loop and may still be loading when the first report comes. Reports that
arrive before the engine is ready are kept and registered, together with everything finished
jobs left on disk, once it is; later ones are posted to the loop and waited for, so a job only
succeeds after its adapter can serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

from engine.errors import UnknownAdapterError
from server.state import ServerState
from server.store import Store
from training.jobs import JobManager

logger = logging.getLogger(__name__)

# Registering reads the adapter from disk; minutes mean the loop is wedged, not busy.
_REGISTER_TIMEOUT_S = 300.0


class JobBridge:
    """Ties a `JobManager` to the server's lifetime and its adapters to the engine."""

    def __init__(self, state: ServerState, root: Path, *, base_model: str, model_name: str,
                 store: Store | None = None, **manager_options: Any) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: Any = None  # set once the engine is ready
        self._early: dict[str, Path] = {}  # reported before the engine was ready
        self.manager = JobManager(root, base_model=base_model, model_name=model_name,
                                  on_adapter_ready=self._adapter_ready, on_adapter_removed=self._adapter_removed,
                                  **manager_options)
        state.add_hooks(startup=self._start, ready=self._engine_ready, shutdown=self._stop)

    # ------------------------------------------------------------------ server lifetime (event loop)
    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.manager.start()

    async def _engine_ready(self, engine: Any) -> None:
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

    async def _stop(self) -> None:
        # In a thread: closing waits for the monitor, which may be waiting on this loop.
        await asyncio.to_thread(self.manager.close)

    # ------------------------------------------------------------------ the manager's callbacks (monitor thread)
    def _adapter_ready(self, name: str, path: Path) -> None:
        with self._lock:
            engine = self._engine
            if engine is None:
                self._early[name] = path
                return
        if engine.has_adapter(name):  # registered by the ready hook, which saw the job's record first
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

    def _wait(self, work: Any) -> Any:
        assert self._loop is not None  # the engine is only set after _start ran on the loop
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(_REGISTER_TIMEOUT_S)
