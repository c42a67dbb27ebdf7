"""Triton paged attention for decode (one query token per sequence, GQA) and the KV-cache store.

Cache layout is `engine.attention`'s: k_cache / v_cache [num_blocks, block_size, num_kv_heads,
head_dim]; block_tables [B, max_blocks] int32 padded with -1; context_lens [B] int32 count the
new token too. One program owns one (sequence, kv head) and all G = Hq / Hkv query heads that
read it, so each K/V row is loaded once for the whole group (the q tile is padded to 16 rows
for the tensor-core dot; those rows cost arithmetic, not memory traffic). When that leaves too
few programs to fill the GPU, the context is split into partitions (flash-decoding): each
writes an unnormalised partial output with its running max and sum, and a second kernel
merges them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine.attention import AttentionBackend, torch_prefill
from engine.context import ForwardContext
from engine.kernels import pdl

_LOG2E = 1.4426950408889634
# Stands for "no sliding window": larger than any context, so C - window < 0.
_NO_WINDOW = 1 << 30


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, ml_ptr,
    scale_log2, window,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    G: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # engine/kernels/pdl.py
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(lens_ptr + b)
    first = tl.maximum(ctx_len - window, 0)
    if SPLIT:
        # Partitions share out this sequence's own attended tiles, not the longest context the
        # launch allows for: a short context still spreads over many programs. Whole tiles, so
        # a partition's first tile always holds a visible key (a fully masked tile would make
        # the running max -inf and the rescale NaN), and a partition past the end runs none.
        first_tile = first // BLOCK_N
        per_split = tl.cdiv(tl.cdiv(ctx_len, BLOCK_N) - first_tile, tl.num_programs(2))
        tile = first_tile + split * per_split
        lo = tl.maximum(tile * BLOCK_N, first)
        hi = tl.minimum(ctx_len, (tile + per_split) * BLOCK_N)
    else:
        lo = first
        hi = ctx_len

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * G + offs_g
    mask_g = offs_g < G
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    # Tiles start on a multiple of BLOCK_N (itself a multiple of PAGE): whole pages per load.
    for start in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = (offs_n >= lo) & (offs_n < hi)
        page = tl.load(bt_row + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
        within = offs_n % PAGE
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            k_ptr + (page * stride_kb + within * stride_kt + kvh * stride_kh)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + (page * stride_vb + within * stride_vt + kvh * stride_vh)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    o_ptrs = (
        o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    )
    o_mask = mask_g[:, None] & mask_d[None, :]
    if SPLIT:
        # Unnormalised partial; an empty partition leaves m = -inf, l = 0 and acc = 0.
        tl.store(o_ptrs, acc, mask=o_mask)
        ml_ptrs = ml_ptr + ((b * tl.num_programs(1) * G + heads) * tl.num_programs(2) + split) * 2
        tl.store(ml_ptrs, m_i, mask=mask_g)
        tl.store(ml_ptrs + 1, l_i, mask=mask_g)
    else:
        # An empty context (a padded batch row) yields zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _merge_splits_kernel(
    part_ptr, ml_ptr, o_ptr, num_splits,
    stride_pb, stride_ph, stride_ps, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    ml_row = ml_ptr + ((b * tl.num_programs(1) + h) * num_splits + offs_s) * 2
    m = tl.load(ml_row, mask=mask_s, other=float("-inf"))
    l_part = tl.load(ml_row + 1, mask=mask_s, other=0.0)
    m_max = tl.max(m, axis=0)
    # All partitions empty (no context): keep exp2's argument finite, the weights all zero.
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)
    w = tl.exp2(m - m_max)
    denom = tl.sum(w * l_part, axis=0)
    part = tl.load(
        part_ptr + b.to(tl.int64) * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=mask_s[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    out = tl.sum(part * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d,
        out.to(o_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    HEAD_DIM: tl.constexpr, NUM_HEADS: tl.constexpr, PAGE: tl.constexpr, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    page = slot // PAGE
    within = slot % PAGE
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    head = offs // HEAD_DIM
    d = offs % HEAD_DIM
    mask = offs < NUM_HEADS * HEAD_DIM
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + head * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + head * stride_vh + d, mask=mask)
    tl.store(
        kc_ptr + page * stride_kcb + within * stride_kct + head * stride_kch + d,
        k.to(kc_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        vc_ptr + page * stride_vcb + within * stride_vct + head * stride_vch + d,
        v.to(vc_ptr.dtype.element_ty),
        mask=mask,
    )


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(programs: int, max_context_len: int, block_n: int, device: torch.device) -> int:
    """Enough partitions to give the GPU ~2 programs per SM, at most one per tile of the longest
    context (each sequence's context is shared out among the partitions in the kernel)."""
    want = 2 * _num_sms(device)
    if programs >= want:
        return 1
    return max(1, min(triton.cdiv(want, programs), triton.cdiv(max_context_len, block_n), 64))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over the paged cache: q [B, Hq, D] -> [B, Hq, D] in q's dtype.

    Semantics:
        G = Hq // Hkv
        for b, h:
            C = context_lens[b]; p = C - 1                     # the query's position
            keys j in [0, C) with (sliding_window is None or j > p - sliding_window)
            K[j] = k_cache[block_tables[b, j // block_size], j % block_size, h // G]   (V alike)
            out[b, h] = softmax(scale * q[b, h] . K[j]) @ V[j]     (float32 softmax)
        a row with no visible key (C == 0) gives zeros.
    `max_context_len` (host int) only picks how many partitions to launch (any value is
    correct: each sequence's context is shared out among them in the kernel); it defaults to
    the block table's capacity, so the launch needs no device sync and suits graph capture.
    `num_splits`, `block_n` (tokens per tile, a multiple of block_size) and `num_warps` are
    tuning knobs; the defaults are what measured best (load_tests/results/KERNELS.md).
    """
    batch, hq, d = q.shape
    _, page, hkv, d_cache = k_cache.shape
    if d_cache != d or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"q {list(q.shape)} does not match caches {list(k_cache.shape)} / {list(v_cache.shape)}"
        )
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("head_dim must be the innermost contiguous dimension of q and the caches")
    group = hq // hkv
    block_d = triton.next_power_of_2(d)
    if block_n is None:
        block_n = max(page, 64 if d <= 128 else 32)
    if block_n % page:
        raise ValueError(f"block_n {block_n} must be a multiple of the cache block size {page}")
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * page
    if num_splits is None:
        num_splits = _num_splits(batch * hkv, max_context_len, block_n, q.device)
    if out is None:
        out = torch.empty_like(q)
    meta = dict(
        G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_D=block_d, PAGE=page,
        BLOCK_N=block_n, SPLIT=num_splits > 1, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=2, **pdl.launch_args(q),
    )  # fmt: skip
    args = (
        scale * _LOG2E, sliding_window or _NO_WINDOW,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
    )  # fmt: skip
    grid = (batch, hkv, num_splits)
    if num_splits == 1:
        _paged_decode_kernel[grid](
            q, k_cache, v_cache, block_tables, context_lens, out, out, *args,
            out.stride(0), out.stride(1), 0, **meta,
        )  # fmt: skip
        return out
    part = torch.empty(batch, hq, num_splits, d, device=q.device, dtype=torch.float32)
    ml = torch.empty(batch, hq, num_splits, 2, device=q.device, dtype=torch.float32)
    _paged_decode_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, part, ml, *args,
        part.stride(0), part.stride(1), part.stride(2), **meta,
    )  # fmt: skip
    _merge_splits_kernel[(batch, hq)](
        part, ml, out, num_splits,
        part.stride(0), part.stride(1), part.stride(2), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4, **pdl.launch_args(q),
    )  # fmt: skip
    return out


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write token t's K/V at flat slot `slot_mapping[t]` (block * block_size + offset), in place.

    Semantics:
        for t in range(T):
            s = slot_mapping[t]
            if s >= 0:                      # -1: a padding token, nothing stored
                k_cache[s // block_size, s % block_size] = k[t]      (v alike, cast to the cache dtype)
    """
    t, hkv, d = k.shape
    if v.shape != k.shape or tuple(k_cache.shape[2:]) != (hkv, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k {list(k.shape)} / v {list(v.shape)} do not match caches {list(k_cache.shape)}")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("head_dim must be the innermost contiguous dimension of k, v and the caches")
    if t == 0:
        return
    block = min(triton.next_power_of_2(hkv * d), 4096)
    _store_kv_kernel[(t, triton.cdiv(hkv * d, block))](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        HEAD_DIM=d, NUM_HEADS=hkv, PAGE=k_cache.shape[1], BLOCK=block, num_warps=4, **pdl.launch_args(k),
    )  # fmt: skip


def triton_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: ForwardContext,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """`engine.attention` decode signature over `paged_decode_attention`."""
    return paged_decode_attention(
        q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, sliding_window
    )


def triton_backend() -> AttentionBackend:
    """Triton store and decode; prefill stays on the torch reference for now."""
    return AttentionBackend(store_kv=store_kv, prefill=torch_prefill, decode=triton_decode)
