"""The workload generator's distributions: arrivals, S-LoRA popularity, lengths, prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from load_tests.workload import (
    LengthRange,
    WorkloadSpec,
    adapter_indices,
    arrival_gaps,
    arrival_times,
    build_workload,
    is_saturated,
    popularity,
    random_prompt,
    rate_ladder,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize(("arrival", "cv"), [("poisson", 1.0), ("gamma", 4.0), ("gamma", 0.5)])
def test_gaps_have_the_asked_rate_and_burstiness(arrival: str, cv: float) -> None:
    gaps = arrival_gaps(200_000, 5.0, arrival, cv, rng())
    assert gaps.min() >= 0
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_constant_and_infinite_rates() -> None:
    assert arrival_gaps(4, 2.0, "constant", 1.0, rng()).tolist() == [0.5] * 4
    assert arrival_times(3, math.inf, "poisson", 1.0, rng()).tolist() == [0.0, 0.0, 0.0]
    times = arrival_times(1000, 3.0, "gamma", 4.0, rng())
    assert np.all(np.diff(times) >= 0)


def test_unknown_arrival_is_refused() -> None:
    with pytest.raises(ValueError, match="arrival"):
        arrival_gaps(3, 1.0, "uniform", 1.0, rng())


def test_popularity_is_a_distribution_uniform_at_alpha_one_and_skewed_below() -> None:
    assert popularity(100, 1.0) == pytest.approx(np.full(100, 0.01))
    skewed = popularity(100, 0.3)
    assert skewed.sum() == pytest.approx(1.0)
    assert np.all(np.diff(skewed) < 0)  # the lower the index, the more popular
    assert skewed[0] == pytest.approx(0.01**0.3)


@pytest.mark.parametrize(("n", "alpha"), [(100, 1.0), (100, 0.3), (1000, 0.3), (1, 0.5)])
def test_adapter_indices_follow_the_power_law(n: int, alpha: float) -> None:
    draws = adapter_indices(200_000, n, alpha, rng(1))
    assert draws.min() >= 0 and draws.max() < n
    freq = np.bincount(draws, minlength=n) / len(draws)
    expected = popularity(n, alpha)
    # Every adapter's share within 5 standard errors of its probability.
    stderr = np.sqrt(expected * (1 - expected) / len(draws))
    assert np.all(np.abs(freq - expected) <= 5 * stderr + 1e-12)


def test_adapter_indices_need_adapters() -> None:
    with pytest.raises(ValueError, match="num_adapters"):
        adapter_indices(3, 0, 1.0, rng())


def test_length_range_parse_and_bounds() -> None:
    assert LengthRange.parse("8:512") == LengthRange(8, 512)
    assert LengthRange.parse("64") == LengthRange(64, 65)
    for bad in ("0:4", "9:9", "x"):
        with pytest.raises(ValueError):
            LengthRange.parse(bad)


def test_random_prompt_stays_in_the_token_range() -> None:
    ids = random_prompt(5000, rng(), (10, 20))
    assert len(ids) == 5000 and min(ids) == 10 and max(ids) == 19
    with pytest.raises(ValueError, match="token range"):
        random_prompt(3, rng(), (5, 5))


def test_build_workload_is_seeded_and_respects_the_spec() -> None:
    spec = WorkloadSpec(500, 10.0, 8, alpha=0.3, arrival="gamma", cv=4.0,
                        input_len=LengthRange(4, 9), output_len=LengthRange(2, 5), seed=7)
    plan = build_workload(spec)
    assert plan == build_workload(spec)
    assert plan != build_workload(WorkloadSpec(**{**spec.__dict__, "seed": 8}))
    assert [r.index for r in plan] == list(range(500))
    assert all(a.send_at <= b.send_at for a, b in zip(plan, plan[1:], strict=False))
    assert {r.prompt_len for r in plan} == {4, 5, 6, 7, 8}
    assert {r.output_len for r in plan} == {2, 3, 4}
    assert all(len(r.prompt_token_ids) == r.prompt_len for r in plan)
    assert {r.adapter for r in plan} <= set(range(8))
    # alpha 0.3 over 8 adapters: adapter 0 gets (1/8)^0.3 = 54% of the requests.
    share = sum(r.adapter == 0 for r in plan) / len(plan)
    assert share == pytest.approx((1 / 8) ** 0.3, abs=0.07)


def test_base_model_requests() -> None:
    assert {r.adapter for r in build_workload(WorkloadSpec(50, 5.0, 0))} == {None}
    mixed = build_workload(WorkloadSpec(2000, 5.0, 4, base_fraction=0.25, seed=3))
    assert sum(r.adapter is None for r in mixed) / 2000 == pytest.approx(0.25, abs=0.04)


@pytest.mark.parametrize("field, value", [("num_requests", -1), ("rate", 0.0), ("num_adapters", -2),
                                          ("alpha", 0.0), ("arrival", "bursty"), ("cv", 0.0),
                                          ("base_fraction", 1.5)])
def test_spec_validation_names_the_field(field: str, value: object) -> None:
    args = {"num_requests": 1, "rate": 1.0, "num_adapters": 1, field: value}
    with pytest.raises(ValueError, match=field):
        WorkloadSpec(**args)  # type: ignore[arg-type]


def test_rate_ladder_and_saturation() -> None:
    assert rate_ladder(0.5, 2, 8) == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert rate_ladder(1, 3, 2) == [1]
    with pytest.raises(ValueError):
        rate_ladder(1, 1, 4)
    assert is_saturated(10.0, 8.0) and not is_saturated(10.0, 9.5)
