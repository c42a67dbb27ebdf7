"""The load generator against a live tiny server: records, errors, deadlines, the CLI's outputs."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import pytest

from load_tests import run_load
from load_tests.client import DriverConfig, run_workload
from load_tests.local_server import InProcessServer
from load_tests.workload import LengthRange, PlannedRequest, WorkloadSpec, build_workload
from tests.eventually import eventually
from tests.load_tests.conftest import MODEL_NAME, NUM_ADAPTERS


def names(server: InProcessServer) -> list[str]:
    return server.engine.adapter_names()[:NUM_ADAPTERS]


def model_of(server: InProcessServer):
    adapters = names(server)
    return lambda i: MODEL_NAME if i is None else adapters[i]


def wait_idle(server: InProcessServer, timeout_s: float = 5.0) -> dict[str, int]:
    """The engine's stats once idle (no request, every KV block free), or as they are at the timeout
    (the caller's assertions then say what is left)."""
    def idle() -> dict[str, int] | None:
        stats = server.engine.stats()
        return stats if stats["num_requests"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"] else None

    try:
        return eventually(idle, timeout_s, "the engine is idle", interval=0.05)
    except AssertionError:
        return server.engine.stats()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_every_request_gets_its_planned_lengths(tiny_server: InProcessServer, endpoint: str) -> None:
    spec = WorkloadSpec(12, math.inf, NUM_ADAPTERS, alpha=0.5, input_len=LengthRange(3, 20),
                        output_len=LengthRange(2, 12), base_fraction=0.3, seed=11)
    plan = build_workload(spec)
    records = asyncio.run(run_workload(plan, DriverConfig(tiny_server.base_url, endpoint=endpoint),
                                       model_of(tiny_server), deadline_s=60))
    assert [r.error_type for r in records] == [None] * len(plan)
    for req, rec in zip(plan, records, strict=True):
        assert rec.output_tokens == req.output_len  # ignore_eos: exactly what was asked
        assert rec.finish_reason == "length"
        if endpoint == "completions":
            assert rec.prompt_tokens == req.prompt_len  # token-id prompts: exact input lengths
        assert rec.model == model_of(tiny_server)(req.adapter)
        assert 0 < rec.ttft <= rec.latency
        assert len(rec.chunk_times) <= rec.output_tokens  # no chunk for a token ending no character
    assert sum(bool(r.text) for r in records) >= len(records) // 2
    assert wait_idle(tiny_server)["num_requests"] == 0


def test_errors_are_recorded_by_type(tiny_server: InProcessServer) -> None:
    plan = [PlannedRequest(0, 0.0, 0, 4, 3, (11, 12, 13, 14)),
            PlannedRequest(1, 0.0, None, 4, 10_000, (11, 12, 13, 14)),  # past the context length
            PlannedRequest(2, 0.0, None, 4, 3, (11, 12, 13, 14))]
    records = asyncio.run(run_workload(plan, DriverConfig(tiny_server.base_url),
                                       lambda i: MODEL_NAME if i is None else "no-such-adapter", deadline_s=30))
    assert [r.error_type for r in records] == ["http_404", "http_400", None]
    assert records[0].status_code == 404 and "no-such-adapter" in records[0].error_message


def test_deadline_cancels_in_flight_requests_and_the_server_frees_them(tiny_server: InProcessServer) -> None:
    plan = [PlannedRequest(i, 0.0, i % 2, 8, 200, tuple(range(20 + i, 28 + i))) for i in range(6)]
    plan.append(PlannedRequest(6, 5.0, None, 4, 3, (11, 12, 13, 14)))  # after the deadline: never sent
    started = time.monotonic()
    records = asyncio.run(run_workload(plan, DriverConfig(tiny_server.base_url), model_of(tiny_server),
                                       deadline_s=0.4))
    assert time.monotonic() - started < 3.0
    assert {r.error_type for r in records[:6]} == {"cancelled_at_deadline"}
    assert records[6].error_type == "not_sent_deadline" and records[6].sent is None
    stats = wait_idle(tiny_server)
    assert stats["num_requests"] == 0 and stats["num_free_blocks"] == stats["num_total_blocks"]


def test_driver_refuses_other_hosts() -> None:
    with pytest.raises(ValueError, match="this machine"):
        DriverConfig("http://10.1.2.3:8000")


def test_cli_sweep_writes_json_table_and_plot(tiny_server: InProcessServer, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    code = run_load.main([
        "--base-url", tiny_server.base_url, "--num-adapters", str(NUM_ADAPTERS), "--alpha", "1", "0.3",
        "--rates", "8", "--max-point", "--max-point-requests", "8", "--duration", "0.5", "--min-requests", "4",
        "--input-len", "4:16", "--output-len", "2:10", "--warmup", "2", "--no-progress", "--out", str(out),
    ])
    assert code == 0
    document = json.loads(out.with_suffix(".json").read_text())
    assert list(document["series"]) == [f"N={NUM_ADAPTERS} alpha=1", f"N={NUM_ADAPTERS} alpha=0.3"]
    for points in document["series"].values():
        assert [p["offered_rate"] for p in points] == [8.0, None]
        for p in points:
            assert p["num_ok"] == p["num_planned"] >= 4 and p["errors"] == {}
            assert 2 * p["num_ok"] <= p["output_tokens"] <= 9 * p["num_ok"]
            assert p["output_throughput"] > 0 and p["ttft_ms"]["p50"] > 0 and p["itl_ms"]["p99"] > 0
            assert p["slo"]["attainment"] == 1.0
            assert 1 <= p["distinct_adapters"] <= NUM_ADAPTERS
            assert set(p["server"]) >= {"adapter_gpu_loads", "adapter_gpu_evictions", "sources"}
    assert document["command"].startswith("python load_tests/run_load.py --base-url")
    table = out.with_suffix(".md").read_text()
    assert table.count("\n") == 2 + 4
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_rates_and_point_sizes() -> None:
    parse = run_load.build_parser().parse_args
    common = ["--base-url", "http://127.0.0.1:1", "--out", "x", "--duration", "10", "--min-requests", "5"]
    args = parse([*common, "--sweep", "0.5:2:4"])
    assert run_load.offered_rates(args) == ([0.5, 1.0, 2.0, 4.0], True)
    assert run_load.offered_rates(parse([*common, "--rates", "1,3"])) == ([1.0, 3.0], False)
    assert [run_load.point_size(r, args) for r in (0.1, 2.0, 1000.0, math.inf)] == [5, 20, 2000, 64]
