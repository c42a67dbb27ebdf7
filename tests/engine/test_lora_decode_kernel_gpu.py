"""The one-launch small-batch LoRA kernel (engine/kernels/triton_lora_decode.py) against the torch
reference, and `LoRALinear`'s dispatch to it.

GPU-only (skipped on CPU). `TRITON_INTERPRET=1 pytest --noconftest -m gpu ...` runs the kernel
tests on the CPU through Triton's interpreter (float16 standing in for bfloat16, whose dots the
interpreter gets wrong); the CUDA-graph and `LoRALinear` tests need CUDA and skip there.
"""

from __future__ import annotations

import os

import pytest
import torch

from engine.context import ForwardContext, LoraContext, set_context
from engine.kernels.lora_ref import lora_bgmv

pytestmark = pytest.mark.gpu

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# Relative error (norm of the difference over the norm of the reference) each dtype may show.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
BF16 = torch.float16 if INTERPRET else torch.bfloat16
cuda_only = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA")

QKV = [64, 16, 16]  # q, k, v column sizes of a fused qkv-style layer
# Per slice, the rank each of 5 slots holds (0: that slot's adapter does not target the slice).
QKV_RANKS = [[4, 64, 16, 8, 0], [16, 8, 0, 64, 4], [8, 4, 64, 0, 16]]
SLOTS = {1: [2], 2: [4, 0], 5: [3, -1, 0, 4, 1], 8: [1, -1, 2, 2, 0, -1, 4, 3]}


@pytest.fixture(scope="module")
def small():
    return pytest.importorskip("engine.kernels.triton_lora_decode")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in kernel output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


def _layer(slice_ranks, sizes, k, dtype, gen, max_rank=64, pad=0.0):
    """lora_a [slots, slices * max_rank, k], b_stacks, int32 ranks; `pad` past each slot's rank."""
    num_slots = len(slice_ranks[0])
    a = torch.full((num_slots, len(sizes) * max_rank, k), pad)
    b_stacks = []
    for i, (n, ranks) in enumerate(zip(sizes, slice_ranks, strict=True)):
        b = torch.full((num_slots, n, max_rank), pad)
        for s, r in enumerate(ranks):
            a[s, i * max_rank : i * max_rank + r] = torch.randn(r, k, generator=gen) / k**0.5
            b[s, :, :r] = torch.randn(n, r, generator=gen)
        b_stacks.append(b.to(DEVICE, dtype))
    ranks = [torch.tensor(r, dtype=torch.int32, device=DEVICE) for r in slice_ranks]
    return a.to(DEVICE, dtype), b_stacks, ranks


def _reference(y, x, lora_a, b_stacks, offsets, slices, token_slots):
    r = lora_a.shape[1] // len(b_stacks)
    for i in slices:
        lora_bgmv(y, x, lora_a[:, i * r : (i + 1) * r], b_stacks[i], token_slots, offsets[i])


def _run_case(small, sizes, slice_ranks, k, dtype, slots, slices, col0=8, extra=24, seed=0, pad=0.0):
    """(y before, kernel's y, reference y); y is wider than the slices, which start at `col0`."""
    gen = torch.Generator().manual_seed(seed)
    lora_a, b_stacks, ranks = _layer(slice_ranks, sizes, k, dtype, gen)
    offsets = [col0 + sum(sizes[:i]) for i in range(len(sizes))]
    t = len(slots)
    x = torch.randn(t, k, generator=gen).to(DEVICE, dtype)
    y0 = torch.randn(t, col0 + sum(sizes) + extra, generator=gen).to(DEVICE, dtype)
    token_slots = torch.tensor(slots, dtype=torch.long, device=DEVICE)
    y_ref = y0.clone()
    _reference(y_ref, x, lora_a, b_stacks, offsets, slices, token_slots)
    if pad != 0.0:  # the kernel gets weights with junk past each rank; the reference had zeros
        lora_a, b_stacks, ranks = _layer(
            slice_ranks, sizes, k, dtype, torch.Generator().manual_seed(seed), pad=pad
        )
    y = y0.clone()
    small.lora_fused_small(y, x, lora_a, b_stacks, ranks, offsets, slices, token_slots)
    return y0, y, y_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("t", sorted(SLOTS))
@pytest.mark.parametrize(
    "sizes,slice_ranks,k",
    [(QKV, QKV_RANKS, 200), ([136], [[8, 16, 4, 64, 16]], 80)],
    ids=["qkv", "single"],
)
def test_matches_reference(small, dtype, t, sizes, slice_ranks, k):
    slots = SLOTS[t]
    y0, y, y_ref = _run_case(small, sizes, slice_ranks, k, dtype, slots, range(len(sizes)), seed=t)
    tol = TOL[dtype] if dtype == torch.float32 else TOL[dtype] * 4  # y's rounding dominates the delta
    assert _rel_err(y - y0, y_ref - y0) < tol
    base = torch.tensor(slots, device=DEVICE) < 0
    assert torch.equal(y[base], y0[base]), "base tokens were written"
    assert torch.equal(y[:, :8], y0[:, :8]), "columns before the slices were written"
    assert torch.equal(y[:, -24:], y0[:, -24:]), "columns after the slices were written"


def test_only_the_given_slices_are_applied(small):
    """Slices left out (not live) keep their columns even where the slot has weights for them."""
    slots = [0, 1, 2, 3, 4]
    y0, y, y_ref = _run_case(small, QKV, QKV_RANKS, 96, torch.float32, slots, [0, 2], seed=5)
    assert _rel_err(y - y0, y_ref - y0) < TOL[torch.float32]
    k_cols = slice(8 + QKV[0], 8 + QKV[0] + QKV[1])
    assert torch.equal(y[:, k_cols], y0[:, k_cols])
    assert not torch.equal(y[:, 8 : 8 + QKV[0]], y0[:, 8 : 8 + QKV[0]])


def test_padding_past_the_rank_is_never_read(small):
    """NaN past each slot's rank (whole slices at rank 0 included) must not reach y."""
    slots = [0, 1, 2, -1, 3, 4]
    y0, y, y_ref = _run_case(
        small, QKV, QKV_RANKS, 80, torch.float16, slots, [0, 1, 2], seed=6, pad=float("nan")
    )
    assert _rel_err(y - y0, y_ref - y0) < TOL[torch.float16] * 4
    # Slot 4 does not target q (rank 0): its q columns stay bit-identical.
    assert torch.equal(y[5, 8 : 8 + QKV[0]], y0[5, 8 : 8 + QKV[0]])


def test_float32_long_k_and_wide_slice(small):
    """K far past one tile and not a multiple of it; a slice wide enough to be cut into chunks."""
    y0, y, y_ref = _run_case(
        small, [1000], [[16, 64, 5]], 3000, torch.float32, [2, 0, -1, 1, 1, 0, 2, -1], [0]
    )
    assert _rel_err(y - y0, y_ref - y0) < TOL[torch.float32]
    y0, y, y_ref = _run_case(small, [4096], [[64, 16]], 64, torch.float32, [1, 0, 1, 0, 0, 1, 1, 0], [0])
    assert _rel_err(y - y0, y_ref - y0) < TOL[torch.float32]


def test_deterministic_and_no_tokens(small):
    gen = torch.Generator().manual_seed(7)
    lora_a, b_stacks, ranks = _layer(QKV_RANKS, QKV, 128, BF16, gen)
    x = torch.randn(8, 128, generator=gen).to(DEVICE, BF16)
    slots = torch.tensor(SLOTS[8], device=DEVICE)
    y0 = torch.randn(8, 96, generator=gen).to(DEVICE, BF16)
    outs = []
    for _ in range(2):
        y = y0.clone()
        small.lora_fused_small(y, x, lora_a, b_stacks, ranks, [0, 64, 80], [0, 1, 2], slots)
        outs.append(y)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], y0)
    empty = y0[:0].clone()
    small.lora_fused_small(empty, x[:0], lora_a, b_stacks, ranks, [0, 64, 80], [0, 1, 2], slots[:0])
    with pytest.raises(ValueError, match="does not fit"):
        small.lora_fused_small(y0.clone(), x, lora_a, b_stacks, ranks, [0, 64, 90], [0, 1, 2], slots)


@cuda_only
def test_cuda_graph_replays_new_slots(small):
    """Captured once; new slot values in the same device buffer give the new result."""
    gen = torch.Generator().manual_seed(8)
    lora_a, b_stacks, ranks = _layer(QKV_RANKS, QKV, 256, torch.bfloat16, gen)
    offsets, t = [0, 64, 80], 4
    x = torch.randn(t, 256, generator=gen).to(DEVICE, torch.bfloat16)
    y0 = torch.randn(t, 96, generator=gen).to(DEVICE, torch.bfloat16)
    slots, y = torch.full((t,), -1, dtype=torch.long, device=DEVICE), y0.clone()
    small.lora_fused_small(y, x, lora_a, b_stacks, ranks, offsets, [0, 1, 2], slots)  # compile outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        small.lora_fused_small(y, x, lora_a, b_stacks, ranks, offsets, [0, 1, 2], slots)
    for values in ([0, 1, 2, 3], [-1, 4, 4, -1], [3, 3, 0, 2]):
        slots.copy_(torch.tensor(values))
        y.copy_(y0)
        graph.replay()
        y_ref = y0.clone()
        _reference(y_ref, x, lora_a, b_stacks, offsets, [0, 1, 2], slots)
        assert _rel_err(y - y0, y_ref - y0) < TOL[torch.bfloat16] * 4


@cuda_only
@pytest.mark.parametrize("t", [1, 5, 8, 9])
def test_lora_linear_dispatch(small, monkeypatch, t):
    """Up to SMALL_BATCH_TOKENS tokens take the one-launch kernel, more the SGMV path; both give
    the torch path's y."""
    from engine.lora import layers
    from engine.models.layers import FusedLinear

    gen = torch.Generator().manual_seed(9)
    base = FusedLinear(80, QKV, bias=False, dtype=torch.float32)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen) / 80**0.5)
    module = layers.LoRALinear(base.to(DEVICE), num_slots=3, max_rank=16)
    for slot, rank in enumerate((16, 4, 8)):
        pairs = [(torch.randn(rank, 80, generator=gen), torch.randn(n, rank, generator=gen)) for n in QKV]
        pairs[1] = None if slot == 2 else pairs[1]
        module.set_lora(slot, [None if p is None else (p[0].to(DEVICE), p[1].to(DEVICE)) for p in pairs])
    slots = [(i % 4) - 1 for i in range(t)] if t > 1 else [0]
    segs, start = [], 0
    for i in range(1, t + 1):
        if i == t or slots[i] != slots[start]:
            segs.append((start, i, slots[start]))
            start = i
    dev = torch.tensor
    lora = LoraContext(
        token_slots=dev(slots, device=DEVICE),
        seg_starts=dev([s for s, _, _ in segs] + [t], device=DEVICE),
        seg_slots=dev([s for _, _, s in segs], device=DEVICE),
        seg_bounds=segs,
        any_lora=True,
    )
    empty = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    set_context(ForwardContext(False, empty.long(), empty, empty, empty.view(0, 0), 0, 0, [], [], 16, lora))
    calls = []
    real = small.lora_fused_small
    monkeypatch.setattr(small, "lora_fused_small", lambda *a: calls.append(1) or real(*a))
    try:
        x = torch.randn(t, 80, generator=gen).to(DEVICE)
        got = module(x)
        module.use_triton = False
        want = module(x)
    finally:
        set_context(None)
    assert len(calls) == (1 if t <= layers.SMALL_BATCH_TOKENS else 0)
    base_y = base(x)
    assert _rel_err(got - base_y, want - base_y) < TOL[torch.float32]
