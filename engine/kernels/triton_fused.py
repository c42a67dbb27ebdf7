"""Triton kernels for a decoder layer's elementwise steps: residual add + RMSNorm, q/k rotary
(with Qwen3's per-head q/k RMSNorm folded in), and SiLU-and-mul.

Why: at batch 1 a decode step is bandwidth-bound on the weights, and every small kernel costs
2-3 µs however little it moves. The torch references in engine/models/layers.py launch about
30 of them per layer (the float32 RMSNorm alone is ~8); these kernels do the same work in 4.

Each kernel rounds where the torch reference rounds (to the input dtype after the residual add,
after normalising, after each rotary product), so in bfloat16 the results match the reference
up to the order of the float32 sum in the norm and the exp/rsqrt approximations. Outputs are
new contiguous tensors, as the references return.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine.kernels import pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    stride_x, stride_r, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:  # engine/kernels/pdl.py: nothing below may run before the producer is done
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * n_cols + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    var = tl.sum(x32 * x32, axis=0) / n_cols
    y = (x32 * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + offs, (w.to(tl.float32) * y.to(tl.float32)).to(w.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension.

    Semantics (x and weight of one dtype):
        x32 = x.float()
        out = weight * (x32 * rsqrt(mean(x32 ** 2, -1) + eps)).to(x.dtype)
    """
    out, _ = _launch_norm(x, None, weight, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass: the residual stream is read once.

    Semantics:
        summed = x + residual            (rounded to x.dtype, as torch's add)
        return rms_norm(summed, weight, eps), summed
    """
    if residual.shape != x.shape:
        raise ValueError(f"residual {list(residual.shape)} does not match x {list(x.shape)}")
    out, summed = _launch_norm(x, residual, weight, eps)
    return out, summed


def _launch_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight {list(weight.shape)} does not match the last dimension {n}")
    if weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
        raise ValueError("x, residual and weight must share one dtype")
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else None
    rows = x2.shape[0]
    if rows == 0:
        return out, summed
    r2 = _rows(residual) if residual is not None else x2
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows,)](
        x2, r2, weight, out, summed if summed is not None else out,
        x2.stride(0), r2.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block), **pdl.launch_args(x),
    )  # fmt: skip
    return out, summed


@triton.jit
def _qk_rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st, eps,
    NUM_Q: tl.constexpr, NUM_K: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr,
    QK_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # q heads, then k heads
    d = tl.arange(0, BLOCK_D)
    half = ROT // 2
    is_q = heads < NUM_Q
    kh = heads - NUM_Q
    in_d = d < HEAD_DIM
    rot = d < ROT
    q_mask = is_q[:, None] & in_d[None, :]
    k_mask = (~is_q & (kh < NUM_K))[:, None] & in_d[None, :]
    # rotate_half: element d (d < ROT) pairs with d + half (negated) or d - half.
    partner = tl.where(d < half, d + half, d - half)
    q_row = q_ptr + t * stride_qt + heads[:, None] * stride_qh
    k_row = k_ptr + t * stride_kt + kh[:, None] * stride_kh
    x = tl.where(
        is_q[:, None],
        tl.load(q_row + d[None, :], mask=q_mask, other=0.0),
        tl.load(k_row + d[None, :], mask=k_mask, other=0.0),
    )
    xp = tl.where(
        is_q[:, None],
        tl.load(q_row + partner[None, :], mask=q_mask & rot[None, :], other=0.0),
        tl.load(k_row + partner[None, :], mask=k_mask & rot[None, :], other=0.0),
    )
    dtype = x.dtype
    if QK_NORM:
        x32 = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x32 * x32, axis=1) / HEAD_DIM + eps)[:, None]
        w = tl.where(
            is_q[:, None],
            tl.load(qw_ptr + d, mask=in_d, other=0.0)[None, :],
            tl.load(kw_ptr + d, mask=in_d, other=0.0)[None, :],
        )
        wp = tl.where(
            is_q[:, None],
            tl.load(qw_ptr + partner, mask=rot, other=0.0)[None, :],
            tl.load(kw_ptr + partner, mask=rot, other=0.0)[None, :],
        )
        x = (w.to(tl.float32) * (x32 * rstd).to(dtype).to(tl.float32)).to(dtype)
        xp = (wp.to(tl.float32) * (xp.to(tl.float32) * rstd).to(dtype).to(tl.float32)).to(dtype)
    cos = tl.load(cos_ptr + t * stride_ct + d, mask=rot, other=1.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_st + d, mask=rot, other=0.0).to(tl.float32)[None, :]
    sign = tl.where(d < half, -1.0, 1.0)[None, :]
    a = (x.to(tl.float32) * cos).to(dtype)
    b = (xp.to(tl.float32) * sign * sin).to(dtype)
    out = tl.where(rot[None, :], (a.to(tl.float32) + b.to(tl.float32)).to(dtype), x)
    tl.store(q_out_ptr + (t * NUM_Q + heads[:, None]) * HEAD_DIM + d[None, :], out, mask=q_mask)
    tl.store(k_out_ptr + (t * NUM_K + kh[:, None]) * HEAD_DIM + d[None, :], out, mask=k_mask)


def qk_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in one launch; optionally RMSNorm each head first.

    Semantics (rotate-half layout; R = cos.shape[-1] <= D rotary dims, the rest pass through):
        if norm weights: q = rms_norm(q, q_norm_weight, eps) per head; k alike
        rot(x) = cat(-x[..., R/2:R], x[..., :R/2])
        out[..., :R] = x[..., :R] * cos[:, None] + rot(x) * sin[:, None]   (each product rounded)
        out[..., R:] = x[..., R:]
    Returns new contiguous (q_out, k_out).
    """
    t, num_q, head_dim = q.shape
    tk, num_k, head_dim_k = k.shape
    rot = cos.shape[-1]
    if tk != t or head_dim_k != head_dim or cos.shape != (t, rot) or sin.shape != cos.shape:
        raise ValueError(
            f"q {list(q.shape)}, k {list(k.shape)}, cos {list(cos.shape)}, sin {list(sin.shape)} do not match"
        )
    if rot % 2 or rot > head_dim:
        raise ValueError(f"rotary dims {rot} must be even and at most head_dim {head_dim}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("pass both q and k norm weights or neither")
    if k.dtype != q.dtype or cos.dtype != q.dtype or sin.dtype != q.dtype:
        raise ValueError("q, k, cos and sin must share one dtype")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("head_dim (and the rotary dims of cos/sin) must be contiguous")
    qk_norm = q_norm_weight is not None
    if qk_norm and not (q_norm_weight.shape == k_norm_weight.shape == (head_dim,)):
        raise ValueError(f"norm weights must be [{head_dim}]")
    q_out = torch.empty(t, num_q, head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(t, num_k, head_dim, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_q + num_k), max(1, 1024 // block_d))
    grid = (t, triton.cdiv(num_q + num_k, block_h))
    _qk_rotary_kernel[grid](
        q, k, cos, sin,
        q_norm_weight if qk_norm else cos, k_norm_weight if qk_norm else cos, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0), eps,
        NUM_Q=num_q, NUM_K=num_k, HEAD_DIM=head_dim, ROT=rot, QK_NORM=qk_norm,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4, **pdl.launch_args(q),
    )  # fmt: skip
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(x_ptr + t * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + t * stride_x + n + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + t * n + offs, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for x = [gate | up] along the last dimension.

    Semantics: gate, up = x.chunk(2, -1); out = silu(gate) * up   (silu rounded to x.dtype first)
    """
    width = x.shape[-1]
    if width % 2:
        raise ValueError(f"last dimension {width} is not [gate | up]")
    n = width // 2
    x2 = _rows(x)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, x2.stride(0), n, BLOCK=block, num_warps=4,
                                                                 **pdl.launch_args(x))  # fmt: skip
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with a unit stride along the last dimension (a view where it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _warps(block: int) -> int:
    return 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1
