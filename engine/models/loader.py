"""Resolve a model reference to a directory and load its safetensors weights into our model.

Checkpoint names are HF's (`model.layers.0.self_attn.q_proj.weight`); the model's
`packed_modules_mapping` says where the unfused projections land in our fused ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.models import build_model
from engine.models.layers import default_weight_loader

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
# Mistral repos also ship `consolidated.safetensors` (other tensor names, same weights) and
# Llama repos an `original/` folder; neither is what we load.
HUB_IGNORE_PATTERNS = ["consolidated*", "original/*"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_IGNORED_KEY_PARTS = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: nn.Module
    hf_config: object
    model_dir: Path


def resolve_model_dir(ref: str) -> Path:
    """An existing local directory, else a hub id fetched (or found in the cache) by huggingface_hub."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise FileNotFoundError(f"model directory {ref!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(ref, allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS)
        )
    except (LocalEntryNotFoundError, HfHubHTTPError) as exc:
        raise FileNotFoundError(
            f"model {ref!r} is neither a local directory nor an available hub repository: {exc}"
        ) from exc


def load_model(
    model_ref: str, dtype: torch.dtype, device: torch.device | str, load_format: str = "auto"
) -> LoadedModel:
    """Resolve `model_ref`, build the model for its config and load its weights.

    Under tensor parallelism each rank builds and loads only its shard (the layers' weight
    loaders slice the checkpoint tensors). `load_format="dummy"` fills random weights instead
    of reading a checkpoint: benchmarks of real shapes need only a config.json.
    """
    from transformers import AutoConfig

    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    model_dir = resolve_model_dir(model_ref)
    hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    model = build_model(hf_config, dtype, device)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, model_dir)
    return LoadedModel(model=model, hf_config=hf_config, model_dir=model_dir)


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Norms at 1, everything else N(0, 0.02): activations of a sane scale at any depth."""
    from engine import distributed

    gen = None
    with torch.no_grad():
        for name, param in model.named_parameters():
            if gen is None:  # one generator on the parameters' device; each rank draws its own shard
                gen = torch.Generator(device=param.device).manual_seed(seed + distributed.tp_rank())
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint files of `model_dir`: the index's shards, or the single file."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return files
    single = model_dir / SAFETENSORS_SINGLE
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{model_dir} has only pickle weights ({', '.join(pickles)}); they can run arbitrary code on "
            "load, so only safetensors are accepted: convert the checkpoint to safetensors"
        )
    raise FileNotFoundError(f"no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} in {model_dir}")


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Load every checkpoint tensor into `model`; raise naming any parameter left unloaded."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, int]] = getattr(model, "packed_modules_mapping", {})
    tied = bool(getattr(getattr(model, "spec", None), "tie_word_embeddings", False))
    loaded: dict[str, set[int | None]] = {}
    unexpected: list[str] = []
    with torch.no_grad():
        for file in safetensors_files(model_dir):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    if any(part in key for part in _IGNORED_KEY_PARTS) or (tied and key == "lm_head.weight"):
                        continue
                    name, shard_id = _target(key, packed)
                    param = params.get(name)
                    if param is None:
                        unexpected.append(key)
                        continue
                    loader = getattr(param, "weight_loader", default_weight_loader)
                    try:
                        loader(param, f.get_tensor(key), shard_id)
                    except ValueError as exc:
                        raise ValueError(f"cannot load {key!r} from {file.name}: {exc}") from exc
                    loaded.setdefault(name, set()).add(shard_id)
    if unexpected:
        raise ValueError(f"checkpoint tensors with no matching parameter: {_sample(unexpected)}")
    missing = [name for name in params if not _fully_loaded(model, name, loaded.get(name, set()))]
    if missing:
        raise ValueError(f"checkpoint in {model_dir} is missing tensors for: {_sample(missing)}")


def _target(key: str, packed: dict[str, tuple[str, int]]) -> tuple[str, int | None]:
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            fused, shard_id = packed[part]
            return ".".join([*parts[:i], fused, *parts[i + 1 :]]), shard_id
    return key, None


def _fully_loaded(model: nn.Module, name: str, shards: set[int | None]) -> bool:
    if None in shards:
        return True
    module = model.get_submodule(name.rpartition(".")[0])
    num_shards = len(getattr(module, "output_sizes", ()))
    return num_shards > 0 and shards == set(range(num_shards))


def _sample(names: list[str], limit: int = 8) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
