"""Adapter residency in the engine core: host loads, the host tier, GPU slots and pins, by id.

The core knows adapters only by the `AdapterRef`s it is handed (id, source, name for messages);
names, refcounts and the failed state are the registry's (adapters/registry.py), which tells the
core when a deleted adapter may go (`forget`) and is told when a load finds one invalid
(`on_failed`). The host copies and what loads taught are the host tier's (engine/adapter_host.py);
slots and pins are the slot table's (engine/adapter_slots.py); this module moves weights between
them and answers the waiters.

Every method runs on the engine thread (between steps, so slot copies happen at step boundaries).
Disk and hub reads run in a job handed to `submit` (a loader thread pool); the job hands its
result back through `post`, which runs it on the engine thread. Without an executor (the
synchronous engine) jobs run inline.

Invariants: an adapter held by requests or pinned keeps its host copy; a slot used by a running
sequence or pinned is never evicted; at most `num_slots - 1` adapters are pinned, and the
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
from adapters.registry import AdapterRef
from engine.adapter_host import HostRecord, HostTier
from engine.adapter_slots import AdapterSlotTable, SlotLoad
from engine.errors import AdapterFailedError, AdapterUnavailableError, UnknownAdapterError
from engine.load_times import LoadTimes
from engine.lora.slots import LoraSlots
from scheduler.sequence import BASE_ADAPTER_ID

log = logging.getLogger(__name__)

Submit = Callable[[Callable[[], None]], Any]
Future = concurrent.futures.Future


class AdapterLease:
    """A request's hold on an adapter's residency from before its host load until the request owns it.

    Created by the caller (so a cancelled caller can always release it), filled by `hold`.
    """

    def __init__(self, ref: AdapterRef) -> None:
        self.ref = ref
        self.ready: Future[None] = Future()
        self.held = False


class AdapterManager:
    """Owns the host tier, the slot table and the load queue; the engine calls it at each step."""

    def __init__(
        self,
        lora: LoraSlots,
        max_host: int,
        policy: LoadPolicy,
        running_ids: Callable[[], set[int]],
        on_failed: Callable[[int, str], None] = lambda adapter_id, reason: None,
    ) -> None:
        if max_host < lora.num_slots:
            raise ValueError(
                f"max_cpu_adapters ({max_host}) must be >= the GPU adapter slots ({lora.num_slots}): "
                "an adapter on the GPU keeps its host copy"
            )
        self.lora = lora
        self.host = HostTier(max_host)
        self.slots = AdapterSlotTable(lora.num_slots)
        self.policy = policy
        self._running_ids = running_ids
        self._on_failed = on_failed
        self._submit: Submit | None = None
        self._post: Submit | None = None
        self._pending: deque[HostRecord] = deque()  # waiting for host room
        self._load_waiters: dict[int, list[Future[None]]] = {}  # queued or loading
        self._pin_waiters: dict[int, list[Future[None]]] = {}
        self._load_retries: dict[int, int] = {}  # adapter id -> transient failures in a row
        self.load_times = LoadTimes()
        self._pumping = False

    def use_executor(self, submit: Submit, post: Submit) -> None:
        """Run loads via `submit(job)` off the engine thread; `post(fn)` runs `fn` on the engine thread."""
        self._submit, self._post = submit, post

    # -------------------------------------------------------------------- requests
    def hold(self, lease: AdapterLease) -> None:
        """Keep the adapter for a request; `lease.ready` resolves once its weights are in host memory."""
        record = self.host.ensure(lease.ref)
        record.holds += 1
        self.host.touch(record)
        lease.held = True
        if record.weights is not None:
            _resolve([lease.ready], None)
        else:
            self._wait_load(record, lease.ready)

    def consume(self, lease: AdapterLease) -> int:
        """Hand the lease's hold to a request about to be scheduled; returns the adapter id."""
        ref = lease.ref
        record = self.host.get(ref.adapter_id)
        if not lease.held or record is None:
            raise RuntimeError(f"the lease on adapter {ref.name!r} was released")
        if not lease.ready.done():
            raise AdapterUnavailableError(ref.name, "its weights are still loading")
        if lease.ready.exception() is not None:
            raise lease.ready.exception()  # type: ignore[misc]
        if record.weights is None:
            raise AdapterUnavailableError(ref.name, "its weights are not in host memory")
        lease.held = False
        return ref.adapter_id

    def release(self, lease: AdapterLease) -> None:
        """Give back a lease no request took over; a no-op after `consume` or a second release."""
        if lease.held:
            lease.held = False
            self.unhold(lease.ref.adapter_id)

    def unhold(self, adapter_id: int) -> None:
        """A request holding the adapter ended."""
        record = self.host.get(adapter_id)
        if record is None:
            return
        record.holds -= 1
        self.host.touch(record)
        if record.holds == 0:
            if record.retired:
                self._drop(record)
            self._pump_loads()

    def load(self, ref: AdapterRef) -> Future[None]:
        """Load a newly registered adapter into host memory; the future resolves when it is there."""
        record = self.host.ensure(ref)
        done: Future[None] = Future()
        if record.weights is not None:
            _resolve([done], None)
        else:
            self._wait_load(record, done)
        return done

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
        for adapter_id in sorted(self.slots.pinned):
            record = self.host.get(adapter_id)
            if self.slots.slot_of(adapter_id) is None and record is not None and record.weights is not None:
                load = self.slots.place(adapter_id, running)
                if load is not None:
                    self._copy(load)
            if self.slots.slot_of(adapter_id) is not None:
                _resolve(self._pin_waiters.pop(adapter_id, []), None)

    # ------------------------------------------------------------------------ admin
    def promote(self, ref: AdapterRef) -> Future[None]:
        """Pin the adapter; the future resolves when it sits in a GPU slot (PinLimitError: 409)."""
        self.slots.check_can_pin(ref.adapter_id, ref.name, self._name_of)
        record = self.host.ensure(ref)
        self.slots.pin(ref.adapter_id)
        done: Future[None] = Future()
        self._pin_waiters.setdefault(ref.adapter_id, []).append(done)
        if record.weights is None:
            self._wait_load(record, Future())  # a failure reaches `done` through the pin waiters
        self.place_pinned(self._running_ids())
        return done

    def demote(self, adapter_id: int) -> None:
        """Unpin the adapter and move it off the GPU to host memory (at once unless a running sequence uses it)."""
        self.unpin(adapter_id, None)
        record = self.host.get(adapter_id)
        if record is not None:
            self.host.touch(record)  # the most recent in host memory, not the next to go to disk
        if adapter_id not in self._running_ids():
            self.slots.vacate(adapter_id)
        self._pump_loads()

    def unpin(self, adapter_id: int, error: BaseException | None) -> None:
        """Unpin; a promote still waiting for its slot is answered with `error` (None: done)."""
        self.slots.unpin(adapter_id)
        _resolve(self._pin_waiters.pop(adapter_id, []), error)

    def forget(self, adapter_id: int) -> None:
        """The adapter was deleted and its last request ended: free its host copy and slot."""
        record = self.host.get(adapter_id)
        self.unpin(adapter_id, UnknownAdapterError(self._name_of(adapter_id)))
        if record is None:
            self.slots.remove(adapter_id)
            return
        record.retired = True
        if record.holds == 0:
            self._drop(record)
        self._pump_loads()

    def abandon(self, error: BaseException) -> None:
        """Answer every waiter with `error` (the engine stopped; no load will finish)."""
        for waiters in [*self._load_waiters.values(), *self._pin_waiters.values()]:
            _resolve(waiters, error)
        self._load_waiters.clear()
        self._pin_waiters.clear()
        self._pending.clear()

    # ------------------------------------------------------------------------ reads
    def residency(self, ref: AdapterRef) -> dict[str, Any]:
        """Where the adapter is and what its loads taught (the registry adds identity for the admin API)."""
        return self.host.residency(ref, self.slots.slot_of(ref.adapter_id), self.slots.is_pinned(ref.adapter_id))

    def loading_for_requests(self) -> set[int]:
        """Ids whose host load a request is waiting for (they wait before the scheduler sees them)."""
        return {r.adapter_id for r in self.host.members() if r.loading and r.holds > 0}

    def totals(self) -> dict[str, float]:
        return {
            **self.host.totals(),
            "adapters_gpu": len(self.slots.resident),
            "adapters_pinned": len(self.slots.pinned),
        }

    # ------------------------------------------------------------------------ loads
    def _wait_load(self, record: HostRecord, done: Future[None]) -> None:
        waiters = self._load_waiters.get(record.adapter_id)
        if waiters is None:
            waiters = self._load_waiters[record.adapter_id] = []
            self._pending.append(record)
        waiters.append(done)
        self._pump_loads()

    def _pump_loads(self) -> None:
        if self._pumping:  # an inline load finishing calls back in here
            return
        self._pumping = True
        try:
            while self._pending:
                record = self._pending[0]
                if self.host.get(record.adapter_id) is not record:
                    self._pending.popleft()
                    continue
                if not self._make_host_room():
                    return
                self._pending.popleft()
                record.loading = True
                self._start_load(record)
        finally:
            self._pumping = False

    def _start_load(self, record: HostRecord) -> None:
        name, source, path, policy, adapter_id = record.name, record.source, record.path, self.policy, record.adapter_id
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
        record = self.host.get(adapter_id)
        if record is None:  # deleted and drained while loading
            _resolve(waiters, UnknownAdapterError(name))
        elif isinstance(result, BaseException) and not _is_invalid(result):
            # Not the adapter's fault (a device or I/O error): retried, never marked failed.
            record.loading = False
            retries = self._load_retries.get(adapter_id, 0)
            if retries < TRANSIENT_LOAD_RETRIES:
                log.warning("adapter %r: transient load error, retrying: %s: %s", name, type(result).__name__, result)
                self._load_retries[adapter_id] = retries + 1
                for waiter in waiters:
                    self._wait_load(record, waiter)
                pin_waiters = self._pin_waiters.get(adapter_id)
                if pin_waiters and adapter_id not in self._load_waiters:
                    self._wait_load(record, Future())
            else:
                self._load_retries.pop(adapter_id, None)
                log.error("adapter %r: load failed %d times: %s: %s", name, retries + 1, type(result).__name__, result)
                error = AdapterUnavailableError(name, f"loading it failed ({type(result).__name__}); retry later")
                _resolve(waiters, error)
                self.unpin(adapter_id, error)
        elif isinstance(result, BaseException):
            reason = result.detail if isinstance(result, AdapterError) else f"{type(result).__name__}: {result}"
            log.warning("adapter %r failed to load: %s", name, reason)
            self.host.fail(record)
            self._on_failed(adapter_id, reason)
            error = AdapterFailedError(name, reason)
            _resolve(waiters, error)
            self.unpin(adapter_id, error)
        else:
            self._load_retries.pop(adapter_id, None)
            self.load_times.observe("disk", seconds)
            self.host.install(record, result.weights, result.path, result.warnings, seconds)
            _resolve(waiters, None)
            self.place_pinned(self._running_ids())
        self._pump_loads()

    def _make_host_room(self) -> bool:
        while len(self.host.members()) >= self.host.max_host:
            victim = self.host.victim(self.slots.pinned, lambda adapter_id: self.slots.slot_of(adapter_id) is not None)
            if victim is None:
                # Every host copy is in use. With a loader pool the load waits for a request to
                # finish; the synchronous engine cannot wait, so it goes over the limit.
                return self._submit is None
            self._evict_host(victim)
        return True

    def _evict_host(self, record: HostRecord) -> None:
        if self.slots.vacate(record.adapter_id) is not None:  # idle, so no running sequence uses the slot
            self.host.count(record, "gpu_evictions")
        record.weights = None
        self.host.count(record, "host_evictions")

    def _copy(self, load: SlotLoad) -> None:
        if load.evicted is not None:
            victim = self.host.get(load.evicted)
            if victim is not None:
                self.host.count(victim, "gpu_evictions")
        record = self.host.get(load.adapter_id)
        if record is None or record.weights is None:
            self.slots.vacate(load.adapter_id)
            raise RuntimeError(f"adapter id {load.adapter_id} has no host weights to copy into a GPU slot")
        started = time.perf_counter()
        try:
            self.lora.load(load.slot, record.weights)
        except BaseException:
            # The slot holds part of a copy: forget it, so the next step copies the adapter again.
            self.slots.vacate(load.adapter_id)
            raise
        seconds = time.perf_counter() - started
        self.load_times.observe("host", seconds)
        record.load_seconds["host"] = seconds
        self.host.count(record, "gpu_loads")

    def _name_of(self, adapter_id: int) -> str:
        record = self.host.get(adapter_id)
        return record.name if record is not None else str(adapter_id)

    # --------------------------------------------------------------------- removal
    def _drop(self, record: HostRecord) -> None:
        self.host.drop(record.adapter_id)
        self.slots.remove(record.adapter_id)
        self._load_retries.pop(record.adapter_id, None)
        if record in self._pending:  # queued, not started: nobody else will answer its waiters
            self._pending.remove(record)
            _resolve(self._load_waiters.pop(record.adapter_id, []), UnknownAdapterError(record.name))


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
