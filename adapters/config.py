"""Operator settings of the adapter lifecycle: tiers, sources, validation policy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class AdapterConfig:
    """How adapters are found, kept and checked.

    max_cpu_adapters:       adapters kept in host memory (LRU). GPU-resident adapters keep their host
                            copy, so this must be at least the number of GPU slots; None: the
                            larger of 64 and the slot count.
    adapter_root:           directory whose subdirectories are served by name; request-supplied
                            sources must resolve inside it. None: no discovery, hub sources only.
    refuse_base_mismatch:   fail adapters whose `base_model_name_or_path` names another model
                            (default: load them with a warning).
    hub_cache_dir:          hub cache to read/download into (default: huggingface_hub's).
    load_workers:           threads reading adapters from disk/hub off the engine thread.
    max_gpu_adapter_memory: bytes for GPU slot buffers; when > 0 it sets the slot count instead of
                            `EngineConfig.max_loras`.
    """

    max_cpu_adapters: int | None = None
    adapter_root: Path | None = None
    refuse_base_mismatch: bool = False
    hub_cache_dir: Path | None = None
    load_workers: int = 2
    max_gpu_adapter_memory: int = 0

    def __post_init__(self) -> None:
        for name in ("max_cpu_adapters", "load_workers"):
            value = getattr(self, name)
            if value is None and name == "max_cpu_adapters":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_gpu_adapter_memory < 0:
            raise ValueError(f"max_gpu_adapter_memory must not be negative, got {self.max_gpu_adapter_memory}")
        if self.adapter_root is not None:
            self.adapter_root = Path(self.adapter_root).expanduser()
            if not self.adapter_root.is_dir():
                raise ValueError(f"adapter root {str(self.adapter_root)!r} is not a directory")
        if self.hub_cache_dir is not None:
            self.hub_cache_dir = Path(self.hub_cache_dir).expanduser()
