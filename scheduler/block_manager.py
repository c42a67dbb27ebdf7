"""Paged KV-cache accounting: which block ids each sequence holds.

Only integers live here; the engine owns the cache tensors and reads a sequence's
`block_table` to place token `p` at slot `block_table[p // block_size] * block_size +
p % block_size`.

With prefix caching on, a full block whose KV has been computed is indexed by a hash
chain over (adapter id, the tokens of every block up to and including it), so a later
sequence with the same adapter and prefix shares it instead of recomputing it. The
adapter is part of the key because LoRA on k/v projections changes the cached values.
Freed blocks keep their contents until they are handed out again, so a preempted or
repeated prompt can still hit them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from scheduler.sequence import Sequence


@dataclass
class _Block:
    block_id: int
    # A block returns to the free list only when its last holder lets go.
    ref_count: int = 0
    # Set once the block is full and its KV computed: the key other sequences find it by.
    digest: bytes | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class _PrefixState:
    """Per-sequence hash chain, memoized: tokens only ever get appended."""

    digests: list[bytes] = field(default_factory=list)
    num_published: int = 0  # leading blocks already offered to the cache


class BlockManager:
    """Hands out fixed-size KV blocks, shares cached full blocks, takes them back."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Freed blocks go to the back and new ones come from the front, so the least
        # recently freed block (the least likely cache hit) is reused first. An ordered dict,
        # not a deque: a prefix hit takes its block out of the middle, and a deque's remove()
        # scans the whole pool (256 repeated prompts over ~10^5 blocks stalled a step for 15 s).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # digest -> block id
        self._prefix: dict[int, _PrefixState] = {}  # seq_id -> its hash chain
        self.num_cache_hits = 0  # blocks reused from the prefix cache, since start

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._blocks) - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def num_cached_tokens(self, seq: Sequence) -> int:
        """Leading tokens of `seq` whose KV is already cached (0 without prefix caching)."""
        return len(self._match_prefix(seq)) * self.block_size

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether the pool can hold every token of `seq` (prompt and outputs)."""
        return self._blocks_to_take(seq, self._match_prefix(seq)) <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its tokens; its block table must be empty.

        Sets `seq.num_computed_tokens` to the length of the cached prefix it reuses.
        """
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks {seq.block_table}")
        hits = self._match_prefix(seq)
        needed = self._blocks_to_take(seq, hits)
        if needed > len(self._free):
            raise RuntimeError(f"sequence {seq.seq_id} needs {needed} KV blocks, {len(self._free)} free")
        for block_id in hits:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        seq.block_table.extend(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        self.num_cache_hits += len(hits)
        self._grow(seq)

    def can_append(self, seq: Sequence) -> bool:
        """Whether `seq`'s newest token has a slot, taking a new block if it starts one.

        The newest token is the one the last step sampled: its KV is computed by the
        next decode step, so it needs a slot before that step runs.
        """
        return self._missing_blocks(seq) <= len(self._free)

    def append_slot(self, seq: Sequence) -> None:
        """Grow `seq`'s block table so its newest token has a slot."""
        self._grow(seq)

    def publish_computed(self, seq: Sequence) -> None:
        """Offer `seq`'s full blocks whose KV is now computed to later sequences.

        Only computed blocks are shared, so a hit never reads KV still being written.
        """
        if not self.enable_prefix_caching:
            return
        state = self._prefix.setdefault(seq.seq_id, _PrefixState())
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= state.num_published:
            return  # most decode steps: no block filled up
        digests = self._digests(seq, num_full)
        for i in range(state.num_published, num_full):
            block = self._blocks[seq.block_table[i]]
            # Skipped when an identical block is already cached: one copy is enough.
            if block.digest is None and digests[i] not in self._cached:
                block.digest = digests[i]
                block.token_ids = tuple(self._block_tokens(seq, i))
                self._cached[block.digest] = block.block_id
        state.num_published = num_full

    def free(self, seq: Sequence) -> None:
        """Return `seq`'s blocks to the pool and clear its block table. Idempotent."""
        # Last blocks first: they are the least likely to be shared by a later prompt.
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table.clear()
        self._prefix.pop(seq.seq_id, None)

    def _blocks_to_take(self, seq: Sequence, hits: list[int]) -> int:
        """Blocks `allocate` takes off the free list: all but the hits someone holds."""
        shared = sum(1 for b in hits if self._blocks[b].ref_count > 0)
        return self.blocks_for(seq.num_tokens) - shared

    def _missing_blocks(self, seq: Sequence) -> int:
        return max(0, self.blocks_for(seq.num_tokens) - len(seq.block_table))

    def _grow(self, seq: Sequence) -> None:
        missing = self._missing_blocks(seq)
        if missing > len(self._free):
            raise RuntimeError(
                f"sequence {seq.seq_id} needs {missing} more KV blocks, {len(self._free)} free"
            )
        for _ in range(missing):
            seq.block_table.append(self._take_free())

    def _take_free(self) -> int:
        block = self._blocks[self._free.popitem(last=False)[0]]
        if block.digest is not None:
            # Its contents are about to be overwritten: forget it was cached.
            if self._cached.get(block.digest) == block.block_id:
                del self._cached[block.digest]
            block.digest = None
            block.token_ids = ()
        block.ref_count = 1
        return block.block_id

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for the longest full-block prefix of `seq`.

        The last token is never covered: its forward pass yields the next token's logits.
        None for a sequence that must compute every token (`reuse_cached_prefix` False).
        """
        if not self.enable_prefix_caching or not seq.reuse_cached_prefix:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for i, digest in enumerate(self._digests(seq, max_blocks)):
            block_id = self._cached.get(digest)
            if block_id is None or self._blocks[block_id].token_ids != tuple(self._block_tokens(seq, i)):
                break
            hits.append(block_id)
        return hits

    def _digests(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hash chain of `seq`'s first `num_blocks` full blocks, seeded by its adapter."""
        digests = self._prefix.setdefault(seq.seq_id, _PrefixState()).digests
        while len(digests) < num_blocks:
            i = len(digests)
            prev = digests[-1] if digests else b"adapter:%d" % seq.adapter_id
            h = hashlib.blake2b(prev, digest_size=16)
            h.update(array("q", self._block_tokens(seq, i)).tobytes())
            digests.append(h.digest())
        return digests[:num_blocks]

    def _block_tokens(self, seq: Sequence, index: int) -> list[int]:
        # Sliced from the two lists: building `seq.token_ids` per block is quadratic.
        start, end = index * self.block_size, (index + 1) * self.block_size
        prompt, n = seq.prompt_token_ids, seq.num_prompt_tokens
        if end <= n:
            return prompt[start:end]
        return prompt[start:] + seq.output_token_ids[max(0, start - n) : end - n]
