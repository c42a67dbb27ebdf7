"""Adapter identity: ids, acquire/release and their refcounts, the failed and deleted states,
discovery under the adapter root, and the admin view that joins identity with residency."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from adapters.errors import AdapterError
from adapters.registry import AdapterExistsError, AdapterRegistry, AdapterState
from adapters.sources import AdapterSource, AdapterSourceError, scan_root
from tests.adapters.lora_dirs import fake_dims, write_lora_dir

SRC = AdapterSource("dir", "/nowhere")


class Retired(list[int]):
    """Records the ids the registry retires."""

    def __call__(self, adapter_id: int) -> None:
        self.append(adapter_id)


def test_ids_are_unique_and_never_reused() -> None:
    registry = AdapterRegistry()
    a, b = registry.register("a", SRC), registry.register("b", SRC)
    assert a.adapter_id != b.adapter_id and 0 not in (a.adapter_id, b.adapter_id)
    registry.unname("a")
    again = registry.register("a", SRC)
    assert again.adapter_id not in (a.adapter_id, b.adapter_id)
    with pytest.raises(AdapterExistsError, match="'b' is already registered"):
        registry.register("b", SRC)
    with pytest.raises(AdapterSourceError):
        registry.register("../b", SRC)


def test_acquire_counts_each_request_until_it_is_released() -> None:
    registry = AdapterRegistry()
    entry = registry.register("a", SRC)
    first, second = registry.acquire("a"), registry.acquire("a")
    assert first == second == entry.ref and first.adapter_id == entry.adapter_id and first.source == SRC
    assert (entry.refcount, entry.requests) == (2, 2) and registry.refcounts() == {"a": 2}
    registry.release(first)
    registry.release(second)
    assert (entry.refcount, entry.requests) == (0, 2)
    assert registry.totals() == {"adapters_registered": 1, "adapter_refcount_total": 0}
    with pytest.raises(KeyError):
        registry.acquire("missing")


def test_a_failed_adapter_is_refused_until_a_new_registration_replaces_it() -> None:
    retired = Retired()
    registry = AdapterRegistry(on_retired=retired)
    broken = registry.register("a", SRC)
    registry.fail(broken.adapter_id, "corrupt safetensors")
    with pytest.raises(AdapterError, match="corrupt safetensors"):
        registry.acquire("a")
    assert broken.refcount == 0, "a refused acquire counts nothing"
    assert registry.names() == ["a"] and registry.servable_names() == []
    fixed = registry.register("a", AdapterSource("dir", "/elsewhere"))
    assert fixed.adapter_id != broken.adapter_id and retired == [broken.adapter_id]
    assert registry.acquire("a").adapter_id == fixed.adapter_id


def test_a_deleted_adapter_drains_its_requests_before_its_id_is_retired() -> None:
    retired = Retired()
    registry = AdapterRegistry(on_retired=retired)
    entry = registry.register("a", SRC)
    ref = registry.acquire("a")
    assert registry.unname("a") is entry and entry.deleting
    assert not registry.has("a") and registry.get("a") is None and registry.unname("a") is None
    with pytest.raises(KeyError):
        registry.acquire("a")
    assert retired == [] and registry.by_id(entry.adapter_id) is entry, "kept by id for its request"
    registry.release(ref)
    assert retired == [entry.adapter_id] and registry.by_id(entry.adapter_id) is None
    idle = registry.register("b", SRC)
    registry.unname("b")
    assert retired == [entry.adapter_id, idle.adapter_id], "no request: retired at once"


def test_acquire_and_release_from_many_threads_leave_no_count_behind() -> None:
    registry = AdapterRegistry()
    entry = registry.register("a", SRC)
    start = threading.Barrier(8)

    def requests() -> None:
        start.wait()
        for _ in range(2000):
            registry.release(registry.acquire("a"))

    threads = [threading.Thread(target=requests) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (entry.refcount, entry.requests) == (0, 16000)


def test_root_adapters_are_found_and_registered_on_first_use(tmp_path: Path) -> None:
    write_lora_dir(tmp_path / "found", fake_dims())
    registry = AdapterRegistry(root=tmp_path)
    assert not registry.has("found"), "has() reads memory only"
    assert registry.find("found") == AdapterSource("dir", str(tmp_path / "found"), root=str(tmp_path.resolve()))
    assert registry.names() == [], "find() registers nothing"
    entry = registry.discover("found")
    assert entry is not None and registry.names() == ["found"] and registry.discover("found") is entry
    assert registry.find("found") is None, "registered: nothing left to find"
    assert registry.discover("../found") is None and registry.find("../found") is None
    assert registry.discover("missing") is None
    registry.unname("found")
    assert registry.discover("found") is None, "deleted names are not rediscovered"
    assert registry.add_discovered({"found": entry.source}) == []
    assert registry.register("found", entry.source).adapter_id != entry.adapter_id


def test_root_directories_named_like_the_base_model_or_a_fine_tuned_adapter_are_not_discovered(
    tmp_path: Path,
) -> None:
    for name in ("llama-base", "ft-job-1", "ft-job-1:ckpt-5", "fine"):
        write_lora_dir(tmp_path / name, fake_dims())
    registry = AdapterRegistry(root=tmp_path)
    registry.reserve({"llama-base"})
    assert registry.find("llama-base") is None and registry.find("ft-job-1") is None
    assert registry.discover("llama-base") is None, "the base model's name reaches the base, never an adapter"
    assert registry.discover("ft-job-1") is None, "only a fine-tuning job publishes ft- names"
    registry.add_discovered(scan_root(tmp_path))
    assert registry.names() == ["fine"]


def test_without_a_root_nothing_is_discovered() -> None:
    registry = AdapterRegistry()
    assert registry.find("a") is None and registry.discover("a") is None


def _residency(**changes: object) -> dict[str, object]:
    residency: dict[str, object] = {
        "state": "gpu", "tier": "gpu", "pinned": True, "rank": 8, "targets": ["q_proj"], "size_bytes": 1024,
        "base_model": "org/base", "last_used": 1.5, "loads": 1, "gpu_loads": 2, "gpu_evictions": 0,
        "host_evictions": 0, "load_ms": {"disk": 3.0}, "warnings": ["w"],
    }
    return {**residency, **changes}


def test_info_joins_identity_with_the_cores_residency() -> None:
    registry = AdapterRegistry()
    entry = registry.register("a", AdapterSource("hub", "org/a"))
    registry.acquire("a")
    info = entry.info(_residency())
    assert (info["id"], info["adapter_id"], info["source"]) == ("a", entry.adapter_id, "hf://org/a")
    assert (info["state"], info["tier"], info["pinned"], info["rank"]) == ("gpu", "gpu", True, 8)
    assert (info["in_flight"], info["requests"], info["error"]) == (1, 1, None)
    registry.fail(entry.adapter_id, "broken")
    failed = entry.info(_residency(state="registered", tier="hub", pinned=False))
    assert (failed["state"], failed["error"], failed["tier"]) == (AdapterState.FAILED.value, "broken", "hub")
