"""Triton LoRA and paged-attention kernels against the torch references.

GPU-only (skipped on CPU). `TRITON_INTERPRET=1 pytest --noconftest -m gpu ...` runs them on
the CPU through Triton's interpreter, slowly, for debugging without a device. (Seen with
Triton 3.6 and numpy 2.4: the interpreter fails on loops bounded by a kernel argument, because
it calls int() on a one-element array; bfloat16 dots are also wrong there, see BF16 below.)
"""

from __future__ import annotations

import os

import pytest
import torch

from engine.attention import torch_decode, torch_store_kv
from engine.context import ForwardContext, LoraContext
from engine.kernels.lora_ref import lora_bgmv, lora_shrink_expand_sgmv

pytestmark = pytest.mark.gpu

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# Relative error (norm of the difference over the norm of the reference) each dtype may show.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Triton 3.6's interpreter computes bfloat16 dots wrongly (on any kernel): use float16 there.
BF16 = torch.float16 if INTERPRET else torch.bfloat16
DTYPES = [torch.float16, BF16]


@pytest.fixture(scope="module")
def tl_lora():
    return pytest.importorskip("engine.kernels.triton_lora")


@pytest.fixture(scope="module")
def tl_attn():
    return pytest.importorskip("engine.kernels.triton_attention")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in kernel output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- LoRA


def _stacks(num_slots, ranks, k, n, dtype, gen, pad_value=0.0):
    """a [slots, max_rank, k], b [slots, n, max_rank]; padding past each rank holds `pad_value`."""
    max_rank = max(ranks)
    a = torch.randn(num_slots, max_rank, k, generator=gen) / k**0.5
    b = torch.randn(num_slots, n, max_rank, generator=gen)
    for s, r in enumerate(ranks):
        a[s, r:] = pad_value
        b[s, :, r:] = pad_value
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype)


def _lora_ctx(seg_bounds: list[tuple[int, int, int]]) -> LoraContext:
    """A context whose segments are `seg_bounds` (contiguous, covering all tokens)."""
    token_slots = [slot for start, end, slot in seg_bounds for _ in range(start, end)]
    return LoraContext(
        token_slots=torch.tensor(token_slots, dtype=torch.long, device=DEVICE),
        seg_starts=torch.tensor(
            [s for s, _, _ in seg_bounds] + [seg_bounds[-1][1]], dtype=torch.long, device=DEVICE
        ),
        seg_slots=torch.tensor([slot for _, _, slot in seg_bounds], dtype=torch.long, device=DEVICE),
        seg_bounds=seg_bounds,
        any_lora=any(slot >= 0 for _, _, slot in seg_bounds),
    )


def _segments(lengths_slots: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    out, start = [], 0
    for length, slot in lengths_slots:
        out.append((start, start + length, slot))
        start += length
    return out


# Base tokens between adapters, a run longer than one 64-token tile, runs of 1 token.
PREFILL_SEGS = [(5, -1), (70, 2), (3, 0), (9, -1), (1, 3), (40, 1), (2, 2)]
DECODE_SEGS = [(3, -1), (1, 0), (2, 1), (1, 2), (4, 3), (1, -1)]
RANKS = [1, 8, 16, 64]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("segs", [PREFILL_SEGS, DECODE_SEGS], ids=["prefill", "decode"])
@pytest.mark.parametrize("per_token", [False, True], ids=["sgmv", "bgmv"])
def test_lora_apply_matches_reference(tl_lora, dtype, segs, per_token):
    gen = torch.Generator().manual_seed(0)
    k, n, width, offset = 200, 136, 400, 72  # sizes not multiples of any tile; a column slice of y
    seg_bounds = _segments(segs)
    t = seg_bounds[-1][1]
    a, b = _stacks(len(RANKS), RANKS, k, n, dtype, gen)
    x = torch.randn(t, k, generator=gen).to(DEVICE, dtype)
    y0 = torch.randn(t, width, generator=gen).to(DEVICE, dtype)
    ctx = _lora_ctx(seg_bounds)
    y_ref = y0.clone()
    lora_shrink_expand_sgmv(y_ref, x, a, b, seg_bounds, offset)
    y = y0.clone()
    tl_lora.lora_apply(y, x, a, b, ctx, offset, per_token=per_token)
    assert _rel_err(y - y0, y_ref - y0) < TOL[dtype] * 4  # the delta, which y's rounding dominates
    base = ctx.token_slots < 0
    assert torch.equal(y[base], y0[base]), "base tokens were written"
    outside = torch.ones(width, dtype=torch.bool, device=DEVICE)
    outside[offset : offset + n] = False
    assert torch.equal(y[:, outside], y0[:, outside]), "columns outside the slice were written"


@pytest.mark.parametrize("per_token", [False, True], ids=["sgmv", "bgmv"])
def test_lora_float32_is_exact_and_splits_k(tl_lora, per_token):
    """Few tokens and a long K force the split-K atomics path; float32 must stay near-exact."""
    gen = torch.Generator().manual_seed(1)
    seg_bounds = _segments([(2, 0), (1, -1), (3, 1)])
    a, b = _stacks(2, [16, 5], 3000, 96, torch.float32, gen)
    x = torch.randn(6, 3000, generator=gen).to(DEVICE)
    y0 = torch.randn(6, 96, generator=gen).to(DEVICE)
    y_ref, y = y0.clone(), y0.clone()
    lora_shrink_expand_sgmv(y_ref, x, a, b, seg_bounds, 0)
    tl_lora.lora_apply(y, x, a, b, _lora_ctx(seg_bounds), 0, per_token=per_token)
    assert _rel_err(y - y0, y_ref - y0) < TOL[torch.float32]


@pytest.mark.parametrize("per_token", [False, True], ids=["sgmv", "bgmv"])
def test_lora_ranks_skip_the_padding(tl_lora, per_token):
    """With per-slot ranks the padding is never read: garbage there must not matter."""
    gen = torch.Generator().manual_seed(2)
    ranks = [3, 16, 9]
    a_clean, b_clean = _stacks(3, ranks, 128, 64, torch.float16, gen)
    a_junk, b_junk = a_clean.clone(), b_clean.clone()
    for s, r in enumerate(ranks):
        a_junk[s, r:] = float("nan")
        b_junk[s, :, r:] = float("nan")
    seg_bounds = _segments([(4, 2), (2, -1), (5, 0), (3, 1)])
    x = torch.randn(14, 128, generator=gen).to(DEVICE, torch.float16)
    y0 = torch.randn(14, 64, generator=gen).to(DEVICE, torch.float16)
    y_ref, y = y0.clone(), y0.clone()
    lora_shrink_expand_sgmv(y_ref, x, a_clean, b_clean, seg_bounds, 0)
    rank_t = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    tl_lora.lora_apply(y, x, a_junk, b_junk, _lora_ctx(seg_bounds), 0, ranks=rank_t, per_token=per_token)
    assert _rel_err(y - y0, y_ref - y0) < TOL[torch.float16] * 4


def test_lora_never_reads_base_rows(tl_lora):
    """NaN in the inputs of base tokens must not leak into any output."""
    gen = torch.Generator().manual_seed(3)
    seg_bounds = _segments([(3, -1), (17, 0), (2, -1), (20, 1), (4, -1)])
    a, b = _stacks(2, [8, 8], 64, 48, BF16, gen)
    x = torch.randn(46, 64, generator=gen).to(DEVICE, BF16)
    ctx = _lora_ctx(seg_bounds)
    x[ctx.token_slots < 0] = float("nan")
    for per_token in (False, True):
        y = torch.zeros(46, 48, device=DEVICE, dtype=BF16)
        tl_lora.lora_apply(y, x, a, b, ctx, 0, per_token=per_token)
        assert not y.isnan().any()
        assert (y[ctx.token_slots >= 0] != 0).any()


def test_sgmv_padded_segments_for_graph_capture(tl_lora):
    """A fixed-length segment table (padding runs: slot -1, empty, at T), as a captured graph
    needs: every layout gives the reference's result through the same launch."""
    gen = torch.Generator().manual_seed(11)
    t, capacity = 24, 8
    a, b = _stacks(4, [16, 4, 8, 16], 64, 48, torch.float32, gen)
    x = torch.randn(t, 64, generator=gen).to(DEVICE)
    y0 = torch.randn(t, 48, generator=gen).to(DEVICE)
    base = _lora_ctx(_segments([(t, 0)]))
    for layout in ([(t, 0)], [(2, -1), (5, 3), (1, 0), (16, 1)], [(3, 2), (3, 1), (3, 0), (3, 3), (12, -1)]):
        seg_bounds = _segments(layout)
        starts = [s for s, _, _ in seg_bounds] + [t] * (capacity + 1 - len(seg_bounds))
        slots = [slot for _, _, slot in seg_bounds] + [-1] * (capacity - len(seg_bounds))
        base.seg_starts = torch.tensor(starts, dtype=torch.long, device=DEVICE)
        base.seg_slots = torch.tensor(slots, dtype=torch.long, device=DEVICE)
        y_ref, y = y0.clone(), y0.clone()
        lora_shrink_expand_sgmv(y_ref, x, a, b, seg_bounds, 0)
        tl_lora.lora_apply(y, x, a, b, base, 0)
        assert _rel_err(y - y0, y_ref - y0) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_drop_in_functions_match_reference(tl_lora, dtype):
    """Same signatures as lora_ref; runs that are not adjacent and unsorted decode slots."""
    gen = torch.Generator().manual_seed(4)
    a, b = _stacks(4, RANKS, 96, 80, dtype, gen)
    x = torch.randn(30, 96, generator=gen).to(DEVICE, dtype)
    y0 = torch.randn(30, 160, generator=gen).to(DEVICE, dtype)
    seg_bounds = [(2, 9, 1), (12, 20, 3), (20, 21, -1), (25, 30, 0)]
    y_ref, y = y0.clone(), y0.clone()
    lora_shrink_expand_sgmv(y_ref, x, a, b, seg_bounds, 80)
    tl_lora.lora_shrink_expand_sgmv(y, x, a, b, seg_bounds, 80)
    assert _rel_err(y - y0, y_ref - y0) < TOL[dtype] * 4
    assert torch.equal(y[:2], y0[:2]) and torch.equal(y[9:12], y0[9:12])
    slots = torch.randint(-1, 4, (30,), generator=gen).to(DEVICE)
    y_ref, y = y0.clone(), y0.clone()
    lora_bgmv(y_ref, x, a, b, slots, 0)
    tl_lora.lora_bgmv(y, x, a, b, slots, 0)
    assert _rel_err(y - y0, y_ref - y0) < TOL[dtype] * 4


def test_shrink_then_expand_without_add(tl_lora):
    """The two halves on their own: h matches x @ A.T, add=False overwrites LoRA rows only."""
    gen = torch.Generator().manual_seed(5)
    seg_bounds = _segments([(4, 1), (3, -1), (6, 0)])
    ctx = _lora_ctx(seg_bounds)
    a, b = _stacks(2, [16, 16], 100, 40, torch.float32, gen)
    x = torch.randn(13, 100, generator=gen).to(DEVICE)
    for per_token in (False, True):
        h = tl_lora.lora_shrink(x, a, ctx, per_token=per_token)
        lora_rows = ctx.token_slots >= 0
        want_h = torch.einsum("tk,trk->tr", x, a[ctx.token_slots.clamp(min=0)])
        assert _rel_err(h[lora_rows], want_h[lora_rows]) < 1e-5
        y = torch.full((13, 40), 7.0, device=DEVICE)
        tl_lora.lora_expand(h, b, ctx, y, 0, add=False, per_token=per_token)
        want_y = torch.einsum("tr,tnr->tn", want_h, b[ctx.token_slots.clamp(min=0)])
        assert _rel_err(y[lora_rows], want_y[lora_rows]) < 1e-5
        assert (y[~lora_rows] == 7.0).all()


# ---------------------------------------------------------------- attention


def _paged_case(batch, hq, hkv, d, page, lens, dtype, gen, extra_blocks=3):
    """Random caches with each sequence's blocks scattered over the pool, tables padded with -1."""
    blocks_per_seq = [-(-n // page) for n in lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_per_seq) + 1
    tables, used = [], 0
    for nb in blocks_per_seq:
        tables.append(perm[used : used + nb] + [-1] * (width - nb))
        used += nb
    k_cache = torch.randn(num_blocks, page, hkv, d, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, page, hkv, d, generator=gen).to(DEVICE, dtype)
    q = torch.randn(batch, hq, d, generator=gen).to(DEVICE, dtype)
    block_tables = torch.tensor(tables, dtype=torch.int32, device=DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, block_tables, context_lens


def _attention_ref(q, k_cache, v_cache, block_tables, lens, scale, window=None):
    """Straightforward float64 reference, one sequence at a time."""
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hkv
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        blocks = block_tables[b, : -(-n // page)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v_cache[blocks].flatten(0, 1)[:n].double().repeat_interleave(group, dim=1)
        lo = 0 if window is None else max(0, n - window)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), k[lo:]) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v[lo:])
    return out


ATTN_SHAPES = [  # (hq, hkv, d, page)
    (4, 4, 16, 16),  # no grouping, tiny head
    (8, 2, 64, 16),  # group 4
    (32, 8, 128, 32),  # llama-8b heads, block size 32
    (12, 2, 64, 32),  # group 6: not a power of two
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "hq{}-hkv{}-d{}-p{}".format(*s))
def test_paged_decode_matches_reference(tl_attn, dtype, shape):
    hq, hkv, d, page = shape
    gen = torch.Generator().manual_seed(hq + d)
    lens = [1, 17, page, 3 * page + 5, 200]
    q, kc, vc, bt, cl = _paged_case(len(lens), hq, hkv, d, page, lens, dtype, gen)
    scale = d**-0.5
    ref = _attention_ref(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), lens, scale)
    out = tl_attn.paged_decode_attention(q, kc, vc, bt, cl, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel_err(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("num_splits", [1, 3, 8, 64])
@pytest.mark.parametrize("window", [None, 40])
def test_paged_decode_splits_and_window(tl_attn, num_splits, window):
    gen = torch.Generator().manual_seed(7)
    lens = [300, 41, 1, 129]
    q, kc, vc, bt, cl = _paged_case(len(lens), 8, 2, 64, 16, lens, BF16, gen)
    ref = _attention_ref(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), lens, 0.125, window)
    out = tl_attn.paged_decode_attention(q, kc, vc, bt, cl, 0.125, window, num_splits=num_splits)
    assert _rel_err(out.cpu(), ref) < TOL[BF16]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_short_length_hint_stays_correct(tl_attn, num_splits):
    """A graph captured at short contexts replays on longer ones: the hint only sizes partitions."""
    gen = torch.Generator().manual_seed(12)
    lens = [300, 41, 129]
    q, kc, vc, bt, cl = _paged_case(len(lens), 8, 2, 64, 16, lens, torch.float16, gen)
    ref = _attention_ref(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), lens, 0.125)
    out = tl_attn.paged_decode_attention(q, kc, vc, bt, cl, 0.125, max_context_len=20, num_splits=num_splits)
    assert _rel_err(out.cpu(), ref) < TOL[torch.float16]


def test_paged_decode_through_backend_matches_torch_decode(tl_attn):
    """The engine's decode seam: same ForwardContext, same answer as the torch backend."""
    gen = torch.Generator().manual_seed(8)
    lens = [33, 7, 64, 100]
    q, kc, vc, bt, cl = _paged_case(len(lens), 8, 4, 64, 16, lens, torch.float16, gen)
    ctx = ForwardContext(
        is_prefill=False,
        slot_mapping=torch.zeros(len(lens), dtype=torch.long, device=DEVICE),
        query_start=torch.arange(len(lens) + 1, dtype=torch.int32, device=DEVICE),
        context_lens=cl,
        block_tables=bt,
        max_query_len=1,
        max_context_len=max(lens),
        query_lens=[1] * len(lens),
        context_lens_list=lens,
        block_size=16,
    )
    backend = tl_attn.triton_backend()
    for window in (None, 20):
        ref = torch_decode(q, kc, vc, ctx, 0.125, window)
        out = backend.decode(q, kc, vc, ctx, 0.125, window)
        assert _rel_err(out, ref) < TOL[torch.float16]


def test_paged_decode_empty_context_gives_zeros(tl_attn):
    gen = torch.Generator().manual_seed(9)
    q, kc, vc, bt, cl = _paged_case(2, 4, 2, 64, 16, [0, 20], torch.float16, gen)
    for splits in (1, 4):
        out = tl_attn.paged_decode_attention(q, kc, vc, bt, cl, 0.125, num_splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert out[1].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_store_kv_matches_index_copy(tl_attn, dtype):
    """Strided k/v (views of a fused qkv output), -1 slots skipped, a float32 -> cache cast."""
    gen = torch.Generator().manual_seed(10)
    t, hkv, d, page, blocks = 11, 2, 64, 16, 6
    qkv = torch.randn(t, (4 + 2 * hkv) * d, generator=gen).to(DEVICE, dtype)
    k = qkv[:, 4 * d : (4 + hkv) * d].view(t, hkv, d)
    v = qkv[:, (4 + hkv) * d :].view(t, hkv, d)
    slots = torch.randperm(blocks * page, generator=gen)[:t].to(DEVICE)
    kc = torch.randn(blocks, page, hkv, d, generator=gen).to(DEVICE, dtype)
    vc = torch.randn(blocks, page, hkv, d, generator=gen).to(DEVICE, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    torch_store_kv(k, v, kc_ref, vc_ref, slots)
    tl_attn.store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    skipped = slots.clone()
    skipped[::2] = -1
    before = kc.clone()
    tl_attn.store_kv(k.float() + 1, v.float(), kc, vc, skipped)
    written = kc.view(-1, hkv, d)[slots[1::2]]
    assert torch.equal(written, (k[1::2].float() + 1).to(dtype))
    assert torch.equal(kc.view(-1, hkv, d)[slots[::2]], before.view(-1, hkv, d)[slots[::2]])
