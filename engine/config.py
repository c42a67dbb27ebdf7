"""Engine configuration: one dataclass, validated where an operator can set it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EngineConfig:
    """How to load and run the base model.

    model:               a local directory or a Hugging Face hub id.
    served_model_name:   the name clients use for the base; adapters trained on that name match it.
    dtype:               "auto" (float32 on CPU, bfloat16 on CUDA), "float32", "float16", "bfloat16".
    device:              "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
    kv_cache_memory:     bytes for the KV pool; 0 sizes it from free GPU memory (CUDA) or
                         from max_num_seqs * max_model_len (CPU).
    num_kv_blocks:       overrides kv_cache_memory when > 0 (tests use it to force preemption).
    max_loras:           GPU LoRA slots, and the cap on distinct adapters in a running batch.
    max_lora_rank:       largest adapter rank accepted; slot buffers are this wide.
    enable_prefix_caching: share computed KV blocks between requests with the same
                         (adapter, token prefix): a common system prompt is prefilled once.
    enforce_eager:       never capture CUDA graphs (decode then pays one CPU launch per kernel).
    cuda_graph_max_batch: largest decode batch run from a captured graph; bigger ones run eagerly.
    kernels:             "auto" (Triton on CUDA, torch reference on CPU) or "torch" (the
                         reference everywhere: the oracle the GPU path is tested against).
    tensor_parallel_size: shard the model over this many devices (one process each; this
                         process is rank 0 and spawns the others). CUDA: GPUs 0..N-1 over NCCL;
                         CPU: N processes over gloo (how the tests check the sharding).
    load_format:         "auto" (the checkpoint's safetensors) or "dummy" (random weights of the
                         config's shape, for benchmarks: only config.json is read).
    async_scheduling:    keep one step in flight: schedule and launch step n+1 before reading
                         step n's tokens, so host work overlaps device work (engine/llm_engine.py).
    mixed_steps:         a step that admits prompts also decodes every running sequence (one-token
                         rows of the prefill), so a burst of prompts does not pause running streams
                         (scheduler/scheduler.py). Off by default: such steps run eagerly, and their
                         cost against graph-replayed decodes is not measured yet.
    """

    model: str
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int = 2048
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    kv_cache_memory: int = 0
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int = 0
    max_loras: int = 8
    max_lora_rank: int = 64
    max_waiting: int = 1024
    enable_prefix_caching: bool = True
    seed: int = 0
    enforce_eager: bool = False
    cuda_graph_max_batch: int = 256
    kernels: str = "auto"
    tensor_parallel_size: int = 1
    load_format: str = "auto"
    async_scheduling: bool = True
    mixed_steps: bool = False

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens",
                     "max_loras", "max_lora_rank", "max_waiting", "cuda_graph_max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_model_len:
            self.max_num_batched_tokens = self.max_model_len
        if not 0.1 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in [0.1, 1], got {self.gpu_memory_utilization}")
        if self.kernels not in ("auto", "torch"):
            raise ValueError(f"kernels must be 'auto' or 'torch', got {self.kernels!r}")
        if self.num_kv_blocks < 0 or self.kv_cache_memory < 0:
            raise ValueError("num_kv_blocks and kv_cache_memory must not be negative")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be positive, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(
                f"with tensor_parallel_size > 1 the device must be auto, cuda or cpu (rank r uses cuda:r), "
                f"got {self.device!r}"
            )
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]
