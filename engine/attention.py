"""Paged attention: store new K/V into the block cache, attend over each sequence's context.

The `Attention` module is the seam; the math lives behind a small backend table so a GPU
kernel can replace the torch reference without touching the models:

    register_attention_backend("triton", AttentionBackend(store_kv=..., prefill=..., decode=...))
    set_attention_backend("triton")

Semantics (per sequence s with context length C and query length Q, GQA group G):
    query i sits at position p = C - Q + i and sees keys at positions j with
    j <= p and (sliding_window is None or j > p - sliding_window);
    query head h reads kv head h // G; out = softmax(q . k * scale) @ v.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.context import ForwardContext, get_context

# (q [T, Hq, D], k_cache, v_cache [blocks, block_size, Hkv, D], ctx, scale, sliding_window) -> [T, Hq, D]
AttendFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, ForwardContext, float, "int | None"], torch.Tensor
]
# (k, v [T, Hkv, D], k_cache, v_cache, slot_mapping [T]) -> None, writes in place
StoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class AttentionBackend:
    store_kv: StoreFn
    prefill: AttendFn
    decode: AttendFn


def torch_store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write token t's K/V at flat slot `slot_mapping[t]` (block * block_size + offset)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def torch_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: ForwardContext,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Reference prefill: one SDPA per sequence over its context gathered through its block table."""
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    start = 0
    for i, (q_len, ctx_len) in enumerate(zip(ctx.query_lens, ctx.context_lens_list, strict=True)):
        num_blocks = -(-ctx_len // block_size)
        blocks = ctx.block_tables[i, :num_blocks].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx_len]
        v = v_cache[blocks].flatten(0, 1)[:ctx_len]
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        k_pos = torch.arange(ctx_len, device=q.device)
        mask = _visible(q_pos[:, None], k_pos[None, :], sliding_window)
        out[start : start + q_len] = _sdpa(
            q[start : start + q_len][None], k[None], v[None], mask[None], scale
        )[0]
        start += q_len
    return out


def context_slots(ctx: ForwardContext, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat cache slots of every context token, sequence after sequence, and the cumulative
    context lengths [batch + 1] (int32), computed on the device without a host sync."""
    lens = ctx.context_lens.to(torch.int64)
    total = sum(ctx.context_lens_list)
    device = lens.device
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(lens, 0, out=cu[1:])
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens, output_size=total)
    pos = torch.arange(total, device=device) - cu[seq]
    blocks = ctx.block_tables.to(torch.int64)[seq, pos // block_size]
    return blocks * block_size + pos % block_size, cu.to(torch.int32)


def torch_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: ForwardContext,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Reference decode (one query per sequence), batched: pad every context to the longest."""
    block_size = k_cache.shape[1]
    batch = q.shape[0]
    num_blocks = -(-ctx.max_context_len // block_size)
    # Padding entries are -1; clamping reads block 0, whose keys the mask then hides.
    blocks = ctx.block_tables[:, :num_blocks].long().clamp(min=0)
    k = k_cache[blocks].reshape(batch, num_blocks * block_size, *k_cache.shape[2:])
    v = v_cache[blocks].reshape(batch, num_blocks * block_size, *v_cache.shape[2:])
    ctx_lens = ctx.context_lens.to(device=q.device, dtype=torch.long)
    k_pos = torch.arange(num_blocks * block_size, device=q.device)
    mask = _visible((ctx_lens - 1)[:, None], k_pos[None, :], sliding_window) & (
        k_pos[None, :] < ctx_lens[:, None]
    )
    return _sdpa(q[:, None], k, v, mask[:, None, :], scale)[:, 0]


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, Q, Hq, D], k/v [B, C, Hkv, D], mask [B, Q, C] bool -> [B, Q, Hq, D]."""
    group = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None], scale=scale
    )
    return out.transpose(1, 2)


TORCH_BACKEND = AttentionBackend(store_kv=torch_store_kv, prefill=torch_prefill, decode=torch_decode)

_BACKENDS: dict[str, AttentionBackend] = {"torch": TORCH_BACKEND}
_active_backend: AttentionBackend = TORCH_BACKEND


def register_attention_backend(name: str, backend: AttentionBackend) -> None:
    _BACKENDS[name] = backend


def set_attention_backend(name: str) -> None:
    """Select the backend every `Attention` module uses from the next forward on."""
    global _active_backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; registered: {sorted(_BACKENDS)}")
    _active_backend = _BACKENDS[name]


def get_attention_backend() -> AttentionBackend:
    return _active_backend


class Attention(nn.Module):
    """Causal GQA attention over the paged KV cache described by the forward context.

    `k_cache` / `v_cache` are [num_blocks, block_size, num_kv_heads, head_dim], bound by
    `allocate_kv_cache`. Before they are bound (e.g. a warm-up forward to measure memory)
    a prefill attends over its new tokens only, which is right when nothing is cached.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {sliding_window}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.k_cache.numel() == 0:
            out = self._attend_uncached(q, k, v, ctx)
        else:
            backend = _active_backend
            backend.store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
            attend = backend.prefill if ctx.is_prefill else backend.decode
            out = attend(q, self.k_cache, self.v_cache, ctx, self.scale, self.sliding_window)
        return out.reshape(-1, self.num_heads * self.head_dim)

    def _attend_uncached(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        if ctx.query_lens != ctx.context_lens_list:
            raise RuntimeError("attention over cached tokens needs a KV cache: call allocate_kv_cache first")
        out = torch.empty_like(q)
        start = 0
        for q_len in ctx.query_lens:
            pos = torch.arange(q_len, device=q.device)
            mask = _visible(pos[:, None], pos[None, :], self.sliding_window)
            sl = slice(start, start + q_len)
            out[sl] = _sdpa(q[sl][None], k[sl][None], v[sl][None], mask[None], self.scale)[0]
            start += q_len
        return out

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"sliding_window={self.sliding_window}"
        )
