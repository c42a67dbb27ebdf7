"""Which adapter sits in which GPU LoRA slot, and which to evict (LRU, never one in use).

Plain Python: the engine copies weights into the slot buffers at step boundaries.
"""

from __future__ import annotations

from collections import OrderedDict


class NoFreeSlotError(RuntimeError):
    """Every slot holds an adapter that the running batch uses: the scheduler cap was broken."""


class AdapterSlotTable:
    """Maps adapter ids to slot indexes with LRU replacement.

    `assign(needed, in_use)` returns the (slot, adapter_id) pairs that must be (re)loaded so
    that every id in `needed` has a slot; it evicts least recently used adapters that are
    neither in `in_use` nor pinned.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # adapter_id -> slot, LRU order
        self._pinned: set[int] = set()

    def slot_of(self, adapter_id: int) -> int | None:
        return self._slot_of.get(adapter_id)

    @property
    def resident(self) -> dict[int, int]:
        return dict(self._slot_of)

    def pin(self, adapter_id: int) -> None:
        self._pinned.add(adapter_id)

    def unpin(self, adapter_id: int) -> None:
        self._pinned.discard(adapter_id)

    def remove(self, adapter_id: int) -> int | None:
        """Forget an adapter (unloaded); returns the slot it held, if any."""
        self._pinned.discard(adapter_id)
        return self._slot_of.pop(adapter_id, None)

    def assign(self, needed: set[int], in_use: set[int]) -> list[tuple[int, int]]:
        loads: list[tuple[int, int]] = []
        for adapter_id in sorted(needed):
            if adapter_id in self._slot_of:
                self._slot_of.move_to_end(adapter_id)
                continue
            slot = self._free_slot()
            if slot is None:
                slot = self._evict(protected=needed | in_use | self._pinned)
            self._slot_of[adapter_id] = slot
            loads.append((slot, adapter_id))
        return loads

    def _free_slot(self) -> int | None:
        used = set(self._slot_of.values())
        for slot in range(self.num_slots):
            if slot not in used:
                return slot
        return None

    def _evict(self, protected: set[int]) -> int:
        for adapter_id in self._slot_of:  # oldest first
            if adapter_id not in protected:
                return self._slot_of.pop(adapter_id)
        raise NoFreeSlotError(
            f"all {self.num_slots} LoRA slots hold adapters in use or pinned; "
            "the batch needs more distinct adapters than there are slots"
        )
