"""SIGTERM on a real `quiver serve` process: refuse new connections, finish the streams in flight, exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.eventually import eventually
from tests.server.helpers import refuses_connections, wait_until_serving

REPO = Path(__file__).resolve().parents[2]
TOKENS = 800  # about a second of decoding on CPU: the stream is still running when the signal lands
CUT_TOKENS = 2000  # seconds of decoding: far past the 1 s shutdown timeout the cut test sets


@pytest.fixture(scope="module")
def long_context_model(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama", max_position_embeddings=2048)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m server serve` on a free port, its log in a file."""

    def __init__(self, model_dir: Path, log_path: Path, *flags: str) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUIVER_")}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--device", "cpu", "--max-model-len", "2048", "--log-format", "json", *flags],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        wait_until_serving(self.base_url, self.process, log=self.log)

    def log(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


@pytest.fixture
def start(long_context_model: Path, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(*flags: str) -> Server:
        servers.append(Server(long_context_model, tmp_path / f"server-{len(servers)}.log", *flags))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _stream_body(tokens: int = TOKENS) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hello", "max_tokens": tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


def _payloads(lines: Iterator[str]) -> Iterator[str]:
    return (line[len("data:"):].strip() for line in lines if line.startswith("data:"))


def test_sigterm_lets_the_stream_in_flight_finish_and_exits_zero(start: Callable[..., Server]) -> None:
    server = start("--shutdown-timeout", "60", "--served-model-name", "tiny")
    with httpx.Client(base_url=server.base_url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=_stream_body()) as stream:
        assert stream.status_code == 200
        payloads = _payloads(stream.iter_lines())
        first = json.loads(next(payloads))
        server.process.send_signal(signal.SIGTERM)
        eventually(lambda: refuses_connections(server.port), 5, "the listening socket closed after SIGTERM")
        assert server.process.poll() is None, "the server exited with a stream in flight"
        rest = list(payloads)
    assert rest[-1] == "[DONE]"
    chunks = [first, *(json.loads(p) for p in rest[:-1])]
    assert chunks[-1]["usage"]["completion_tokens"] == TOKENS
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert server.process.wait(30) == 0
    lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]  # every line is JSON
    messages = [line["message"] for line in lines]
    assert any("Waiting for connections to close" in m for m in messages), messages
    [access] = [line for line in lines if line["logger"] == "quiver.access" and line["path"] == "/v1/completions"]
    assert access["status"] == 200 and access["request_id"]


def test_streams_past_the_shutdown_timeout_are_cut_and_the_exit_is_still_zero(start: Callable[..., Server]) -> None:
    server = start("--shutdown-timeout", "1", "--served-model-name", "tiny")
    with httpx.Client(base_url=server.base_url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=_stream_body(CUT_TOKENS)) as stream:
        payloads = _payloads(stream.iter_lines())
        next(payloads)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        received: list[str] = []
        with pytest.raises(httpx.HTTPError):  # the connection closes mid-stream
            received.extend(payloads)
    assert "[DONE]" not in received
    assert server.process.wait(30) == 0
    assert time.monotonic() - signalled < 15
