"""The engine core's adapter residency on fake GPU slots, wired to a registry as the engine wires
it: holds and gated host loads, slot residency, pins and the scheduler cap, deletes with requests
in flight, failed and transient loads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.loader import LoadPolicy
from adapters.registry import AdapterRegistry, AdapterState, PinLimitError
from adapters.sources import AdapterSource
from engine.adapter_manager import AdapterLease, AdapterManager
from engine.adapter_slots import NoFreeSlotError
from engine.errors import AdapterFailedError, UnknownAdapterError
from tests.adapters.lora_dirs import break_adapter, fake_dims, write_lora_dir


class FakeLora:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.copies: list[tuple[int, str]] = []

    def load(self, slot: int, weights) -> None:
        self.copies.append((slot, weights.name))


class Harness:
    """A registry and a manager whose loads run only when the test says so (as a loader pool would)."""

    def __init__(self, tmp: Path, num_slots: int = 3, max_host: int = 4, names: str = "abcdef") -> None:
        for i, name in enumerate(names):
            write_lora_dir(tmp / name, fake_dims(), seed=i)
        break_adapter(tmp / "bad", "corrupt", fake_dims())
        self.lora = FakeLora(num_slots)
        self.registry = AdapterRegistry(root=tmp)
        self.running: set[int] = set()
        self.manager = AdapterManager(self.lora, max_host, LoadPolicy(None, None, max_rank=8),  # type: ignore[arg-type]
                                      lambda: set(self.running), on_failed=self.registry.fail)
        self.registry.on_retired = self.manager.forget
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
        """What a request does: a reference on the name, then a hold on its residency."""
        self.registry.discover(name)
        lease = AdapterLease(self.registry.acquire(name))
        self.manager.hold(lease)
        return lease

    def end(self, lease: AdapterLease, consumed: bool = False) -> None:
        """The request ended: its hold (taken over by the request once consumed) and its reference."""
        if consumed:
            self.manager.unhold(lease.ref.adapter_id)
        else:
            self.manager.release(lease)
        self.registry.release(lease.ref)

    def ref(self, name: str):
        entry = self.registry.discover(name)
        assert entry is not None
        return entry.ref

    def id(self, name: str) -> int:
        return self.ref(name).adapter_id

    def state(self, name: str) -> str:
        entry = self.registry.discover(name)
        assert entry is not None
        return entry.info(self.manager.residency(entry.ref))["state"]

    def record(self, name: str):
        return self.manager.host.get(self.id(name))


def test_a_lease_waits_for_the_host_load_then_hands_over_its_hold(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("a")
    record = h.record("a")
    assert not lease.ready.done() and h.state("a") == "loading" and record.holds == 1
    h.run_loads()
    assert lease.ready.result() is None and h.state("a") == "host"
    adapter_id = h.manager.consume(lease)
    h.manager.release(lease)  # after consume: a no-op
    assert record.holds == 1
    h.end(lease, consumed=True)
    assert record.holds == 0 and h.registry.refcounts() == {"a": 0}
    again = h.lease("a")
    assert again.ready.done(), "already in host memory: no second load"
    h.manager.release(again)
    h.manager.release(again)
    assert record.holds == 0 and record.loads == 1 and adapter_id == again.ref.adapter_id


def test_host_loads_wait_for_room_and_never_evict_an_adapter_in_use(tmp_path: Path) -> None:
    h = Harness(tmp_path, num_slots=2, max_host=2)
    a, b = h.lease("a"), h.lease("b")
    h.run_loads()
    c = h.lease("c")
    assert not h.jobs and not c.ready.done(), "both host slots are held by requests"
    h.end(a)  # a becomes idle: its host copy may go
    assert len(h.jobs) == 1
    h.run_loads()
    assert c.ready.done() and h.record("a").weights is None
    assert h.record("a").host_evictions == 1 and h.record("b").weights is not None
    assert len(h.manager.host.members()) == 2
    h.end(b)
    h.end(c)


def test_slots_are_never_taken_from_running_or_pinned_adapters(tmp_path: Path) -> None:
    h = Harness(tmp_path, num_slots=3, max_host=6)
    for name in "abcd":
        h.lease(name)
    h.run_loads()
    ids = {n: h.id(n) for n in "abcd"}
    h.manager.promote(h.ref("a"))
    assert h.state("a") == "pinned"
    h.running = {ids["b"], ids["c"]}
    slots = h.manager.make_resident([ids["b"], 0, ids["c"]], h.running)
    assert slots[1] == -1 and len(set(slots)) == 3
    assert h.manager.scheduler_cap(h.running) == 2  # 3 slots, a pinned and not running
    with pytest.raises(NoFreeSlotError):
        h.manager.make_resident([ids["d"]], h.running | {ids["d"]})
    h.running = {ids["b"]}
    h.manager.make_resident([ids["d"]], h.running | {ids["d"]})
    assert h.state("c") == "host" and h.record("c").gpu_evictions == 1
    assert h.record("a").gpu_evictions == 0 and h.state("a") == "pinned"


def test_an_adapters_slot_and_pin_are_read_from_the_slot_table_alone(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("a")
    h.run_loads()
    (slot,) = h.manager.make_resident([h.manager.consume(lease)], set())
    assert h.state("a") == "gpu" and h.manager.slots.slot_of(h.id("a")) == slot
    h.manager.slots.pin(h.id("a"))
    assert h.state("a") == "pinned" and h.manager.residency(h.ref("a"))["pinned"]
    h.manager.slots.remove(h.id("a"))
    residency = h.manager.residency(h.ref("a"))
    assert (residency["state"], residency["tier"], residency["pinned"]) == ("host", "host", False)
    assert h.manager.totals()["adapters_gpu"] == 0 and h.manager.totals()["adapters_pinned"] == 0


def test_promote_waits_for_a_slot_and_refuses_the_last_unpinned_one(tmp_path: Path) -> None:
    h = Harness(tmp_path, num_slots=3, max_host=6)
    for name in "abc":
        h.lease(name)
    h.run_loads()
    ids = {n: h.id(n) for n in "abcd"}
    h.running = {ids["a"], ids["b"], ids["c"]}
    h.manager.make_resident(list(h.running), h.running)
    done = h.manager.promote(h.ref("d"))  # not loaded, and every slot runs something
    assert not done.done()
    assert h.manager.scheduler_cap(h.running) == 2, "no new distinct adapter until d has its slot"
    h.run_loads()
    assert not done.done() and h.state("d") == "host"
    h.running.discard(ids["b"])
    h.manager.place_pinned(h.running)  # the next step boundary
    assert done.done() and h.state("d") == "pinned"
    assert h.manager.slots.slot_of(ids["b"]) is None
    h.manager.promote(h.ref("a")).result(timeout=0)
    with pytest.raises(PinLimitError, match=r"2 of the 3 GPU adapter slots are pinned \(a, d\)"):
        h.manager.promote(h.ref("c"))
    h.manager.demote(ids["a"])  # running: unpinned, but keeps its slot until it stops running
    assert h.state("a") == "gpu"
    h.manager.demote(ids["d"])
    assert h.state("d") == "host"
    assert h.manager.scheduler_cap(h.running) == 3


def test_one_slot_cannot_be_pinned(tmp_path: Path) -> None:
    h = Harness(tmp_path, num_slots=1, max_host=2)
    with pytest.raises(PinLimitError, match="single GPU adapter slot"):
        h.manager.promote(h.ref("a"))


def test_delete_lets_in_flight_requests_finish_and_forgets_the_adapter(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("a")
    h.run_loads()
    adapter_id = h.manager.consume(lease)
    h.manager.make_resident([adapter_id], {adapter_id})
    entry = h.registry.unname("a")
    assert entry is not None and entry.refcount == 1
    with pytest.raises(KeyError):
        h.registry.acquire("a")
    assert h.manager.host.get(adapter_id).weights is not None, "still serving its in-flight request"
    h.end(lease, consumed=True)
    assert h.manager.host.get(adapter_id) is None and h.manager.slots.slot_of(adapter_id) is None
    # A queued load of an adapter deleted before it started is answered, not left hanging.
    h2 = Harness(tmp_path / "second", num_slots=1, max_host=1)
    busy = h2.lease("a")
    h2.run_loads()
    late = h2.registry.register("late", AdapterSource("dir", str(tmp_path / "b")))
    done = h2.manager.load(late.ref)
    assert not done.done()
    h2.registry.unname("late")
    with pytest.raises(UnknownAdapterError):
        done.result(timeout=0)
    h2.end(busy)


def test_a_deleted_pinned_adapter_is_unpinned_and_its_waiting_promote_answered(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    promoted = h.manager.promote(h.ref("a"))
    h.registry.unname("a")
    with pytest.raises(UnknownAdapterError):
        promoted.result(timeout=0)
    h.run_loads()  # the load started before the delete finds nothing to install into
    assert h.manager.slots.pinned == frozenset() and h.manager.host.members() == []


def test_a_failed_load_marks_the_adapter_failed_and_can_be_replaced(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("bad")
    h.run_loads()
    with pytest.raises(AdapterFailedError, match="corrupt or not a safetensors file"):
        lease.ready.result(timeout=0)
    h.end(lease)
    entry = h.registry.get("bad")
    assert entry is not None and h.state("bad") == "failed" and entry.refcount == 0
    assert "corrupt" in (entry.error or "") and h.manager.totals()["adapter_load_failures"] == 1
    with pytest.raises(Exception, match="corrupt"):
        h.registry.acquire("bad")
    replaced = h.registry.register("bad", AdapterSource("dir", str(tmp_path / "a")))
    assert h.manager.host.get(entry.adapter_id) is None, "the failed adapter's record went with it"
    done = h.manager.load(replaced.ref)
    h.run_loads()
    assert done.result(timeout=0) is None and h.state("bad") == "host"


def test_a_failed_load_answers_a_waiting_promote_and_leaves_nothing_pinned(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    promoted = h.manager.promote(h.ref("bad"))
    h.run_loads()
    with pytest.raises(AdapterFailedError):
        promoted.result(timeout=0)
    assert h.manager.slots.pinned == frozenset() and h.state("bad") == "failed"


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
    assert calls == ["a", "a"]
    assert lease.ready.result() is None and h.state("a") == AdapterState.HOST.value
    assert h.registry.servable_names() == ["a"]


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
    assert h.state("a") == AdapterState.REGISTERED.value and h.registry.servable_names() == ["a"]
    h.end(lease)
    # The device recovered: the next request loads it.
    again = h.lease("a")
    h.run_loads()
    assert again.ready.result() is None and h.state("a") == AdapterState.HOST.value
    assert len(calls) == am.TRANSIENT_LOAD_RETRIES + 2


def test_invalid_files_still_mark_the_adapter_failed(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("bad")
    h.run_loads()
    assert isinstance(lease.ready.exception(), AdapterFailedError)
    assert h.state("bad") == AdapterState.FAILED.value


def test_a_failed_slot_copy_leaves_no_stale_slot_and_keeps_the_pin(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("a")
    h.run_loads()
    adapter_id = h.manager.consume(lease)
    h.manager.slots.pin(adapter_id)
    real_load = h.lora.load

    def broken(slot, weights):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    h.lora.load = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        h.manager.make_resident([adapter_id], set())
    assert h.manager.slots.slot_of(adapter_id) is None and h.state("a") == "host"
    assert h.manager.slots.is_pinned(adapter_id)
    h.lora.load = real_load  # type: ignore[method-assign]
    (slot,) = h.manager.make_resident([adapter_id], set())
    assert h.lora.copies == [(slot, "a")], "copied again on the next step"


def test_each_adapter_reports_how_long_its_latest_loads_took_per_tier(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    lease = h.lease("a")
    h.run_loads()
    assert set(h.manager.residency(lease.ref)["load_ms"]) == {"disk"}
    h.manager.make_resident([h.manager.consume(lease)], set())
    load_ms = h.manager.residency(lease.ref)["load_ms"]
    assert set(load_ms) == {"disk", "host"} and all(ms >= 0 for ms in load_ms.values())
    assert h.manager.load_times.snapshot()["host"].count == 1
