"""Statistics over request records, loopback-only targets, the table and the plot."""

from __future__ import annotations

import json
import math

import pytest

from load_tests.client import RequestRecord, check_loopback, classify_error
from load_tests.report import distribution, markdown_table, plot_sweeps, summarize, write_json


def record(i: int, sent: float, first: float | None, done: float | None, tokens: int,
           error: str | None = None, adapter: str | None = "a") -> RequestRecord:
    chunks = [] if first is None or done is None else [first + k * (done - first) / max(tokens - 1, 1)
                                                        for k in range(tokens)]
    return RequestRecord(i, adapter or "base", adapter, 10, tokens, sent, sent=sent, first_token=first,
                         done=None if error else done, chunk_times=chunks, prompt_tokens=10,
                         output_tokens=None if error else tokens, error_type=error)


def test_record_latencies() -> None:
    r = record(0, 1.0, 1.5, 3.5, 5)
    assert r.ok and r.ttft == pytest.approx(0.5) and r.latency == pytest.approx(2.5)
    assert r.tpot == pytest.approx(2.0 / 4)
    assert r.itls == pytest.approx([0.5] * 4)
    assert not record(1, 0.0, None, None, 0, error="http_404").ok


def test_distribution_in_ms() -> None:
    d = distribution([0.001 * v for v in range(1, 101)])
    assert d["p50"] == pytest.approx(50.5) and d["p99"] == pytest.approx(99.01) and d["mean"] == pytest.approx(50.5)
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_summarize_counts_failures_as_slo_misses() -> None:
    records = [record(0, 0.0, 0.2, 1.0, 17), record(1, 0.5, 7.5, 8.0, 3, adapter="b"),
               record(2, 1.0, None, None, 0, error="http_503"), record(3, 1.5, 1.7, 2.0, 4, adapter=None)]
    s = summarize(records, offered_rate=2.0, slo_ttft_s=6.0)
    assert s["num_sent"] == 4 and s["num_ok"] == 3
    assert s["duration_s"] == pytest.approx(8.0)
    assert s["output_tokens"] == 24 and s["output_throughput"] == pytest.approx(3.0)
    assert s["request_throughput"] == pytest.approx(3 / 8)
    assert s["slo"]["attainment"] == pytest.approx(2 / 4)  # one slow TTFT, one failure
    assert s["errors"] == {"http_503": 1}
    assert s["distinct_adapters"] == 2 and s["base_requests"] == 1
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["arrival_rate"] == pytest.approx(3 / 1.5)
    # Latencies 1.0, 7.5, 0.5: the window discounts the shortest from the 8 s duration.
    assert s["sustained_rate"] == pytest.approx(3 / 7.5)
    tight = summarize(records, offered_rate=math.inf, slo_ttft_s=6.0, slo_tpot_s=0.08)  # TPOT 0.05 and 0.1 s
    assert tight["offered_rate"] is None and tight["slo"]["attainment"] == pytest.approx(1 / 4)


def test_only_loopback_targets() -> None:
    for ok in ("http://127.0.0.1:8000/", "http://localhost:1", "http://[::1]:9", "http://127.3.4.5"):
        assert check_loopback(ok) == ok.rstrip("/")
    for bad in ("http://10.0.0.1:8000", "http://192.168.1.2", "http://example.com", "http://0.0.0.0:80"):
        with pytest.raises(ValueError, match="this machine"):
            check_loopback(bad)


def test_classify_error() -> None:
    import httpx
    import openai

    request = httpx.Request("POST", "http://127.0.0.1/v1/completions")
    response = httpx.Response(429, request=request, json={"error": {"message": "slow down"}})
    assert classify_error(openai.RateLimitError("x", response=response, body=None)) == ("http_429", 429)
    assert classify_error(openai.APITimeoutError(request=request)) == ("timeout", None)
    assert classify_error(openai.APIConnectionError(request=request)) == ("connection", None)
    assert classify_error(ValueError("x")) == ("ValueError", None)


def test_outputs_table_json_and_png(tmp_path) -> None:
    points = []
    for rate in (1.0, 2.0, math.inf):
        p = summarize([record(0, 0.0, 0.1, 1.0, 5), record(1, 0.2, 0.4, 1.1, 4)], offered_rate=rate, slo_ttft_s=6)
        p["series"], p["server"] = "N=2 alpha=1", {"adapter_gpu_loads": 3.0, "adapter_gpu_evictions": None}
        points.append(p)
    table = markdown_table(points)
    assert table.count("\n") == 5 and "| max |" in table and "| 3 / n/a |" in table
    write_json(tmp_path / "r.json", {"points": points})
    assert json.loads((tmp_path / "r.json").read_text())["points"][0]["offered_rate"] == 1.0
    plot_sweeps({"N=2 alpha=1": points, "N=2 alpha=0.3": points[:2]}, tmp_path / "r.png", "test")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
