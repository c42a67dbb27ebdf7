"""MeteredEngine (server/openai/metered.py): the server's limits refuse a request before the engine sees
it, an omitted max_tokens is capped to the ceiling, and every generation is counted by adapter and
outcome however it ends, with the engine itself never patched."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import generate_latest

from engine.errors import EngineOverloadedError
from engine.sampling_params import SamplingParams
from server.http.errors import APIError
from server.http.metrics import OTHER, Metrics
from server.limits import Limits
from server.openai.metered import MeteredEngine
from tests.server.fake_engine import MODEL_NAME, FakeEngine
from tests.server.test_metrics import parse, series, value


def _drive(metered: MeteredEngine, adapter: str | None = None, *, stop_after: int | None = None,
           prompt: list[int] | None = None, **params: Any) -> list[Any]:
    """The deltas of one generation, read until it ends (or `stop_after` of them, then closed)."""

    async def run() -> list[Any]:
        stream = metered.generate("r", prompt or [1, 2, 3], SamplingParams(**{"max_tokens": 5, **params}),
                                  adapter=adapter)
        seen = []
        try:
            async for delta in stream:
                seen.append(delta)
                if len(seen) == stop_after:
                    break
        finally:
            await stream.aclose()
        return seen

    return asyncio.run(run())


def _samples(metrics: Metrics) -> Any:
    return parse(generate_latest(metrics.registry).decode())


def test_a_prompt_over_the_limit_never_reaches_the_engine() -> None:
    engine = FakeEngine()
    metered = MeteredEngine(engine, Limits(max_prompt_tokens=2), Metrics())
    with pytest.raises(APIError) as refused:
        _drive(metered, prompt=[1, 2, 3])
    assert refused.value.code == "prompt_too_long" and engine.requests == []
    assert len(_drive(metered, prompt=[1, 2], ignore_eos=True)) == 5 and len(engine.requests) == 1


def test_the_budget_is_capped_to_the_ceiling_and_left_alone_under_it() -> None:
    engine = FakeEngine()
    metered = MeteredEngine(engine, Limits(max_tokens=4))
    assert len(_drive(metered, max_tokens=250, ignore_eos=True)) == 4  # the rest of the context, capped
    assert len(_drive(metered, max_tokens=3, ignore_eos=True)) == 3
    assert [r.params.max_tokens for r in engine.requests] == [4, 3]


def test_tokens_and_latencies_are_counted_per_adapter() -> None:
    metrics = Metrics()
    metered = MeteredEngine(FakeEngine({"a": "/adapters/a"}), Limits(), metrics)
    _drive(metered, "a", ignore_eos=True, max_tokens=4)
    _drive(metered, None, ignore_eos=True, max_tokens=2)
    samples = _samples(metrics)
    assert value(samples, "quiver_requests_total", adapter="a", outcome="length") == 1
    assert value(samples, "quiver_generation_tokens_total", adapter="a") == 4
    assert value(samples, "quiver_prompt_tokens_total", adapter="a") == 3
    assert value(samples, "quiver_inter_token_latency_seconds_count", adapter="a") == 3  # a gap between two tokens
    assert value(samples, "quiver_time_to_first_token_seconds_count", adapter="a") == 1
    assert value(samples, "quiver_request_queue_time_seconds_count", adapter="a") == 1
    assert value(samples, "quiver_generation_tokens_total", adapter=MODEL_NAME) == 2


def test_every_outcome_is_counted_and_adapters_past_the_label_cap_share_one() -> None:
    metrics = Metrics(max_adapter_labels=2)
    engine = FakeEngine({name: f"/adapters/{name}" for name in "acd"})
    metered = MeteredEngine(engine, Limits(), metrics)
    for adapter in ("a", None, "c", "d"):
        _drive(metered, adapter, ignore_eos=True)
    _drive(metered, "a", stop_after=1)
    _drive(metered, "a", max_tokens=200)  # ends with its EOS
    engine.refuse_with = EngineOverloadedError("full")
    with pytest.raises(EngineOverloadedError):
        _drive(metered, "a")
    engine.refuse_with = RuntimeError("boom")
    with pytest.raises(RuntimeError):
        _drive(metered, "a")
    engine.refuse_with, engine.fail_after = None, 1
    assert _drive(metered, "a")[-1].finish_reason == "error"
    assert engine.generate.__func__ is FakeEngine.generate  # type: ignore[attr-defined]  # never patched
    samples = _samples(metrics)
    assert value(samples, "quiver_requests_total", adapter="a", outcome="length") == 1
    assert value(samples, "quiver_requests_total", adapter="a", outcome="stop") == 1
    assert value(samples, "quiver_requests_total", adapter=MODEL_NAME, outcome="length") == 1
    assert value(samples, "quiver_requests_total", adapter=OTHER, outcome="length") == 2  # c and d
    assert value(samples, "quiver_requests_total", adapter="a", outcome="cancelled") == 1
    assert value(samples, "quiver_requests_total", adapter="a", outcome="rejected") == 1
    assert value(samples, "quiver_requests_total", adapter="a", outcome="error") == 2
    assert {labels["adapter"] for labels in series(samples, "quiver_requests_total")} == {"a", MODEL_NAME, OTHER}


def test_a_stream_closed_after_its_last_delta_is_no_cancellation_and_a_closed_one_is_aborted() -> None:
    metrics = Metrics()
    engine = FakeEngine()
    metered = MeteredEngine(engine, Limits(), metrics)
    deltas = _drive(metered, ignore_eos=True, max_tokens=2, stop_after=2)  # closed right after the last delta
    assert deltas[-1].finished and engine.aborted == []
    _drive(metered, ignore_eos=True, max_tokens=5, stop_after=2)
    assert engine.aborted == ["r"]
    samples = _samples(metrics)
    assert value(samples, "quiver_requests_total", adapter=MODEL_NAME, outcome="length") == 1
    assert value(samples, "quiver_requests_total", adapter=MODEL_NAME, outcome="cancelled") == 1
