"""The engine as the routes call it: the limits that need the tokenized request, then the engine's
`generate`, with per-request metrics observed around it.

Every route reaches the engine through `MergedGeneration` (server.openai.generation), which
the pipeline hands a `MeteredEngine` instead of the engine itself: every generation is limited
and counted however the request was shaped (chat, legacy completions, n choices, SeekrFlow), and
the engine object is never patched.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import AsyncIterator
from typing import Any

from engine.errors import (
    AdapterFailedError,
    AdapterUnavailableError,
    EngineOverloadedError,
    RequestTooLongError,
    UnknownAdapterError,
)
from engine.outputs import RequestDelta
from engine.sampling_params import SamplingParams
from server.http.errors import APIError
from server.http.logging import current_request
from server.http.metrics import Metrics
from server.limits import Limits


def _outcome_of(exc: BaseException) -> str:
    if isinstance(exc, EngineOverloadedError | AdapterUnavailableError):
        return "rejected"
    if isinstance(exc, APIError):
        return "rejected" if exc.status == 429 else "invalid" if exc.status < 500 else "error"
    if isinstance(exc, RequestTooLongError | UnknownAdapterError | AdapterFailedError | ValueError):
        return "invalid"
    if isinstance(exc, Exception):
        return "error"
    return "cancelled"  # CancelledError or GeneratorExit: the caller went away


class MeteredEngine:
    """`generate` and `abort` of `engine`: limits first (they refuse before the engine sees the
    request), then the engine's stream, metrics observed on it (`metrics` None: none)."""

    def __init__(self, engine: Any, limits: Limits, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.limits = limits
        self.metrics = metrics

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 adapter: str | None = None, **options: Any) -> AsyncIterator[RequestDelta]:
        label = adapter or self.engine.model_name
        return self._generate(label, request_id, prompt_token_ids, params, adapter, options)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def _limit(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        self.limits.check_prompt(len(prompt_token_ids))
        # An explicit max_tokens over the ceiling was refused with the body (MaxTokensCeiling), so
        # this is the default budget (the rest of the context): cap it.
        max_tokens = self.limits.capped(params.max_tokens)
        return params if max_tokens == params.max_tokens else dataclasses.replace(params, max_tokens=max_tokens)

    async def _generate(self, adapter_name: str, request_id: str, prompt_token_ids: list[int],
                        params: SamplingParams, adapter: str | None, options: dict[str, Any],
                        ) -> AsyncIterator[RequestDelta]:
        metrics = self.metrics
        context = current_request.get()
        started = context.started if context is not None else time.perf_counter()
        label = metrics.adapter_label(adapter_name) if metrics is not None else ""
        outcome = "cancelled"
        inter_token: Any = None  # the histogram child, looked up once per request
        last = started
        generated = 0
        finished = False
        stream: Any = None
        try:
            params = self._limit(prompt_token_ids, params)
            stream = self.engine.generate(request_id, prompt_token_ids, params, adapter=adapter, **options)
            if inspect.isawaitable(stream):
                stream = await stream
            async for delta in stream:
                now = time.perf_counter()
                generated += len(delta.token_ids)
                if metrics is not None:
                    if inter_token is None:
                        inter_token = metrics.inter_token_latency.labels(label)
                        metrics.time_to_first_token.labels(label).observe(now - started)
                        metrics.prompt_tokens.labels(label).inc(len(prompt_token_ids))
                        queued = getattr(delta, "queue_time", None)
                        if queued is not None:
                            metrics.queue_time.labels(label).observe(queued)
                    else:
                        inter_token.observe(now - last)
                last = now
                if delta.finished:
                    finished = True
                    outcome = {"stop": "stop", "length": "length", "abort": "aborted"}.get(
                        delta.finish_reason or "", "error")
                yield delta
                if finished:
                    return
        except BaseException as exc:
            if not finished:  # closing the stream after its last delta is no failure
                outcome = _outcome_of(exc)
            raise
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            if metrics is not None:
                metrics.requests.labels(label, outcome).inc()
                if generated:
                    metrics.generation_tokens.labels(label).inc(generated)
                if outcome in ("stop", "length"):
                    metrics.e2e_latency.labels(label).observe(last - started)
