"""GET /metrics: per-request metrics by adapter and HTTP series (in-process over the fake engine), engine
state read at scrape time (end to end: the real engine's core), label caps. MeteredEngine itself, which
counts each generation, is tested in test_metered.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.state_view import gpu_memory
from server.admin.adapters import adapter_routes
from server.app import create_app
from server.http.engine_view import EngineCollector, EngineView
from server.http.metrics import OTHER, AdapterLabels, Metrics
from server.state import ServerState
from tests.eventually import eventually
from tests.server.conftest import MODEL_NAME, InProcessApp, LiveServer, engine_config

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(http: httpx.Client) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


@pytest.fixture(scope="module")
def live(server_model_dir: Path, server_adapters: dict[str, Path]) -> Iterator[LiveServer]:
    from engine.async_engine import AsyncEngine

    engine = AsyncEngine(engine_config(server_model_dir, max_model_len=512), adapters=server_adapters,
                         served_model_name=MODEL_NAME)
    state = ServerState(engine)
    server = LiveServer(create_app(state, extra_routes=adapter_routes(state))).start()
    yield server
    server.stop()


def _chat(http: httpx.Client, model: str, max_tokens: int = 5, **extra: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "max_tokens": max_tokens, "ignore_eos": True,
                                                   "messages": [{"role": "user", "content": "hi there"}], **extra})


@pytest.fixture
def fake_admin(fake_app: Callable[..., InProcessApp]) -> InProcessApp:
    return fake_app(routes=adapter_routes)


def test_requests_tokens_and_latencies_are_counted_per_adapter(fake_admin: InProcessApp) -> None:
    sent = {"lora-0": 3, "lora-1": 2, MODEL_NAME: 1}
    usage: dict[str, list[dict[str, int]]] = {name: [] for name in sent}
    with fake_admin.http() as http:
        before = scrape(http)
        for name, count in sent.items():
            for i in range(count):
                response = _chat(http, name, max_tokens=4 + i)
                assert response.status_code == 200
                usage[name].append(response.json()["usage"])
        # A streamed completion counts the same way.
        with http.stream("POST", "/v1/completions", json={"model": "lora-1", "prompt": "hello", "max_tokens": 6,
                                                          "ignore_eos": True, "stream": True}) as stream:
            assert stream.status_code == 200
            assert [line for line in stream.iter_lines() if line.startswith("data:")][-1] == "data: [DONE]"
        usage["lora-1"].append({"prompt_tokens": len(fake_admin.engine.tokenizer.encode("hello")), "completion_tokens": 6})
        after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for name, used in usage.items():
        assert delta("quiver_requests_total", adapter=name, outcome="length") == len(used)
        assert delta("quiver_time_to_first_token_seconds_count", adapter=name) == len(used)
        assert delta("quiver_e2e_request_latency_seconds_count", adapter=name) == len(used)
        generated = sum(u["completion_tokens"] for u in used)
        assert delta("quiver_generation_tokens_total", adapter=name) == generated
        assert delta("quiver_prompt_tokens_total", adapter=name) == sum(u["prompt_tokens"] for u in used)
        # One gap between each two consecutive tokens of a request.
        assert delta("quiver_inter_token_latency_seconds_count", adapter=name) == generated - len(used)
        assert 0 < delta("quiver_time_to_first_token_seconds_sum", adapter=name) < 30
    assert delta("quiver_http_requests_total", method="POST", route="/v1/chat/completions", status="200") == 6
    assert value(after, "quiver_http_requests_in_flight", route="/v1/chat/completions") == 0
    assert value(after, "quiver_http_requests_in_flight", route="/metrics") == 1  # this scrape


def test_engine_state_is_read_at_scrape_time(live: LiveServer) -> None:
    with live.http() as http:
        for name in ("lora-0", "lora-1"):
            assert _chat(http, name).status_code == 200
        assert http.post("/v1/adapters/lora-2/promote").status_code == 200
        samples = scrape(http)
    states = {labels["adapter"]: (labels["state"], labels["tier"]) for labels in series(samples, "quiver_adapter_state")}
    assert states["lora-0"] == ("gpu", "gpu") and states["lora-1"] == ("gpu", "gpu")
    assert states["lora-2"] == ("pinned", "gpu")
    assert states["lora-7"] == ("registered", "disk")
    assert value(samples, "quiver_adapters", state="pinned", tier="gpu") == 1
    assert sum(v for (n, _), v in samples.items() if n == "quiver_adapters") == len(states) == 8
    assert value(samples, "quiver_adapter_loads_total", tier="gpu") >= 3
    # Every load is timed, by the tier it came from: disk -> host memory, host -> GPU slot.
    assert value(samples, "quiver_adapter_load_seconds_count", tier="disk") >= 3
    assert value(samples, "quiver_adapter_load_seconds_count", tier="host") >= 3
    assert value(samples, "quiver_adapter_load_seconds_bucket", tier="host", le="+Inf") >= 3
    assert value(samples, "quiver_adapter_load_seconds_sum", tier="disk") > 0
    assert value(samples, "quiver_model_ready") == 1
    assert value(samples, "quiver_kv_cache_blocks_total") == live.engine.stats()["num_total_blocks"] > 0
    assert value(samples, "quiver_sequences_running") == 0 and value(samples, "quiver_kv_cache_blocks_used") == 0
    assert value(samples, "quiver_lora_slots") == 4
    [info] = series(samples, "vllm:lora_requests_info")
    assert info == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "4"}


def test_running_adapters_are_listed_while_they_generate(live: LiveServer) -> None:
    with live.http() as http, http.stream("POST", "/v1/chat/completions", json={
            "model": "lora-3", "max_tokens": 480, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}) as stream:
        assert stream.status_code == 200, stream.read()
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # generation started
        samples = scrape(http)
        stream.close()  # the client leaves: the request is cancelled
    [info] = series(samples, "vllm:lora_requests_info")
    assert info["running_lora_adapters"] == "lora-3"
    assert value(samples, "quiver_sequences_running") == 1 and value(samples, "quiver_kv_cache_blocks_used") > 0
    assert value(samples, "vllm:num_requests_running") == 1
    usage = value(samples, "vllm:kv_cache_usage_perc")
    assert 0 < usage <= 1 and usage == value(samples, "vllm:gpu_cache_usage_perc")
    with live.http() as http:  # the abort lands within a step or two
        eventually(lambda: value(scrape(http), "quiver_requests_total", adapter="lora-3", outcome="cancelled") == 1,
                   10, "the stream the client left counted as cancelled")


def test_unknown_routes_are_one_series(fake_admin: InProcessApp) -> None:
    with fake_admin.http() as http:
        for path in ("/nope", "/also/nope", "/v1/adapters/lora-5"):
            http.get(path)
        samples = scrape(http)
    assert value(samples, "quiver_http_requests_total", method="GET", route="unmatched", status="404") == 2
    assert value(samples, "quiver_http_requests_total", method="GET", route="/v1/adapters/{name}", status="200") == 1


# ---- without a live server ---------------------------------------------------------------


def test_adapter_labels_are_capped() -> None:
    labels = AdapterLabels(cap=2)
    assert [labels(n) for n in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]
    with pytest.raises(ValueError):
        AdapterLabels(cap=0)


def test_each_app_has_its_own_registry_and_scrapes_before_the_model_loads() -> None:
    def never_loads() -> Any:  # the ASGI transport runs no lifespan: nothing starts loading
        raise AssertionError("not called")

    class Jobs:
        def list_jobs(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
            return [{"status": "running"}, {"status": "succeeded"}, {"status": "succeeded"}], False

    first = create_app(ServerState(engine_factory=never_loads), metrics=Metrics(job_manager=Jobs()))
    second = create_app(ServerState(engine_factory=never_loads))

    async def scrape_both() -> tuple[str, str]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(first), base_url="http://a") as a, \
                httpx.AsyncClient(transport=httpx.ASGITransport(second), base_url="http://b") as b:
            await a.get("/health")
            return (await a.get("/metrics")).text, (await b.get("/metrics")).text

    text_a, text_b = asyncio.run(scrape_both())
    a, b = parse(text_a), parse(text_b)
    assert value(a, "quiver_model_ready") == 0 and not series(a, "quiver_sequences_running")
    assert value(a, "quiver_http_requests_total", method="GET", route="/health", status="200") == 1
    assert value(b, "quiver_http_requests_total", method="GET", route="/health", status="200") == 0
    assert value(a, "quiver_finetune_jobs", state="succeeded") == 2 and value(a, "quiver_finetune_jobs", state="queued") == 0
    assert not series(b, "quiver_finetune_jobs")



def test_gpu_memory_is_exported_for_a_cuda_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch


    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (30 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 40 << 30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 45 << 30)

    memory = gpu_memory(torch.device("cuda"))
    assert memory == {"cuda:1": {"used": 50 << 30, "total": 80 << 30, "allocated": 40 << 30, "reserved": 45 << 30}}
    collector = EngineCollector(AdapterLabels())
    collector.view = EngineView(ready=True, gpu_memory=memory)
    registry = CollectorRegistry()
    registry.register(collector)
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "quiver_gpu_memory_used_bytes", device="cuda:1") == 50 << 30
    assert value(samples, "quiver_gpu_memory_total_bytes", device="cuda:1") == 80 << 30
    assert gpu_memory(torch.device("cpu")) == {}
