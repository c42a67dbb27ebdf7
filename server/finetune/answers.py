"""The bodies the files and fine-tuning routes take as forms and answer with, as pydantic models for
the OpenAPI document (the openai client's `FileObject`, `FineTuningJob`, `FineTuningJobEvent`,
`FineTuningJobCheckpoint` and cursor pages). `training.files` and `training.job_record` build them
as dicts; the spec tests check real answers against these.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]


class FileUpload(BaseModel):
    """A multipart upload of training data."""

    file: bytes = Field(description="Chat JSONL: one `{\"messages\": [...]}` conversation a line.")
    purpose: Literal["fine-tune"]


class FileObject(BaseModel):
    """A `file`, checked on arrival."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None
    expires_at: int | None


class FileList(BaseModel):
    """The uploaded files."""

    object: Literal["list"]
    data: list[FileObject]
    has_more: bool


class JobError(BaseModel):
    message: str
    code: str | None = None
    param: str | None = None


class FineTuningJob(BaseModel):
    """A `fine_tuning.job`; a finished one names its adapter in `fine_tuned_model`."""

    id: str
    object: Literal["fine_tuning.job"]
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: JobStatus
    hyperparameters: dict[str, Any]
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    error: JobError | None
    seed: int | None
    estimated_finish: int | None
    integrations: list[Any]
    metadata: dict[str, str] | None
    suffix: str | None
    method: dict[str, Any]


class FineTuningJobList(BaseModel):
    """A page of jobs, newest first."""

    object: Literal["list"]
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None


class FineTuningJobEventList(BaseModel):
    """A page of a job's events, newest first."""

    object: Literal["list"]
    data: list[FineTuningJobEvent]
    has_more: bool


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, float]


class FineTuningJobCheckpointList(BaseModel):
    """A page of a job's checkpoints, newest first."""

    object: Literal["list"]
    data: list[FineTuningJobCheckpoint]
    has_more: bool
