"""The server's one start-up and shut-down, step by step in the order they happen.

Start, when the app starts (before it answers anything):
  1. the store: opened when the stateful part was built (`server.wiring`), so that a file it
     cannot use stops `quiver serve` before it listens; nothing left to do here;
  2. the fine-tuning jobs: the manager's monitor thread starts; adapters it reports before the
     engine is ready are kept for step 4;
  3. the engine: the given one started, or built by its factory on a worker thread while
     `/health` answers and `/ready` says 503.
Ready, once the engine runs (before `/ready` turns 200):
  4. the adapters fine-tuning jobs left (`ft-<job-id>`, `ft-<job-id>:ckpt-<step>`) registered;
  5. the adapters registered over the admin API in earlier runs registered again, and their
     pins restored: after 4, so that a pinned job adapter is there to pin;
  6. the deployments promoted when the last server stopped pinned again: after 5, whose pins
     they may share;
  7. `gc.freeze()`: what loading allocated stays for good, out of the collector's sight.
Stop, after the HTTP server has drained its requests:
  8. `/ready` and every request answer 503; a load under way is given up;
  9. the jobs: running ones are stopped and queued again. Before the engine: a job that
     finishes now registers its adapter in a running engine, and is not failed for it;
 10. the engine;
 11. the store, last: everything above may still write to it.

A bare app (no store, no jobs: what most tests build) runs steps 3, 7, 8 and 10. A step that
fails is logged; it does not keep the server from starting or stopping (only the engine's own
start and stop are not wrapped: the server cannot run without them).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from server.admin.journal import restore_adapters
from server.state import ServerState

if TYPE_CHECKING:  # a bare app does not import the fine-tuning side at all
    from server.wiring import Stateful

logger = logging.getLogger(__name__)

Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[None]]


def lifespan(state: ServerState, stateful: Stateful | None = None) -> Lifespan:
    """The Starlette lifespan of an app serving `state` (and `stateful`, for `quiver serve`)."""

    @contextlib.asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        await start(state, stateful)
        try:
            yield
        finally:
            await stop(state, stateful)

    return run


async def start(state: ServerState, stateful: Stateful | None) -> None:
    if stateful is not None:
        await _step("start the fine-tuning jobs", stateful.jobs.start)
    await state.start_engine(lambda engine: ready(engine, stateful))


async def ready(engine: Any, stateful: Stateful | None) -> None:
    if stateful is not None:
        await _step("register the fine-tuned adapters", stateful.jobs.engine_ready, engine)
        await _step("restore the journaled adapters", restore_adapters, stateful.store, engine)
        await _step("promote the deployments again", stateful.deployments.restore, engine)
    # A full collection then walks only what requests allocate, instead of stalling the event loop
    # for as long as it takes to walk the whole process (~0.1 s per 400k objects).
    gc.freeze()


async def stop(state: ServerState, stateful: Stateful | None) -> None:
    state.stop_serving()
    if stateful is not None:
        await _step("stop the fine-tuning jobs", stateful.jobs.stop)
    await state.stop_engine()
    if stateful is not None:
        await _step("close the store", stateful.store.close)


async def _step(what: str, work: Callable[..., Any], *args: Any) -> None:
    try:
        done = work(*args)
        if inspect.isawaitable(done):
            await done
    except Exception:
        logger.exception("could not %s", what)
