"""One fine-tuning job's record: state, events and checkpoints, persisted as JSON, shown in OpenAI's shapes.

Callers hold the manager's lock around every mutation; a record only saves itself.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ORGANIZATION = "quiver"
_LOG_TAIL_CHARS = 2000
T = TypeVar("T")


def fine_tuned_model_name(job_id: str) -> str:
    """The name a job's adapter is served under; its checkpoints add `:ckpt-<step>`."""
    return f"ft-{job_id}"


@dataclass
class JobRecord:
    id: str
    created_at: int
    model: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    seed: int
    suffix: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    status: str = "validating_files"
    error: dict[str, Any] | None = None
    fine_tuned_model: str | None = None
    started_at: int | None = None
    finished_at: int | None = None
    estimated_finish: int | None = None
    trained_tokens: int | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    created_ns: int = 0  # orders jobs created within the same second
    child_error: dict[str, Any] | None = None
    final_event: dict[str, Any] | None = None
    directory: Path = field(default=Path("."), repr=False, compare=False)
    events: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def new(cls, directory: Path, job_id: str, **fields: Any) -> JobRecord:
        directory.mkdir(parents=True, exist_ok=True)
        now = time.time_ns()
        record = cls(id=job_id, created_at=now // 10**9, created_ns=now, directory=directory, **fields)
        record.save()
        return record

    @property
    def output_dir(self) -> Path:
        return self.directory / "output"

    @property
    def fine_tuned_name(self) -> str:
        return fine_tuned_model_name(self.id)

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        data = asdict(self)
        data.pop("directory")
        data.pop("events")
        tmp = self.directory / ".job.json.tmp"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.directory / "job.json")

    def add_event(self, message: str, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None) -> dict[str, Any]:
        event = {"id": f"ftevent-{secrets.token_hex(12)}", "object": "fine_tuning.job.event",
                 "created_at": int(time.time()), "level": level, "message": message, "type": type, "data": data}
        self.events.append(event)
        with open(self.directory / "events.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")
        return event

    # ------------------------------------------------------------------ transitions
    def set_status(self, status: str, message: str, level: str = "info") -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown job status {status!r}")
        self.status = status
        if status in TERMINAL:
            self.finished_at = int(time.time())
            self.estimated_finish = None
        self.save()
        self.add_event(message, level=level)

    def requeue(self, message: str) -> None:
        """Back to the start: the run's partial progress is dropped (the next run overwrites its
        output directory), its files are validated again, and the history keeps `message`.
        Checkpoints already published stay, served, until the next run replaces them."""
        self.started_at = self.estimated_finish = self.trained_tokens = None
        self.child_error, self.final_event = None, None
        self.set_status("validating_files", message, level="warn")

    def fail(self, code: str, message: str, param: str | None = None) -> None:
        self.error = {"code": code, "message": message, "param": param}
        self.set_status("failed", f"Fine-tuning job failed: {message}", level="error")

    def fail_from_child(self, exit_code: int, log: Path) -> None:
        if self.child_error is not None:
            self.fail(str(self.child_error.get("code") or "training_error"), str(self.child_error.get("message")),
                      self.child_error.get("param"))
            return
        self.fail("training_error", f"The training process exited with status {exit_code}. "
                                    f"Last output:\n{_tail(log)}")

    def succeed(self, name: str) -> None:
        self.fine_tuned_model = name
        self.add_event(f"New fine-tuned model created: {name}")
        self.set_status("succeeded", "The job has successfully completed.")

    def add_checkpoint(self, step: int, path: Path, event: dict[str, Any]) -> None:
        """A checkpoint published at `path` (and registered), from the child's `checkpoint` event."""
        self.checkpoints.append({
            "id": f"ftckpt-{secrets.token_hex(12)}", "created_at": int(event.get("time") or time.time()),
            "step_number": step, "fine_tuned_model_checkpoint": self.checkpoint_name(step),
            "path": str(path), "metrics": event.get("metrics") or {},
        })
        self.add_event(f"Checkpoint created at step {step}: {self.checkpoint_name(step)}")
        self.save()

    def drop_checkpoint(self, step: int) -> None:
        self.checkpoints = [c for c in self.checkpoints if c["step_number"] != step]
        self.save()

    def checkpoint_name(self, step: int) -> str:
        return f"{self.fine_tuned_name}:ckpt-{step}"

    def record_child_event(self, event: dict[str, Any]) -> None:
        """Fold one event of the child's events.jsonl into this record (checkpoints are the manager's)."""
        kind = event.get("type")
        if kind == "metrics":
            self._metrics(event)
        elif kind == "message":
            self.add_event(str(event.get("message", "")), level="warn" if event.get("level") == "warning" else "info")
        elif kind == "error":
            self.child_error = {k: event.get(k) for k in ("code", "message", "param")}
            self.save()
        elif kind == "done":
            self.final_event = event
            self.trained_tokens = event.get("trained_tokens")
            self.save()

    def _metrics(self, event: dict[str, Any]) -> None:
        step, total = int(event["step"]), int(event["total_steps"])
        keys = ("step", "total_steps", "epoch", "train_loss", "train_mean_token_accuracy", "valid_loss",
                "valid_mean_token_accuracy", "learning_rate", "elapsed_s")
        data = {k: event[k] for k in keys if event.get(k) is not None}
        message = f"Step {step}/{total}: training loss={_fmt(event.get('train_loss'))}"
        if event.get("valid_loss") is not None:
            message += f", validation loss={_fmt(event['valid_loss'])}"
        self.add_event(message, type="metrics", data=data)
        elapsed = event.get("elapsed_s")
        if isinstance(elapsed, (int, float)) and step > 0:
            self.estimated_finish = int(time.time() + elapsed / step * (total - step))

    # ------------------------------------------------------------------ OpenAI shapes
    def to_openai(self) -> dict[str, Any]:
        hp = dict(self.hyperparameters)
        return {
            "id": self.id, "object": "fine_tuning.job", "created_at": self.created_at, "error": self.error,
            "fine_tuned_model": self.fine_tuned_model, "finished_at": self.finished_at, "hyperparameters": hp,
            "model": self.model, "organization_id": ORGANIZATION, "result_files": [], "seed": self.seed,
            "status": self.status, "trained_tokens": self.trained_tokens, "training_file": self.training_file,
            "validation_file": self.validation_file,
            "estimated_finish": self.estimated_finish if self.status == "running" else None,
            "integrations": [], "metadata": self.metadata or None, "suffix": self.suffix,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        }

    def checkpoint_to_openai(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        metrics = {k: v for k, v in checkpoint.get("metrics", {}).items() if v is not None}
        return {"id": checkpoint["id"], "object": "fine_tuning.job.checkpoint",
                "created_at": checkpoint["created_at"], "fine_tuning_job_id": self.id,
                "fine_tuned_model_checkpoint": checkpoint["fine_tuned_model_checkpoint"],
                "step_number": checkpoint["step_number"], "metrics": metrics}


def load_records(jobs_dir: Path) -> list[JobRecord]:
    """Every readable job under `jobs_dir`, with its events."""
    records = []
    for path in sorted(jobs_dir.glob("*/job.json")):
        try:
            data = json.loads(path.read_text())
            record = JobRecord(directory=path.parent, **data)
        except (OSError, ValueError, TypeError):
            continue  # a record we cannot read is skipped rather than taking the server down
        events_path = path.parent / "events.jsonl"
        if events_path.is_file():
            for line in events_path.read_text(encoding="utf-8").splitlines():
                try:
                    record.events.append(json.loads(line))
                except ValueError:
                    continue
        records.append(record)
    return records


def page(items: Sequence[T], after: str | None, limit: int, key: Callable[[T], str]) -> tuple[list[T], bool]:
    """Cursor pagination: up to `limit` items following the one whose key is `after`; and whether more follow."""
    start = 0
    if after is not None:
        for index, item in enumerate(items):
            if key(item) == after:
                start = index + 1
                break
    chosen = list(items[start : start + limit])
    return chosen, start + limit < len(items)


def _fmt(value: Any) -> str:
    return "nan" if value is None else f"{value:.4f}"


def _tail(log: Path) -> str:
    try:
        return log.read_text(encoding="utf-8", errors="replace")[-_LOG_TAIL_CHARS:].strip()
    except OSError:
        return "(no output)"
