"""Reading the server's state from outside: `/metrics`, the adapter admin API, the process's RSS.

Each quantity comes from the first source that has it:
  1. an engine object, when the server runs in this process (the short test-suite runs);
  2. `/metrics` (Prometheus text). The metric names are not fixed yet, so a quantity is looked
     up by name fragments; `--metric KEY=NAME` pins an exact sample name instead;
  3. `GET /v1/adapters` (per-adapter `in_flight`, `loads`, `gpu_loads`, `gpu_evictions`,
     `host_evictions`), for the adapter counters and reference counts.
A quantity no source has reads as None, and the reports say why instead of inventing a zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Quantity -> alternatives, each (fragments that must all appear, fragments that must not).
Pattern = tuple[tuple[str, ...], tuple[str, ...]]
DEFAULT_PATTERNS: dict[str, tuple[Pattern, ...]] = {
    "adapter_loads": ((("adapter", "load"), ("gpu", "fail", "second", "bucket")),),
    "adapter_gpu_loads": ((("adapter", "gpu", "load"), ("fail", "second", "bucket")),),
    "adapter_gpu_evictions": ((("adapter", "gpu", "evict"), ()), (("adapter", "evict"), ("host",))),
    "adapter_host_evictions": ((("adapter", "host", "evict"), ()),),
    "kv_blocks_free": ((("kv", "free"), ()), (("free", "block"), ())),
    "kv_blocks_total": ((("kv", "total"), ()), (("kv", "block"), ("free", "used", "usage"))),
    "adapter_refcount": ((("adapter", "refcount"), ()), (("adapter", "in_flight"), ())),
    "gpu_memory_allocated_bytes": ((("memory", "allocated"), ()), (("cuda", "allocated"), ())),
}
# Engine.stats() keys for the same quantities (server in this process).
_ENGINE_KEYS = {
    "adapter_loads": "adapter_loads", "adapter_gpu_loads": "adapter_gpu_loads",
    "adapter_gpu_evictions": "adapter_gpu_evictions", "adapter_host_evictions": "adapter_host_evictions",
    "kv_blocks_free": "num_free_blocks", "kv_blocks_total": "num_total_blocks",
    "adapter_refcount": "adapter_refcount_total",
}
# /v1/adapters per-adapter fields summed for the same quantities.
_ADMIN_FIELDS = {
    "adapter_loads": "loads", "adapter_gpu_loads": "gpu_loads", "adapter_gpu_evictions": "gpu_evictions",
    "adapter_host_evictions": "host_evictions", "adapter_refcount": "in_flight",
}
_SKIP_SUFFIXES = ("_created", "_bucket", "_count", "_sum")


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text → {sample name: value summed over its label sets}."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(_SKIP_SUFFIXES) and family.type != "gauge":
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


def find(samples: dict[str, float], alternatives: tuple[Pattern, ...]) -> tuple[str, float] | None:
    """The first sample matching one alternative (alternatives in order, names sorted)."""
    for must, must_not in alternatives:
        for name in sorted(samples):
            lowered = name.lower()
            if all(f in lowered for f in must) and not any(f in lowered for f in must_not):
                return name, samples[name]
    return None


@dataclass
class ServerProbe:
    """Reads the quantities of DEFAULT_PATTERNS; `sources` says where each came from last time."""

    base_url: str
    api_key: str = "none"
    engine: Any = None
    exact: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    notes: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def _get(self, path: str) -> httpx.Response | None:
        try:
            return httpx.get(self.base_url + path, timeout=self.timeout_s,
                             headers={"Authorization": f"Bearer {self.api_key}"})
        except httpx.HTTPError as exc:
            self.notes[path] = f"GET {path} failed: {exc}"
            return None

    def metrics(self) -> dict[str, float] | None:
        response = self._get("/metrics")
        if response is None:
            return None
        if response.status_code != 200:
            self.notes["/metrics"] = f"GET /metrics answered {response.status_code} (no Prometheus endpoint yet)"
            return None
        self.notes.pop("/metrics", None)
        return parse_samples(response.text)

    def adapters(self) -> list[dict[str, Any]] | None:
        """The admin API's adapter list, None when the route does not exist yet."""
        response = self._get("/v1/adapters")
        if response is None:
            return None
        if response.status_code != 200:
            self.notes["/v1/adapters"] = f"GET /v1/adapters answered {response.status_code} (no admin API yet)"
            return None
        self.notes.pop("/v1/adapters", None)
        body = response.json()
        return list(body.get("data", []) if isinstance(body, dict) else body)

    def read(self) -> dict[str, Any]:
        """Every quantity (None where no source has it), plus `refcounts` per adapter when known."""
        values: dict[str, Any] = dict.fromkeys(DEFAULT_PATTERNS)
        self.sources = {}
        if self.engine is not None:
            stats = self.engine.stats()
            for key, stat in _ENGINE_KEYS.items():
                if stat in stats:
                    values[key], self.sources[key] = stats[stat], "engine"
        samples = self.metrics()
        if samples is not None:
            for key, alternatives in DEFAULT_PATTERNS.items():
                if values[key] is not None:
                    continue
                hit = ((self.exact[key], samples[self.exact[key]]) if self.exact.get(key) in samples
                       else None if key in self.exact else find(samples, alternatives))
                if hit is not None:
                    values[key], self.sources[key] = hit[1], f"/metrics {hit[0]}"
            # Quiver exports blocks used and total; free is their difference.
            used = samples.get("quiver_kv_cache_blocks_used")
            if values["kv_blocks_free"] is None and used is not None and values["kv_blocks_total"] is not None:
                values["kv_blocks_free"] = values["kv_blocks_total"] - used
                self.sources["kv_blocks_free"] = "/metrics quiver_kv_cache_blocks_total - quiver_kv_cache_blocks_used"
        adapters = self.adapters()
        values["refcounts"] = None
        if adapters is not None:
            values["refcounts"] = {a.get("id", "?"): a.get("in_flight") for a in adapters}
            for key, name in _ADMIN_FIELDS.items():
                if values[key] is None and all(name in a for a in adapters):
                    values[key] = sum(a[name] or 0 for a in adapters)
                    self.sources[key] = "/v1/adapters"
        return values

    def missing(self) -> str:
        return "; ".join(self.notes.values()) or "not exported by any source"


def delta(before: dict[str, Any], after: dict[str, Any], key: str) -> float | None:
    if before.get(key) is None or after.get(key) is None:
        return None
    return after[key] - before[key]  # type: ignore[no-any-return]


def process_rss_bytes(pid: int) -> int | None:
    """Resident memory of process `pid`, None when it is gone."""
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None
