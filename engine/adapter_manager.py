"""The adapter lifecycle on the engine side: request leases, host loads, GPU slots, promote/demote/delete.

Every method runs on the engine thread (between steps, so slot copies happen at step
boundaries) except `names()`, `has()` and `refcounts()`. Disk and hub reads run in a job handed
to `submit` (a loader thread pool); the job hands its result back through `post`, which runs it
on the engine thread. Without an executor (the synchronous engine) jobs run inline.

Invariants: an adapter with requests (refcount > 0) or a pin keeps its host copy; a slot used by a
running sequence or pinned is never evicted; at most `num_slots - 1` adapters are pinned, and the
scheduler's distinct-adapter cap is `num_slots - pinned adapters not running`, so a batch never
needs more slots than exist.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from adapters.errors import AdapterError
from adapters.loader import LoadedAdapter, LoadPolicy, load_from_source
from adapters.registry import AdapterEntry, AdapterExistsError, AdapterRegistry
from adapters.sources import AdapterSource, validate_name
from engine.adapter_slots import AdapterSlotTable, SlotLoad
from engine.errors import AdapterFailedError, AdapterUnavailableError, UnknownAdapterError
from engine.load_times import LoadTimes
from engine.lora.slots import LoraSlots
from scheduler.sequence import BASE_ADAPTER_ID

log = logging.getLogger(__name__)

Submit = Callable[[Callable[[], None]], Any]
Future = concurrent.futures.Future


class AdapterLease:
    """A request's hold on an adapter from before its host load until the request owns it.

    Created by the caller (so a cancelled caller can always release it), filled by `acquire`.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.entry: AdapterEntry | None = None
        self.ready: Future[None] = Future()
        self.held = False


class AdapterManager:
    """Owns the registry, the slot table and the load queue; the engine calls it at each step."""

    def __init__(
        self,
        lora: LoraSlots,
        registry: AdapterRegistry,
        policy: LoadPolicy,
        running_ids: Callable[[], set[int]],
    ) -> None:
        if registry.max_host < lora.num_slots:
            raise ValueError(
                f"max_cpu_adapters ({registry.max_host}) must be >= the GPU adapter slots ({lora.num_slots}): "
                "an adapter on the GPU keeps its host copy"
            )
        self.lora = lora
        self.slots = AdapterSlotTable(lora.num_slots)
        self.registry = registry
        self.policy = policy
        self._running_ids = running_ids
        self._submit: Submit | None = None
        self._post: Submit | None = None
        self._pending: deque[AdapterEntry] = deque()  # waiting for host room
        self._load_waiters: dict[int, list[Future[None]]] = {}  # queued or loading
        self._pin_waiters: dict[int, list[Future[None]]] = {}
        self._load_retries: dict[int, int] = {}  # adapter id -> transient failures in a row
        self.load_times = LoadTimes()
        self._pumping = False

    def use_executor(self, submit: Submit, post: Submit) -> None:
        """Run loads via `submit(job)` off the engine thread; `post(fn)` runs `fn` on the engine thread."""
        self._submit, self._post = submit, post

    # ------------------------------------------------------------------ any thread
    def names(self) -> list[str]:
        return self.registry.names()

    def has(self, name: str) -> bool:
        return self.registry.has(name)

    def refcounts(self) -> dict[str, int]:
        return {e.name: e.refcount for e in self.registry.live()}

    # ---------------------------------------------------------------- registration
    def register(self, name: str, source: AdapterSource, load: bool) -> Future[None] | None:
        """Add `name`; a failed adapter of that name is replaced. With `load`, a future of the host load."""
        validate_name(name)
        existing = self.registry.get(name)
        if existing is not None:
            if existing.error is None:
                raise AdapterExistsError(f"an adapter named {name!r} is already registered")
            self._retire(existing)
        entry = self.registry.register(name, source)
        if not load:
            return None
        done: Future[None] = Future()
        self._wait_load(entry, done)
        return done

    def lookup(self, name: str) -> AdapterEntry:
        entry = self.registry.discover(name)
        if entry is None:
            raise UnknownAdapterError(name)
        return entry

    def info(self, name: str) -> dict[str, Any]:
        return self.lookup(name).info()

    def infos(self) -> list[dict[str, Any]]:
        return [e.info() for e in sorted(self.registry.live(), key=lambda e: e.name)]

    # -------------------------------------------------------------------- requests
    def acquire(self, lease: AdapterLease) -> None:
        """Take a reference for a request; `lease.ready` resolves once the weights are in host memory."""
        entry = self.lookup(lease.name)
        if entry.error is not None:
            raise AdapterFailedError(entry.name, entry.error)
        entry.refcount += 1
        entry.requests += 1
        self.registry.touch(entry)
        lease.entry, lease.held = entry, True
        if entry.weights is not None:
            _resolve([lease.ready], None)
        else:
            self._wait_load(entry, lease.ready)

    def consume(self, lease: AdapterLease) -> int:
        """Hand the lease's reference to a request about to be scheduled; returns the adapter id."""
        entry = lease.entry
        if not lease.held or entry is None:
            raise RuntimeError(f"the lease on adapter {lease.name!r} was released")
        if not lease.ready.done():
            raise AdapterUnavailableError(entry.name, "its weights are still loading")
        if lease.ready.exception() is not None:
            raise lease.ready.exception()  # type: ignore[misc]
        if entry.weights is None:
            raise AdapterUnavailableError(entry.name, "its weights are not in host memory")
        lease.held = False
        return entry.adapter_id

    def release(self, lease: AdapterLease) -> None:
        """Give back a lease no request took over; a no-op after `consume` or a second release."""
        if lease.held and lease.entry is not None:
            lease.held = False
            self.unref(lease.entry.adapter_id)

    def unref(self, adapter_id: int) -> None:
        entry = self.registry.by_id(adapter_id)
        if entry is None:
            return
        entry.refcount -= 1
        self.registry.touch(entry)
        if entry.refcount == 0:
            if entry.deleting:
                self._finalize(entry)
            self._pump_loads()

    # ---------------------------------------------------------------- step boundary
    def scheduler_cap(self, running: set[int]) -> int:
        return max(1, self.slots.num_slots - len(self.slots.pinned - running))

    def make_resident(self, adapter_ids: list[int], running: set[int]) -> list[int]:
        """Give every adapter of the batch a slot (copying weights in); per sequence its slot or -1."""
        needed = {a for a in adapter_ids if a != BASE_ADAPTER_ID}
        if needed:
            for load in self.slots.assign(needed, running):
                self._copy(load)
        return [-1 if a == BASE_ADAPTER_ID else self.slots.slot_of(a) for a in adapter_ids]  # type: ignore[misc]

    def place_pinned(self, running: set[int]) -> None:
        """Copy pinned adapters that have host weights into a slot no running sequence needs."""
        for entry in self.registry.pinned():
            if entry.gpu_slot is None and entry.weights is not None:
                load = self.slots.place(entry.adapter_id, running)
                if load is not None:
                    self._copy(load)
            if entry.gpu_slot is not None:
                _resolve(self._pin_waiters.pop(entry.adapter_id, []), None)

    # ------------------------------------------------------------------------ admin
    def promote(self, name: str) -> Future[None]:
        """Pin `name`; the future resolves when it sits in a GPU slot (PinLimitError: 409)."""
        entry = self.lookup(name)
        if entry.error is not None:
            raise AdapterFailedError(entry.name, entry.error)
        self.registry.check_can_pin(entry, self.slots.num_slots)
        entry.pinned = True
        self.slots.pin(entry.adapter_id)
        done: Future[None] = Future()
        self._pin_waiters.setdefault(entry.adapter_id, []).append(done)
        if entry.weights is None:
            self._wait_load(entry, Future())  # a failure reaches `done` through the pin waiters
        self.place_pinned(self._running_ids())
        return done

    def demote(self, name: str) -> None:
        """Unpin `name` and move it off the GPU to host memory (at once unless a running sequence uses it)."""
        entry = self.lookup(name)
        self._unpin(entry, None)
        self.registry.touch(entry)  # the most recent in host memory, not the next to go to disk
        if entry.gpu_slot is not None and entry.adapter_id not in self._running_ids():
            self.slots.remove(entry.adapter_id)
            entry.gpu_slot = None
        self._pump_loads()

    def delete(self, name: str) -> int:
        """Unregister `name` now (new requests miss); it is freed when its in-flight requests end."""
        entry = self.lookup(name)
        in_flight = entry.refcount
        self._retire(entry)
        return in_flight

    def abandon(self, error: BaseException) -> None:
        """Answer every waiter with `error` (the engine stopped; no load will finish)."""
        for waiters in [*self._load_waiters.values(), *self._pin_waiters.values()]:
            _resolve(waiters, error)
        self._load_waiters.clear()
        self._pin_waiters.clear()
        self._pending.clear()

    # ------------------------------------------------------------------------ loads
    def _wait_load(self, entry: AdapterEntry, done: Future[None]) -> None:
        waiters = self._load_waiters.get(entry.adapter_id)
        if waiters is None:
            waiters = self._load_waiters[entry.adapter_id] = []
            self._pending.append(entry)
        waiters.append(done)
        self._pump_loads()

    def _pump_loads(self) -> None:
        if self._pumping:  # an inline load finishing calls back in here
            return
        self._pumping = True
        try:
            while self._pending:
                entry = self._pending[0]
                if self.registry.by_id(entry.adapter_id) is not entry:
                    self._pending.popleft()
                    continue
                if not self._make_host_room():
                    return
                self._pending.popleft()
                entry.loading = True
                self._start_load(entry)
        finally:
            self._pumping = False

    def _start_load(self, entry: AdapterEntry) -> None:
        name, source, path, policy, adapter_id = entry.name, entry.source, entry.path, self.policy, entry.adapter_id
        post = self._post

        def job() -> None:
            result: LoadedAdapter | BaseException
            started = time.perf_counter()
            try:
                result = load_from_source(name, source, policy, path)
            except Exception as exc:  # noqa: BLE001 - every failure marks the adapter failed
                result = exc
            seconds = time.perf_counter() - started
            if post is None:
                self.finish_load(adapter_id, name, result, seconds)
            else:
                post(lambda: self.finish_load(adapter_id, name, result, seconds))

        if self._submit is None:
            job()
        else:
            self._submit(job)

    def finish_load(
        self, adapter_id: int, name: str, result: LoadedAdapter | BaseException, seconds: float = 0.0
    ) -> None:
        waiters = self._load_waiters.pop(adapter_id, [])
        entry = self.registry.by_id(adapter_id)
        if entry is None:  # deleted and drained while loading
            _resolve(waiters, UnknownAdapterError(name))
        elif isinstance(result, BaseException) and not _is_invalid(result):
            # Not the adapter's fault (a device or I/O error): retried, never marked failed.
            entry.loading = False
            retries = self._load_retries.get(adapter_id, 0)
            if retries < TRANSIENT_LOAD_RETRIES:
                log.warning("adapter %r: transient load error, retrying: %s: %s", name, type(result).__name__, result)
                self._load_retries[adapter_id] = retries + 1
                for waiter in waiters:
                    self._wait_load(entry, waiter)
                pin_waiters = self._pin_waiters.get(adapter_id)
                if pin_waiters and adapter_id not in self._load_waiters:
                    self._wait_load(entry, Future())
            else:
                self._load_retries.pop(adapter_id, None)
                log.error("adapter %r: load failed %d times: %s: %s", name, retries + 1, type(result).__name__, result)
                error = AdapterUnavailableError(name, f"loading it failed ({type(result).__name__}); retry later")
                _resolve(waiters, error)
                self._unpin(entry, error)
        elif isinstance(result, BaseException):
            reason = result.detail if isinstance(result, AdapterError) else f"{type(result).__name__}: {result}"
            log.warning("adapter %r failed to load: %s", name, reason)
            self.slots.unpin(adapter_id)
            self.registry.fail(entry, reason)
            error = AdapterFailedError(name, reason)
            _resolve(waiters, error)
            _resolve(self._pin_waiters.pop(adapter_id, []), error)
        else:
            self._load_retries.pop(adapter_id, None)
            self.load_times.observe("disk", seconds)
            self.registry.install(entry, result.weights, result.path, result.warnings, seconds)
            _resolve(waiters, None)
            self.place_pinned(self._running_ids())
        self._pump_loads()

    def _make_host_room(self) -> bool:
        while len(self.registry.host_tier()) >= self.registry.max_host:
            victim = self.registry.host_victim()
            if victim is None:
                # Every host copy is in use. With a loader pool the load waits for a request to
                # finish; the synchronous engine cannot wait, so it goes over the limit.
                return self._submit is None
            self._evict_host(victim)
        return True

    def _evict_host(self, entry: AdapterEntry) -> None:
        if entry.gpu_slot is not None:  # idle (refcount 0), so no running sequence uses the slot
            self.slots.remove(entry.adapter_id)
            entry.gpu_slot = None
            self.registry.count(entry, "gpu_evictions")
        entry.weights = None
        self.registry.count(entry, "host_evictions")

    def _copy(self, load: SlotLoad) -> None:
        if load.evicted is not None:
            victim = self.registry.by_id(load.evicted)
            if victim is not None:
                victim.gpu_slot = None
                self.registry.count(victim, "gpu_evictions")
        entry = self.registry.by_id(load.adapter_id)
        if entry is None or entry.weights is None:
            self.slots.remove(load.adapter_id)
            raise RuntimeError(f"adapter id {load.adapter_id} has no host weights to copy into a GPU slot")
        started = time.perf_counter()
        try:
            self.lora.load(load.slot, entry.weights)
            seconds = time.perf_counter() - started
            self.load_times.observe("host", seconds)
            entry.load_seconds["host"] = seconds
        except BaseException:
            # The slot holds part of a copy: forget it, so the next step copies the adapter again.
            self.slots.remove(load.adapter_id)
            if entry.pinned:
                self.slots.pin(entry.adapter_id)
            raise
        entry.gpu_slot = load.slot
        self.registry.count(entry, "gpu_loads")

    # --------------------------------------------------------------------- removal
    def _unpin(self, entry: AdapterEntry, error: BaseException | None) -> None:
        if entry.pinned:
            entry.pinned = False
            self.slots.unpin(entry.adapter_id)
        _resolve(self._pin_waiters.pop(entry.adapter_id, []), error)

    def _retire(self, entry: AdapterEntry) -> None:
        self.registry.unname(entry)
        self._unpin(entry, UnknownAdapterError(entry.name))
        if entry.refcount == 0:
            self._finalize(entry)
        self._pump_loads()

    def _finalize(self, entry: AdapterEntry) -> None:
        self.registry.drop(entry)
        self.slots.remove(entry.adapter_id)
        if entry in self._pending:  # queued, not started: nobody else will answer its waiters
            self._pending.remove(entry)
            _resolve(self._load_waiters.pop(entry.adapter_id, []), UnknownAdapterError(entry.name))


TRANSIENT_LOAD_RETRIES = 2
"""Times a load that failed for a reason other than the adapter's files is tried again at once."""


def _is_invalid(exc: BaseException) -> bool:
    """Whether a load failure is the adapter's own fault (its files or config), so it stays failed.

    Everything the loader checks raises an `AdapterError`; the rest (a CUDA error while pinning,
    an interrupted read) may well pass on a second try."""
    return isinstance(exc, AdapterError | ValueError | KeyError)


def _resolve(futures: list[Future[None]], error: BaseException | None) -> None:
    for future in futures:
        try:
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        except concurrent.futures.InvalidStateError:  # the waiter gave up (cancelled)
            pass


def gpu_slots_for_budget(lora_geometry: list[tuple[int, list[int]]], max_rank: int, itemsize: int, budget: int) -> int:
    """How many slots of `max_rank` fit `budget` bytes, given each wrapped module's (in, output sizes)."""
    per_slot = sum(max_rank * (in_features * len(outs) + sum(outs)) for in_features, outs in lora_geometry) * itemsize
    slots = budget // per_slot
    if slots < 1:
        raise ValueError(
            f"max_gpu_adapter_memory={budget} bytes holds no adapter slot (one slot of rank {max_rank} "
            f"needs {per_slot} bytes)"
        )
    return int(slots)
