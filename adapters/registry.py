"""The adapter registry: every adapter's id, state, tier, counters, and the host-tier LRU.

Plain bookkeeping, no I/O and no device: the engine's adapter manager moves weights and calls
in here from the engine thread. Ids are never reused, so a deleted and re-registered name can
never meet the old adapter's slot or cached KV blocks.

States: registered (known, on disk/hub) → loading → host (weights in host memory) → gpu (also
in a GPU slot) / pinned (promoted: in a slot for good); failed (with the reason) from any load.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from adapters.sources import AdapterSource, find_in_root, validate_name


class AdapterState(str, Enum):
    REGISTERED = "registered"
    LOADING = "loading"
    HOST = "host"
    GPU = "gpu"
    PINNED = "pinned"
    FAILED = "failed"


class AdapterExistsError(ValueError):
    """A live adapter already has that name (HTTP 409)."""


class PinLimitError(RuntimeError):
    """Pinning would leave no GPU slot for unpinned adapters (HTTP 409)."""


_tick = itertools.count(1)
_COUNTERS = ("loads", "load_failures", "gpu_loads", "gpu_evictions", "host_evictions")


@dataclass(eq=False)
class AdapterEntry:
    name: str
    adapter_id: int
    source: AdapterSource
    path: Path | None = None  # local directory, once fetched
    weights: Any = None  # adapters.weights.LoraWeights while in host memory
    loading: bool = False
    gpu_slot: int | None = None
    pinned: bool = False
    error: str | None = None
    deleting: bool = False
    refcount: int = 0  # requests holding it: waiting for a load, queued or running
    # What the first successful load taught us; kept after the weights leave host memory.
    rank: int | None = None
    targets: list[str] = field(default_factory=list)
    size_bytes: int | None = None
    base_model: str | None = None
    warnings: list[str] = field(default_factory=list)
    requests: int = 0
    loads: int = 0
    gpu_loads: int = 0
    gpu_evictions: int = 0
    host_evictions: int = 0
    last_used: float | None = None
    # Seconds its latest load took, by the tier it came from: disk (into host memory) and host
    # (into a GPU slot: the time to issue the copies).
    load_seconds: dict[str, float] = field(default_factory=dict)
    lru: int = 0  # larger = used more recently

    @property
    def state(self) -> AdapterState:
        if self.error is not None:
            return AdapterState.FAILED
        if self.gpu_slot is not None:
            return AdapterState.PINNED if self.pinned else AdapterState.GPU
        if self.loading:
            return AdapterState.LOADING
        if self.weights is not None:
            return AdapterState.HOST
        return AdapterState.REGISTERED

    @property
    def tier(self) -> str:
        if self.gpu_slot is not None:
            return "gpu"
        if self.weights is not None:
            return "host"
        return "hub" if self.source.kind == "hub" and self.path is None else "disk"

    def info(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "adapter",
            "adapter_id": self.adapter_id,
            "state": self.state.value,
            "tier": self.tier,
            "pinned": self.pinned,
            "source": self.source.describe(),
            "rank": self.rank,
            "targets": list(self.targets),
            "size_bytes": self.size_bytes,
            "base_model": self.base_model,
            "last_used": self.last_used,
            "requests": self.requests,
            "in_flight": self.refcount,
            "loads": self.loads,
            "gpu_loads": self.gpu_loads,
            "gpu_evictions": self.gpu_evictions,
            "host_evictions": self.host_evictions,
            "load_ms": {tier: round(seconds * 1e3, 3) for tier, seconds in self.load_seconds.items()},
            "error": self.error,
            "warnings": list(self.warnings),
        }


FINE_TUNED_PREFIX = "ft-"
"""Fine-tuning publishes `ft-<job-id>` and `ft-<job-id>:ckpt-<step>`; no root directory takes one."""


class AdapterRegistry:
    """Names → entries (live ones), ids → entries (also those draining after a delete)."""

    def __init__(self, max_host: int, root: Path | None = None) -> None:
        if max_host < 1:
            raise ValueError(f"max_host must be positive, got {max_host}")
        self.max_host = max_host
        self.root = root
        self._by_name: dict[str, AdapterEntry] = {}
        self._by_id: dict[int, AdapterEntry] = {}
        self._deleted: set[str] = set()  # root names deleted by the operator: not rediscovered
        self._reserved: frozenset[str] = frozenset()  # never discovered from the root (see `reserve`)
        self._next_id = 1
        self._counts: Counter[str] = Counter()  # monotonic, survives deletes
        self.load_seconds = 0.0  # total host-load time, for the load-latency summary

    # -- lookups (names()/has() may be called from any thread: single dict operations only)
    def names(self) -> list[str]:
        return list(self._by_name)

    def servable_names(self) -> list[str]:
        """Registered names minus those that failed to load (those stay listed, with the reason,
        by the admin API, and answer 400 with it)."""
        return [name for name, entry in list(self._by_name.items()) if entry.error is None]

    def has(self, name: str) -> bool:
        if name in self._by_name:
            return True
        return self._discoverable(name) and find_in_root(self.root, name) is not None

    def get(self, name: str) -> AdapterEntry | None:
        return self._by_name.get(name)

    def by_id(self, adapter_id: int) -> AdapterEntry | None:
        return self._by_id.get(adapter_id)

    def entries(self) -> list[AdapterEntry]:
        return list(self._by_id.values())

    def live(self) -> list[AdapterEntry]:
        return list(self._by_name.values())

    # -- registration
    def register(self, name: str, source: AdapterSource) -> AdapterEntry:
        validate_name(name)
        if name in self._by_name:
            raise AdapterExistsError(f"an adapter named {name!r} is already registered")
        entry = AdapterEntry(name=name, adapter_id=self._next_id, source=source)
        self._next_id += 1
        self._by_name[name] = entry
        self._by_id[entry.adapter_id] = entry
        self._deleted.discard(name)
        return entry

    def reserve(self, names: set[str] | frozenset[str]) -> None:
        """Names a root directory may not take: the base model's (a request for it reaches the base,
        so such an adapter could only be pinned, never served) and fine-tuning's `ft-` names."""
        self._reserved = frozenset(names)

    def _discoverable(self, name: str) -> bool:
        return name not in self._deleted and name not in self._reserved and not name.startswith(FINE_TUNED_PREFIX)

    def discover(self, name: str) -> AdapterEntry | None:
        """The entry for `name`, registering `adapter_root/name` on first use."""
        entry = self._by_name.get(name)
        if entry is not None or not self._discoverable(name):
            return entry
        source = find_in_root(self.root, name)
        return None if source is None else self.register(name, source)

    def add_discovered(self, found: dict[str, AdapterSource]) -> list[AdapterEntry]:
        """Register root adapters found by a scan, except known names and deleted ones."""
        return [
            self.register(name, source)
            for name, source in found.items()
            if name not in self._by_name and self._discoverable(name)
        ]

    def unname(self, entry: AdapterEntry) -> None:
        """Delete: new lookups miss at once; the entry stays (by id) until its requests finish."""
        if self._by_name.get(entry.name) is entry:
            del self._by_name[entry.name]
        entry.deleting = True
        self._deleted.add(entry.name)

    def drop(self, entry: AdapterEntry) -> None:
        """Forget a deleted entry whose last request finished."""
        self._by_id.pop(entry.adapter_id, None)
        entry.weights = None
        entry.gpu_slot = None

    # -- usage and loads
    def touch(self, entry: AdapterEntry) -> None:
        entry.lru = next(_tick)
        entry.last_used = time.time()

    def install(self, entry: AdapterEntry, weights: Any, path: Path, warnings: list[str],
                seconds: float = 0.0) -> None:
        """Record a finished host load that took `seconds` (disk/hub read and validation)."""
        entry.loading = False
        entry.weights = weights
        entry.path = path
        entry.error = None
        self.count(entry, "loads")
        self.load_seconds += seconds
        entry.load_seconds["disk"] = seconds
        entry.rank = int(weights.max_rank)
        entry.targets = sorted(weights.spec.target_modules)
        entry.size_bytes = int(weights.size_bytes)
        entry.base_model = weights.spec.base_model_name_or_path
        entry.warnings = list(warnings)
        self.touch(entry)

    def fail(self, entry: AdapterEntry, reason: str) -> None:
        entry.loading = False
        entry.weights = None
        entry.pinned = False
        entry.error = reason
        self._counts["load_failures"] += 1

    def count(self, entry: AdapterEntry, counter: str) -> None:
        """Add one to `entry`'s counter (loads, gpu_loads, gpu_evictions, host_evictions) and the total."""
        setattr(entry, counter, getattr(entry, counter) + 1)
        self._counts[counter] += 1

    # -- host tier
    def host_tier(self) -> list[AdapterEntry]:
        """Entries holding (or about to hold) host memory; what `max_host` bounds."""
        return [e for e in self._by_id.values() if e.weights is not None or e.loading]

    def host_victim(self) -> AdapterEntry | None:
        """Least recently used entry whose host copy may go: unused, unpinned, not loading.

        Entries off the GPU go first: dropping a GPU-resident one costs its slot too.
        """
        idle = [
            e
            for e in self._by_id.values()
            if e.weights is not None and e.refcount == 0 and not e.pinned and not e.loading
        ]
        if not idle:
            return None
        return min(idle, key=lambda e: (e.gpu_slot is not None, e.lru))

    # -- pinning
    def check_can_pin(self, entry: AdapterEntry, num_slots: int) -> None:
        """One slot always stays unpinned, or adapters that are not pinned could never run."""
        pinned = sorted(e.name for e in self._by_id.values() if e.pinned and e is not entry)
        if entry.pinned or len(pinned) + 1 <= num_slots - 1:
            return
        if num_slots == 1:
            raise PinLimitError(
                f"cannot promote {entry.name!r}: the server has a single GPU adapter slot, which must stay "
                "free for unpinned adapters; restart with more GPU adapter slots to pin adapters"
            )
        raise PinLimitError(
            f"cannot promote {entry.name!r}: {len(pinned)} of the {num_slots} GPU adapter slots are pinned "
            f"({', '.join(pinned)}) and one must stay free for unpinned adapters; demote one first"
        )

    def pinned(self) -> list[AdapterEntry]:
        return [e for e in self._by_id.values() if e.pinned]

    def totals(self) -> dict[str, float]:
        entries = list(self._by_id.values())
        return {
            "adapter_load_seconds": self.load_seconds,
            "adapters_registered": len(self._by_name),
            "adapters_host": sum(e.weights is not None for e in entries),
            "adapters_gpu": sum(e.gpu_slot is not None for e in entries),
            "adapters_pinned": sum(e.pinned for e in entries),
            "adapter_refcount_total": sum(e.refcount for e in entries),
            **{f"adapter_{name}": self._counts[name] for name in _COUNTERS},
        }
