"""The servers the server tests talk to.

`fake` / `fake_app`: the app in-process (no socket, no uvicorn) over `FakeEngine`, a fast engine
that generates without weights: what shape, error and limit tests use. Each test gets its own.

`live` / `start_server`: uvicorn on 127.0.0.1 (free port, background thread) over the real engine
on one tiny model and eight tiny adapters per session, for the end-to-end tests (each module starts
its own server and reuses it for all its tests).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from openai import OpenAI
from starlette.testclient import TestClient

from engine.config import EngineConfig
from server.app import create_app
from server.state import ServerState
from tests.eventually import eventually
from tests.server.fake_engine import FakeEngine

NUM_ADAPTERS = 8
ADAPTER_NAMES = [f"lora-{i}" for i in range(NUM_ADAPTERS)]
MODEL_NAME = "tiny-base"


class LiveServer:
    """uvicorn serving `app` on a free port in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=3)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> LiveServer:
        self._thread.start()
        eventually(lambda: self._server.started or not self._thread.is_alive(), timeout, "the test server started")
        if not self._server.started:
            raise RuntimeError("the test server did not start: its thread ended")
        return self

    def until_ready(self, timeout: float = 60.0) -> LiveServer:
        """This server once /ready answers 200 (its engine built in the background); fails at once if the
        engine failed to load."""

        def ready() -> bool:
            assert self.state.load_error is None, self.state.load_error
            with self.http() as http:
                return http.get("/ready").status_code == 200

        eventually(ready, timeout, "/ready answers 200", interval=0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(15)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError("the test server did not stop")

    @property
    def state(self) -> ServerState:
        return self.app.state.quiver

    @property
    def engine(self) -> Any:
        return self.state.engine

    def client(self, **kwargs: Any) -> OpenAI:
        return OpenAI(base_url=f"{self.base_url}/v1", api_key="x", max_retries=0, **kwargs)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30.0)


@pytest.fixture(scope="session")
def server_model_dir(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def server_adapters(server_model_dir: Path, tiny_adapter_factory: Callable[..., Path]) -> dict[str, Path]:
    """Eight adapters with different weights (and two ranks, two target sets)."""
    adapters = {}
    for i, name in enumerate(ADAPTER_NAMES):
        targets = ("q_proj", "v_proj") if i % 2 == 0 else ("q_proj", "k_proj", "v_proj", "o_proj")
        adapters[name] = tiny_adapter_factory(server_model_dir, seed=100 + i, rank=4 if i % 3 else 8,
                                              target_modules=targets, weight_scale=1.5)
    return adapters


def engine_config(model_dir: Path, **overrides: Any) -> EngineConfig:
    values: dict[str, Any] = dict(model=str(model_dir), device="cpu", dtype="float32", max_model_len=256,
                                  max_num_seqs=32, max_loras=4, max_lora_rank=8)
    values.update(overrides)
    return EngineConfig(**values)


@pytest.fixture(scope="module")
def start_server(
    server_model_dir: Path, server_adapters: dict[str, Path]
) -> Iterator[Callable[..., LiveServer]]:
    """Start a server on the session's model and adapters; stopped when the module ends."""
    from engine.async_engine import AsyncEngine

    started: list[LiveServer] = []

    def start(adapters: dict[str, Path] | None = None, api_key: str | None = None, **overrides: Any) -> LiveServer:
        engine = AsyncEngine(engine_config(server_model_dir, **overrides),
                             adapters=server_adapters if adapters is None else adapters,
                             served_model_name=MODEL_NAME)
        live = LiveServer(create_app(ServerState(engine), api_key=api_key)).start()
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


@pytest.fixture(scope="module")
def fuzz_live(server_model_dir: Path, server_adapters: dict[str, Path],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Every route `quiver serve` mounts, on a short context (see `tests.server.fuzzing`)."""
    from tests.server.fuzzing import start_fuzz_server

    live = start_fuzz_server(server_model_dir, server_adapters, tmp_path_factory)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def known(fuzz_live: LiveServer) -> Any:
    from tests.server.fuzzing import create_known

    return create_known(fuzz_live)


@pytest.fixture(scope="module")
def operations(fuzz_live: LiveServer) -> dict[str, Any]:
    from tests.server.fuzzing import load_operations

    return load_operations(fuzz_live)


@pytest.fixture(scope="module")
def live(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> OpenAI:
    return live.client()



IN_PROCESS_URL = "http://quiver.test"


class InProcessApp:
    """`create_app` over a `FakeEngine` (or one a factory builds in the background), called in-process
    through Starlette's TestClient; the app's lifespan runs: started when made, stopped by `close`."""

    def __init__(self, engine: FakeEngine | None = None, *, engine_factory: Callable[[], FakeEngine] | None = None,
                 routes: Callable[[ServerState], list[Any]] | None = None, **app_options: Any) -> None:
        """routes: what to mount besides the OpenAI routes, made from the app's state (`adapter_routes`)."""
        state = ServerState(engine_factory=engine_factory) if engine_factory else ServerState(engine)
        if routes is not None:
            app_options["extra_routes"] = routes(state)
        self.app = create_app(state, **app_options)
        self._http = TestClient(self.app, base_url=IN_PROCESS_URL)
        self._http.__enter__()

    def close(self) -> None:
        self._http.__exit__(None, None, None)

    @property
    def state(self) -> ServerState:
        return self.app.state.quiver

    @property
    def engine(self) -> Any:
        return self.state.engine

    def http(self) -> contextlib.AbstractContextManager[httpx.Client]:
        """The app's HTTP client (stays open: `with fake.http() as http` reads as for a live server)."""
        return contextlib.nullcontext(self._http)

    def client(self, api_key: str = "x", **kwargs: Any) -> OpenAI:
        return OpenAI(base_url=f"{IN_PROCESS_URL}/v1", api_key=api_key, max_retries=0, http_client=self._http,
                      **kwargs)


def fake_engine(**options: Any) -> FakeEngine:
    """A fake engine serving the tiny base and the eight adapters (by name: it loads nothing)."""
    return FakeEngine({name: f"/adapters/{name}" for name in ADAPTER_NAMES}, **options)


@pytest.fixture
def fake_app() -> Iterator[Callable[..., InProcessApp]]:
    """Make in-process apps: `fake_app(engine=None, engine_factory=None, routes=None, **create_app_options)`
    (neither engine: a `fake_engine()`); closed when the test ends."""
    made: list[InProcessApp] = []

    def make(engine: FakeEngine | None = None, engine_factory: Callable[[], FakeEngine] | None = None,
             **app_options: Any) -> InProcessApp:
        if engine_factory is None:
            engine = engine or fake_engine()
        made.append(InProcessApp(engine, engine_factory=engine_factory, **app_options))
        return made[-1]

    yield make
    for app in made:
        app.close()


@pytest.fixture
def fake(fake_app: Callable[..., InProcessApp]) -> InProcessApp:
    """The app with default options over a fresh fake engine."""
    return fake_app()
