"""Write PEFT LoRA adapter directories straight from tensors: milliseconds each, so tests can
make dozens, and broken ones (wrong shapes, pickle, corrupt bytes) on purpose."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def model_dims(model_dir: Path) -> dict[str, Any]:
    """The numbers an adapter's shapes depend on, from a model's config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return {
        "hidden": cfg["hidden_size"],
        "inter": cfg["intermediate_size"],
        "q": heads * head_dim,
        "kv": cfg["num_key_value_heads"] * head_dim,
        "layers": cfg["num_hidden_layers"],
        "base": str(model_dir),
    }


def module_shapes(dims: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """PEFT short name -> (in_features, out_features)."""
    h, i, q, kv = dims["hidden"], dims["inter"], dims["q"], dims["kv"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def write_lora_dir(
    path: Path,
    dims: dict[str, Any],
    rank: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    scale: float = 1.0,
    shape_override: dict[str, tuple[int, int]] | None = None,
    **config: Any,
) -> Path:
    """A PEFT adapter dir with random A/B of the given rank; `config` entries override adapter_config.json."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {**module_shapes(dims), **(shape_override or {})}
    tensors = {}
    for layer in range(dims["layers"]):
        for short in targets:
            in_features, out_features = shapes[short]
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[short]}.{short}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * scale / in_features**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * scale / rank**0.5
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    body = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": list(targets), "base_model_name_or_path": dims["base"], "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "lora_dropout": 0.0, "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    body.update(config)
    (path / "adapter_config.json").write_text(json.dumps(body))
    return path


def fake_dims(layers: int = 2) -> dict[str, Any]:
    """Dims of a model that does not exist on disk (for tests that never load a base)."""
    return {"hidden": 16, "inter": 32, "q": 16, "kv": 8, "layers": layers, "base": "org/tiny-base"}


def break_adapter(path: Path, how: str, dims: dict[str, Any]) -> Path:
    """Write a broken adapter at `path`; `how` names the defect."""
    if how == "missing-config":
        write_lora_dir(path, dims)
        (path / "adapter_config.json").unlink()
    elif how == "missing-weights":
        write_lora_dir(path, dims)
        (path / "adapter_model.safetensors").unlink()
    elif how == "pickle":
        write_lora_dir(path, dims)
        (path / "adapter_model.safetensors").unlink()
        (path / "adapter_model.bin").write_bytes(b"\x80\x04\x95not really a pickle")
    elif how == "corrupt":
        write_lora_dir(path, dims)
        (path / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    elif how == "shapes":
        wide = dims["hidden"] * 2
        write_lora_dir(path, dims, shape_override={"q_proj": (wide, dims["q"])})
    elif how == "rank":
        write_lora_dir(path, dims, rank=64, alpha=64.0)
    elif how == "targets":
        write_lora_dir(path, dims, target_modules=["c_attn"])
    elif how == "base":
        write_lora_dir(path, dims, base_model_name_or_path="other-org/another-model")
    else:
        raise ValueError(f"unknown defect {how!r}")
    return path


def merged_greedy(
    model_dir: Path, adapters: dict[str, Path], jobs: list[tuple[list[int], str | None]], max_new: int
) -> list[list[int]]:
    """Reference greedy tokens per (prompt, adapter-or-None): transformers with the adapter merged
    into the base weights (W + alpha/r * B @ A), one adapter at a time. Fast for many adapters."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    original = {name: p.detach().clone() for name, p in params.items()}
    by_adapter: dict[str | None, list[int]] = {}
    for i, (_, adapter) in enumerate(jobs):
        by_adapter.setdefault(adapter, []).append(i)
    outputs: list[list[int]] = [[] for _ in jobs]
    with one_torch_thread(), torch.no_grad():
        for adapter, indexes in by_adapter.items():
            for name, value in original.items():
                params[name].copy_(value)
            if adapter is not None:
                _merge(params, adapters[adapter])
            for i in indexes:
                outputs[i] = _greedy(model, jobs[i][0], max_new)
    return outputs


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls: a second thread only adds synchronisation, which costs a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _greedy(model: Any, prompt: list[int], max_new: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_new):
        logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def _merge(params: dict[str, torch.Tensor], adapter_dir: Path) -> None:
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            params[f"{module}.weight"].add_(scaling * (b @ a))
