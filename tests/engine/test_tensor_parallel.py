"""Tensor parallelism on the CPU: sharded layers, sharded LoRA and a whole engine.

Two kinds of check:
- one process with ranks simulated by explicit (rank, size): concatenating the column shards
  and summing the row partials gives the unsharded layer, LoRA included (the arithmetic);
- two processes over gloo (this one is rank 0, a spawned one rank 1): the real collectives,
  and an engine at tensor_parallel_size=2 against one at 1 on a mixed-adapter batch.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from engine import distributed
from engine.config import EngineConfig
from engine.context import ForwardContext, LoraContext, set_context
from engine.llm_engine import LLMEngine
from engine.lora.layers import LoRALinear
from engine.lora.slots import LoraSlots
from engine.models.layers import FusedLinear
from engine.models.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from engine.sampling_params import SamplingParams
from engine.tp_driver import WorkerDiedError
from tests.engine.test_engine_correctness import ADAPTER_SPECS, _jobs
from tests.engine.test_lora_layers import (
    HIDDEN,
    INTER,
    KV,
    SEGMENTS,
    SHAPES,
    Q,
    fake_model,
    random_adapter,
)

HEAD_DIM = 4  # Q = 4 heads, KV = 2 heads of the shapes borrowed from test_lora_layers


# ---------------------------------------------------------------- one process, simulated ranks
@pytest.mark.parametrize(("heads", "kv_heads", "world"), [(4, 2, 2), (4, 4, 2), (8, 2, 4), (4, 1, 4), (8, 8, 1)])
def test_qkv_shards_give_each_rank_whole_heads_and_the_kv_heads_they_read(heads, kv_heads, world):
    hidden, d = 8, 4
    gen = torch.Generator().manual_seed(0)
    w = torch.randn((heads + 2 * kv_heads) * d, hidden, generator=gen)
    wq, wk, wv = w.split([heads * d, kv_heads * d, kv_heads * d])
    x = torch.randn(3, hidden, generator=gen)
    full_q, full_k = (x @ wq.T).view(3, heads, d), (x @ wk.T).view(3, kv_heads, d)
    group = heads // kv_heads
    qs = []
    for rank in range(world):
        layer = QKVParallelLinear(hidden, d, heads, kv_heads, bias=False, dtype=torch.float32, rank=rank, size=world)
        for i, part in enumerate((wq, wk, wv)):
            layer.weight_loader(layer.weight, part, i)
        q, k, _ = layer(x).split(layer.output_sizes, dim=-1)
        q, k = q.view(3, layer.num_heads, d), k.view(3, layer.num_kv_heads, d)
        qs.append(q)
        local_group = layer.num_heads // layer.num_kv_heads
        for j in range(layer.num_heads):  # the KV head local query head j reads is the one its global head reads
            global_head = rank * layer.num_heads + j
            torch.testing.assert_close(k[:, j // local_group], full_k[:, global_head // group])
    torch.testing.assert_close(torch.cat(qs, dim=1), full_q)


@pytest.mark.parametrize(("heads", "kv_heads", "world", "match"), [
    (6, 2, 4, "num_attention_heads"), (4, 3, 2, "num_key_value_heads"), (8, 3, 4, "num_key_value_heads"),
])  # fmt: skip
def test_heads_that_do_not_split_are_refused(heads, kv_heads, world, match):
    with pytest.raises(ValueError, match=match):
        QKVParallelLinear(8, 4, heads, kv_heads, bias=False, dtype=torch.float32, rank=0, size=world)


def _full_weights(gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    def w(out, inp, bias):
        return torch.randn(out, inp, generator=gen) / inp**0.5, torch.randn(out, generator=gen) if bias else None

    return {"qkv_proj": w(Q + 2 * KV, HIDDEN, True), "o_proj": w(HIDDEN, Q, True),
            "gate_up_proj": w(2 * INTER, HIDDEN, False), "down_proj": w(HIDDEN, INTER, True)}  # fmt: skip


_SLICES = {"qkv_proj": [Q, KV, KV], "o_proj": [HIDDEN], "gate_up_proj": [INTER, INTER], "down_proj": [HIDDEN]}


def _sharded_module(name: str, rank: int, world: int, weight: torch.Tensor, bias: torch.Tensor | None):
    f32 = torch.float32
    has_bias = bias is not None
    if name == "qkv_proj":
        module = QKVParallelLinear(HIDDEN, HEAD_DIM, Q // HEAD_DIM, KV // HEAD_DIM, has_bias, f32, rank, world)
    elif name == "gate_up_proj":
        module = ColumnParallelLinear(HIDDEN, [INTER, INTER], has_bias, f32, rank=rank, size=world)
    else:
        module = RowParallelLinear(weight.shape[1], [HIDDEN], has_bias, f32, rank=rank, size=world)
    for param, full in ((module.weight, weight), (module.bias, bias)):
        if full is None:
            continue
        if len(_SLICES[name]) == 1:
            module.weight_loader(param, full, None)
        else:  # one checkpoint tensor per slice, as the loader hands them
            for i, piece in enumerate(full.split(_SLICES[name])):
                module.weight_loader(param, piece, i)
    return module


def _full_module(weight: torch.Tensor, bias: torch.Tensor | None, slices: list[int]) -> FusedLinear:
    module = FusedLinear(weight.shape[1], slices, bias is not None, torch.float32)
    module.weight.data.copy_(weight)
    if bias is not None:
        module.bias.data.copy_(bias)
    return module


def _adapters(gen: torch.Generator) -> dict[int, object]:
    every = dict.fromkeys(SHAPES, 4)
    return {0: random_adapter(every, gen, name="all"),
            1: random_adapter({"q_proj": 2, "v_proj": 8, "down_proj": 3}, gen, name="qv-down"),
            2: random_adapter({"o_proj": 5, "up_proj": 6}, gen, name="o-up")}  # fmt: skip


def test_sharded_layers_with_lora_compose_to_the_unsharded_computation():
    gen = torch.Generator().manual_seed(3)
    weights = [_full_weights(gen) for _ in range(2)]
    adapters = _adapters(gen)
    world = 2

    def model_of(make):
        return fake_model(modules=lambda i: {name: make(name, *weights[i][name]) for name in _SLICES})

    full = LoraSlots(model_of(lambda name, w, b: _full_module(w, b, _SLICES[name])), num_slots=3, max_rank=8)
    shards = [
        LoraSlots(model_of(lambda name, w, b, r=r: _sharded_module(name, r, world, w, b)), num_slots=3, max_rank=8)
        for r in range(world)
    ]
    assert shards[0].expected_shapes() == full.expected_shapes()  # adapters are validated unsharded
    for slot, adapter in adapters.items():
        for slots in (full, *shards):
            slots.load(slot, adapter)
    _set_lora_context(SEGMENTS)
    try:
        _compare_layers(full, shards, gen)
    finally:
        set_context(None)


def _compare_layers(full: LoraSlots, shards: list[LoraSlots], gen: torch.Generator) -> None:
    for layer in range(2):
        for name in _SLICES:
            module: LoRALinear = full.layers[layer][name]
            x = torch.randn(SEGMENTS[-1][1], module.in_features, generator=gen)
            want = module(x)
            parts = [s.layers[layer][name] for s in shards]
            if isinstance(parts[0].base_layer, RowParallelLinear):
                # Each rank sees its input columns; its partial (delta included) sums to the whole.
                got = sum(p(x.narrow(1, *p.base_layer.in_shard)) for p in parts)
            else:
                outs = [p(x).split(p.output_sizes, dim=-1) for p in parts]
                got = torch.cat([torch.cat([o[i] for o in outs], dim=-1) for i in range(len(_SLICES[name]))], -1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"layer {layer} {name}")


def test_adapter_of_the_wrong_shape_is_refused_before_any_copy():
    layer = ColumnParallelLinear(HIDDEN, [INTER, INTER], False, torch.float32, rank=1, size=2)
    with pytest.raises(ValueError, match="expected A"):
        layer.shard_lora(0, torch.zeros(2, HIDDEN), torch.zeros(INTER // 2, 2))


# ------------------------------------------------------------------------- two processes, gloo
VOCAB = 37  # not a multiple of the world size: the last shard has padding rows


def _collectives(rank: int, world: int, init_method: str) -> None:
    """Run on every rank: each sharded module against the unsharded math, through real collectives."""
    distributed.init_tensor_parallel(rank, world, init_method, torch.device("cpu"), timeout_s=60)
    try:
        gen = torch.Generator().manual_seed(5)  # the same draws on every rank
        table = torch.randn(VOCAB, HIDDEN, generator=gen)
        ids = torch.randint(0, VOCAB, (11,), generator=gen)
        hidden = torch.randn(4, HIDDEN, generator=gen)
        embed = VocabParallelEmbedding(VOCAB, HIDDEN, torch.float32)
        head = ParallelLMHead(VOCAB, HIDDEN, torch.float32)
        embed.weight_loader(embed.weight, table)
        head.weight_loader(head.weight, table)
        torch.testing.assert_close(embed(ids), table[ids])
        torch.testing.assert_close(head(hidden), hidden @ table.T)

        w, b = torch.randn(HIDDEN, INTER, generator=gen), torch.randn(HIDDEN, generator=gen)
        a_full, b_full = torch.randn(3, INTER, generator=gen), torch.randn(HIDDEN, 3, generator=gen)
        x = torch.randn(SEGMENTS[-1][1], INTER, generator=gen)
        row = _sharded_module("down_proj", rank, world, w, b)
        assert row.in_features == INTER // world
        wrapped = LoRALinear(row, num_slots=3, max_rank=4)
        wrapped.set_lora(1, [row.shard_lora(0, a_full, b_full)])
        _set_lora_context(SEGMENTS)
        try:
            got = wrapped(x.narrow(1, *row.in_shard))
        finally:
            set_context(None)
        want = x @ w.T + b
        slot1 = slice(*next((s, e) for s, e, slot in SEGMENTS if slot == 1))
        want[slot1] += x[slot1] @ a_full.T @ b_full.T
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

        assert distributed.min_over_ranks(10 + rank) == 10
        assert distributed.broadcast_object({"from": rank}) == {"from": 0}
        gathered = distributed.all_gather_last_dim(torch.full((2, 3), float(rank)))
        torch.testing.assert_close(gathered, torch.tensor([[0.0] * 3 + [1.0] * 3] * 2))
    finally:
        distributed.destroy_tensor_parallel()


def _set_lora_context(seg_bounds) -> None:
    num_tokens = seg_bounds[-1][1]
    token_slots = torch.full((num_tokens,), -1, dtype=torch.int64)
    for start, end, slot in seg_bounds:
        token_slots[start:end] = slot
    lora = LoraContext(token_slots, torch.tensor([s for s, _, _ in seg_bounds] + [num_tokens]),
                       torch.tensor([slot for _, _, slot in seg_bounds]), seg_bounds, True)  # fmt: skip
    empty = torch.zeros(0, dtype=torch.int32)
    set_context(ForwardContext(True, empty.long(), empty, empty, empty.view(0, 0), 0, 0, [], [], 16, lora))


def test_collectives_and_sharded_modules_over_gloo(tmp_path: Path):
    init_method = f"file://{tmp_path / 'rendezvous'}"
    helper = multiprocessing.get_context("spawn").Process(target=_collectives, args=(1, 2, init_method))
    helper.start()
    try:
        _collectives(0, 2, init_method)
    finally:
        helper.join(60)
        if helper.is_alive():
            helper.terminate()
    assert helper.exitcode == 0, "rank 1 failed (its traceback is in the captured stderr)"


MAX_NEW = 6


def _greedy(engine: LLMEngine, jobs) -> dict[str, tuple[list[int], list[float]]]:
    for i, (prompt, adapter) in enumerate(jobs):
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, top_logprobs=2)
        engine.add_request(f"r{i}", prompt, params, adapter)
    out: dict[str, tuple[list[int], list[float]]] = {f"r{i}": ([], []) for i in range(len(jobs))}
    for _ in range(500):
        if not engine.has_unfinished():
            break
        for delta in engine.step():
            out[delta.request_id][0].extend(delta.token_ids)
            out[delta.request_id][1].extend(lp.logprob for lp in delta.logprobs)
    assert not engine.has_unfinished()
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: tied embeddings, per-head q/k norm
def test_engine_at_tp2_matches_tp1_on_a_mixed_adapter_batch(arch, tiny_model_factory, tiny_adapter_factory):
    model_dir = tiny_model_factory(arch)
    adapters = {name: tiny_adapter_factory(model_dir, **spec) for name, spec in ADAPTER_SPECS.items()}
    jobs = _jobs(300)
    settings = dict(model=str(model_dir), device="cpu", dtype="float32", max_model_len=64, block_size=4,
                    max_loras=4, max_lora_rank=16)  # fmt: skip
    want = _greedy(LLMEngine(EngineConfig(**settings), adapters), jobs)
    # A pool small enough to preempt: recomputation must also agree across ranks.
    engine = LLMEngine(EngineConfig(**settings, tensor_parallel_size=2, num_kv_blocks=24), adapters)
    try:
        assert distributed.tp_size() == 2
        qkv = engine.model.model.layers[0].self_attn.qkv_proj
        assert qkv.base_layer.num_heads == 2  # this rank holds half the heads
        got = _greedy(engine, jobs)
        assert engine.scheduler_preemptions() > 0
        if arch == "llama":  # a worker that dies is reported at the next step, not waited on
            worker = engine._tp._processes[0]
            worker.kill()
            worker.join(10)
            engine.add_request("after", jobs[0][0], SamplingParams(max_tokens=2))
            with pytest.raises(WorkerDiedError, match="exited"):
                engine.step()
    finally:
        engine.close()
    assert distributed.tp_size() == 1
    for request_id, (tokens, logprobs) in want.items():
        assert got[request_id][0] == tokens, f"{request_id}: tokens differ"
        assert got[request_id][1] == pytest.approx(logprobs, abs=1e-4), f"{request_id}: logprobs differ"


def test_bad_tensor_parallel_settings_are_refused():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(model="m", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="cuda:r"):
        EngineConfig(model="m", device="cuda:1", tensor_parallel_size=2)


def test_a_dora_adapter_is_refused_at_tp2_with_the_reason(tiny_model_factory, tiny_adapter_factory):
    """Its per-column scaling is not applied across ranks yet: refused on load, never served wrong."""
    from engine.errors import AdapterFailedError

    model_dir = tiny_model_factory("llama")
    dora = tiny_adapter_factory(model_dir, rank=4, alpha=8.0, target_modules=("q_proj",), seed=31, use_dora=True)
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", max_model_len=64,
                                    block_size=4, max_loras=2, max_lora_rank=16, tensor_parallel_size=2,
                                    num_kv_blocks=24))
    try:
        with pytest.raises(AdapterFailedError, match="tensor parallelism"):
            engine.add_adapter("dora", dora)
    finally:
        engine.close()
