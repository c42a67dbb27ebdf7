"""Adapter identity: names → ids and sources, the failed and deleted states, and request refcounts.

A request's `model` is resolved here, atomically: `acquire(name)` finds the live adapter of that
name, refuses it if it failed to load, counts the request and hands back an `AdapterRef` in one
step under one lock; `release(ref)` ends it. Nothing here knows where an adapter's weights are:
residency (host memory, GPU slots, pins) belongs to the engine core, which sees only the ids handed
out here (with the source to load from and the name for its messages). This is the line the
engine-core process split cuts along: this module stays with the API server, and its two links to
the core become messages: `on_retired` (a deleted adapter's last request ended: free its residency)
out, and `fail` (a load found the adapter invalid) in.

Any thread may call in. Only `find` and `discover` read the disk (they look under the adapter root
for a name not registered yet), so an event loop calls them through a worker thread. Ids are never
reused, so a deleted and re-registered name can never meet the old adapter's slot or cached KV.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from adapters.errors import AdapterError
from adapters.sources import AdapterSource, find_in_root, validate_name


class AdapterState(str, Enum):
    """`failed` is decided here; the others are residency, decided by the engine core."""

    REGISTERED = "registered"
    LOADING = "loading"
    HOST = "host"
    GPU = "gpu"
    PINNED = "pinned"
    FAILED = "failed"


class AdapterExistsError(ValueError):
    """A live adapter already has that name (HTTP 409)."""


class PinLimitError(RuntimeError):
    """Pinning would leave no GPU slot for unpinned adapters (HTTP 409). Raised by the engine core;
    defined here with the other errors the admin routes answer."""


FINE_TUNED_PREFIX = "ft-"
"""Fine-tuning publishes `ft-<job-id>` and `ft-<job-id>:ckpt-<step>`; no root directory takes one."""


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as the engine core knows it: its id, where its files are, and its name (for messages).

    `acquire` hands one out with the request counted against the name; `release` gives it back.
    """

    name: str
    adapter_id: int
    source: AdapterSource


@dataclass(eq=False)
class AdapterEntry:
    name: str
    adapter_id: int
    source: AdapterSource
    error: str | None = None  # why it failed to load; a failed adapter serves nothing until replaced
    deleting: bool = False  # unnamed; kept by id until its last request ends
    refcount: int = 0  # requests holding it, from `acquire` to `release`
    requests: int = 0

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.name, self.adapter_id, self.source)

    def info(self, residency: Mapping[str, Any]) -> dict[str, Any]:
        """The admin API's view: this identity with the engine core's `residency` of the adapter."""
        failed = self.error is not None
        return {
            "id": self.name,
            "object": "adapter",
            "adapter_id": self.adapter_id,
            "state": AdapterState.FAILED.value if failed else residency["state"],
            "tier": residency["tier"],
            "pinned": residency["pinned"] and not failed,
            "source": self.source.describe(),
            "rank": residency["rank"],
            "targets": list(residency["targets"]),
            "size_bytes": residency["size_bytes"],
            "base_model": residency["base_model"],
            "last_used": residency["last_used"],
            "requests": self.requests,
            "in_flight": self.refcount,
            "loads": residency["loads"],
            "gpu_loads": residency["gpu_loads"],
            "gpu_evictions": residency["gpu_evictions"],
            "host_evictions": residency["host_evictions"],
            "load_ms": dict(residency["load_ms"]),
            "error": self.error,
            "warnings": list(residency["warnings"]),
        }


class AdapterRegistry:
    """Names → entries (live ones), ids → entries (also those draining after a delete).

    on_retired(adapter_id): called (outside the lock) once a deleted or replaced adapter has no
    request left, so its residency can go.
    """

    def __init__(self, root: Path | None = None, on_retired: Callable[[int], None] | None = None) -> None:
        self.root = root
        self.on_retired: Callable[[int], None] = on_retired if on_retired is not None else _ignore
        self._lock = threading.Lock()
        self._by_name: dict[str, AdapterEntry] = {}
        self._by_id: dict[int, AdapterEntry] = {}
        self._deleted: set[str] = set()  # root names deleted by the operator: not rediscovered
        self._reserved: frozenset[str] = frozenset()  # never discovered from the root (see `reserve`)
        self._next_id = 1

    # -- lookups: memory only
    def names(self) -> list[str]:
        with self._lock:
            return list(self._by_name)

    def servable_names(self) -> list[str]:
        """Registered names minus those that failed to load (those stay listed, with the reason,
        by the admin API, and answer 400 with it)."""
        with self._lock:
            return [name for name, entry in self._by_name.items() if entry.error is None]

    def has(self, name: str) -> bool:
        """Whether `name` is registered (a directory added to the root since is not: see `find`)."""
        with self._lock:
            return name in self._by_name

    def get(self, name: str) -> AdapterEntry | None:
        with self._lock:
            return self._by_name.get(name)

    def by_id(self, adapter_id: int) -> AdapterEntry | None:
        with self._lock:
            return self._by_id.get(adapter_id)

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return list(self._by_id.values())

    def live(self) -> list[AdapterEntry]:
        with self._lock:
            return list(self._by_name.values())

    def refcounts(self) -> dict[str, int]:
        with self._lock:
            return {name: entry.refcount for name, entry in self._by_name.items()}

    def totals(self) -> dict[str, int]:
        with self._lock:
            return {
                "adapters_registered": len(self._by_name),
                "adapter_refcount_total": sum(entry.refcount for entry in self._by_id.values()),
            }

    # -- requests
    def acquire(self, name: str) -> AdapterRef:
        """Count a request against `name`. KeyError if no live adapter has that name; AdapterError
        (with the reason) if it failed to load."""
        with self._lock:
            entry = self._by_name.get(name)
            if entry is None:
                raise KeyError(name)
            if entry.error is not None:
                raise AdapterError(name, entry.error)
            entry.refcount += 1
            entry.requests += 1
            return entry.ref

    def release(self, ref: AdapterRef) -> None:
        """End a request `acquire` counted (once per acquire)."""
        with self._lock:
            entry = self._by_id.get(ref.adapter_id)
            if entry is None:
                return
            entry.refcount -= 1
            retired = self._drained(entry)
        if retired:
            self.on_retired(ref.adapter_id)

    # -- registration
    def register(self, name: str, source: AdapterSource) -> AdapterEntry:
        """Add `name` with a new id; an adapter of that name that failed to load is replaced."""
        validate_name(name)
        with self._lock:
            existing = self._by_name.get(name)
            if existing is not None and existing.error is None:
                raise AdapterExistsError(f"an adapter named {name!r} is already registered")
            retired = existing is not None and self._unname(existing)
            entry = self._add(name, source)
        if retired:
            self.on_retired(existing.adapter_id)  # type: ignore[union-attr]
        return entry

    def unname(self, name: str) -> AdapterEntry | None:
        """Delete: new lookups miss at once; the entry stays (by id) until its requests end, then
        `on_retired` frees its residency. None if no live adapter has that name."""
        with self._lock:
            entry = self._by_name.get(name)
            if entry is None:
                return None
            retired = self._unname(entry)
        if retired:
            self.on_retired(entry.adapter_id)
        return entry

    def fail(self, adapter_id: int, reason: str) -> None:
        """A load found the adapter invalid: it answers `reason` until replaced."""
        with self._lock:
            entry = self._by_id.get(adapter_id)
            if entry is not None:
                entry.error = reason

    # -- the adapter root
    def reserve(self, names: set[str] | frozenset[str]) -> None:
        """Names a root directory may not take: the base model's (a request for it reaches the base,
        so such an adapter could only be pinned, never served) and fine-tuning's `ft-` names."""
        self._reserved = frozenset(names)

    def find(self, name: str) -> AdapterSource | None:
        """The source of `adapter_root/name` if it holds an adapter that may be served under `name`
        (not registered; reads the disk)."""
        with self._lock:
            if not self._discoverable(name):
                return None
        return find_in_root(self.root, name)

    def discover(self, name: str) -> AdapterEntry | None:
        """The entry for `name`, registering `adapter_root/name` on first use (may read the disk)."""
        entry = self.get(name)
        if entry is not None:
            return entry
        source = self.find(name)
        if source is None:
            return None
        with self._lock:  # registered by another thread meanwhile: that entry wins
            entry = self._by_name.get(name)
            if entry is None and self._discoverable(name):
                entry = self._add(name, source)
            return entry

    def add_discovered(self, found: Mapping[str, AdapterSource]) -> list[AdapterEntry]:
        """Register root adapters found by a scan, except known names and deleted ones."""
        with self._lock:
            return [self._add(name, source) for name, source in found.items() if self._discoverable(name)]

    # -- under the lock
    def _discoverable(self, name: str) -> bool:
        return (self.root is not None and name not in self._by_name and name not in self._deleted
                and name not in self._reserved and not name.startswith(FINE_TUNED_PREFIX))

    def _add(self, name: str, source: AdapterSource) -> AdapterEntry:
        entry = AdapterEntry(name=name, adapter_id=self._next_id, source=source)
        self._next_id += 1
        self._by_name[name] = entry
        self._by_id[entry.adapter_id] = entry
        self._deleted.discard(name)
        return entry

    def _unname(self, entry: AdapterEntry) -> bool:
        if self._by_name.get(entry.name) is entry:
            del self._by_name[entry.name]
        entry.deleting = True
        self._deleted.add(entry.name)
        return self._drained(entry)

    def _drained(self, entry: AdapterEntry) -> bool:
        """Forget a deleted entry whose last request ended; True if it was forgotten now."""
        if entry.deleting and entry.refcount == 0 and self._by_id.get(entry.adapter_id) is entry:
            del self._by_id[entry.adapter_id]
            return True
        return False


def _ignore(adapter_id: int) -> None:
    """No engine core to tell (a registry on its own)."""
