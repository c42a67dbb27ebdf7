"""The host tier: the adapters the engine core knows by id, their host copies and the host LRU.

Plain bookkeeping on the engine thread; the adapter manager moves the weights. A record is made
the first time the core is asked for an adapter and kept (with what its loads taught and its
counters) until the adapter is retired. Which GPU slot an adapter holds, and whether it is pinned,
is the slot table's (engine/adapter_slots.py) and nowhere else.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.registry import AdapterRef, AdapterState
from adapters.sources import AdapterSource

_tick = itertools.count(1)
_COUNTERS = ("loads", "load_failures", "gpu_loads", "gpu_evictions", "host_evictions")


@dataclass(eq=False)
class HostRecord:
    adapter_id: int
    name: str  # for messages and logs
    source: AdapterSource
    path: Path | None = None  # local directory, once fetched
    weights: Any = None  # adapters.weights.LoraWeights while in host memory
    loading: bool = False
    holds: int = 0  # requests the core keeps it for: waiting for its load, queued or running
    retired: bool = False  # deleted: dropped once `holds` reaches 0
    # What the first successful load taught us; kept after the weights leave host memory.
    rank: int | None = None
    targets: list[str] = field(default_factory=list)
    size_bytes: int | None = None
    base_model: str | None = None
    warnings: list[str] = field(default_factory=list)
    loads: int = 0
    gpu_loads: int = 0
    gpu_evictions: int = 0
    host_evictions: int = 0
    last_used: float | None = None
    # Seconds its latest load took, by the tier it came from: disk (into host memory) and host
    # (into a GPU slot: the time to issue the copies).
    load_seconds: dict[str, float] = field(default_factory=dict)
    lru: int = 0  # larger = used more recently


class HostTier:
    """Records by adapter id; `max_host` bounds those holding (or about to hold) host memory."""

    def __init__(self, max_host: int) -> None:
        if max_host < 1:
            raise ValueError(f"max_host must be positive, got {max_host}")
        self.max_host = max_host
        self._records: dict[int, HostRecord] = {}
        self._counts: Counter[str] = Counter()  # monotonic, survives retirements
        self.load_seconds = 0.0  # total host-load time, for the load-latency summary

    def get(self, adapter_id: int) -> HostRecord | None:
        return self._records.get(adapter_id)

    def ensure(self, ref: AdapterRef) -> HostRecord:
        record = self._records.get(ref.adapter_id)
        if record is None:
            record = self._records[ref.adapter_id] = HostRecord(ref.adapter_id, ref.name, ref.source)
        return record

    def drop(self, adapter_id: int) -> HostRecord | None:
        record = self._records.pop(adapter_id, None)
        if record is not None:
            record.weights = None
        return record

    def members(self) -> list[HostRecord]:
        """Records holding (or about to hold) host memory; what `max_host` bounds."""
        return [r for r in self._records.values() if r.weights is not None or r.loading]

    def touch(self, record: HostRecord) -> None:
        record.lru = next(_tick)
        record.last_used = time.time()

    def install(self, record: HostRecord, weights: Any, path: Path, warnings: list[str], seconds: float) -> None:
        """Record a finished host load that took `seconds` (disk/hub read and validation)."""
        record.loading = False
        record.weights = weights
        record.path = path
        self.count(record, "loads")
        self.load_seconds += seconds
        record.load_seconds["disk"] = seconds
        record.rank = int(weights.max_rank)
        record.targets = sorted(weights.spec.target_modules)
        record.size_bytes = int(weights.size_bytes)
        record.base_model = weights.spec.base_model_name_or_path
        record.warnings = list(warnings)
        self.touch(record)

    def fail(self, record: HostRecord) -> None:
        """A load found the adapter invalid."""
        record.loading = False
        record.weights = None
        self._counts["load_failures"] += 1

    def count(self, record: HostRecord, counter: str) -> None:
        """Add one to `record`'s counter (loads, gpu_loads, gpu_evictions, host_evictions) and the total."""
        setattr(record, counter, getattr(record, counter) + 1)
        self._counts[counter] += 1

    def victim(self, keep: frozenset[int], on_gpu: Callable[[int], bool]) -> HostRecord | None:
        """Least recently used record whose host copy may go: not held, not in `keep` (pinned), not
        loading. Those off the GPU go first: dropping a GPU-resident one costs its slot too."""
        idle = [r for r in self._records.values()
                if r.weights is not None and r.holds == 0 and not r.loading and r.adapter_id not in keep]
        if not idle:
            return None
        return min(idle, key=lambda r: (on_gpu(r.adapter_id), r.lru))

    def residency(self, ref: AdapterRef, slot: int | None, pinned: bool) -> dict[str, Any]:
        """The adapter's state, tier and what its loads taught, given its `slot` and pin (the slot table's)."""
        r = self._records.get(ref.adapter_id) or HostRecord(ref.adapter_id, ref.name, ref.source)
        if slot is not None:
            state = AdapterState.PINNED if pinned else AdapterState.GPU
        elif r.loading:
            state = AdapterState.LOADING
        else:
            state = AdapterState.HOST if r.weights is not None else AdapterState.REGISTERED
        tier = "gpu" if slot is not None else "host" if r.weights is not None else (
            "hub" if ref.source.kind == "hub" and r.path is None else "disk")
        return {
            "state": state.value, "tier": tier, "pinned": pinned, "rank": r.rank, "targets": list(r.targets),
            "size_bytes": r.size_bytes, "base_model": r.base_model, "last_used": r.last_used, "loads": r.loads,
            "gpu_loads": r.gpu_loads, "gpu_evictions": r.gpu_evictions, "host_evictions": r.host_evictions,
            "load_ms": {tier: round(seconds * 1e3, 3) for tier, seconds in r.load_seconds.items()},
            "warnings": list(r.warnings),
        }

    def totals(self) -> dict[str, float]:
        return {
            "adapter_load_seconds": self.load_seconds,
            "adapters_host": sum(r.weights is not None for r in self._records.values()),
            **{f"adapter_{name}": self._counts[name] for name in _COUNTERS},
        }
