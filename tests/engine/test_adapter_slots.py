"""The slot table, the one owner of an adapter's GPU slot and pin: LRU replacement that never
evicts what the batch needs, what runs or what is pinned; pins that outlive a vacated slot."""

from __future__ import annotations

import pytest

from adapters.registry import PinLimitError
from engine.adapter_slots import AdapterSlotTable, NoFreeSlotError, SlotLoad


def test_slots_are_replaced_least_recently_used_first() -> None:
    table = AdapterSlotTable(2)
    assert table.assign({1, 2}, set()) == [SlotLoad(0, 1), SlotLoad(1, 2)]
    assert table.assign({1}, set()) == []  # 1 is now the most recent
    assert table.assign({3}, set()) == [SlotLoad(1, 3, evicted=2)]
    assert table.resident == {1: 0, 3: 1} and table.slot_of(2) is None


def test_adapters_in_use_or_pinned_are_never_evicted() -> None:
    table = AdapterSlotTable(2)
    table.assign({1, 3}, set())
    table.pin(3)
    with pytest.raises(NoFreeSlotError):
        table.assign({4}, {1})
    assert table.place(4, {1}) is None
    assert table.place(4, set()) == SlotLoad(0, 4, evicted=1)
    assert table.place(4, set()) is None, "already placed"


def test_a_pin_waits_for_its_slot_and_survives_a_vacated_one() -> None:
    table = AdapterSlotTable(2)
    table.pin(5)
    assert table.is_pinned(5) and table.slot_of(5) is None and table.pinned == {5}
    assert table.place(5, set()) == SlotLoad(0, 5)
    assert table.vacate(5) == 0 and table.slot_of(5) is None and table.is_pinned(5)
    table.place(5, set())
    assert table.remove(5) == 0 and not table.is_pinned(5) and table.pinned == frozenset()
    table.pin(6)
    table.unpin(6)
    assert table.pinned == frozenset() and table.remove(6) is None


def test_pinning_always_leaves_one_slot_unpinned() -> None:
    table = AdapterSlotTable(4)
    names = {1: "a", 2: "b", 3: "c", 4: "d"}
    for adapter_id in (1, 2, 3):
        table.check_can_pin(adapter_id, names[adapter_id], names.__getitem__)
        table.pin(adapter_id)
    table.check_can_pin(1, "a", names.__getitem__)  # already pinned: fine
    with pytest.raises(PinLimitError, match=r"cannot promote 'd': 3 of the 4 GPU adapter slots are pinned \(a, b, c\)"):
        table.check_can_pin(4, "d", names.__getitem__)
    with pytest.raises(PinLimitError, match="single GPU adapter slot"):
        AdapterSlotTable(1).check_can_pin(1, "a", names.__getitem__)
