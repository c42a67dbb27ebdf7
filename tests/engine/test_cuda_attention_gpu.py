"""The CUDA prefill over a cached prefix (queries shorter than contexts) against the torch reference.

GPU-only (skipped on CPU): `varlen_attn` needs CUDA and half precision.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention import torch_prefill
from engine.context import ForwardContext

pytestmark = pytest.mark.gpu


def _context(ctx_lens: list[int], query_lens: list[int], block_size: int, num_blocks: int,
             gen: torch.Generator) -> ForwardContext:  # fmt: skip
    needed = [-(-c // block_size) for c in ctx_lens]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, start = [], 0
    for n in needed:
        tables.append(perm[start : start + n])
        start += n
    width = max(needed)
    slot_mapping, query_start = [], [0]
    for table, c, n in zip(tables, ctx_lens, query_lens, strict=True):
        slot_mapping += [table[p // block_size] * block_size + p % block_size for p in range(c - n, c)]
        query_start.append(query_start[-1] + n)
    dev = "cuda"
    return ForwardContext(
        is_prefill=True,
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
        query_start=torch.tensor(query_start, dtype=torch.int32, device=dev),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
        block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
        max_query_len=max(query_lens),
        max_context_len=max(ctx_lens),
        query_lens=query_lens,
        context_lens_list=ctx_lens,
        block_size=block_size,
    )


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 64), (32, 8, 128), (8, 8, 64)])
def test_cached_prefix_prefill_matches_torch_reference(block_size, num_heads, num_kv_heads, head_dim):
    ca = pytest.importorskip("engine.kernels.cuda_attention")
    gen = torch.Generator().manual_seed(0)
    # Full prefix hits (1 new token), partial hits, an uncached one mixed in, long contexts.
    ctx_lens = [1, 17, 300, 1024, 64, 513, 2000]
    query_lens = [1, 1, 44, 1, 64, 1, 300]
    num_blocks = sum(-(-c // block_size) for c in ctx_lens) + 8
    ctx = _context(ctx_lens, query_lens, block_size, num_blocks, gen)
    dtype = torch.bfloat16
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to("cuda", dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to("cuda", dtype)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to("cuda", dtype)
    scale = head_dim**-0.5
    out = ca.sdpa_prefill(q, k_cache, v_cache, ctx, scale, None)
    assert ca.prefill_path() == "varlen", "varlen_attn fell back: the fast path was not measured"
    ref = torch_prefill(q.float(), k_cache.float(), v_cache.float(), ctx, scale, None)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 2e-2, f"relative error {err:.3g}"
