"""DoRA adapters served in mixed batches, against transformers + peft (float32 on the CPU)."""

from __future__ import annotations

import random

import pytest
import torch

from adapters.errors import AdapterWeightsError
from adapters.weights import load_adapter
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.peft_oracle import peft_greedy

MAX_NEW = 6
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECS = {
    "dora-qv": dict(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), seed=21, use_dora=True),
    "dora-all": dict(rank=8, alpha=16.0, target_modules=ALL, seed=22, use_dora=True, rank_pattern={"down_proj": 2}),
    "lora-ko": dict(rank=4, alpha=8.0, target_modules=("k_proj", "o_proj"), seed=23),
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v carry a bias
def setup(request, tiny_model_factory, tiny_adapter_factory):
    model_dir = tiny_model_factory(request.param)
    adapters = {name: tiny_adapter_factory(model_dir, **spec) for name, spec in SPECS.items()}
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    rng = random.Random(5)
    names = [None, *SPECS]
    jobs = [([rng.randrange(3, vocab) for _ in range(rng.randint(3, 17))], names[i % len(names)]) for i in range(8)]
    return model_dir, adapters, jobs, peft_greedy(model_dir, adapters, jobs, MAX_NEW)


def _run(model_dir, adapters, jobs, **overrides):
    config = {"device": "cpu", "dtype": "float32", "max_model_len": 128, "block_size": 4, "max_loras": 4,
              "max_lora_rank": 16, **overrides}
    engine = LLMEngine(EngineConfig(model=str(model_dir), **config), adapters)
    for i, (prompt, adapter) in enumerate(jobs):
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, top_logprobs=1)
        engine.add_request(f"r{i}", prompt, params, adapter)
    out = {f"r{i}": ([], []) for i in range(len(jobs))}
    while engine.has_unfinished():
        for delta in engine.step():
            out[delta.request_id][0].extend(delta.token_ids)
            out[delta.request_id][1].extend(lp.logprob for lp in delta.logprobs)
    return out


def test_dora_adapters_in_a_mixed_batch_equal_peft(setup):
    model_dir, adapters, jobs, refs = setup
    got = _run(model_dir, adapters, jobs)
    for i, ref in enumerate(refs):
        tokens, logprobs = got[f"r{i}"]
        assert tokens == ref.token_ids, f"request {i} ({jobs[i][1]}): tokens differ"
        assert logprobs == pytest.approx(ref.logprobs, abs=1e-5), f"request {i} ({jobs[i][1]}): logprobs differ"


def test_a_slot_that_held_a_dora_adapter_serves_a_plain_one_exactly(setup):
    """Two slots: DoRA and plain adapters take turns in them; every output still equals peft."""
    model_dir, adapters, jobs, refs = setup
    got = _run(model_dir, adapters, jobs, max_loras=2)
    for i, ref in enumerate(refs):
        assert got[f"r{i}"][0] == ref.token_ids, f"request {i} ({jobs[i][1]})"
        assert got[f"r{i}"][1] == pytest.approx(ref.logprobs, abs=1e-5)


def test_a_dora_adapter_without_its_magnitudes_is_refused(tiny_model_factory, tiny_adapter_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = tiny_model_factory("llama")
    source = tiny_adapter_factory(model_dir, **SPECS["dora-qv"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k or ".0." not in k},
              broken / "adapter_model.safetensors")
    with pytest.raises(AdapterWeightsError, match="lora_magnitude_vector is missing"):
        load_adapter(broken, "broken", None, None, 16)
    assert load_adapter(source, "ok", None, None, 16).magnitudes  # the intact one loads


@pytest.mark.gpu
def test_dora_on_the_gpu_equals_the_cpu_path_in_bf16(setup):
    """Triton LoRA kernels plus the DoRA scaling, eager prefill and graph-replayed decode."""
    model_dir, adapters, jobs, refs = setup
    got = _run(model_dir, adapters, jobs, device="cuda", dtype="bfloat16")
    for i, ref in enumerate(refs):
        tokens, logprobs = got[f"r{i}"]
        # bf16 against float32 peft: the first token equal, logprobs within bf16 noise until
        # the first (near-tie) divergence.
        assert tokens[0] == ref.token_ids[0], f"request {i} ({jobs[i][1]})"
        for j, (a, b) in enumerate(zip(tokens, ref.token_ids, strict=True)):
            assert abs(logprobs[j] - ref.logprobs[j]) < 0.15 or a != b
            if a != b:
                break
    assert torch.cuda.is_available()
