"""A real Prometheus scrapes a live Quiver under traffic for several adapters; its HTTP API must agree.

Needs the `prometheus` binary (Debian: `apt-get install prometheus`; `.ci/run` installs it and sets
QUIVER_TEST_REQUIRE_PROMETHEUS=1, which turns a missing binary into a failure instead of a skip).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.admin.adapters import adapter_routes
from server.app import create_app
from server.http.metrics import Metrics
from server.state import ServerState
from tests.eventually import eventually
from tests.server.conftest import MODEL_NAME, LiveServer, engine_config
from training.jobs import JobManager

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "quiver-dashboard.json"
ADAPTERS = [f"lora-{i}" for i in range(4)]  # lora-3 gets no traffic
REQUIRE_ENV = "QUIVER_TEST_REQUIRE_PROMETHEUS"


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but no `prometheus` binary is on PATH")
        pytest.skip("the `prometheus` binary is not installed (Debian: apt-get install prometheus; .ci/run "
                    "installs it when it runs as root with apt available)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    """A Prometheus server on 127.0.0.1 scraping `target` every second, with its own config and data dir."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: quiver\n    static_configs:\n      - targets: ['{target}']\n"
        )
        self._log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.log_path = workdir / "prometheus.log"
        self._wait(lambda: httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200, "Prometheus ready")

    def _wait(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                return bool(check())
            except httpx.HTTPError:
                return False

        eventually(ready, timeout, what, interval=0.2)

    def query(self, promql: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def by(self, promql: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(promql)}

    def wait_until(self, promql: str, predicate: Callable[[list[dict[str, Any]]], bool], what: str) -> None:
        self._wait(lambda: predicate(self.query(promql)), what)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._log.close()


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return _prometheus_binary()


@pytest.fixture(scope="module")
def quiver(prometheus_binary: str, tiny_model_factory: Callable[..., Path], tiny_adapter_factory: Callable[..., Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from engine.async_engine import AsyncEngine

    model_dir = tiny_model_factory("llama")
    adapters = {}
    for i, name in enumerate(ADAPTERS):  # the same adapters as tests/server (cached when run together)
        targets = ("q_proj", "v_proj") if i % 2 == 0 else ("q_proj", "k_proj", "v_proj", "o_proj")
        adapters[name] = tiny_adapter_factory(model_dir, seed=100 + i, rank=4 if i % 3 else 8,
                                              target_modules=targets, weight_scale=1.5)
    engine = AsyncEngine(engine_config(model_dir, max_model_len=512), adapters=adapters, served_model_name=MODEL_NAME)
    state = ServerState(engine)
    jobs = JobManager(tmp_path_factory.mktemp("jobs"), base_model=str(model_dir), model_name=MODEL_NAME)
    server = LiveServer(create_app(state, extra_routes=adapter_routes(state), metrics=Metrics(job_manager=jobs))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prometheus(prometheus_binary: str, quiver: LiveServer,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    server = Prometheus(prometheus_binary, f"127.0.0.1:{quiver.port}", tmp_path_factory.mktemp("prometheus"))
    yield server
    server.stop()


def _chat(http: httpx.Client, model: str, max_tokens: int, stream: bool) -> None:
    body = {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": f"Say something, {model}."}]}
    if not stream:
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == max_tokens
        return
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert [line for line in response.iter_lines() if line.startswith("data:")][-1] == "data: [DONE]"


def test_prometheus_sees_what_quiver_served(quiver: LiveServer, prometheus: Prometheus) -> None:
    prometheus.wait_until('up{job="quiver"}', lambda r: bool(r) and r[0]["value"][1] == "1", "a first scrape")
    plan = [("lora-0", 12), ("lora-1", 6), ("lora-2", 20), (MODEL_NAME, 8)] * 2 + [("lora-0", 12)] * 3
    sent: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    lock = threading.Lock()

    def send(model: str, max_tokens: int, stream: bool) -> None:
        with quiver.http() as http:
            _chat(http, model, max_tokens, stream)
        with lock:
            sent[model] += 1
            tokens[model] += max_tokens

    with ThreadPoolExecutor(4) as pool:
        # Long lora-2 generations until a scrape catches one running (the LoRA affinity metric).
        seen_running = threading.Event()

        def keep_lora_2_busy() -> None:
            while not seen_running.is_set():
                send("lora-2", 400, stream=True)

        busy = pool.submit(keep_lora_2_busy)
        for future in [pool.submit(send, model, max_tokens, i % 3 == 0) for i, (model, max_tokens) in enumerate(plan)]:
            future.result(timeout=60)
        prometheus.wait_until('count_over_time(vllm:lora_requests_info{running_lora_adapters=~"(.*,)?lora-2(,.*)?",'
                              'max_lora="4"}[5m])', bool, "a scrape while lora-2 was running")
        seen_running.set()
        busy.result(timeout=30)

    with quiver.http() as http:
        assert http.post("/v1/adapters/lora-1/promote").status_code == 200
    total = sum(sent.values())
    prometheus.wait_until("sum(quiver_requests_total)", lambda r: bool(r) and float(r[0]["value"][1]) == total,
                          f"a scrape counting all {total} requests")
    prometheus.wait_until('quiver_adapter_state{adapter="lora-1"}',
                          lambda r: bool(r) and r[0]["metric"]["state"] == "pinned", "a scrape after the promotion")

    assert prometheus.by("sum by (adapter) (quiver_requests_total)", "adapter") == dict(sent)
    assert prometheus.by('sum by (adapter) (quiver_requests_total{outcome="length"})', "adapter") == dict(sent)
    assert prometheus.by("sum by (adapter) (quiver_time_to_first_token_seconds_count)", "adapter") == dict(sent)
    assert prometheus.by("sum by (adapter) (quiver_generation_tokens_total)", "adapter") == dict(tokens)
    assert prometheus.by("sum by (adapter) (quiver_e2e_request_latency_seconds_count)", "adapter") == dict(sent)
    ttft_p99 = prometheus.by("histogram_quantile(0.99, sum by (le, adapter) (quiver_time_to_first_token_seconds_bucket))",
                             "adapter")
    assert set(ttft_p99) == set(sent) and all(0 < v < 60 for v in ttft_p99.values())

    states = {r["metric"]["adapter"]: r["metric"]["state"] for r in prometheus.query("quiver_adapter_state")}
    assert states == {"lora-0": "gpu", "lora-1": "pinned", "lora-2": "gpu", "lora-3": "registered"}
    by_state = prometheus.by("sum by (state) (quiver_adapters)", "state")
    assert {k: v for k, v in by_state.items() if v} == {"gpu": 2, "pinned": 1, "registered": 1}
    assert prometheus.by("quiver_lora_slots", "job") == {"quiver": 4}
    assert prometheus.by('quiver_http_requests_total{route="/v1/chat/completions",status="200"}', "method") == {
        "POST": total}


def _dashboard_queries() -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                yield node["expr"]
            for child in node.values():
                yield from walk(child)
        elif isinstance(node, list):
            for child in node:
                yield from walk(child)

    return list(walk(json.loads(DASHBOARD.read_text())))


def test_every_dashboard_query_evaluates_on_what_quiver_exports(quiver: LiveServer, prometheus: Prometheus) -> None:
    queries = _dashboard_queries()
    assert len(queries) > 20
    prometheus.wait_until("quiver_finetune_jobs", bool, "a scrape")
    exported = set(httpx.get(f"{prometheus.url}/api/v1/label/__name__/values", timeout=5).json()["data"])
    # GPU memory exists on CUDA only; queue time once the engine reports it.
    optional = re.compile(r"quiver_gpu_memory_\w+|quiver_request_queue_time_seconds\w*")
    for query in queries:
        for name in re.findall(r"\b(quiver_\w+)", query):
            assert name in exported or optional.fullmatch(name), f"{name} (in `{query}`) is not exported"
        concrete = query.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$adapter", ".*")
        prometheus.query(concrete)  # asserts the query is valid PromQL


def test_the_example_prometheus_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    checked = subprocess.run([promtool, "check", "config", str(REPO / "deploy" / "prometheus" / "prometheus.yml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
