"""How long adapter loads take, per tier they came from: a histogram the engine fills and
`/metrics` exports as `quiver_adapter_load_seconds{tier}`.

tier "disk": reading and validating an adapter from disk or the hub cache into host memory (on a
loader thread); tier "host": copying it from host memory into a GPU slot (on the engine thread,
at a step boundary; the time to issue the copies, which run on the device's stream in order).
Plain Python; the engine thread writes, a scrape reads a snapshot taken on the engine thread.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

TIERS = ("disk", "host")
BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
                              30.0)


@dataclass
class TierHistogram:
    """Counts per bucket (not cumulative; the last one is +Inf), their sum and count."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs as Prometheus writes them, ending with +Inf."""
        out, running = [], 0
        for le, n in zip((*(str(b) for b in BUCKETS), "+Inf"), self.counts, strict=True):
            running += n
            out.append((le, running))
        return out


class LoadTimes:
    def __init__(self) -> None:
        self._tiers = {tier: TierHistogram() for tier in TIERS}

    def observe(self, tier: str, seconds: float) -> None:
        if tier not in self._tiers:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        hist = self._tiers[tier]
        hist.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        hist.total += seconds

    def snapshot(self) -> dict[str, TierHistogram]:
        return {tier: TierHistogram(list(h.counts), h.total) for tier, h in self._tiers.items()}
