"""What a load run sends and when: arrivals, adapter popularity, lengths. Pure functions.

The definitions follow S-LoRA's online benchmark (`generate_requests` in its benchmarks) so
numbers are comparable with the paper:
  - arrivals: gamma-distributed gaps with coefficient of variation `cv` (shape 1/cv^2,
    scale cv^2/rate); cv = 1 is a Poisson process, cv = 4 is bursty. vLLM's bench client uses
    the same gamma with `burstiness` = 1/cv^2.
  - adapter popularity: adapter index = floor(N * X), X ~ numpy's power(alpha), whose CDF on
    [0, 1] is x^alpha: alpha = 1 is uniform, smaller alpha piles requests onto low indexes.
  - lengths: uniform integers on [low, high) (S-LoRA uses [8, 512) for input and output).
Everything is drawn from one seeded numpy Generator, so a seed names a workload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ARRIVALS = ("poisson", "gamma", "constant")
# Token ids for synthetic prompts: past the few special tokens that byte-level BPE
# tokenizers put first, within the 256 byte tokens every such vocabulary has.
DEFAULT_TOKEN_RANGE = (10, 256)


@dataclass(frozen=True)
class LengthRange:
    """Integers uniform on [low, high)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 1 or self.high <= self.low:
            raise ValueError(f"a length range needs 1 <= low < high, got [{self.low}, {self.high})")

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        """`"8:512"` → [8, 512); a single number `"64"` → exactly 64."""
        low, sep, high = text.partition(":")
        try:
            lo = int(low)
            hi = int(high) if sep else lo + 1
        except ValueError:
            raise ValueError(f"expected LOW:HIGH or N, got {text!r}") from None
        return cls(lo, hi)


@dataclass(frozen=True)
class WorkloadSpec:
    """One load point. `rate` in requests/s; math.inf sends every request at time 0."""

    num_requests: int
    rate: float
    num_adapters: int
    alpha: float = 1.0
    arrival: str = "poisson"
    cv: float = 1.0
    input_len: LengthRange = LengthRange(8, 512)
    output_len: LengthRange = LengthRange(8, 512)
    base_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 0:
            raise ValueError(f"num_requests must not be negative, got {self.num_requests}")
        if not self.rate > 0:
            raise ValueError(f"rate must be positive (or inf), got {self.rate}")
        if self.num_adapters < 0:
            raise ValueError(f"num_adapters must not be negative, got {self.num_adapters}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if not self.cv > 0:
            raise ValueError(f"cv must be positive, got {self.cv}")
        if not 0.0 <= self.base_fraction <= 1.0:
            raise ValueError(f"base_fraction must be in [0, 1], got {self.base_fraction}")


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a workload. `adapter` is an index into the adapter list, None for the base."""

    index: int
    send_at: float
    adapter: int | None
    prompt_len: int
    output_len: int
    prompt_token_ids: tuple[int, ...]


def arrival_gaps(n: int, rate: float, arrival: str, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds between consecutive requests (the first gap is before the first request)."""
    if math.isinf(rate):
        return np.zeros(n)
    if arrival == "constant":
        return np.full(n, 1.0 / rate)
    if arrival == "poisson":
        return rng.exponential(1.0 / rate, n)
    if arrival == "gamma":
        return rng.gamma(1.0 / (cv * cv), cv * cv / rate, n)
    raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")


def arrival_times(n: int, rate: float, arrival: str, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds from the start, non-decreasing."""
    return np.cumsum(arrival_gaps(n, rate, arrival, cv, rng))


def adapter_indices(n: int, num_adapters: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """S-LoRA popularity: floor(N * power(alpha)), clipped to N - 1 (power can return 1.0)."""
    if num_adapters < 1:
        raise ValueError(f"num_adapters must be positive, got {num_adapters}")
    return np.minimum((rng.power(alpha, n) * num_adapters).astype(np.int64), num_adapters - 1)


def popularity(num_adapters: int, alpha: float) -> np.ndarray:
    """P(adapter i) under `adapter_indices`: ((i+1)/N)^alpha - (i/N)^alpha."""
    edges = (np.arange(num_adapters + 1) / num_adapters) ** alpha
    return np.diff(edges)


def uniform_lengths(n: int, lengths: LengthRange, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(lengths.low, lengths.high, n)


def random_prompt(length: int, rng: np.random.Generator, token_range: tuple[int, int]) -> tuple[int, ...]:
    """Random token ids: no two prompts share a prefix, so the prefix cache never helps."""
    low, high = token_range
    if not 0 <= low < high:
        raise ValueError(f"token range must satisfy 0 <= low < high, got {token_range}")
    return tuple(int(t) for t in rng.integers(low, high, length))


def build_workload(spec: WorkloadSpec, token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE) -> list[PlannedRequest]:
    """The requests of `spec`, in send order."""
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    times = arrival_times(n, spec.rate, spec.arrival, spec.cv, rng)
    if spec.num_adapters:
        adapters: list[int | None] = [int(i) for i in adapter_indices(n, spec.num_adapters, spec.alpha, rng)]
        on_base = rng.random(n) < spec.base_fraction
        adapters = [None if base else a for a, base in zip(adapters, on_base, strict=True)]
    else:
        adapters = [None] * n
    inputs = uniform_lengths(n, spec.input_len, rng)
    outputs = uniform_lengths(n, spec.output_len, rng)
    return [
        PlannedRequest(i, float(times[i]), adapters[i], int(inputs[i]), int(outputs[i]),
                       random_prompt(int(inputs[i]), rng, token_range))
        for i in range(n)
    ]


def rate_ladder(start: float, factor: float, max_rate: float) -> list[float]:
    """Geometric rates start, start*factor, ... up to max_rate (inclusive), for a sweep."""
    if not start > 0 or not factor > 1 or max_rate < start:
        raise ValueError(f"need start > 0, factor > 1, max_rate >= start; got {start}, {factor}, {max_rate}")
    rates = [start]
    while rates[-1] * factor <= max_rate * (1 + 1e-9):
        rates.append(rates[-1] * factor)
    return rates


def is_saturated(offered_rate: float, achieved_rate: float, tolerance: float = 0.9) -> bool:
    """The server fell behind: it completed less than `tolerance` of what was offered."""
    return achieved_rate < tolerance * offered_rate
