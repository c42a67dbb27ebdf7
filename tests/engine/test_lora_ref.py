from __future__ import annotations

import pytest
import torch

from adapters.peft_format import MODULE_PARENTS
from adapters.weights import load_adapter
from engine.kernels.lora_ref import lora_bgmv, lora_shrink_expand_sgmv

IN, OUT, SLOTS, MAX_RANK = 24, 20, 3, 8


def make_stacks(ranks: list[int], gen: torch.Generator, max_rank: int = MAX_RANK):
    """Stacks with each slot's true rank zero-padded to max_rank; returns (a_stack, b_stack, exact pairs)."""
    a_stack = torch.zeros(len(ranks), max_rank, IN)
    b_stack = torch.zeros(len(ranks), OUT, max_rank)
    exact = []
    for slot, rank in enumerate(ranks):
        a, b = torch.randn(rank, IN, generator=gen), torch.randn(OUT, rank, generator=gen)
        a_stack[slot, :rank], b_stack[slot, :, :rank] = a, b
        exact.append((a, b))
    return a_stack, b_stack, exact


def slots_from_segments(seg_bounds, num_tokens):
    token_slots = torch.full((num_tokens,), -1, dtype=torch.int64)
    for start, end, slot in seg_bounds:
        token_slots[start:end] = slot
    return token_slots


SEGMENTS = [(0, 2, -1), (2, 5, 0), (5, 6, 2), (6, 10, 1)]


def test_sgmv_matches_dense_per_segment_and_touches_only_its_columns():
    gen = torch.Generator().manual_seed(0)
    a_stack, b_stack, exact = make_stacks([2, 4, 8], gen)
    x = torch.randn(10, IN, generator=gen)
    y0 = torch.randn(10, 50, generator=gen)
    y = y0.clone()
    lora_shrink_expand_sgmv(y, x, a_stack, b_stack, SEGMENTS, out_offset=7)
    expected = y0.clone()
    for start, end, slot in SEGMENTS:
        if slot >= 0:
            a, b = exact[slot]
            expected[start:end, 7:27] += x[start:end] @ a.T @ b.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[:2], y0[:2])  # base tokens bit-identical
    assert torch.equal(y[:, :7], y0[:, :7]) and torch.equal(y[:, 27:], y0[:, 27:])


def test_bgmv_equals_sgmv_and_a_per_token_loop():
    gen = torch.Generator().manual_seed(1)
    a_stack, b_stack, _ = make_stacks([3, 8, 1], gen)
    x = torch.randn(10, IN, generator=gen)
    y0 = torch.randn(10, OUT + 5, generator=gen)
    y_sgmv, y_bgmv = y0.clone(), y0.clone()
    lora_shrink_expand_sgmv(y_sgmv, x, a_stack, b_stack, SEGMENTS, out_offset=5)
    lora_bgmv(y_bgmv, x, a_stack, b_stack, slots_from_segments(SEGMENTS, 10), out_offset=5)
    torch.testing.assert_close(y_bgmv, y_sgmv, rtol=1e-5, atol=1e-5)
    assert torch.equal(y_bgmv[:2], y0[:2])

    # Unsorted slots (decode order need not follow slots) against the Semantics loop.
    token_slots = torch.tensor([1, -1, 0, 2, 0, -1, 1, 2, 2, 0])
    y = y0.clone()
    lora_bgmv(y, x, a_stack, b_stack, token_slots, out_offset=0)
    expected = y0.clone()
    for t, s in enumerate(token_slots.tolist()):
        if s >= 0:
            expected[t, :OUT] += (x[t] @ a_stack[s].T) @ b_stack[s].T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[[1, 5]], y0[[1, 5]])


def test_all_base_and_empty_inputs_are_noops():
    gen = torch.Generator().manual_seed(2)
    a_stack, b_stack, _ = make_stacks([2, 2, 2], gen)
    x, y0 = torch.randn(4, IN, generator=gen), torch.randn(4, OUT, generator=gen)
    y = y0.clone()
    lora_shrink_expand_sgmv(y, x, a_stack, b_stack, [(0, 4, -1), (4, 4, 1)], 0)
    lora_bgmv(y, x, a_stack, b_stack, torch.full((4,), -1), 0)
    assert torch.equal(y, y0)


@pytest.mark.parametrize("rank", [1, 3, 16])
def test_low_rank_in_max_rank_64_buffer_equals_exact_rank(rank):
    gen = torch.Generator().manual_seed(rank)
    a_stack, b_stack, exact = make_stacks([rank, rank], gen, max_rank=64)
    a, b = exact[1]
    x = torch.randn(6, IN, generator=gen)
    expected = (x @ a.T) @ b.T
    for run in (
        lambda y: lora_shrink_expand_sgmv(y, x, a_stack, b_stack, [(0, 6, 1)], 0),
        lambda y: lora_bgmv(y, x, a_stack, b_stack, torch.ones(6, dtype=torch.int64), 0),
    ):
        y = torch.zeros(6, OUT)
        run(y)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_low_precision_accumulates_in_fp32():
    gen = torch.Generator().manual_seed(3)
    a_stack, b_stack, _ = make_stacks([8, 8, 8], gen)
    x = torch.randn(10, IN, generator=gen)
    ref = torch.zeros(10, OUT)
    lora_shrink_expand_sgmv(
        ref, x.bfloat16().float(), a_stack.bfloat16().float(), b_stack.bfloat16().float(), SEGMENTS, 0
    )
    y = torch.zeros(10, OUT, dtype=torch.bfloat16)
    lora_shrink_expand_sgmv(y, x.bfloat16(), a_stack.bfloat16(), b_stack.bfloat16(), SEGMENTS, 0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.to(torch.bfloat16).float(), rtol=0, atol=0)


# --- numerical oracle: PEFT's own LoRA layers on a real tiny model ---------------------------------

ADAPTERS = [
    dict(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj")),
    dict(
        rank=4,
        alpha=16.0,
        target_modules=("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        rank_pattern={"layers.1.mlp.down_proj": 2, "o_proj": 3},
        alpha_pattern={"layers.0.self_attn.k_proj": 5.0},
    ),
    dict(rank=8, alpha=8.0, use_rslora=True, target_modules=("q_proj", "o_proj", "down_proj")),
]


@pytest.mark.parametrize("adapter_kwargs", ADAPTERS, ids=["r2-qv", "r4-patterns", "r8-rslora"])
def test_folded_weights_through_lora_ref_match_peft(tiny_model_factory, tiny_adapter_factory, adapter_kwargs):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_factory("llama")
    adapter_dir = tiny_adapter_factory(model_dir, **adapter_kwargs)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir
    ).eval()
    weights = load_adapter(adapter_dir, "oracle", expected_shapes=None, num_layers=2, max_rank=MAX_RANK)
    gen = torch.Generator().manual_seed(4)
    checked = 0
    for layer_idx, layer in enumerate(peft_model.base_model.model.model.layers):
        for short, parent in MODULE_PARENTS.items():
            module = getattr(getattr(layer, parent), short)
            if not isinstance(module, LoraLayer):
                assert (layer_idx, short) not in weights.modules
                continue
            base = module.base_layer
            x = torch.randn(5, base.in_features, generator=gen)
            with torch.no_grad():
                peft_delta = module(x) - base(x)
            a, b = weights.modules[(layer_idx, short)]
            rank = a.shape[0]
            a_stack = torch.zeros(2, MAX_RANK, base.in_features)
            b_stack = torch.zeros(2, base.out_features, MAX_RANK)
            a_stack[1, :rank], b_stack[1, :, :rank] = a, b
            y = torch.zeros(5, base.out_features)
            lora_shrink_expand_sgmv(y, x, a_stack, b_stack, [(0, 5, 1)], 0)
            torch.testing.assert_close(y, peft_delta, rtol=1e-5, atol=1e-5)
            y = torch.zeros(5, base.out_features)
            lora_bgmv(y, x, a_stack, b_stack, torch.ones(5, dtype=torch.int64), 0)
            torch.testing.assert_close(y, peft_delta, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == 2 * len(adapter_kwargs["target_modules"]) == len(weights.modules)
