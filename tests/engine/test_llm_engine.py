"""LLMEngine's own contract: what add_request refuses, abort, and the counts it reports.
(Its step behaviours have their own modules: async scheduling, step failures, prompt
logprobs, and correctness against PEFT.)"""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.errors import UnknownAdapterError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_factory):
    model_dir = tiny_model_factory("llama")
    return LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_model_len=64,
                                  block_size=4, num_kv_blocks=32))


def _drain(engine: LLMEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            out.setdefault(delta.request_id, []).extend(delta.token_ids)
    return out


def test_bad_requests_are_refused_before_they_are_queued(engine):
    vocab = engine.hf_config.vocab_size
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("oov", [1, vocab], GREEDY)
    with pytest.raises(UnknownAdapterError):
        engine.add_request("unknown", [1, 2], GREEDY, adapter="no-such-adapter")
    engine.add_request("ok", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", [4, 5], GREEDY)
    assert engine.num_requests == 1 and engine.request_ids() == ["ok"]
    got = _drain(engine)
    assert list(got) == ["ok"] and got["ok"] == _drain_alone(engine, [1, 2, 3])  # the refusals left no trace


def _drain_alone(engine: LLMEngine, prompt: list[int]) -> list[int]:
    engine.add_request("alone", prompt, GREEDY)
    return _drain(engine)["alone"]


def test_abort_frees_the_blocks_and_is_idempotent(engine):
    total = engine.stats()["num_total_blocks"]
    engine.add_request("long", list(range(1, 30)), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats()["num_free_blocks"] < total and engine.stats()["num_running"] == 1
    assert engine.abort("long") is True
    assert engine.abort("long") is False and engine.abort("never-was") is False
    _drain(engine)  # the step in flight completes; the aborted request gives nothing more
    stats = engine.stats()
    assert stats["num_free_blocks"] == total and stats["num_requests"] == 0 and not engine.has_unfinished()
