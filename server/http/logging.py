"""Structured logs: one JSON object per line, each carrying the id of the request it belongs to.

The request id lives in a context variable set by the request middleware; tasks a request
starts copy their context, so whatever they log carries the id too. Work on the engine
thread belongs to no single request and logs without one.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

LOG_FORMATS = ("json", "text")


@dataclass(frozen=True)
class RequestContext:
    """The request being served: its id and when it arrived (perf_counter seconds)."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)


current_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "quiver_current_request", default=None
)

# Attributes every LogRecord has; anything else on a record came in through `extra=` (uvicorn's
# `color_message` is its message again, with terminal colours).
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "color_message"}


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record (`None` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            context = current_request.get()
            record.request_id = context.request_id if context is not None else None
        return True


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "request_id", ...extra fields, "exc_info"?}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> logging.Handler:
    """Send every logger (uvicorn's included) to one handler on `stream` (stderr) in `fmt`."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # uvicorn's loggers would otherwise keep handlers of their own and print twice, unstructured.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler
