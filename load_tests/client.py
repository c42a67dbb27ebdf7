"""The async driver: sends a planned workload through the openai client, one record per request.

Open loop: each request leaves at its planned time whether or not earlier ones finished (that
is what an arrival process means; a closed loop would hide queueing). Every request streams,
so the record holds the time of each content chunk: TTFT is the first chunk with text (or the
final chunk, for an answer whose tokens never formed a whole character), ITL the gaps between
chunks, TPOT (latency - TTFT) / (output tokens - 1), as in vLLM's bench client. The server sends
no chunk for a token that completes no character, so chunks can be fewer than tokens.
Runs are bounded: at `deadline_s` requests not yet sent are dropped and those in flight are
cancelled (the client disconnects, the server aborts them) and recorded as such.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
from tqdm.auto import tqdm

from load_tests.workload import PlannedRequest

ENDPOINTS = ("completions", "chat")
# Words for chat prompts: common enough that each is about one token in any BPE vocabulary.
_WORDS = ("the", "a", "of", "and", "to", "in", "is", "it", "on", "for", "with", "as", "at", "by", "we")


def check_loopback(base_url: str) -> str:
    """`base_url` without a trailing slash; refuses any host that is not on this machine."""
    host = urlsplit(base_url).hostname or ""
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"load tests only target this machine (127.0.0.1, ::1, localhost); got {base_url!r}")
    return base_url.rstrip("/")


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds since the run started."""

    index: int
    model: str
    adapter: str | None
    planned_prompt_len: int
    planned_output_len: int
    scheduled: float
    sent: float | None = None
    first_token: float | None = None
    done: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    text: str = ""
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    status_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None and self.done is not None

    @property
    def ttft(self) -> float | None:
        if self.sent is None or self.first_token is None:
            return None
        return self.first_token - self.sent

    @property
    def latency(self) -> float | None:
        if self.sent is None or self.done is None:
            return None
        return self.done - self.sent

    @property
    def num_output_tokens(self) -> int:
        return self.output_tokens if self.output_tokens is not None else len(self.chunk_times)

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.num_output_tokens < 2:
            return None
        return (self.done - self.first_token) / (self.num_output_tokens - 1)  # type: ignore[operator]

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


@dataclass(frozen=True)
class DriverConfig:
    base_url: str
    api_key: str = "none"
    endpoint: str = "completions"
    timeout_s: float = 600.0
    temperature: float = 0.0
    ignore_eos: bool = True
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        check_loopback(self.base_url)
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}")


def make_client(config: DriverConfig) -> openai.AsyncOpenAI:
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    return openai.AsyncOpenAI(
        base_url=check_loopback(config.base_url) + "/v1", api_key=config.api_key, max_retries=0,
        timeout=httpx.Timeout(config.timeout_s, connect=10.0),
        http_client=httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(config.timeout_s, connect=10.0)),
    )


def chat_prompt(token_ids: Sequence[int]) -> str:
    """A text prompt of about len(token_ids) tokens, varied by the ids (no shared prefixes)."""
    return " ".join(_WORDS[t % len(_WORDS)] for t in token_ids)


def classify_error(exc: BaseException) -> tuple[str, int | None]:
    """(error type, HTTP status) for the errors-by-type table."""
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}", exc.status_code
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None
    if isinstance(exc, openai.APIError):  # an error event inside a stream that had started
        return "stream_error", None
    return type(exc).__name__, None


async def send_one(client: openai.AsyncOpenAI, config: DriverConfig, req: PlannedRequest,
                   record: RequestRecord, clock: Callable[[], float]) -> RequestRecord:
    """Send `req` streamed and fill `record` (never raises but for cancellation)."""
    common: dict[str, Any] = dict(model=record.model, temperature=config.temperature, stream=True,
                                  stream_options={"include_usage": True},
                                  extra_body={"ignore_eos": config.ignore_eos})
    record.sent = clock()
    stream: Any = None
    try:
        if config.endpoint == "chat":
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": chat_prompt(req.prompt_token_ids)}],
                max_completion_tokens=req.output_len, **common)
        else:
            stream = await client.completions.create(
                prompt=list(req.prompt_token_ids), max_tokens=req.output_len, **common)
        parts: list[str] = []
        async for chunk in stream:
            now = clock()
            if chunk.usage is not None:
                record.prompt_tokens = chunk.usage.prompt_tokens
                record.output_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text = choice.delta.content if config.endpoint == "chat" else choice.text
                if text:
                    if record.first_token is None:
                        record.first_token = now
                    record.chunk_times.append(now)
                    parts.append(text)
                if choice.finish_reason is not None:
                    record.finish_reason = choice.finish_reason
                    if record.first_token is None:  # every token was a partial character: no text until now
                        record.first_token = now
        record.text = "".join(parts)
        record.done = clock()
    except asyncio.CancelledError:
        record.error_type = "cancelled_at_deadline"
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is data for the report
        record.error_type, record.status_code = classify_error(exc)
        record.error_message = str(exc)[:300]
    finally:
        if stream is not None:
            await stream.close()
    return record


async def run_workload(
    plan: Sequence[PlannedRequest],
    config: DriverConfig,
    model_of: Callable[[int | None], str],
    *,
    deadline_s: float,
    progress: bool = False,
    label: str = "load",
) -> list[RequestRecord]:
    """Send `plan` open-loop; return one record per planned request, in plan order.

    model_of maps a planned adapter index (None for the base) to the `model` field.
    """
    if not deadline_s > 0:
        raise ValueError(f"deadline_s must be positive, got {deadline_s}")
    records = [RequestRecord(r.index, model_of(r.adapter), None if r.adapter is None else model_of(r.adapter),
                             r.prompt_len, r.output_len, r.send_at) for r in plan]
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start  # noqa: E731
    gate = asyncio.Semaphore(config.max_in_flight) if config.max_in_flight else None
    bar = tqdm(total=len(plan), desc=label, unit="req", disable=not progress, leave=False)
    client = make_client(config)

    async def one(req: PlannedRequest, record: RequestRecord) -> None:
        if gate is None:
            await send_one(client, config, req, record, clock)
        else:
            async with gate:
                await send_one(client, config, req, record, clock)
        bar.update(1)
        if record.error_type is not None:
            bar.set_postfix(errors=sum(r.error_type is not None for r in records), refresh=False)

    tasks: list[asyncio.Task[None]] = []
    try:
        for req, record in zip(plan, records, strict=True):
            if req.send_at >= deadline_s:
                record.error_type = "not_sent_deadline"
                continue
            delay = req.send_at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req, record)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline_s - clock()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        await client.close()
    return records


def run_duration(records: Sequence[RequestRecord]) -> float:
    """From the first send to the last completion (or the last send when nothing completed)."""
    sent = [r.sent for r in records if r.sent is not None]
    if not sent:
        return 0.0
    ends = [r.done for r in records if r.done is not None] + sent
    return max(ends) - min(sent) or math.ulp(1.0)
