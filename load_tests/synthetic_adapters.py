"""Many small PEFT LoRA adapter directories for a model, written straight from its config.

Load tests need hundreds or thousands of distinct adapters; training or saving them through
peft would take minutes, so the safetensors files are written directly with random A and B
(non-zero, so every adapter changes the output). The key names and shapes are the ones peft
writes for a Llama-family model, which the server validates on registration.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable module of a Llama-family config."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def write_adapter(
    path: Path, config: dict, *, rank: int, targets: tuple[str, ...], seed: int, base_name: str = "base"
) -> Path:
    """One PEFT adapter directory with random weights; returns `path`."""
    unknown = [t for t in targets if t not in _PARENT]
    if unknown:
        raise ValueError(f"unknown target module {unknown[0]!r}; expected some of {sorted(_PARENT)}")
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    shapes = module_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for target in targets:
            fan_in, fan_out = shapes[target]
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[target]}.{target}"
            # Scaled like a trained adapter: a visible but bounded change to each projection.
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.2 / rank**0.5
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(targets), "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return path


def write_adapters(
    model_dir: Path,
    out_dir: Path,
    count: int,
    *,
    rank: int = 8,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    seed: int = 0,
    prefix: str = "lora-",
) -> dict[str, Path]:
    """`count` adapters named `{prefix}0000`... under `out_dir`, each with its own weights."""
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    width = max(4, len(str(max(count - 1, 0))))
    adapters = {}
    for i in range(count):
        name = f"{prefix}{i:0{width}d}"
        adapters[name] = write_adapter(Path(out_dir) / name, config, rank=rank, targets=targets,
                                       seed=seed + i, base_name=Path(model_dir).name)
    return adapters
