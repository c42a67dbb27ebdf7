"""The SQLite store: what it keeps survives closing and reopening, concurrent writers do not collide, a
file it cannot use is refused with the reason; and the admin API's adapter changes, journaled through it,
come back on the next server."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from server.admin.adapters import adapter_routes
from server.app import create_app
from server.state import ServerState
from server.store import SCHEMA_VERSION, Store, StoreError
from server.wiring import build_stateful
from tests.server.fake_engine import FakeEngine


def test_projects_links_and_deployments_survive_a_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite3")
    first = store.create_project("archery", "answers about bows")
    second = store.create_project("sailing", "answers about ships")
    store.link_fine_tune("ftjob-1", first.id, {"infrastructure_config": {"accel_type": "H100", "n_accel": 1}})
    deployment = store.create_deployment(name="bows v1", description="first run", model_type="Fine-tuned Run",
                                         model_id="ftjob-1", adapter="ft-ftjob-1", n_instances=1)
    assert not deployment.active and deployment.last_deployed_at is None
    store.set_deployment_state(deployment.id, active=True, deployed=True)
    store.count_tokens(deployment.id, 12, 30)
    store.count_tokens(deployment.id, 3, 4)
    store.close()

    again = Store(tmp_path / "state.sqlite3")
    assert [p.name for p in again.projects()] == ["archery", "sailing"]
    assert again.project(second.id) == second and again.project(999) is None
    assert again.projects(skip=1, limit=5) == [second]
    link = again.fine_tune_links()["ftjob-1"]
    assert link.project_id == first.id and link.settings["infrastructure_config"]["accel_type"] == "H100"
    assert again.project(first.id).updated_at >= link.created_at  # type: ignore[union-attr]  # a run touches it
    kept = again.deployment(deployment.id)
    assert kept is not None and kept.active and kept.error is None and kept.last_deployed_at is not None
    assert (kept.input_tokens, kept.output_tokens) == (15, 34)
    again.set_deployment_state(deployment.id, active=True, error="the adapter is gone")
    assert again.deployments()[0].error == "the adapter is gone"
    again.close()


def test_a_run_cannot_link_to_a_missing_project(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite3")
    with pytest.raises(sqlite3.IntegrityError):
        store.link_fine_tune("ftjob-x", 42, {})
    assert store.fine_tune_links() == {}


def test_the_adapter_journal_keeps_sources_pins_and_deletions(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite3")
    store.remember_adapter("a", "/adapters/a")
    store.remember_adapter("b", "hf://org/b@v1")
    store.set_pinned("a", True)
    store.set_pinned("demo", True)  # not registered at run time: only its pin is remembered
    store.forget_adapter("b")
    store.forget_adapter("ft-ftjob-1")  # a job's adapter: the tombstone keeps it from coming back
    rows = {r.name: (r.source, r.pinned, r.deleted) for r in store.adapters()}
    assert rows == {"a": ("/adapters/a", True, False), "b": (None, False, True), "demo": (None, True, False),
                    "ft-ftjob-1": (None, False, True)}
    store.remember_adapter("b", "/adapters/b2")  # registered again: alive, unpinned, new source
    assert {r.name: (r.source, r.pinned, r.deleted) for r in store.adapters()}["b"] == ("/adapters/b2", False, False)


def test_threads_write_at_once_without_losing_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite3")
    ids: list[int] = []

    def write(worker: int) -> None:
        for i in range(25):
            ids.append(store.create_project(f"project {worker}-{i}", "written concurrently").id)
            store.remember_adapter(f"w{worker}-{i}", "/x")

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 100 and len(store.projects(limit=1000)) == 100 and len(store.adapters()) == 100


def test_a_file_it_cannot_use_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database, it is just some text " * 100)
    with pytest.raises(StoreError, match="cannot use"):
        Store(junk)
    newer = tmp_path / "newer.sqlite3"
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer Quiver"):
        Store(newer)


def _app(engine: FakeEngine, db: Path) -> TestClient:
    """The app `quiver serve` builds, over the store at `db` (opened here, closed when the app stops)."""
    state = ServerState(engine)
    stateful = build_stateful(state, adapter_routes(state), jobs_dir=db.parent / "jobs", state_db=db,
                              base_model="/models/tiny", model_name=engine.model_name)
    return TestClient(create_app(state, stateful=stateful))


def test_admin_changes_come_back_on_the_next_server(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    first = FakeEngine({"cli-adapter": "/from/the/command/line"}, slots=4)
    with _app(first, db) as http:
        for name in ("kept", "pinned", "dropped"):
            assert http.post("/v1/adapters", json={"name": name, "source": f"hf://org/{name}"}).status_code == 201
        assert http.post("/v1/adapters", json={"name": "kept", "source": "hf://org/other"}).status_code == 409
        assert http.post("/v1/adapters/pinned/promote").status_code == 200
        assert http.post("/v1/adapters/cli-adapter/promote").status_code == 200
        assert http.post("/v1/adapters/cli-adapter/demote").status_code == 200
        assert http.delete("/v1/adapters/dropped").status_code == 200
        assert http.post("/v1/adapters/nope/promote").status_code == 404  # refused: nothing recorded

    second = FakeEngine({"cli-adapter": "/from/the/command/line"}, slots=4)
    with _app(second, db) as http:
        assert http.get("/ready").status_code == 200
        assert set(second.infos) == {"cli-adapter", "kept", "pinned"}
        assert second.infos["kept"]["source"] == "hf://org/kept"
        assert second.pinned() == {"pinned"}
    assert "nope" not in {r.name for r in Store(db).adapters()}
