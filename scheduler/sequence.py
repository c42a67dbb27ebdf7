"""A sequence as the scheduler sees it: token ids, an adapter id, a block table."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

BASE_ADAPTER_ID = 0
"""Adapter id of the base model (no LoRA). Adapter ids are positive ints."""

_arrival_counter = itertools.count()


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generation request's token state.

    `num_computed_tokens` counts tokens whose KV entries are in the cache. A prefill step
    computes `num_tokens - num_computed_tokens` tokens; a decode step computes one.
    Preemption by recompute resets it to 0 and frees the block table.

    `reuse_cached_prefix` False keeps admission from taking cached prefix blocks, so the
    prefill computes every token (a request scoring its whole prompt needs each position's
    logits); the sequence's own blocks are still published for others.
    """

    seq_id: int
    prompt_token_ids: list[int]
    max_tokens: int
    adapter_id: int = BASE_ADAPTER_ID
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    reuse_cached_prefix: bool = True
    arrival: int = field(default_factory=lambda: next(_arrival_counter))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks_needed(self, block_size: int, extra_tokens: int = 0) -> int:
        return -(-(self.num_tokens + extra_tokens) // block_size)
