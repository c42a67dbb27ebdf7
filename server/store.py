"""What the server must remember across restarts, in one SQLite file.

Projects, deployments, stored Responses API responses, the link from each fine-tuning job to its project (with the settings
the client sent), and the adapters registered at run time (with their pins, and tombstones for
deleted ones) so the next start registers the same set again. The engine's registry and the job
manager stay the sources of truth while the server runs; this is their durable journal.

One connection shared by every thread behind a lock: each call is one short transaction,
and WAL keeps readers from blocking the writer.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fine_tunes (
    job_id TEXT PRIMARY KEY,
    project_id INTEGER REFERENCES projects(id),
    settings TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    model_type TEXT NOT NULL,
    model_id TEXT NOT NULL,
    adapter TEXT,
    n_instances INTEGER NOT NULL,
    active INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_deployed_at REAL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY,
    source TEXT,
    pinned INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    input_items TEXT NOT NULL,
    conversation TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


class StoreError(RuntimeError):
    """The state file cannot be used (written by a newer Quiver, or not a database)."""


@dataclass(frozen=True)
class Project:
    id: int
    name: str
    description: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class FineTuneLink:
    job_id: str
    project_id: int | None
    settings: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class Deployment:
    id: str
    name: str
    description: str
    model_type: str
    model_id: str
    adapter: str | None  # the served adapter; None deploys the base model
    n_instances: int
    active: bool  # what the operator asked for: promoted (True) or demoted
    error: str | None  # why the last promotion failed
    created_at: float
    updated_at: float
    last_deployed_at: float | None
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    source: str | None  # None: not registered at run time, only its pin or deletion is remembered
    pinned: bool
    deleted: bool


@dataclass(frozen=True)
class StoredResponse:
    id: str
    body: dict[str, Any]  # the response object as the client got it
    input_items: list[dict[str, Any]]  # what its request's `input` held
    conversation: list[dict[str, Any]]  # every input item it answered (earlier turns included)


class Store:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer Quiver (schema {version}, this one "
                                 f"knows {SCHEMA_VERSION}); upgrade, or point the server at another file")
            with self._db:
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot use {self.path} as the server's state database: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock, self._db:
            return self._db.execute(sql, args)

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ projects
    def create_project(self, name: str, description: str) -> Project:
        now = time.time()
        cursor = self._write("INSERT INTO projects (name, description, created_at, updated_at) VALUES (?, ?, ?, ?)",
                             (name, description, now, now))
        return Project(int(cursor.lastrowid or 0), name, description, now, now)

    def project(self, project_id: int) -> Project | None:
        rows = self._read("SELECT * FROM projects WHERE id = ?", (project_id,))
        return Project(**dict(rows[0])) if rows else None

    def projects(self, skip: int = 0, limit: int = 100) -> list[Project]:
        rows = self._read("SELECT * FROM projects ORDER BY id LIMIT ? OFFSET ?", (limit, skip))
        return [Project(**dict(row)) for row in rows]

    # ------------------------------------------------------------------ fine-tunes
    def link_fine_tune(self, job_id: str, project_id: int | None, settings: dict[str, Any]) -> None:
        now = time.time()
        with self._lock, self._db:
            self._db.execute("INSERT INTO fine_tunes (job_id, project_id, settings, created_at) VALUES (?, ?, ?, ?)",
                             (job_id, project_id, json.dumps(settings, sort_keys=True), now))
            if project_id is not None:
                self._db.execute("UPDATE projects SET updated_at = ? WHERE id = ?", (now, project_id))

    def fine_tune_links(self) -> dict[str, FineTuneLink]:
        rows = self._read("SELECT * FROM fine_tunes")
        return {row["job_id"]: FineTuneLink(row["job_id"], row["project_id"], json.loads(row["settings"]),
                                            row["created_at"]) for row in rows}

    # ------------------------------------------------------------------ deployments
    def create_deployment(self, *, name: str, description: str, model_type: str, model_id: str,
                          adapter: str | None, n_instances: int) -> Deployment:
        now = time.time()
        deployment_id = f"dep-{secrets.token_hex(8)}"
        self._write("INSERT INTO deployments (id, name, description, model_type, model_id, adapter, n_instances, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (deployment_id, name, description, model_type, model_id, adapter, n_instances, now, now))
        found = self.deployment(deployment_id)
        assert found is not None  # just inserted under the same connection
        return found

    def deployment(self, deployment_id: str) -> Deployment | None:
        rows = self._read("SELECT * FROM deployments WHERE id = ?", (deployment_id,))
        return _deployment(rows[0]) if rows else None

    def deployments(self, skip: int = 0, limit: int = 100) -> list[Deployment]:
        rows = self._read("SELECT * FROM deployments ORDER BY created_at, id LIMIT ? OFFSET ?", (limit, skip))
        return [_deployment(row) for row in rows]

    def set_deployment_state(self, deployment_id: str, *, active: bool, error: str | None = None,
                             deployed: bool = False) -> None:
        """Record what the operator asked for (and why it failed); `deployed` stamps last_deployed_at."""
        now = time.time()
        self._write("UPDATE deployments SET active = ?, error = ?, updated_at = ?, "
                    "last_deployed_at = CASE WHEN ? THEN ? ELSE last_deployed_at END WHERE id = ?",
                    (int(active), error, now, int(deployed), now, deployment_id))

    def count_tokens(self, deployment_id: str, input_tokens: int, output_tokens: int) -> None:
        self._write("UPDATE deployments SET input_tokens = input_tokens + ?, output_tokens = output_tokens + ? "
                    "WHERE id = ?", (input_tokens, output_tokens, deployment_id))

    # ------------------------------------------------------------------ adapters
    def remember_adapter(self, name: str, source: str) -> None:
        """An adapter registered at run time; registering a name again clears its tombstone and pin."""
        self._write("INSERT INTO adapters (name, source, pinned, deleted, updated_at) VALUES (?, ?, 0, 0, ?) "
                    "ON CONFLICT(name) DO UPDATE SET source = excluded.source, pinned = 0, deleted = 0, "
                    "updated_at = excluded.updated_at", (name, source, time.time()))

    def forget_adapter(self, name: str) -> None:
        """Deleted: it is not registered again, even where another source (a job) still offers it."""
        self._write("INSERT INTO adapters (name, source, pinned, deleted, updated_at) VALUES (?, NULL, 0, 1, ?) "
                    "ON CONFLICT(name) DO UPDATE SET source = NULL, pinned = 0, deleted = 1, "
                    "updated_at = excluded.updated_at", (name, time.time()))

    def set_pinned(self, name: str, pinned: bool) -> None:
        self._write("INSERT INTO adapters (name, source, pinned, deleted, updated_at) VALUES (?, NULL, ?, 0, ?) "
                    "ON CONFLICT(name) DO UPDATE SET pinned = excluded.pinned, deleted = 0, "
                    "updated_at = excluded.updated_at", (name, int(pinned), time.time()))

    def adapters(self) -> list[AdapterRecord]:
        rows = self._read("SELECT name, source, pinned, deleted FROM adapters ORDER BY updated_at, name")
        return [AdapterRecord(row["name"], row["source"], bool(row["pinned"]), bool(row["deleted"])) for row in rows]

    # ------------------------------------------------------------------ responses (the Responses API)
    def save_response(self, response_id: str, body: dict[str, Any], input_items: list[dict[str, Any]],
                      conversation: list[dict[str, Any]]) -> None:
        """A response with the input items it was given and the whole conversation it answered."""
        self._write("INSERT OR REPLACE INTO responses (id, body, input_items, conversation, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (response_id, json.dumps(body), json.dumps(input_items), json.dumps(conversation), time.time()))

    def response(self, response_id: str) -> StoredResponse | None:
        rows = self._read("SELECT * FROM responses WHERE id = ?", (response_id,))
        if not rows:
            return None
        row = rows[0]
        return StoredResponse(row["id"], json.loads(row["body"]), json.loads(row["input_items"]),
                              json.loads(row["conversation"]))

    def delete_response(self, response_id: str) -> bool:
        return self._write("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0


def _deployment(row: sqlite3.Row) -> Deployment:
    data = dict(row)
    data["active"] = bool(data["active"])
    return Deployment(**data)
