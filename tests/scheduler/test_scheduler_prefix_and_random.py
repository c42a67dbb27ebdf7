"""Prefix caching, and randomized traffic against every scheduler invariant."""

import random
from collections import Counter

import pytest

from scheduler.scheduler import Scheduler
from scheduler.sequence import Sequence, SequenceStatus
from tests.scheduler.helpers import make_config, make_seq, seq_ids, step

# -- prefix caching ------------------------------------------------------------------------


def test_cached_prefix_is_not_charged_to_the_token_budget():
    sched = Scheduler(make_config(max_num_batched_tokens=16, max_model_len=16, enable_prefix_caching=True))
    first = make_seq(12)
    sched.add(first)
    step(sched)
    repeat = Sequence(next(seq_ids), [5] * 12 + [6], max_tokens=8)  # 12 tokens cached
    other = Sequence(next(seq_ids), [9] * 10, max_tokens=8)
    sched.add(repeat)
    sched.add(other)
    batch = sched.schedule()
    assert batch.seqs == [repeat, other]
    assert batch.num_new_tokens == [1, 10]  # 23 tokens without the cache
    assert repeat.block_table[:3] == first.block_table[:3]


def test_preempted_seq_reuses_its_own_cached_blocks():
    sched = Scheduler(make_config(num_blocks=5, block_size=4, enable_prefix_caching=True))
    old, new = make_seq(8), make_seq(8)
    sched.add(old)
    sched.add(new)
    step(sched)
    batch = sched.schedule()
    assert batch.preempted == [new] and new.block_table == []
    sched.update(batch, [1])
    sched.finish(old)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [new]
    assert batch.num_new_tokens == [1]  # only the token whose KV was never computed
    assert new.num_computed_tokens == 8


def test_a_sequence_that_must_compute_every_token_takes_no_cached_blocks_but_publishes_its_own():
    sched = Scheduler(make_config(enable_prefix_caching=True))
    first = make_seq(12)
    sched.add(first)
    step(sched)
    scoring = Sequence(next(seq_ids), [5] * 12 + [6], max_tokens=8, reuse_cached_prefix=False)
    sched.add(scoring)
    batch = sched.schedule()
    assert batch.seqs == [scoring] and batch.num_new_tokens == [13]  # 12 would be cached
    assert scoring.num_computed_tokens == 0 and not set(scoring.block_table) & set(first.block_table)
    sched.update(batch, [1])

    fresh = Sequence(next(seq_ids), [9] * 8 + [6], max_tokens=8, reuse_cached_prefix=False)
    sched.add(fresh)
    batch = sched.schedule()
    sched.update(batch, [1])
    later = Sequence(next(seq_ids), [9] * 8 + [1, 2], max_tokens=8)
    sched.add(later)
    batch = sched.schedule()
    assert batch.seqs == [later] and batch.num_new_tokens == [2]
    assert later.block_table[:2] == fresh.block_table[:2]  # published by the sequence that took none


# -- randomized ---# -- randomized ---------------------------------------------------------------------------


def _check_and_fake_compute(batch, sched, kv):
    """Play the engine against a fake KV store keyed by slot.

    The KV of position p depends on the adapter and tokens[:p+1]; every position a
    sequence counts as computed must hold exactly that, and a step may only write
    into blocks no other sequence holds.
    """
    bs = sched.config.block_size
    holders = Counter(b for s in sched.running for b in s.block_table)
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
        assert num_new == seq.num_tokens - seq.num_computed_tokens >= 1
        tokens = seq.token_ids

        def slot(p, seq=seq):
            return seq.block_table[p // bs] * bs + p % bs

        for p in range(seq.num_computed_tokens):
            assert kv.get(slot(p)) == (seq.adapter_id, tuple(tokens[: p + 1]))
        for p in range(seq.num_computed_tokens, seq.num_tokens):
            assert holders[seq.block_table[p // bs]] == 1, "write into a shared block"
            kv[slot(p)] = (seq.adapter_id, tuple(tokens[: p + 1]))


@pytest.mark.parametrize("mixed", [False, True], ids=["prefill_or_decode", "mixed_steps"])
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_random_traffic_keeps_every_invariant_and_leaks_nothing(prefix_caching, mixed):
    rng = random.Random(20240611)
    cfg = make_config(
        num_blocks=24,
        block_size=4,
        max_num_seqs=6,
        max_num_batched_tokens=32,
        max_model_len=32,
        max_adapters_per_batch=2,
        starvation_steps=4,
        enable_prefix_caching=prefix_caching,
        mixed_steps=mixed,
    )
    sched = Scheduler(cfg)
    bm = sched.block_manager
    # Few prefixes, adapters and sampled values, so identical blocks recur.
    prefixes = [[rng.randint(0, 3) for _ in range(16)] for _ in range(3)]
    kv: dict[int, tuple] = {}
    known: list[Sequence] = []
    num_preempted = num_aborted = num_finished = num_reused = num_mixed = 0
    for _ in range(1500):
        for _ in range(rng.choice((0, 0, 1, 2))):
            prompt = rng.choice(prefixes)[: rng.randint(1, 16)] + [
                rng.randint(0, 3) for _ in range(rng.randint(0, 4))
            ]
            seq = Sequence(next(seq_ids), prompt, max_tokens=rng.randint(1, 12), adapter_id=rng.randint(0, 3))
            sched.add(seq)
            known.append(seq)

        running_before = set(sched.running)
        batch = sched.schedule()
        num_preempted += len(batch.preempted)
        assert not any(s.is_finished for s in batch.seqs)
        assert len(set(batch.seqs)) == len(batch.seqs)
        if batch.is_prefill:
            assert batch.num_batched_tokens <= cfg.max_num_batched_tokens
            decoding = [s for s in batch.seqs if s in running_before]  # one-token rows of a mixed step
            assert not decoding or mixed
            assert not (batch.preempted and len(decoding) < len(batch.seqs)), "admitted in a step that preempted"
            num_mixed += bool(decoding)
            for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
                if seq in running_before:
                    assert num_new == 1
                    continue
                assert seq.num_computed_tokens % cfg.block_size == 0
                num_reused += seq.num_computed_tokens
        else:
            assert set(batch.seqs) == set(sched.running)
            assert batch.num_new_tokens == [1] * len(batch.seqs)
        if sched.has_unfinished:
            # These requests always fit an empty pool, so something must make progress.
            assert not batch.is_empty or sched.num_running > 0
        for s in batch.seqs:
            assert len(s.block_table) == bm.blocks_for(s.num_tokens)
        for s in sched.running:
            assert s.status is SequenceStatus.RUNNING
        for s in sched.waiting:
            assert s.status is SequenceStatus.WAITING
            assert s.block_table == [] and s.num_computed_tokens == 0
        held = [b for s in sched.running for b in s.block_table]
        assert len(set(held)) == bm.num_used_blocks
        if not prefix_caching:
            assert len(held) == len(set(held))
        assert sched.num_running <= cfg.max_num_seqs
        assert len(sched.running_adapter_ids()) <= cfg.max_adapters_per_batch
        assert 0 not in sched.running_adapter_ids()
        _check_and_fake_compute(batch, sched, kv)

        sched.update(batch, [rng.randint(0, 3) for _ in batch.seqs])
        for s in batch.seqs:
            if s.num_output_tokens >= s.max_tokens or rng.random() < 0.05:
                sched.finish(s)
                num_finished += 1
        if rng.random() < 0.1:
            victim = rng.choice(known)
            was_live = not victim.is_finished
            aborted = sched.abort(victim.seq_id)
            assert aborted is (victim if was_live else None)
            assert victim.is_finished and victim.block_table == []
            num_aborted += aborted is not None

    # The run exercised every path it is meant to check.
    assert num_preempted > 0 and num_aborted > 0 and num_finished > 0
    assert (num_mixed > 0) == mixed
    assert (num_reused > 0) == prefix_caching
    for s in known:
        sched.abort(s.seq_id)
    assert not sched.has_unfinished
    assert bm.num_free_blocks == cfg.num_blocks
