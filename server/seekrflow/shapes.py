"""Response bodies in the shapes the `seekrai` SDK parses, built from Quiver's own records.

Plain dicts, one function per object. Times are ISO 8601 in UTC. Where the SDK insists on a
field Quiver has no real value for (an accelerator type from its own list, a user id), the
value is a fixed stand-in named here; Quiver-specific facts ride along as extra keys, which
the SDK keeps.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from server.seekrflow.deployments import DeploymentView
from server.store import FineTuneLink, Project
from training.files import FileRecord
from training.job_params import train_config
from training.job_record import TERMINAL

# The SDK validates these against its own enums; none of them names "whatever device the server has".
DEFAULT_ACCEL_TYPE = "H100"
USER_ID = 0
JOB_STATUS = {"validating_files": "pending", "queued": "queued", "running": "running", "succeeded": "completed",
              "failed": "failed", "cancelled": "cancelled"}


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def human_bytes(size: int | None) -> str | None:
    if size is None:
        return None
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return None  # unreachable: the loop returns at GB


def project(p: Project, runs: int | None = None, runs_deployed: int = 0, last_modified: float | None = None
            ) -> dict[str, Any]:
    body: dict[str, Any] = {"id": p.id, "name": p.name, "description": p.description, "user_id": USER_ID,
                            "team_id": None, "created_at": iso(p.created_at), "updated_at": iso(p.updated_at)}
    if runs is not None:
        body.update(runs=runs, runs_deployed=runs_deployed, last_modified=iso(last_modified or p.updated_at))
    return body


def file(record: FileRecord) -> dict[str, Any]:
    return {"id": record.id, "object": "file", "created_at": iso(record.created_at), "type": "jsonl",
            "purpose": record.purpose, "filename": record.filename, "bytes": record.bytes, "created_by": None,
            "origin_file_id": None, "deleted": False, "examples": record.examples}


def fine_tune(job: dict[str, Any], link: FineTuneLink | None, inference_available: bool) -> dict[str, Any]:
    hp = job["hyperparameters"]
    config = train_config(hp, model="-", data=Path("-"), output=Path("-"))
    infra = (link.settings.get("infrastructure_config") if link else None) or {}
    alpha = float(config.lora_alpha)
    error = job.get("error") or {}
    return {
        "id": job["id"], "fine_tune_type": "STANDARD", "training_files": [job["training_file"]],
        "validation_files": [job["validation_file"]] if job.get("validation_file") else None,
        "model": job["model"], "accel_type": infra.get("accel_type", DEFAULT_ACCEL_TYPE),
        "n_accel": infra.get("n_accel", 1), "n_node": infra.get("n_node", 1), "n_epochs": hp["n_epochs"],
        "batch_size": hp["batch_size"], "learning_rate": config.learning_rate,
        # The SDK's alpha is an integer; Quiver's may be fractional (set through the OpenAI routes).
        "lora_config": {"r": config.lora_rank, "alpha": max(1, round(alpha)), "dropout": config.lora_dropout,
                        "bias": "none", "extras": {}},
        "created_at": iso(job["created_at"]), "experiment_name": job.get("suffix"),
        "status": JOB_STATUS[job["status"]], "events": None, "inference_available": inference_available,
        "project_id": link.project_id if link else None,
        "completed_at": iso(job.get("finished_at")) if job["status"] in TERMINAL else None,
        "description": None, "error_analysis": error.get("message"),
        "fine_tuned_model": job.get("fine_tuned_model"), "trained_tokens": job.get("trained_tokens"),
    }


def fine_tune_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A job's loss points, oldest first, as SeekrFlow lists them.

    SeekrFlow's event is a metric point (`loss`, `epoch`, `reward`; no message), and its
    documented loss plot sorts the list by `epoch`; so only training-metric events are listed,
    each with both. Status messages and checkpoints stay on the OpenAI events route.
    """
    return [_fine_tune_event(e) for e in events if _is_loss_point(e)]


def _is_loss_point(event: dict[str, Any]) -> bool:
    data = event.get("data") or {}
    return event.get("type") == "metrics" and data.get("train_loss") is not None and data.get("epoch") is not None


def _fine_tune_event(event: dict[str, Any]) -> dict[str, Any]:
    data = event["data"]
    return {
        "object": "fine-tune-event", "created_at": iso(event.get("created_at")), "loss": data["train_loss"],
        "epoch": data["epoch"], "step": data.get("step"), "total_steps": data.get("total_steps"),
        "valid_loss": data.get("valid_loss"), "learning_rate": data.get("learning_rate"),
    }


def deployment(view: DeploymentView, processor: str) -> dict[str, Any]:
    d = view.deployment
    return {
        "id": d.id, "model_type": d.model_type, "model_id": d.model_id, "name": d.name,
        "description": d.description, "status": view.status, "memory": human_bytes(view.size_bytes),
        "hardware_type": "Dedicated", "total_input_tokens": d.input_tokens, "total_output_tokens": d.output_tokens,
        "created_at": iso(d.created_at), "last_deployed_at": iso(d.last_deployed_at),
        "updated_at": iso(d.updated_at), "processor": processor, "n_instances": d.n_instances,
        "user_id": USER_ID, "team_id": None, "adapter": d.adapter, "error": view.error,
    }


def model(name: str, size: int | None, *, base: str, created: int, is_base: bool) -> dict[str, Any]:
    return {"id": name, "object": "model", "name": name, "size": size or 0, "created": created,
            "model_type": "base_model" if is_base else "adapter", "type": "chat", "supports_lora": is_base,
            "base_model": None if is_base else base}
