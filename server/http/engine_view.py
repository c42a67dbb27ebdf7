"""What `/metrics` reads from the engine at scrape time, and the collector that exports it.

Gauges of engine state (sequences, KV blocks, adapters by state and tier, LoRA slots, GPU
memory, fine-tuning jobs) are read when Prometheus scrapes, never on the request path:
one lock-free `engine.stats()` snapshot, plus `engine.engine_state()` (plain data read on
the engine thread between two steps, engine/state_view.py) for what stats() does not carry.
If that read does not answer in time (a long step, an engine that died) the scrape still
answers, without those families.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from training.job_record import STATUSES as JOB_STATUSES

logger = logging.getLogger(__name__)

ENGINE_READ_TIMEOUT_S = 2.0
# Each state with the tier it usually has, for the zero a state without adapters is exported as.
ADAPTER_STATES = {"registered": "disk", "loading": "disk", "host": "host", "gpu": "gpu", "pinned": "gpu",
                  "failed": "disk"}


@dataclass
class EngineView:
    """One scrape's reading of the engine; empty fields mean "not known" and are not exported."""

    ready: bool = False
    stats: dict[str, float] = field(default_factory=dict)
    adapters: list[tuple[str, str, str]] | None = None  # (name, state, tier)
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    preempted_waiting: int | None = None
    preemptions: int | None = None
    max_lora: int | None = None
    load_times: dict[str, Any] | None = None  # tier -> engine.load_times.TierHistogram
    jobs: dict[str, int] | None = None
    gpu_memory: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> kind -> bytes


def _job_counts(manager: Any) -> dict[str, int]:
    jobs, _ = manager.list_jobs(None, 1 << 30)
    counts = dict.fromkeys(JOB_STATUSES, 0)
    for job in jobs:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    return counts


async def read_view(state: Any, job_manager: Any | None = None) -> EngineView:
    """Read the engine `state` serves (and the fine-tuning jobs); never raises."""
    view = EngineView()
    if job_manager is not None:
        try:  # the manager's lock may be held by its monitor thread: not on the event loop
            view.jobs = await asyncio.wait_for(asyncio.to_thread(_job_counts, job_manager), ENGINE_READ_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a scrape must answer whatever the job manager does
            logger.warning("could not count fine-tuning jobs for /metrics", exc_info=True)
    engine = state.engine
    if not state.ready or engine is None:
        return view
    view.ready = True
    try:
        view.stats = dict(engine.stats())
        core = await asyncio.wait_for(engine.engine_state(), ENGINE_READ_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - a busy or dead engine still gets what was read exported
        logger.debug("engine state not read for /metrics", exc_info=True)
    else:
        for key, value in core.items():
            setattr(view, key, value)
    return view


class EngineCollector:
    """Exports the last `EngineView` handed to it; `labels` maps adapter names to label values."""

    def __init__(self, labels: Callable[[str], str]) -> None:
        self.view = EngineView()
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        view = self.view
        yield _gauge("quiver_model_ready", "1 once the model is loaded and serving.", view.ready)
        if view.jobs is not None:
            jobs = GaugeMetricFamily("quiver_finetune_jobs", "Fine-tuning jobs by state.", labels=["state"])
            for status, count in sorted(view.jobs.items()):
                jobs.add_metric([status], count)
            yield jobs
        if not view.ready:
            return
        yield from self._sequences(view)
        yield from self._adapters(view)
        yield from self._lora_info(view)
        yield from self._gpu(view)

    def _sequences(self, view: EngineView) -> Iterator[Metric]:
        stats = view.stats
        running, waiting = stats.get("num_running", 0), stats.get("num_waiting", 0)
        total, free = stats.get("num_total_blocks", 0), stats.get("num_free_blocks", 0)
        yield _gauge("quiver_sequences_running", "Sequences in the running batch.", running)
        yield _gauge("quiver_sequences_waiting", "Sequences queued for admission.", waiting)
        if view.preempted_waiting is not None:
            yield _gauge("quiver_sequences_preempted", "Queued sequences that were preempted and wait to resume.",
                         view.preempted_waiting)
        if view.preemptions is not None:
            yield CounterMetricFamily("quiver_preemptions", "Sequences preempted (KV blocks ran out).",
                                      value=view.preemptions)
        yield _gauge("quiver_kv_cache_blocks_total", "KV-cache blocks in the pool.", total)
        yield _gauge("quiver_kv_cache_blocks_used", "KV-cache blocks in use.", total - free)
        # What the Kubernetes Gateway API inference extension reads to pick an endpoint.
        yield _gauge("vllm:num_requests_running", "Sequences in the running batch (vLLM name).", running)
        yield _gauge("vllm:num_requests_waiting", "Sequences queued for admission (vLLM name).", waiting)
        usage = (total - free) / total if total else 0.0
        yield _gauge("vllm:gpu_cache_usage_perc", "Fraction of KV-cache blocks in use, 0 to 1 (vLLM name).", usage)
        # The name newer releases of the inference extension's endpoint picker read.
        yield _gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use, 0 to 1 (vLLM name).", usage)

    def _adapters(self, view: EngineView) -> Iterator[Metric]:
        stats = view.stats
        loads = CounterMetricFamily("quiver_adapter_loads", "Adapter loads: into host memory (host) or into "
                                    "a GPU slot (gpu).", labels=["tier"])
        loads.add_metric(["host"], stats.get("adapter_loads", 0))
        loads.add_metric(["gpu"], stats.get("adapter_gpu_loads", 0))
        yield loads
        evictions = CounterMetricFamily("quiver_adapter_evictions", "Adapters evicted from host memory (host) "
                                        "or from a GPU slot (gpu).", labels=["tier"])
        evictions.add_metric(["host"], stats.get("adapter_host_evictions", 0))
        evictions.add_metric(["gpu"], stats.get("adapter_gpu_evictions", 0))
        yield evictions
        yield CounterMetricFamily("quiver_adapter_load_failures", "Adapter loads that failed validation.",
                                  value=stats.get("adapter_load_failures", 0))
        if view.load_times is not None:
            hist = HistogramMetricFamily("quiver_adapter_load_seconds", "Adapter load time by the tier it came "
                                         "from: disk (into host memory) or host (into a GPU slot).", labels=["tier"])
            for tier, times in sorted(view.load_times.items()):
                hist.add_metric([tier], times.cumulative(), sum_value=times.total)
            yield hist
        if view.adapters is None:
            yield _gauge("quiver_adapters_registered", "Adapters registered.", stats.get("adapters_registered", 0))
            return
        counts: dict[tuple[str, str], int] = {}
        for _, state, tier in view.adapters:
            counts[(state, tier)] = counts.get((state, tier), 0) + 1
        by_state = GaugeMetricFamily("quiver_adapters", "Registered adapters by state and tier.",
                                     labels=["state", "tier"])
        for state, tier in ADAPTER_STATES.items():  # every state present, so `sum by (state)` never has gaps
            if not any(s == state for s, _ in counts):
                by_state.add_metric([state, tier], 0)
        for (state, tier), count in sorted(counts.items()):
            by_state.add_metric([state, tier], count)
        yield by_state
        yield _gauge("quiver_adapters_registered", "Adapters registered.", len(view.adapters))
        each = GaugeMetricFamily("quiver_adapter_state", "1 per adapter, labelled with its state and tier "
                                 "(adapters past the label cap are left out).", labels=["adapter", "state", "tier"])
        for name, state, tier in view.adapters:
            label = self._labels(name)
            if label == name:
                each.add_metric([name, state, tier], 1)
        yield each

    def _lora_info(self, view: EngineView) -> Iterator[Metric]:
        if view.max_lora is None:
            return
        yield _gauge("quiver_lora_slots", "GPU LoRA slots (the most distinct adapters in one batch).", view.max_lora)
        # vLLM's shape: the value is when it was read, so a reader can take the newest series.
        info = GaugeMetricFamily("vllm:lora_requests_info", "Adapters with running and waiting requests, and "
                                 "the GPU LoRA slots (vLLM-compatible).",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(view.running_adapters), ",".join(view.waiting_adapters), str(view.max_lora)],
                        time.time())
        yield info

    def _gpu(self, view: EngineView) -> Iterator[Metric]:
        if not view.gpu_memory:
            return
        help_text = {"used": "GPU memory in use on the device (all processes).", "total": "GPU memory on the device.",
                     "allocated": "GPU memory held by tensors of this process.",
                     "reserved": "GPU memory reserved by this process's caching allocator."}
        for kind, text in help_text.items():
            family = GaugeMetricFamily(f"quiver_gpu_memory_{kind}_bytes", text, labels=["device"])
            for device, values in view.gpu_memory.items():
                family.add_metric([device], values[kind])
            yield family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))
