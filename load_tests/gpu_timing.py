"""GPU time of a captured CUDA graph's replay: CUDA events around each replay, median."""

from __future__ import annotations

import statistics

import torch


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    """Median milliseconds of one `graph.replay()` over `reps` replays (each waited for)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
