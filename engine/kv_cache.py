"""KV cache tensors: size them, allocate them, bind them to the model's attention layers.

Each layer gets a K and a V tensor of [num_blocks, block_size, num_kv_heads, head_dim];
block ids are the scheduler's (`Sequence.block_table`), shared by all layers. Under tensor
parallelism each rank holds its own KV heads' part of every block (num_kv_heads is the
rank's), so the one block table the scheduler keeps is valid on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import Attention


def _head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def kv_cache_bytes_per_block(
    hf_config, block_size: int, dtype: torch.dtype, tensor_parallel_size: int = 1
) -> int:
    """Bytes one block takes across all layers (K and V) on one rank."""
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    # A rank holds its share of the KV heads, or one replicated head when there are fewer heads than ranks.
    num_kv_heads = max(1, num_kv_heads // tensor_parallel_size)
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * hf_config.num_hidden_layers * block_size * num_kv_heads * _head_dim(hf_config) * elem


def num_blocks_for_budget(budget_bytes: int, hf_config, block_size: int, dtype: torch.dtype) -> int:
    """How many whole blocks fit in `budget_bytes`; at least one must."""
    per_block = kv_cache_bytes_per_block(hf_config, block_size, dtype)
    num_blocks = int(budget_bytes) // per_block
    if num_blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget_bytes} bytes is smaller than one block ({per_block} bytes "
            f"for block_size {block_size}); give the cache more memory"
        )
    return num_blocks


def kv_budget_after_profile(device: torch.device, utilization: float, peak_bytes: int) -> int:
    """Bytes left for the KV pool on a CUDA device after a profiling forward peaked at `peak_bytes`.

    Everything resident now (weights, LoRA slots, the CUDA context, other processes) is read
    from the driver; the forward's transient peak above what is allocated now is kept free
    for real steps. Call with the allocator's cache emptied.
    """
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    transient = max(0, peak_bytes - torch.cuda.memory_allocated(device))
    return int(total * utilization - used - transient)


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def allocate_kv_cache(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Create zeroed per-layer K/V caches and bind them to every `Attention` module.

    Zeroed, not empty: the torch reference gathers whole blocks and masks the unused
    slots, and a NaN from uninitialised memory would survive a zero attention weight.
    """
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
    layers = attention_layers(model)
    if not layers:
        raise ValueError("model has no Attention modules to bind a KV cache to")
    caches = []
    for attn in layers:
        shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
        attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        caches.append((attn.k_cache, attn.v_cache))
    return caches


def free_kv_cache(model: nn.Module) -> None:
    """Unbind the caches so their memory can be released."""
    for attn in attention_layers(model):
        attn.k_cache = torch.empty(0)
        attn.v_cache = torch.empty(0)
