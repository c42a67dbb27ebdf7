"""Shared builders for the scheduler tests: a small config, sequences, one engine step."""

import itertools

from scheduler.config import SchedulerConfig
from scheduler.scheduler import ScheduledBatch, Scheduler
from scheduler.sequence import Sequence

seq_ids = itertools.count()  # unique sequence ids across the tests


def make_config(**overrides) -> SchedulerConfig:
    kwargs = dict(
        num_blocks=64,
        block_size=4,
        max_num_seqs=16,
        max_num_batched_tokens=64,
        max_model_len=32,
        max_adapters_per_batch=8,
        starvation_steps=32,
    )
    kwargs.update(overrides)
    return SchedulerConfig(**kwargs)


def make_seq(num_tokens: int = 4, adapter_id: int = 0, max_tokens: int = 8) -> Sequence:
    return Sequence(
        seq_id=next(seq_ids),
        prompt_token_ids=[5] * num_tokens,
        max_tokens=max_tokens,
        adapter_id=adapter_id,
    )


def step(sched: Scheduler, token: int = 7) -> ScheduledBatch:
    """One engine step: schedule, sample `token` for everyone, finish at max_tokens."""
    batch = sched.schedule()
    sched.update(batch, [token] * len(batch.seqs))
    for seq in batch.seqs:
        if seq.num_output_tokens >= seq.max_tokens:
            sched.finish(seq)
    return batch
