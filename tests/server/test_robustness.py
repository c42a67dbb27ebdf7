"""Disconnects abort at once and leak nothing; concurrency does not change greedy answers."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import openai
import pytest

from tests.eventually import eventually
from tests.server.conftest import ADAPTER_NAMES, MODEL_NAME
from tests.server.helpers import MESSAGES

CHAT = "/v1/chat/completions"
LONG = {"messages": MESSAGES, "max_tokens": 200, "ignore_eos": True, "temperature": 0}


def _wait_idle(live, timeout: float = 5.0) -> dict:
    """Stats once the engine holds no request; fails if that takes longer than `timeout`."""
    def idle() -> dict | None:
        stats = live.engine.stats()
        return stats if stats["num_requests"] == 0 and stats["num_streams"] == 0 else None

    return eventually(idle, timeout, "the engine holds no request")


def _assert_nothing_leaked(live) -> None:
    """Every KV block and adapter reference comes back. A request's adapter reference is released on
    the engine thread after its stream ends, and `stats()` is the snapshot of the last step: the
    counts settle shortly after the engine is idle, not at the same moment."""
    _wait_idle(live)

    def released() -> bool:
        stats = live.engine.stats()
        return (stats["num_free_blocks"] == stats["num_total_blocks"] and stats["adapter_refcount_total"] == 0
                and all(count == 0 for count in live.engine.adapter_refcounts().values()))

    began = live.engine.stats()
    eventually(released, 5, f"every KV block and adapter reference released (stats when the wait began: {began})")


@pytest.fixture(scope="module")
def roomy(start_server):
    """A server whose context fits a request long enough to still run when the client leaves."""
    return start_server(max_model_len=512)


def test_closing_a_stream_aborts_its_request_at_once(roomy):
    live = roomy
    body = {"model": ADAPTER_NAMES[0], "stream": True, **LONG, "max_tokens": 400}
    with live.http() as http, http.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data:")
            if seen == 3:
                break
        assert live.engine.stats()["num_requests"] == 1, (live.engine.stats(), seen)
        closed_at = time.monotonic()
    _wait_idle(live, timeout=1.0)
    assert time.monotonic() - closed_at < 1.0
    _assert_nothing_leaked(live)


def test_a_client_leaving_an_unstreamed_request_aborts_it(live):
    body = {"model": MODEL_NAME, **LONG}
    with live.http() as http:
        begun = time.monotonic()
        assert http.post(CHAT, json=body).json()["usage"]["completion_tokens"] == LONG["max_tokens"]
        full = time.monotonic() - begun
        begun = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            http.post(CHAT, json=body, timeout=full / 5)
    _wait_idle(live, timeout=full)
    assert time.monotonic() - begun < full * 0.7, "the request ran to its end instead of being aborted"
    _assert_nothing_leaked(live)


async def _cancelled_stream(client: httpx.AsyncClient, i: int) -> None:
    model = MODEL_NAME if i % 9 == 8 else ADAPTER_NAMES[i % 9 % len(ADAPTER_NAMES)]
    body = {"model": model, "stream": True, **LONG}
    if i % 4 == 3:
        # Gone before the first token: the request may still be queued.
        with contextlib.suppress(httpx.TimeoutException):
            async with client.stream("POST", CHAT, json=body, timeout=0.001 * (i % 7)):
                pass
        return
    async with client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        seen = 0
        async for line in response.aiter_lines():
            seen += line.startswith("data:")
            if seen >= 1 + i % 3:
                break


def test_200_cancelled_streams_then_a_healthy_answer(live):
    async def run() -> None:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=live.base_url, timeout=10.0, limits=limits) as client:
            gate = asyncio.Semaphore(24)

            async def one(i: int) -> None:
                async with gate:
                    await _cancelled_stream(client, i)

            await asyncio.gather(*(one(i) for i in range(200)))

    asyncio.run(run())
    begun = time.monotonic()
    answer = live.client(timeout=5.0).chat.completions.create(model=ADAPTER_NAMES[3], messages=MESSAGES,
                                                              max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - begun < 5.0
    _assert_nothing_leaked(live)


def test_64_concurrent_streams_over_8_adapters_and_base_match_each_alone(live):
    models = [MODEL_NAME, *ADAPTER_NAMES]
    prompts = ["Hello world!", "Un café au lait", "def add(a, b):", "中文测试"]
    jobs = [(models[i % len(models)], prompts[(i // len(models)) % len(prompts)]) for i in range(64)]

    async def stream_one(client: openai.AsyncOpenAI, model: str, prompt: str) -> str:
        chunks = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def run(batch: list[tuple[str, str]], concurrent: bool) -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{live.base_url}/v1", api_key="x", max_retries=0, timeout=30.0,
                                    http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=80)))
        async with client:
            if concurrent:
                return list(await asyncio.gather(*(stream_one(client, m, p) for m, p in batch)))
            return [await stream_one(client, m, p) for m, p in batch]

    together = asyncio.run(run(jobs, concurrent=True))
    distinct = sorted(set(jobs))
    alone = dict(zip(distinct, asyncio.run(run(distinct, concurrent=False)), strict=True))
    assert together == [alone[job] for job in jobs]
    # The adapters really are different models.
    assert len({alone[(m, prompts[0])] for m in models}) > len(models) // 2
    _assert_nothing_leaked(live)
