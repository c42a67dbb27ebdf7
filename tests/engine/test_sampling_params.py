"""SamplingParams refuses what the sampler could not hold: bounds and integer types."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.sampling_params import MAX_SEED, MAX_TOP_K, MIN_SEED, SamplingParams


@pytest.mark.parametrize("fields", [
    {"top_k": 2**63}, {"top_k": MAX_TOP_K + 1}, {"top_k": -2}, {"top_k": 5.0}, {"top_k": True},
    {"seed": MAX_SEED + 1}, {"seed": MIN_SEED - 1}, {"seed": 1.5}, {"seed": True},
    {"max_tokens": 4.0}, {"max_tokens": True}, {"min_tokens": 1.0},
    {"logit_bias": {-1: 1.0}}, {"logit_bias": {1.0: 1.0}}, {"stop_token_ids": [-3]}, {"stop_token_ids": [True]},
    {"temperature": float("nan")}, {"top_logprobs": True}, {"top_logprobs": 21},
], ids=repr)
def test_values_the_sampler_cannot_hold_are_value_errors(fields):
    with pytest.raises(ValueError):
        SamplingParams(**fields)


def test_the_bounds_themselves_are_accepted_and_fit_torch():
    params = SamplingParams(top_k=MAX_TOP_K, seed=MAX_SEED, stop_token_ids=[np.int64(3)])
    torch.tensor([params.top_k], dtype=torch.int64)
    torch.Generator().manual_seed(params.seed)
    torch.Generator().manual_seed(SamplingParams(seed=MIN_SEED).seed)
    assert SamplingParams(top_k=-1).top_k == 0
