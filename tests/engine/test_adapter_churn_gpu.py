"""Adapters loaded on demand under load, on the GPU, as users load the server (not as a benchmark
warms it): 64 adapters of mixed ranks and targets, none loaded beforehand, 16 GPU slots and 24
host slots, 160 concurrent greedy requests with CUDA graphs on. LoRA slices come alive mid-run
(the LoRA graphs recapture while loader threads pin host memory), slots and host copies are
evicted. Every request must finish as asked, and its tokens must equal the same request run
alone, up to a bf16 near-tie (tests/engine/test_gpu_engine.py explains why ties may flip). Then
the same prompts again, every one a prefix-cache hit.

GPU-only (skipped on CPU).
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from adapters.config import AdapterConfig
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from load_tests.synthetic_adapters import write_adapter

pytestmark = pytest.mark.gpu

NUM_ADAPTERS = 64
GPU_SLOTS = 16
HOST_SLOTS = 24
NUM_REQUESTS = 160
MAX_TOKENS = 12
TOP = 5
TIE_NATS = 0.15  # bf16: a flipped choice within this gap of the reference's best is a near-tie
TARGET_SETS = [
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "v_proj"),
    ("gate_proj", "up_proj", "down_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
]


@pytest.fixture(scope="module")
def churn_setup(tiny_model_factory, tmp_path_factory):
    model_dir = tiny_model_factory("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2)
    config = json.loads((model_dir / "config.json").read_text())
    root = tmp_path_factory.mktemp("churn-root")
    for i in range(NUM_ADAPTERS):
        write_adapter(root / f"ad{i:02d}", config, rank=(4, 8, 16)[i % 3], targets=TARGET_SETS[i % 4], seed=100 + i)
    return model_dir, root, int(config["vocab_size"])


def _engine(model_dir: Path, root: Path) -> AsyncEngine:
    config = EngineConfig(model=str(model_dir), device="cuda", dtype="bfloat16", max_model_len=256,
                          max_num_seqs=192, max_loras=GPU_SLOTS, max_lora_rank=16, num_kv_blocks=4096)
    adapters = AdapterConfig(adapter_root=root, max_cpu_adapters=HOST_SLOTS, load_workers=4)
    return AsyncEngine(config, served_model_name="churn", adapter_config=adapters)


def _workload(vocab: int) -> list[tuple[str, list[int], str | None]]:
    rng = random.Random(7)
    out = []
    for i in range(NUM_REQUESTS):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 40))]
        adapter = None if i % 9 == 0 else f"ad{rng.randrange(NUM_ADAPTERS):02d}"
        out.append((f"r{i}", prompt, adapter))
    return out


async def _one(engine: AsyncEngine, rid: str, prompt: list[int], adapter: str | None) -> dict:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, top_logprobs=TOP)
    tokens, tops, finish, error = [], [], None, None
    async for delta in engine.generate(rid, prompt, params, adapter):
        tokens += delta.token_ids
        tops += [dict(lp.top) for lp in delta.logprobs]
        finish, error = delta.finish_reason, delta.error
    return {"tokens": tokens, "top": tops, "finish": finish, "error": error}


def _check_against_alone(got: dict, alone: dict, what: str) -> str:
    """"equal" or "near_tie"; fails the test on any other difference."""
    assert got["finish"] == "length" and got["error"] is None, f"{what}: {got['finish']} {got['error']}"
    for i, (have, want) in enumerate(zip(got["tokens"], alone["tokens"], strict=True)):
        if have != want:
            top = alone["top"][i]
            assert have in top, f"{what}: token {i} {have} is not among the reference's top {TOP}"
            gap = top[want] - top[have]
            assert gap <= TIE_NATS, f"{what}: token {i} {have} is {gap:.3f} nats below the reference's {want}"
            return "near_tie"
    return "equal"


def test_on_demand_adapters_under_load_match_each_request_alone(churn_setup):
    model_dir, root, vocab = churn_setup
    work = _workload(vocab)

    async def main():
        engine = _engine(model_dir, root)
        await engine.start()
        try:
            burst = await asyncio.gather(*(_one(engine, rid, p, a) for rid, p, a in work))
            core = engine._core
            runner = core.runner
            totals = core.adapters.totals()
            lora_version = runner.graphs.lora_version
            repeat = await asyncio.gather(*(_one(engine, rid + "-again", p, a) for rid, p, a in work))
            hits = core.scheduler.block_manager.num_cache_hits
            alone = [await _one(engine, rid + "-alone", p, a) for rid, p, a in work]
            return burst, repeat, alone, totals, lora_version, runner.capture_failures, core.num_failed_steps, hits
        finally:
            await engine.shutdown()

    burst, repeat, alone, totals, lora_version, capture_failures, failed_steps, hits = asyncio.run(main())
    assert capture_failures == 0 and failed_steps == 0
    assert lora_version is not None, "the LoRA decode graphs were never captured"
    assert totals.get("adapter_gpu_evictions", 0) > 0 and totals.get("adapter_host_evictions", 0) > 0, totals
    assert hits > 0, "the repeated prompts never hit the prefix cache"
    outcomes = [_check_against_alone(g, a, rid) for g, a, (rid, _, _) in zip(burst, alone, work, strict=True)]
    outcomes += [_check_against_alone(g, a, rid + " (repeat)") for g, a, (rid, _, _) in zip(repeat, alone, work,
                                                                                             strict=True)]
    # This tiny random model's logits are flat (about a fifth of greedy runs meet a near-tie; the
    # GPU soak sees the same share on the llama-1b shape). A wrong adapter or a stale slot would
    # part most runs at their first tokens, far beyond the tolerance: most must still be equal.
    assert outcomes.count("equal") >= len(outcomes) // 2, outcomes.count("near_tie")
