"""Serving with a graceful shutdown: on SIGTERM (or SIGINT) stop accepting, let in-flight requests
finish for up to `shutdown_timeout` seconds, stop the engine, exit 0.

Two defaults stand in the way, and both are changed here:
- sse-starlette ends every open event stream as soon as uvicorn sees the signal; streamed
  completions would be cut mid-answer. Its automatic drain is turned off, so a stream runs to
  its end (uvicorn still cancels what remains when the timeout expires);
- uvicorn re-raises the signal once it has shut down, so the process would die of SIGTERM
  (status 143) however cleanly it drained. `GracefulServer` keeps the signal handled.

A server that cannot serve at all (its model failed to load) does not linger answering 503:
`fatal` is asked on each of uvicorn's ticks, and once it gives a reason the server shuts down
and the process exits 1 with that reason on stderr, for an orchestrator to restart or report.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from sse_starlette.sse import AppStatus

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STARTUP_FAILURE = 3  # uvicorn's own exit status when it cannot start (port taken, ...)
FATAL_FAILURE = 1  # the server started but cannot serve (`fatal` gave a reason)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, minus the re-raise of the signal that stopped it; it stops by itself once
    `fatal()` returns a reason (kept in `failure`)."""

    def __init__(self, config: uvicorn.Config, fatal: Callable[[], str | None] | None = None) -> None:
        super().__init__(config)
        self.fatal = fatal
        self.failure: str | None = None

    async def on_tick(self, counter: int) -> bool:
        if self.failure is None and self.fatal is not None:
            self.failure = self.fatal()
            if self.failure is not None:
                self.should_exit = True
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(app: Any, *, host: str, port: int, log_level: str = "info", shutdown_timeout: float = 30.0,
          fatal: Callable[[], str | None] | None = None) -> int:
    """Run `app` until a signal stops it; the process exit status (0 after a graceful shutdown).

    fatal: why the server cannot serve, or None while it can; a reason stops it with status 1.
    """
    if shutdown_timeout < 0:
        raise ValueError(f"shutdown_timeout must be >= 0, got {shutdown_timeout}")
    AppStatus.disable_automatic_graceful_drain()
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level.lower(), log_config=None, access_log=False,
        timeout_graceful_shutdown=shutdown_timeout, lifespan="on",
    )
    server = GracefulServer(config, fatal)
    server.run()
    if server.failure is not None:
        print(f"quiver serve: {server.failure}", file=sys.stderr, flush=True)
        return FATAL_FAILURE
    return 0 if server.started else STARTUP_FAILURE
