"""The host tier: records by id, the host LRU victim (never held, pinned or loading; off the GPU
first), and the counters that survive a record's host copy and the record itself."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from adapters.registry import AdapterRef
from adapters.sources import AdapterSource
from engine.adapter_host import HostTier


def _ref(adapter_id: int) -> AdapterRef:
    return AdapterRef(f"a{adapter_id}", adapter_id, AdapterSource("dir", "/nowhere"))


def _weights(rank: int = 4) -> SimpleNamespace:
    spec = SimpleNamespace(target_modules=frozenset({"v_proj", "q_proj"}), base_model_name_or_path="org/base")
    return SimpleNamespace(max_rank=rank, spec=spec, size_bytes=1024)


def _installed(host: HostTier, adapter_id: int):
    record = host.ensure(_ref(adapter_id))
    host.install(record, _weights(), Path("/nowhere"), [], seconds=0.5)
    return record


def test_a_record_is_made_once_per_id_and_keeps_what_its_load_taught() -> None:
    host = HostTier(max_host=4)
    record = host.ensure(_ref(1))
    assert host.ensure(_ref(1)) is record and host.get(1) is record and host.get(2) is None
    host.install(record, _weights(rank=8), Path("/cache/a1"), ["a warning"], seconds=0.25)
    assert (record.rank, record.targets, record.size_bytes, record.loads) == (8, ["q_proj", "v_proj"], 1024, 1)
    assert record.load_seconds == {"disk": 0.25} and record.warnings == ["a warning"] and record.last_used
    record.weights = None  # evicted from host memory: what it taught stays
    assert record.rank == 8 and host.members() == []
    assert host.drop(1) is record and host.get(1) is None


def test_the_victim_is_the_least_recent_idle_unpinned_one_off_the_gpu_first() -> None:
    host = HostTier(max_host=8)
    a, b, c, d, e = (_installed(host, i) for i in range(1, 6))
    for record in (a, b, c, d, e):  # a is now the least recently used
        host.touch(record)
    a.holds = 1  # a request keeps it
    on_gpu = {c.adapter_id}
    pinned = frozenset({b.adapter_id})
    assert host.victim(pinned, on_gpu.__contains__) is d
    d.loading = True
    assert host.victim(pinned, on_gpu.__contains__) is e
    e.weights = None
    assert host.victim(pinned, on_gpu.__contains__) is c, "idle on the GPU: only after those off it"
    c.holds = 1
    assert host.victim(pinned, on_gpu.__contains__) is None
    assert {r.name for r in host.members()} == {"a1", "a2", "a3", "a4"}


def test_counters_are_per_adapter_and_survive_its_record() -> None:
    host = HostTier(max_host=4)
    a = _installed(host, 1)
    host.count(a, "gpu_loads")
    host.count(a, "gpu_evictions")
    host.count(a, "host_evictions")
    host.fail(host.ensure(_ref(2)))
    assert (a.gpu_loads, a.gpu_evictions, a.host_evictions) == (1, 1, 1)
    host.drop(1)
    totals = host.totals()
    assert totals["adapter_loads"] == 1 and totals["adapter_gpu_loads"] == 1 and totals["adapter_load_failures"] == 1
    assert totals["adapter_load_seconds"] == 0.5 and totals["adapters_host"] == 0


def test_residency_follows_the_record_and_the_slot_it_is_given() -> None:
    host = HostTier(max_host=4)
    hub = AdapterRef("h", 7, AdapterSource("hub", "org/h"))
    assert host.residency(hub, None, False)["state"] == "registered", "a record is not needed"
    assert host.residency(hub, None, False)["tier"] == "hub"
    record = host.ensure(hub)
    record.loading = True
    assert (host.residency(hub, None, False)["state"], host.get(7)) == ("loading", record)
    host.install(record, _weights(), Path("/cache/h"), [], seconds=0.002)
    assert [host.residency(hub, slot, pinned)["state"] for slot, pinned in ((None, False), (0, False), (0, True))] \
        == ["host", "gpu", "pinned"]
    record.weights = None
    residency = host.residency(hub, None, True)
    assert (residency["state"], residency["tier"], residency["pinned"]) == ("registered", "disk", True)
    assert residency["rank"] == 4 and residency["load_ms"] == {"disk": 2.0}
