"""Triton LoRA kernels over stacked slot buffers: shrink (x @ A.T) and expand (h @ B.T added into y).

Same weights and semantics as `engine.kernels.lora_ref`:
    a_stack [num_slots, max_rank, in]    b_stack [num_slots, out, max_rank]   (scale folded into B)
    slot -1 = base model: that token's row of y is never read or written.
Two ways to find a token's slot:
    SGMV (segments): tokens sorted by slot form runs `seg_starts[i]:seg_starts[i+1]` of slot
        `seg_slots[i]`; each program works on a tile of up to BLOCK_M tokens of one run with
        tensor-core dots, so an adapter's A/B is read once per tile, not once per token.
    BGMV (per token): `token_slots[t]`, any order; one program per token (matrix-vector).
Both shrink into a float32 h [T, max_rank] (decode splits the long K loop over several
programs to fill the GPU; they meet by atomic add) and expand from it, so y gets one float32
accumulation per element and one rounding, like the reference. Optional `ranks` [num_slots]
int32 gives each slot's true rank: rows/columns past it are not read (less traffic when ranks
are mixed under one max_rank); without it the zero padding is read and contributes zeros.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine.context import LoraContext
from engine.kernels import pdl


@triton.jit
def _find_tile(seg_starts_ptr, seg_slots_ptr, num_segs, BLOCK_M: tl.constexpr, SEG_CAP: tl.constexpr):
    """(slot, first token, end of run) of this program's BLOCK_M-token tile; slot -1: no work.

    Program p takes the p-th tile when every LoRA run is cut into BLOCK_M-token tiles, in run
    order. Every program finds its own from the (small) segment table, so the grid only needs
    the bound cdiv(T, BLOCK_M) + num_segs: no host-side run lengths, same launch for any layout
    of a fixed-size table (what a captured CUDA graph needs).
    """
    pid = tl.program_id(0)
    offs = tl.arange(0, SEG_CAP)
    live = offs < num_segs
    starts = tl.load(seg_starts_ptr + offs, mask=live, other=0)
    ends = tl.load(seg_starts_ptr + offs + 1, mask=live, other=0)
    slots = tl.load(seg_slots_ptr + offs, mask=live, other=-1)
    tiles = tl.where(slots >= 0, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0).to(tl.int32)
    # Inclusive prefix sums never decrease, so the run holding tile `pid` is the first whose
    # prefix exceeds it: the count of prefixes <= pid.
    seg = tl.sum((tl.cumsum(tiles, axis=0) <= pid).to(tl.int32), axis=0)
    before = tl.sum(tl.where(offs < seg, tiles, 0), axis=0)
    inside = seg < num_segs
    seg = tl.minimum(seg, num_segs - 1)
    slot = tl.where(inside, tl.load(seg_slots_ptr + seg), -1)
    m0 = tl.load(seg_starts_ptr + seg) + (pid - before) * BLOCK_M
    end = tl.load(seg_starts_ptr + seg + 1)
    return slot, m0, end


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, h_ptr, seg_starts_ptr, seg_slots_ptr, ranks_ptr,
    K, R, split_k, num_segs,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_hm, stride_hr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SEG_CAP: tl.constexpr,
    HAS_RANKS: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # engine/kernels/pdl.py
        gdc_launch_dependents()
    # The segment table and ranks are host copies made before the step: no kernel of the step
    # writes them, so the tile is found while the previous kernel drains (before the wait).
    slot, m0, end = _find_tile(seg_starts_ptr, seg_slots_ptr, num_segs, BLOCK_M, SEG_CAP)
    pid_k = tl.program_id(1)
    if (slot < 0) | (m0 >= end):
        return
    rank = R
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
    if USE_PDL:
        gdc_wait()
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < end
    mask_r = offs_r < rank
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K * split_k):
        mask_k = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(xt, tl.trans(at), input_precision=PRECISION)
        x_ptrs += BLOCK_K * split_k * stride_xk
        a_ptrs += BLOCK_K * split_k * stride_ak
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_r[None, :] * stride_hr
    h_mask = mask_m[:, None] & (offs_r[None, :] < R)
    # K splits meet in a zeroed h by atomic add. (Measured: cheaper than writing per-split
    # partials for the expand to sum, whose 3-D load cost more than the memset saved.)
    if split_k == 1:
        tl.store(h_ptrs, acc, mask=h_mask)
    else:
        tl.atomic_add(h_ptrs, acc, mask=h_mask, sem="relaxed")


@triton.jit
def _sgmv_expand_kernel(
    h_ptr, b_ptr, y_ptr, seg_starts_ptr, seg_slots_ptr, ranks_ptr,
    N, R, num_segs,
    stride_hm, stride_hr, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SEG_CAP: tl.constexpr,
    HAS_RANKS: tl.constexpr, ADD: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # engine/kernels/pdl.py
        gdc_launch_dependents()
    # Before the wait: the tile (segment table: a host copy), the rank and this tile's B (a
    # weight) depend on no kernel of the step; h and y do.
    slot, m0, end = _find_tile(seg_starts_ptr, seg_slots_ptr, num_segs, BLOCK_M, SEG_CAP)
    pid_n = tl.program_id(1)
    if (slot < 0) | (m0 >= end):
        return
    rank = R
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < end
    mask_n = offs_n < N
    mask_r = offs_r < rank
    b = tl.load(
        b_ptr + slot.to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
        mask=mask_n[:, None] & mask_r[None, :],
        other=0.0,
    )
    if USE_PDL:
        gdc_wait()
    h = tl.load(
        h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_r[None, :] * stride_hr,
        mask=mask_m[:, None] & mask_r[None, :],
        other=0.0,
    )
    # h stays float32 (no rounding between the two products, as in the reference).
    acc = tl.dot(h, tl.trans(b.to(tl.float32)), input_precision=PRECISION)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    y_mask = mask_m[:, None] & mask_n[None, :]
    if ADD:
        acc += tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, h_ptr, slots_ptr, ranks_ptr,
    K, R, split_k,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_hm, stride_hr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, HAS_RANKS: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # engine/kernels/pdl.py
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    pid_k = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    rank = R
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_r = offs_r < rank
    x_ptrs = x_ptr + t.to(tl.int64) * stride_xm + offs_k * stride_xk
    a_ptrs = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K * split_k):
        mask_k = offs_k < K - k0
        xv = tl.load(x_ptrs, mask=mask_k, other=0.0).to(tl.float32)
        at = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += at * xv[None, :]
        x_ptrs += BLOCK_K * split_k * stride_xk
        a_ptrs += BLOCK_K * split_k * stride_ak
    h_ptrs = h_ptr + t.to(tl.int64) * stride_hm + offs_r * stride_hr
    if split_k == 1:
        tl.store(h_ptrs, tl.sum(acc, axis=1), mask=offs_r < R)
    else:
        tl.atomic_add(h_ptrs, tl.sum(acc, axis=1), mask=offs_r < R, sem="relaxed")


@triton.jit
def _bgmv_expand_kernel(
    h_ptr, b_ptr, y_ptr, slots_ptr, ranks_ptr,
    N, R,
    stride_hm, stride_hr, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HAS_RANKS: tl.constexpr, ADD: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # engine/kernels/pdl.py
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    rank = R
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < rank
    h = tl.load(h_ptr + t.to(tl.int64) * stride_hm + offs_r * stride_hr, mask=mask_r, other=0.0)
    b = tl.load(
        b_ptr + slot.to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
        mask=mask_n[:, None] & mask_r[None, :],
        other=0.0,
    )
    acc = tl.sum(b.to(tl.float32) * h[None, :], axis=1)
    y_ptrs = y_ptr + t.to(tl.int64) * stride_ym + offs_n * stride_yn
    if ADD:
        acc += tl.load(y_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter on CPU: any small number keeps grids small
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    # float32 stacks are for tests: keep them exact rather than tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_r(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))


def _block_m(num_tokens: int, num_segs: int) -> int:
    """Token rows per tile. Small batches (decode) want many small tiles to fill the GPU; the
    extra A/B re-reads that costs come from L2. Long prefill runs want fewer, taller tiles."""
    mean_run = num_tokens / max(num_segs, 1)
    if num_tokens <= 1024 or mean_run <= 16:
        return 16
    return 32 if mean_run <= 32 else 64


def _seg_grid(num_tokens: int, num_segs: int, block_m: int) -> tuple[int, int]:
    """(programs along the token axis, SEG_CAP): every tile of every run fits in the first."""
    return triton.cdiv(num_tokens, block_m) + num_segs, max(16, triton.next_power_of_2(num_segs))


def _split_k(tiles: int, k: int, block_k: int, device: torch.device) -> int:
    """Split the K loop when too few tiles fill the GPU (decode); the splits meet by atomic add.
    Aim for ~4 programs per SM: each is short (a few K tiles), so more of them hide latency."""
    want = 4 * _num_sms(device)
    if tiles >= want:
        return 1
    return max(1, min(triton.next_power_of_2(triton.cdiv(want, tiles)), triton.cdiv(k, block_k), 32))


def _expand_block_n(n: int, tiles: int, device: torch.device) -> int:
    """Widest output tile that still leaves ~2 programs per SM: fewer, fuller programs."""
    for block_n in (256, 128):
        if tiles * triton.cdiv(n, block_n) >= 2 * _num_sms(device):
            return block_n
    return 64


def _check(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor | None = None) -> None:
    if x.dim() != 2 or a_stack.dim() != 3 or x.shape[1] != a_stack.shape[2]:
        raise ValueError(f"x {list(x.shape)} does not match a_stack {list(a_stack.shape)} [slots, rank, in]")
    if b_stack is not None and (b_stack.dim() != 3 or b_stack.shape[2] != a_stack.shape[1]):
        raise ValueError(f"b_stack {list(b_stack.shape)} does not match a_stack {list(a_stack.shape)}")


def _check_expand(h: torch.Tensor, b_stack: torch.Tensor, y: torch.Tensor, out_offset: int) -> None:
    n, r = b_stack.shape[1], b_stack.shape[2]
    if (
        h.dim() != 2
        or out_offset < 0
        or out_offset + n > y.shape[1]
        or h.shape[1] < r
        or h.shape[0] != y.shape[0]
    ):
        raise ValueError(
            f"y {list(y.shape)} / h {list(h.shape)} cannot take b_stack {list(b_stack.shape)} at column {out_offset}"
        )


def sgmv_shrink(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Segmented shrink: h [T, max_rank] float32 for tokens sorted into slot runs.

    Semantics:
        for i in range(len(seg_slots)):
            s = seg_slots[i]
            if s >= 0:
                for t in range(seg_starts[i], seg_starts[i + 1]):
                    h[t, :] = x[t] @ a_stack[s].T      # float32; rows of base tokens unspecified
    The launch depends on T and len(seg_slots) only (runs may be empty), so a fixed-size
    segment table can be captured in a CUDA graph. `split_k` (how many programs share one K
    loop) is a tuning knob; by default it fills the GPU.
    """
    _check(x, a_stack)
    t, k = x.shape
    r = a_stack.shape[1]
    num_segs = seg_slots.numel()
    block_m = _block_m(t, num_segs)
    block_k = 128
    tiles, seg_cap = _seg_grid(t, num_segs, block_m)
    if split_k is None:
        split_k = _split_k(tiles, k, block_k, x.device)
    out = (torch.zeros if split_k > 1 else torch.empty)(t, r, device=x.device, dtype=torch.float32)
    if t == 0 or num_segs == 0:
        return out
    _sgmv_shrink_kernel[(tiles, split_k)](
        x, a_stack, out, seg_starts, seg_slots, ranks if ranks is not None else seg_slots,
        k, r, split_k, num_segs,
        x.stride(0), x.stride(1), *a_stack.stride(), *out.stride(),
        BLOCK_M=block_m, BLOCK_R=_block_r(r), BLOCK_K=block_k, SEG_CAP=seg_cap,
        HAS_RANKS=ranks is not None, PRECISION=_precision(x.dtype),
        num_warps=4, num_stages=3, **pdl.launch_args(x),
    )  # fmt: skip
    return out


def sgmv_expand(
    h: torch.Tensor,
    b_stack: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    y: torch.Tensor,
    out_offset: int = 0,
    ranks: torch.Tensor | None = None,
    add: bool = True,
    block_n: int | None = None,
) -> None:
    """Segmented expand into the column block y[:, out_offset:out_offset + out], in place.

    Semantics:
        out = b_stack.shape[1]
        for i in range(len(seg_slots)):
            s = seg_slots[i]
            if s >= 0:
                for t in range(seg_starts[i], seg_starts[i + 1]):
                    delta = h[t] @ b_stack[s].T                      # float32
                    y[t, out_offset:out_offset + out] = (y[t, ...] if add else 0) + delta
    """
    _check_expand(h, b_stack, y, out_offset)
    n, r = b_stack.shape[1], b_stack.shape[2]
    t, num_segs = y.shape[0], seg_slots.numel()
    block_m = _block_m(t, num_segs)
    tiles, seg_cap = _seg_grid(t, num_segs, block_m)
    if block_n is None:
        # Count every program of the token axis, not only those with work: each one reads the
        # whole segment table (`_find_tile`), so with a graph's table of hundreds of segments
        # narrow columns multiplied that read (64 columns: 8.7k programs, 17.5 µs per expand
        # at 256 rows and 128 adapters; load_tests/lora_graph_profile.py).
        block_n = _expand_block_n(n, tiles, y.device)
    if t == 0 or num_segs == 0 or n == 0:
        return
    y_view = y[:, out_offset:]
    _sgmv_expand_kernel[(tiles, triton.cdiv(n, block_n))](
        h, b_stack, y_view, seg_starts, seg_slots, ranks if ranks is not None else seg_slots,
        n, r, num_segs,
        *h.stride(), *b_stack.stride(), y_view.stride(0), y_view.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(r), SEG_CAP=seg_cap,
        HAS_RANKS=ranks is not None, ADD=add, PRECISION=_precision(b_stack.dtype),
        num_warps=4, num_stages=1, **pdl.launch_args(y),
    )  # fmt: skip


def bgmv_shrink(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    token_slots: torch.Tensor,
    ranks: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """Per-token shrink: h [T, max_rank] float32, tokens in any order.

    Semantics:
        for t in range(T):
            s = token_slots[t]
            if s >= 0:
                h[t, :] = x[t] @ a_stack[s].T      # float32; rows of base tokens unspecified
    """
    _check(x, a_stack)
    t, k = x.shape
    r = a_stack.shape[1]
    block_r = _block_r(r)
    block_k = 4096 // block_r  # a [BLOCK_R, BLOCK_K] float32 tile of 16 KiB per program
    if split_k is None:
        split_k = _split_k(t, k, block_k, x.device)
    out = (torch.zeros if split_k > 1 else torch.empty)(t, r, device=x.device, dtype=torch.float32)
    if t == 0:
        return out
    _bgmv_shrink_kernel[(t, split_k)](
        x, a_stack, out, token_slots, ranks if ranks is not None else token_slots,
        k, r, split_k,
        x.stride(0), x.stride(1), *a_stack.stride(), *out.stride(),
        BLOCK_R=block_r, BLOCK_K=block_k, HAS_RANKS=ranks is not None,
        num_warps=4, **pdl.launch_args(x),
    )  # fmt: skip
    return out


def bgmv_expand(
    h: torch.Tensor,
    b_stack: torch.Tensor,
    token_slots: torch.Tensor,
    y: torch.Tensor,
    out_offset: int = 0,
    ranks: torch.Tensor | None = None,
    add: bool = True,
) -> None:
    """Per-token expand into y[:, out_offset:out_offset + out], in place.

    Semantics:
        out = b_stack.shape[1]
        for t in range(T):
            s = token_slots[t]
            if s >= 0:
                y[t, out_offset:out_offset + out] = (y[t, ...] if add else 0) + h[t] @ b_stack[s].T
    """
    _check_expand(h, b_stack, y, out_offset)
    n, r = b_stack.shape[1], b_stack.shape[2]
    block_r = _block_r(r)
    block_n = max(16, min(256, 4096 // block_r, triton.next_power_of_2(n)))
    if y.shape[0] == 0 or n == 0:
        return
    y_view = y[:, out_offset:]
    _bgmv_expand_kernel[(y.shape[0], triton.cdiv(n, block_n))](
        h, b_stack, y_view, token_slots, ranks if ranks is not None else token_slots,
        n, r,
        *h.stride(), *b_stack.stride(), y_view.stride(0), y_view.stride(1),
        BLOCK_N=block_n, BLOCK_R=block_r, HAS_RANKS=ranks is not None, ADD=add,
        num_warps=4, **pdl.launch_args(y),
    )  # fmt: skip


def lora_shrink(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    lora: LoraContext,
    ranks: torch.Tensor | None = None,
    per_token: bool = False,
) -> torch.Tensor:
    """h = x @ A[slot].T per token (float32 [T, max_rank]); SGMV over `lora`'s segments unless `per_token`."""
    if per_token:
        return bgmv_shrink(x, a_stack, lora.token_slots, ranks)
    return sgmv_shrink(x, a_stack, lora.seg_starts, lora.seg_slots, ranks)


def lora_expand(
    h: torch.Tensor,
    b_stack: torch.Tensor,
    lora: LoraContext,
    y: torch.Tensor,
    out_offset: int = 0,
    ranks: torch.Tensor | None = None,
    add: bool = True,
    per_token: bool = False,
) -> None:
    """y[:, out_offset:out_offset + out] (+)= h @ B[slot].T for LoRA tokens; base tokens untouched."""
    if per_token:
        bgmv_expand(h, b_stack, lora.token_slots, y, out_offset, ranks, add)
    else:
        sgmv_expand(h, b_stack, lora.seg_starts, lora.seg_slots, y, out_offset, ranks, add)


def lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    lora: LoraContext,
    out_offset: int = 0,
    ranks: torch.Tensor | None = None,
    per_token: bool = False,
) -> None:
    """Shrink then expand, in place; same result as `lora_ref.lora_shrink_expand_sgmv` / `lora_bgmv`.

    Semantics:
        out = b_stack.shape[1]
        for t in range(T):
            s = slot of token t (lora.token_slots[t], equivalently its segment's slot)
            if s >= 0:
                y[t, out_offset:out_offset + out] += (x[t] @ a_stack[s].T) @ b_stack[s].T

    CUDA graphs: the launches depend only on T and the length of `lora.seg_slots`, never on
    the run lengths, so a graph captured with a segment table of fixed length (padding runs:
    slot -1, empty, starting at T) replays correctly for any layout; `any_lora` must be True
    at capture.
    """
    if not lora.any_lora:
        return
    _check(x, a_stack, b_stack)
    h = lora_shrink(x, a_stack, lora, ranks, per_token)
    lora_expand(h, b_stack, lora, y, out_offset, ranks, True, per_token)


def lora_shrink_expand_sgmv(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    seg_bounds: list[tuple[int, int, int]],
    out_offset: int,
) -> None:
    """Drop-in for `lora_ref.lora_shrink_expand_sgmv` (copies the host segments to the device
    each call; `lora_apply` reuses the context's device tensors instead)."""
    live = [(s, e, slot) for s, e, slot in seg_bounds if slot >= 0 and e > s]
    if not live:
        return
    _check(x, a_stack, b_stack)
    # Runs need not be adjacent: a gap between two becomes a base run (slot -1).
    bounds, slots = [live[0][0]], []
    for i, (_, end, slot) in enumerate(live):
        slots.append(slot)
        bounds.append(end)
        if i + 1 < len(live) and live[i + 1][0] != end:
            slots.append(-1)
            bounds.append(live[i + 1][0])
    seg_starts = torch.tensor(bounds, dtype=torch.int64).to(x.device, non_blocking=True)
    seg_slots = torch.tensor(slots, dtype=torch.int64).to(x.device, non_blocking=True)
    h = sgmv_shrink(x, a_stack, seg_starts, seg_slots)
    sgmv_expand(h, b_stack, seg_starts, seg_slots, y, out_offset)


def lora_bgmv(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    token_slots: torch.Tensor,
    out_offset: int,
) -> None:
    """Drop-in for `lora_ref.lora_bgmv`: per-token shrink and expand, tokens in any order."""
    _check(x, a_stack, b_stack)
    h = bgmv_shrink(x, a_stack, token_slots)
    bgmv_expand(h, b_stack, token_slots, y, out_offset)
