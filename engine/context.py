"""Per-step forward metadata in one object, so model `forward(input_ids, positions)` stays clean.

The model runner builds a `ForwardContext` before each forward and clears it after.
Attention layers read the KV-cache fields, LoRA layers read `lora`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraContext:
    """Which LoRA slot each token uses. Sequences are ordered by slot, so slots form segments.

    token_slots: [num_tokens] int64, -1 for base-model tokens (BGMV-style, per token).
    seg_starts:  [num_segments + 1] int64 token offsets; segment i is
                 tokens[seg_starts[i]:seg_starts[i+1]] (SGMV-style, prefill).
    seg_slots:   [num_segments] int64 slot per segment, -1 for base.
    seg_bounds:  the same offsets and slots as Python ints, for the torch reference (no sync).
    any_lora:    False when no token in the batch uses an adapter (skip all LoRA work).
    """

    token_slots: torch.Tensor
    seg_starts: torch.Tensor
    seg_slots: torch.Tensor
    seg_bounds: list[tuple[int, int, int]]  # (start, end, slot)
    any_lora: bool


@dataclass
class ForwardContext:
    """Attention metadata for one batch of sequences (all prefill or all decode).

    slot_mapping:  [num_tokens] int64 flat cache slot (block * block_size + offset) where
                   each new token's K/V is stored.
    query_start:   [batch + 1] int32 cumulative count of new tokens per sequence.
    context_lens:  [batch] int32 total tokens per sequence after this step (cached + new).
    block_tables:  [batch, max_blocks] int32 padded with -1.
    max_query_len / max_context_len: Python ints (no device sync needed to read them).
    query_lens / context_lens_list: Python lists, for the torch reference path.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    query_start: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_context_len: int
    query_lens: list[int]
    context_lens_list: list[int]
    block_size: int
    lora: LoraContext | None = None


_CONTEXT: ForwardContext | None = None


def set_context(ctx: ForwardContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("no forward context is set: call the model through the model runner")
    return _CONTEXT


def get_lora_context() -> LoraContext | None:
    return None if _CONTEXT is None else _CONTEXT.lora
