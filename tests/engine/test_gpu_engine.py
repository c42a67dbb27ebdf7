"""The CUDA path (Triton kernels, fused prefill, decode CUDA graphs) against the torch reference.

GPU-only, except the bookkeeping test at the end. Greedy decoding on bf16 weights: two correct implementations may still pick
different tokens where the top two logits are within rounding of each other, so a run may
diverge only at such a near-tie (checked against the reference's own margin); everything
before the divergence must agree exactly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import EngineConfig
from engine.kv_cache import allocate_kv_cache
from engine.llm_engine import LLMEngine
from engine.lora.slots import LoraSlots
from engine.model_runner import ModelRunner
from engine.models import build_model
from engine.sampling_params import SamplingParams
from scheduler.sequence import Sequence
from tests.engine.test_engine_correctness import ADAPTER_SPECS, _jobs

gpu = pytest.mark.gpu

BLOCK = 16
MAX_LEN = 256
VOCAB = 512
STEPS = 12


def _near_tie(ref_logits: torch.Tensor) -> bool:
    top = ref_logits.float().topk(2).values
    return bool(top[0] - top[1] <= 0.02 * top[0].abs() + 0.05)


def _assert_greedy_agree(tokens, ref_tokens, ref_logits) -> None:
    """tokens/ref_tokens [seq][step]; ref_logits [step] -> [seq, vocab]. Agree up to a near-tie."""
    for i, (got, want) in enumerate(zip(tokens, ref_tokens, strict=True)):
        for step, (a, b) in enumerate(zip(got, want, strict=True)):
            if a != b:
                assert _near_tie(ref_logits[step][i]), f"sequence {i} diverges at step {step}: {a} != {b}"
                break


@dataclasses.dataclass
class _Weights:
    name: str
    modules: dict
    max_rank: int


def _adapter(cfg, rank: int, targets: tuple[str, ...], seed: int, shapes) -> _Weights:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(cfg.num_hidden_layers):
        for short in targets:
            d_in, d_out = shapes[short]
            a = torch.randn(rank, d_in, generator=gen) / d_in**0.5
            b = torch.randn(d_out, rank, generator=gen) / rank**0.5
            modules[(layer, short)] = (a.to("cuda", torch.bfloat16), b.to("cuda", torch.bfloat16))
    return _Weights(f"a{seed}", modules, rank)


def _build_lora_model(num_slots: int = 4):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = build_model(cfg, torch.bfloat16, "cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5 if "embed" not in name else 1.0)
        model.lm_head.weight.mul_(4.0)  # peaked logits: fewer near-ties
    slots = LoraSlots(model, num_slots=num_slots, max_rank=16)
    allocate_kv_cache(model, 8 * MAX_LEN // BLOCK * 4, BLOCK, torch.bfloat16, "cuda")
    return model, slots


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def lora_setup():
    model, slots = _build_lora_model()
    cfg, shapes = model.config, slots.expected_shapes()
    slots.load(0, _adapter(cfg, 4, ("q_proj", "v_proj"), 1, shapes))
    slots.load(1, _adapter(cfg, 16, ALL, 2, shapes))
    slots.load(2, _adapter(cfg, 8, ("o_proj", "down_proj"), 3, shapes))
    return model, slots


@pytest.fixture(scope="module")
def lora_model(lora_setup):
    return lora_setup[0]


@pytest.fixture(scope="module")
def lora_slots(lora_setup):
    return lora_setup[1]


def _greedy(runner: ModelRunner, prompts, slots, steps: int = STEPS):
    """Prefill then `steps - 1` decode steps; tokens [seq][step] and logits [step] (reference order)."""
    per_seq = MAX_LEN // BLOCK
    seqs = []
    for i, prompt in enumerate(prompts):
        seq = Sequence(seq_id=i, prompt_token_ids=list(prompt), max_tokens=steps)
        seq.block_table = list(range(i * per_seq, (i + 1) * per_seq))
        seqs.append(seq)
    logits = runner.execute(seqs, [len(p) for p in prompts], True, slots)
    history = []
    for step in range(steps):
        history.append(logits.float().cpu())
        for seq, token in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            seq.output_token_ids.append(token)
            seq.num_computed_tokens = seq.num_tokens - 1
        if step + 1 < steps:
            logits = runner.execute(seqs, [1] * len(seqs), False, slots)
    return [s.output_token_ids for s in seqs], history


def _prompts(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 90, (n,), generator=gen).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=gen).tolist() for k in lengths]


SLOTS = [-1, 0, 1, 2, 1, -1, 2]


@gpu
def test_gpu_kernels_match_torch_reference(lora_model):
    prompts = _prompts(len(SLOTS), 0)
    ref_tokens, ref_logits = _greedy(ModelRunner(lora_model, BLOCK, "cuda", kernels="torch"), prompts, SLOTS)
    tokens, logits = _greedy(ModelRunner(lora_model, BLOCK, "cuda"), prompts, SLOTS)
    err = (logits[0] - ref_logits[0]).norm() / ref_logits[0].norm()
    assert err < 3e-2, f"prefill logits differ by {err:.3g}"
    _assert_greedy_agree(tokens, ref_tokens, ref_logits)
    # The adapters matter: the same prompts on the base model give other logits.
    base_tokens, base_logits = _greedy(ModelRunner(lora_model, BLOCK, "cuda"), prompts, [-1] * len(SLOTS), 1)
    assert (base_logits[0][1:5] - logits[0][1:5]).abs().max() > 0.5


@gpu
@pytest.mark.parametrize("slots", [SLOTS, [-1] * 5, [1] * 3, [2, 0, -1, 1, 0, 2, 1, -1, 0]])
def test_cuda_graphs_match_eager_and_reference(lora_model, slots):
    prompts = _prompts(len(slots), len(slots))
    runner = ModelRunner(lora_model, BLOCK, "cuda")
    runner.capture_decode_graphs(max_batch=8, max_model_len=MAX_LEN)
    if len(slots) <= 8:
        assert runner.graphs.size_for(len(slots)) is not None
    graph_tokens, graph_logits = _greedy(runner, prompts, slots)
    eager_tokens, eager_logits = _greedy(ModelRunner(lora_model, BLOCK, "cuda"), prompts, slots)
    ref_tokens, ref_logits = _greedy(ModelRunner(lora_model, BLOCK, "cuda", kernels="torch"), prompts, slots)
    _assert_greedy_agree(graph_tokens, eager_tokens, eager_logits)
    _assert_greedy_agree(graph_tokens, ref_tokens, ref_logits)
    # Decode logits of step 1 (graph replay) against the reference, before any divergence.
    err = (graph_logits[1] - ref_logits[1]).norm() / ref_logits[1].norm()
    if graph_tokens[0][0] == ref_tokens[0][0]:
        assert err < 5e-2


@gpu
def test_graph_replay_follows_slot_changes(lora_model, lora_slots):
    """A slot loaded after capture is read by the next replay (weights and rank); clearing restores base."""
    runner = ModelRunner(lora_model, BLOCK, "cuda")
    runner.capture_decode_graphs(max_batch=4, max_model_len=MAX_LEN)
    prompts = _prompts(3, 99)
    before, _ = _greedy(runner, prompts, [3, 3, 3], 4)
    weights = _adapter(lora_model.config, 16, ("q_proj", "v_proj", "down_proj"), 7, lora_slots.expected_shapes())
    lora_slots.load(3, weights)
    try:
        after, after_logits = _greedy(runner, prompts, [3, 3, 3], 4)
        ref, ref_logits = _greedy(ModelRunner(lora_model, BLOCK, "cuda", kernels="torch"), prompts, [3, 3, 3], 4)
        _assert_greedy_agree(after, ref, ref_logits)
        assert (after_logits[1] - ref_logits[1]).norm() / ref_logits[1].norm() < 5e-2
    finally:
        lora_slots.clear(3)
    cleared, _ = _greedy(runner, prompts, [3, 3, 3], 4)
    assert cleared == before


@gpu
def test_lora_graphs_recapture_when_a_slice_comes_alive():
    model, slots = _build_lora_model()
    cfg, shapes = model.config, slots.expected_shapes()
    slots.load(0, _adapter(cfg, 8, ("q_proj", "v_proj"), 21, shapes))
    runner = ModelRunner(model, BLOCK, "cuda")
    runner.capture_decode_graphs(max_batch=4, max_model_len=MAX_LEN)
    prompts = _prompts(3, 5)
    _greedy(runner, prompts, [0, -1, 0], 3)  # LoRA graphs captured with q and v live only
    first = runner.graphs.lora_version
    slots.load(1, _adapter(cfg, 16, ("down_proj", "gate_proj"), 22, shapes))
    tokens, logits = _greedy(runner, prompts, [1, 0, 1], 4)
    assert runner.graphs.lora_version != first
    ref_tokens, ref_logits = _greedy(ModelRunner(model, BLOCK, "cuda", kernels="torch"), prompts, [1, 0, 1], 4)
    _assert_greedy_agree(tokens, ref_tokens, ref_logits)
    assert (logits[1] - ref_logits[1]).norm() / ref_logits[1].norm() < 5e-2


# ------------------------------------------------------------------ whole engine


def _engine_results(model_dir, adapters, **overrides):
    config = EngineConfig(
        model=str(model_dir), device="cuda", dtype="bfloat16", max_model_len=128, block_size=16,
        max_loras=4, max_lora_rank=16, max_num_seqs=8, gpu_memory_utilization=0.3, **overrides,
    )  # fmt: skip
    engine = LLMEngine(config, adapters)
    jobs = _jobs(engine.hf_config.vocab_size)
    for i, (prompt, adapter) in enumerate(jobs):
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, top_logprobs=2)
        engine.add_request(f"r{i}", prompt, params, adapter)
    tokens = {f"r{i}": [] for i in range(len(jobs))}
    tops = {f"r{i}": [] for i in range(len(jobs))}
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id].extend(delta.token_ids)
            tops[delta.request_id].extend(lp.top for lp in delta.logprobs)
    return engine, tokens, tops


@gpu
def test_engine_on_cuda_matches_reference_kernels(tiny_model_factory, tiny_adapter_factory):
    model_dir = tiny_model_factory("llama")
    adapters = {name: tiny_adapter_factory(model_dir, **spec) for name, spec in ADAPTER_SPECS.items()}
    engine, tokens, _ = _engine_results(model_dir, adapters)
    assert engine.runner.graphs is not None and engine.runner.use_triton
    assert engine.num_kv_blocks > 0
    del engine
    ref_engine, ref_tokens, ref_tops = _engine_results(model_dir, adapters, kernels="torch", enforce_eager=True)
    assert ref_engine.runner.graphs is None
    for rid, want in ref_tokens.items():
        got = tokens[rid]
        for step, (a, b) in enumerate(zip(got, want, strict=True)):
            if a != b:
                (t1, lp1), (t2, lp2) = ref_tops[rid][step][:2]
                assert lp1 - lp2 < 0.05, f"{rid} diverges at step {step} with margin {lp1 - lp2:.3f}"
                break


@gpu
def test_one_step_in_flight_on_cuda_matches_one_step_at_a_time(tiny_model_factory, tiny_adapter_factory):
    """Graph decode steps whose input ids are read from the previous step's sampled ids on the
    device give exactly the tokens and logprobs of the synchronous engine (same batches)."""
    model_dir = tiny_model_factory("llama")
    adapters = {name: tiny_adapter_factory(model_dir, **spec) for name, spec in ADAPTER_SPECS.items()}
    engine, tokens, tops = _engine_results(model_dir, adapters, async_scheduling=True)
    assert engine.runner.graphs is not None
    del engine
    _, want_tokens, want_tops = _engine_results(model_dir, adapters, async_scheduling=False)
    assert tokens == want_tokens
    assert tops == want_tops


def test_live_slices_follow_loads_and_version_only_grows():
    """Bookkeeping behind slice skipping and graph recapture (runs on the CPU)."""
    from engine.lora.layers import LoRALinear
    from engine.models.layers import FusedLinear

    layer = LoRALinear(FusedLinear(8, [4, 2, 2], bias=False, dtype=torch.float32), num_slots=3, max_rank=4)
    assert layer.live_slices == [] and layer.live_version == 0
    a, b = torch.ones(2, 8), torch.ones(2, 2)
    layer.set_lora(0, [None, (a, b), None])
    assert layer.live_slices == [1] and layer.live_version == 1
    layer.set_lora(1, [None, (a, b), (a, b)])
    assert layer.live_slices == [1, 2] and layer.live_version == 2
    assert layer.ranks[2].tolist() == [0, 2, 0]
    layer.reset_lora(1)
    assert layer.live_slices == [1] and layer.live_version == 2  # dying needs no recapture
    layer.set_lora(0, [None, None, None])
    assert layer.live_slices == [] and layer.ranks[1].tolist() == [0, 0, 0]
