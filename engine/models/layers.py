"""Building blocks of the Llama family: norms, rotary embedding, fused linears, SiLU-and-mul.

Parameters are created with `torch.empty` (no random init): every one is overwritten by
the weight loader, and initialising a multi-GB model first would only cost time. Build
them under `with torch.device(...)` to place them directly on the target device.

The elementwise steps (residual add + RMSNorm, q/k rotary with the optional q/k norm,
SiLU-and-mul) run as single Triton kernels on CUDA tensors (engine/kernels/triton_fused.py)
and as the torch code below everywhere else; the torch code is the reference the kernels are
tested against. `set_fused_elementwise(False)` selects the reference on CUDA too.

Linear layers go through `linear`: on CUDA, a call with at most `triton_gemv.MAX_ROWS` rows
(batch-1 decode) runs the weight-streaming GEMV of engine/kernels/triton_gemv.py, everything
else `F.linear` (cuBLAS). `set_gemv(False)` sends every call to `F.linear`.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

_fused_elementwise = True
_gemv = True


def set_fused_elementwise(enabled: bool) -> None:
    """Use the fused Triton kernels for CUDA tensors (the default) or the torch reference.

    Process-wide, like the attention backend table, and read at call time: a CUDA graph keeps
    whichever path was selected when it was captured.
    """
    global _fused_elementwise
    _fused_elementwise = bool(enabled)


def fused_elementwise_enabled() -> bool:
    return _fused_elementwise


def set_gemv(enabled: bool) -> None:
    """Route few-row CUDA linears to the Triton GEMV (the default) or always to F.linear."""
    global _gemv
    _gemv = bool(enabled)


def gemv_enabled() -> bool:
    return _gemv


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the Triton GEMV where it serves the call."""
    if _gemv and x.is_cuda:
        gemv = _triton_gemv()
        if gemv.supports(x, weight):
            return gemv.linear(x, weight, bias)
    return F.linear(x, weight, bias)


@functools.cache
def _triton_gemv() -> ModuleType:
    from engine.kernels import triton_gemv

    return triton_gemv


def _fused_for(x: torch.Tensor) -> ModuleType | None:
    """The fused kernels module when `x` should use it, else None."""
    if not (_fused_elementwise and x.is_cuda):
        return None
    return _triton_fused()


@functools.cache
def _triton_fused() -> ModuleType:
    # Imported on first CUDA use: Triton is not installed where only the CPU path runs.
    from engine.kernels import triton_fused

    return triton_fused


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
    """Copy a checkpoint tensor into a parameter of the same shape (dtype converts on copy)."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not fused; got shard {shard_id}")
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class FusedLinear(nn.Module):
    """`y = x @ W.T + b` whose output is the concatenation of `output_sizes` slices.

    One class for fused (`qkv_proj`, `gate_up_proj`) and plain (`o_proj`, `down_proj`)
    projections, so LoRA can wrap all four the same way from outside: it reads
    `weight`, `bias`, `in_features`, `out_features` and `output_sizes`.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(self.output_sizes)
        self.weight = nn.Parameter(
            torch.empty(self.out_features, in_features, dtype=dtype), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        """Load the whole parameter (`shard_id=None`) or output slice `shard_id` of it."""
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        if not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard {shard_id} out of range for output sizes {self.output_sizes}")
        offset = sum(self.output_sizes[:shard_id])
        target = param.data.narrow(0, offset, self.output_sizes[shard_id])
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(
                f"shape mismatch for shard {shard_id}: expected {tuple(target.shape)}, "
                f"checkpoint {tuple(loaded.shape)}"
            )
        target.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, output_sizes={self.output_sizes}, bias={self.bias is not None}"
        )


class Embedding(nn.Module):
    """Token embedding table [vocab, hidden]."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim, dtype=dtype), requires_grad=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Output projection [vocab, hidden]; its weight is the embedding's when tied."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in float32 like the reference implementation."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = _fused_for(x)
        if fused is not None and x.dtype == self.weight.dtype:
            return fused.rms_norm(x, self.weight, self.eps)
        return self._reference(x)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream's add folded into the norm."""
        fused = _fused_for(x)
        if fused is not None and x.dtype == residual.dtype == self.weight.dtype and x.shape == residual.shape:
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        summed = x + residual
        return self._reference(summed), summed

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)


class SiluAndMul(nn.Module):
    """`silu(gate) * up` where the input is `[gate | up]` along the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = _fused_for(x)
        if fused is not None:
            return fused.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout) from precomputed inverse frequencies.

    `inv_freq` and `attention_scaling` come from transformers' rope init functions, so every
    scaling type they know (llama3, yarn, linear, ...) behaves exactly as in transformers.
    cos/sin are computed per call from the positions: one small outer product, no table to
    outgrow, and no host sync.
    """

    def __init__(self, head_dim: int, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = inv_freq.numel() * 2
        self.attention_scaling = float(attention_scaling)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, rotary_dim] for `positions` [T]."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [T, heads, head_dim] with cos/sin [T, rotary_dim] (partial rotary allowed)."""
    rotary_dim = cos.shape[-1]
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    if rotary_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def apply_qk_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: RMSNorm | None = None,
    k_norm: RMSNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D]; with q_norm/k_norm (Qwen3), RMSNorm each head first.

    On CUDA one kernel does all of it; the torch path is the reference.
    """
    fused = _fused_for(q)
    if fused is not None and _fusable_rotary(q, k, cos, sin, q_norm, k_norm):
        qw = q_norm.weight if q_norm is not None else None
        kw = k_norm.weight if k_norm is not None else None
        return fused.qk_rotary(q, k, cos, sin, qw, kw, q_norm.eps if q_norm is not None else 0.0)
    if q_norm is not None and k_norm is not None:
        q = q_norm(q)
        k = k_norm(k)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def _fusable_rotary(q, k, cos, sin, q_norm: RMSNorm | None, k_norm: RMSNorm | None) -> bool:
    dtype = q.dtype
    if not (k.dtype == cos.dtype == sin.dtype == dtype):
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or not (cos.is_contiguous() and sin.is_contiguous()):
        return False
    if (q_norm is None) != (k_norm is None):
        return False
    if q_norm is not None and k_norm is not None:
        return q_norm.weight.dtype == k_norm.weight.dtype == dtype and q_norm.eps == k_norm.eps
    return True


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# Rope types whose frequencies depend on the running sequence length; a paged server
# mixes lengths in one batch, so these would need per-sequence tables we do not have.
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


def build_rotary_embedding(hf_config, head_dim: int) -> RotaryEmbedding:
    """Rotary embedding for `hf_config`, using transformers' own rope init functions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = rope_parameters(hf_config)
    rope_type = params.get("rope_type", "default")
    if rope_type in _DYNAMIC_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported (frequencies depend on sequence length)")
    if rope_type == "default":
        rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        theta = float(params.get("rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        return RotaryEmbedding(head_dim, inv_freq, 1.0)
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope type {rope_type!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return RotaryEmbedding(head_dim, inv_freq, attention_scaling)


def rope_parameters(hf_config) -> dict:
    """The rope settings as one flat dict, for transformers 5 (`rope_parameters`) and 4 (`rope_scaling`)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    scaling.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return scaling
