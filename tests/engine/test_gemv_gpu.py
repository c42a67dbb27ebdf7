"""The weight-streaming GEMV (engine/kernels/triton_gemv.py) against `F.linear`, alone, under a
CUDA graph with programmatic dependent launch (PDL) chaining it to other kernels, and in a
model whose batch-1 decode runs it.

GPU-only (skipped on CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
HALF = [torch.bfloat16, torch.float16]
# Float32 accumulation, one rounding: only the order of the sum differs from cuBLAS.
TOL = 4e-3


@pytest.fixture(scope="module")
def gemv():
    return pytest.importorskip("engine.kernels.triton_gemv")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not got.isnan().any()
    return float((got.float() - want.float()).norm() / want.float().norm())


def _case(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    "m,n,k",
    [(1, 96, 64), (1, 100, 200), (1, 6144, 4096), (1, 4096, 14336), (2, 48, 4096), (4, 1000, 1000), (3, 7, 33)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear(gemv, dtype, m, n, k, bias):
    """Ragged N and K (masks), several rows, with and without bias."""
    x, w, b = _case(m, n, k, dtype, bias)
    got = gemv.linear(x, w, b)
    assert got.shape == (m, n) and got.dtype == dtype
    assert _rel(got, F.linear(x.float(), w.float(), None if b is None else b.float())) < TOL


@pytest.mark.parametrize("config", [(2, 256, 4), (4, 1024, 8), (16, 512, 4), (1, 64, 1)])
def test_every_tile_shape_agrees(gemv, config):
    x, w, b = _case(1, 300, 1500, HALF[0], True, seed=1)
    want = F.linear(x.float(), w.float(), b.float())
    assert _rel(gemv.linear(x, w, b, config=config), want) < TOL


def test_strided_rows_of_x(gemv):
    """x may be a row-strided view (a slice of a wider activation); its last dim is contiguous."""
    wide = torch.randn(2, 640, generator=torch.Generator().manual_seed(2)).to(DEVICE, HALF[0])
    x = wide[:, 64:576]
    _, w, _ = _case(1, 128, 512, HALF[0], False)
    assert _rel(gemv.linear(x, w), F.linear(x.float(), w.float())) < TOL


def test_supports_only_what_it_serves(gemv):
    x, w, _ = _case(1, 8, 16, HALF[0], False)
    assert gemv.supports(x, w)
    assert not gemv.supports(x.float(), w.float())
    assert not gemv.supports(torch.cat([x, x, x, x]), w, max_rows=2)
    assert not gemv.supports(x, w.t().contiguous().t())  # column-major weight


def test_shape_errors(gemv):
    x, w, _ = _case(1, 8, 16, HALF[0], False)
    with pytest.raises(ValueError, match="features"):
        gemv.linear(x[:, :8], w)
    with pytest.raises(ValueError, match="bias"):
        gemv.linear(x, w, torch.zeros(9, device=DEVICE, dtype=HALF[0]))


def test_pdl_chain_in_a_graph_matches_eager(gemv):
    """Kernels that read each other's outputs, captured with PDL on, replayed with fresh input:
    each result must be the one the eager, PDL-off chain gives (a consumer that ran before its
    producer finished would read stale activations)."""
    from engine.kernels import pdl, triton_fused

    torch.manual_seed(3)
    dims = [4096, 14336, 4096, 6144, 4096]
    ws = [(torch.randn(dims[i + 1], dims[i], device="cuda") * dims[i] ** -0.5).bfloat16() for i in range(4)]
    norm_w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)

    def chain(use_pdl: bool) -> torch.Tensor:
        h = triton_fused.rms_norm(x, norm_w, 1e-5)
        h = gemv.linear(h, ws[0], use_pdl=use_pdl)
        h = gemv.linear(h, ws[1], use_pdl=use_pdl)
        h, _ = triton_fused.add_rms_norm(h, x, norm_w, 1e-5)
        h = gemv.linear(h, ws[2], use_pdl=use_pdl)
        return gemv.linear(h[:, :4096].contiguous(), ws[3][:, :4096].contiguous(), use_pdl=use_pdl)

    assert pdl.enabled(x.device) == (torch.cuda.get_device_capability()[0] >= 9)
    chain(True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(True)
    for seed in range(3):
        x.copy_(torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
        graph.replay()
        pdl.set_enabled(False)
        try:
            want = chain(False)
        finally:
            pdl.set_enabled(True)
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_model_linears_route_few_rows_to_gemv():
    """`engine.models.layers.linear` picks the GEMV for 1 row and cuBLAS above; both agree."""
    from engine.models.layers import linear, set_gemv

    x, w, b = _case(1, 512, 256, torch.bfloat16, True)
    want = F.linear(x.float(), w.float(), b.float())
    assert _rel(linear(x, w, b), want) < TOL
    set_gemv(False)
    try:
        assert _rel(linear(x, w, b), want) < TOL
    finally:
        set_gemv(True)
