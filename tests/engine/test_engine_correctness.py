"""The engine's mixed multi-LoRA batches against transformers + peft, per architecture."""

from __future__ import annotations

import random

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.peft_oracle import peft_greedy

MAX_NEW = 8
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_SPECS = {
    "a-qv-r4": dict(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), seed=11),
    "b-all-r8": dict(
        rank=8,
        alpha=16.0,
        target_modules=ALL,
        seed=12,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"o_proj": 4.0},
    ),
    "c-mlp-r2-rs": dict(
        rank=2, alpha=4.0, target_modules=("gate_proj", "up_proj", "down_proj"), seed=13, use_rslora=True
    ),
    "d-ko-r16": dict(rank=16, alpha=8.0, target_modules=("k_proj", "o_proj"), seed=14),
}


def _jobs(vocab: int) -> list[tuple[list[int], str | None]]:
    rng = random.Random(7)
    names: list[str | None] = [None, *ADAPTER_SPECS]
    jobs = []
    for i in range(10):
        length = rng.randint(3, 21)
        jobs.append(([rng.randrange(3, vocab) for _ in range(length)], names[i % len(names)]))
    return jobs


def _run_engine(engine: LLMEngine, jobs) -> dict[str, tuple[list[int], list[float]]]:
    for i, (prompt, adapter) in enumerate(jobs):
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, top_logprobs=2)
        engine.add_request(f"r{i}", prompt, params, adapter)
    results: dict[str, tuple[list[int], list[float]]] = {f"r{i}": ([], []) for i in range(len(jobs))}
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        for delta in engine.step():
            tokens, logprobs = results[delta.request_id]
            tokens.extend(delta.token_ids)
            logprobs.extend(lp.logprob for lp in delta.logprobs)
    assert not engine.has_unfinished()
    return results


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def setup(request, tiny_model_factory, tiny_adapter_factory):
    model_dir = tiny_model_factory(request.param)
    adapters = {name: tiny_adapter_factory(model_dir, **spec) for name, spec in ADAPTER_SPECS.items()}
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    jobs = _jobs(vocab)
    refs = peft_greedy(model_dir, adapters, jobs, MAX_NEW)
    return model_dir, adapters, jobs, refs


def _engine(model_dir, adapters, **overrides) -> LLMEngine:
    config = EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        max_model_len=128,
        block_size=4,
        max_loras=4,
        max_lora_rank=16,
        **overrides,
    )
    return LLMEngine(config, adapters)


def _assert_matches(results, refs) -> None:
    for i, ref in enumerate(refs):
        tokens, logprobs = results[f"r{i}"]
        assert tokens == ref.token_ids, f"request {i}: tokens differ"
        assert logprobs == pytest.approx(ref.logprobs, abs=1e-4), f"request {i}: logprobs differ"


def test_mixed_batch_matches_peft(setup):
    model_dir, adapters, jobs, refs = setup
    engine = _engine(model_dir, adapters)
    _assert_matches(_run_engine(engine, jobs), refs)
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert all(count == 0 for count in engine.adapter_refcounts().values())


def test_mixed_batch_with_preemption_matches_peft(setup):
    model_dir, adapters, jobs, refs = setup
    engine = _engine(model_dir, adapters, num_kv_blocks=16)
    results = _run_engine(engine, jobs)
    _assert_matches(results, refs)
    assert engine.scheduler_preemptions() > 0, "the pool was meant to be small enough to preempt"


def test_alone_equals_mixed(setup):
    model_dir, adapters, jobs, refs = setup
    engine = _engine(model_dir, adapters)
    for i, job in enumerate(jobs[:5]):
        results = _run_engine(engine, [job])
        assert results["r0"][0] == refs[i].token_ids


def test_shared_prefixes_hit_the_cache_and_still_match_peft(setup, tiny_model_factory):
    model_dir, adapters, jobs, _ = setup
    prefix = [7, 8, 9, 10, 11, 12, 13, 14, 15]
    shared = [(prefix + prompt[:3], adapter) for prompt, adapter in jobs[:5]] * 2
    refs = peft_greedy(model_dir, adapters, shared, MAX_NEW)
    engine = _engine(model_dir, adapters)
    # Sequentially, so later requests find the earlier ones' computed blocks.
    results = {}
    for i, job in enumerate(shared):
        results[f"r{i}"] = _run_engine(engine, [job])["r0"]
    _assert_matches(results, refs)
    assert engine.scheduler.block_manager.num_cache_hits > 0
