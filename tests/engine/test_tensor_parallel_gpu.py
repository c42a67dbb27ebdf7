"""Tensor parallelism on 2 GPUs (NCCL): a mixed-adapter batch at TP=2 against the same engine at TP=1.

bf16 weights: splitting a matmul's reduction over two GPUs rounds differently, so greedy runs
may part only at a near-tie of the TP=1 run (its top-2 margin), and logprobs agree to bf16
tolerance until then. Run with and without decode CUDA graphs (the graphs hold the NCCL
all-reduces).
"""

from __future__ import annotations

import gc

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.test_engine_correctness import ADAPTER_SPECS, _jobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

MAX_NEW = 12
LOGPROB_TOL = 0.1  # bf16: ~3 significant digits on logits of magnitude ~10
TIE_MARGIN = 0.05


def _run(model_dir, adapters, **overrides):
    config = EngineConfig(
        model=str(model_dir), device="cuda", dtype="bfloat16", max_model_len=128, block_size=16,
        max_loras=4, max_lora_rank=16, max_num_seqs=8, gpu_memory_utilization=0.3, **overrides,
    )  # fmt: skip
    engine = LLMEngine(config, adapters)
    try:
        jobs = _jobs(engine.hf_config.vocab_size)
        for i, (prompt, adapter) in enumerate(jobs):
            params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, top_logprobs=2)
            engine.add_request(f"r{i}", prompt, params, adapter)
        out: dict[str, list] = {f"r{i}": [] for i in range(len(jobs))}
        while engine.has_unfinished():
            for delta in engine.step():
                out[delta.request_id].extend(delta.logprobs)
        return out, engine.runner.graphs is not None
    finally:
        engine.close()
        del engine
        gc.collect()  # the next engine sizes its KV pool from the memory this one leaves free
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def tp1(tiny_model_factory, tiny_adapter_factory):
    model_dir = tiny_model_factory("llama")
    adapters = {name: tiny_adapter_factory(model_dir, **spec) for name, spec in ADAPTER_SPECS.items()}
    return model_dir, adapters, _run(model_dir, adapters)[0]


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_tp2_greedy_matches_tp1_on_a_mixed_adapter_batch(tp1, enforce_eager):
    model_dir, adapters, want = tp1
    got, captured = _run(model_dir, adapters, tensor_parallel_size=2, enforce_eager=enforce_eager)
    assert captured == (not enforce_eager)
    compared, worst = 0, 0.0
    for rid, ref in want.items():
        for step, (a, b) in enumerate(zip(got[rid], ref, strict=True)):
            if a.token_id != b.token_id:
                (_, lp1), (_, lp2) = b.top[:2]
                assert lp1 - lp2 < TIE_MARGIN, f"{rid} diverges at step {step} with margin {lp1 - lp2:.3f}"
                break
            worst = max(worst, abs(a.logprob - b.logprob))
            compared += 1
    print(f"tp2 vs tp1 ({'eager' if enforce_eager else 'graphs'}): {compared} tokens, max |dlogprob| {worst:.4f}")
    assert compared >= len(want) * MAX_NEW // 2, "most tokens should be compared, not cut by near-ties"
    assert worst <= LOGPROB_TOL
