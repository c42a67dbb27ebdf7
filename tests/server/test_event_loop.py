"""A large request never stalls the event loop: `/health` answers in time while one is in flight.

Each probe is sent over and over by one client while another times `/health`; before the
request was bounded and its decoding, templating and tokenizing moved off the loop, every one
of them held the loop for seconds.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.state import ServerState
from tests.server.conftest import MODEL_NAME, LiveServer, engine_config

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HEALTH_P99_S = 0.1


@pytest.fixture(scope="module")
def live(server_model_dir: Path) -> Iterator[LiveServer]:
    from engine.async_engine import AsyncEngine

    engine = AsyncEngine(engine_config(server_model_dir), served_model_name=MODEL_NAME)
    server = LiveServer(create_app(ServerState(engine)))
    # As uvicorn's own listening socket: without it every answer waits ~40 ms on the client's delayed
    # ACK (Nagle), which is the test server's, not the event loop's.
    server._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    yield server.start()
    server.stop()


def _refused(response: httpx.Response, code: str, param: str | None = None) -> None:
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


# The clients run in their own processes, so that the server's process (and its GIL) is as in
# production: what /health waits for is the server, not a client building a 10 MB body.
_PROBE = """
import sys, httpx
url, path, body_file, code = sys.argv[1:]
body = open(body_file, "rb").read()
with httpx.Client(base_url=url, timeout=60) as http:
    while True:
        answer = http.post(path, content=body, headers={"content-type": "application/json"})
        if answer.status_code != 400 or answer.json()["error"]["code"] != code:
            sys.exit(f"unexpected answer {answer.status_code}: {answer.text[:300]}")
        print("refused", flush=True)
"""
_HEALTH = """
import json, sys, time, httpx
url, samples = sys.argv[1], int(sys.argv[2])
latencies = []
with httpx.Client(base_url=url, timeout=60) as http:
    while len(latencies) < samples:
        begun = time.perf_counter()
        assert http.get("/health").status_code == 200
        latencies.append(time.perf_counter() - begun)
        time.sleep(0.005)
print(json.dumps(latencies))
"""


def _health_latencies_during(live: LiveServer, path: str, body: bytes, code: str, tmp_path: Path,
                             samples: int = 100, timeout: float = 60.0) -> list[float]:
    """`/health` latencies, taken while `body` is posted to `path` again and again (each refused with `code`)."""
    body_file = tmp_path / "body.json"
    body_file.write_bytes(body)
    probe = subprocess.Popen([sys.executable, "-c", _PROBE, live.base_url, path, str(body_file), code],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert probe.stdout is not None
        first = probe.stdout.readline()  # one probe done: the next are in flight from here on
        assert first == "refused\n", (first, probe.stderr.read() if probe.stderr else "")
        health = subprocess.run([sys.executable, "-c", _HEALTH, live.base_url, str(samples)],
                                capture_output=True, text=True, timeout=timeout, check=True)
        assert probe.poll() is None, probe.stderr.read() if probe.stderr else ""
    finally:
        probe.terminate()
        probe.wait(timeout)
    return json.loads(health.stdout)


TEN_MB_MESSAGE = json.dumps({"model": MODEL_NAME, "max_tokens": 1,
                             "messages": [{"role": "user", "content": "hello world " * 850_000}]}).encode()
MANY_MESSAGES = json.dumps({"model": MODEL_NAME, "max_tokens": 1,
                            "messages": [{"role": "user", "content": "hi"}] * 100_000}).encode()
MANY_PROMPTS = json.dumps({"model": MODEL_NAME, "max_tokens": 1, "n": 128, "prompt": [[1]] * 3000}).encode()
# Within the 16 MiB body limit, and seconds of the C JSON decoder: four million small arrays.
MANY_VALUES = b'{"model": "' + MODEL_NAME.encode() + b'", "prompt": [' + b",".join([b"[1]"] * (4 * 2**20 - 16)) + b"]}"


@pytest.mark.parametrize(("name", "path", "body", "code"), [
    ("a 10 MB chat message", CHAT, TEN_MB_MESSAGE, "context_length_exceeded"),
    ("100,000 chat messages", CHAT, MANY_MESSAGES, "request_too_large"),
    ("3000 prompts with n=128", COMPLETIONS, MANY_PROMPTS, "too_many_choices"),
    ("16 MB of small JSON arrays", COMPLETIONS, MANY_VALUES, "request_too_large"),
])
def test_health_answers_in_time_while_a_large_request_is_in_flight(live: LiveServer, tmp_path: Path, name: str,
                                                                     path: str, body: bytes, code: str) -> None:
    assert len(body) < 16 * 2**20  # within the server's default body limit
    latencies = _health_latencies_during(live, path, body, code, tmp_path)
    assert _p99(latencies) < HEALTH_P99_S, (name, _p99(latencies), max(latencies), len(latencies))


def test_more_messages_than_openai_takes_are_refused_untemplated(live: LiveServer) -> None:
    body = {"model": MODEL_NAME, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}] * 2049}
    with live.http() as http:
        _refused(http.post(CHAT, json=body), "invalid_value", "messages")
        body["messages"] = body["messages"][:2048]
        _refused(http.post(CHAT, json=body), "context_length_exceeded", "messages")  # templated: too long
