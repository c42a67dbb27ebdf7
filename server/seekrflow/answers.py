"""The bodies the `/v1/flow` routes take as forms and answer with, as pydantic models for the OpenAPI
document. `server.seekrflow.shapes` builds them as dicts in the shapes the `seekrai` SDK parses;
the spec tests check real answers against these. Times are ISO 8601 strings in UTC.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

FineTuneStatus = Literal["pending", "queued", "running", "completed", "failed", "cancelled"]


class FlowFileUpload(BaseModel):
    """A multipart upload of training data, as the SDK sends it (PUT)."""

    files: bytes = Field(description="Chat JSONL.")
    filename: str | None = None
    purpose: Literal["fine-tune"] = "fine-tune"


class FlowProject(BaseModel):
    """A project; listed, it also counts its runs."""

    id: int
    name: str
    description: str
    user_id: int
    team_id: int | None
    created_at: str
    updated_at: str
    runs: int | None = None
    runs_deployed: int | None = None
    last_modified: str | None = None


class FlowProjectList(BaseModel):
    """A page of projects."""

    data: list[FlowProject]


class FlowFile(BaseModel):
    """A training file."""

    id: str
    object: Literal["file"]
    created_at: str | None
    type: str
    purpose: str
    filename: str
    bytes: int
    examples: int
    deleted: bool


class FlowFileList(BaseModel):
    """A page of files."""

    object: Literal["list"]
    data: list[FlowFile]


class FlowLoRA(BaseModel):
    r: int
    alpha: int
    dropout: float
    bias: str


class FlowFineTune(BaseModel):
    """A fine-tune: a fine-tuning job with its project and settings."""

    id: str
    fine_tune_type: str
    training_files: list[str]
    validation_files: list[str] | None
    model: str
    accel_type: str
    n_accel: int
    n_node: int
    n_epochs: int
    batch_size: int
    learning_rate: float
    lora_config: FlowLoRA
    created_at: str | None
    experiment_name: str | None
    status: FineTuneStatus
    inference_available: bool
    project_id: int | None
    completed_at: str | None
    error_analysis: str | None
    fine_tuned_model: str | None
    trained_tokens: int | None


class FlowFineTuneList(BaseModel):
    """The fine-tunes, newest first."""

    object: Literal["list"]
    data: list[FlowFineTune]


class FlowFineTuneEvent(BaseModel):
    """A loss point."""

    object: Literal["fine-tune-event"]
    created_at: str | None
    loss: float
    epoch: float
    step: int | None
    total_steps: int | None
    valid_loss: float | None
    learning_rate: float | None


class FlowFineTuneEventList(BaseModel):
    """A fine-tune's loss points, oldest first."""

    object: Literal["list"]
    data: list[FlowFineTuneEvent]


class FlowDeployment(BaseModel):
    """A deployment: a fine-tune, adapter or the base model, and whether it is promoted."""

    id: str
    model_type: str
    model_id: str
    name: str
    description: str
    status: str
    memory: str | None
    hardware_type: str
    total_input_tokens: int
    total_output_tokens: int
    created_at: str | None
    last_deployed_at: str | None
    updated_at: str | None
    processor: str
    n_instances: int
    adapter: str | None
    error: str | None


class FlowDeploymentList(BaseModel):
    """A page of deployments."""

    data: list[FlowDeployment]


class FlowModel(BaseModel):
    """The base model or one of its servable adapters."""

    id: str
    object: Literal["model"]
    name: str
    size: int
    created: int
    model_type: Literal["base_model", "adapter"]
    type: str
    supports_lora: bool
    base_model: str | None


class FlowModelList(BaseModel):
    """The base model, then its servable adapters."""

    object: Literal["list"]
    data: list[FlowModel]
