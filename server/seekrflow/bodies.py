"""The request bodies of the `/v1/flow` routes, as the `seekrai` SDK sends them (extra fields allowed)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from training.job_params import EXTRA_KEYS

# SQLite's INTEGER range: a larger id, offset or count cannot even be bound into a query.
SQL_MIN, SQL_MAX = -(2**63), 2**63 - 1


class FlowBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # the SDK sends fields Quiver has no use for


class ProjectCreate(FlowBody, title="FlowProjectCreate"):
    name: str = Field(min_length=5, max_length=100)
    description: str = Field(min_length=5, max_length=1000)


class DeploymentCreate(FlowBody, title="FlowDeploymentCreate"):
    name: str = Field(min_length=5, max_length=100)
    description: str = Field(min_length=5, max_length=1000)
    model_type: Literal["Fine-tuned Run", "Base Model"]
    model_id: str
    n_instances: int = Field(default=1, ge=1, le=50)


class LoRAConfig(FlowBody, title="FlowLoRAConfig"):
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.1, ge=0.0, le=1.0)
    bias: Literal["none"] = "none"


class TrainingConfig(FlowBody, title="FlowTrainingConfig"):
    training_files: list[str] = Field(min_length=1, max_length=1)
    model: str
    n_epochs: int = Field(ge=1)
    learning_rate: float | None = Field(default=None, gt=0)
    n_checkpoints: int | None = Field(default=None, ge=0)
    batch_size: int | None = Field(default=None, ge=1)
    experiment_name: str | None = Field(default=None, max_length=64)
    max_length: int | None = Field(default=None, ge=1)
    pre_train: Literal[False] = False
    fine_tune_type: Literal["STANDARD"] = "STANDARD"
    lora_config: LoRAConfig | None = None
    validation_files: list[str] | None = Field(default=None, max_length=1)
    gradient_checkpointing: bool | None = None

    def hyperparameters(self) -> dict[str, Any]:
        hp: dict[str, Any] = {"n_epochs": self.n_epochs}
        optional = {"batch_size": self.batch_size, "learning_rate": self.learning_rate,
                    "max_length": self.max_length, "save_total_limit": self.n_checkpoints,
                    "gradient_checkpointing": self.gradient_checkpointing}
        hp.update({k: v for k, v in optional.items() if v is not None})
        if self.lora_config is not None:
            hp.update(lora_rank=self.lora_config.r, lora_alpha=self.lora_config.alpha,
                      lora_dropout=self.lora_config.dropout)
        # Quiver's own training settings (e.g. max_steps) may ride along as extra keys.
        hp.update({k: v for k, v in (self.model_extra or {}).items() if k in EXTRA_KEYS and v is not None})
        return hp


class InfrastructureConfig(FlowBody, title="FlowInfrastructureConfig"):
    accel_type: str
    n_accel: int = Field(ge=1)
    n_node: int = Field(default=1, ge=1)


class FineTuneCreate(FlowBody, title="FlowFineTuneCreate"):
    project_id: int = Field(ge=SQL_MIN, le=SQL_MAX)
    training_config: TrainingConfig
    infrastructure_config: InfrastructureConfig
