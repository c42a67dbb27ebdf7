"""Turn a scheduled batch of sequences into one model forward and per-sequence logits.

The batch is reordered by LoRA slot so each slot's tokens form one contiguous segment
(what SGMV/BGMV kernels want); logits come back in the caller's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.context import ForwardContext, LoraContext, set_context
from scheduler.sequence import Sequence


@dataclass
class _HostBatch:
    """Everything the forward needs, as Python lists built in one pass."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_start: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    token_slots: list[int]
    seg_bounds: list[tuple[int, int, int]]
    order: list[int]  # batch position -> caller index


class ModelRunner:
    """Runs `model` over batches of sequences whose KV lives in the bound paged cache."""

    def __init__(self, model: nn.Module, block_size: int, device: torch.device | str) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"

    def execute(
        self, seqs: list[Sequence], num_new_tokens: list[int], is_prefill: bool, lora_slots: list[int]
    ) -> torch.Tensor:
        """Logits [B, vocab] for the last new token of each sequence, in the order given."""
        if not seqs:
            raise ValueError("execute needs at least one sequence")
        if not len(seqs) == len(num_new_tokens) == len(lora_slots):
            raise ValueError(
                f"seqs, num_new_tokens and lora_slots differ in length: "
                f"{len(seqs)}, {len(num_new_tokens)}, {len(lora_slots)}"
            )
        batch = self._build(seqs, num_new_tokens, is_prefill, lora_slots)
        ctx = self._context(batch, is_prefill)
        input_ids = self._to_device(batch.input_ids, torch.long)
        positions = self._to_device(batch.positions, torch.long)
        last_index = self._to_device([end - 1 for end in batch.query_start[1:]], torch.long)
        inverse = [0] * len(batch.order)
        for pos, caller_index in enumerate(batch.order):
            inverse[caller_index] = pos
        unpermute = self._to_device(inverse, torch.long)
        set_context(ctx)
        try:
            with torch.inference_mode():
                hidden = self.model(input_ids, positions)
                logits = self.model.compute_logits(hidden.index_select(0, last_index))
                return logits.index_select(0, unpermute)
        finally:
            set_context(None)

    def _build(
        self, seqs: list[Sequence], num_new_tokens: list[int], is_prefill: bool, lora_slots: list[int]
    ) -> _HostBatch:
        bs = self.block_size
        # Stable sort: sequences of one slot keep their relative order.
        order = sorted(range(len(seqs)), key=lambda i: lora_slots[i])
        b = _HostBatch([], [], [], [0], [], [], [], [], [], order)
        for i in order:
            seq, n, slot = seqs[i], num_new_tokens[i], lora_slots[i]
            if slot < -1:
                raise ValueError(f"sequence {seq.seq_id}: LoRA slot must be -1 (base) or >= 0, got {slot}")
            if is_prefill:
                start = seq.num_computed_tokens
                if n < 1 or start + n > seq.num_tokens:
                    raise ValueError(
                        f"sequence {seq.seq_id}: cannot compute {n} tokens from {start} of {seq.num_tokens}"
                    )
                b.input_ids.extend(seq.token_ids[start : start + n])
            else:
                if n != 1:
                    raise ValueError(f"sequence {seq.seq_id}: a decode step computes 1 token, got {n}")
                start = seq.num_tokens - 1
                b.input_ids.append(seq.last_token_id)
            end = start + n
            if len(seq.block_table) * bs < end:
                raise RuntimeError(
                    f"sequence {seq.seq_id} holds {len(seq.block_table)} blocks of {bs}, needs {end} tokens"
                )
            b.positions.extend(range(start, end))
            b.slot_mapping.extend(_slots(seq.block_table, start, end, bs))
            b.query_start.append(b.query_start[-1] + n)
            b.query_lens.append(n)
            b.context_lens.append(end)
            b.block_tables.append(seq.block_table)
            b.token_slots.extend([slot] * n)
            tok_start = b.query_start[-2]
            if b.seg_bounds and b.seg_bounds[-1][2] == slot:
                b.seg_bounds[-1] = (b.seg_bounds[-1][0], tok_start + n, slot)
            else:
                b.seg_bounds.append((tok_start, tok_start + n, slot))
        return b

    def _context(self, b: _HostBatch, is_prefill: bool) -> ForwardContext:
        width = max(len(t) for t in b.block_tables)
        tables = [t + [-1] * (width - len(t)) for t in b.block_tables]
        seg_starts = [start for start, _, _ in b.seg_bounds] + [b.seg_bounds[-1][1]]
        lora = LoraContext(
            token_slots=self._to_device(b.token_slots, torch.long),
            seg_starts=self._to_device(seg_starts, torch.long),
            seg_slots=self._to_device([slot for _, _, slot in b.seg_bounds], torch.long),
            seg_bounds=b.seg_bounds,
            any_lora=any(slot >= 0 for _, _, slot in b.seg_bounds),
        )
        return ForwardContext(
            is_prefill=is_prefill,
            slot_mapping=self._to_device(b.slot_mapping, torch.long),
            query_start=self._to_device(b.query_start, torch.int32),
            context_lens=self._to_device(b.context_lens, torch.int32),
            block_tables=self._to_device(tables, torch.int32),
            max_query_len=max(b.query_lens),
            max_context_len=max(b.context_lens),
            query_lens=b.query_lens,
            context_lens_list=b.context_lens,
            block_size=self.block_size,
            lora=lora,
        )

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype, pin_memory=self._pin)
        return t.to(self.device, non_blocking=True)


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of token positions [start, end), walking whole blocks at a time."""
    out: list[int] = []
    pos = start
    while pos < end:
        block, offset = divmod(pos, block_size)
        stop = min(end, (block + 1) * block_size)
        base = block_table[block] * block_size
        out.extend(range(base + offset, base + offset + stop - pos))
        pos = stop
    return out
