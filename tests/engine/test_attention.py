"""Paged attention (torch reference) against dense causal SDPA on the same tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention import (
    TORCH_BACKEND,
    Attention,
    AttentionBackend,
    register_attention_backend,
    set_attention_backend,
)
from engine.context import ForwardContext, set_context

HEAD_DIM = 8


def _dense_reference(q, k, v, num_cached: int, sliding_window: int | None) -> torch.Tensor:
    """q [Q, Hq, D] at positions num_cached.., k/v [C, Hkv, D] at 0..C-1 -> [Q, Hq, D]."""
    q_len, ctx_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    q_pos = torch.arange(num_cached, num_cached + q_len)[:, None]
    k_pos = torch.arange(ctx_len)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=HEAD_DIM**-0.5
    )
    return out.transpose(0, 1)


class _Batch:
    """Random sequences with scattered block tables, their full K/V and the context to run a step."""

    def __init__(self, ctx_lens, query_lens, num_heads, num_kv_heads, block_size, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ctx_lens, self.query_lens, self.block_size = list(ctx_lens), list(query_lens), block_size
        blocks_needed = [-(-c // block_size) for c in ctx_lens]
        perm = torch.randperm(sum(blocks_needed) + 3, generator=gen).tolist()
        self.tables, start = [], 0
        for n in blocks_needed:
            self.tables.append(perm[start : start + n])
            start += n
        self.num_blocks = len(perm)
        self.k = [torch.randn(c, num_kv_heads, HEAD_DIM, generator=gen) for c in ctx_lens]
        self.v = [torch.randn(c, num_kv_heads, HEAD_DIM, generator=gen) for c in ctx_lens]
        self.q = [torch.randn(n, num_heads, HEAD_DIM, generator=gen) for n in query_lens]

    def slots(self, i: int, positions) -> list[int]:
        bs = self.block_size
        return [self.tables[i][p // bs] * bs + p % bs for p in positions]

    def context(self, is_prefill: bool) -> ForwardContext:
        slot_mapping, query_start = [], [0]
        for i, (c, n) in enumerate(zip(self.ctx_lens, self.query_lens, strict=True)):
            slot_mapping += self.slots(i, range(c - n, c))
            query_start.append(query_start[-1] + n)
        width = max(len(t) for t in self.tables)
        return ForwardContext(
            is_prefill=is_prefill,
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long),
            query_start=torch.tensor(query_start, dtype=torch.int32),
            context_lens=torch.tensor(self.ctx_lens, dtype=torch.int32),
            block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in self.tables], dtype=torch.int32),
            max_query_len=max(self.query_lens),
            max_context_len=max(self.ctx_lens),
            query_lens=self.query_lens,
            context_lens_list=self.ctx_lens,
            block_size=self.block_size,
        )

    def run(self, attn: Attention, is_prefill: bool) -> torch.Tensor:
        """Pre-fill the cache with each sequence's prefix, then run the new tokens through `attn`."""
        kv_heads = attn.num_kv_heads
        attn.k_cache = torch.zeros(self.num_blocks, self.block_size, kv_heads, HEAD_DIM)
        attn.v_cache = torch.zeros_like(attn.k_cache)
        for i, (c, n) in enumerate(zip(self.ctx_lens, self.query_lens, strict=True)):
            cached = torch.tensor(self.slots(i, range(c - n)), dtype=torch.long)
            attn.k_cache.view(-1, kv_heads, HEAD_DIM)[cached] = self.k[i][: c - n]
            attn.v_cache.view(-1, kv_heads, HEAD_DIM)[cached] = self.v[i][: c - n]
        new = [slice(c - n, c) for c, n in zip(self.ctx_lens, self.query_lens, strict=True)]
        q = torch.cat(self.q).flatten(1)
        k = torch.cat([k[s] for k, s in zip(self.k, new, strict=True)]).flatten(1)
        v = torch.cat([v[s] for v, s in zip(self.v, new, strict=True)]).flatten(1)
        set_context(self.context(is_prefill))
        try:
            return attn(q, k, v)
        finally:
            set_context(None)

    def reference(self, sliding_window: int | None) -> torch.Tensor:
        outs = [
            _dense_reference(q, k, v, c - n, sliding_window)
            for q, k, v, c, n in zip(self.q, self.k, self.v, self.ctx_lens, self.query_lens, strict=True)
        ]
        return torch.cat(outs).flatten(1)


def _attention(num_heads: int, num_kv_heads: int, sliding_window: int | None = None) -> Attention:
    return Attention(num_heads, num_kv_heads, HEAD_DIM, HEAD_DIM**-0.5, sliding_window)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (4, 2), (8, 1)])
def test_prefill_matches_dense(block_size: int, num_heads: int, num_kv_heads: int) -> None:
    batch = _Batch([7, 1, 19], [7, 1, 19], num_heads, num_kv_heads, block_size)
    out = batch.run(_attention(num_heads, num_kv_heads), is_prefill=True)
    torch.testing.assert_close(out, batch.reference(None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [2, 8])
def test_prefill_with_cached_prefix_matches_dense(block_size: int) -> None:
    # Chunked prefill / prefix caching: the query is the tail of a longer context.
    batch = _Batch([12, 9, 5], [4, 9, 1], 4, 2, block_size)
    out = batch.run(_attention(4, 2), is_prefill=True)
    torch.testing.assert_close(out, batch.reference(None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (6, 2)])
def test_decode_matches_dense(block_size: int, num_heads: int, num_kv_heads: int) -> None:
    batch = _Batch([1, 9, 23, 16], [1, 1, 1, 1], num_heads, num_kv_heads, block_size)
    out = batch.run(_attention(num_heads, num_kv_heads), is_prefill=False)
    torch.testing.assert_close(out, batch.reference(None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("is_prefill", [True, False])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_sliding_window_matches_dense(is_prefill: bool, window: int) -> None:
    query_lens = [10, 3, 1] if is_prefill else [1, 1, 1]
    batch = _Batch([14, 6, 2], query_lens, 4, 2, 4)
    out = batch.run(_attention(4, 2, window), is_prefill=is_prefill)
    torch.testing.assert_close(out, batch.reference(window), atol=1e-5, rtol=1e-5)
    # The window must matter here, or this test would not check anything.
    assert not torch.allclose(out, batch.reference(None), atol=1e-3)


def test_new_tokens_are_stored_at_their_slots() -> None:
    batch = _Batch([6, 3], [2, 3], 2, 2, 4)
    attn = _attention(2, 2)
    batch.run(attn, is_prefill=True)
    for i, c in enumerate(batch.ctx_lens):
        slots = torch.tensor(batch.slots(i, range(c)))
        torch.testing.assert_close(attn.k_cache.view(-1, 2, HEAD_DIM)[slots], batch.k[i])
        torch.testing.assert_close(attn.v_cache.view(-1, 2, HEAD_DIM)[slots], batch.v[i])


def test_uncached_prefill_matches_dense() -> None:
    # Before a cache is bound (memory-profiling warm-up) a fresh prefill still works.
    batch = _Batch([5, 8], [5, 8], 4, 2, 4)
    attn = _attention(4, 2)
    set_context(batch.context(is_prefill=True))
    try:
        out = attn(
            torch.cat(batch.q).flatten(1), torch.cat(batch.k).flatten(1), torch.cat(batch.v).flatten(1)
        )
    finally:
        set_context(None)
    torch.testing.assert_close(out, batch.reference(None), atol=1e-5, rtol=1e-5)


def test_backend_table_routes_calls() -> None:
    seen = []

    def decode(q, k_cache, v_cache, ctx, scale, window):
        seen.append("decode")
        return TORCH_BACKEND.decode(q, k_cache, v_cache, ctx, scale, window)

    register_attention_backend("spy", AttentionBackend(TORCH_BACKEND.store_kv, TORCH_BACKEND.prefill, decode))
    set_attention_backend("spy")
    try:
        batch = _Batch([5], [1], 2, 1, 4)
        out = batch.run(_attention(2, 1), is_prefill=False)
    finally:
        set_attention_backend("torch")
    assert seen == ["decode"]
    torch.testing.assert_close(out, batch.reference(None), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="nope"):
        set_attention_backend("nope")


def test_rejects_bad_head_counts() -> None:
    with pytest.raises(ValueError, match="multiple"):
        Attention(6, 4, HEAD_DIM, 1.0)


def test_kv_cache_sizing_and_binding(tiny_model_factory) -> None:
    from transformers import AutoConfig

    from engine.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block, num_blocks_for_budget
    from engine.models import build_model

    cfg = AutoConfig.from_pretrained(tiny_model_factory("qwen3"))
    per_block = kv_cache_bytes_per_block(cfg, 16, torch.bfloat16)
    # K and V, per layer, per slot: num_kv_heads * head_dim bf16 values.
    assert per_block == 2 * cfg.num_hidden_layers * 16 * cfg.num_key_value_heads * cfg.head_dim * 2
    assert num_blocks_for_budget(per_block * 5 + 1, cfg, 16, torch.bfloat16) == 5
    with pytest.raises(ValueError, match="smaller than one block"):
        num_blocks_for_budget(per_block - 1, cfg, 16, torch.bfloat16)

    model = build_model(cfg, torch.float32, "cpu")
    caches = allocate_kv_cache(model, num_blocks=3, block_size=16, dtype=torch.float32, device="cpu")
    attns = [layer.self_attn.attn for layer in model.model.layers]
    assert len(caches) == len(attns) == cfg.num_hidden_layers
    for (k, v), attn in zip(caches, attns, strict=True):
        assert attn.k_cache is k and attn.v_cache is v and k.data_ptr() != v.data_ptr()
        assert k.shape == (3, 16, cfg.num_key_value_heads, cfg.head_dim)
        assert not k.any()
    assert caches[0][0].data_ptr() != caches[1][0].data_ptr()


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_context_slots_list_every_context_token_through_the_block_table(block_size: int) -> None:
    from engine.attention import context_slots

    batch = _Batch([5, 33, 17, 1], [2, 1, 17, 1], 4, 2, block_size, seed=3)
    slots, cu = context_slots(batch.context(is_prefill=True), block_size)
    expected = [s for i, c in enumerate(batch.ctx_lens) for s in batch.slots(i, range(c))]
    assert slots.tolist() == expected
    assert cu.tolist() == [0, 5, 38, 55, 56]
    assert cu.dtype == torch.int32
