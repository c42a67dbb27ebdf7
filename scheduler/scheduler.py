"""Continuous batching: who runs this step, within token, block and adapter budgets.

A step is all prefill or all decode. Waiting sequences are admitted oldest first while
they fit; otherwise every running sequence decodes one token, and sequences are
preempted by recompute (newest arrival first) when KV blocks run out. With `mixed_steps`
a step that admits prompts also carries the running sequences' decode tokens (as one-token
rows of the prefill), so a burst of prompts does not pause the streams already running; a
step that had to preempt then admits nothing (the victims would come straight back).

Admission is FIFO on size (a request short of blocks or tokens is never overtaken) but
not on adapters: a request held back only by the adapter cap may be passed over by
later requests whose adapter already runs. Each pass-over is counted per request; once
a request has been passed over more than `starvation_steps` times, nothing behind it is
admitted until it fits, so running adapters drain and its wait is bounded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from scheduler.block_manager import BlockManager
from scheduler.config import SchedulerConfig
from scheduler.sequence import BASE_ADAPTER_ID, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """What the engine computes this step."""

    seqs: list[Sequence]
    is_prefill: bool
    num_new_tokens: list[int]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    """Waiting and running queues over one KV block pool.

    The engine drives it: `schedule()`, run the batch, `update()` with one sampled
    token per sequence, then `finish()` the sequences that stopped.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._by_id: dict[int, Sequence] = {}
        # seq_id -> prefill steps in which the sequence was skipped for the adapter cap
        # while a later one was admitted; bounds how long an adapter can be starved.
        self._passed_over: dict[int, int] = {}

    # -- queues ----------------------------------------------------------------------

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def running_adapter_ids(self) -> set[int]:
        """Distinct adapter ids among running sequences; the base model (0) is not one."""
        return {s.adapter_id for s in self._running if s.adapter_id != BASE_ADAPTER_ID}

    # -- lifecycle ---------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raise ValueError if it could never be scheduled."""
        if seq.seq_id in self._by_id:
            raise ValueError(f"sequence id {seq.seq_id} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} is not a fresh waiting sequence")
        if seq.adapter_id < 0:
            raise ValueError(f"adapter_id must be >= 0, got {seq.adapter_id}")
        if seq.num_prompt_tokens == 0:
            raise ValueError(f"sequence {seq.seq_id} has an empty prompt")
        if seq.num_prompt_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt of {seq.num_prompt_tokens} tokens is longer than "
                f"max_model_len={self.config.max_model_len}"
            )
        needed = self.block_manager.blocks_for(seq.num_tokens)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"sequence of {seq.num_tokens} tokens needs {needed} KV blocks, "
                f"the pool has {self.block_manager.num_blocks}"
            )
        self._waiting.append(seq)
        self._by_id[seq.seq_id] = seq

    def finish(self, seq: Sequence) -> None:
        """Mark `seq` finished and release its blocks. A no-op if already finished."""
        if seq.is_finished:
            return
        if self._by_id.get(seq.seq_id) is not seq:
            raise ValueError(f"sequence {seq.seq_id} is not scheduled here")
        self._release(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Drop a waiting or running sequence; return it, or None if the id is unknown."""
        seq = self._by_id.get(seq_id)
        if seq is not None:
            self._release(seq)
        return seq

    def _release(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        del self._by_id[seq.seq_id]
        self._passed_over.pop(seq.seq_id, None)

    # -- steps -------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """Pick this step's batch: a prefill of newly admitted sequences if any fit,
        else one decode token for every running sequence.

        An empty batch while nothing runs and sequences wait means the oldest waiting
        one can never fit (it outgrew the block pool or the token budget); the engine
        has to finish or abort it.
        """
        if self.config.mixed_steps and self._running:
            return self._schedule_mixed()
        admitted = self._admit(self.config.max_num_batched_tokens)
        if admitted:
            return ScheduledBatch(admitted, is_prefill=True, num_new_tokens=_prefill_lengths(admitted))
        return self._schedule_decode()

    def _schedule_mixed(self) -> ScheduledBatch:
        """Every running sequence's decode token, then the prompts that fit in the rest of the budget."""
        decode = self._schedule_decode()
        if decode.preempted or not self._waiting:
            return decode
        admitted = self._admit(self.config.max_num_batched_tokens - len(decode.seqs))
        if not admitted:
            return decode
        return ScheduledBatch(decode.seqs + admitted, is_prefill=True,
                              num_new_tokens=decode.num_new_tokens + _prefill_lengths(admitted))

    def update(self, batch: ScheduledBatch, sampled_token_ids: list[int]) -> None:
        """Append each sequence's sampled token; its KV is computed next step.

        Full blocks whose KV this step completed become shareable (prefix caching).
        """
        if len(sampled_token_ids) != len(batch.seqs):
            raise ValueError(f"got {len(sampled_token_ids)} sampled tokens for {len(batch.seqs)} sequences")
        for seq, token_id in zip(batch.seqs, sampled_token_ids, strict=True):
            # Aborted between schedule() and update(): its result is dropped.
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.output_token_ids.append(token_id)
            seq.num_computed_tokens = seq.num_tokens - 1
            self.block_manager.publish_computed(seq)

    def _admit(self, budget: int) -> list[Sequence]:
        """Move the waiting sequences that fit this step (`budget` tokens) to running, oldest first."""
        cfg = self.config
        active = self.running_adapter_ids()
        admitted: list[Sequence] = []
        skipped: list[Sequence] = []  # held back by the adapter cap, in queue order
        passed_over: list[Sequence] = []
        for seq in self._waiting:
            if len(self._running) + len(admitted) >= cfg.max_num_seqs:
                break
            if not self._adapter_fits(seq.adapter_id, active):
                if self._passed_over.get(seq.seq_id, 0) > cfg.starvation_steps:
                    # Waited long enough: admit nothing behind it, so running adapters
                    # drain until it fits.
                    break
                skipped.append(seq)
                continue
            num_new = seq.num_tokens - self.block_manager.num_cached_tokens(seq)
            # FIFO on size: a big request is never overtaken by smaller ones behind it.
            if num_new > budget or not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            budget -= num_new
            admitted.append(seq)
            if seq.adapter_id != BASE_ADAPTER_ID:
                active.add(seq.adapter_id)
            passed_over.extend(skipped)
            skipped.clear()
        if admitted:
            for seq in passed_over:
                self._passed_over[seq.seq_id] = self._passed_over.get(seq.seq_id, 0) + 1
            for seq in admitted:
                self._passed_over.pop(seq.seq_id, None)
            self._waiting = deque(s for s in self._waiting if s.status is SequenceStatus.WAITING)
            self._running.extend(admitted)
        return admitted

    def _adapter_fits(self, adapter_id: int, active: set[int]) -> bool:
        return (
            adapter_id == BASE_ADAPTER_ID
            or adapter_id in active
            or len(active) < self.config.max_adapters_per_batch
        )

    def _schedule_decode(self) -> ScheduledBatch:
        """One token for every running sequence, preempting the newest when blocks run out.

        A sequence that already holds its last token (max_tokens, or max_model_len) is left
        out: the engine finishes it once it has read that token (it may still be on the
        device while this step is scheduled).
        """
        preempted: list[Sequence] = []
        complete = [s for s in self._running if self._complete(s)]
        pending = deque(sorted((s for s in self._running if not self._complete(s)), key=lambda s: s.arrival))
        scheduled: list[Sequence] = []
        while pending:
            seq = pending.popleft()
            # Everything still pending arrived after `seq`, so the newest is at the end.
            fits = self.block_manager.can_append(seq)
            while not fits and pending:
                self._preempt(pending.pop(), preempted)
                fits = self.block_manager.can_append(seq)
            if fits:
                self.block_manager.append_slot(seq)
                scheduled.append(seq)
            else:
                self._preempt(seq, preempted)
        # A copy: finishing a sequence must not change the batch the engine holds.
        self._running = scheduled + complete
        return ScheduledBatch(
            scheduled, is_prefill=False, num_new_tokens=[1] * len(scheduled), preempted=preempted
        )

    def _complete(self, seq: Sequence) -> bool:
        return seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len

    def _preempt(self, seq: Sequence, preempted: list[Sequence]) -> None:
        """Recompute later: drop the KV, keep the tokens, go back to the front."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        # Victims are taken newest first, so the front ends up oldest first.
        self._waiting.appendleft(seq)
        preempted.append(seq)


def _prefill_lengths(admitted: list[Sequence]) -> list[int]:
    return [s.num_tokens - s.num_computed_tokens for s in admitted]
