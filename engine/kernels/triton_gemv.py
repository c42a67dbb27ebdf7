"""Batch-1 linear layers: `y = x @ W.T (+ b)` for a handful of rows, streaming W once.

At batch 1 a decode step is the weights read once: 15 GB per token for llama-8b, so every
projection is a memory copy in disguise. cuBLAS's small-M kernels read them at 1.7-2.8 TB/s
and start each one cold (load_tests/results/gemv-h100.json). This kernel:

    grid = (cdiv(N, BLOCK_N), M)
    program (p, m): rows = p * BLOCK_N + [0, BLOCK_N)
                    gdc_launch_dependents()                 let the next kernel start early
                    w = W[rows, 0:BLOCK_K]                  read before waiting: W is constant
                    gdc_wait()                              x is ready from here on
                    for each K tile: load the next W tile, then acc += w @ x[m, tile]
                    y[m, rows] = acc (+ b[rows]), rounded once from float32

Its first weight tile is in flight before the producer of x has finished (programmatic
dependent launch, engine/kernels/pdl.py), and each later tile is requested one iteration
ahead, so the memory system is never waiting on a kernel boundary. Each program owns whole
rows, so there is no split-K reduction and the result is deterministic. One tile shape
serves every projection (`config_for`, measured by load_tests/gemv_bench.py).

Rows m > 0 re-read W (from L2 when it fits), which is why the engine uses this kernel only
for a few rows (`MAX_ROWS`) and cuBLAS above that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine.kernels import pdl

MAX_ROWS = 1  # rows of x this kernel serves by default; more go to cuBLAS


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    if USE_PDL:
        gdc_launch_dependents()
    w = tl.load(w_ptrs, mask=mask_n[:, None] & (cols[None, :] < K), other=0.0)
    if USE_PDL:
        gdc_wait()
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k1 = k0 + BLOCK_K
        w_next = tl.load(w_ptrs + k1, mask=mask_n[:, None] & (k1 + cols[None, :] < K), other=0.0)
        x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        w = w_next
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rows, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


def config_for(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an [n, k] weight: 4 rows x 1024 columns (8 KB of bf16)
    per tile, 4 warps; within 1.5% of the best of 24 tile shapes on every llama-8b projection
    on an H100 (load_tests/results/gemv-h100.json)."""
    return 4, min(1024, triton.next_power_of_2(k)), 4


def supports(x: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether `linear` serves this call: CUDA, ≤ max_rows rows, 16-bit, contiguous last dims."""
    return (
        x.is_cuda
        and x.dim() == 2
        and 0 < x.shape[0] <= max_rows
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and x.stride(1) == 1
        and weight.stride(1) == 1
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
    use_pdl: bool | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [M, K], weight [N, K], bias [N] | None -> [M, N].

    Semantics: y[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n]), accumulated in float32 and
    rounded once to x.dtype. `config` overrides the tile shape; `use_pdl` the PDL switch.
    """
    m, k = x.shape
    n, k_w = weight.shape
    if k_w != k:
        raise ValueError(f"x has {k} features, weight expects {k_w}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias {list(bias.shape)} does not match {n} outputs")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_n, block_k, warps = config or config_for(n, k)
    if use_pdl is None:
        use_pdl = pdl.enabled(x.device)
    _gemv_kernel[(triton.cdiv(n, block_n), m)](
        x, weight, bias if bias is not None else weight, y, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, USE_PDL=use_pdl,
        num_warps=warps, launch_pdl=use_pdl,
    )  # fmt: skip
    return y
