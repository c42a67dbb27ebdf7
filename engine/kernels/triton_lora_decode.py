"""One-launch LoRA for a few tokens: every live slice of a fused layer, shrink and expand together.

For a decode batch of a few tokens the LoRA work of a layer is tiny (a rank-16 q/k/v slice of
llama-8b moves well under a megabyte) and the separate shrink, expand and memset launches of
`engine.kernels.triton_lora` cost more than the bytes. Here one kernel does all of it:

    grid = (T, column chunks over all applied slices)
    program (t, c): s = token_slots[t]; return if s < 0
                    slice i and columns of chunk c come from the (constexpr) layer geometry
                    h = x[t] @ A_i[s, :rank_i[s]].T                  float32, in registers
                    y[t, cols] += B_i[s][cols, :rank_i[s]] @ h       one rounding into y

Every program of a token recomputes h from the whole of A_i[s] (the re-reads come from L2), so
no h round-trip through global memory, no memset, no atomics: the result is deterministic.
That redundancy grows with T x chunks, which is why this kernel is for small T only (the
dispatch in engine/lora/layers.py). The launch depends only on T and the layer's geometry (the
slots are read on the device), so it can be captured in a CUDA graph.

Weights, as `engine.lora.layers.LoRALinear` holds them:
    lora_a      [num_slots, num_slices * max_rank, in]   slice i's A is rows i*max_rank onwards
    b_stacks[i] [num_slots, out_i, max_rank]              (scale folded in)
    ranks[i]    [num_slots] int32: each slot's true rank for slice i; rows/columns past it are
                never read, and a slot of rank 0 leaves its token's columns of slice i untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from engine.kernels.triton_lora import _block_r, _num_sms


@triton.jit
def _chunk(
    y_ptr, x_ptr, a_ptr, b_ptr, rank_ptr, t, slot, chunk,
    stride_ym, stride_yn, stride_xm, stride_xk, stride_as, stride_ar, stride_ak,
    stride_bs, stride_bn, stride_br,
    K: tl.constexpr, R: tl.constexpr, A_ROW: tl.constexpr, COL: tl.constexpr, N: tl.constexpr,
    CHUNK_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """y[t, COL + chunk columns] += B[slot][chunk columns] @ (x[t] @ A[slot].T) for one slice."""
    rank = tl.minimum(tl.load(rank_ptr + slot), R)
    if rank > 0:
        slot64 = slot.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        mask_r = offs_r < rank
        x_ptrs = x_ptr + t.to(tl.int64) * stride_xm + offs_k * stride_xk
        a_ptrs = (
            a_ptr + slot64 * stride_as + (A_ROW + offs_r[:, None]) * stride_ar + offs_k[None, :] * stride_ak
        )
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            mask_k = offs_k < K - k0
            xv = tl.load(x_ptrs, mask=mask_k, other=0.0).to(tl.float32)
            at = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            acc += at * xv[None, :]
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
        h = tl.sum(acc, axis=1)  # [BLOCK_R] float32: no rounding between the two products
        for n0 in range(0, CHUNK_N, BLOCK_N):
            offs_n = chunk * CHUNK_N + n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            b = tl.load(
                b_ptr + slot64 * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :],
                other=0.0,
            )
            delta = tl.sum(b.to(tl.float32) * h[None, :], axis=1)
            y_ptrs = y_ptr + t.to(tl.int64) * stride_ym + (COL + offs_n) * stride_yn
            out = tl.load(y_ptrs, mask=mask_n, other=0.0).to(tl.float32) + delta
            tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _lora_small_kernel(
    y_ptr, x_ptr, a_ptr, slots_ptr, b_ptrs, rank_ptrs, b_strides,
    stride_ym, stride_yn, stride_xm, stride_xk, stride_as, stride_ar, stride_ak,
    K: tl.constexpr, R: tl.constexpr, A_ROWS: tl.constexpr, COLS: tl.constexpr, NS: tl.constexpr,
    CHUNK_BOUNDS: tl.constexpr, NUM_SLICES: tl.constexpr,
    CHUNK_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    # No programmatic dependent launch here (engine/kernels/pdl.py): with it, one rank-16
    # q,k,v,o adapter at batch 1 cost +13.7% over the base instead of +6.5%
    # (load_tests/decode_ab.py, H100); the cause was not isolated.
    t = tl.program_id(0)
    pid = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    # Slice j owns chunks [CHUNK_BOUNDS[j], CHUNK_BOUNDS[j + 1]); exactly one branch is taken.
    for j in tl.static_range(NUM_SLICES):
        if (pid >= CHUNK_BOUNDS[j]) & (pid < CHUNK_BOUNDS[j + 1]):
            _chunk(
                y_ptr, x_ptr, a_ptr, b_ptrs[j], rank_ptrs[j], t, slot, pid - CHUNK_BOUNDS[j],
                stride_ym, stride_yn, stride_xm, stride_xk, stride_as, stride_ar, stride_ak,
                b_strides[3 * j], b_strides[3 * j + 1], b_strides[3 * j + 2],
                K, R, A_ROWS[j], COLS[j], NS[j], CHUNK_N, BLOCK_N, BLOCK_R, BLOCK_K, STAGES,
            )  # fmt: skip


# Elements of the register tile each program holds ([BLOCK_R, BLOCK_K] of A, [BLOCK_N, BLOCK_R]
# of B), warps per program, and A tiles in flight (the K loop is software-pipelined, at most
# 64 KiB of shared memory). One program streams a whole A slice (128 KiB at rank 16 on 8B), so
# it is latency-bound: without pipelining the kernel ran 3x slower than with 4 stages. Swept on
# an H100 (llama-8b qkv + o, rank 16, T 1 and 8): 8192 / 8 warps / 4 stages was the best of six.
TILE = 8192
NUM_WARPS = 8
STAGES = 4


def _chunk_n(num_tokens: int, sizes: list[int], block_n: int, device: torch.device) -> int:
    """Columns per program: the narrowest power-of-two multiple of `block_n` that keeps the grid
    within about one program per SM. Narrower chunks give more programs (each re-reads A), so
    past one wave they only add A traffic; the B and y bytes of a chunk are small next to A."""
    chunk = block_n
    while chunk < max(sizes) and num_tokens * sum(triton.cdiv(n, chunk) for n in sizes) > _num_sms(device):
        chunk *= 2
    return chunk


def lora_fused_small(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    b_stacks: Sequence[torch.Tensor],
    ranks: Sequence[torch.Tensor],
    offsets: Sequence[int],
    slices: Sequence[int],
    token_slots: torch.Tensor,
) -> None:
    """Add the LoRA delta of each slice in `slices` into its column block of y, in place, in one launch.

    Semantics (that of `lora_ref.lora_bgmv` for each applied slice i, R = max_rank):
        for i in slices:
            a_i = lora_a[:, i * R:(i + 1) * R];  out_i = b_stacks[i].shape[1]
            for t in range(T):
                s = token_slots[t]
                if s >= 0:
                    r = ranks[i][s]
                    y[t, offsets[i]:offsets[i] + out_i] += (x[t] @ a_i[s, :r].T) @ b_stacks[i][s, :, :r].T
    Products are accumulated in float32 and y is rounded once. Base tokens (slot -1) are never
    read or written.
    """
    slices = list(slices)
    if x.dim() != 2 or lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"x {list(x.shape)} does not match lora_a {list(lora_a.shape)} [slots, rows, in]")
    num_tokens, k = x.shape
    if not slices or num_tokens == 0:
        return
    r = lora_a.shape[1] // len(b_stacks)
    if lora_a.shape[1] != len(b_stacks) * r:
        raise ValueError(f"lora_a has {lora_a.shape[1]} rows, not {len(b_stacks)} slices x max_rank")
    if y.shape[0] != num_tokens or token_slots.shape != (num_tokens,):
        raise ValueError(
            f"y {list(y.shape)} / token_slots {list(token_slots.shape)} do not match {num_tokens} tokens"
        )
    sizes = []
    for i in slices:
        b = b_stacks[i]
        if (
            b.dim() != 3
            or b.shape[2] != r
            or b.shape[0] != lora_a.shape[0]
            or offsets[i] < 0
            or offsets[i] + b.shape[1] > y.shape[1]
        ):
            raise ValueError(
                f"slice {i}: b_stack {list(b.shape)} at column {offsets[i]} does not fit y {list(y.shape)}"
            )
        sizes.append(b.shape[1])
    block_r = _block_r(r)
    block_n = max(16, min(TILE // block_r, triton.next_power_of_2(max(sizes))))
    chunk_n = _chunk_n(num_tokens, sizes, block_n, x.device)
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + triton.cdiv(n, chunk_n))
    _lora_small_kernel[(num_tokens, bounds[-1])](
        y, x, lora_a, token_slots,
        tuple(b_stacks[i] for i in slices), tuple(ranks[i] for i in slices),
        tuple(s for i in slices for s in b_stacks[i].stride()),
        y.stride(0), y.stride(1), x.stride(0), x.stride(1), *lora_a.stride(),
        K=k, R=r, A_ROWS=tuple(i * r for i in slices), COLS=tuple(offsets[i] for i in slices),
        NS=tuple(sizes), CHUNK_BOUNDS=tuple(bounds), NUM_SLICES=len(slices),
        CHUNK_N=chunk_n, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_K=TILE // block_r,
        STAGES=max(1, min(STAGES, 65536 // (TILE * lora_a.element_size()))),
        num_warps=NUM_WARPS,
    )  # fmt: skip
