"""Starting a Quiver server on 127.0.0.1 for a load run: a child process, or a thread in this one.

The child process (`python -m server serve ...`) is what the CLIs use: the server gets its own
interpreter, so the driver's event loop does not share a GIL with it and its RSS is its own.
The in-process server (uvicorn in a daemon thread, as the server tests do) starts in a
fraction of the time and lets a test read the engine's state directly; the short test-suite
runs use it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(base_url: str, timeout_s: float, alive: Any = None) -> None:
    """Poll /ready until 200; raise if `alive()` turns False or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError("the server exited before it was ready")
        try:
            if httpx.get(base_url + "/ready", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server at {base_url} was not ready within {timeout_s:.0f} s")


class SubprocessServer:
    """`python -m server serve --host 127.0.0.1 --port P <args>` until `stop()`."""

    def __init__(self, serve_args: Sequence[str], *, port: int | None = None, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                        "--log-level", "warning", *serve_args]
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                               os.environ.get("PYTHONPATH")]))}
        child_env.update(env or {})
        self._proc = subprocess.Popen(self.command, cwd=REPO_ROOT, env=child_env,
                                      stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def start(self, timeout_s: float = 300.0) -> SubprocessServer:
        try:
            wait_ready(self.base_url, timeout_s, alive=lambda: self._proc.poll() is None)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout_s)
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> SubprocessServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InProcessServer:
    """uvicorn serving a ready-made engine on a free port, in a daemon thread."""

    def __init__(self, engine: Any, *, api_key: str | None = None) -> None:
        import uvicorn

        from server.app import create_app
        from server.state import ServerState

        state = ServerState(engine)
        self.app = create_app(state, api_key=api_key, extra_routes=_admin_routes(state))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=3)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def engine(self) -> Any:
        return self.app.state.quiver.engine

    @property
    def pid(self) -> int:
        return os.getpid()

    def start(self, timeout_s: float = 60.0) -> InProcessServer:
        self._thread.start()
        wait_ready(self.base_url, timeout_s, alive=self._thread.is_alive)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(15)
        self._sock.close()

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _admin_routes(state: Any) -> list[Any]:
    """The adapter admin routes, mounted as `quiver serve` mounts them."""
    from server.admin.adapters import adapter_routes

    return list(adapter_routes(state))


def serve_option_supported(flag: str) -> bool:
    """Whether this checkout's `quiver serve` has `flag` (options are still being added)."""
    import argparse

    from server.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            serve = action.choices.get("serve")
            return serve is not None and flag in serve._option_string_actions
    return False
