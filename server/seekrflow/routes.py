"""The routes the `seekrai` SDK calls, as views over Quiver's own jobs, files, adapters and store.

A client written against the hosted platform works with only its base URL changed:
projects (`/v1/flow/projects`), files (`/v1/flow/files`, uploaded with PUT), fine-tunes
(`/v1/flow/fine-tune` to create, `/v1/flow/fine-tunes[/{id}[/events|/cancel]]`), deployments
(`/v1/flow/deployments[/{id}[/promote|/demote]]`, PUT for the last two), models
(`/v1/flow/models`) and `/v1/inference/chat/completions` (in `server.seekrflow.chat`).
A fine-tune is a job of the job manager (same id), its files are the manager's files, a
deployment promotes and demotes an adapter of the engine's registry; projects, deployments and
the fine-tune-to-project links are kept in the SQLite store.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.finetune.routes import call_jobs, read_upload_form
from server.http.errors import APIError, bad_request, parse_json_body
from server.http.routing import ApiRoute, Operation, Param
from server.seekrflow import shapes
from server.seekrflow.answers import (
    FlowDeployment,
    FlowDeploymentList,
    FlowFile,
    FlowFileList,
    FlowFileUpload,
    FlowFineTune,
    FlowFineTuneEventList,
    FlowFineTuneList,
    FlowModelList,
    FlowProject,
    FlowProjectList,
)
from server.seekrflow.bodies import (
    SQL_MAX,
    DeploymentCreate,
    FineTuneCreate,
    FlowBody,
    ProjectCreate,
)
from server.seekrflow.chat import chat_route
from server.seekrflow.deployments import Deployments
from server.state import ServerState
from server.store import Store
from training.job_record import fine_tuned_model_name
from training.jobs import JobManager

_ALL = 1 << 30
TAG = "SeekrFlow"


def _count(low: int) -> dict[str, Any]:
    """An id, offset or count the store can bind (SQLite's INTEGER)."""
    return {"type": "integer", "minimum": low, "maximum": SQL_MAX}


_SKIP_LIMIT = (Param("skip", _count(0)), Param("limit", _count(1)))


def _invalid(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first.get("loc", ())) or None
    return bad_request(f"Invalid value for `{param}`: {first.get('msg', 'invalid value')}", param=param,
                       code="invalid_value")


async def _body(request: Request, model: type[FlowBody]) -> Any:
    try:
        return model.model_validate(await parse_json_body(request))
    except ValidationError as exc:
        raise _invalid(exc) from None


def _int_param(request: Request, name: str, default: int, low: int = 0) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"{name} must be an integer, got {raw!r}", param=name) from None
    if not low <= value <= SQL_MAX:
        raise bad_request(f"{name} must be between {low} and {SQL_MAX}, got {value}", param=name)
    return value


def _model_bytes(model: str) -> int | None:
    path = Path(model)
    if not path.is_dir():
        return None
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def seekrai_routes(state: ServerState, store: Store, jobs: JobManager, deployments: Deployments) -> list[ApiRoute]:
    def processor() -> str:
        device = getattr(getattr(state.engine, "config", None), "torch_device", None)
        return "NVIDIA" if getattr(device, "type", "cpu") == "cuda" else "XEON"

    # ---------------------------------------------------------------- projects
    async def create_project(request: Request) -> Response:
        body = await _body(request, ProjectCreate)
        return JSONResponse(shapes.project(await asyncio.to_thread(store.create_project, body.name,
                                                                   body.description)))

    async def get_project(request: Request) -> Response:
        project_id = request.path_params["project_id"]
        found = await asyncio.to_thread(store.project, project_id) if project_id <= SQL_MAX else None
        if found is None:
            raise APIError(404, f"No such project: {project_id}.", param="project_id", code="project_not_found")
        return JSONResponse(shapes.project(found))

    async def list_projects(request: Request) -> Response:
        skip, limit = _int_param(request, "skip", 0), _int_param(request, "limit", 100, low=1)
        projects = await asyncio.to_thread(store.projects, skip, limit)
        links = await asyncio.to_thread(store.fine_tune_links)
        live = {d.adapter for d in await asyncio.to_thread(store.deployments, 0, _ALL) if d.active}
        data = []
        for project in projects:
            runs = [link for link in links.values() if link.project_id == project.id]
            last = max([project.updated_at, *(link.created_at for link in runs)])
            deployed = sum(fine_tuned_model_name(link.job_id) in live for link in runs)
            data.append(shapes.project(project, len(runs), deployed, last))
        return JSONResponse({"data": data})

    # ---------------------------------------------------------------- files
    async def upload_file(request: Request) -> Response:
        form = await read_upload_form(request, jobs.files.max_bytes, param="files", max_files=4, max_fields=8)
        try:
            upload = form.get("files") or form.get("file")
            if not isinstance(upload, UploadFile):
                raise bad_request("Upload the data as the multipart form field `files`.", param="files")
            # The SDK sends the file's name as a part of its own, which arrives as a file.
            named = form.get("filename")
            filename = (await named.read()).decode("utf-8", "replace") if isinstance(named, UploadFile) else named
            purpose = form.get("purpose")
            record = await call_jobs(jobs.files.add, str(filename or upload.filename or "upload.jsonl"), upload.file,
                                      purpose if isinstance(purpose, str) else "fine-tune")
        finally:
            await form.close()
        return JSONResponse(shapes.file(record))

    async def get_file(request: Request) -> Response:
        return JSONResponse(shapes.file(await call_jobs(jobs.files.get, request.path_params["file_id"])))

    async def list_files(request: Request) -> Response:
        offset, limit = _int_param(request, "offset", 0), _int_param(request, "limit", 100, low=1)
        purpose = request.query_params.get("purpose")
        records = [r for r in await call_jobs(jobs.files.list) if purpose in (None, r.purpose)]
        return JSONResponse({"object": "list", "data": [shapes.file(r) for r in records[offset:offset + limit]]})

    # ---------------------------------------------------------------- fine-tunes
    def inference_available(job: dict[str, Any]) -> bool:
        name = job.get("fine_tuned_model")
        return bool(name) and state.ready and state.engine is not None and state.engine.has_adapter(name)

    async def fine_tune_body(job_id: str) -> dict[str, Any]:
        job = await call_jobs(jobs.get_job, job_id)
        links = await asyncio.to_thread(store.fine_tune_links)
        return shapes.fine_tune(job, links.get(job_id), inference_available(job))

    async def create_fine_tune(request: Request) -> Response:
        body = await _body(request, FineTuneCreate)
        if await asyncio.to_thread(store.project, body.project_id) is None:
            raise APIError(404, f"No such project: {body.project_id}.", param="project_id",
                           code="project_not_found")
        config = body.training_config
        job = await call_jobs(jobs.create_job, model=config.model, training_file=config.training_files[0],
                               validation_file=(config.validation_files or [None])[0],
                               hyperparameters=config.hyperparameters(), suffix=config.experiment_name,
                               metadata={"project_id": str(body.project_id)})
        settings = {"infrastructure_config": body.infrastructure_config.model_dump(),
                    "training_config": config.model_dump(exclude_none=True)}
        await asyncio.to_thread(store.link_fine_tune, job["id"], body.project_id, settings)
        return JSONResponse(await fine_tune_body(job["id"]))

    async def get_fine_tune(request: Request) -> Response:
        return JSONResponse(await fine_tune_body(request.path_params["job_id"]))

    async def list_fine_tunes(request: Request) -> Response:
        found, _ = await call_jobs(jobs.list_jobs, None, _ALL)
        links = await asyncio.to_thread(store.fine_tune_links)
        data = [shapes.fine_tune(job, links.get(job["id"]), inference_available(job)) for job in found]
        return JSONResponse({"object": "list", "data": data})

    async def cancel_fine_tune(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        await call_jobs(jobs.cancel_job, job_id)
        return JSONResponse(await fine_tune_body(job_id))

    async def fine_tune_events(request: Request) -> Response:
        events, _ = await call_jobs(jobs.list_events, request.path_params["job_id"], None, _ALL)
        return JSONResponse({"object": "list", "data": shapes.fine_tune_events(list(reversed(events)))})

    # ---------------------------------------------------------------- deployments
    async def create_deployment(request: Request) -> Response:
        body = await _body(request, DeploymentCreate)
        view = await deployments.create(name=body.name, description=body.description, model_type=body.model_type,
                                        model_id=body.model_id, n_instances=body.n_instances)
        return JSONResponse(shapes.deployment(view, processor()))

    async def get_deployment(request: Request) -> Response:
        view = await deployments.view(await deployments.get(request.path_params["deployment_id"]))
        return JSONResponse(shapes.deployment(view, processor()))

    async def list_deployments(request: Request) -> Response:
        skip, limit = _int_param(request, "skip", 0), _int_param(request, "limit", 100, low=1)
        views = await deployments.list(skip, limit)
        return JSONResponse({"data": [shapes.deployment(v, processor()) for v in views]})

    async def promote(request: Request) -> Response:
        view = await deployments.promote(request.path_params["deployment_id"])
        return JSONResponse(shapes.deployment(view, processor()))

    async def demote(request: Request) -> Response:
        view = await deployments.demote(request.path_params["deployment_id"])
        return JSONResponse(shapes.deployment(view, processor()))

    # ---------------------------------------------------------------- models
    base_bytes: list[int | None] = []

    async def list_models(request: Request) -> Response:
        engine = state.require_engine()
        if not base_bytes:
            base_bytes.append(await asyncio.to_thread(_model_bytes, str(engine.config.model)))
        base = engine.model_name
        data = [shapes.model(base, base_bytes[0], base=base, created=state.created, is_base=True)]
        data += [shapes.model(info["id"], info.get("size_bytes"), base=base, created=state.created, is_base=False)
                 for info in await engine.list_adapters() if info["state"] != "failed"]
        return JSONResponse({"object": "list", "data": data})

    flow = "/v1/flow"
    project, fine_tune = flow + "/projects/{project_id:int}", flow + "/fine-tunes/{job_id}"
    deployment = flow + "/deployments/{deployment_id}"
    return [
        ApiRoute(f"{flow}/projects", list_projects, Operation(
            "List projects", TAG, response=FlowProjectList, errors=(400,), params=_SKIP_LIMIT), methods=["GET"]),
        ApiRoute(f"{flow}/projects", create_project, Operation(
            "Create a project", TAG, body=ProjectCreate, response=FlowProject, errors=(400,)), methods=["POST"]),
        ApiRoute(project, get_project, Operation(
            "Describe one project", TAG, response=FlowProject, errors=(404,), missing="project",
            params=(Param("project_id", _count(0), "path"),)), methods=["GET"]),
        ApiRoute(f"{flow}/files", upload_file, Operation(
            "Upload a fine-tuning file", TAG, form=FlowFileUpload, response=FlowFile, errors=(400, 413),
            upload=True), methods=["PUT", "POST"]),
        ApiRoute(f"{flow}/files", list_files, Operation(
            "List files", TAG, response=FlowFileList, errors=(400,), params=(
                Param("offset", _count(0)), Param("limit", _count(1)), Param("purpose"))), methods=["GET"]),
        ApiRoute(flow + "/files/{file_id}", get_file, Operation(
            "Describe one file", TAG, response=FlowFile, errors=(404,), missing="file"), methods=["GET"]),
        ApiRoute(f"{flow}/fine-tune", create_fine_tune, Operation(
            "Create a fine-tune in a project", TAG, body=FineTuneCreate, response=FlowFineTune, errors=(400, 404),
            missing="project or file"), methods=["POST"]),
        ApiRoute(f"{flow}/fine-tunes", list_fine_tunes, Operation(
            "List fine-tunes", TAG, response=FlowFineTuneList), methods=["GET"]),
        ApiRoute(fine_tune, get_fine_tune, Operation(
            "Describe one fine-tune", TAG, response=FlowFineTune, errors=(404,), missing="fine-tune"),
            methods=["GET"]),
        ApiRoute(fine_tune + "/events", fine_tune_events, Operation(
            "List a fine-tune's events, oldest first", TAG, response=FlowFineTuneEventList, errors=(404,),
            missing="fine-tune"), methods=["GET"]),
        ApiRoute(fine_tune + "/cancel", cancel_fine_tune, Operation(
            "Cancel a fine-tune", TAG, response=FlowFineTune, errors=(404, 409), missing="fine-tune"),
            methods=["PUT", "POST"]),
        ApiRoute(f"{flow}/deployments", list_deployments, Operation(
            "List deployments", TAG, response=FlowDeploymentList, errors=(400, 503), params=_SKIP_LIMIT),
            methods=["GET"]),
        ApiRoute(f"{flow}/deployments", create_deployment, Operation(
            "Create a deployment of a fine-tune, adapter or the base model", TAG, body=DeploymentCreate,
            response=FlowDeployment, errors=(400, 404, 503), missing="model"), methods=["POST"]),
        ApiRoute(deployment, get_deployment, Operation(
            "Describe one deployment", TAG, response=FlowDeployment, errors=(404, 503), missing="deployment"),
            methods=["GET"]),
        ApiRoute(deployment + "/promote", promote, Operation(
            "Promote a deployment (pin its adapter)", TAG, response=FlowDeployment, errors=(404, 409, 503),
            missing="deployment"), methods=["PUT", "POST"]),
        ApiRoute(deployment + "/demote", demote, Operation(
            "Demote a deployment (unpin its adapter)", TAG, response=FlowDeployment, errors=(404, 503),
            missing="deployment"), methods=["PUT", "POST"]),
        ApiRoute(f"{flow}/models", list_models, Operation(
            "List the base model and its servable adapters", TAG, response=FlowModelList, errors=(503,)),
            methods=["GET"]),
        chat_route(state, store, jobs, deployments),
    ]
