"""Small helpers the server tests share: raw SSE reading, stream reassembly, and waiting for a
`quiver serve` child process to serve."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable
from typing import Any

import httpx

from tests.eventually import eventually

MESSAGES = [{"role": "user", "content": "Hello world! Tell me about the quick brown fox."}]


def sse_events(client: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    """POST `body` with stream=true and return the decoded `data:` payloads ("[DONE]" kept as is)."""
    events: list[Any] = []
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def joined_stream(chunks: list[Any]) -> dict[int, str]:
    """Per choice index, the streamed content joined (openai client chunk objects)."""
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts


def logprob_bytes(entries: list[Any]) -> bytes:
    return b"".join(bytes(entry.bytes) for entry in entries)


def wait_until_serving(base_url: str, process: subprocess.Popen, timeout: float = 60.0,
                       log: Callable[[], str] = lambda: "") -> str:
    """`base_url` once its /ready answers 200; fails at once, with `log()`, if `process` exits first."""

    def ready() -> bool:
        assert process.poll() is None, f"the server exited before it was ready:\n{log()}"
        try:
            return httpx.get(f"{base_url}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    eventually(ready, timeout, f"{base_url}/ready answers 200", interval=0.1)
    return base_url


def refuses_connections(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:`port` any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False
