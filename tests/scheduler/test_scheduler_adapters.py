"""The adapter cap, and the starvation bound that keeps it fair."""

from scheduler.scheduler import Scheduler
from scheduler.sequence import SequenceStatus
from tests.scheduler.helpers import make_config, make_seq, step

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
