"""The OpenAI files and fine-tuning routes, over a `training.jobs.JobManager`.

Shapes follow the openai client's types (`FileObject`, `FineTuningJob`, `FineTuningJobEvent`,
`FineTuningJobCheckpoint`, cursor pages with `has_more`). The manager does file I/O and
may wait for a child to die, so each call runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message

from server.finetune.answers import (
    FileList,
    FileObject,
    FileUpload,
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobEventList,
    FineTuningJobList,
)
from server.http.errors import APIError, bad_request, parse_json_body
from server.http.routing import ApiRoute, Operation, Param
from training.errors import ConflictError, FineTuneError, NotFoundError, TooLargeError
from training.jobs import JobManager

_STATUS = {NotFoundError: 404, ConflictError: 409, TooLargeError: 413}
_MAX_LIMIT = 100
# Room for the multipart framing and the small fields beside the file (purpose, filename).
FORM_OVERHEAD_BYTES = 64 * 1024
TAG = "Fine-tuning"
_PAGE = (Param("after"), Param("limit", {"type": "integer", "minimum": 1, "maximum": _MAX_LIMIT}))


class JobCreate(BaseModel, title="FineTuningJobCreate"):
    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=0)
    suffix: str | None = Field(default=None, max_length=64)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None


async def call_jobs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking job-manager call off the event loop; its errors become OpenAI error envelopes."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except FineTuneError as exc:
        status = next((s for kind, s in _STATUS.items() if isinstance(exc, kind)), 400)
        raise APIError(status, exc.message, param=exc.param, code=exc.code) from None


async def read_upload_form(request: Request, max_file_bytes: int, *, param: str, max_files: int,
                           max_fields: int) -> FormData:
    """The multipart form of an upload whose file may hold up to `max_file_bytes`.

    A declared Content-Length beyond that (plus the form's framing) is refused before a byte is
    read; a body without one, or longer than it said, is cut off as soon as it grows past it,
    so no more than the cap is ever spooled to disk. The store checks the file's exact size.
    """
    limit = max_file_bytes + FORM_OVERHEAD_BYTES

    def too_large() -> APIError:
        return APIError(413, f"The upload is larger than the {max_file_bytes} bytes allowed for a file.",
                        param=param, code="file_too_large")

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large()
    received = 0

    async def capped_receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large()
        return message

    try:
        return await Request(request.scope, capped_receive).form(max_files=max_files, max_fields=max_fields)
    except HTTPException as exc:
        raise bad_request(f"Could not read the multipart form: {exc.detail}", param=param) from None


def _limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"limit must be an integer, got {raw!r}", param="limit") from None
    if not 1 <= value <= _MAX_LIMIT:
        raise bad_request(f"limit must be between 1 and {_MAX_LIMIT}, got {value}", param="limit")
    return value


def _invalid_body(exc: ValidationError) -> APIError:
    # The job body's own field path (e.g. `hyperparameters`, or an unknown key) names the param.
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first.get("loc", ())) or None
    return bad_request(f"Invalid value for `{param}`: {first.get('msg', 'invalid value')}", param=param,
                       code="invalid_value")


def _page(items: list[dict[str, Any]], has_more: bool) -> JSONResponse:
    return JSONResponse({"object": "list", "data": items, "has_more": has_more})


def finetune_routes(manager: JobManager) -> list[ApiRoute]:
    """Routes for `/v1/files` and `/v1/fine_tuning/jobs`; the caller starts and closes `manager`."""

    async def create_file(request: Request) -> Response:
        form = await read_upload_form(request, manager.files.max_bytes, param="file", max_files=1, max_fields=8)
        try:
            upload = form.get("file")
            purpose = form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise bad_request("Upload the data as the multipart form field `file`.", param="file")
            if not isinstance(purpose, str):
                raise bad_request("The form field `purpose` is required; use 'fine-tune'.", param="purpose")
            record = await call_jobs(manager.files.add, upload.filename or "upload.jsonl", upload.file, purpose)
        finally:
            await form.close()
        return JSONResponse(record.to_openai())

    async def list_files(request: Request) -> Response:
        purpose = request.query_params.get("purpose")
        records = await call_jobs(manager.files.list)
        return _page([r.to_openai() for r in records if purpose in (None, r.purpose)], False)

    async def get_file(request: Request) -> Response:
        record = await call_jobs(manager.files.get, request.path_params["file_id"])
        return JSONResponse(record.to_openai())

    async def create_job(request: Request) -> Response:
        try:
            body = JobCreate.model_validate(await parse_json_body(request))
        except ValidationError as exc:
            raise _invalid_body(exc) from None
        if body.integrations:
            raise bad_request("integrations are not supported.", param="integrations")
        job = await call_jobs(manager.create_job, model=body.model, training_file=body.training_file,
                          validation_file=body.validation_file, hyperparameters=body.hyperparameters,
                          method=body.method, seed=body.seed, suffix=body.suffix, metadata=body.metadata)
        return JSONResponse(job)

    async def list_jobs(request: Request) -> Response:
        jobs, more = await call_jobs(manager.list_jobs, request.query_params.get("after"), _limit(request, 20))
        return _page(jobs, more)

    async def get_job(request: Request) -> Response:
        return JSONResponse(await call_jobs(manager.get_job, request.path_params["job_id"]))

    async def list_events(request: Request) -> Response:
        events, more = await call_jobs(manager.list_events, request.path_params["job_id"],
                                   request.query_params.get("after"), _limit(request, 20))
        return _page(events, more)

    async def list_checkpoints(request: Request) -> Response:
        items, more = await call_jobs(manager.list_checkpoints, request.path_params["job_id"],
                                  request.query_params.get("after"), _limit(request, 10))
        return _page(items, more)

    async def cancel_job(request: Request) -> Response:
        return JSONResponse(await call_jobs(manager.cancel_job, request.path_params["job_id"]))

    jobs, job = "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{job_id}"
    return [
        ApiRoute("/v1/files", create_file, Operation(
            "Upload a fine-tuning file (checked on arrival)", TAG, form=FileUpload, response=FileObject,
            errors=(400, 413), upload=True), methods=["POST"]),
        ApiRoute("/v1/files", list_files, Operation(
            "List the uploaded files", TAG, response=FileList, params=(Param("purpose"),)), methods=["GET"]),
        ApiRoute("/v1/files/{file_id}", get_file, Operation(
            "Describe one file", TAG, response=FileObject, errors=(404,), missing="file"), methods=["GET"]),
        ApiRoute(jobs, create_job, Operation(
            "Create a fine-tuning job", TAG, body=JobCreate, response=FineTuningJob, errors=(400, 404),
            missing="file"), methods=["POST"]),
        ApiRoute(jobs, list_jobs, Operation(
            "List fine-tuning jobs, newest first", TAG, response=FineTuningJobList, errors=(400,), params=_PAGE),
            methods=["GET"]),
        ApiRoute(job, get_job, Operation(
            "Describe one job", TAG, response=FineTuningJob, errors=(404,), missing="job"), methods=["GET"]),
        ApiRoute(job + "/events", list_events, Operation(
            "List a job's events", TAG, response=FineTuningJobEventList, errors=(400, 404), missing="job",
            params=_PAGE), methods=["GET"]),
        ApiRoute(job + "/checkpoints", list_checkpoints, Operation(
            "List a job's checkpoints", TAG, response=FineTuningJobCheckpointList, errors=(400, 404),
            missing="job", params=_PAGE), methods=["GET"]),
        ApiRoute(job + "/cancel", cancel_job, Operation(
            "Cancel a job", TAG, response=FineTuningJob, errors=(404, 409), missing="job"), methods=["POST"]),
    ]
