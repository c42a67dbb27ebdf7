"""The registry's bookkeeping: ids, states, tiers, the host LRU, pin limits, deletes, counters."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from adapters.registry import AdapterExistsError, AdapterRegistry, AdapterState, PinLimitError
from adapters.sources import AdapterSource, AdapterSourceError
from tests.adapters.lora_dirs import fake_dims, write_lora_dir

SRC = AdapterSource("dir", "/nowhere")


def _weights(rank: int = 4) -> SimpleNamespace:
    spec = SimpleNamespace(target_modules=frozenset({"q_proj", "v_proj"}), base_model_name_or_path="org/base")
    return SimpleNamespace(max_rank=rank, spec=spec, size_bytes=1024)


def _loaded(registry: AdapterRegistry, name: str, rank: int = 4):
    entry = registry.register(name, SRC)
    registry.install(entry, _weights(rank), Path("/nowhere"), [])
    return entry


def test_ids_are_unique_and_never_reused() -> None:
    registry = AdapterRegistry(max_host=4)
    a, b = registry.register("a", SRC), registry.register("b", SRC)
    assert a.adapter_id != b.adapter_id and 0 not in (a.adapter_id, b.adapter_id)
    registry.unname(a)
    registry.drop(a)
    again = registry.register("a", SRC)
    assert again.adapter_id not in (a.adapter_id, b.adapter_id)
    with pytest.raises(AdapterExistsError, match="'b' is already registered"):
        registry.register("b", SRC)
    with pytest.raises(AdapterSourceError):
        registry.register("../b", SRC)


def test_states_and_tiers_follow_the_lifecycle() -> None:
    registry = AdapterRegistry(max_host=4)
    entry = registry.register("a", AdapterSource("hub", "org/a"))
    assert (entry.state, entry.tier) == (AdapterState.REGISTERED, "hub")
    entry.loading = True
    assert entry.state is AdapterState.LOADING
    registry.install(entry, _weights(8), Path("/cache/a"), ["a warning"])
    assert (entry.state, entry.tier, entry.rank, entry.loads) == (AdapterState.HOST, "host", 8, 1)
    entry.gpu_slot = 2
    assert (entry.state, entry.tier) == (AdapterState.GPU, "gpu")
    entry.pinned = True
    assert entry.state is AdapterState.PINNED
    registry.fail(entry, "broken")
    entry.gpu_slot = None
    assert (entry.state, entry.pinned, entry.weights) == (AdapterState.FAILED, False, None)
    info = entry.info()
    assert info["state"] == "failed" and info["error"] == "broken" and info["rank"] == 8
    assert info["targets"] == ["q_proj", "v_proj"] and info["warnings"] == ["a warning"]
    assert info["source"] == "hf://org/a"


def test_host_victim_is_the_least_recent_idle_unpinned_one_off_the_gpu_first() -> None:
    registry = AdapterRegistry(max_host=8)
    a, b, c, d, e = (_loaded(registry, n) for n in "abcde")
    for entry in (a, b, c, d, e):  # a is now the least recently used
        registry.touch(entry)
    a.refcount = 1  # in use
    b.pinned = True
    c.gpu_slot = 0  # idle on the GPU: only after those off it
    assert registry.host_victim() is d
    d.loading = True
    assert registry.host_victim() is e
    e.weights = None
    assert registry.host_victim() is c
    c.refcount = 1
    assert registry.host_victim() is None
    assert {x.name for x in registry.host_tier()} == {"a", "b", "c", "d"}


def test_pinning_always_leaves_one_slot_unpinned() -> None:
    registry = AdapterRegistry(max_host=8)
    a, b, c, d = (registry.register(n, SRC) for n in "abcd")
    for entry in (a, b, c):
        registry.check_can_pin(entry, num_slots=4)
        entry.pinned = True
    registry.check_can_pin(a, num_slots=4)  # already pinned: fine
    with pytest.raises(PinLimitError, match=r"cannot promote 'd': 3 of the 4 GPU adapter slots are pinned \(a, b, c\)"):
        registry.check_can_pin(d, num_slots=4)
    single = AdapterRegistry(max_host=2)
    with pytest.raises(PinLimitError, match="single GPU adapter slot"):
        single.check_can_pin(single.register("x", SRC), num_slots=1)


def test_root_discovery_and_deleted_names(tmp_path: Path) -> None:
    write_lora_dir(tmp_path / "found", fake_dims())
    registry = AdapterRegistry(max_host=4, root=tmp_path)
    assert registry.has("found") and "found" not in registry.names()
    entry = registry.discover("found")
    assert entry is not None and registry.names() == ["found"]
    assert registry.discover("found") is entry
    assert registry.discover("../found") is None and not registry.has("../found")
    registry.unname(entry)
    assert not registry.has("found") and registry.discover("found") is None, "deleted names are not rediscovered"
    assert registry.by_id(entry.adapter_id) is entry, "kept by id until its requests finish"
    assert registry.add_discovered({"found": entry.source}) == []
    registry.drop(entry)
    assert registry.by_id(entry.adapter_id) is None
    assert registry.register("found", entry.source).adapter_id != entry.adapter_id
    assert registry.has("found")


def test_counters_are_per_adapter_and_survive_deletes() -> None:
    registry = AdapterRegistry(max_host=4)
    a = _loaded(registry, "a")
    registry.count(a, "gpu_loads")
    registry.count(a, "gpu_evictions")
    registry.count(a, "host_evictions")
    a.refcount = 2
    totals = registry.totals()
    assert (a.gpu_loads, a.gpu_evictions, a.host_evictions) == (1, 1, 1)
    assert totals["adapter_loads"] == 1 and totals["adapter_refcount_total"] == 2
    registry.unname(a)
    registry.drop(a)
    after = registry.totals()
    assert after["adapter_gpu_loads"] == 1 and after["adapters_registered"] == 0


def test_servable_names_leave_out_failed_adapters() -> None:
    registry = AdapterRegistry(max_host=4)
    _loaded(registry, "ok")
    registry.register("lazy", SRC)  # not loaded yet: may still serve
    registry.fail(registry.register("broken", SRC), "corrupt safetensors")
    assert registry.names() == ["ok", "lazy", "broken"]
    assert registry.servable_names() == ["ok", "lazy"]


def test_root_directories_named_like_the_base_model_or_a_fine_tuned_adapter_are_not_discovered(
    tmp_path: Path,
) -> None:
    from adapters.sources import scan_root

    for name in ("llama-base", "ft-job-1", "ft-job-1:ckpt-5", "fine"):
        write_lora_dir(tmp_path / name, fake_dims())
    registry = AdapterRegistry(4, root=tmp_path)
    registry.reserve({"llama-base"})
    assert not registry.has("llama-base") and not registry.has("ft-job-1") and registry.has("fine")
    assert registry.discover("llama-base") is None, "the base model's name reaches the base, never an adapter"
    assert registry.discover("ft-job-1") is None, "only a fine-tuning job publishes ft- names"
    registry.add_discovered(scan_root(tmp_path))
    assert registry.names() == ["fine"]
