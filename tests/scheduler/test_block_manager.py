import random

import pytest

from scheduler.block_manager import BlockManager
from scheduler.sequence import Sequence


def make_seq(seq_id: int, num_tokens: int) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=list(range(num_tokens)), max_tokens=64)


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0), (-1, 4), (4, True), (2.0, 4)])
def test_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match="must be a positive int"):
        BlockManager(num_blocks, block_size)


@pytest.mark.parametrize(("num_tokens", "blocks"), [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_allocate_covers_every_token(num_tokens, blocks):
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, num_tokens)
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == blocks
    assert len(set(seq.block_table)) == blocks
    assert all(0 <= b < 8 for b in seq.block_table)
    assert bm.num_free_blocks == 8 - blocks
    assert bm.num_used_blocks == blocks


def test_allocate_refuses_when_pool_is_short():
    bm = BlockManager(num_blocks=3, block_size=4)
    first = make_seq(0, 8)
    bm.allocate(first)
    second = make_seq(1, 5)  # needs 2 blocks, 1 free
    assert not bm.can_allocate(second)
    with pytest.raises(RuntimeError, match="needs 2 KV blocks, 1 free"):
        bm.allocate(second)
    assert second.block_table == []
    assert bm.num_free_blocks == 1
    assert bm.can_allocate(make_seq(2, 4))


def test_allocate_twice_is_an_error():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(0, 3)
    bm.allocate(seq)
    with pytest.raises(RuntimeError, match="already holds blocks"):
        bm.allocate(seq)
    assert bm.num_used_blocks == 1


def test_append_slot_takes_a_block_only_at_a_boundary():
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = make_seq(0, 4)
    bm.allocate(seq)
    assert bm.num_free_blocks == 2
    # Token 5 starts block 2.
    seq.output_token_ids.append(100)
    assert bm.can_append(seq)
    bm.append_slot(seq)
    assert len(seq.block_table) == 2
    assert bm.num_free_blocks == 1
    # Tokens 6..8 fit in block 2.
    for tok in (101, 102, 103):
        seq.output_token_ids.append(tok)
        assert bm.can_append(seq)
        bm.append_slot(seq)
        assert len(seq.block_table) == 2
        assert bm.num_free_blocks == 1
    # Token 9 starts block 3, the last free one.
    seq.output_token_ids.append(104)
    bm.append_slot(seq)
    assert len(seq.block_table) == 3
    assert len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 0


def test_can_append_with_an_empty_pool():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(0, 7)
    bm.allocate(seq)
    assert bm.num_free_blocks == 0
    seq.output_token_ids.append(1)  # 8 tokens: still inside block 2
    assert bm.can_append(seq)
    bm.append_slot(seq)
    seq.output_token_ids.append(2)  # 9 tokens: needs a third block
    assert not bm.can_append(seq)
    with pytest.raises(RuntimeError):
        bm.append_slot(seq)
    assert len(seq.block_table) == 2


def test_free_returns_blocks_and_is_idempotent():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = make_seq(0, 9), make_seq(1, 4)
    bm.allocate(a)
    bm.allocate(b)
    assert bm.num_free_blocks == 2
    bm.free(a)
    assert a.block_table == []
    assert bm.num_free_blocks == 5
    bm.free(a)
    assert bm.num_free_blocks == 5
    # The freed blocks are usable again, and b's block is never handed out twice.
    c = make_seq(2, 20)
    bm.allocate(c)
    assert not set(c.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 0
    bm.free(b)
    bm.free(c)
    assert bm.num_free_blocks == 6


def test_random_allocate_append_free_never_leaks_or_double_hands():
    rng = random.Random(1234)
    num_blocks, block_size = 32, 4
    bm = BlockManager(num_blocks, block_size)
    live: list[Sequence] = []
    for step in range(3000):
        op = rng.random()
        if op < 0.35:
            seq = make_seq(step, rng.randint(1, 20))
            if bm.can_allocate(seq):
                bm.allocate(seq)
                live.append(seq)
            else:
                with pytest.raises(RuntimeError):
                    bm.allocate(seq)
        elif op < 0.75 and live:
            seq = rng.choice(live)
            seq.output_token_ids.append(step)
            if bm.can_append(seq):
                bm.append_slot(seq)
            else:
                seq.output_token_ids.pop()
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        held = [b for s in live for b in s.block_table]
        assert len(held) == len(set(held)), "a block is held by two sequences"
        assert bm.num_used_blocks == len(held)
        for s in live:
            assert len(s.block_table) == -(-s.num_tokens // block_size)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == num_blocks


# -- prefix caching ------------------------------------------------------------------------


def computed(bm: BlockManager, seq: Sequence) -> None:
    """Pretend a step computed every token of `seq`, then publish its full blocks."""
    seq.num_computed_tokens = seq.num_tokens
    bm.publish_computed(seq)


def seq_of(seq_id: int, tokens: list[int], adapter_id: int = 0) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=tokens, max_tokens=8, adapter_id=adapter_id)


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # 2 full blocks of 4 + 2 tokens


def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of(0, PROMPT)
    bm.allocate(a)
    computed(bm, a)
    b = seq_of(1, PROMPT)
    assert bm.num_cached_tokens(b) == 0
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    assert not set(a.block_table) & set(b.block_table)


def test_same_adapter_and_prefix_share_computed_full_blocks():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = seq_of(0, PROMPT, adapter_id=1)
    bm.allocate(a)
    # Not computed yet: nothing to share.
    assert bm.num_cached_tokens(seq_of(9, PROMPT, adapter_id=1)) == 0
    computed(bm, a)

    b = seq_of(1, PROMPT + [7, 7], adapter_id=1)
    assert bm.num_cached_tokens(b) == 8
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == 8
    assert bm.num_used_blocks == 4  # a: 3, b: 1 of its own

    # Shared blocks stay in use until both holders let go.
    bm.free(a)
    assert bm.num_used_blocks == 3
    bm.free(b)
    assert bm.num_free_blocks == 8


@pytest.mark.parametrize(
    ("tokens", "adapter_id", "cached"),
    [
        (PROMPT, 2, 0),  # another adapter computes other KV
        ([0] + PROMPT[1:], 1, 0),  # first block differs: the chain breaks at once
        (PROMPT[:4] + [0] + PROMPT[5:], 1, 4),  # second block differs
        (PROMPT[:8], 1, 4),  # the last token is always computed, for its logits
        (PROMPT[:9], 1, 8),
        (PROMPT[:3], 1, 0),
    ],
)
def test_cache_hits_need_the_same_adapter_and_full_prefix(tokens, adapter_id, cached):
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = seq_of(0, PROMPT, adapter_id=1)
    bm.allocate(a)
    computed(bm, a)
    b = seq_of(1, tokens, adapter_id=adapter_id)
    assert bm.num_cached_tokens(b) == cached
    bm.allocate(b)
    assert b.num_computed_tokens == cached
    assert b.block_table[: cached // 4] == a.block_table[: cached // 4]
    assert not set(b.block_table[cached // 4 :]) & set(a.block_table)


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    a = seq_of(0, PROMPT)
    bm.allocate(a)
    computed(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4

    # A repeat of the prompt finds the freed blocks and takes them off the free list.
    again = seq_of(1, PROMPT)
    assert bm.can_allocate(again) and bm.num_cached_tokens(again) == 8
    bm.allocate(again)
    assert again.block_table[:2] == a_blocks[:2]
    assert bm.num_free_blocks == 1
    bm.free(again)

    # Other content overwrites every block; the old prefix is gone.
    other = seq_of(2, [8] * 16)
    bm.allocate(other)
    assert bm.num_free_blocks == 0
    bm.free(other)
    assert bm.num_cached_tokens(seq_of(3, PROMPT)) == 0


def test_a_decoded_block_is_shared_once_full_and_computed():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = seq_of(0, [1, 2, 3])
    bm.allocate(a)
    a.output_token_ids.append(4)  # the step computed 3 tokens and sampled a fourth
    a.num_computed_tokens = 3
    bm.publish_computed(a)
    assert bm.num_cached_tokens(seq_of(1, [1, 2, 3, 4, 5])) == 0  # token 4's KV is not in yet
    a.output_token_ids.append(5)
    bm.append_slot(a)
    a.num_computed_tokens = 4
    bm.publish_computed(a)
    b = seq_of(1, [1, 2, 3, 4, 5])
    assert bm.num_cached_tokens(b) == 4
    bm.allocate(b)
    assert b.block_table[0] == a.block_table[0]
