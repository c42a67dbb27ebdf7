"""Structured logs: JSON lines, the request id on every line of a request, echoed in x-request-id."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from server.app import create_app
from server.http.logging import (
    JsonFormatter,
    RequestContext,
    RequestIdFilter,
    configure_logging,
    current_request,
)
from server.state import ServerState


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The root logger sent to a string buffer as JSON, restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def _work(request: Request) -> JSONResponse:
    async def in_a_task() -> None:  # a task the request starts keeps its id
        logging.getLogger("quiver.test").warning("from a task", extra={"step": 2})

    logging.getLogger("quiver.test").info("working on %s", "it", extra={"step": 1})
    await asyncio.create_task(in_a_task())
    return JSONResponse({"ok": True})


def _app() -> Any:
    def never_loads() -> Any:
        raise AssertionError("not called")

    return create_app(ServerState(engine_factory=never_loads), extra_routes=[Route("/work", _work)])


def _get(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(run())


def test_every_line_of_a_request_carries_its_id(log_stream: io.StringIO) -> None:
    response = _get(_app(), "/work")
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    lines = _lines(log_stream)
    work = [line for line in lines if line["logger"] == "quiver.test"]
    assert [(line["message"], line["step"], line["request_id"]) for line in work] == [
        ("working on it", 1, request_id), ("from a task", 2, request_id)]
    assert work[1]["level"] == "warning" and work[0]["ts"].endswith("Z")
    [access] = [line for line in lines if line["logger"] == "quiver.access"]
    assert access["request_id"] == request_id and access["status"] == 200 and access["path"] == "/work"
    assert access["method"] == "GET" and access["duration_ms"] >= 0 and access["level"] == "info"


@pytest.mark.parametrize(("sent", "kept"), [("abc-123.def:ghi_J", True), ("x" * 128, True), ("x" * 129, False),
                                            ("has space", False), ("-leading-dash", False), ("semi;colon", False)])
def test_a_sane_client_request_id_is_kept(log_stream: io.StringIO, sent: str, kept: bool) -> None:
    response = _get(_app(), "/health", headers={"x-request-id": sent})
    echoed = response.headers["x-request-id"]
    assert (echoed == sent) is kept
    if not kept:
        assert len(echoed) == 32
    [access] = [line for line in _lines(log_stream) if line["logger"] == "quiver.access"]
    assert access["request_id"] == echoed and access["level"] == "debug"  # probes log quietly


def test_errors_keep_their_id_and_traceback(log_stream: io.StringIO) -> None:
    token = current_request.set(RequestContext("req-7"))
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("quiver.test").exception("it failed")
    finally:
        current_request.reset(token)
    logging.getLogger("quiver.test").info("outside")
    failed, outside = _lines(log_stream)
    assert failed["request_id"] == "req-7" and "RuntimeError: boom" in failed["exc_info"]
    assert failed["level"] == "error" and outside["request_id"] is None


def test_text_format_shows_the_id() -> None:
    handler = logging.StreamHandler(io.StringIO())
    record = logging.LogRecord("quiver.test", logging.INFO, __file__, 1, "hello", None, None)
    token = current_request.set(RequestContext("req-9"))
    try:
        RequestIdFilter().filter(record)
    finally:
        current_request.reset(token)
    assert json.loads(JsonFormatter().format(record))["request_id"] == "req-9"
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        stream = io.StringIO()
        handler = configure_logging("info", "text", stream=stream)
        logging.getLogger("quiver.test").info("plain")
        assert "[None] plain" in stream.getvalue() and "INFO quiver.test" in stream.getvalue()
    finally:
        root.removeHandler(handler)
        for old in saved[0]:
            root.addHandler(old)
        root.setLevel(saved[1])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud", "json")
