"""What one stream may hold: a slow reader gets merged deltas (never a growing queue), one too far
behind is cut off with an error event, and a stream's headers never wait for its own last choices."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import pytest

import server.openai.pipeline
from engine.outputs import RequestDelta, TokenLogprob
from engine.sampling_params import SamplingParams
from server.app import create_app
from server.http.errors import APIError
from server.openai.generation import ChoiceRequest, MergedGeneration
from server.state import ServerState
from tests.eventually import eventually
from tests.server.conftest import MODEL_NAME, LiveServer, engine_config

CHAT = "/v1/chat/completions"
MAX_NUM_SEQS = 2
# Greedy, and long enough that a choice runs for a good while on the tiny model.
STREAM = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "ignore_eos": True,
          "stream": True}


@pytest.fixture(scope="module")
def live(server_model_dir: Path) -> Iterator[LiveServer]:
    from engine.async_engine import AsyncEngine

    engine = AsyncEngine(engine_config(server_model_dir, max_model_len=512, max_num_seqs=MAX_NUM_SEQS),
                         served_model_name=MODEL_NAME)
    server = LiveServer(create_app(ServerState(engine)))
    # Small kernel buffers (accepted sockets inherit them), so that a client that stops reading
    # pushes back on the server after a few KB instead of after megabytes of autotuned buffer.
    server._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    yield server.start()
    server.stop()


def _idle(live: LiveServer) -> bool:
    stats = live.engine.stats()
    return stats["num_requests"] == 0 and stats["num_streams"] == 0


def _started_then_ended(live: LiveServer, what: str) -> None:
    eventually(lambda: live.engine.stats()["num_streams"] > 0, 10, "the stream's requests started")
    eventually(lambda: _idle(live), 30, what)


class _RawStream:
    """A streamed POST over a plain socket whose reader can stop reading (a tiny receive buffer)."""

    def __init__(self, live: LiveServer, body: dict[str, Any]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", live.port))
        self.sock.settimeout(30)
        self.http = h11.Connection(h11.CLIENT)
        payload = json.dumps(body).encode()
        headers = [("host", "127.0.0.1"), ("content-type", "application/json"), ("content-length", str(len(payload)))]
        self.sock.sendall(self.http.send(h11.Request(method="POST", target=CHAT, headers=headers))
                          + self.http.send(h11.Data(data=payload)) + self.http.send(h11.EndOfMessage()))

    def _next(self) -> Any:
        while True:
            event = self.http.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.http.receive_data(self.sock.recv(65536))

    def status(self) -> int:
        event = self._next()
        assert isinstance(event, h11.Response), event
        return event.status_code

    def events(self) -> list[Any]:
        """Every `data:` payload to the end of the stream ("[DONE]" kept as is)."""
        raw = b""
        while not isinstance(event := self._next(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                raw += event.data
        self.sock.close()
        payloads = [line[len(b"data:"):].strip() for line in raw.split(b"\r\n") if line.startswith(b"data:")]
        return [p.decode() if p == b"[DONE]" else json.loads(p) for p in payloads]


def _content_by_choice(events: list[Any]) -> tuple[dict[int, str], dict[int, int], dict[int, int]]:
    """Per choice: the joined text, the number of logprob entries and of events with content."""
    texts: dict[int, str] = {}
    logprobs: dict[int, int] = {}
    content_events: dict[int, int] = {}
    for event in events:
        if event == "[DONE]":
            continue
        assert "error" not in event, event
        for choice in event["choices"]:
            i, content = choice["index"], choice["delta"].get("content")
            texts[i] = texts.get(i, "") + (content or "")
            logprobs[i] = logprobs.get(i, 0) + len((choice.get("logprobs") or {}).get("content") or [])
            content_events[i] = content_events.get(i, 0) + bool(content)
    return texts, logprobs, content_events


def test_a_stream_with_more_choices_than_max_num_seqs_sends_its_headers_at_once(live: LiveServer) -> None:
    body = {**STREAM, "n": 2 * MAX_NUM_SEQS, "max_tokens": 480}
    with live.http() as http, http.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        # The headers and the first chunk are here while the first choices are far from done: the
        # last ones, which wait for a free sequence, have not started.
        assert live.engine.stats()["num_streams"] == 2 * MAX_NUM_SEQS, live.engine.stats()
        assert json.loads(first[len("data:"):])["choices"][0]["delta"]["role"] == "assistant"
    eventually(lambda: _idle(live), 5, "the stream's requests aborted when the client left")


def test_a_stalled_reader_gets_merged_deltas_with_the_same_text(live: LiveServer) -> None:
    n, max_tokens = 4, 200
    with live.http() as http:
        unstreamed = http.post(CHAT, json={**STREAM, "stream": False, "max_tokens": max_tokens}).json()
    expected = unstreamed["choices"][0]["message"]["content"]

    stream = _RawStream(live, {**STREAM, "n": n, "max_tokens": max_tokens, "logprobs": True, "top_logprobs": 20})
    # Nothing read: every choice runs to its end all the same (the engine never waits on a client).
    _started_then_ended(live, "the engine finished the stalled stream's choices")
    assert stream.status() == 200
    texts, logprobs, content_events = _content_by_choice(stream.events())
    assert texts == dict.fromkeys(range(n), expected)
    assert logprobs == dict.fromkeys(range(n), max_tokens)
    # What waited for the reader went out merged: far fewer events than tokens.
    assert sum(content_events.values()) < n * max_tokens / 4, content_events


def test_a_reader_too_far_behind_is_cut_off_and_its_requests_aborted(live: LiveServer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.openai.pipeline, "MAX_UNREAD_ENTRIES", 2000)
    n, max_tokens = 4, 480
    stream = _RawStream(live, {**STREAM, "n": n, "max_tokens": max_tokens, "logprobs": True, "top_logprobs": 20})
    begun = time.monotonic()
    _started_then_ended(live, "the stalled stream's requests ended")
    stopped_after = time.monotonic() - begun
    assert stream.status() == 200
    events = stream.events()
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "stream_backlog_exceeded" and "2000" in error["message"], error
    _, logprobs, _ = _content_by_choice(events[:-2])
    # Aborted, not finished: a small part of what was asked for was ever generated or sent.
    assert sum(logprobs.values()) < n * max_tokens / 4, (logprobs, stopped_after)
    stats = live.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"], stats


class _Producer:
    """An engine that produces every choice's tokens at once, whoever reads them."""

    def __init__(self, tokens: int, top: int) -> None:
        self.tokens, self.top = tokens, top
        self.produced = 0
        self.aborted: list[str] = []

    async def generate(self, request_id: str, *args: Any, **kwargs: Any) -> Any:
        for i in range(self.tokens):
            await asyncio.sleep(0)
            self.produced += 1
            logprob = TokenLogprob(i, -1.0, [(t, -2.0) for t in range(self.top)])
            yield RequestDelta(request_id, [i], f"<{i}>", [logprob],
                               finish_reason="length" if i == self.tokens - 1 else None)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _choices(n: int) -> list[ChoiceRequest]:
    return [ChoiceRequest(i, f"req-{i}", [1], SamplingParams(max_tokens=8)) for i in range(n)]


def test_what_a_reader_has_not_taken_is_one_merged_delta_per_choice() -> None:
    async def run() -> None:
        engine = _Producer(tokens=300, top=20)
        gen = MergedGeneration(engine, _choices(4))
        gen.start()
        await gen.first_deltas()
        while engine.produced < 4 * 300:
            await asyncio.sleep(0.001)
        assert gen.unread_entries == 4 * 300 * 21
        merged = [item async for item in gen]
        await gen.aclose()
        assert sorted(index for index, _ in merged) == [0, 1, 2, 3]
        for _, delta in merged:
            assert delta.token_ids == list(range(300)) and delta.finish_reason == "length"
            assert delta.text == "".join(f"<{i}>" for i in range(300)) and len(delta.logprobs) == 300
        assert gen.unread_entries == 0

    asyncio.run(run())


def test_past_its_cap_a_generation_fails_and_aborts_every_choice_at_once() -> None:
    async def run() -> None:
        engine = _Producer(tokens=300, top=20)
        gen = MergedGeneration(engine, _choices(4), max_unread=1000)
        gen.start()
        await gen.first_deltas()
        while len(engine.aborted) < 4:
            await asyncio.sleep(0.001)
        assert gen.unread_entries == 0 and engine.produced < 4 * 300
        with pytest.raises(APIError, match="too slowly") as failure:
            [item async for item in gen]
        assert failure.value.code == "stream_backlog_exceeded"
        await gen.aclose()

    asyncio.run(run())
