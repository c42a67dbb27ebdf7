"""The engine-side adapter lifecycle on fake GPU slots: leases, gated host loads, slot residency,
pins and the scheduler cap, deletes with requests in flight, failed loads. Also the slot table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.loader import LoadPolicy
from adapters.registry import AdapterRegistry, AdapterState, PinLimitError
from adapters.sources import AdapterSource
from engine.adapter_manager import AdapterLease, AdapterManager
from engine.adapter_slots import AdapterSlotTable, NoFreeSlotError, SlotLoad
from engine.errors import AdapterFailedError, UnknownAdapterError
from tests.adapters.lora_dirs import break_adapter, fake_dims, write_lora_dir


class FakeLora:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.copies: list[tuple[int, str]] = []

    def load(self, slot: int, weights) -> None:
        self.copies.append((slot, weights.name))


class Harness:
    """A manager whose loads run only when the test says so (as a loader pool would, later)."""

    def __init__(self, tmp: Path, num_slots: int = 3, max_host: int = 4, names: str = "abcdef") -> None:
        for i, name in enumerate(names):
            write_lora_dir(tmp / name, fake_dims(), seed=i)
        break_adapter(tmp / "bad", "corrupt", fake_dims())
        self.lora = FakeLora(num_slots)
        self.registry = AdapterRegistry(max_host, root=tmp)
        self.running: set[int] = set()
        self.manager = AdapterManager(self.lora, self.registry, LoadPolicy(None, None, max_rank=8),  # type: ignore[arg-type]
                                      lambda: set(self.running))
        self.jobs: list[Callable[[], None]] = []
        self.posted: list[Callable[[], None]] = []
        self.manager.use_executor(self.jobs.append, self.posted.append)

    def run_loads(self) -> None:
        while self.jobs or self.posted:
            while self.jobs:
                self.jobs.pop(0)()
            while self.posted:
                self.posted.pop(0)()

    def lease(self, name: str) -> AdapterLease:
        lease = AdapterLease(name)
        self.manager.acquire(lease)
        return lease

    def id(self, name: str) -> int:
        return self.manager.lookup(name).adapter_id


def test_a_lease_waits_for_the_host_load_then_hands_over_its_reference(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("a")
    entry = h.manager.lookup("a")
    assert not lease.ready.done() and entry.state is AdapterState.LOADING and entry.refcount == 1
    h.run_loads()
    assert lease.ready.result() is None and entry.state is AdapterState.HOST
    adapter_id = h.manager.consume(lease)
    h.manager.release(lease)  # after consume: a no-op
    assert entry.refcount == 1
    h.manager.unref(adapter_id)
    assert entry.refcount == 0
    again = h.lease("a")
    assert again.ready.done(), "already in host memory: no second load"
    h.manager.release(again)
    h.manager.release(again)
    assert entry.refcount == 0 and entry.loads == 1


def test_host_loads_wait_for_room_and_never_evict_an_adapter_in_use(tmp_path: Path) -> None:
    h = Harness(tmp_path, num_slots=2, max_host=2)
    a, b = h.lease("a"), h.lease("b")
    h.run_loads()
    c = h.lease("c")
    assert not h.jobs and not c.ready.done(), "both host slots are held by requests"
    h.manager.release(a)  # a becomes idle: its host copy may go
    assert len(h.jobs) == 1
    h.run_loads()
    assert c.ready.done() and h.manager.lookup("a").weights is None
    assert h.manager.lookup("a").host_evictions == 1 and h.manager.lookup("b").weights is not None
    assert len(h.registry.host_tier()) == 2
    h.manager.release(b)
    h.manager.release(c)


def test_slots_are_never_taken_from_running_or_pinned_adapters(tmp_path: Path) -> None:
    h = Harness(tmp_path, num_slots=3, max_host=6)
    for name in "abcd":
        h.lease(name)
    h.run_loads()
    ids = {n: h.id(n) for n in "abcd"}
    h.manager.promote("a")
    assert h.manager.lookup("a").state is AdapterState.PINNED
    h.running = {ids["b"], ids["c"]}
    slots = h.manager.make_resident([ids["b"], 0, ids["c"]], h.running)
    assert slots[1] == -1 and len(set(slots)) == 3
    assert h.manager.scheduler_cap(h.running) == 2  # 3 slots, a pinned and not running
    with pytest.raises(NoFreeSlotError):
        h.manager.make_resident([ids["d"]], h.running | {ids["d"]})
    h.running = {ids["b"]}
    h.manager.make_resident([ids["d"]], h.running | {ids["d"]})
    assert h.manager.lookup("c").gpu_slot is None and h.manager.lookup("c").gpu_evictions == 1
    assert h.manager.lookup("a").gpu_evictions == 0 and h.manager.lookup("a").gpu_slot is not None


def test_promote_waits_for_a_slot_and_refuses_the_last_unpinned_one(tmp_path: Path) -> None:
    h = Harness(tmp_path, num_slots=3, max_host=6)
    for name in "abc":
        h.lease(name)
    h.run_loads()
    ids = {n: h.id(n) for n in "abcd"}
    h.running = {ids["a"], ids["b"], ids["c"]}
    h.manager.make_resident(list(h.running), h.running)
    done = h.manager.promote("d")  # not loaded, and every slot runs something
    assert not done.done()
    assert h.manager.scheduler_cap(h.running) == 2, "no new distinct adapter until d has its slot"
    h.run_loads()
    assert not done.done() and h.manager.lookup("d").state is AdapterState.HOST
    h.running.discard(ids["b"])
    h.manager.place_pinned(h.running)  # the next step boundary
    assert done.done() and h.manager.lookup("d").state is AdapterState.PINNED
    assert h.manager.lookup("b").gpu_slot is None
    h.manager.promote("a").result(timeout=0)
    with pytest.raises(PinLimitError, match="2 of the 3 GPU adapter slots are pinned"):
        h.manager.promote("c")
    h.manager.demote("a")  # running: unpinned, but keeps its slot until it stops running
    assert h.manager.lookup("a").state is AdapterState.GPU
    h.manager.demote("d")
    assert h.manager.lookup("d").state is AdapterState.HOST
    assert h.manager.scheduler_cap(h.running) == 3


def test_delete_lets_in_flight_requests_finish_and_forgets_the_name(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("a")
    h.run_loads()
    adapter_id = h.manager.consume(lease)
    h.manager.make_resident([adapter_id], {adapter_id})
    assert h.manager.delete("a") == 1
    with pytest.raises(UnknownAdapterError):
        h.lease("a")
    assert "a" not in h.manager.names() and not h.manager.has("a")
    assert h.registry.by_id(adapter_id).weights is not None, "still serving its in-flight request"
    h.manager.unref(adapter_id)
    assert h.registry.by_id(adapter_id) is None and h.manager.slots.slot_of(adapter_id) is None
    # A queued load of an adapter deleted before it started is answered, not left hanging.
    h2 = Harness(tmp_path / "second", num_slots=1, max_host=1)
    busy = h2.lease("a")
    h2.run_loads()
    done = h2.manager.register("late", AdapterSource("dir", str(tmp_path / "b")), load=True)
    assert done is not None and not done.done()
    h2.manager.delete("late")
    with pytest.raises(UnknownAdapterError):
        done.result(timeout=0)
    h2.manager.release(busy)


def test_a_failed_load_marks_the_adapter_failed_and_can_be_replaced(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("bad")
    h.run_loads()
    with pytest.raises(AdapterFailedError, match="corrupt or not a safetensors file"):
        lease.ready.result(timeout=0)
    h.manager.release(lease)
    entry = h.manager.lookup("bad")
    assert entry.state is AdapterState.FAILED and entry.refcount == 0
    with pytest.raises(AdapterFailedError, match="corrupt"):
        h.lease("bad")
    with pytest.raises(AdapterFailedError):
        h.manager.promote("bad")
    done = h.manager.register("bad", AdapterSource("dir", str(tmp_path / "a")), load=True)
    h.run_loads()
    assert done is not None and done.result(timeout=0) is None
    assert h.manager.lookup("bad").state is AdapterState.HOST


def test_slot_table_lru_with_protection() -> None:
    table = AdapterSlotTable(2)
    assert table.assign({1, 2}, set()) == [SlotLoad(0, 1), SlotLoad(1, 2)]
    assert table.assign({1}, set()) == []  # 1 is now the most recent
    assert table.assign({3}, set()) == [SlotLoad(1, 3, evicted=2)]
    table.pin(3)
    with pytest.raises(NoFreeSlotError):
        table.assign({4}, {1})
    assert table.place(4, {1}) is None
    assert table.place(4, set()) == SlotLoad(0, 4, evicted=1)
    assert table.pinned == {3} and table.remove(3) == 1 and table.pinned == frozenset()


def _flaky_loads(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[str]:
    """The next `failures` host loads raise a device error; returns the names loaded, in order."""
    import engine.adapter_manager as am

    real, calls = am.load_from_source, []

    def flaky(name, source, policy, path=None):
        calls.append(name)
        if len(calls) <= failures:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return real(name, source, policy, path)

    monkeypatch.setattr(am, "load_from_source", flaky)
    return calls


def test_a_transient_load_error_is_retried_and_never_marks_the_adapter_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _flaky_loads(monkeypatch, failures=1)
    h = Harness(tmp_path)
    lease = h.lease("a")
    h.run_loads()
    entry = h.manager.lookup("a")
    assert calls == ["a", "a"]
    assert lease.ready.result() is None and entry.state is AdapterState.HOST and entry.error is None


def test_a_load_that_keeps_failing_transiently_answers_503_and_stays_registered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.adapter_manager as am
    from engine.errors import AdapterUnavailableError

    calls = _flaky_loads(monkeypatch, failures=am.TRANSIENT_LOAD_RETRIES + 1)
    h = Harness(tmp_path)
    lease = h.lease("a")
    h.run_loads()
    error = lease.ready.exception()
    assert isinstance(error, AdapterUnavailableError) and not isinstance(error, AdapterFailedError)
    entry = h.manager.lookup("a")
    assert entry.error is None and entry.state is AdapterState.REGISTERED
    h.manager.release(lease)
    # The device recovered: the next request loads it.
    again = h.lease("a")
    h.run_loads()
    assert again.ready.result() is None and entry.state is AdapterState.HOST
    assert len(calls) == am.TRANSIENT_LOAD_RETRIES + 2


def test_invalid_files_still_mark_the_adapter_failed(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("bad")
    h.run_loads()
    assert isinstance(lease.ready.exception(), AdapterFailedError)
    assert h.manager.lookup("bad").state is AdapterState.FAILED


def test_a_failed_slot_copy_leaves_no_stale_slot(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("a")
    h.run_loads()
    adapter_id = h.manager.consume(lease)
    real_load = h.lora.load

    def broken(slot, weights):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    h.lora.load = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        h.manager.make_resident([adapter_id], set())
    assert h.manager.slots.slot_of(adapter_id) is None and h.manager.lookup("a").gpu_slot is None
    h.lora.load = real_load  # type: ignore[method-assign]
    (slot,) = h.manager.make_resident([adapter_id], set())
    assert h.lora.copies == [(slot, "a")], "copied again on the next step"


def test_each_adapter_reports_how_long_its_latest_loads_took_per_tier(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("a")
    h.run_loads()
    assert set(h.manager.info("a")["load_ms"]) == {"disk"}
    h.manager.make_resident([h.manager.consume(lease)], set())
    load_ms = h.manager.info("a")["load_ms"]
    assert set(load_ms) == {"disk", "host"} and all(ms >= 0 for ms in load_ms.values())
    assert h.manager.load_times.snapshot()["host"].count == 1
