"""The CUDA attention backend: Triton store and paged decode, prefill through fused attention.

Decode reads the paged cache with `triton_attention.paged_decode_attention` (graph-capturable).
Prefill of sequences with nothing cached attends over the new tokens only: their K/V are
gathered back from the cache in one `index_select` over `slot_mapping` and handed to torch's
variable-length flash attention (`varlen_attn`, one launch for the whole batch), or, where
that is missing, to one causal SDPA per sequence. A prefill that extends a cached prefix
(prefix caching) gathers each sequence's whole context (cached blocks and new tokens) through
its block table, on the device, and hands queries and keys of different lengths to the same
`varlen_attn` call (causal from the bottom right: query i sees keys up to
i + context - query). A sliding window uses the torch reference, which reads whole blocks and
loops over sequences: a burst of 256 repeated prompts took seconds there.
Measured on H100 (GPU notes): varlen/SDPA prefill is fast; gathering pages for a varlen call
is slower than the Triton decode kernel, hence the split.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.attention import AttentionBackend, context_slots, register_attention_backend, torch_prefill
from engine.context import ForwardContext
from engine.kernels.triton_attention import store_kv, triton_decode

log = logging.getLogger(__name__)

CUDA_BACKEND_NAME = "cuda"


@functools.cache
def _varlen() -> tuple[Callable | None, bool]:
    """torch's varlen_attn and whether it takes `enable_gqa` (absent before torch 2.11)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def sdpa_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: ForwardContext,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """`engine.attention` prefill signature; same semantics as `torch_prefill`."""
    if sliding_window is not None:
        return torch_prefill(q, k_cache, v_cache, ctx, scale, sliding_window)
    if ctx.query_lens != ctx.context_lens_list:
        return _cached_prefix_prefill(q, k_cache, v_cache, ctx, scale)
    num_kv_heads, head_dim = k_cache.shape[2:]
    k = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, ctx.slot_mapping)
    v = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, ctx.slot_mapping)
    varlen_attn, takes_gqa = _varlen()
    if varlen_attn is not None and q.dtype in (torch.float16, torch.bfloat16) and not _varlen_failed:
        extra = {"enable_gqa": True} if takes_gqa else {}
        max_len = ctx.max_query_len
        try:
            return varlen_attn(
                q, k, v, ctx.query_start, ctx.query_start, max_len, max_len,
                scale=scale, window_size=(-1, 0), **extra,
            )  # fmt: skip
        except (RuntimeError, TypeError, ValueError) as exc:
            # Its signature and supported shapes moved between torch releases; the SDPA loop
            # below computes the same thing, only with one launch per sequence.
            _disable_varlen(exc)
    return _sdpa_per_sequence(q, k, v, ctx, scale)


_varlen_failed = False


def _cached_prefix_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: ForwardContext, scale: float
) -> torch.Tensor:
    """Prefill whose sequences start after a cached prefix: queries are the new tokens only,
    keys and values every context token (the new ones were stored by `store_kv` already)."""
    varlen_attn, takes_gqa = _varlen()
    if varlen_attn is None or q.dtype not in (torch.float16, torch.bfloat16) or _varlen_failed:
        return torch_prefill(q, k_cache, v_cache, ctx, scale, None)
    num_kv_heads, head_dim = k_cache.shape[2:]
    slots, cu_k = context_slots(ctx, k_cache.shape[1])
    k = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, slots)
    v = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, slots)
    extra = {"enable_gqa": True} if takes_gqa else {}
    try:
        return varlen_attn(
            q, k, v, ctx.query_start, cu_k, ctx.max_query_len, ctx.max_context_len,
            scale=scale, window_size=(-1, 0), **extra,
        )  # fmt: skip
    except (RuntimeError, TypeError, ValueError) as exc:
        _disable_varlen(exc)
        return torch_prefill(q, k_cache, v_cache, ctx, scale, None)


def _disable_varlen(exc: BaseException) -> None:
    global _varlen_failed
    _varlen_failed = True
    log.warning("varlen_attn is unusable here (%s); prefill falls back to one SDPA per sequence", exc)


def _sdpa_per_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, scale: float
) -> torch.Tensor:
    out = torch.empty_like(q)
    start = 0
    for q_len in ctx.query_lens:
        sl = slice(start, start + q_len)
        out[sl] = F.scaled_dot_product_attention(
            q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=True,
        ).transpose(0, 1)  # fmt: skip
        start += q_len
    return out


CUDA_BACKEND = AttentionBackend(store_kv=store_kv, prefill=sdpa_prefill, decode=triton_decode)


def register_cuda_backend() -> str:
    """Register the backend (idempotent) and return its name for `set_attention_backend`."""
    register_attention_backend(CUDA_BACKEND_NAME, CUDA_BACKEND)
    return CUDA_BACKEND_NAME


def prefill_path() -> str:
    """Which prefill kernel runs for uncached sequences here: "varlen" or "sdpa" (reports)."""
    varlen_attn, _ = _varlen()
    return "sdpa" if varlen_attn is None or _varlen_failed else "varlen"
