"""One step in flight (`async_scheduling`, engine/llm_engine.py) against one step at a time.

With overlap, step n+1 is scheduled and launched before the host has read step n's tokens;
everything a client sees must be exactly what the one-step-at-a-time engine produces: the
same tokens, logprobs, texts and finish reasons, for greedy and seeded sampling, stop tokens,
length limits, adapters, preemption and aborts.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

ADAPTERS = {
    "qv": dict(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), seed=21),
    "mlp": dict(rank=8, alpha=8.0, target_modules=("gate_proj", "up_proj", "down_proj"), seed=22),
}


@pytest.fixture(scope="module")
def model(tiny_model_factory, tiny_adapter_factory):
    model_dir = tiny_model_factory("llama")
    adapters = {name: tiny_adapter_factory(model_dir, **spec) for name, spec in ADAPTERS.items()}
    return model_dir, adapters


def _engine(model, async_scheduling: bool, **overrides) -> LLMEngine:
    model_dir, adapters = model
    config = EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32", max_model_len=96, block_size=4, max_loras=2,
        max_lora_rank=8, async_scheduling=async_scheduling, **overrides,
    )  # fmt: skip
    return LLMEngine(config, adapters)


def _requests(vocab: int) -> list[tuple[str, list[int], SamplingParams, str | None]]:
    rng = random.Random(5)
    adapters = [None, "qv", "mlp"]
    out = []
    for i in range(9):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 17))]
        params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=0.0, ignore_eos=True, top_logprobs=2)
        if i % 3 == 1:  # seeded sampling: the same draws alone, in any batch, with or without overlap
            params = replace(params, temperature=0.9, top_p=0.9, seed=100 + i)
        if i == 4:
            params = replace(params, min_tokens=3)
        out.append((f"r{i}", prompt, params, adapters[i % 3]))
    return out


def _run(engine: LLMEngine, requests, abort_after: dict[str, int] | None = None) -> dict[str, dict]:
    for request_id, prompt, params, adapter in requests:
        engine.add_request(request_id, prompt, params, adapter)
    seen: dict[str, dict] = {rid: {"tokens": [], "logprobs": [], "text": "", "finish": None} for rid, *_ in requests}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        assert steps < 500
        for delta in engine.step():
            got = seen[delta.request_id]
            assert got["finish"] is None, f"{delta.request_id}: a delta after the last one"
            got["tokens"] += delta.token_ids
            got["logprobs"] += [(lp.logprob, lp.top) for lp in delta.logprobs]
            got["text"] += delta.text
            got["finish"] = delta.finish_reason
        for rid, after in (abort_after or {}).items():
            if steps == after:
                engine.abort(rid)
    stats = engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert all(count == 0 for count in engine.adapter_refcounts().values())
    return seen


def _vocab(engine: LLMEngine) -> int:
    return engine.hf_config.vocab_size


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for rid in want:
        assert got[rid]["tokens"] == want[rid]["tokens"], rid
        assert got[rid]["text"] == want[rid]["text"], rid
        assert got[rid]["finish"] == want[rid]["finish"], rid
        for (lp_a, top_a), (lp_b, top_b) in zip(got[rid]["logprobs"], want[rid]["logprobs"], strict=True):
            assert lp_a == pytest.approx(lp_b, abs=1e-5)
            assert [t for t, _ in top_a] == [t for t, _ in top_b]


def test_overlap_matches_one_step_at_a_time(model):
    sync = _engine(model, False)
    requests = _requests(_vocab(sync))
    want = _run(sync, requests)
    # Stop tokens taken from the reference output: those requests must stop at the same place.
    stops = {}
    for rid, *_ in requests[:3]:
        tokens = want[rid]["tokens"]
        if len(tokens) >= 3:
            stops[rid] = tokens[1]
    requests = [(rid, p, replace(params, stop_token_ids=[stops[rid]]) if rid in stops else params, a)
                for rid, p, params, a in requests]  # fmt: skip
    assert stops, "the reference was meant to give some request three tokens"
    want = _run(_engine(model, False), requests)
    got = _run(_engine(model, True), requests)
    _assert_same(got, want)
    assert any(want[rid]["finish"] == "stop" for rid in stops)


def test_overlap_under_preemption(model):
    requests = _requests(_vocab(_engine(model, False)))
    want = _run(_engine(model, False, num_kv_blocks=10), requests)
    engine = _engine(model, True, num_kv_blocks=10)
    got = _run(engine, requests)
    assert engine.scheduler_preemptions() > 0, "the pool was meant to be small enough to preempt"
    _assert_same(got, want)


def test_first_step_only_launches(model):
    """With overlap a step's tokens come back one call later; without, in the same call."""
    for overlap, first_call in ((True, 0), (False, 1)):
        engine = _engine(model, overlap)
        engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        assert len(engine.step()) == first_call
        tokens = []
        while engine.has_unfinished():
            tokens += [t for d in engine.step() for t in d.token_ids]
        assert len(tokens) == 3 - first_call


def test_history_readers_keep_the_overlap_and_match_the_reference(model):
    """Penalties read the previous token on the host: their step's forward is launched first and
    its sampling once the step before is complete, so the engine keeps one step in flight and
    every request (the penalised one too) matches the one-step-at-a-time engine."""
    sync = _engine(model, False)
    requests = _requests(_vocab(sync))
    for k in (2, 5):
        rid, prompt, params, adapter = requests[k]
        requests[k] = (rid, prompt, replace(params, max_tokens=10, repetition_penalty=1.3, frequency_penalty=0.5,
                                            presence_penalty=0.4), adapter)  # fmt: skip
    want = _run(sync, requests)
    engine = _engine(model, True)
    deferred = []
    original = engine._sample
    engine._sample = lambda step: deferred.append(step.sample is None) or original(step)
    got = _run(engine, requests)
    _assert_same(got, want)
    assert engine._overlap()
    assert len(deferred) > 0


class _EvenTokensOnly:
    """A logits processor that reads the engine's state: it allows only even ids, and after
    every token checks that it was told about the previous one before its next row came."""

    def __init__(self) -> None:
        self.accepted: list[int] = []
        self.applied_after: list[int] = []

    def apply(self, logits) -> None:
        self.applied_after.append(len(self.accepted))
        logits[1::2] = float("-inf")

    def accept(self, token_id: int) -> None:
        self.accepted.append(token_id)

    def is_finished(self) -> bool:
        return False


def test_a_logits_processor_sees_each_token_before_its_next_row_under_overlap(model):
    engine = _engine(model, True)
    processors = {}
    for i in range(3):
        processors[f"p{i}"] = _EvenTokensOnly()
        engine.add_request(f"p{i}", [5 + i, 6, 7, 8], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                           None, logits_processor=processors[f"p{i}"])
    engine.add_request("plain", [9, 10, 11], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    out = {rid: [] for rid in [*processors, "plain"]}
    while engine.has_unfinished():
        for delta in engine.step():
            out[delta.request_id] += delta.token_ids
        assert engine._overlap()
    for rid, proc in processors.items():
        assert len(out[rid]) == 8 and all(t % 2 == 0 for t in out[rid]), rid
        assert proc.applied_after == list(range(8)), rid  # row k came after tokens 0..k-1 were accepted
    sync = _engine(model, False)
    sync.add_request("p0", [5, 6, 7, 8], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), None,
                     logits_processor=_EvenTokensOnly())
    want = []
    while sync.has_unfinished():
        want += [t for d in sync.step() for t in d.token_ids]
    assert out["p0"] == want


def test_abort_while_in_flight(model):
    sync, overlap = _engine(model, False), _engine(model, True)
    requests = _requests(_vocab(sync))
    requests = [(rid, p, replace(params, max_tokens=12), a) for rid, p, params, a in requests]
    want = _run(sync, requests, abort_after={"r0": 3, "r5": 4})
    got = _run(overlap, requests, abort_after={"r0": 3, "r5": 4})
    for rid in want:
        if rid in ("r0", "r5"):
            # Aborted mid-run: a prefix of the full answer, never a token past it.
            full = _run(_engine(model, False), [r for r in requests if r[0] == rid])[rid]["tokens"]
            assert got[rid]["finish"] is None and full[: len(got[rid]["tokens"])] == got[rid]["tokens"]
        else:
            assert got[rid]["tokens"] == want[rid]["tokens"] and got[rid]["finish"] == want[rid]["finish"], rid
