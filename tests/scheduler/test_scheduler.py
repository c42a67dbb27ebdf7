import dataclasses
import itertools
import random
from collections import Counter

import pytest

from scheduler.config import SchedulerConfig
from scheduler.scheduler import ScheduledBatch, Scheduler
from scheduler.sequence import Sequence, SequenceStatus

_ids = itertools.count()


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
        seq_id=next(_ids),
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


# -- config ------------------------------------------------------------------------------


def test_config_defaults_are_valid():
    cfg = SchedulerConfig(num_blocks=10)
    assert cfg.block_size == 16
    assert cfg.max_num_batched_tokens >= cfg.max_model_len


@pytest.mark.parametrize(
    "name", [f.name for f in dataclasses.fields(SchedulerConfig) if f.name != "enable_prefix_caching"]
)
@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_config_fields_must_be_positive_ints(name, bad):
    with pytest.raises(ValueError, match=rf"{name} must be a positive int, got {bad!r}"):
        SchedulerConfig(**{"num_blocks": 10, name: bad})


def test_config_prefix_caching_flag_must_be_a_bool():
    assert SchedulerConfig(num_blocks=10).enable_prefix_caching is False
    with pytest.raises(ValueError, match="enable_prefix_caching must be a bool, got 1"):
        SchedulerConfig(num_blocks=10, enable_prefix_caching=1)


def test_config_token_budget_must_hold_a_full_prompt():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(100\).*max_model_len \(200\)"):
        SchedulerConfig(num_blocks=10, max_num_batched_tokens=100, max_model_len=200)
    SchedulerConfig(num_blocks=10, max_num_batched_tokens=200, max_model_len=200)


# -- add / basic flow --------------------------------------------------------------------


def test_add_rejects_what_can_never_run():
    sched = Scheduler(make_config(num_blocks=4, block_size=4, max_model_len=32))
    with pytest.raises(ValueError, match="longer than max_model_len=32"):
        sched.add(make_seq(33))
    with pytest.raises(ValueError, match="needs 5 KV blocks, the pool has 4"):
        sched.add(make_seq(17))
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add(make_seq(0))
    seq = make_seq(16)
    sched.add(seq)
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(seq)
    assert sched.waiting == (seq,)


def test_prefill_then_decode():
    sched = Scheduler(make_config())
    a, b = make_seq(5), make_seq(3, adapter_id=2)
    sched.add(a)
    sched.add(b)
    assert sched.has_unfinished and sched.num_waiting == 2

    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [a, b]
    assert batch.num_new_tokens == [5, 3]
    assert batch.preempted == []
    assert a.status is b.status is SequenceStatus.RUNNING
    assert len(a.block_table) == 2 and len(b.block_table) == 1
    assert sched.num_running == 2 and sched.num_waiting == 0
    assert sched.running_adapter_ids() == {2}

    sched.update(batch, [11, 12])
    assert a.output_token_ids == [11] and b.output_token_ids == [12]
    assert a.num_computed_tokens == 5 and b.num_computed_tokens == 3

    batch = sched.schedule()
    assert not batch.is_prefill and set(batch.seqs) == {a, b}
    assert batch.num_new_tokens == [1, 1]
    assert len(b.block_table) == 1  # 4 tokens still fit one block
    sched.update(batch, [13, 14])
    assert a.num_computed_tokens == 6 and a.num_tokens == 7


def test_finishing_after_schedule_leaves_the_batch_alone():
    sched = Scheduler(make_config())
    seqs = [make_seq() for _ in range(3)]
    for s in seqs:
        sched.add(s)
    step(sched)
    batch = sched.schedule()
    assert not batch.is_prefill
    for s in seqs:
        sched.finish(s)
    assert batch.seqs == seqs and not sched.has_unfinished


def test_update_needs_one_token_per_sequence():
    sched = Scheduler(make_config())
    sched.add(make_seq())
    batch = sched.schedule()
    with pytest.raises(ValueError, match="2 sampled tokens for 1 sequences"):
        sched.update(batch, [1, 2])


def test_empty_scheduler_gives_an_empty_batch():
    batch = Scheduler(make_config()).schedule()
    assert batch.is_empty and batch.seqs == [] and not batch.is_prefill


# -- budgets -----------------------------------------------------------------------------


def test_token_budget_splits_prefill_across_steps():
    sched = Scheduler(make_config(max_num_batched_tokens=16, max_model_len=16))
    seqs = [make_seq(6) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    first = step(sched)
    assert first.is_prefill and first.seqs == seqs[:2] and first.num_batched_tokens == 12
    second = step(sched)
    assert second.is_prefill and second.seqs == seqs[2:]
    third = step(sched)
    assert not third.is_prefill and len(third.seqs) == 3


def test_head_too_big_for_the_budget_is_not_overtaken():
    sched = Scheduler(make_config(max_num_batched_tokens=16, max_model_len=16))
    a, b, small = make_seq(10), make_seq(10), make_seq(2)
    for s in (a, b, small):
        sched.add(s)
    assert step(sched).seqs == [a]  # small would fit the 6 tokens left, but b is older
    assert step(sched).seqs == [b, small]


def test_head_short_of_blocks_is_not_overtaken():
    sched = Scheduler(make_config(num_blocks=6, block_size=4))
    holder, big, small = make_seq(16), make_seq(12), make_seq(4)
    sched.add(holder)
    assert step(sched).seqs == [holder]  # 5 of 6 blocks after the sampled token
    sched.add(big)
    sched.add(small)
    batch = step(sched)
    assert not batch.is_prefill and batch.seqs == [holder]
    assert sched.waiting == (big, small)
    sched.finish(holder)
    assert step(sched).seqs == [big, small]


def test_max_num_seqs_caps_running():
    sched = Scheduler(make_config(max_num_seqs=2))
    seqs = [make_seq(max_tokens=3) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    assert step(sched).seqs == seqs[:2]
    batch = step(sched)
    assert not batch.is_prefill and batch.seqs == seqs[:2]
    sched.finish(seqs[0])
    assert step(sched).seqs == [seqs[2]]
    assert sched.num_running == 2


# -- adapters ----------------------------------------------------------------------------


def test_adapter_cap_limits_distinct_adapters_and_base_never_counts():
    sched = Scheduler(make_config(max_adapters_per_batch=2))
    a1, a2, a3, a1b, base, a2b = (make_seq(adapter_id=i) for i in (1, 2, 3, 1, 0, 2))
    for s in (a1, a2, a3, a1b, base, a2b):
        sched.add(s)
    batch = step(sched)
    assert batch.seqs == [a1, a2, a1b, base, a2b]
    assert sched.waiting == (a3,)
    assert sched.running_adapter_ids() == {1, 2}
    # Still capped while 1 and 2 run; more base requests always get in.
    more_base = [make_seq() for _ in range(4)]
    for s in more_base:
        sched.add(s)
    assert step(sched).seqs == more_base
    assert sched.waiting == (a3,)
    # Once adapter 1 drains, adapter 3 takes its place.
    sched.finish(a1)
    sched.finish(a1b)
    assert step(sched).seqs == [a3]
    assert sched.running_adapter_ids() == {2, 3}


def test_base_only_traffic_ignores_the_adapter_cap():
    sched = Scheduler(make_config(max_adapters_per_batch=1))
    seqs = [make_seq(adapter_id=1)] + [make_seq() for _ in range(6)]
    for s in seqs:
        sched.add(s)
    assert step(sched).seqs == seqs
    assert sched.running_adapter_ids() == {1}


def _run_until_admitted(sched, targets, arrivals_per_step, max_steps):
    """Step with a steady stream of new arrivals; return the step each target started."""
    started: dict[int, int] = {}
    for n in range(1, max_steps + 1):
        for adapter_id in arrivals_per_step:
            sched.add(make_seq(adapter_id=adapter_id, max_tokens=4))
        step(sched)
        assert len(sched.running_adapter_ids()) <= sched.config.max_adapters_per_batch
        for t in targets:
            if t.seq_id not in started and t.status is not SequenceStatus.WAITING:
                started[t.seq_id] = n
        if len(started) == len(targets):
            break
    return started


def test_new_adapter_is_admitted_within_starvation_steps_plus_drain():
    starvation_steps, max_tokens = 3, 4
    sched = Scheduler(
        make_config(
            num_blocks=512,
            max_num_seqs=256,
            max_num_batched_tokens=256,
            max_adapters_per_batch=2,
            starvation_steps=starvation_steps,
        )
    )
    sched.add(make_seq(adapter_id=1, max_tokens=max_tokens))
    sched.add(make_seq(adapter_id=2, max_tokens=max_tokens))
    step(sched)
    head = make_seq(adapter_id=3, max_tokens=max_tokens)
    sched.add(head)
    # Adapters 1 and 2 keep arriving, so without the bound they would always fill the cap.
    started = _run_until_admitted(sched, [head], arrivals_per_step=(1, 2), max_steps=50)
    # Passed over starvation_steps + 1 times, then running seqs drain in max_tokens steps.
    assert started[head.seq_id] <= starvation_steps + 1 + max_tokens


def test_without_the_bound_the_new_adapter_would_starve():
    sched = Scheduler(
        make_config(
            num_blocks=1024,
            max_num_seqs=256,
            max_num_batched_tokens=256,
            max_adapters_per_batch=2,
            starvation_steps=1000,
        )
    )
    sched.add(make_seq(adapter_id=1))
    sched.add(make_seq(adapter_id=2))
    step(sched)
    head = make_seq(adapter_id=3)
    sched.add(head)
    assert _run_until_admitted(sched, [head], arrivals_per_step=(1, 2), max_steps=30) == {}


def test_oldest_starved_head_goes_first():
    starvation_steps, max_tokens = 2, 4
    sched = Scheduler(
        make_config(
            num_blocks=512,
            max_num_seqs=256,
            max_num_batched_tokens=256,
            max_adapters_per_batch=1,
            starvation_steps=starvation_steps,
        )
    )
    sched.add(make_seq(adapter_id=1, max_tokens=max_tokens))
    step(sched)
    older = make_seq(adapter_id=2, max_tokens=max_tokens)
    newer = make_seq(adapter_id=3, max_tokens=max_tokens)
    sched.add(older)
    sched.add(newer)
    started = _run_until_admitted(sched, [older, newer], arrivals_per_step=(1,), max_steps=60)
    assert started[older.seq_id] <= starvation_steps + 1 + max_tokens
    # The newer one was passed over alongside the older one, so it only waits for
    # the older one's adapter to drain.
    assert started[older.seq_id] < started[newer.seq_id] <= started[older.seq_id] + max_tokens


# -- preemption --------------------------------------------------------------------------


def test_decode_preempts_the_latest_arrival_and_it_re_prefills_its_outputs():
    sched = Scheduler(make_config(num_blocks=3, block_size=4))
    first, latest = make_seq(4), make_seq(4)
    sched.add(first)
    sched.add(latest)
    step(sched)  # both 5 tokens now: each needs a second block, one is free
    later_arrival = make_seq(8)  # needs 2 blocks: cannot be admitted yet
    sched.add(later_arrival)
    latest_blocks = list(latest.block_table)

    batch = sched.schedule()
    assert not batch.is_prefill and batch.seqs == [first]
    assert batch.preempted == [latest]
    assert latest.status is SequenceStatus.WAITING
    assert latest.block_table == [] and latest.num_computed_tokens == 0
    assert latest.num_preemptions == 1
    assert latest.output_token_ids == [7]
    assert sched.waiting == (latest, later_arrival)
    assert sched.running == (first,)
    # Its block went back to the pool.
    assert sched.block_manager.num_free_blocks == 1
    assert latest_blocks[0] not in first.block_table
    sched.update(batch, [8])

    sched.finish(first)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [latest]
    assert batch.num_new_tokens == [5]  # prompt + the output it already had
    assert latest.token_ids == [5, 5, 5, 5, 7]
    sched.update(batch, [9])
    assert latest.output_token_ids == [7, 9] and latest.num_computed_tokens == 5


def test_preemption_frees_a_newer_seq_for_an_older_one():
    sched = Scheduler(make_config(num_blocks=2, block_size=4))
    old, new = make_seq(4), make_seq(2)
    sched.add(old)
    sched.add(new)
    step(sched)  # old: 5 tokens needs a block; new: 3 tokens fits its own
    batch = sched.schedule()
    assert batch.seqs == [old] and batch.preempted == [new]
    assert len(old.block_table) == 2
    assert sched.block_manager.num_free_blocks == 0


def test_several_preempted_go_back_oldest_first():
    sched = Scheduler(make_config(num_blocks=4, block_size=4))
    seqs = [make_seq(4) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    step(sched)
    waiting_before = make_seq(16)
    sched.add(waiting_before)  # 4 blocks: cannot fit while others run
    batch = sched.schedule()
    # 4 free blocks are gone; each survivor needs one more: two keep going.
    assert batch.seqs == seqs[:2]
    assert batch.preempted == [seqs[3], seqs[2]]
    assert sched.waiting == (seqs[2], seqs[3], waiting_before)


def test_a_seq_that_outgrows_the_pool_is_preempted_and_left_waiting():
    sched = Scheduler(make_config(num_blocks=2, block_size=4))
    seq = make_seq(8)
    sched.add(seq)
    step(sched)
    batch = sched.schedule()
    assert batch.is_empty and batch.preempted == [seq]
    assert sched.num_running == 0 and sched.waiting == (seq,)
    assert sched.block_manager.num_free_blocks == 2
    assert sched.schedule().is_empty


# -- finish / abort ----------------------------------------------------------------------


def test_finish_frees_blocks_and_is_never_scheduled_again():
    sched = Scheduler(make_config())
    a, b = make_seq(), make_seq()
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.finish(a)
    assert a.status is SequenceStatus.FINISHED and a.block_table == []
    assert sched.running == (b,)
    sched.finish(a)  # idempotent
    for _ in range(3):
        assert a not in step(sched).seqs
    with pytest.raises(ValueError, match="not scheduled here"):
        sched.finish(make_seq())


def test_abort_from_waiting_and_running():
    sched = Scheduler(make_config(max_num_seqs=1))
    running, waiting = make_seq(9), make_seq()
    sched.add(running)
    sched.add(waiting)
    step(sched)
    assert sched.block_manager.num_used_blocks == 3

    assert sched.abort(waiting.seq_id) is waiting
    assert waiting.status is SequenceStatus.FINISHED and sched.num_waiting == 0

    assert sched.abort(running.seq_id) is running
    assert running.status is SequenceStatus.FINISHED and running.block_table == []
    assert sched.num_running == 0 and not sched.has_unfinished
    assert sched.block_manager.num_free_blocks == sched.config.num_blocks

    assert sched.abort(running.seq_id) is None
    assert sched.abort(10**9) is None


def test_abort_between_schedule_and_update_drops_the_result():
    sched = Scheduler(make_config())
    a, b = make_seq(), make_seq()
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sched.abort(a.seq_id)
    sched.update(batch, [1, 2])
    assert a.output_token_ids == [] and b.output_token_ids == [2]
    assert step(sched).seqs == [b]


def test_waiting_and_running_views_are_read_only():
    sched = Scheduler(make_config())
    sched.add(make_seq())
    with pytest.raises(AttributeError):
        sched.waiting.append(make_seq())  # type: ignore[attr-defined]
    assert sched.num_waiting == 1


# -- prefix caching ------------------------------------------------------------------------


def test_cached_prefix_is_not_charged_to_the_token_budget():
    sched = Scheduler(make_config(max_num_batched_tokens=16, max_model_len=16, enable_prefix_caching=True))
    first = make_seq(12)
    sched.add(first)
    step(sched)
    repeat = Sequence(next(_ids), [5] * 12 + [6], max_tokens=8)  # 12 tokens cached
    other = Sequence(next(_ids), [9] * 10, max_tokens=8)
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


# -- randomized ---------------------------------------------------------------------------


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


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_random_traffic_keeps_every_invariant_and_leaks_nothing(prefix_caching):
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
    )
    sched = Scheduler(cfg)
    bm = sched.block_manager
    # Few prefixes, adapters and sampled values, so identical blocks recur.
    prefixes = [[rng.randint(0, 3) for _ in range(16)] for _ in range(3)]
    kv: dict[int, tuple] = {}
    known: list[Sequence] = []
    num_preempted = num_aborted = num_finished = num_reused = 0
    for _ in range(1500):
        for _ in range(rng.choice((0, 0, 1, 2))):
            prompt = rng.choice(prefixes)[: rng.randint(1, 16)] + [
                rng.randint(0, 3) for _ in range(rng.randint(0, 4))
            ]
            seq = Sequence(next(_ids), prompt, max_tokens=rng.randint(1, 12), adapter_id=rng.randint(0, 3))
            sched.add(seq)
            known.append(seq)

        batch = sched.schedule()
        num_preempted += len(batch.preempted)
        assert not any(s.is_finished for s in batch.seqs)
        assert len(set(batch.seqs)) == len(batch.seqs)
        if batch.is_prefill:
            assert batch.num_batched_tokens <= cfg.max_num_batched_tokens
            for seq in batch.seqs:
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
    assert (num_reused > 0) == prefix_caching
    for s in known:
        sched.abort(s.seq_id)
    assert not sched.has_unfinished
    assert bm.num_free_blocks == cfg.num_blocks
