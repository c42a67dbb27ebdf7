"""Scheduler limits: KV pool size, per-step budgets, the adapter cap, fairness."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class SchedulerConfig:
    """Limits the scheduler enforces every step.

    `max_adapters_per_batch` caps the distinct non-base adapters among running
    sequences, because each needs a GPU slot while it runs. `starvation_steps` bounds
    how many prefill steps a request blocked only by that cap may be passed over by
    later requests for adapters that are already active. `enable_prefix_caching` lets
    a prefill reuse computed KV blocks of an identical (adapter, prefix); the engine's
    prefill must then start at each sequence's `num_computed_tokens`. `mixed_steps` lets a
    step that admits prompts also carry one decode token for every running sequence, so a
    burst of prompts does not pause the streams already running (off by default until its
    cost on the GPU, eager mixed steps against graph-replayed decodes, is measured).
    """

    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    max_adapters_per_batch: int = 8
    starvation_steps: int = 32
    enable_prefix_caching: bool = False
    mixed_steps: bool = False

    def __post_init__(self) -> None:
        for flag in ("enable_prefix_caching", "mixed_steps"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        for f in fields(self):
            if f.name in ("enable_prefix_caching", "mixed_steps"):
                continue
            value = getattr(self, f.name)
            # bool is an int subclass; `block_size=True` is a mistake, not a 1.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be a positive int, got {value!r}")
        if self.max_num_batched_tokens < self.max_model_len:
            # Prefill is not chunked: a prompt must fit one step's token budget.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}) so any admissible prompt fits one step"
            )
