"""Mixed steps (`EngineConfig.mixed_steps`): a step that admits prompts also decodes the running
sequences. Every client-visible result equals the engine that keeps the two apart."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

ADAPTER = dict(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), seed=41)


@pytest.fixture(scope="module")
def model(tiny_model_factory, tiny_adapter_factory):
    model_dir = tiny_model_factory("llama")
    return model_dir, {"qv": tiny_adapter_factory(model_dir, **ADAPTER)}


def _run(model, mixed: bool, async_scheduling: bool) -> tuple[dict[str, list], list, dict[str, int]]:
    model_dir, adapters = model
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_model_len=64,
                                    block_size=4, max_loras=2, max_lora_rank=8, mixed_steps=mixed,
                                    async_scheduling=async_scheduling), adapters)
    batches = []
    schedule = engine.scheduler.schedule

    def recorded():
        batch = schedule()
        batches.append((batch.is_prefill, list(batch.num_new_tokens)))
        return batch

    engine.scheduler.schedule = recorded
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, top_logprobs=2)
    first = [("a", [5, 9, 13, 2], None), ("b", [7, 3], "qv"), ("c", [11, 4, 6, 8, 10], None)]
    burst = [("d", [21, 22, 23], "qv"), ("e", [30, 31, 32, 33, 34, 35], None), ("f", [40, 41], None)]
    for rid, prompt, adapter in first:
        engine.add_request(rid, prompt, params, adapter)
    out: dict[str, list] = {}
    finished_at: dict[str, int] = {}  # request -> the step() call that returned its last token
    steps = 0
    while engine.has_unfinished() or steps < 4:
        if steps == 3:  # the burst arrives while a, b and c are decoding
            for rid, prompt, adapter in burst:
                engine.add_request(rid, prompt, params, adapter)
        steps += 1
        for delta in engine.step():
            out.setdefault(delta.request_id, []).extend(
                (token, round(lp.logprob, 4)) for token, lp in zip(delta.token_ids, delta.logprobs, strict=True))
            if delta.finish_reason is not None:
                finished_at[delta.request_id] = steps
    return out, batches, finished_at


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["overlap", "one_step"])
def test_mixed_steps_give_every_request_the_same_tokens_and_logprobs(model, async_scheduling):
    want, apart, want_done = _run(model, False, async_scheduling)
    got, mixed, got_done = _run(model, True, async_scheduling)
    assert got.keys() == want.keys() == set("abcdef")
    for rid in want:
        assert [t for t, _ in got[rid]] == [t for t, _ in want[rid]], rid
        assert [lp for _, lp in got[rid]] == pytest.approx([lp for _, lp in want[rid]], abs=2e-4), rid
    # The burst's prefill carried a decode row for each of a, b and c; kept apart, it paused them.
    assert (True, [1, 1, 1, 3, 6, 2]) in mixed, mixed
    assert not any(prefill and 1 in new for prefill, new in apart)
    assert all(got_done[rid] == want_done[rid] - 1 for rid in "abc")  # the step the burst took from them
