"""A few seconds of the soak/chaos run against a live tiny server, and the checks' ability to fail."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from load_tests.chaos import RawRequest, write_broken_adapters
from load_tests.greedy_match import Step
from load_tests.local_server import InProcessServer
from load_tests.soak_run import PROMPTS, Soak, SoakConfig, documented_5xx, run_soak
from tests.load_tests.conftest import MODEL_NAME


@pytest.fixture(scope="module")
def soak_server(start_tiny_server: Callable[..., InProcessServer], load_adapters: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> tuple[InProcessServer, Path | None]:
    """A server of its own (a chaos run may break it), with an adapter root when the engine has one."""
    from engine.async_engine import AsyncEngine

    if "adapter_config" not in inspect.signature(AsyncEngine).parameters:
        return start_tiny_server(), None
    from adapters.config import AdapterConfig

    root = tmp_path_factory.mktemp("adapter-root")
    write_broken_adapters(root, next(iter(load_adapters.values())))
    return start_tiny_server(engine_kwargs={"adapter_config": AdapterConfig(adapter_root=root)}), root


def test_short_soak_holds_every_invariant(soak_server: tuple[InProcessServer, Path | None],
                                          load_adapters: dict[str, Path]) -> None:
    server, root = soak_server
    config = SoakConfig(
        base_url=server.base_url, duration_s=5.0, round_s=1.2, valid_per_round=8, invalid_per_round=10,
        fuzz_per_round=3, disconnects_per_round=4, max_tokens=8, num_adapters=2, adapter_root=root,
        adapter_sources=dict(load_adapters), request_timeout_s=20.0, pid=os.getpid(), engine=server.engine,
        rss_tolerance_bytes=256 << 20, seed=1,
    )
    result = asyncio.run(run_soak(config))
    assert result["violations"] == []
    checks = result["checks"]
    for name in ("health", "no_5xx", "invalid_4xx", "outputs", "kv_free", "refcounts", "memory_flat"):
        assert checks[name] == "passed", (name, checks[name])
    if checks["churn"] != "passed":
        assert "admin API" in checks["churn"] or "adapter root" in checks["churn"]
    assert len(result["rounds"]) >= 3
    counts = result["counts"]
    assert counts["valid"]["200"] == 8 * len(result["rounds"])
    assert sum(counts["invalid"].values()) >= 30  # every invalid case at least once
    assert set(counts["invalid"]) <= {"400", "404", "413"}
    assert sum(counts["disconnect"].values()) == 4 * len(result["rounds"])
    assert counts["health"]["checked"] > 10
    assert result["state_sources"]["kv_blocks_free"] == "engine"
    assert "near_tie" not in result and "near_tie" not in counts  # exact comparison by default


def test_short_soak_with_a_tie_tolerance_compares_tokens(soak_server: tuple[InProcessServer, Path | None],
                                                         load_adapters: dict[str, Path]) -> None:
    server, root = soak_server
    config = SoakConfig(
        base_url=server.base_url, duration_s=2.5, round_s=1.0, valid_per_round=8, invalid_per_round=2,
        fuzz_per_round=1, disconnects_per_round=1, max_tokens=8, num_adapters=2, adapter_root=root,
        adapter_sources=dict(load_adapters), request_timeout_s=20.0, engine=server.engine, seed=2,
        tie_tolerance=0.05,
    )
    soak = Soak(config)
    result = asyncio.run(soak.run())
    assert result["violations"] == []
    assert result["checks"]["outputs"] == "passed"
    # fp32 on the CPU does not depend on the batch: nothing diverges, and the report says so
    assert result["near_tie"] == {"tolerance_nats": 0.05, "accepted": 0, "max_gap_nats": None, "examples": []}
    assert result["counts"]["valid"]["200"] == 8 * len(result["rounds"])
    assert set(soak.ref_steps) == set(soak.refs)
    for key, ref in soak.ref_steps.items():
        assert 1 <= len(ref) <= 8, key
        for step in ref:  # greedy: the chosen token is the best of its alternatives
            assert len(step.top) >= 1 and step.logprob == max(step.top.values()), (key, step)


def soak_for(server: InProcessServer, **overrides) -> Soak:
    return Soak(SoakConfig(base_url=server.base_url, max_tokens=6, num_adapters=1, engine=server.engine,
                           **overrides))


def test_a_wrong_reference_is_an_output_violation(tiny_server: InProcessServer) -> None:
    async def go() -> Soak:
        soak = soak_for(tiny_server)
        await soak.setup()
        soak.refs[(MODEL_NAME, 0, "chat")] = "not what the model says"
        await soak.valid(MODEL_NAME, 0, "chat", True)
        await soak.valid(MODEL_NAME, 1, "completions", False)  # a right reference passes
        return soak

    soak = asyncio.run(go())
    assert soak.ledger.failed["outputs"] == 1 and soak.ledger.counts["valid"]["200"] == 2
    assert len(soak.refs) == 2 * len(PROMPTS) * 2  # base + one adapter, two endpoints
    assert not any(soak.ref_steps.values())  # no logprobs asked for without a tie tolerance


def near_tie_reference(ref: list[Step], gap: float) -> list[Step]:
    """The reference as if, at token 1, another token had won by `gap` nats over the real one."""
    fake = Step("<fake>", ref[1].logprob + gap, {"<fake>": ref[1].logprob + gap, ref[1].token: ref[1].logprob})
    return [ref[0], fake, *ref[2:]]


def test_outputs_parting_at_a_near_tie_of_the_reference_are_accepted_and_counted(
        tiny_server: InProcessServer) -> None:
    async def go() -> tuple[Soak, dict[tuple[str, bool], list[str]]]:
        soak = soak_for(tiny_server, tie_tolerance=0.05)
        await soak.setup()
        tokens = {}  # every way of asking gives the reference's tokens (streams: gathered over the chunks)
        for endpoint in ("chat", "completions"):
            for stream in (False, True):
                text, got = await soak.generate(MODEL_NAME, 2, endpoint, stream)
                assert text == soak.refs[(MODEL_NAME, 2, endpoint)]
                tokens[(endpoint, stream)] = [s.token for s in got]
        for endpoint, prompt, gap in (("chat", 0, 0.01), ("completions", 1, 0.2)):
            key = (MODEL_NAME, prompt, endpoint)
            soak.refs[key] = "a text the model did not write"
            soak.ref_steps[key] = near_tie_reference(soak.ref_steps[key], gap)
        await soak.valid(MODEL_NAME, 0, "chat", True)  # parts 0.01 nats from the reference: accepted
        await soak.valid(MODEL_NAME, 1, "completions", False)  # parts 0.2 nats away: a violation
        return soak, tokens

    soak, tokens = asyncio.run(go())
    for endpoint in ("chat", "completions"):
        want = [s.token for s in soak.ref_steps[(MODEL_NAME, 2, endpoint)]]
        assert len(want) >= 2 and tokens[(endpoint, False)] == tokens[(endpoint, True)] == want
    assert soak.ledger.counts["near_tie"]["valid"] == 1
    (tie,) = soak.ledger.near_ties
    assert tie["index"] == 1 and tie["gap"] == pytest.approx(0.01) and "<fake>" in tie["detail"]
    (violation,) = soak.ledger.violations
    assert violation["kind"] == "outputs" and "beyond the tolerance 0.05" in violation["detail"]
    assert "completions stream=False prompt=1" in violation["detail"]


def test_an_accepted_invalid_request_and_a_missing_envelope_are_violations(tiny_server: InProcessServer) -> None:
    async def go() -> Soak:
        soak = soak_for(tiny_server)
        valid = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
        await soak.raw(RawRequest("secretly_valid", "/v1/chat/completions", valid), must_refuse=True)
        await soak.raw(RawRequest("no_route", "/v1/nothing-here", b"{}"), must_refuse=True)  # plain 404 page
        await soak.raw(RawRequest("fuzz_ok", "/v1/chat/completions", valid), must_refuse=False)
        await soak.http.aclose()
        return soak

    soak = asyncio.run(go())
    assert soak.ledger.failed["invalid_4xx"] >= 1
    assert any("secretly_valid: answered 200" in v["detail"] for v in soak.ledger.violations)
    assert soak.ledger.counts["fuzz"]["200"] == 1 and soak.ledger.failed["no_5xx"] == 0


def test_state_checks_fail_on_leaks_and_skip_without_data(tiny_server: InProcessServer) -> None:
    soak = soak_for(tiny_server)
    soak.check_state({"kv_blocks_free": 9, "kv_blocks_total": 10, "adapter_refcount": 0, "refcounts": {"a": 0}})
    soak.check_state({"kv_blocks_free": 10, "kv_blocks_total": 10, "adapter_refcount": 0, "refcounts": {"a": 2}})
    assert soak.ledger.failed["kv_free"] == 1 and soak.ledger.failed["refcounts"] == 1
    soak.check_state({"kv_blocks_free": None, "kv_blocks_total": None, "adapter_refcount": None, "refcounts": None})
    checks = soak.ledger.checks(("kv_free", "refcounts", "health"))
    assert checks == {"kv_free": "failed (1)", "refcounts": "failed (1)", "health": "passed"}


@pytest.mark.parametrize(("rss_mb", "violations"), [([500, 501, 530, 502], 0), ([500, 510, 560, 600], 1)])
def test_memory_must_stay_flat_after_warm_up(tiny_server: InProcessServer, rss_mb: list[int],
                                             violations: int) -> None:
    soak = soak_for(tiny_server, rss_tolerance_bytes=64 << 20, warmup_rounds=1)
    rounds = [{"rss_bytes": mb << 20, "gpu_memory_allocated_bytes": None} for mb in rss_mb]
    soak.check_memory(rounds)
    assert soak.ledger.failed["memory_flat"] == violations
    soak.check_memory(rounds[:2])
    assert "need 2" in soak.ledger.skipped["memory_flat"]


def test_only_503_with_retry_after_is_a_documented_5xx() -> None:
    assert documented_5xx(503, httpx.Headers({"Retry-After": "1"}))
    assert not documented_5xx(503, httpx.Headers())
    assert not documented_5xx(500, httpx.Headers({"Retry-After": "1"}))


def test_the_summary_reports_accepted_near_ties() -> None:
    from load_tests.soak import summary_markdown

    tie = {"round": 3, "request": "valid tiny-base chat stream=True prompt=0", "index": 4, "gap": 0.0123,
           "detail": "token 4: got ' ocean', reference ' sea'"}
    result = {"rounds": [], "elapsed_s": 1.0, "checks": {"outputs": "passed (1 diverged at a near-tie, ...)"},
              "counts": {"near_tie": {"valid": 1}}, "violations": [],
              "near_tie": {"tolerance_nats": 0.05, "accepted": 1, "max_gap_nats": 0.0123, "examples": [tie]}}
    text = summary_markdown(result)
    assert "at a near-tie (accepted, tolerance 0.05 nats): 1, largest gap 0.0123 nats" in text
    assert "- round 3, valid tiny-base chat stream=True prompt=0: token 4: got ' ocean'" in text
    assert "| near_tie | valid: 1 |" in text
    exact = {k: v for k, v in result.items() if k != "near_tie"} | {"checks": {"outputs": "passed"}, "counts": {}}
    assert "near-tie" not in summary_markdown(exact)  # the default run reports nothing of the kind
