"""One implementation of the Llama family: Llama, Mistral, Qwen2, Qwen3.

The architectures share one skeleton; `ArchSpec` collects their differences (qkv bias,
per-head q/k norm, sliding-window layers) so the modules below stay branch-light.
Linear projections are `FusedLinear`s (the tensor-parallel kinds of engine/models/parallel.py,
which are whole at world size 1) and are always looked up by attribute name at call time,
because LoRA replaces them on their parent from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.attention import Attention
from engine.models.layers import (
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    apply_qk_rotary,
    build_rotary_embedding,
)
from engine.models.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the supported architectures, read from an HF config."""

    head_dim: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]  # per layer
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, cfg) -> ArchSpec:
        model_type = getattr(cfg, "model_type", "llama")
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        is_qwen2 = model_type == "qwen2"
        return cls(
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            # Qwen2 always has q/k/v bias and never an o_proj bias; its config has no flag.
            qkv_bias=True if is_qwen2 else attention_bias,
            o_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_windows=tuple(_sliding_window(cfg, i) for i in range(cfg.num_hidden_layers)),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        )


def _sliding_window(cfg, layer: int) -> int | None:
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    # Qwen2/Qwen3 mark which layers slide in `layer_types`; Mistral slides everywhere.
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and layer_types[layer] != "sliding_attention":
        return None
    return int(window)


class LlamaAttention(nn.Module):
    def __init__(self, cfg, spec: ArchSpec, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.head_dim = spec.head_dim
        # Under tensor parallelism each rank computes whole heads: the sizes below are its own.
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, self.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
            bias=spec.qkv_bias, dtype=dtype,
        )  # fmt: skip
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * self.head_dim, [cfg.hidden_size], bias=spec.o_bias, dtype=dtype
        )
        self.qk_norm = spec.qk_norm
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, spec.sliding_windows[layer]
        )

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = apply_qk_rotary(q, k, cos, sin, self.q_norm, self.k_norm)
        else:
            q, k = apply_qk_rotary(q, k, cos, sin)
        out = self.attn(q.reshape(-1, self.q_size), k.reshape(-1, self.kv_size), v)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg, spec: ArchSpec, dtype: torch.dtype) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [inter, inter], bias=spec.mlp_bias, dtype=dtype)
        self.down_proj = RowParallelLinear(inter, [cfg.hidden_size], bias=spec.mlp_bias, dtype=dtype)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, spec: ArchSpec, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, spec, layer, dtype)
        self.mlp = LlamaMLP(cfg, spec, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); their sum is the layer's
        output. The add is left to the next norm, which fuses it (`RMSNorm.add_and_norm`)."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg, spec: ArchSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(cfg, spec, i, dtype) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.rotary_emb: RotaryEmbedding = build_rotary_embedding(cfg, spec.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin)
        if residual is None:
            return self.norm(hidden)
        return self.norm.add_and_norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Causal LM over flattened tokens; attention metadata comes from the forward context."""

    packed_modules_mapping: dict[str, tuple[str, int]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, hf_config, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = hf_config
        self.spec = ArchSpec.from_config(hf_config)
        self.model = LlamaModel(hf_config, self.spec, dtype)
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, dtype)
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> logits [B, vocab]."""
        return self.lm_head(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
