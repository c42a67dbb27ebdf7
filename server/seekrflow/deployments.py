"""Deployments: a name for serving one model, promoted to serve and demoted when done.

A deployment is a view over the adapter registry, not a second copy of it: promoting pins its
adapter in a GPU slot (loading it first), demoting unpins it, and the status is read off the
registry each time it is asked for. What the operator asked for (promoted or not) is stored,
so the next server promotes the same deployments again once its engine is ready.

Status: Active (promoted and pinned, or the base model), Pending (a promotion under way),
Inactive (demoted, or its pin was taken away over the admin API), Failed (the adapter failed
to load or was deleted; `error` says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from adapters.registry import PinLimitError
from engine.errors import AdapterFailedError, UnknownAdapterError
from server.http.errors import APIError, bad_request
from server.state import ServerState
from server.store import Deployment, Store
from training.errors import NotFoundError
from training.jobs import JobManager

logger = logging.getLogger(__name__)

FINE_TUNED_RUN = "Fine-tuned Run"
BASE_MODEL = "Base Model"
MODEL_TYPES = (FINE_TUNED_RUN, BASE_MODEL)


@dataclass(frozen=True)
class DeploymentView:
    deployment: Deployment
    status: str
    error: str | None
    size_bytes: int | None


class Deployments:
    def __init__(self, state: ServerState, store: Store, jobs: JobManager) -> None:
        self._state, self._store, self._jobs = state, store, jobs
        self._pending: set[str] = set()  # deployments whose promotion is under way
        self._lock = asyncio.Lock()  # promote and demote one at a time: they share pins

    # ------------------------------------------------------------------ API
    async def create(self, *, name: str, description: str, model_type: str, model_id: str,
                     n_instances: int) -> DeploymentView:
        adapter = await self._adapter_for(model_type, model_id)
        deployment = await asyncio.to_thread(self._store.create_deployment, name=name, description=description,
                                             model_type=model_type, model_id=model_id, adapter=adapter,
                                             n_instances=n_instances)
        return await self.view(deployment)

    async def get(self, deployment_id: str) -> Deployment:
        deployment = await asyncio.to_thread(self._store.deployment, deployment_id)
        if deployment is None:
            raise APIError(404, f"No such deployment: {deployment_id!r}.", param="deployment_id",
                           code="deployment_not_found")
        return deployment

    async def list(self, skip: int, limit: int) -> list[DeploymentView]:
        engine = self._state.require_engine()
        infos = {info["id"]: info for info in await engine.list_adapters()}
        deployments = await asyncio.to_thread(self._store.deployments, skip, limit)
        return [self._view(d, infos.get(d.adapter) if d.adapter else None) for d in deployments]

    async def view(self, deployment: Deployment) -> DeploymentView:
        info = None
        if deployment.adapter is not None:
            try:
                info = await self._state.require_engine().adapter_info(deployment.adapter)
            except UnknownAdapterError:
                info = None
        return self._view(deployment, info)

    async def promote(self, deployment_id: str) -> DeploymentView:
        engine = self._state.require_engine()
        async with self._lock:
            deployment = await self.get(deployment_id)
            if deployment.adapter is None:  # the base model is always loaded
                await asyncio.to_thread(self._store.set_deployment_state, deployment.id, active=True, deployed=True)
                return await self.view(await self.get(deployment_id))
            self._pending.add(deployment.id)
            try:
                error = await self._pin(engine, deployment)
            finally:
                self._pending.discard(deployment.id)
            await asyncio.to_thread(self._store.set_deployment_state, deployment.id, active=True, error=error,
                                    deployed=error is None)
        return await self.view(await self.get(deployment_id))

    async def demote(self, deployment_id: str) -> DeploymentView:
        engine = self._state.require_engine()
        async with self._lock:
            deployment = await self.get(deployment_id)
            await asyncio.to_thread(self._store.set_deployment_state, deployment.id, active=False)
            others = [d for d in await asyncio.to_thread(self._store.deployments, 0, 1 << 30)
                      if d.active and d.adapter == deployment.adapter and d.id != deployment.id]
            if deployment.adapter is not None and not others:  # another deployment still wants it pinned
                with contextlib.suppress(UnknownAdapterError):
                    await engine.demote_adapter(deployment.adapter)
        return await self.view(await self.get(deployment_id))

    async def find_serving(self, adapter: str | None) -> Deployment | None:
        """The promoted deployment serving `adapter` (None: the base model), if any."""
        for deployment in await asyncio.to_thread(self._store.deployments, 0, 1 << 30):
            if deployment.active and deployment.adapter == adapter:
                return deployment
        return None

    async def restore(self, engine: Any) -> None:
        """Promote again what was promoted when the previous server stopped (the server's lifespan
        calls it once the engine is ready)."""
        for deployment in await asyncio.to_thread(self._store.deployments, 0, 1 << 30):
            if not deployment.active or deployment.adapter is None or deployment.error is not None:
                continue
            try:
                error = await self._pin(engine, deployment)
            except APIError as exc:
                error = exc.message
            if error is not None:
                logger.warning("could not promote deployment %s again: %s", deployment.id, error)
                await asyncio.to_thread(self._store.set_deployment_state, deployment.id, active=True, error=error)

    # ------------------------------------------------------------------ helpers
    async def _adapter_for(self, model_type: str, model_id: str) -> str | None:
        engine = self._state.require_engine()
        if model_type == BASE_MODEL:
            if model_id != engine.model_name:
                raise bad_request(f"The base model here is {engine.model_name!r}, not {model_id!r}.",
                                  param="model_id", code="model_not_found")
            return None
        try:
            job = await asyncio.to_thread(self._jobs.get_job, model_id)
        except NotFoundError:
            job = None
        name = model_id
        if job is not None:
            if job["status"] != "succeeded" or not job["fine_tuned_model"]:
                raise bad_request(f"Fine-tune {model_id} is {job['status']}; only a completed fine-tune can be "
                                  "deployed.", param="model_id", code="fine_tune_not_completed")
            name = job["fine_tuned_model"]
        if not engine.has_adapter(name):
            raise APIError(404, f"No fine-tune or adapter named {model_id!r}.", param="model_id",
                           code="model_not_found")
        return name

    async def _pin(self, engine: Any, deployment: Deployment) -> str | None:
        """Pin the deployment's adapter; the reason it cannot be loaded, or None. 409 if no slot may be pinned."""
        assert deployment.adapter is not None
        try:
            await engine.promote_adapter(deployment.adapter)
        except PinLimitError as exc:
            raise APIError(409, str(exc), param="deployment_id", code="no_free_slot") from None
        except UnknownAdapterError:
            return f"The adapter {deployment.adapter} is no longer registered."
        except AdapterFailedError as exc:
            return str(exc)
        return None

    def _view(self, deployment: Deployment, info: dict[str, Any] | None) -> DeploymentView:
        size = info.get("size_bytes") if info else None
        if deployment.error is not None:
            return DeploymentView(deployment, "Failed", deployment.error, size)
        if not deployment.active:
            return DeploymentView(deployment, "Inactive", None, size)
        if deployment.id in self._pending:
            return DeploymentView(deployment, "Pending", None, size)
        if deployment.adapter is None:
            return DeploymentView(deployment, "Active", None, size)
        if info is None:
            return DeploymentView(deployment, "Failed", f"The adapter {deployment.adapter} is no longer registered.",
                                  size)
        if info["state"] == "failed":
            return DeploymentView(deployment, "Failed", info.get("error"), size)
        return DeploymentView(deployment, "Active" if info["pinned"] else "Inactive", None, size)
