"""Small helpers the server tests share: raw SSE reading and stream reassembly."""

from __future__ import annotations

import json
from typing import Any

import httpx

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
