"""Which adapter sits in which GPU LoRA slot, which are pinned, and which to evict (LRU, never one
in use or pinned).

The one owner of an adapter's slot and pin: everything else asks here. Plain Python: the engine
copies weights into the slot buffers at step boundaries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapters.registry import PinLimitError


class NoFreeSlotError(RuntimeError):
    """Every slot holds an adapter that the running batch uses: the scheduler cap was broken."""


@dataclass(frozen=True)
class SlotLoad:
    """Copy adapter `adapter_id` into `slot`; `evicted` is the adapter that held it, if any."""

    slot: int
    adapter_id: int
    evicted: int | None = None


class AdapterSlotTable:
    """Maps adapter ids to slot indexes with LRU replacement.

    `assign(needed, in_use)` returns the loads that give every id in `needed` a slot; it evicts
    least recently used adapters that are neither needed, in `in_use`, nor pinned.
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

    @property
    def pinned(self) -> frozenset[int]:
        return frozenset(self._pinned)

    def is_pinned(self, adapter_id: int) -> bool:
        return adapter_id in self._pinned

    def check_can_pin(self, adapter_id: int, name: str, name_of: Callable[[int], str]) -> None:
        """PinLimitError unless one slot stays unpinned after pinning `adapter_id` (named `name`):
        else adapters that are not pinned could never run. `name_of` names the pinned ones."""
        others = self._pinned - {adapter_id}
        if adapter_id in self._pinned or len(others) + 1 <= self.num_slots - 1:
            return
        if self.num_slots == 1:
            raise PinLimitError(
                f"cannot promote {name!r}: the server has a single GPU adapter slot, which must stay "
                "free for unpinned adapters; restart with more GPU adapter slots to pin adapters"
            )
        pinned = ", ".join(sorted(map(name_of, others)))
        raise PinLimitError(
            f"cannot promote {name!r}: {len(others)} of the {self.num_slots} GPU adapter slots are pinned "
            f"({pinned}) and one must stay free for unpinned adapters; demote one first"
        )

    def pin(self, adapter_id: int) -> None:
        """Pinned: never evicted, and given a slot by `place` (a pin may wait for its slot)."""
        self._pinned.add(adapter_id)

    def unpin(self, adapter_id: int) -> None:
        self._pinned.discard(adapter_id)

    def vacate(self, adapter_id: int) -> int | None:
        """Free the adapter's slot (its weights left it), keeping any pin; returns the slot."""
        return self._slot_of.pop(adapter_id, None)

    def remove(self, adapter_id: int) -> int | None:
        """Forget an adapter (deleted): its pin and its slot; returns the slot it held, if any."""
        self._pinned.discard(adapter_id)
        return self._slot_of.pop(adapter_id, None)

    def assign(self, needed: set[int], in_use: set[int]) -> list[SlotLoad]:
        loads: list[SlotLoad] = []
        for adapter_id in sorted(needed):
            if adapter_id in self._slot_of:
                self._slot_of.move_to_end(adapter_id)
                continue
            load = self._take_slot(adapter_id, protected=needed | in_use | self._pinned)
            if load is None:
                raise NoFreeSlotError(
                    f"all {self.num_slots} LoRA slots hold adapters in use or pinned; "
                    "the batch needs more distinct adapters than there are slots"
                )
            loads.append(load)
        return loads

    def place(self, adapter_id: int, in_use: set[int]) -> SlotLoad | None:
        """A slot for `adapter_id` (pinning) if one is free or evictable now, else None."""
        if adapter_id in self._slot_of:
            return None
        return self._take_slot(adapter_id, protected=in_use | self._pinned)

    def _take_slot(self, adapter_id: int, protected: set[int]) -> SlotLoad | None:
        used = set(self._slot_of.values())
        free = next((slot for slot in range(self.num_slots) if slot not in used), None)
        if free is not None:
            self._slot_of[adapter_id] = free
            return SlotLoad(free, adapter_id)
        victim = next((a for a in self._slot_of if a not in protected), None)  # oldest first
        if victim is None:
            return None
        slot = self._slot_of.pop(victim)
        self._slot_of[adapter_id] = slot
        return SlotLoad(slot, adapter_id, evicted=victim)
