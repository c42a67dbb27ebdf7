"""The adapter load-time histogram: buckets, sums, snapshots that do not move."""

from __future__ import annotations

import pytest

from engine.load_times import BUCKETS, LoadTimes


def test_observations_land_in_their_bucket_and_cumulate_like_prometheus() -> None:
    times = LoadTimes()
    for seconds in (0.0004, 0.003, 0.003, 0.02, 100.0):
        times.observe("host", seconds)
    times.observe("disk", 0.05)
    snap = times.snapshot()
    host = dict(snap["host"].cumulative())
    assert host["0.0005"] == 1 and host["0.002"] == 1 and host["0.005"] == 3 and host["0.02"] == 4
    assert host[str(BUCKETS[-1])] == 4 and host["+Inf"] == 5
    assert snap["host"].count == 5 and snap["host"].total == pytest.approx(100.0264)
    assert dict(snap["disk"].cumulative())["0.05"] == 1
    times.observe("host", 0.001)
    assert snap["host"].count == 5, "a snapshot is a copy"


def test_unknown_tier_is_refused() -> None:
    with pytest.raises(ValueError, match="tier"):
        LoadTimes().observe("gpu", 0.1)
