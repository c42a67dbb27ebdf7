"""The server starts and stops in the order server/lifespan.py documents: jobs, then the engine;
once it runs, job adapters, the journal, deployments, and only then ready; on the way down jobs
before the engine and the store last. A step that fails is logged and the others still run."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from starlette.testclient import TestClient

from server.app import create_app
from server.state import ServerState
from server.wiring import Stateful
from tests.eventually import eventually
from tests.server.fake_engine import FakeEngine


class _Recorder:
    """The stateful parts, each noting in one shared log when the lifespan calls it."""

    def __init__(self, state: ServerState, log: list[str], failing: str | None = None) -> None:
        self._state, self._log, self._failing = state, log, failing

    def _note(self, step: str) -> None:
        self._log.append(f"{step} (ready={self._state.ready})")
        if step == self._failing:
            raise RuntimeError(f"{step} broke")

    # jobs
    async def start(self) -> None:
        self._note("jobs start")

    async def engine_ready(self, engine: Any) -> None:
        self._note("jobs engine_ready")

    async def stop(self) -> None:
        self._note("jobs stop")

    # deployments
    async def restore(self, engine: Any) -> None:
        self._note("deployments restore")

    # store: the journal reads its adapters
    def adapters(self) -> list[Any]:
        self._note("journal restore")
        return []

    def close(self) -> None:
        self._note("store close")


class _RecordingEngine(FakeEngine):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self._log = log

    async def start(self) -> None:
        self._log.append("engine start")

    async def shutdown(self) -> None:
        self._log.append("engine shutdown")


def _app(state: ServerState, log: list[str], failing: str | None = None) -> TestClient:
    parts: Any = _Recorder(state, log, failing)
    return TestClient(create_app(state, stateful=Stateful(store=parts, jobs=parts, deployments=parts, routes=[])))


def test_start_ready_and_stop_run_in_the_documented_order() -> None:
    log: list[str] = []
    state = ServerState(_RecordingEngine(log))
    with _app(state, log) as http:
        assert http.get("/ready").status_code == 200
        started = list(log)
    assert started == ["jobs start (ready=False)", "engine start", "jobs engine_ready (ready=False)",
                       "journal restore (ready=False)", "deployments restore (ready=False)"]
    assert log[len(started):] == ["jobs stop (ready=False)", "engine shutdown", "store close (ready=False)"]


@pytest.mark.parametrize("failing", ["jobs start", "jobs engine_ready", "journal restore", "deployments restore",
                                     "jobs stop"])
def test_a_failing_step_is_logged_and_the_others_still_run(failing: str, caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    state = ServerState(_RecordingEngine(log))
    with caplog.at_level(logging.ERROR, logger="server.lifespan"), _app(state, log, failing) as http:
        assert http.get("/ready").status_code == 200
    assert len(log) == 8 and "engine shutdown" in log and log[-1].startswith("store close")
    assert [r.exc_info[1].args[0] for r in caplog.records if r.exc_info] == [f"{failing} broke"]


def test_a_loading_engine_answers_health_at_once_and_ready_only_after_the_ready_steps() -> None:
    log: list[str] = []
    release = threading.Event()

    def build() -> FakeEngine:
        release.wait(30)
        log.append("engine built")
        return _RecordingEngine(log)

    state = ServerState(engine_factory=build)
    with _app(state, log) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 503 and log == ["jobs start (ready=False)"]
        release.set()
        eventually(lambda: http.get("/ready").status_code == 200, 10, "/ready after the load")
        assert log[1:] == ["engine built", "engine start", "jobs engine_ready (ready=False)",
                           "journal restore (ready=False)", "deployments restore (ready=False)"]
    assert log[-3:] == ["jobs stop (ready=False)", "engine shutdown", "store close (ready=False)"]


def test_a_load_that_fails_leaves_the_reason_for_ready_and_skips_the_ready_steps() -> None:
    log: list[str] = []

    def build() -> FakeEngine:
        raise OSError("no such model: /models/missing")

    state = ServerState(engine_factory=build)
    with _app(state, log) as http:
        response = eventually(lambda: (r := http.get("/ready")).json()["error"]["code"] == "model_load_failed" and r,
                              10, "the load failure reported")
        assert response.status_code == 503 and "no such model" in response.json()["error"]["message"]
    assert log == ["jobs start (ready=False)", "jobs stop (ready=False)", "store close (ready=False)"]
