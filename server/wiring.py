"""The stateful parts of `quiver serve`: fine-tuning jobs, the SQLite store, deployments and the
`seekrai` routes, built over one store.

Building them starts nothing: `server.lifespan` starts and stops them, in the order it documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.routing import BaseRoute

from server.admin.journal import journaled
from server.finetune.jobs_bridge import JobBridge
from server.finetune.routes import finetune_routes
from server.openai.responses import responses_routes
from server.seekrflow.deployments import Deployments
from server.seekrflow.routes import seekrai_routes
from server.state import ServerState
from server.store import Store

STATE_DB_NAME = "state.sqlite3"


@dataclass(frozen=True)
class Stateful:
    """What `quiver serve` keeps across restarts, and the routes over it (for `create_app`)."""

    store: Store
    jobs: JobBridge
    deployments: Deployments
    routes: list[BaseRoute]


def build_stateful(state: ServerState, admin_routes: Sequence[BaseRoute], *, jobs_dir: Path,
                   base_model: str, model_name: str, state_db: Path | None = None,
                   metrics: Any | None = None, **job_options: Any) -> Stateful:
    """The store, the jobs and the deployments; their routes: the admin routes (journaled), the
    fine-tuning routes, the `seekrai` routes and the Responses API (stored responses).

    base_model:  what jobs fine-tune (the path or hub id the engine loads); model_name: its served name.
    state_db:    the SQLite file (default `jobs_dir/state.sqlite3`).
    metrics:     the app's `server.http.metrics.Metrics`, which then reports jobs by state.
    job_options: passed to `training.jobs.JobManager` (max_concurrent, train_args, env, ...).
    """
    jobs_dir = Path(jobs_dir)
    store = Store(Path(state_db) if state_db is not None else jobs_dir / STATE_DB_NAME)
    bridge = JobBridge(state, jobs_dir, base_model=base_model, model_name=model_name, store=store, **job_options)
    if metrics is not None:
        metrics.job_manager = bridge.manager
    deployments = Deployments(state, store, bridge.manager)
    routes = [*journaled(list(admin_routes), store), *finetune_routes(bridge.manager),
              *seekrai_routes(state, store, bridge.manager, deployments), *responses_routes(store)]
    return Stateful(store, bridge, deployments, routes)


def served_base(model: str | None, served_model_name: str | None) -> tuple[str, str]:
    """(what jobs fine-tune, the name clients use for it) for `quiver serve --model MODEL`.

    Without a model that is the embedded demo, built here on first use: jobs need its path
    before the engine (which uses the same cached bundle) has loaded.
    """
    if model is None:
        from engine.demo import DEMO_MODEL_NAME, ensure_demo_bundle

        return str(ensure_demo_bundle().model_dir), served_model_name or DEMO_MODEL_NAME
    path = Path(model)
    return model, served_model_name or (path.name if path.exists() else model)
