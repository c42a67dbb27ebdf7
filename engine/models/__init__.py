"""Architecture registry: HF `architectures[0]` -> our model class."""

from __future__ import annotations

import torch
from torch import nn

from engine.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class_for(hf_config) -> type[LlamaForCausalLM]:
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise ValueError("model config has no `architectures`; cannot pick an implementation")
    if archs[0] not in MODEL_REGISTRY:
        raise ValueError(
            f"unsupported architecture {archs[0]!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return MODEL_REGISTRY[archs[0]]


def build_model(hf_config, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """An uninitialised model for `hf_config` with parameters allocated on `device`."""
    cls = model_class_for(hf_config)
    device = torch.device(device)
    with torch.device(device):
        model = cls(hf_config, dtype)
    # Rotary frequencies come from transformers on the CPU; move them along.
    return model.to(device).eval()


__all__ = ["MODEL_REGISTRY", "build_model", "model_class_for"]
