"""Fused elementwise Triton kernels (engine/kernels/triton_fused.py) against the torch references
in engine/models/layers.py, and a model run with them against one without.

GPU-only (skipped on CPU). `TRITON_INTERPRET=1 pytest --noconftest -m gpu ...` runs the kernel
tests on the CPU through Triton's interpreter (float16 standing in for bfloat16 there); the
model tests need CUDA and skip.
"""

from __future__ import annotations

import os

import pytest
import torch

from engine.models.layers import (
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    apply_rotary,
    set_fused_elementwise,
)

pytestmark = pytest.mark.gpu

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
BF16 = torch.float16 if INTERPRET else torch.bfloat16
DTYPES = [torch.float32, BF16]
# Relative error (norm of the difference over the norm of the reference) each dtype may show:
# the kernels round where the references round, so bf16 differs only by rare 1-ulp flips.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 4e-3}


@pytest.fixture(scope="module")
def fused():
    return pytest.importorskip("engine.kernels.triton_fused")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not got.isnan().any()
    return float((got.float() - want.float()).norm() / want.float().norm())


def _norm(dim: int, dtype: torch.dtype, gen: torch.Generator, eps: float = 1e-5) -> RMSNorm:
    norm = RMSNorm(dim, eps, dtype)
    norm.weight.data = (1 + 0.3 * torch.randn(dim, generator=gen)).to(DEVICE, dtype)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 256), (5, 1000), (2, 3, 4096)])
def test_rms_norm_and_add_rms_norm(fused, dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    norm = _norm(shape[-1], dtype, gen)
    x = (2 * torch.randn(shape, generator=gen)).to(DEVICE, dtype)
    res = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    got = fused.rms_norm(x, norm.weight, norm.eps)
    assert got.shape == x.shape and got.dtype == dtype
    assert _rel(got, norm._reference(x)) < TOL[dtype]
    out, summed = fused.add_rms_norm(x, res, norm.weight, norm.eps)
    assert torch.equal(summed, x + res)  # the residual stream is bit-exact
    assert _rel(out, norm._reference(x + res)) < TOL[dtype]


def test_norm_reads_strided_rows_and_empty_batches(fused):
    gen = torch.Generator().manual_seed(1)
    norm = _norm(128, BF16, gen)
    wide = torch.randn(4, 384, generator=gen).to(DEVICE, BF16)
    x = wide[:, 128:256]  # rows 384 apart, as a slice of a fused projection's output
    assert _rel(fused.rms_norm(x, norm.weight, norm.eps), norm._reference(x)) < TOL[BF16]
    empty = torch.empty(0, 128, device=DEVICE, dtype=BF16)
    assert fused.add_rms_norm(empty, empty, norm.weight, norm.eps)[0].shape == (0, 128)
    with pytest.raises(ValueError):
        fused.add_rms_norm(x, wide, norm.weight, norm.eps)


def _rotary_case(num_q, num_k, head_dim, rot, dtype, seed, tokens=7):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (num_q + 2 * num_k) * head_dim, generator=gen).to(DEVICE, dtype)
    q, k, _ = qkv.split([num_q * head_dim, num_k * head_dim, num_k * head_dim], dim=-1)
    q = q.reshape(tokens, num_q, head_dim)  # strided views into qkv, as the model passes them
    k = k.reshape(tokens, num_k, head_dim)
    theta = 10000.0
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    rope = RotaryEmbedding(head_dim, inv_freq, 1.0).to(DEVICE)
    positions = torch.randint(0, 3000, (tokens,), generator=gen).to(DEVICE)
    cos, sin = rope.cos_sin(positions, dtype)
    return q, k, cos, sin, gen


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_q,num_k,head_dim,rot",
    [(32, 8, 128, 128), (4, 2, 64, 64), (6, 2, 80, 80), (4, 4, 64, 32)],  # GQA, MHA, odd D, partial
)
def test_qk_rotary_matches_reference(fused, dtype, num_q, num_k, head_dim, rot):
    q, k, cos, sin, _ = _rotary_case(num_q, num_k, head_dim, rot, dtype, head_dim + rot)
    q_out, k_out = fused.qk_rotary(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.is_contiguous()
    assert _rel(q_out, apply_rotary(q, cos, sin)) < TOL[dtype]
    assert _rel(k_out, apply_rotary(k, cos, sin)) < TOL[dtype]
    if rot < head_dim:  # dimensions past the rotary part pass through untouched
        assert torch.equal(q_out[..., rot:], q[..., rot:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_rotary_with_qk_norm_matches_qwen3_reference(fused, dtype):
    q, k, cos, sin, gen = _rotary_case(8, 4, 128, 128, dtype, 3)
    q_norm, k_norm = _norm(128, dtype, gen, 1e-6), _norm(128, dtype, gen, 1e-6)
    q_out, k_out = fused.qk_rotary(q, k, cos, sin, q_norm.weight, k_norm.weight, 1e-6)
    assert _rel(q_out, apply_rotary(q_norm._reference(q), cos, sin)) < TOL[dtype]
    assert _rel(k_out, apply_rotary(k_norm._reference(k), cos, sin)) < TOL[dtype]
    # The norm changes the result: the kernel did apply it.
    assert _rel(q_out, apply_rotary(q, cos, sin)) > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2 * 1000), (1, 2 * 14336), (2, 3, 2 * 64)])
def test_silu_and_mul_matches_reference(fused, dtype, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    x = (3 * torch.randn(shape, generator=gen)).to(DEVICE, dtype)
    gate, up = x.chunk(2, dim=-1)
    got = fused.silu_and_mul(x)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    assert _rel(got, torch.nn.functional.silu(gate) * up) < TOL[dtype]


# ---------------------------------------------------------------- model level (CUDA only)
cuda_only = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def reference_after():
    yield
    set_fused_elementwise(True)


def _tiny_model(arch: str):
    from transformers import LlamaConfig, Qwen3Config

    from engine.kv_cache import allocate_kv_cache
    from engine.models import build_model
    from tests.engine.test_gpu_engine import BLOCK, MAX_LEN, VOCAB

    config_cls = Qwen3Config if arch == "Qwen3ForCausalLM" else LlamaConfig
    cfg = config_cls(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
    )  # fmt: skip
    cfg.architectures = [arch]
    torch.manual_seed(0)
    model = build_model(cfg, torch.bfloat16, "cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5 if "embed" not in name else 1.0)
        model.lm_head.weight.mul_(4.0)  # peaked logits: fewer near-ties
    allocate_kv_cache(model, 8 * MAX_LEN // BLOCK, BLOCK, torch.bfloat16, "cuda")
    return model


@cuda_only
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_model_with_fused_kernels_matches_reference(arch, reference_after, monkeypatch):
    from engine.model_runner import ModelRunner
    from tests.engine.test_gpu_engine import BLOCK, MAX_LEN, _assert_greedy_agree, _greedy, _prompts

    model = _tiny_model(arch)
    prompts = _prompts(5, 11)
    set_fused_elementwise(False)
    ref_tokens, ref_logits = _greedy(ModelRunner(model, BLOCK, "cuda"), prompts, [-1] * 5)
    set_fused_elementwise(True)
    # Every norm must take the kernel path: the reference raising proves it is not used.
    monkeypatch.setattr(RMSNorm, "_reference", lambda self, x: pytest.fail("RMSNorm reference ran"))
    runner = ModelRunner(model, BLOCK, "cuda")
    runner.capture_decode_graphs(max_batch=8, max_model_len=MAX_LEN)
    tokens, logits = _greedy(runner, prompts, [-1] * 5)
    assert _rel(logits[0], ref_logits[0]) < 3e-2
    _assert_greedy_agree(tokens, ref_tokens, ref_logits)
    if tokens[0][0] == ref_tokens[0][0]:
        assert _rel(logits[1], ref_logits[1]) < 5e-2  # a decode step replayed from the graph


@cuda_only
def test_layers_dispatch_to_kernels_only_when_enabled(reference_after):
    x = torch.randn(3, 2 * 64, device="cuda", dtype=torch.bfloat16)
    gate, up = x.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    set_fused_elementwise(False)
    assert torch.equal(SiluAndMul()(x), want)
    set_fused_elementwise(True)
    assert _rel(SiluAndMul()(x), want) < TOL[torch.bfloat16]
