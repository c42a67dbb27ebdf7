"""The soak's adapter-churn mode: a few seconds against a tiny server with 2 GPU and 4 host slots."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from load_tests.churn import (
    CHURN_PREFIX,
    NORMAL_FINISH,
    RANKS,
    TARGET_SETS,
    AdapterChurn,
    ChurnConfig,
    churn_shape,
    evictions_by_tier,
    round_adapters,
    write_churn_adapters,
)
from load_tests.local_server import InProcessServer
from load_tests.soak_run import Soak, SoakConfig, run_soak

GPU_SLOTS, HOST_SLOTS, ADAPTERS = 2, 4, 12


@pytest.fixture(scope="module")
def churn_server(start_tiny_server: Callable[..., InProcessServer],
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[InProcessServer, Path]:
    from adapters.config import AdapterConfig

    root = tmp_path_factory.mktemp("churn-root")
    config = AdapterConfig(adapter_root=root, max_cpu_adapters=HOST_SLOTS)
    return start_tiny_server(engine_kwargs={"adapter_config": config}, max_loras=GPU_SLOTS, max_lora_rank=16), root


def churn_config(model_dir: Path, **overrides: Any) -> ChurnConfig:
    values: dict[str, Any] = dict(adapters=ADAPTERS, model_dir=model_dir, gpu_slots=GPU_SLOTS, host_slots=HOST_SLOTS,
                                  share=0.5, seed=3)
    return ChurnConfig(**(values | overrides))


def test_churn_soak_loads_adapters_on_demand_and_evicts_both_tiers(
        churn_server: tuple[InProcessServer, Path], load_model_dir: Path, load_adapters: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    server, root = churn_server
    at_start: dict[str, str] = {}
    prepare = AdapterChurn.prepare

    async def prepare_and_look(self: AdapterChurn, where: Path) -> None:
        await prepare(self, where)
        listing = (await self.soak.http.get("/v1/adapters")).json()["data"]
        at_start.update({a["id"]: a["state"] for a in listing if a["id"].startswith(CHURN_PREFIX)})

    monkeypatch.setattr(AdapterChurn, "prepare", prepare_and_look)
    config = SoakConfig(
        base_url=server.base_url, duration_s=4.0, round_s=1.0, valid_per_round=12, invalid_per_round=2,
        fuzz_per_round=1, disconnects_per_round=1, max_tokens=8, num_adapters=2, adapter_root=root,
        adapter_sources=dict(load_adapters), request_timeout_s=20.0, engine=server.engine, seed=4,
        churn=churn_config(load_model_dir),
    )
    result = asyncio.run(run_soak(config))

    assert result["violations"] == []
    # written after the references, so nothing loaded them before the traffic
    assert len(at_start) == ADAPTERS and set(at_start.values()) == {"registered"}
    assert result["checks"]["adapter_churn"].startswith("passed ("), result["checks"]["adapter_churn"]
    churn = result["adapter_churn"]
    assert churn["evictions"]["gpu"] > 0 and churn["evictions"]["host"] > 0
    assert churn["eviction_source"].startswith("/metrics")
    rounds = len(result["rounds"])
    assert rounds >= 3 and churn["requests"] == {"200": 6 * rounds}
    assert result["counts"]["valid"]["200"] == 6 * rounds  # the other half of --valid
    assert sum(churn["sent"].values()) == 6 * rounds and len(churn["sent"]) == 4  # chat/completions, streamed or not
    assert set(churn["finish_reasons"]) <= NORMAL_FINISH
    assert churn["distinct_per_round_min"] > HOST_SLOTS and churn["adapters_used"] > HOST_SLOTS
    assert "failed" not in churn["states"] and sum(churn["states"].values()) == ADAPTERS
    assert churn["references"] >= churn["adapters_used"]

    from load_tests.soak import summary_markdown

    text = summary_markdown(result)
    assert "## Adapter churn" in text and f"| adapter_churn | {result['checks']['adapter_churn']} |" in text
    assert f"| adapter_churn | 200: {6 * rounds} |" in text


def test_a_failed_churn_request_and_missing_evictions_fail_the_check(
        churn_server: tuple[InProcessServer, Path], load_model_dir: Path) -> None:
    server, _ = churn_server

    async def go() -> Soak:
        soak = Soak(SoakConfig(base_url=server.base_url, max_tokens=4, num_adapters=1, engine=server.engine))
        churn = AdapterChurn(churn_config(load_model_dir), soak)
        churn.evictions_before = await churn.evictions()
        await churn.request("no-such-adapter", 0, "chat", True)
        await churn.finish()  # nothing ran in between: no eviction of either tier
        await soak.http.aclose()
        return soak

    soak = asyncio.run(go())
    details = [v["detail"] for v in soak.ledger.violations if v["kind"] == "adapter_churn"]
    assert any("no-such-adapter" in d and "404" in d for d in details)
    assert "no gpu evictions during the churn traffic" in details
    assert "no host evictions during the churn traffic" in details
    assert soak.ledger.checks(("adapter_churn",)) == {"adapter_churn": f"failed ({len(details)})"}


@pytest.mark.parametrize("popularity", ["uniform", "zipf"])
def test_every_round_touches_more_adapters_than_host_slots(popularity: str) -> None:
    rng = np.random.default_rng(0)
    order = rng.permutation(64)
    for _ in range(50):
        picks = round_adapters(rng, 64, 24, 17, popularity, order)
        assert len(picks) == 24 and len(set(picks)) >= 17 and all(0 <= p < 64 for p in picks)
    uniform = round_adapters(rng, 64, 24, 17, "uniform")
    assert len(set(uniform)) == 24  # one adapter per request while there are enough
    with pytest.raises(ValueError, match="cannot touch 17 adapters with 8 requests"):
        round_adapters(rng, 64, 8, 17)


def test_zipf_popularity_favours_the_head_of_its_order() -> None:
    rng = np.random.default_rng(1)
    order = rng.permutation(64)
    counts = np.zeros(64)
    for _ in range(200):
        for pick in round_adapters(rng, 64, 24, 17, "zipf", order):
            counts[pick] += 1
    assert counts[order[0]] > 5 * counts[order[-10:]].mean()


def test_churn_adapters_mix_every_rank_with_every_target_set() -> None:
    shapes = {churn_shape(i) for i in range(len(RANKS) * len(TARGET_SETS))}
    assert shapes == {(r, t) for r in RANKS for t in TARGET_SETS}
    assert TARGET_SETS["all7"] == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_churn_adapters_are_written_with_their_shapes_and_never_over_a_loaded_one(
        load_model_dir: Path, tmp_path: Path) -> None:
    import json

    made = write_churn_adapters(churn_config(load_model_dir, adapters=6, host_slots=2), tmp_path)
    assert list(made) == [f"{CHURN_PREFIX}{i:04d}" for i in range(6)]
    for index, path in enumerate(made.values()):
        config = json.loads((path / "adapter_config.json").read_text())
        rank, targets = churn_shape(index)
        assert config["r"] == rank and config["target_modules"] == sorted(TARGET_SETS[targets])
    with pytest.raises(FileExistsError, match="must be new to the server"):
        write_churn_adapters(churn_config(load_model_dir, adapters=6, host_slots=2), tmp_path)


def test_evictions_are_read_by_tier_from_metrics() -> None:
    text = ('# HELP quiver_adapter_evictions_total Adapters evicted.\n'
            '# TYPE quiver_adapter_evictions_total counter\n'
            'quiver_adapter_evictions_total{tier="host"} 3.0\nquiver_adapter_evictions_total{tier="gpu"} 7.0\n')
    assert evictions_by_tier(text) == {"host": 3.0, "gpu": 7.0}
    assert evictions_by_tier("# TYPE other counter\nother_total 1.0\n") is None


@pytest.mark.parametrize(("overrides", "message"), [
    ({"adapters": 4}, "do not exceed the 4 host slots"),
    ({"gpu_slots": 8}, "GPU slots <= host slots"),
    ({"share": 0.0}, "share must be in"),
    ({"popularity": "pareto"}, "popularity must be one of"),
])
def test_impossible_churn_configs_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        churn_config(Path("."), **overrides)
    with pytest.raises(ValueError, match="4 churn requests per round .8 valid x share 0.5. cannot touch"):
        churn_config(Path(".")).check_round(8)


def test_the_cli_passes_the_slots_to_the_server_and_refuses_conflicts(capsys: pytest.CaptureFixture[str]) -> None:
    from load_tests.soak import build_parser, check_churn_args, churn_server_args

    parser = build_parser()
    args = parser.parse_args(["--serve", "--out", "/tmp/x", "--valid", "48", "--churn-adapters", "64"])
    check_churn_args(parser, args)
    assert churn_server_args(args) == ["--max-loras", "8", "--max-cpu-adapters", "16"]
    assert churn_server_args(parser.parse_args(["--serve", "--out", "/tmp/x"])) == []
    for argv, message in ((["--serve", "--churn-adapters", "64"], "cannot touch more adapters"),
                          (["--serve", "--valid", "48", "--churn-adapters", "64", "--server-arg=--max-loras=4"],
                           "sets the slots itself"),
                          (["--base-url", "http://127.0.0.1:1", "--valid", "48", "--churn-adapters", "64"],
                           "needs --model")):
        with pytest.raises(SystemExit):
            check_churn_args(parser, parser.parse_args([*argv, "--out", "/tmp/x"]))
        assert message in capsys.readouterr().err
