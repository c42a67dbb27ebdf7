"""A failing step fails only its own requests: a sequence whose sampling raises fails alone, a
forward that raises fails that batch, and the engine serves the next steps normally."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


class _Exploding:
    """A logits processor that raises on its first row, as a hostile parameter would."""

    def apply(self, logits: torch.Tensor) -> None:
        raise OverflowError("Overflow when unpacking long long")

    def accept(self, token_id: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama")


def _engine(model_dir, async_scheduling: bool = True) -> LLMEngine:
    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_model_len=64, block_size=4,
                          async_scheduling=async_scheduling)
    return LLMEngine(config)


def _drain(engine: LLMEngine) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for _ in range(200):
        if not engine.has_unfinished():
            break
        for d in engine.step():
            rec = out.setdefault(d.request_id, {"tokens": [], "finish": None, "error": None})
            rec["tokens"] += d.token_ids
            if d.finished:
                rec["finish"], rec["error"] = d.finish_reason, d.error
    return out


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_row_whose_sampling_raises_fails_alone_and_its_neighbours_match_a_clean_run(model_dir, async_scheduling):
    clean = _engine(model_dir, async_scheduling)
    for i in range(3):
        clean.add_request(f"r{i}", [5 + i, 9, 11], _greedy(6))
    expected = _drain(clean)

    engine = _engine(model_dir, async_scheduling)
    engine.add_request("r0", [5, 9, 11], _greedy(6))
    engine.add_request("bad", [7, 7, 7], _greedy(6), logits_processor=_Exploding())
    engine.add_request("r1", [6, 9, 11], _greedy(6))
    engine.add_request("r2", [7, 9, 11], _greedy(6))
    got = _drain(engine)
    assert got["bad"]["finish"] == "error" and "Overflow" in got["bad"]["error"]
    assert got["bad"]["tokens"] == []
    for rid in ("r0", "r1", "r2"):
        assert got[rid] == expected[rid], rid
    assert not engine.has_unfinished() and engine.scheduler.block_manager.num_used_blocks == 0


def test_a_failing_forward_fails_its_batch_and_the_next_requests_are_served(model_dir, monkeypatch):
    engine = _engine(model_dir)
    engine.add_request("a", [5, 9, 11], _greedy(4))
    real = engine.runner.execute_step
    calls = {"n": 0}

    def broken_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute_step", broken_once)
    got = _drain(engine)
    assert got["a"]["finish"] == "error" and "capture" in got["a"]["error"]
    assert engine.num_failed_steps == 1 and not engine.has_unfinished()
    assert engine.scheduler.block_manager.num_used_blocks == 0
    engine.add_request("b", [5, 9, 11], _greedy(4))
    after = _drain(engine)
    assert after["b"]["finish"] == "length" and len(after["b"]["tokens"]) == 4
