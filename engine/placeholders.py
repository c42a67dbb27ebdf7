"""Placeholder token ids: a token sampled on the device that the host has not read yet.

With one step in flight (LLMEngine.step), step n+1 is scheduled and launched before step n's
sampled ids reach the host. A sequence whose newest token is still on the device carries
`placeholder(i)` in its token list, meaning "row i of the previous step's sampled ids", until
the engine patches in the real id. Placeholders are negative, so no real id is one; the model
runner turns them into the real ids on the device (`resolve`) without waiting for the host.
"""

from __future__ import annotations

import torch


def placeholder(row: int) -> int:
    """The stand-in for row `row` of the previous step's sampled ids."""
    return -(row + 1)


def resolve(input_ids: torch.Tensor, pending_tokens: torch.Tensor) -> torch.Tensor:
    """`input_ids` with every `placeholder(i)` replaced by `pending_tokens[i]`, on the device."""
    rows = (-input_ids - 1).clamp_(min=0)
    return torch.where(input_ids < 0, pending_tokens.index_select(0, rows), input_ids)
