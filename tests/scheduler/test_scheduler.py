import dataclasses

import pytest

from scheduler.config import SchedulerConfig
from scheduler.scheduler import Scheduler
from scheduler.sequence import SequenceStatus
from tests.scheduler.helpers import make_config, make_seq, step

# -- config ------------------------------------------------------------------------------


def test_config_defaults_are_valid():
    cfg = SchedulerConfig(num_blocks=10)
    assert cfg.block_size == 16
    assert cfg.max_num_batched_tokens >= cfg.max_model_len


@pytest.mark.parametrize(
    "name", [f.name for f in dataclasses.fields(SchedulerConfig) if f.name not in ("enable_prefix_caching",
                                                                                 "mixed_steps")]
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


def test_a_mixed_step_decodes_the_running_and_admits_prompts_in_the_rest_of_the_budget():
    sched = Scheduler(make_config(num_blocks=64, block_size=4, max_num_batched_tokens=16, max_model_len=16,
                                  mixed_steps=True))
    running = [make_seq(3, max_tokens=8) for _ in range(3)]
    for seq in running:
        sched.add(seq)
    first = sched.schedule()
    assert first.is_prefill and first.seqs == running  # nothing ran yet: a plain prefill
    sched.update(first, [7, 7, 7])
    fits, too_big = make_seq(13, max_tokens=2), make_seq(4, max_tokens=2)
    sched.add(fits)
    sched.add(too_big)
    mixed = sched.schedule()
    # Three decode rows first, then the prompt that fits the 13 tokens left; the next waits (FIFO on size).
    assert mixed.is_prefill and mixed.seqs == [*running, fits] and mixed.num_new_tokens == [1, 1, 1, 13]
    assert list(sched.waiting) == [too_big]
    sched.update(mixed, [8, 8, 8, 9])
    assert all(s.num_computed_tokens == s.num_tokens - 1 for s in mixed.seqs)
    nxt = sched.schedule()
    assert nxt.seqs == [*running, fits, too_big] and nxt.num_new_tokens == [1, 1, 1, 1, 4]


def test_a_mixed_step_that_preempts_admits_nothing():
    sched = Scheduler(make_config(num_blocks=4, block_size=4, max_num_batched_tokens=16, max_model_len=16,
                                  mixed_steps=True))
    a, b = make_seq(8, max_tokens=8), make_seq(8, max_tokens=8)
    sched.add(a)
    sched.add(b)
    sched.update(sched.schedule(), [3, 3])  # both fill their two blocks: the pool is full
    sched.add(make_seq(1, max_tokens=1))
    step = sched.schedule()
    assert step.preempted == [b] and not step.is_prefill and step.seqs == [a]
