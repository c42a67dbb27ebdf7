"""Training events as JSON lines, and the loss curve drawn from them.

One object per line, each with `type` and `time` (Unix seconds):

- `message`:    `level`, `message`
- `metrics`:    `step`, `total_steps`, `epoch`, `train_loss`, `train_mean_token_accuracy`,
                `learning_rate`, `elapsed_s`, `tokens` (trained so far), and `valid_loss` /
                `valid_mean_token_accuracy` on the steps that were evaluated
- `checkpoint`: `step`, `path`, `metrics`; `checkpoint_removed`: `step`, `path`
- `done`:       `step`, `path` (the final adapter), `metrics`, `trained_tokens`, `elapsed_s`,
                `train_seconds` and `tokens_per_s` (the loop alone, tokens of this run),
                `peak_memory_gb` (the process's peak GPU allocation; null on CPU)
- `error`:      `code`, `message`, `param` (what the job runner reports when a run fails)

Each line is written whole and flushed, so a reader tailing the file (the job manager)
never parses half an event: `read_events` only returns complete lines.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

EVENTS_NAME = "events.jsonl"
PLOT_NAME = "loss.png"


class EventLog:
    """Appends events to `path` (None: keeps them in memory only); `listener` sees each one too."""

    def __init__(self, path: Path | None, listener: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.listener = listener
        self.events: list[dict[str, Any]] = []
        self._handle: TextIO | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def emit(self, type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type, "time": round(time.time(), 3), **{k: _clean(v) for k, v in fields.items()}}
        self.events.append(event)
        if self._handle is not None:
            self._handle.write(json.dumps(event, ensure_ascii=False) + "\n")
            self._handle.flush()
        if self.listener is not None:
            self.listener(event)
        return event

    def message(self, message: str, level: str = "info") -> dict[str, Any]:
        return self.emit("message", level=level, message=message)

    def error(self, message: str, code: str, param: str | None = None) -> dict[str, Any]:
        return self.emit("error", level="error", code=code, message=message, param=param)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clean(value: Any) -> Any:
    # JSON has no NaN or infinity; a diverged loss is recorded as null rather than breaking readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete events from byte `offset` on, and the offset to resume from."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written stays for the next read
    events = []
    for line in data[:end].splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # not ours to fail on: a reader only reports what it understands
    return events, offset + end


def plot_losses(events: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Draw train (and validation) loss against step into a PNG; None when there is nothing to draw."""
    metrics = [e for e in events if e.get("type") == "metrics"]
    train = [(e["step"], e["train_loss"]) for e in metrics if e.get("train_loss") is not None]
    valid = [(e["step"], e["valid_loss"]) for e in metrics if e.get("valid_loss") is not None]
    if not train and not valid:
        return None
    # The object API with the Agg canvas draws off-screen without touching pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if valid:
        axes.plot(*zip(*valid, strict=True), label="validation loss", marker="o", linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
